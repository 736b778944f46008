"""``torch.library`` ops for the Triton kernels: launchers, fake kernels and autograd.

Same contract as the compiled ops documented in ``uce_fast/ops.py``, under their own names:

``uce_fast::triton_uce_forward(input (B, C, N), target (B, N) int64, samples (β, B, C, N) | None,
sigma (B, N) float32 | None, weight (C,) float32 | None, alpha, ignore_index, label_smoothing,
correction) -> (loss, lse, pixel_weight)``, each (B, N) float32;

``uce_fast::triton_uce_backward(grad_loss (B, N) float32, input, target, lse, pixel_weight, weight,
ignore_index, label_smoothing) -> grad_input`` (B, C, N) in the dtype of ``input``;

``uce_fast::triton_mc_uncertainty(samples (β, B, C, N), correction) -> (sigma (B, N) float32,
pred (B, N) int64)``.

The ops are ``torch.library.custom_op``s: opaque to ``torch.compile`` (which traces them through
their fake kernels), so the forward can check its labels after the launch and raise: the kernel
raises a flag for a label outside [0, C) that is not ``ignore_index`` (and clamps the index it
gathers with), the launcher reads the flag back (one 4-byte device-to-host copy, skipped during
CUDA-graph capture) and raises ``ValueError`` naming the first such label. The kernels run on CUDA
tensors, and on CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported).
"""

import contextlib
import math
import os

import torch
import triton
from torch import Tensor

from uce_fast import _opglue
from uce_fast.triton import kernels

__all__ = ["INTERPRET", "mc_uncertainty", "uce_forward"]

#: Whether the kernels were created for Triton's interpreter (CPU tensors) rather than compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_NUM_WARPS = 4

# Register budget per (BLOCK_C, BLOCK_N) tile, at 4 warps (128 threads). The Monte-Carlo loop keeps
# ~5 such tiles live (sample/exp/p, mean, M2, their difference, offsets): 2048 elements is 16
# values per thread each, ~100 registers, no spills. The CE-only forward and the backward keep ~3
# (logits, p or grad, offsets): 4096 elements, 32 values per thread each. Either way a program
# reads 8-16 KB per step over the classes, enough bytes in flight at a few programs per SM.
_MC_TILE = 2048
_CE_TILE = 4096
# Largest class count kept whole in registers (one read of the stack). Above it, class chunks:
# exact, but the stack is read twice.
_SMALL_C_MAX = 128
# Class chunk of the large-C path: 32 classes x 64 pixels (256-byte fp32 rows per class); the
# small chunk tiles leave registers for the (BETA_PAD, BLOCK_N) per-sample lse tile.
_CHUNK_C = 32


