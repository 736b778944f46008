"""Functional U-CE: input validation, backend choice and the reduction, shared by every backend.

Backends compute the per-pixel loss; the reduction happens here, in torch, so it is the same for all
of them (deterministic, no atomics, no host synchronisation beyond the GPU kernels' label check).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from uce_fast import ops, reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "predictive_uncertainty",
    "resolve_backend",
    "uce_loss",
]

#: Every backend name the package knows; ``available_backends()`` says which run here.
BACKENDS = ("torch", "cpu", "cuda", "triton")
_REDUCTIONS = ("mean", "sum", "none")
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (*_NATIVE_DTYPES, torch.float64)
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
    bad = [d for d in dtypes if d not in _NATIVE_DTYPES]
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


def _kernel_ops(name: str):
    """The op module of a kernel backend: ``uce_fast.ops`` (compiled), or the Triton ops, which
    are imported on first use so that Triton is only loaded when it runs."""
    if name == "triton":
        from uce_fast.triton import ops as triton_ops

        return triton_ops
    return ops


def _check_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...], what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got dtype {value.dtype}")
    return value


def _check_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but input is on {device}; expected the same")


def _check_samples(samples: Tensor, correction: int) -> None:
    _check_tensor("samples", samples, _FLOAT_DTYPES, "a floating tensor (β, B, C, *spatial)")
    if samples.dim() < 3:
        raise ValueError(
            f"samples must have shape (β, B, C, *spatial), got {tuple(samples.shape)}"
        )
    beta = samples.shape[0]
    if beta < 2:
        raise ValueError(f"samples must hold β >= 2 Monte-Carlo samples along dim 0, got β={beta}")
    if isinstance(correction, bool) or not isinstance(correction, int):
        raise TypeError(f"correction must be an int, got {type(correction).__name__}")
    if not 0 <= correction < beta:
        raise ValueError(f"correction must be in [0, β) = [0, {beta}), got {correction}")


def _check_labels(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Label range check for the "torch" backend (the compiled kernels check while they run)."""
    if torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target contains label {value}, outside [0, {num_classes}) "
            f"and not ignore_index ({ignore_index})"
        )


def _reduce(
    per_pixel: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    avg_non_ignore: bool,
) -> Tensor:
    if reduction == "none":
        return per_pixel
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    if not avg_non_ignore:
        return total / target.numel()
    valid = target != ignore_index
    if weight is None:
        return total / valid.sum()
    class_weight = weight.detach().to(per_pixel.dtype)[torch.where(valid, target, 0)]
    return total / torch.where(valid, class_weight, 0).sum()


