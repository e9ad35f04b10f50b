"""Per-sample random generators: ``np.random.default_rng([seed, index])``, bitwise, for a batch at once.

Every sample's draws come from its own generator, seeded from ``(seed, sample index)``, so the
data does not depend on batching or on the data-parallel size. Building one with
``default_rng`` costs about 20 us, more than half of what a document-objective sample takes
to collate: numpy hashes the seed words through ``SeedSequence`` one sample at a time and then
builds a fresh ``PCG64``. Here the hash runs for the whole batch in a few array operations,
and the PCG64 state it gives is set on generators kept from the last batch.

The arithmetic is numpy's (``SeedSequence``'s pool of four 32-bit words, then ``PCG64``'s
seeding step); ``tests/test_sample_rng.py`` holds it to numpy's own generators. Entropy
words that are not a ``[seed, index]`` pair of 32-bit numbers take numpy's path.
"""

from __future__ import annotations

import numpy as np

_M32, _M128 = 0xFFFFFFFF, (1 << 128) - 1
# SeedSequence's hash constants (numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4  # SeedSequence's default pool size, in 32-bit words
# PCG64's 128-bit LCG multiplier
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341


def _hashmix(value: int, const: tuple[int, int]) -> int:
    value = ((value ^ const[0]) * const[1]) & _M32
    return value ^ (value >> 16)


def _column(values) -> np.ndarray:
    return np.asarray(values, np.uint32)[:, None]


def _hash_constants(init: int, mult: int, count: int) -> list[tuple[int, int]]:
    """SeedSequence's running hash constant around each of ``count`` hash steps: (before, after its multiply).
    It does not depend on the data, so it is worked out once."""
    out, h = [], init
    for _ in range(count):
        out.append((h, (h * mult) & _M32))
        h = out[-1][1]
    return out


class SampleGenerators:
    """``generators(indices)[k]`` is in the state of ``np.random.default_rng([seed, indices[k]])``.

    The generators are reused by the next call: take every draw from them before asking again.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._fast = 0 <= self.seed <= _M32
        self._pool: list[np.random.Generator] = []
        # mixing the entropy in
        consts = _hash_constants(_INIT_A, _MULT_A, _POOL + _POOL * (_POOL - 1))
        # the pool after the entropy [seed, index, 0, 0] goes in; row 1, the index's, is filled per call
        self._entropy = _column(
            [_hashmix(self.seed, consts[0]), 0, _hashmix(0, consts[2]), _hashmix(0, consts[3])]
        )
        self._index_const = tuple(np.uint32(c) for c in consts[1])
        # then every pool word is mixed into the other three, one source word at a time
        self._rounds = []
        for src in range(_POOL):
            cs = consts[_POOL + 3 * src : _POOL + 3 * src + 3]
            self._rounds.append(
                (
                    src,
                    [d for d in range(_POOL) if d != src],
                    _column([c[0] for c in cs]),
                    _column([c[1] for c in cs]),
                )
            )
        # generate_state(4, uint64): eight 32-bit words drawn from the pool in turn
        out = _hash_constants(_INIT_B, _MULT_B, 2 * _POOL)
        self._out = (_column([c[0] for c in out]), _column([c[1] for c in out]))

    def __call__(self, indices) -> list[np.random.Generator]:
        indices = [int(i) for i in indices]
        if not self._fast or (indices and not 0 <= min(indices) <= max(indices) <= _M32):
            return [np.random.default_rng([self.seed, i]) for i in indices]
        while len(self._pool) < len(indices):
            self._pool.append(np.random.Generator(np.random.PCG64()))
        for gen, (state, inc) in zip(self._pool, self._pcg64_states(indices)):
            gen.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": state, "inc": inc},
                "has_uint32": 0,
                "uinteger": 0,
            }
        return self._pool[: len(indices)]

    def _pcg64_states(self, indices: list[int]) -> list[tuple[int, int]]:
        """PCG64's (state, increment) after seeding from ``SeedSequence([seed, index])``, per index."""
        # uint32: products wrap as SeedSequence's do
        pool = np.repeat(self._entropy, len(indices), axis=1)
        v = (np.asarray(indices, np.uint32) ^ self._index_const[0]) * self._index_const[1]
        pool[1] = v ^ (v >> 16)
        for src, dst, c0, c1 in self._rounds:
            v = (pool[src] ^ c0) * c1
            v ^= v >> 16
            mixed = _MIX_L * pool[dst] - _MIX_R * v
            pool[dst] = mixed ^ (mixed >> 16)
        words = (np.tile(pool, (2, 1)) ^ self._out[0]) * self._out[1]
        words ^= words >> 16
        states = []
        for w in words.T.tolist():
            # generate_state(4, uint64) pairs the words low-high; pcg64_set_seed: state 0, inc = 2 * seq + 1, step,
            # add the seed, step
            seed = (w[0] | w[1] << 32) << 64 | w[2] | w[3] << 32
            inc = (((w[4] | w[5] << 32) << 64 | w[6] | w[7] << 32) << 1 | 1) & _M128
            states.append((((inc + seed) * _PCG_MULT + inc) & _M128, inc))
        return states