def _tile_config(C: int, beta: int, tile: int,
                 chunk_c: int | None = None) -> tuple[bool, int, int, int]:
    """(chunked, BLOCK_C, BLOCK_N, BETA_PAD) for the forward kernels, ``tile`` elements per
    (BLOCK_C, BLOCK_N) tile; ``chunk_c`` forces the class-chunked path with that chunk."""
    beta_pad = triton.next_power_of_2(beta)
    if chunk_c is None and C <= _SMALL_C_MAX:
        block_c = triton.next_power_of_2(C)
        # Long rows for small C: at C = 2, 1024 pixels per program keep enough bytes in flight.
        return False, block_c, max(16, min(1024, tile // block_c)), beta_pad
    block_c = chunk_c or _CHUNK_C
    # The (BETA_PAD, BLOCK_N) per-sample lse tile shares the budget with the class chunk.
    block_n = max(16, min(128, tile // max(block_c, beta_pad)))
    return True, block_c, block_n, beta_pad


def _grid(batch: int, pixels: int, block_n: int) -> tuple[int]:
    return (batch * triton.cdiv(pixels, block_n),)


def _wide(C: int, pixels: int, block_n: int, force: bool) -> bool:
    """Whether the offsets inside a tile, c·N + j, need int64 (tile bases always are)."""
    return force or C * pixels + block_n >= 2**31


def _bwd_config(C: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) for the backward kernel (no state carried across class chunks)."""
    block_c = min(triton.next_power_of_2(C), 64)
    return block_c, max(64, min(1024, _CE_TILE // block_c))


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_device(t: Tensor, name: str) -> None:
    if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
        raise RuntimeError(
            f"uce_fast (Triton kernels): {name} must be a CUDA tensor (CPU tensors need "
            f"TRITON_INTERPRET=1 before Triton is imported), got device {t.device}")


def _check_logits(t: Tensor, name: str, dim: int, shape: str) -> None:
    _check_device(t, name)
    if t.dtype not in _FLOAT:
        raise RuntimeError(f"uce_fast: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dim:
        raise RuntimeError(f"uce_fast: {name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise RuntimeError(f"uce_fast: {name} must be contiguous")


def _check_same_device(t: Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise RuntimeError(f"uce_fast: {name} is on {t.device}, expected {device}")


def _check_pixels(t: Tensor, name: str, batch: int, pixels: int, dtype: torch.dtype,
                  device: torch.device) -> None:
    _check_same_device(t, name, device)
    if t.dtype != dtype:
        raise RuntimeError(f"uce_fast: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != (batch, pixels):
        raise RuntimeError(
            f"uce_fast: {name} must have shape ({batch}, {pixels}), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise RuntimeError(f"uce_fast: {name} must be contiguous")


def _check_weight(weight: Tensor | None, C: int, device: torch.device) -> None:
    if weight is None:
        return
    _check_same_device(weight, "weight", device)
    if weight.dtype != torch.float32 or tuple(weight.shape) != (C,) or not weight.is_contiguous():
        raise RuntimeError(
            f"uce_fast: weight must be a contiguous float32 tensor of shape ({C},), got "
            f"{weight.dtype} {tuple(weight.shape)}")


def _check_samples(samples: Tensor, correction: int) -> int:
    _check_logits(samples, "samples", 4, "(beta, B, C, N)")
    beta = samples.shape[0]
    if beta < 2:
        raise ValueError(f"uce_fast: need at least 2 Monte-Carlo samples, got beta = {beta}")
    if not 0 <= correction < beta:
        raise ValueError(
            f"uce_fast: correction must be in [0, beta) = [0, {beta}), got {correction}")
    if samples.shape[2] < 1:
        raise RuntimeError("uce_fast: samples must have at least one class")
    return beta


def _smoothing_terms(label_smoothing: float, C: int) -> tuple[float, float]:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"uce_fast: label_smoothing must be in [0, 1], got {label_smoothing}")
    return 1.0 - label_smoothing, label_smoothing / C


def _negative_base_sign(alpha: float) -> float:
    """Sign of (1 + sigma) ** alpha for a negative base, as powf: ±1 for integer alpha, else NaN."""
    if not float(alpha).is_integer():
        return math.nan
    return -1.0 if int(alpha) % 2 else 1.0


def _raise_bad_label(target: Tensor, C: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= C)) & (target != ignore_index)
    value = int(target[bad].flatten()[0])
    raise ValueError(
        f"target contains label {value}, outside [0, {C}) and not ignore_index ({ignore_index})")


def _forward(input: Tensor, target: Tensor, samples: Tensor | None, sigma: Tensor | None,
             weight: Tensor | None, alpha: float, ignore_index: int, label_smoothing: float,
             correction: int, *, chunk_c: int | None = None,
             wide: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    _check_logits(input, "input", 3, "(B, C, N)")
    batch, C, pixels = input.shape
    if C < 1:
        raise RuntimeError("uce_fast: input must have at least one class")
    _check_pixels(target, "target", batch, pixels, torch.int64, input.device)
    if (samples is None) == (sigma is None):
        raise RuntimeError("uce_fast: exactly one of samples and sigma must be given")
    _check_weight(weight, C, input.device)
    one_minus_eps, eps_over_c = _smoothing_terms(label_smoothing, C)
    beta, inv_denom, stride_s = 2, 1.0, 0
    if samples is not None:
        beta = _check_samples(samples, correction)
        _check_same_device(samples, "samples", input.device)
        if tuple(samples.shape[1:]) != (batch, C, pixels):
            raise RuntimeError(
                f"uce_fast: samples must have shape (beta, {batch}, {C}, {pixels}) to match "
                f"input, got {tuple(samples.shape)}")
        inv_denom = 1.0 / (beta - correction)
        stride_s = batch * C * pixels
    else:
        _check_pixels(sigma, "sigma", batch, pixels, torch.float32, input.device)

    loss = torch.empty((batch, pixels), device=input.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    pixel_weight = torch.empty_like(loss)
    if batch * pixels == 0:
        return loss, lse, pixel_weight
    flag = torch.zeros(1, device=input.device, dtype=torch.int32)
    chunked, block_c, block_n, beta_pad = _tile_config(
        C, beta, _MC_TILE if samples is not None else _CE_TILE, chunk_c)
    with _device_guard(input):
        kernels.uce_forward_kernel[_grid(batch, pixels, block_n)](
            input, target, loss if samples is None else samples,
            loss if sigma is None else sigma, loss if weight is None else weight,
            loss, lse, pixel_weight, flag,
            C, pixels, stride_s, beta, inv_denom, float(alpha), _negative_base_sign(alpha),
            ignore_index, one_minus_eps, eps_over_c,
            HAS_SAMPLES=samples is not None, HAS_WEIGHT=weight is not None,
            SMOOTH=eps_over_c != 0.0, CHUNKED=chunked, BLOCK_C=block_c, BLOCK_N=block_n,
            BETA_PAD=beta_pad, WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    # One 4-byte device-to-host read: a bad label is reported as an error, never as a wrong loss.
    # Not while a CUDA graph is being captured, where a host read is illegal (the kernel clamps
    # the labels it gathers with, so nothing is read out of bounds either way).
    capturing = input.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and int(flag.item()) != 0:
        _raise_bad_label(target, C, ignore_index)
    return loss, lse, pixel_weight


def _backward(grad_loss: Tensor, input: Tensor, target: Tensor, lse: Tensor,
              pixel_weight: Tensor, weight: Tensor | None, ignore_index: int,
              label_smoothing: float, *, wide: bool = False) -> Tensor:
    _check_logits(input, "input", 3, "(B, C, N)")
    batch, C, pixels = input.shape
    # May arrive expanded (zero strides) from a mean/sum reduction.
    grad_loss = grad_loss.contiguous()
    for t, name, dtype in ((grad_loss, "grad_loss", torch.float32),
                           (target, "target", torch.int64), (lse, "lse", torch.float32),
                           (pixel_weight, "pixel_weight", torch.float32)):
        _check_pixels(t, name, batch, pixels, dtype, input.device)
    _check_weight(weight, C, input.device)
    one_minus_eps, eps_over_c = _smoothing_terms(label_smoothing, C)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    if batch * pixels == 0 or C == 0:
        return grad_input
    block_c, block_n = _bwd_config(C)
    with _device_guard(input):
        kernels.uce_backward_kernel[_grid(batch, pixels, block_n)](
            grad_loss, input, target, lse, pixel_weight, lse if weight is None else weight,
            grad_input, C, pixels, ignore_index, one_minus_eps, eps_over_c,
            HAS_WEIGHT=weight is not None, SMOOTH=eps_over_c != 0.0, BLOCK_C=block_c,
            BLOCK_N=block_n, WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    return grad_input


def _mc_uncertainty(samples: Tensor, correction: int, *, chunk_c: int | None = None,
                    wide: bool = False) -> tuple[Tensor, Tensor]:
    beta = _check_samples(samples, correction)
    _, batch, C, pixels = samples.shape
    sigma = torch.empty((batch, pixels), device=samples.device, dtype=torch.float32)
    pred = torch.empty((batch, pixels), device=samples.device, dtype=torch.int64)
    if batch * pixels == 0:
        return sigma, pred
    chunked, block_c, block_n, beta_pad = _tile_config(C, beta, _MC_TILE, chunk_c)
    with _device_guard(samples):
        kernels.mc_uncertainty_kernel[_grid(batch, pixels, block_n)](
            samples, sigma, pred, C, pixels, batch * C * pixels, beta, 1.0 / (beta - correction),
            CHUNKED=chunked, BLOCK_C=block_c, BLOCK_N=block_n, BETA_PAD=beta_pad,
            WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    return sigma, pred


# ------------------------------------------------------------------------------- registration

_FORWARD_SCHEMA = (
    "(Tensor input, Tensor target, Tensor? samples, Tensor? sigma, Tensor? weight, float alpha, "
    "int ignore_index, float label_smoothing, int correction) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor input, Tensor target, Tensor lse, Tensor pixel_weight, "
    "Tensor? weight, int ignore_index, float label_smoothing) -> Tensor"
)
_MC_SCHEMA = "(Tensor samples, int correction) -> (Tensor, Tensor)"

triton_uce_forward = torch.library.custom_op(
    "uce_fast::triton_uce_forward", _forward, mutates_args=(), schema=_FORWARD_SCHEMA)
triton_uce_backward = torch.library.custom_op(
    "uce_fast::triton_uce_backward", _backward, mutates_args=(), schema=_BACKWARD_SCHEMA)
triton_mc_uncertainty = torch.library.custom_op(
    "uce_fast::triton_mc_uncertainty", _mc_uncertainty, mutates_args=(), schema=_MC_SCHEMA)


triton_uce_forward.register_fake(_opglue.uce_forward_fake)
triton_uce_backward.register_fake(_opglue.uce_backward_fake)
triton_mc_uncertainty.register_fake(_opglue.mc_uncertainty_fake)
triton_uce_forward.register_autograd(_opglue.uce_backward_formula(triton_uce_backward),
                                     setup_context=_opglue.setup_context)


def _mark_constant(ctx, inputs, output):
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_derivative(ctx, *grads):
    raise RuntimeError("uce_fast: this op has no derivative")  # unreachable: outputs are constant


# The backward op (no double backward through the loss) and the uncertainty statistics (constants
# of the loss) are not differentiable: their outputs never require grad, so differentiating them
# fails loudly instead of silently.
for _op in (triton_uce_backward, triton_mc_uncertainty):
    _op.register_autograd(_no_derivative, setup_context=_mark_constant)


def uce_forward(input: Tensor, target: Tensor, samples: Tensor | None, sigma: Tensor | None,
                weight: Tensor | None, alpha: float, ignore_index: int, label_smoothing: float,
                correction: int) -> Tensor:
    """Per-pixel U-CE loss (B, N) float32 from the Triton op; differentiable w.r.t. ``input``."""
    return torch.ops.uce_fast.triton_uce_forward(
        input, target, samples, sigma, weight, alpha, ignore_index, label_smoothing, correction
    )[0]


def mc_uncertainty(samples: Tensor, correction: int) -> tuple[Tensor, Tensor]:
    """``(sigma, pred)``, each (B, N), from the Triton op for samples (β, B, C, N)."""
    return torch.ops.uce_fast.triton_mc_uncertainty(samples, correction)
