"""Atomic checkpoints around the DeepSpeed engine, and exact resume.

Layout: ``{save}/iter_{N:07d}/`` holds DeepSpeed's files (model, optimizer, scheduler) plus
``meta.json`` (model configuration, tokenizer, layout, iteration, consumed samples) and one
``rng_state_pp{p}_tp{t}_dp{d}.pt`` per rank (default, TP-tracker and Python RNG states);
``{save}/latest`` names the newest complete one (the file DeepSpeed reads too). A save is
written under ``{save}/.tmp-iter_N/``, flushed, renamed into place, and only then does
``latest`` change (itself by an atomic rename), so a run killed at any moment, mid-save
included, resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time

import torch

from megatron_glm import faults, serialization
from megatron_glm.config import ModelConfig

LATEST = "latest"
LOCK = ".lock"  # held by the run writing the folder (save_lock.py)
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (another architecture, tokenizer, missing files)."""


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


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


def rng_state() -> dict:
    from megatron_glm.parallel.random import get_rng_tracker

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    from megatron_glm.parallel.random import get_rng_tracker

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    get_rng_tracker().set_states(state.get("tracker", {}))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: str, pp: int, tp: int, dp: int) -> str:
    """RNG states are keyed by position in the layout, so a resume with another DP size finds them."""
    return os.path.join(folder, f"rng_state_pp{pp:02d}_tp{tp:02d}_dp{dp:03d}.pt")


def position():
    from megatron_glm.parallel import state

    if not state.model_parallel_is_initialized():
        return 0, 0, 0
    return (state.get_pipeline_model_parallel_rank(), state.get_tensor_model_parallel_rank(),
            state.get_data_parallel_rank())


def _clean_staging(save_dir: str, rank: int) -> None:
    if rank == 0:  # the remains of saves that were killed
        for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
            if name.startswith(".tmp-iter_"):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # nobody writes into the staging folder before it is clean


def _save_failed(save_dir: str, tag: str, tmp_root: str, e: BaseException | str) -> CheckpointError:
    shutil.rmtree(tmp_root, ignore_errors=True)  # give the space back
    cause = e if isinstance(e, str) else e.strerror if isinstance(e, OSError) and e.strerror else \
        str(e).strip().splitlines()[0][:200]
    latest = resume_tag(save_dir)
    return CheckpointError(
        f"saving {tag} into {save_dir} failed ({cause}): the disk is probably full or the folder unwritable. "
        f"The latest complete checkpoint is {os.path.join(save_dir, latest) if latest else 'none'}; free space "
        "and run the same command to resume from it")


def _publish(save_dir: str, tag: str, tmp_root: str, keep_last: int) -> None:
    """Rank 0, once every rank's files are staged: flush, rename into place, then point ``latest`` at it."""
    staged = os.path.join(tmp_root, tag)
    _fsync_tree(staged)
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):  # the same iteration saved again: keep the old one until the new is in place
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


