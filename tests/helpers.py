"""Small helpers shared by the tests."""

import itertools
import json


def write_jsonl(path, rows):
    """Rows are dicts (serialised) or raw bytes/str lines (written as they are)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            if isinstance(row, str):
                row = row.encode("utf-8")
            f.write(row.rstrip(b"\n") + b"\n")
    return str(path)


def records(folder):
    """The per-iteration values glm-pretrain wrote to ``{folder}/metrics.jsonl``."""
    import os

    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tree_md5(folder) -> dict[str, str]:
    """``{relative path: md5}`` of every file below ``folder``: what a refused command must leave unchanged."""
    import hashlib
    import os

    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.md5(
                    f.read()
                ).hexdigest()
    return out


_ports = itertools.count()


def free_port():
    """A port below the kernel's ephemeral range (32768-60999), in a block of its own per pytest-xdist worker.

    A port the kernel hands out (bind to 0) is free only until the launcher binds it; meanwhile
    the other worker's ranks open connections and gloo listeners on ephemeral ports and can take
    it (EADDRINUSE, seen under the parallel suite). Ports below the range are never handed out.
    """
    import os
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    while True:
        port = 20000 + 1500 * worker + next(_ports) % 1500
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _entry(rank, fn, world, port, out_dir, args):
    import os

    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    import torch.distributed as dist

    # no rank leaves while a peer still talks to it (gloo aborts on a closed peer)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn(fn, world, out_dir, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` real processes (gloo); returns each rank's result."""
    import os

    import torch
    import torch.multiprocessing as mp

    os.makedirs(str(out_dir), exist_ok=True)
    mp.start_processes(
        _entry,
        args=(fn, world, free_port(), str(out_dir), args),
        nprocs=world,
        start_method="spawn",
    )
    return [
        torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False)
        for r in range(world)
    ]


def launch_pretrain(nproc, args, fault=None, module="megatron_glm.training.pretrain"):
    """glm-pretrain (or another command's ``module``) in ``nproc`` processes under torchrun (one plain process
    for 1); the completed run."""
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["MEGATRON_GLM_FAULT"] = fault or ""
    # one thread, as torchrun gives each of several processes: two OpenMP threads spinning beside the other
    # test worker's processes on two cores made a one-process run of many small ops several times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        module,
        *args,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def thudm_checkpoint(folder, model, mp: int, legacy: bool = False):
    """The original implementation's files, sliced here independently: each partition [Q_r; K_r; V_r].

    Beside the weights they hold what THUDM/GLM's save adds: the arguments and the RNG states.
    ``legacy``: torch's format before 1.6 (not a zip, so it cannot be memory-mapped).
    """
    import argparse
    import random

    import numpy as np
    import torch

    sd = model.state_dict()
    it = folder / "1000"
    it.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text("1000")
    for r in range(mp):
        part = {}
        for name, w in sd.items():
            if "query_key_value" in name:
                q, k, v = w.chunk(3, 0)
                part[name] = torch.cat([q.chunk(mp, 0)[r], k.chunk(mp, 0)[r], v.chunk(mp, 0)[r]])
            elif "dense_h_to_4h" in name or name == "word_embeddings.weight":
                part[name] = w.chunk(mp, 0)[r]
            elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                part[name] = w.chunk(mp, 1)[r]
            else:
                part[name] = w
        torch.save(
            {
                "module": {"module." + k: v.clone() for k, v in part.items()},
                "iteration": 1000,
                "args": argparse.Namespace(num_layers=2, block_lm=True),
                "np_rng_state": np.random.get_state(),
                "random_rng_state": random.getstate(),
                "torch_rng_state": torch.get_rng_state(),
            },
            it / f"mp_rank_{r:02d}_model_states.pt",
            _use_new_zipfile_serialization=not legacy,
        )


