"""The per-sample generators are numpy's own ``default_rng([seed, index])``, state for state."""

import numpy as np
import pytest

from megatron_glm.data.sample_rng import SampleGenerators


def numpy_state(seed: int, index: int) -> dict:
    return np.random.default_rng([seed, index]).bit_generator.state


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31, 2**32 - 1, 2**32, 2**40 + 7])
def test_states_are_numpys(seed):
    rng = np.random.default_rng(seed % 1000)
    indices = [0, 1, 2, 3, 255, 256, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**45 + 3]
    indices += rng.integers(0, 2**32, 200).tolist()
    generators = SampleGenerators(seed)
    got = [g.bit_generator.state for g in generators(indices)]
    assert got == [numpy_state(seed, i) for i in indices]


def test_generators_are_reused_and_reset():
    """A second call gives generators in the new samples' states, whatever was drawn from them before."""
    generators = SampleGenerators(1234)
    first = generators([10, 11, 12])
    for g in first:
        g.random(7), g.integers(0, 5, 3)  # leaves has_uint32 / uinteger set
    second = generators([11, 13])
    assert [g.random(5).tolist() for g in second] == [
        np.random.default_rng([1234, i]).random(5).tolist() for i in (11, 13)
    ]
    assert [g.integers(0, 2**20, 4).tolist() for g in generators([99])] == [
        np.random.default_rng([1234, 99]).integers(0, 2**20, 4).tolist()
    ]