def save_checkpoint(engine, save_dir: str, iteration: int, meta: dict, keep_last: int, rank: int = 0,
                    writer=None) -> str:
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
        engine.save_checkpoint(tmp_root, tag=tag, client_state={"iteration": iteration}, save_latest=False)
        torch.save(rng_state(), rng_file(staged, *position()))
        if rank == 0:
            with open(os.path.join(staged, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
    except (OSError, RuntimeError) as e:  # a full disk: torch reports it as a RuntimeError of its zip writer
        raise _save_failed(save_dir, tag, tmp_root, e) from None
    faults.crash_point("save:staged")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's files are in the staging folder before it moves
    if rank == 0:
        _publish(save_dir, tag, tmp_root, keep_last)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return os.path.join(save_dir, tag)


def _save_in_background(engine, save_dir: str, tag: str, tmp_root: str, meta: dict, keep_last: int, rank: int,
                        writer) -> None:
    from megatron_glm.training.async_save import HostCopyEngine, host_copies_done, to_host

    staged = os.path.join(tmp_root, tag)
    host = HostCopyEngine(engine.checkpoint_engine)
    engine.checkpoint_engine = host
    try:
        engine.save_checkpoint(tmp_root, tag=tag, client_state={"iteration": meta["iteration"]}, save_latest=False)
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
                    faults.crash_point("async:writing")  # killed mid-write, training running alongside
            if rank == 0:
                with open(os.path.join(staged, "meta.json"), "w") as f:
                    json.dump(meta, f, indent=1)
            faults.crash_point("save:staged")
        except (OSError, RuntimeError) as e:
            failure = e
        if not writer.all_ok(failure is None):  # every rank's files are staged (or someone failed)
            raise _save_failed(save_dir, tag, tmp_root, failure or "another rank could not write its files")
        if rank == 0:
            _publish(save_dir, tag, tmp_root, keep_last)
    writer.submit(write, tag)


def list_checkpoints(save_dir: str) -> list[int]:
    if not os.path.isdir(save_dir):
        return []
    return sorted(int(n[5:]) for n in os.listdir(save_dir) if n.startswith("iter_") and n[5:].isdigit())


def prune(save_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    latest = read_latest(save_dir)
    for it in list_checkpoints(save_dir)[:-keep_last] if keep_last > 0 else []:
        if tag_of(it) != latest:
            shutil.rmtree(os.path.join(save_dir, tag_of(it)), ignore_errors=True)


def resume_tag(load_dir: str) -> str | None:
    """The newest complete checkpoint: a folder under a final name is complete by construction.

    It is normally the one ``latest`` names; a run killed between renaming a new checkpoint
    into place and updating ``latest`` leaves a newer complete one, which wins.
    """
    done = [i for i in list_checkpoints(load_dir) if os.path.exists(os.path.join(load_dir, tag_of(i), "meta.json"))]
    return tag_of(done[-1]) if done else None


def is_iteration_folder(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(path)


def what_is_at(path: str) -> str:
    """What a path the user named as a checkpoint holds instead of one: the rest of an error's sentence."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isfile(path):
        if os.path.basename(path) == LATEST:
            return f"is the {LATEST} file of a checkpoint folder: pass the folder, {os.path.dirname(path) or '.'}"
        return "is a file, not a checkpoint folder"
    names = sorted(os.listdir(path))
    if not names:
        return "is an empty folder: no checkpoint was saved there"
    if is_iteration_folder(path):
        return ("is an unfinished checkpoint (no meta.json: its save did not complete); pass its folder, "
                f"{os.path.dirname(os.path.normpath(path)) or '.'}, to resume the newest complete one")
    if any(n.startswith("iter_") or n.startswith(".tmp-iter_") for n in names):
        return "holds no complete checkpoint (iter_*/meta.json): every save there was interrupted before it finished"
    if LOCK in names or "metrics.jsonl" in names:
        return "holds no checkpoint yet: the run that logged there saved none"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return f"is an export-hf folder: import it first (glm-convert import-hf --load {path} --save NEW_FOLDER)"
    if any(f.startswith("mp_rank_") for _, _, files in os.walk(path) for f in files):
        return ("is an original GLM checkpoint: import it first "
                f"(glm-convert import-thudm --load {path} --save NEW_FOLDER)")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"holds no megatron-glm checkpoint (iter_*/meta.json); it holds {shown}"


def locate(path: str) -> tuple[str, str]:
    """``(folder, tag)`` of the checkpoint a user names: a checkpoint folder, whose newest complete
    checkpoint it is, or one ``iter_N`` folder in it, which is that iteration. Anything else is
    refused with what is there instead, so that a mistyped path never means "start from scratch"."""
    if is_iteration_folder(path) and os.path.isfile(os.path.join(path, "meta.json")):
        path = os.path.normpath(path)
        return os.path.dirname(path) or ".", os.path.basename(path)
    tag = resume_tag(path) if os.path.isdir(path) and not is_iteration_folder(path) else None
    if tag is None:
        raise CheckpointError(f"{path} {what_is_at(path)}")
    return path, tag


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def read_meta(load_dir: str, tag: str) -> dict:
    folder = os.path.join(load_dir, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{load_dir}/{LATEST} names {tag}, but {folder} does not exist; "
                              f"point {LATEST} at one of {[tag_of(i) for i in list_checkpoints(load_dir)]}")
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}): not a megatron-glm checkpoint's meta.json; "
                              "load another checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "iteration" not in meta:
        raise CheckpointError(f"{path} lacks the model configuration or the iteration: not a megatron-glm "
                              "checkpoint's meta.json")
    return meta


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine, reading every file through ``serialization.load``.

    DeepSpeed's own engines unpickle without restriction; this one delegates everything else
    (saving, commits, decoupled writers) to the engine DeepSpeed built.
    """

    def __init__(self, inner, trust: bool = False):
        self._inner, self._trust = inner, trust

    def load(self, path: str, map_location=None):
        return serialization.load(path, map_location=map_location, trust=self._trust)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def read_safely(engine, trust: bool = False) -> None:
    """Make ``engine`` read checkpoints through the allow-list (DeepSpeed takes no engine in ``initialize``)."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine, trust)


TO_UNIVERSAL = "glm-convert to-universal --load {where} --save NEW_FOLDER, then --load NEW_FOLDER"


def check_compatible(meta: dict, model_cfg: ModelConfig, tokenizer_fingerprint: str | None, where: str,
                     tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Refuse a checkpoint of another architecture, tokenizer or layout, naming every difference.

    A universal checkpoint takes any layout; the others the TP x PP they were saved with.
    """
    for flag, saved, now in (
            ("--tensor-model-parallel-size", meta.get("tensor_model_parallel_size", 1), tensor_parallel),
            ("--pipeline-model-parallel-size", meta.get("pipeline_model_parallel_size", 1), pipeline_parallel)):
        if saved != now and not meta.get("universal") and not meta.get("weights_only"):
            raise CheckpointError(f"{where} was saved with {flag} {saved}, this run has {now}: resume with the same "
                                  "layout, or keep the whole training state on the new one with "
                                  + TO_UNIVERSAL.format(where=where))
    saved = ModelConfig.from_dict(meta["model"])
    diffs = saved.architecture_differences(model_cfg)
    if diffs:
        padding = saved.vocab_size != model_cfg.vocab_size and len(diffs) == 1
        raise CheckpointError(f"{where} holds another architecture (checkpoint vs flags): {'; '.join(diffs)}. " + (
            f"The vocabulary is padded to a multiple of --make-vocab-size-divisible-by x TP: choose them so that "
            f"it stays {saved.vocab_size} rows" if padding else
            "Pass the flags it was trained with, or start a new --save folder"))
    recorded = meta.get("tokenizer", {}).get("fingerprint")
    if tokenizer_fingerprint and recorded and recorded != tokenizer_fingerprint:
        raise CheckpointError(f"{where} was trained with another tokenizer ({meta['tokenizer'].get('files')}); "
                              "pass the same tokenizer files")


def check_data_parallel(resume: ResumePoint, data_parallel: int, zero_stage: int) -> None:
    """DeepSpeed's ZeRO partitions load only on the data-parallel size and stage that wrote them."""
    meta = resume.meta
    saved_stage, saved_dp = meta.get("args", {}).get("zero_stage", 0), meta.get("data_parallel_size")
    if resume.universal or resume.weights_only or resume.finetune or saved_dp is None:
        return
    if (saved_stage or zero_stage) and (saved_stage, saved_dp) != (zero_stage, data_parallel):
        raise CheckpointError(f"{resume} holds ZeRO-{saved_stage} partitions of {saved_dp} data-parallel ranks; this "
                              f"run has ZeRO-{zero_stage} on {data_parallel}: resume with the same, or keep the whole "
                              "training state on the new layout with " + TO_UNIVERSAL.format(where=resume.load_dir))


def load_checkpoint(engine, load_dir: str, tag: str, trust: bool = False, optimizer: bool = True,
                    rng: bool = True) -> dict:
    """Restore model, optimizer and scheduler (DeepSpeed; or the model alone), and RNG; returns the meta.

    The model alone: DeepSpeed copies the weights into the optimizer's fp32 master copies, and
    the optimizer and the lr schedule keep the fresh state they were built with.
    """
    meta = read_meta(load_dir, tag)
    read_safely(engine, trust)
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=optimizer,
                                     load_lr_scheduler_states=optimizer, load_module_only=not optimizer)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {load_dir}/{tag}: its model states are missing")
    if not rng:
        return meta
    pp, tp, dp = position()
    path = rng_file(os.path.join(load_dir, tag), pp, tp, dp)
    if not os.path.exists(path):  # more data-parallel replicas than were saved: replica 0's streams
        path = rng_file(os.path.join(load_dir, tag), pp, tp, 0)
    set_rng_state(serialization.load(path, trust=trust))
    return meta


def read_weights_only(load_dir: str, tag: str, pp_rank: int, tp_rank: int, tp: int,
                      trust: bool = False) -> tuple[dict, str]:
    """This rank's state dict from a weights-only (glm-convert) checkpoint, and the file it came from."""
    path = os.path.join(load_dir, tag, f"mp_rank_{pp_rank * tp + tp_rank:02d}_model_states.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: the converted checkpoint is incomplete")
    return _module_of(serialization.load(path, trust=trust), path), path


def _module_of(state, path: str) -> dict:
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path} holds no model state dict under 'module': not a megatron-glm model file")
    return state["module"]


def load_model_weights(load_dir: str, tag: str | None = None, trust: bool = False) -> tuple[dict, dict]:
    """(state dict, meta) of a checkpoint for inference, without DeepSpeed or an optimizer."""
    if tag is None:
        load_dir, tag = locate(load_dir)
    meta = read_meta(load_dir, tag)
    if meta.get("args", {}).get("zero_stage") == 3:
        raise CheckpointError(f"{load_dir}/{tag} holds ZeRO-3 partitions, not whole weights: consolidate them first "
                              "(glm-convert zero-to-fp32)")
    folder, tp = os.path.join(load_dir, tag), meta.get("tensor_model_parallel_size", 1)

    def read(p, t):
        path = os.path.join(folder, f"mp_rank_{p * tp + t:02d}_model_states.pt")
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        return _module_of(serialization.load(path, trust=trust), path)
    state = merge_model_shards(read, meta)
    serialization.check_finite(state.items(), os.path.join(load_dir, tag))
    return state, meta


def merge_model_shards(read_shard, meta: dict) -> dict:
    """One model's state dict (single-process names) from the shards ``read_shard(pp_rank, tp_rank)``."""
    from megatron_glm.model.parallelize import partition_of
    from megatron_glm.parallel.tensor_parallel import unshard_tensors

    tp, pp = meta.get("tensor_model_parallel_size", 1), meta.get("pipeline_model_parallel_size", 1)
    geglu = meta["model"].get("geglu", False)
    merged = {}
    for p in range(pp):  # DeepSpeed names files by model-parallel rank = pp_rank * tp + tp_rank
        shards = [read_shard(p, t) for t in range(tp)]
        ranges = meta["pipeline_layers"][p] if pp > 1 else None
        for name, tensor in shards[0].items():
            spec = partition_of(name, geglu)
            full = tensor if spec is None or tp == 1 else unshard_tensors([s[name] for s in shards], *spec)
            merged[_global_name(name, ranges)] = full
    return merged


def _global_name(name: str, ranges) -> str:
    """A stage's parameter name in the single-model numbering (``[chunk.]transformer.layers.{local}``)."""
    if ranges is None:
        return name
    parts = name.split(".")
    chunk = 0
    if parts[0].isdigit() and len(ranges) > 1:  # interleaved: the engine wrapped a ModuleList of chunks
        chunk, parts = int(parts[0]), parts[1:]
    if parts[:2] == ["transformer", "layers"]:
        parts[2] = str(ranges[chunk][0] + int(parts[2]))
    return ".".join(parts)


class ResumePoint:
    """The complete checkpoint a run starts from: its folder, tag and meta."""

    def __init__(self, load_dir: str, tag: str, meta: dict, finetune: bool = False):
        self.load_dir, self.tag, self.meta, self.finetune = load_dir, tag, meta, finetune

    @property
    def weights_only(self) -> bool:
        """A glm-convert output: weights for each rank, no optimizer state."""
        return bool(self.meta.get("weights_only"))

    @property
    def universal(self) -> bool:
        """A glm-convert to-universal output: the whole training state, for any layout."""
        return bool(self.meta.get("universal"))

    def __str__(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def find_resume(load: str | None, save: str | None, model_cfg: ModelConfig, tokenizer_fingerprint: str | None,
                tp: int, pp: int, finetune: bool = False) -> ResumePoint | None:
    """Where to resume: ``--load``'s checkpoint, or ``--save``'s when a restarted (requeued) job finds one there.

    A fine-tuning job starts from ``--load``'s weights, unless ``--save`` already holds its own
    checkpoint: then it was restarted, and resumes that. A ``--load`` that holds no checkpoint is
    refused, unless it is ``--save`` itself (the launchers' auto-resume: a first run finds nothing).
    An incompatible checkpoint is refused here, before any work and before anything is written.
    """
    saved = resume_tag(save) if save else None
    if saved and (not load or finetune):
        load, tag, finetune = save, saved, False
    elif load and save and os.path.abspath(load) == os.path.abspath(save):
        tag = resume_tag(load)
    elif load:
        load, tag = locate(load)
    else:
        tag = None
    if tag is None:
        if save:
            logger.info("no checkpoint in %s yet: starting from iteration 0 with freshly initialised weights", save)
        return None
    meta = read_meta(load, tag)
    check_compatible(meta, model_cfg, tokenizer_fingerprint, load, tp, pp)
    return ResumePoint(load, tag, meta, finetune)


class Checkpointer:
    """Saves on ``--save-interval``, at the end and on a stop request; remembers the latest one.

    With ``asynchronous`` (``--async-save``) a save returns after the host copy and is written in
    the background; ``wait`` blocks until it is complete (and raises its failure).
    """

    def __init__(self, save_dir: str | None, interval: int | None, keep_last: int, meta: dict, rank: int,
                 resume: ResumePoint | None, asynchronous: bool = False):
        self.save_dir, self.interval, self.keep_last, self.meta, self.rank = save_dir, interval, keep_last, meta, rank
        self.last_saved = resume.tag if resume else None
        self.writer = None
        if asynchronous and save_dir:
            from megatron_glm.training.async_save import BackgroundWriter

            self.writer = BackgroundWriter()
        self.blocked_s = self.waited_s = 0.0  # the last save held the loop this long; of that, waiting for the last

    def due(self, iteration: int, last_iteration: int) -> bool:
        return bool(self.save_dir) and ((bool(self.interval) and iteration % self.interval == 0)
                                        or iteration == last_iteration)

    def saved(self, iteration: int) -> bool:
        return self.last_saved == tag_of(iteration)

    def save(self, engine, iteration: int, consumed_samples: int) -> str:
        started = time.perf_counter()
        self.wait()  # the previous save, when asynchronous
        self.waited_s = time.perf_counter() - started
        folder = save_checkpoint(engine, self.save_dir, iteration, {**self.meta, "consumed_samples": consumed_samples},
                                 self.keep_last, self.rank, self.writer)
        self.blocked_s = time.perf_counter() - started
        self.last_saved = os.path.basename(folder)
        return folder

    def wait(self) -> None:
        """The save in flight is complete (a no-op for synchronous saves)."""
        if self.writer is not None:
            self.writer.wait()

    @staticmethod
    def load(engine, resume: ResumePoint, trust: bool, optimizer: bool = True, rng: bool = True, chunks=None,
             universal_reader=None) -> tuple[int, int]:
        """(iteration, consumed samples) after restoring the engine; converted and universal weights are already in
        the model (``chunks``), a universal checkpoint's optimizer state comes from ``universal_reader``.

        ``optimizer``/``rng`` False (``--no-load-optim``/``--no-load-rng``) keep those fresh; fine-tuning takes the
        weights alone and starts at iteration 0.
        """
        if resume.universal:
            from megatron_glm.training import universal

            universal.load(engine, chunks, universal_reader, resume, optimizer and not resume.finetune,
                           rng and not resume.finetune)
        elif not resume.weights_only:
            load_checkpoint(engine, resume.load_dir, resume.tag, trust, optimizer and not resume.finetune,
                            rng and not resume.finetune)
        return (0, 0) if resume.finetune else (resume.meta["iteration"], resume.meta["consumed_samples"])
