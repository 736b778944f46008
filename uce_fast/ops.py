"""``torch.library`` registration of the compiled ``uce_fast`` ops.

The schemas and kernels live in the compiled extension ``uce_fast._C`` (``csrc/``): the CPU kernels
always, the CUDA kernels when the extension was built against a CUDA build of torch. This module
loads it if it is there and adds what the dispatcher needs from Python: fake (meta) kernels, so that
``torch.compile(fullgraph=True)`` can trace the ops, and the autograd formula, whose backward is
itself a compiled op that reads only the saved per-pixel tensors (never the sample stack).

Op contract (all tensors contiguous; N is the product of the spatial dims, 1 when there are none):

``uce_fast::uce_forward(input (B, C, N), target (B, N) int64, samples (β, B, C, N) | None,
sigma (B, N) float32 | None, weight (C,) float32 | None, alpha, ignore_index, label_smoothing,
correction, check_labels, ood_index, ood_scale) -> (loss, norm, pixel_weight)``, float32: the
weighted per-pixel loss (B, N) (0 where ignored), the softmax normaliser of the logits ``norm``
(2, B, N) = ``[max_c x_c; log Σ_c exp(x_c - max)]`` (their sum is the log-sum-exp) and the pixel
weight (B, N), ``(1 + sigma) ** alpha``. Entropy maximisation: a pixel labelled ``ood_index`` (a
label outside [0, C); ``ood_index == ignore_index`` turns this off) with ``ood_scale > 0`` (finite)
has the loss ``ood_scale · (1/C) Σ_c w_c (lse - x_c)`` (w the class weights, 1 without them: the
label-smoothed CE with ε = 1) and the pixel weight ``ood_scale``; with ``ood_scale == 0`` it is an
ignored pixel. A label ``ood_index`` is never a bad one.
With ``samples``, sigma is that of ``mc_reduce`` (below) over the stack, from the same per-pixel
code, in the same kernel (on the Triton backend above 128 classes: ``mc_reduce``'s class-chunked
kernel, then the CE, 4 more bytes of sigma per pixel written and read). A label outside [0, C)
that is not ``ignore_index`` raises ``ValueError`` when ``check_labels`` (on a GPU: one host
synchronisation per call, none while a CUDA graph is being captured); without it, such a pixel is
treated as ignored (loss 0, gradient 0, never read out of bounds).

``uce_fast::uce_backward(grad_loss (B, N) float32, input, target, norm, pixel_weight, weight,
ignore_index, label_smoothing, ood_index, ood_scale) -> grad_input`` (B, C, N) in the dtype of
``input`` (at an OoD pixel the gradient of its term, with ε = 1); it never checks
labels (a pixel with an invalid one gets 0 gradient) and never synchronises. The softmax is
recomputed as ``exp((x - max) - log-sum)``: the two parts are kept apart because a float32
log-sum-exp of large logits carries their magnitude's rounding error (ulp(1e4) ≈ 1e-3) into every
probability, while ``x - max`` depends only on the logits' spread — the gradient is as precise for
logits shifted by any constant. It costs one more float per pixel written by the forward and read
by the backward (4 bytes against the stack's β·C·2–4 and the logits' 2·C·2–4 per pixel).

Streaming Monte-Carlo statistics. The state of ``count`` samples is ``mean`` and ``m2`` (B, C, N)
float32 — mean and sum of squared deviations (Welford's M2) of the softmax probabilities — and
``entropy`` (B, N) float32, the mean of the samples' entropies ``-Σ_c p log p``. ``samples`` is
(S, B, C, in_h·in_w) float32/float16/bfloat16; N = out_h·out_w. When (in_h, in_w) differs from
(out_h, out_w) each sample is resampled on the fly exactly as ``F.interpolate(mode="bilinear",
align_corners=align_corners)`` (float32 weights and arithmetic, the value rounded to the samples'
dtype; the bilinear source index below); when they are equal it is read as is (any spatial
shape, flattened, with in_h = out_h = 1).

``uce_fast::mc_accumulate_(mean!, m2!, entropy!, samples, count, in_h, in_w, out_h, out_w,
align_corners) -> ()`` folds the S samples, in order, into the state in place: for sample s,
``k = count + s + 1``, ``p = softmax_c(x)``, ``d = p - mean; mean += d / k; m2 += d * (p - mean)``,
``entropy += (H(p) - entropy) / k``. With ``count == 0`` the state's contents are ignored.

``uce_fast::mc_reduce(samples?, mean?, m2?, entropy?, count, in_h, in_w, out_h, out_w,
align_corners, correction, want_probs, want_entropy) -> (sigma, pred, entropy, mutual_info,
mean_probs)`` does the same updates on a copy of the state (zeros when ``count == 0``; samples
optional) without writing it, then with n = count + S: ``pred`` (B, N) int64 the first argmax of
``mean`` (NaN counts as the maximum), ``sigma`` (B, N) float32 ``sqrt(m2[pred] / (n -
correction))``; with ``want_entropy`` the predictive entropy ``H(mean)`` (``0·log 0 = 0``) and the
mutual information ``max(H(mean) - entropy, 0)`` (NaN propagates), each (B, N) float32, else
empty (0,) tensors; with ``want_probs`` ``mean`` itself as (B, C, N) float32, else empty (0,).

Bilinear source index along one dim (sizes ``in``/``out``, output coordinate ``o``), float32 with
each product and sum rounded separately (no fused multiply-add), as ATen's UpSample.h::

    if in == out:  i0 = i1 = o; l1 = 0
    else:
        scale = (in - 1) / (out - 1) if align_corners (0 if out == 1) else in / out
        src = scale * o if align_corners else max(scale * (o + 0.5) - 0.5, 0)
        i0 = min(floor(src), in - 1); l1 = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1)
    l0 = 1 - l1
    value = ((x[i0y, i0x] * l0x + x[i0y, i1x] * l1x) * l0y
             + (x[i1y, i0x] * l0x + x[i1y, i1x] * l1x) * l1y)
"""