def uce_loss(
    input: Tensor,
    target: Tensor,
    samples: Tensor | None = None,
    *,
    sigma: Tensor | None = None,
    alpha: float = 10.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    avg_non_ignore: bool = True,
    correction: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Uncertainty-aware cross-entropy (U-CE).

    ``loss_n = (1 + sigma_n) ** alpha * CE(input[:, :, n], target_n)``, where ``sigma_n`` is the
    standard deviation over the Monte-Carlo samples of the softmax probability of the class whose
    mean probability is highest. Gradient flows to ``input`` only.

    Args:
        input: (B, C, *spatial) logits with gradient; float32, float16 or bfloat16 (float64 on the
            "torch" backend). Any number of spatial dims, none included.
        target: (B, *spatial) int64 class indices in [0, C), or ``ignore_index``.
        samples: (β, B, C, *spatial) logits of β >= 2 stochastic (MC-dropout) forward passes, any
            float dtype; treated as constants. Give exactly one of ``samples`` and ``sigma``.
        sigma: (B, *spatial) precomputed predictive uncertainty (see ``predictive_uncertainty``).
        alpha: exponent of the weight ``(1 + sigma) ** alpha``; default 10 (the paper's best).
            With ``alpha=0`` the loss equals ``F.cross_entropy`` with the same options.
        ignore_index: target value that contributes neither loss nor gradient; default -100.
        reduction: "mean" (default), "sum" or "none" (per-pixel map (B, *spatial), 0 where
            ignored).
        weight: (C,) class weights as in ``F.cross_entropy``; default None.
        label_smoothing: ε in [0, 1] as in ``F.cross_entropy``; default 0.
        avg_non_ignore: with "mean", divide by the number of non-ignored pixels (by the sum of
            their class weights when ``weight`` is given, as torch does) — the default, as the
            official code; False divides by all B·∏spatial pixels (the paper's Algorithm 1).
        correction: standard-deviation divisor offset over the β samples; 1 (unbiased, default).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton"; see ``available_backends``.

    Returns:
        float32 loss (float64 for float64 input on the "torch" backend): a scalar, or the
        per-pixel map (B, *spatial) with ``reduction="none"``.
    """
    input = _check_tensor("input", input, _FLOAT_DTYPES, "float32, float16 or bfloat16")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(input.shape)}")
    device = input.device
    batch, num_classes, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    target = _check_tensor("target", target, (torch.int64,), "int64 class indices")
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target must have shape (B, *spatial) = {(batch, *spatial)} to match input "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    _check_device("target", target, device)
    if (samples is None) == (sigma is None):
        raise ValueError("give exactly one of samples (β, B, C, *spatial) and sigma (B, *spatial)")
    if samples is not None:
        _check_samples(samples, correction)
        if tuple(samples.shape[1:]) != tuple(input.shape):
            raise ValueError(
                f"samples must have shape (β, *input.shape) = "
                f"(β, {', '.join(map(str, input.shape))}), got {tuple(samples.shape)}"
            )
        _check_device("samples", samples, device)
        samples = samples.detach()
    else:
        sigma = _check_tensor("sigma", sigma, _FLOAT_DTYPES, "a floating tensor (B, *spatial)")
        if tuple(sigma.shape) != tuple(target.shape):
            raise ValueError(
                f"sigma must have shape (B, *spatial) = {tuple(target.shape)}, "
                f"got {tuple(sigma.shape)}"
            )
        _check_device("sigma", sigma, device)
        sigma = sigma.detach()
    if weight is not None:
        weight = _check_tensor("weight", weight, _FLOAT_DTYPES, "a floating tensor (C,)")
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight must have shape (C,) = ({num_classes},), got {tuple(weight.shape)}"
            )
        _check_device("weight", weight, device)
        weight = weight.detach()
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    dtypes = tuple(t.dtype for t in (input, samples, sigma) if t is not None)
    name = resolve_backend(backend, device, dtypes)
    if name == "torch":
        _check_labels(target, num_classes, ignore_index)
        if samples is not None:
            sigma = reference.mc_uncertainty(samples, correction)[0]
        per_pixel = reference.weighted_cross_entropy(
            input, target, reference.uncertainty_weight(sigma, alpha),
            weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        )
    else:
        pixels = math.prod(spatial)
        per_pixel = _kernel_ops(name).uce_forward(
            input.contiguous().view(batch, num_classes, pixels),
            target.contiguous().view(batch, pixels),
            None if samples is None
            else samples.contiguous().view(samples.shape[0], batch, num_classes, pixels),
            None if sigma is None else sigma.float().contiguous().view(batch, pixels),
            None if weight is None else weight.float().contiguous(),
            float(alpha), ignore_index, float(label_smoothing), correction,
        ).view(batch, *spatial)
    return _reduce(per_pixel, target, weight, ignore_index, reduction, avg_non_ignore)


def predictive_uncertainty(
    samples: Tensor,
    correction: int = 1,
    backend: str = "auto",
    *,
    return_prediction: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """U-CE's predictive uncertainty of a Monte-Carlo stack.

    Args:
        samples: (β, B, C, *spatial) logits of β >= 2 stochastic forward passes; float32, float16
            or bfloat16 (float64 on the "torch" backend).
        correction: standard-deviation divisor offset; 1 (unbiased, default).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton".
        return_prediction: also return the predicted class.

    Returns:
        sigma (B, *spatial) float32: the standard deviation over samples of the softmax
        probability of the class with the highest mean probability (first maximum on ties); with
        ``return_prediction``, ``(sigma, pred)`` where ``pred`` (B, *spatial) is int64.
    """
    _check_samples(samples, correction)
    samples = samples.detach()
    name = resolve_backend(backend, samples.device, (samples.dtype,))
    if name == "torch":
        sigma, pred = reference.mc_uncertainty(samples, correction)
    else:
        beta, batch, num_classes = samples.shape[:3]
        spatial = tuple(samples.shape[3:])
        flat = samples.contiguous().view(beta, batch, num_classes, math.prod(spatial))
        sigma, pred = _kernel_ops(name).mc_uncertainty(flat, correction)
        sigma, pred = sigma.view(batch, *spatial), pred.view(batch, *spatial)
    return (sigma, pred) if return_prediction else sigma
