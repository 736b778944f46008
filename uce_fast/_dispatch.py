"""Backend choice and argument checks shared by the functional API and the accumulator.

One place decides which backend runs (``resolve_backend``) and where its ops live
(``kernel_ops``), and one place words the errors for bad arguments.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from uce_fast import ops, reference
from uce_fast._opglue import bad_label_message

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "NATIVE_DTYPES",
    "available_backends",
    "check_correction",
    "check_device",
    "check_mc_stack",
    "check_tensor",
    "kernel_ops",
    "label_mask",
    "resolve_backend",
]

#: Every backend name the package knows; ``available_backends()`` says which run here.
BACKENDS = ("torch", "cpu", "cuda", "triton")
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*NATIVE_DTYPES, torch.float64)
# Looked up once (without importing Triton) so that torch.compile can trace the backend choice.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    """Triton's interpreter (CPU tensors) is on: TRITON_INTERPRET=1 before Triton is imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """Names of the backends usable in this install and on this machine; "torch" always."""
    names = ["torch"]
    native = ops.native_devices()
    if "cpu" in native:
        names.append("cpu")
    if "cuda" in native and torch.cuda.is_available():
        names.append("cuda")
    if _HAS_TRITON and (_triton_interpreted() or torch.cuda.is_available()):
        names.append("triton")
    return names


def _backend_problem(name: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """Why backend ``name`` cannot run on these tensors, or "" if it can."""
    if name == "torch":
        return ""
    if name == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            return (f"it runs on cuda tensors (cpu tensors with TRITON_INTERPRET=1), "
                    f"got tensors on {device}")
    elif name not in ("cpu", "cuda"):
        return f"unknown backend; expected one of {('auto', *BACKENDS)}"
    elif name not in ops.native_devices():
        reason = ops.NATIVE_IMPORT_ERROR or f"the extension was built without {name} kernels"
        return f"the compiled extension uce_fast._C is not usable ({reason})"
    elif device.type != name:
        return f"it runs on {name} tensors, got tensors on {device}"
    bad = [d for d in dtypes if d not in NATIVE_DTYPES]
    if bad:
        return f"it supports float32, float16 and bfloat16, got {bad[0]} (use backend='torch')"
    return ""


def resolve_backend(
    backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()
) -> str:
    """The backend that will run for tensors on ``device`` with floating dtypes ``dtypes``.

    ``"auto"`` takes ``$UCE_FAST_BACKEND`` when set, else the fastest backend that can run here:
    on CUDA tensors ``"triton"``, then the compiled ``"cuda"`` kernels; on CPU tensors the compiled
    ``"cpu"`` kernels; else ``"torch"``. An explicitly named backend that cannot run raises
    ``RuntimeError``; it never falls back silently.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("UCE_FAST_BACKEND", "auto") or "auto"
    if backend == "auto":
        candidates = (device.type, "torch")
        if device.type == "cuda":
            candidates = ("triton", "cuda", "torch")
        for name in candidates:
            if name in BACKENDS and not _backend_problem(name, device, dtypes):
                return name
    problem = _backend_problem(backend, device, dtypes)
    if problem:
        raise RuntimeError(f"backend={backend!r} cannot run: {problem}")
    return backend


def kernel_ops(name: str):
    """The op module of a backend: ``uce_fast.reference`` for "torch" (its ``mc_accumulate_`` and
    ``mc_reduce`` keep the op contract), ``uce_fast.ops`` (compiled), or the Triton ops, which
    are registered when the package is imported (below)."""
    if name == "torch":
        return reference
    if name == "triton":
        if _TRITON_OPS is not None:
            return _TRITON_OPS
        # Only where the interpreter was turned on after ``import uce_fast``.
        from uce_fast import triton as triton_backend

        return triton_backend.register()
    return ops


# The Triton ops are defined here, when the package is imported (outside any torch.compile
# trace), where Triton is installed and can run; this imports Triton but compiles nothing.
_TRITON_OPS = None
if _HAS_TRITON and (torch.cuda.is_available() or _triton_interpreted()):
    from uce_fast import triton as _triton_backend

    _TRITON_OPS = _triton_backend.register()


def check_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...], what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got dtype {value.dtype}")
    return value


def check_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but input is on {device}; expected the same")


def check_correction(correction: int, count: int) -> None:
    """``correction`` is an int in [0, count): the std of ``count`` samples is defined."""
    if isinstance(correction, bool) or not isinstance(correction, int):
        raise TypeError(f"correction must be an int, got {type(correction).__name__}")
    if not 0 <= correction < count:
        raise ValueError(f"correction must be in [0, β) = [0, {count}), got {correction}")


def check_mc_stack(samples: Tensor, correction: int | None) -> None:
    """``samples`` is a floating (β, B, C, *spatial) stack with β >= 2 (and a valid correction)."""
    check_tensor("samples", samples, FLOAT_DTYPES, "a floating tensor (β, B, C, *spatial)")
    if samples.dim() < 3:
        raise ValueError(
            f"samples must have shape (β, B, C, *spatial), got {tuple(samples.shape)}"
        )
    beta = samples.shape[0]
    if beta < 2:
        raise ValueError(f"samples must hold β >= 2 Monte-Carlo samples along dim 0, got β={beta}")
    if correction is not None:
        check_correction(correction, beta)


def _label_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


@torch.library.custom_op("uce_fast::checked_label_mask", mutates_args=())
def _checked_label_mask(target: Tensor, num_classes: int, ignore_index: int,
                        ood_index: int) -> Tensor:
    # An opaque op, so that torch.compile runs the check (and its host synchronisation) as it is
    # instead of tracing a data-dependent branch out of the graph.
    mask = _label_mask(target, num_classes, ignore_index)
    bad = ~mask & (target != ignore_index) & (target != ood_index)
    if target.numel() and bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(bad_label_message(value, num_classes, ignore_index, ood_index))
    return mask


@_checked_label_mask.register_fake
def _(target: Tensor, num_classes: int, ignore_index: int, ood_index: int) -> Tensor:
    return torch.empty_like(target, dtype=torch.bool)


def label_mask(target: Tensor, num_classes: int, ignore_index: int, check: bool,
               ood_index: int | None = None) -> Tensor:
    """Bool mask (shape of ``target``) of the pixels of a known class: label in
    [0, num_classes) and not ``ignore_index``. With ``check``, an invalid label (outside the range,
    neither ``ignore_index`` nor ``ood_index``) raises ``ValueError`` — also under
    ``torch.compile`` (one host synchronisation); without it, such pixels are simply not in the
    mask (treated as ignored). Pixels labelled ``ood_index`` are not in the mask either."""
    if check:
        return _checked_label_mask(target, num_classes, ignore_index,
                                   ignore_index if ood_index is None else ood_index)
    return _label_mask(target, num_classes, ignore_index)