from __future__ import annotations

import torch
from torch import Tensor

from uce_fast import _opglue

__all__ = [
    "NATIVE_IMPORT_ERROR",
    "mc_accumulate_",
    "mc_reduce",
    "native_devices",
    "uce_forward",
]

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
    check_labels: bool,
    ood_index: int,
    ood_scale: float,
) -> Tensor:
    """Per-pixel U-CE loss (B, N) float32 from the compiled op; differentiable w.r.t. ``input``."""
    return torch.ops.uce_fast.uce_forward(
        input, target, samples, sigma, weight, alpha, ignore_index, label_smoothing, correction,
        check_labels, ood_index, ood_scale,
    )[0]


def mc_accumulate_(mean: Tensor, m2: Tensor, entropy: Tensor, samples: Tensor, count: int,
                   in_size: tuple[int, int], out_size: tuple[int, int],
                   align_corners: bool) -> None:
    """Folds ``samples`` (S, B, C, in_h·in_w) into the state in place (compiled op)."""
    torch.ops.uce_fast.mc_accumulate_(mean, m2, entropy, samples, count, *in_size, *out_size,
                                      align_corners)


def mc_reduce(samples: Tensor | None, mean: Tensor | None, m2: Tensor | None,
              entropy: Tensor | None, count: int, in_size: tuple[int, int],
              out_size: tuple[int, int], align_corners: bool, correction: int,
              want_probs: bool, want_entropy: bool) -> tuple[Tensor, ...]:
    """``(sigma, pred, entropy, mutual_info, mean_probs)`` from the compiled op."""
    return torch.ops.uce_fast.mc_reduce(samples, mean, m2, entropy, count, *in_size, *out_size,
                                        align_corners, correction, want_probs, want_entropy)


def _register() -> None:
    torch.library.register_fake("uce_fast::uce_forward", _opglue.uce_forward_fake)
    torch.library.register_fake("uce_fast::uce_backward", _opglue.uce_backward_fake)
    torch.library.register_fake("uce_fast::mc_accumulate_", _opglue.mc_accumulate_fake)
    torch.library.register_fake("uce_fast::mc_reduce", _opglue.mc_reduce_fake)
    torch.library.register_autograd(
        "uce_fast::uce_forward",
        _opglue.uce_backward_formula(torch.ops.uce_fast.uce_backward),
        setup_context=_opglue.setup_context,
    )


if NATIVE_IMPORT_ERROR is None:
    _register()