def deepspeed_consolidation(path: str, tag: str, meta: dict) -> dict[str, dict]:
    """``{"fp32" | "exp_avg" | "exp_avg_sq": whole state dict}`` of a glm-pretrain checkpoint, as DeepSpeed's own
    ``zero_to_fp32`` consolidates its partitions (the whole model in memory), merged over TP x PP: the reference
    the streaming reader (``checkpoint/partitions.py``) is held to.

    Without ZeRO the weights are the fp32 masters and the moments sit in each rank's model file, in the order
    the optimizer was given its parameters (decayed ones first).
    """
    import os

    from megatron_glm import checkpoint as ckpt
    from megatron_glm import serialization

    states = ("fp32", "exp_avg", "exp_avg_sq")
    if ckpt.settings_of(meta).parallel.zero_stage:
        return {state: zero_consolidation(path, tag, meta, False, state) for state in states}
    folder, tp = os.path.join(path, tag), meta.get("tensor_model_parallel_size", 1)

    def read(p, t, state):
        saved = serialization.load(ckpt.model_file(folder, p, t, tp))
        module, optimizer = saved["module"], saved["optimizer"]
        names = [n for n in module if ckpt.decays(n)] + [n for n in module if not ckpt.decays(n)]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        if state == "fp32":
            return {k: v.float() for k, v in module.items()}
        return {n: optimizer["state"][i][state].float() for n, i in zip(names, ids)}

    return {
        state: ckpt.merge_model_shards(lambda p, t, state=state: read(p, t, state), meta)
        for state in states
    }


def zero_consolidation(
    path: str, tag: str, meta: dict, trust: bool = False, state: str = "fp32"
) -> dict:
    """DeepSpeed's consolidation, once per model-parallel rank (it assumes one), then the TP x PP merge.

    ``state`` "exp_avg" or "exp_avg_sq" consolidates that Adam moment instead of the fp32 weights:
    the moments are flat partitions laid out exactly as the weights' (one per parameter group),
    so each optimizer file is staged with its fp32 partitions replaced by the moment's, and
    DeepSpeed's own unflattening does the rest. DeepSpeed's consolidation unpickles without
    restriction, so unless ``trust`` it reads copies that were loaded through the allow-list and
    saved again: only vetted objects reach it.
    """
    import os
    import tempfile

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatron_glm import checkpoint as ckpt
    from megatron_glm import serialization

    folder = os.path.join(path, tag)
    tp = meta.get("tensor_model_parallel_size", 1)

    def read(p, t):
        mp = f"mp_rank_{p * tp + t:02d}"
        files = [
            f
            for f in os.listdir(folder)
            if mp in f and f.endswith(("_optim_states.pt", "_model_states.pt"))
        ]
        if not any(f.endswith("_optim_states.pt") for f in files):
            raise ValueError(f"{folder} has no ZeRO optimizer partitions for {mp}")
        # one model-parallel rank's files under DeepSpeed's names
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, tag))
            for f in files:
                source, staged = (
                    os.path.join(folder, f),
                    os.path.join(tmp, tag, f.replace(mp, "mp_rank_00")),
                )
                if state != "fp32" and f.endswith("_optim_states.pt"):
                    torch.save(
                        _with_moment(serialization.load(source, trust=trust), state, source), staged
                    )
                elif trust:
                    os.symlink(source, staged)
                else:
                    torch.save(serialization.load(source), staged)
            merged = get_fp32_state_dict_from_zero_checkpoint(tmp, tag)
        return {k: v.float() for k, v in merged.items()}

    return ckpt.merge_model_shards(read, meta)


def _zero_partitions(optim: dict, source: str) -> tuple[str, dict]:
    """(key of the fp32 flat partitions, the base optimizer's state dict) in a ZeRO optimizer file."""
    osd = optim.get("optimizer_state_dict") if isinstance(optim, dict) else None
    # ZeRO-1/2 (and DeepSpeed's bf16)
    if isinstance(osd, dict) and "single_partition_of_fp32_groups" in osd:
        return "single_partition_of_fp32_groups", osd["base_optimizer_state"]
    if isinstance(osd, dict) and "fp32_flat_groups" in osd:  # ZeRO-3
        return "fp32_flat_groups", osd["optimizer_state_dict"]
    raise ValueError(f"{source}: not a DeepSpeed ZeRO optimizer file (no fp32 flat partitions)")


def _with_moment(optim: dict, state: str, source: str) -> dict:
    key, base = _zero_partitions(optim, source)
    groups = optim["optimizer_state_dict"][key]
    try:
        moments = [base["state"][i][state] for i in range(len(groups))]
    except (KeyError, IndexError):
        raise ValueError(
            f"{source} holds no Adam {state} for every parameter group: not an Adam optimizer's "
            "state, or saved before the first step"
        ) from None
    optim["optimizer_state_dict"][key] = [m.float() for m in moments]
    return optim
