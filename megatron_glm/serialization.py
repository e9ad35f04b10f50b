"""Reading torch files without running code hidden in them.

A ``.pt`` file is a pickle, and a pickle can call any function while it loads. Every file
megatron-glm reads (its own checkpoints, DeepSpeed's, original GLM checkpoints) goes through
``load``, which uses torch's restricted unpickler (``weights_only=True``) plus an explicit
list of the few non-tensor types those files legitimately hold. A file that needs anything
else is refused with the file and the offending names; ``trust=True`` (the CLIs'
``--trust-checkpoint``) loads it unrestricted, for files whose source the user trusts.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import warnings
import zipfile

import torch

TRUST_FLAG = "--trust-checkpoint"

# Names as pickles spell them (module.qualname) -> why a file of ours or of a tool we read holds them.
ALLOWED_GLOBALS = {
    # DeepSpeed's optimizer files: the loss scaler object, the ZeRO stage, bf16/ZeRO fragment maps
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "DeepSpeed optimizer states",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "DeepSpeed fp16 optimizer states",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "DeepSpeed ZeRO optimizer states",
    "deepspeed.utils.tensor_fragment.fragment_address": "DeepSpeed ZeRO/bf16 optimizer states",
    # original GLM checkpoints: the run's arguments and numpy's RNG state (numpy 1.x and 2.x names)
    "argparse.Namespace": "original GLM checkpoints (training arguments)",
    "numpy.ndarray": "numpy RNG state",
    "numpy.dtype": "numpy RNG state",
    "numpy.core.multiarray._reconstruct": "numpy RNG state (numpy 1.x)",
    "numpy._core.multiarray._reconstruct": "numpy RNG state (numpy 2.x)",
    "numpy.core.multiarray.scalar": "numpy scalars (numpy 1.x)",
    "numpy._core.multiarray.scalar": "numpy scalars (numpy 2.x)",
    **{
        f"numpy.dtypes.{name}": "numpy dtypes"
        for name in (
            "UInt8DType",
            "Int8DType",
            "UInt16DType",
            "Int16DType",
            "UInt32DType",
            "Int32DType",
            "UInt64DType",
            "Int64DType",
            "Float16DType",
            "Float32DType",
            "Float64DType",
            "BoolDType",
        )
    },
}


class CheckpointFileError(ValueError):
    """A torch file that cannot be loaded safely as it is."""


class UnsafeCheckpointError(CheckpointFileError):
    """The file needs globals outside the allow-list: loading it could run code."""


class CorruptCheckpointError(CheckpointFileError):
    """The file is truncated, empty or not a torch file at all."""


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        with warnings.catch_warnings():  # numpy.core is a deprecated alias on numpy 2
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


_resolved: dict[str, object] = {}


def _allowed(names) -> list:
    """``(object, pickled name)`` pairs for torch's allow-list; only the names a file uses are imported."""
    out = []
    for name in names:
        if name not in _resolved:
            _resolved[name] = _resolve(name)
        if _resolved[name] is not None:
            out.append((_resolved[name], name))
    return out


def globals_needed(path: str) -> list[str] | None:
    """Globals the file's pickle names beyond torch's own safe set; ``None`` for a pre-zip (legacy) file."""
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            return None
    return torch.serialization.get_unsafe_globals_in_checkpoint(path)


def _refusal(path: str, names) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load: its pickle calls {', '.join(sorted(names))}, which megatron-glm does not "
        f"allow (loading it could run code). If you trust where this file came from, pass {TRUST_FLAG}"
    )


def _corrupt(path: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: not a readable checkpoint file ({problem}): it is truncated, corrupt or "
        "not a torch file; load another checkpoint, or re-create this one"
    )


def load(path: str, map_location="cpu", trust: bool = False, mmap: bool = False):
    """``torch.load`` that refuses files able to run code, unless ``trust``; ``mmap``: tensors stay in the file
    (memory-mapped) until read, so a reader that needs a few of them holds only those."""
    path = os.fspath(path)
    # torch maps only its zip format; a file in the legacy one (torch < 1.6) is read whole
    mmap = mmap and zipfile.is_zipfile(path)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        if os.path.getsize(path) == 0:
            raise _corrupt(path, "empty")
        needed = globals_needed(path)
        if needed is not None:
            unknown = [n for n in needed if n not in ALLOWED_GLOBALS]
            if unknown:
                raise _refusal(path, unknown)
        # numpy's dtype classes are checked on BUILD without being named in the pickle: always allowed
        allowed = _allowed(
            ALLOWED_GLOBALS
            if needed is None
            else set(needed) | {n for n in ALLOWED_GLOBALS if n.startswith("numpy.")}
        )
        # the guarantee: torch's restricted unpickler
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        names = re.findall(r"GLOBAL (\S+)", str(e))
        if names:
            raise _refusal(path, names) from None
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise _corrupt(path, detail[0][:200] if detail else "unpickling failed") from None
    # ours, or unreadable
    except (
        CheckpointFileError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    ):
        raise
    except Exception as e:  # noqa: BLE001 - the restricted unpickler fails in many ways on garbage; none ran code
        detail = str(e).split(". ")[0][:200] or "the file ends early"
        raise _corrupt(path, f"{type(e).__name__}: {detail}") from None


class NonFiniteWeightsError(ValueError):
    """Weights that hold NaN or Inf: a corrupt file, or a run that diverged before it saved."""


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction with no overflow: a NaN anywhere makes both extremes NaN, an Inf is one of them."""
    if not t.is_floating_point() or not t.numel():
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(named_tensors, where: str) -> None:
    """Refuse weights with a NaN or an Inf anywhere, naming the tensors.

    Every reader of weights calls it on what it has just read: one vectorised min/max per tensor,
    a few percent of the time reading it took (benchmarks/finite_check.py). A model loaded with a
    NaN in it evaluates at chance, generates noise or trains to NaN, with nothing to say why.
    """
    bad = [name for name, t in named_tensors if not _all_finite(t)]
    if bad:
        raise NonFiniteWeightsError(
            f"{where}: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN or Inf ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}): the file is corrupt, or the run diverged before it saved; "
            "use an earlier checkpoint"
        )
