"""Atomic saves: every rank's files staged, flushed, renamed into place, and only then ``latest``.

A save is written under ``{save}/.tmp-iter_N/``, flushed, renamed to ``{save}/iter_N`` and
only then does ``latest`` change (itself by an atomic rename), so a run killed at any moment,
mid-save included, resumes from the last complete checkpoint. ``--keep-last`` prunes after.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_glm import faults
from megatron_glm.checkpoint.async_save import HostCopyEngine, host_copies_done, to_host
from megatron_glm.checkpoint.format import (
    LATEST,
    META,
    CheckpointError,
    list_checkpoints,
    read_latest,
    resume_tag,
    rng_file,
    tag_of,
)
from megatron_glm.checkpoint.rng import position, rng_state


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _clean_staging(save_dir: str, rank: int) -> None:
    if rank == 0:  # the remains of saves that were killed
        for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
            if name.startswith(".tmp-iter_"):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody writes into the staging folder before it is clean


def _save_failed(save_dir: str, tag: str, tmp_root: str, e: BaseException | str) -> CheckpointError:
    shutil.rmtree(tmp_root, ignore_errors=True)  # give the space back
    cause = (
        e
        if isinstance(e, str)
        else e.strerror
        if isinstance(e, OSError) and e.strerror
        else str(e).strip().splitlines()[0][:200]
    )
    latest = resume_tag(save_dir)
    return CheckpointError(
        f"saving {tag} into {save_dir} failed ({cause}): the disk is probably full or the folder unwritable. "
        f"The latest complete checkpoint is {os.path.join(save_dir, latest) if latest else 'none'}; free space "
        "and run the same command to resume from it"
    )


def _publish(save_dir: str, tag: str, tmp_root: str, keep_last: int) -> None:
    """Rank 0, once every rank's files are staged: flush, rename into place, then point ``latest`` at it."""
    staged = os.path.join(tmp_root, tag)
    _fsync_tree(staged)
    final = os.path.join(save_dir, tag)
    # the same iteration saved again: keep the old one until the new is in place
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(staged, final)
    faults.crash_point("save:renamed")
    with open(os.path.join(save_dir, LATEST + ".tmp"), "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(save_dir, LATEST + ".tmp"), os.path.join(save_dir, LATEST))
    shutil.rmtree(final + ".old", ignore_errors=True)
    shutil.rmtree(tmp_root, ignore_errors=True)
    prune(save_dir, keep_last)


def save_checkpoint(
    engine, save_dir: str, iteration: int, meta: dict, keep_last: int, rank: int = 0, writer=None
) -> str:
    """Write checkpoint ``iteration`` atomically; returns its folder.

    With ``writer`` (``--async-save``) the state is only copied to host memory here; the writer's
    thread writes and publishes it while training goes on.
    """
    tag = tag_of(iteration)
    tmp_root = os.path.join(save_dir, f".tmp-{tag}")
    staged = os.path.join(tmp_root, tag)
    if writer is not None:
        writer.wait()  # at most one save in flight
    _clean_staging(save_dir, rank)
    meta = {**meta, "iteration": iteration}
    if writer is not None:
        _save_in_background(engine, save_dir, tag, tmp_root, meta, keep_last, rank, writer)
        return os.path.join(save_dir, tag)
    try:
        engine.save_checkpoint(
            tmp_root, tag=tag, client_state={"iteration": iteration}, save_latest=False
        )
        torch.save(rng_state(), rng_file(staged, *position()))
        if rank == 0:
            with open(os.path.join(staged, META), "w") as f:
                json.dump(meta, f, indent=1)
    except (
        OSError,
        RuntimeError,
    ) as e:  # a full disk: torch reports it as a RuntimeError of its zip writer
        raise _save_failed(save_dir, tag, tmp_root, e) from None
    faults.crash_point("save:staged")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's files are in the staging folder before it moves
    if rank == 0:
        _publish(save_dir, tag, tmp_root, keep_last)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return os.path.join(save_dir, tag)


def _save_in_background(
    engine, save_dir: str, tag: str, tmp_root: str, meta: dict, keep_last: int, rank: int, writer
) -> None:
    staged = os.path.join(tmp_root, tag)
    host = HostCopyEngine(engine.checkpoint_engine)
    engine.checkpoint_engine = host
    try:
        engine.save_checkpoint(
            tmp_root, tag=tag, client_state={"iteration": meta["iteration"]}, save_latest=False
        )
    except (OSError, RuntimeError) as e:  # the staging folder could not be made (a full disk, say)
        raise _save_failed(save_dir, tag, tmp_root, e) from None
    finally:
        engine.checkpoint_engine = host.inner
    files = host.files + [(rng_file(staged, *position()), to_host(rng_state()))]
    host_copies_done()

    def write():
        failure = None
        faults.write_late(meta["iteration"])
        try:
            for i, (path, state) in enumerate(files):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(state, path)
                if i == 0:
                    # killed mid-write, training running alongside
                    faults.crash_point("async:writing")
            if rank == 0:
                with open(os.path.join(staged, META), "w") as f:
                    json.dump(meta, f, indent=1)
            faults.crash_point("save:staged")
        except (OSError, RuntimeError) as e:
            failure = e
        if not writer.all_ok(failure is None):  # every rank's files are staged (or someone failed)
            raise _save_failed(
                save_dir, tag, tmp_root, failure or "another rank could not write its files"
            )
        if rank == 0:
            _publish(save_dir, tag, tmp_root, keep_last)

    writer.submit(write, tag)


def prune(save_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    latest = read_latest(save_dir)
    for it in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
        if tag_of(it) != latest:
            shutil.rmtree(os.path.join(save_dir, tag_of(it)), ignore_errors=True)
