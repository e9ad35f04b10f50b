"""The sample index is built by global rank 0 alone and memory-mapped by the others (2 real processes, gloo)."""

import numpy as np

from tests.helpers import spawn


def worker(rank, world, prefix, cache_dirs):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_glm.data import packed_dataset
    from megatron_glm.data.indexed import IndexedDataset
    from megatron_glm.data.packed_dataset import PackedDataset

    built = []
    original = packed_dataset.build_sample_index

    def counting(*args):
        built.append(rank)
        return original(*args)

    packed_dataset.build_sample_index = counting
    result = {"rank": rank}
    try:
        ds = PackedDataset(
            IndexedDataset(prefix), 0, 200, 24, 300, seed=11, cache_dir=cache_dirs[rank]
        )
        result.update(
            built=built,
            mmap=isinstance(ds.sample_idx, np.memmap),
            samples=np.stack([ds[i]["text"] for i in range(0, 300, 7)]),
        )
    except FileNotFoundError as e:
        result["error"] = str(e)
    return result


def run(tmp_path, shared: bool):
    from megatron_glm.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32, overwrite=True) as w:
        for d in range(200):
            w.add_document(d * 100 + np.arange(rng.integers(1, 60)))
    caches = (
        [str(tmp_path / "cache")] * 2 if shared else [str(tmp_path / f"cache{r}") for r in range(2)]
    )
    return spawn(worker, 2, tmp_path / ("shared" if shared else "private"), prefix, caches)


def test_rank0_builds_and_the_others_map_it(tmp_path):
    r0, r1 = run(tmp_path, shared=True)
    assert r0["built"] == [0] and r1["built"] == [], "only global rank 0 builds"
    assert r1["mmap"] and np.array_equal(r0["samples"], r1["samples"])
    r0, r1 = run(tmp_path, shared=False)  # a cache folder rank 1 cannot see: a clear error, no hang
    assert "error" not in r0 and "filesystem all nodes share" in r1["error"]
