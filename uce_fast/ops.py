"""``torch.library`` registration of the compiled ``uce_fast`` ops.

The schemas and kernels live in the compiled extension ``uce_fast._C`` (``csrc/``): the CPU kernels
always, the CUDA kernels when the extension was built against a CUDA build of torch. This module
loads it if it is there and adds what the dispatcher needs from Python: fake (meta) kernels, so that
``torch.compile(fullgraph=True)`` can trace the ops, and the autograd formula, whose backward is
itself a compiled op that reads only the saved per-pixel tensors (never the sample stack).

Op contract (all tensors contiguous; N is the product of the spatial dims, 1 when there are none):

``uce_fast::uce_forward(input (B, C, N), target (B, N) int64, samples (β, B, C, N) | None,
sigma (B, N) float32 | None, weight (C,) float32 | None, alpha, ignore_index, label_smoothing,
correction) -> (loss, lse, pixel_weight)``, each (B, N) float32: the weighted per-pixel loss
(0 where ignored), the log-sum-exp of the logits and ``(1 + sigma) ** alpha``.

``uce_fast::uce_backward(grad_loss (B, N) float32, input, target, lse, pixel_weight, weight,
ignore_index, label_smoothing) -> grad_input`` (B, C, N) in the dtype of ``input``.

``uce_fast::mc_uncertainty(samples (β, B, C, N), correction) -> (sigma (B, N) float32,
pred (B, N) int64)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uce_fast import _opglue

__all__ = ["NATIVE_IMPORT_ERROR", "mc_uncertainty", "native_devices", "uce_forward"]

NATIVE_IMPORT_ERROR: Exception | None = None
try:
    from uce_fast import _C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # the package still works with backend="torch"
    NATIVE_IMPORT_ERROR = exc


def _compiled_devices() -> tuple[str, ...]:
    if NATIVE_IMPORT_ERROR is not None:
        return ()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(
        dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if has_kernel("uce_fast::uce_forward", key)
    )


_NATIVE_DEVICES = _compiled_devices()


def native_devices() -> tuple[str, ...]:
    """Device types ("cpu", "cuda") for which the compiled ops have a kernel in this install."""
    return _NATIVE_DEVICES


def uce_forward(
    input: Tensor,
    target: Tensor,
    samples: Tensor | None,
    sigma: Tensor | None,
    weight: Tensor | None,
    alpha: float,
    ignore_index: int,
    label_smoothing: float,
    correction: int,
) -> Tensor:
    """Per-pixel U-CE loss (B, N) float32 from the compiled op; differentiable w.r.t. ``input``."""
    return torch.ops.uce_fast.uce_forward(
        input, target, samples, sigma, weight, alpha, ignore_index, label_smoothing, correction
    )[0]


def mc_uncertainty(samples: Tensor, correction: int) -> tuple[Tensor, Tensor]:
    """``(sigma, pred)``, each (B, N), from the compiled op for samples (β, B, C, N)."""
    return torch.ops.uce_fast.mc_uncertainty(samples, correction)


def _register() -> None:
    torch.library.register_fake("uce_fast::uce_forward", _opglue.uce_forward_fake)
    torch.library.register_fake("uce_fast::uce_backward", _opglue.uce_backward_fake)
    torch.library.register_fake("uce_fast::mc_uncertainty", _opglue.mc_uncertainty_fake)
    torch.library.register_autograd(
        "uce_fast::uce_forward",
        _opglue.uce_backward_formula(torch.ops.uce_fast.uce_backward),
        setup_context=_opglue.setup_context,
    )


if NATIVE_IMPORT_ERROR is None:
    _register()
