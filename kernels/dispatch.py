"""Which implementation a kernel call runs: Triton or the torch reference.

``auto`` (the default) runs Triton on CUDA tensors and the reference elsewhere; ``triton``
and ``torch`` force one side (``--kernels`` in glm-pretrain, or ``MEGATRON_GLM_KERNELS``).
Off CUDA, Triton runs only under ``TRITON_INTERPRET=1`` (the tests). A call the Triton
kernel cannot take (a dtype, a head dim) runs the reference and warns once per reason:
slower, never wrong.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("MEGATRON_GLM_KERNELS", "auto")
_as_if: str | None = None  # the device type kernels choose for, when not the tensors' own


@contextlib.contextmanager
def choosing_as_if_on(device_type: str):
    """Kernels choose as for tensors on ``device_type``: a dry run's fake CPU tensors stand for CUDA ones
    (autograd cannot run fake CUDA tensors on a CPU build of torch)."""
    global _as_if
    before, _as_if = _as_if, device_type
    try:
        yield
    finally:
        _as_if = before


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _warn_once(kernel: str, reason: str) -> None:
    warnings.warn(
        f"{kernel}: {reason}; using the torch reference instead", RuntimeWarning, stacklevel=3
    )


def use_triton(kernel: str, device: torch.device, unsupported: str | None = None) -> bool:
    """True when ``kernel`` should run its Triton version for tensors on ``device``.

    ``unsupported`` names why this particular call cannot (None when it can).
    """
    kind = _as_if or device.type
    if _backend == "torch" or (_backend == "auto" and kind != "cuda"):
        return False
    if not triton_importable():
        if _backend == "triton":
            raise RuntimeError("--kernels triton: Triton is not installed (pip install triton)")
        _warn_once(kernel, "Triton is not installed")
        return False
    if kind != "cuda" and not interpreting():
        raise RuntimeError(
            f"--kernels triton on {device.type} tensors: Triton kernels need a CUDA device; "
            "set TRITON_INTERPRET=1 to run them (slowly) on the CPU, or use --kernels auto"
        )
    if unsupported:
        _warn_once(kernel, unsupported)
        return False
    return True
