"""The sample index is built by global rank 0 alone and memory-mapped by the others (2 real processes, gloo)."""

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, prefix, cache_dirs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
        ds = PackedDataset(IndexedDataset(prefix), 0, 200, 24, 300, seed=11, cache_dir=cache_dirs[rank])
        result.update(built=built, mmap=isinstance(ds.sample_idx, np.memmap),
                      samples=np.stack([ds[i]["text"] for i in range(0, 300, 7)]))
    except FileNotFoundError as e:
        result["error"] = str(e)
    np.save(os.path.join(out, f"rank{rank}.npy"), np.array(result, dtype=object), allow_pickle=True)
    dist.destroy_process_group()


def run(tmp_path, shared: bool):
    from megatron_glm.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32, overwrite=True) as w:
        for d in range(200):
            w.add_document(d * 100 + np.arange(rng.integers(1, 60)))
    caches = [str(tmp_path / "cache")] * 2 if shared else [str(tmp_path / f"cache{r}") for r in range(2)]
    out = tmp_path / ("shared" if shared else "private")
    out.mkdir()
    mp.start_processes(worker, args=(2, free_port(), prefix, caches, str(out)), nprocs=2, start_method="spawn")
    return [np.load(out / f"rank{r}.npy", allow_pickle=True).item() for r in range(2)]


def test_rank0_builds_and_the_others_map_it(tmp_path):
    r0, r1 = run(tmp_path, shared=True)
    assert r0["built"] == [0] and r1["built"] == [], "only global rank 0 builds"
    assert r1["mmap"] and np.array_equal(r0["samples"], r1["samples"])
    r0, r1 = run(tmp_path, shared=False)  # a cache folder rank 1 cannot see: a clear error, no hang
    assert "error" not in r0 and "filesystem all nodes share" in r1["error"]
