"""``torch.library`` ops for the Triton kernels: launchers, fake kernels and autograd.

Same contract as the compiled ops documented in ``uce_fast/ops.py``, under their own names:

``uce_fast::triton_uce_forward(input (B, C, N), target (B, N) int64, samples (β, B, C, N) | None,
sigma (B, N) float32 | None, weight (C,) float32 | None, alpha, ignore_index, label_smoothing,
correction) -> (loss (B, N), norm (2, B, N), pixel_weight (B, N))``, float32;

``uce_fast::triton_uce_backward(grad_loss (B, N) float32, input, target, norm, pixel_weight,
weight, ignore_index, label_smoothing) -> grad_input`` (B, C, N) in the dtype of ``input``;

``uce_fast::triton_mc_accumulate_(mean!, m2!, entropy!, samples (S, B, C, in_h·in_w), count, in_h,
in_w, out_h, out_w, align_corners) -> ()`` folds samples, bilinearly upsampled on the fly, into a
streaming Monte-Carlo state in place;

``uce_fast::triton_mc_reduce(samples?, mean?, m2?, entropy?, count, in_h, in_w, out_h, out_w,
align_corners, correction, want_probs, want_entropy) -> (sigma, pred, entropy, mutual_info,
mean_probs)`` the uncertainty maps of a state and/or samples, without writing the state (the state,
the upsampling and the outputs are specified in ``uce_fast/ops.py``).

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
from uce_fast.triton import kernels, mc_kernels

__all__ = ["INTERPRET", "mc_accumulate_", "mc_reduce", "uce_forward"]

#: Whether the kernels were created for Triton's interpreter (CPU tensors) rather than compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_NUM_WARPS = 4

# Register budget per (BLOCK_C, BLOCK_N) tile, at 4 warps (128 threads). The Monte-Carlo loop keeps
# ~5 such tiles live (sample/exp/p, mean, M2, their difference, offsets): 2048 elements is 16
# values per thread each. The CE-only forward and the backward keep ~3 (logits, p or grad,
# offsets): 4096 elements, 32 values per thread each. Either way a program reads 8-16 KB per step
# over the classes, enough bytes in flight at a few programs per SM. Measured over every variant
# of scripts/triton_compile_check.py --full (ptxas of Triton 3.6 and 3.9, sm_80 and sm_90): the
# Monte-Carlo forward takes 22-168 registers (median ~100), the streaming statistics without
# upsampling 40-234 (median ~125), the CE-only forward 20-206 and the backward 21-208 (medians
# ~95 and ~120); where ptxas spills at all it is 4-12 bytes, outside the loops.
_MC_TILE = 2048
_CE_TILE = 4096
# Largest class count kept whole in registers (one read of the stack). Above it, class chunks:
# exact, but the stack is read twice.
_SMALL_C_MAX = 128
# Class chunk of the large-C path: 32 classes x 64 pixels (256-byte fp32 rows per class); the
# small chunk tiles leave registers for the (BETA_PAD, BLOCK_N) per-sample lse tile.
_CHUNK_C = 32
# Samples per launch of the large-C accumulate kernel: each sample's max, sum of exponentials and
# entropy term are (S_PAD, BLOCK_N) register tiles, so S_PAD is bounded.
_MC_GROUP = 32
# Tile of the large-C accumulate (whatever the samples): three (S_PAD, BLOCK_N) per-sample tiles
# (max, sum of exponentials, entropy term) are live besides the state chunk, and when upsampling
# four tap offsets and weights per pixel and four gathered values per element. ptxas spills at
# 2048 elements per tile there. At 1024 (32 classes x 32 pixels) with upsampling it takes 128-254
# registers: a median of 232 with Triton 3.6's ptxas, which does not spill on sm_90; 168 with
# 3.9's, which spills 4-36 bytes in about a third of the variants. Without upsampling, 56-159
# registers and 8-12 byte spills in a few variants, some inside the loops (allowed on this
# class-chunked path; the compile check reports them).
_MC_STREAM_TILE = 1024
# Tile of the streaming-statistics kernels with all classes in registers when they upsample on the
# fly: per element four gathered values and their bilinear combination, per pixel four tap
# offsets and four weights, besides the state. At 1024 elements these took 64-255 registers
# (median 150-185) and ptxas spilled in 31 of 1084 variants (up to 16 bytes, at the 128-register
# mark on sm_90); at 512, 40-195 (median 80-96), with 23 spills of 4-8 bytes outside the loops,
# none on Triton 3.6 / sm_90. The gathered rows are not contiguous, so shorter rows cost no
# coalescing, and half the registers allow twice the programs per SM.
_MC_INTERP_TILE = 512
_INT32_MAX = 2**31 - 1


def _tile_config(C: int, beta: int, tile: int,
                 chunk_c: int | None = None) -> tuple[bool, int, int, int]:
    """(chunked, BLOCK_C, BLOCK_N, BETA_PAD) for the forward kernels, ``tile`` elements per
    (BLOCK_C, BLOCK_N) tile; ``chunk_c`` forces the class-chunked path with that chunk."""
    beta_pad = triton.next_power_of_2(beta)
    if chunk_c is None and C <= _SMALL_C_MAX:
        block_c = triton.next_power_of_2(C)
        # Long rows for small C: at C = 2, 1024 pixels per program keep enough bytes in flight.
        # BETA_PAD is unused without class chunks: a constant, so that β does not multiply the
        # compiled variants (each power of two would be a JIT compile of the same code).
        return False, block_c, max(16, min(1024, tile // block_c)), 1
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
                  device: torch.device, planes: int = 1) -> None:
    """``t`` is a contiguous (batch, pixels) tensor of ``dtype``, (planes, batch, pixels) when
    ``planes`` > 1."""
    _check_same_device(t, name, device)
    if t.dtype != dtype:
        raise RuntimeError(f"uce_fast: {name} must be {dtype}, got {t.dtype}")
    shape = (batch, pixels) if planes == 1 else (planes, batch, pixels)
    if tuple(t.shape) != shape:
        raise RuntimeError(f"uce_fast: {name} must have shape {shape}, got {tuple(t.shape)}")
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
    norm = torch.empty((2, batch, pixels), device=input.device, dtype=torch.float32)
    pixel_weight = torch.empty_like(loss)
    if batch * pixels == 0:
        return loss, norm, pixel_weight
    flag = torch.zeros(1, device=input.device, dtype=torch.int32)
    chunked, block_c, block_n, beta_pad = _tile_config(
        C, beta, _MC_TILE if samples is not None else _CE_TILE, chunk_c)
    with _device_guard(input):
        kernels.uce_forward_kernel[_grid(batch, pixels, block_n)](
            input, target, loss if samples is None else samples,
            loss if sigma is None else sigma, loss if weight is None else weight,
            loss, norm[0], norm[1], pixel_weight, flag,
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
    return loss, norm, pixel_weight


def _backward(grad_loss: Tensor, input: Tensor, target: Tensor, norm: Tensor,
              pixel_weight: Tensor, weight: Tensor | None, ignore_index: int,
              label_smoothing: float, *, wide: bool = False) -> Tensor:
    _check_logits(input, "input", 3, "(B, C, N)")
    batch, C, pixels = input.shape
    # May arrive expanded (zero strides) from a mean/sum reduction.
    grad_loss = grad_loss.contiguous()
    for t, name, dtype in ((grad_loss, "grad_loss", torch.float32),
                           (target, "target", torch.int64),
                           (pixel_weight, "pixel_weight", torch.float32)):
        _check_pixels(t, name, batch, pixels, dtype, input.device)
    _check_pixels(norm, "norm", batch, pixels, torch.float32, input.device, planes=2)
    _check_weight(weight, C, input.device)
    one_minus_eps, eps_over_c = _smoothing_terms(label_smoothing, C)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    if batch * pixels == 0 or C == 0:
        return grad_input
    block_c, block_n = _bwd_config(C)
    with _device_guard(input):
        kernels.uce_backward_kernel[_grid(batch, pixels, block_n)](
            grad_loss, input, target, norm[0], norm[1], pixel_weight,
            pixel_weight if weight is None else weight,
            grad_input, C, pixels, ignore_index, one_minus_eps, eps_over_c,
            HAS_WEIGHT=weight is not None, SMOOTH=eps_over_c != 0.0, BLOCK_C=block_c,
            BLOCK_N=block_n, WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    return grad_input


def _f32_div(a: int, b: int) -> float:
    """float32(a) / float32(b) rounded to float32 (exactly representable in a Python float)."""
    return float(torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32))


def _source_index(in_size: int, out_size: int, align_corners: bool,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """[i0; i1] (2, out) int32 and [l0; l1] (2, out) float32 of the bilinear source index along
    one dim (``source_index`` in uce_fast/ops.py): float32, one torch op per step, so that each
    product and sum is rounded on its own."""
    o = torch.arange(out_size, device=device, dtype=torch.float32)
    if in_size == out_size:
        i0 = torch.arange(out_size, device=device, dtype=torch.int32)
        i1 = i0
        l1 = torch.zeros_like(o)
    else:
        if align_corners:
            scale = _f32_div(in_size - 1, out_size - 1) if out_size > 1 else 0.0
            src = o * scale
        else:
            src = ((o + 0.5) * _f32_div(in_size, out_size) - 0.5).clamp_min(0.0)
        i0f = src.floor().clamp_max(in_size - 1)
        l1 = (src - i0f).clamp(0.0, 1.0)
        i0 = i0f.to(torch.int32)
        i1 = i0 + (i0 < in_size - 1).to(torch.int32)
    return torch.stack((i0, i1)), torch.stack((1.0 - l1, l1))


def _check_state(t: Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> None:
    _check_device(t, name)
    _check_same_device(t, name, device)
    if t.dtype != torch.float32:
        raise RuntimeError(f"uce_fast: {name} must be float32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise RuntimeError(f"uce_fast: {name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise RuntimeError(f"uce_fast: {name} must be contiguous")


def _check_mc_samples(samples: Tensor, in_h: int, in_w: int) -> None:
    _check_logits(samples, "samples", 4, "(S, B, C, in_h * in_w)")
    if samples.shape[2] < 1:
        raise RuntimeError("uce_fast: samples must have at least one class")
    if samples.shape[3] != in_h * in_w:
        raise RuntimeError(
            f"uce_fast: samples must have in_h * in_w = {in_h} * {in_w} pixels, got "
            f"{samples.shape[3]}")


def _check_mc_sizes(count: int, in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether the samples are upsampled (sizes differ); raises on sizes the kernels cannot take."""
    if min(in_h, in_w, out_h, out_w) < 0:
        raise RuntimeError(
            f"uce_fast: sizes must be >= 0, got in ({in_h}, {in_w}), out ({out_h}, {out_w})")
    if max(in_h * in_w, out_h * out_w) > _INT32_MAX:
        raise RuntimeError("uce_fast: more than 2^31 - 1 pixels per class plane")
    if count < 0:
        raise ValueError(f"uce_fast: count must be >= 0, got {count}")
    interp = (in_h, in_w) != (out_h, out_w)
    if interp and out_h * out_w > 0 and in_h * in_w == 0:
        raise RuntimeError(
            f"uce_fast: cannot upsample from ({in_h}, {in_w}) to ({out_h}, {out_w})")
    return interp


class _Sources:
    """Launch arguments describing where a tile's sample values come from."""

    def __init__(self, samples: Tensor | None, in_h: int, in_w: int, out_h: int, out_w: int,
                 align_corners: bool, interp: bool, dummy: Tensor):
        pixels = out_h * out_w
        self.interp = interp and samples is not None
        self.round = samples is not None and samples.dtype != torch.float32
        self.bf16_bits = INTERPRET and self.round and samples.dtype == torch.bfloat16
        self.plane = in_h * in_w if self.interp else pixels
        if self.interp:
            self.ty, self.wy = _source_index(in_h, out_h, align_corners, samples.device)
            self.tx, self.wx = _source_index(in_w, out_w, align_corners, samples.device)
        else:
            self.ty = self.wy = self.tx = self.wx = dummy
        self.in_w = in_w

    def tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.ty, self.wy, self.tx, self.wx

    def options(self) -> dict:
        """The kernels' constexprs for the sample source, and the compile option that keeps
        the bilinear formula's products and sums separately rounded."""
        return dict(INTERP=self.interp, ROUND=self.round, BF16_BITS=self.bf16_bits,
                    enable_fp_fusion=not self.interp)


def _mc_small_config(C: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) of the streaming-statistics kernels with all classes in registers."""
    block_c = triton.next_power_of_2(C)
    if interp:
        # The gathered rows are not contiguous anyway: at C near 128, 8 pixels per program
        # rather than spills.
        return block_c, max(8, min(1024, _MC_INTERP_TILE // block_c))
    return block_c, max(16, min(1024, _MC_TILE // block_c))


def _accumulate_chunked(src: tuple[Tensor, Tensor, Tensor], dst: tuple[Tensor, Tensor, Tensor],
                        samples: Tensor, count: int, out_h: int, out_w: int, sources: _Sources,
                        chunk_c: int | None, wide: bool) -> None:
    """Large C: folds ``samples`` into the state ``src`` (ignored when count == 0), writing the
    result to ``dst`` (may be ``src``), in launches of at most ``_MC_GROUP`` samples."""
    _, batch, C, _ = samples.shape
    pixels = out_h * out_w
    _, block_c, block_n, s_pad = _tile_config(C, min(samples.shape[0], _MC_GROUP),
                                              _MC_STREAM_TILE, chunk_c or _CHUNK_C)
    is_wide = _wide(C, max(pixels, sources.plane), block_n, wide)
    for s0 in range(0, samples.shape[0], _MC_GROUP):
        group = samples[s0:s0 + _MC_GROUP]
        k = count + s0
        state = src if s0 == 0 else dst
        args = (group, *state, *dst, *sources.tables(), C, pixels, sources.in_w, out_h, out_w,
                sources.plane, batch * C * sources.plane, group.shape[0], k)
        mc_kernels.mc_accumulate_chunked_kernel[_grid(batch, pixels, block_n)](
            *args, HAS_STATE=k > 0, BLOCK_C=block_c, BLOCK_N=block_n, S_PAD=s_pad,
            WIDE=is_wide, num_warps=_NUM_WARPS, **sources.options(),
        )


def _mc_accumulate(mean: Tensor, m2: Tensor, entropy: Tensor, samples: Tensor, count: int,
                   in_h: int, in_w: int, out_h: int, out_w: int, align_corners: bool, *,
                   chunk_c: int | None = None, wide: bool = False) -> None:
    interp = _check_mc_sizes(count, in_h, in_w, out_h, out_w)
    _check_mc_samples(samples, in_h, in_w)
    beta, batch, C, _ = samples.shape
    pixels = out_h * out_w
    _check_state(mean, "mean", (batch, C, pixels), samples.device)
    _check_state(m2, "m2", (batch, C, pixels), samples.device)
    _check_state(entropy, "entropy", (batch, pixels), samples.device)
    if count + beta > _INT32_MAX:
        raise ValueError("uce_fast: too many Monte-Carlo samples")
    if batch * pixels == 0 or beta == 0:
        return
    sources = _Sources(samples, in_h, in_w, out_h, out_w, align_corners, interp, entropy)
    with _device_guard(samples):
        if chunk_c is not None or C > _SMALL_C_MAX:
            state = (mean, m2, entropy)
            _accumulate_chunked(state, state, samples, count, out_h, out_w, sources, chunk_c,
                                wide)
            return
        block_c, block_n = _mc_small_config(C, sources.interp)
        mc_kernels.mc_accumulate_kernel[_grid(batch, pixels, block_n)](
            samples, mean, m2, entropy, *sources.tables(), C, pixels, in_w, out_h, out_w,
            sources.plane, batch * C * sources.plane, beta, count,
            HAS_STATE=count > 0, BLOCK_C=block_c, BLOCK_N=block_n,
            WIDE=_wide(C, max(pixels, sources.plane), block_n, wide), num_warps=_NUM_WARPS,
            **sources.options(),
        )


def _mc_reduce(samples: Tensor | None, mean: Tensor | None, m2: Tensor | None,
               entropy: Tensor | None, count: int, in_h: int, in_w: int, out_h: int, out_w: int,
               align_corners: bool, correction: int, want_probs: bool, want_entropy: bool, *,
               chunk_c: int | None = None,
               wide: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    interp = _check_mc_sizes(count, in_h, in_w, out_h, out_w)
    pixels = out_h * out_w
    if samples is not None:
        _check_mc_samples(samples, in_h, in_w)
        _, batch, C, _ = samples.shape
        device = samples.device
    elif mean is not None:
        _check_device(mean, "mean")
        if mean.dim() != 3:
            raise RuntimeError(
                f"uce_fast: mean must have shape (B, C, N), got {tuple(mean.shape)}")
        batch, C, _ = mean.shape
        device = mean.device
    else:
        raise RuntimeError("uce_fast: mc_reduce needs samples or a state (mean, m2, entropy)")
    if count > 0 and (mean is None or m2 is None or entropy is None):
        raise RuntimeError("uce_fast: count > 0 needs the state mean, m2 and entropy")
    for t, name, shape in ((mean, "mean", (batch, C, pixels)), (m2, "m2", (batch, C, pixels)),
                           (entropy, "entropy", (batch, pixels))):
        if t is not None:
            _check_state(t, name, shape, device)
    beta = 0 if samples is None else samples.shape[0]
    n = count + beta
    if not 0 <= correction < n:
        raise ValueError(
            f"uce_fast: correction must be in [0, n) = [0, {n}) for n = count + S samples, got "
            f"{correction}")
    if n > _INT32_MAX:
        raise ValueError("uce_fast: too many Monte-Carlo samples")

    f32 = dict(device=device, dtype=torch.float32)
    sigma = torch.empty((batch, pixels), **f32)
    pred = torch.empty((batch, pixels), device=device, dtype=torch.int64)
    maps = (batch, pixels) if want_entropy else (0,)
    h_out = torch.empty(maps, **f32)
    mutual_info = torch.empty(maps, **f32)
    probs = torch.empty((batch, C, pixels) if want_probs else (0,), **f32)
    if batch * pixels == 0:
        return sigma, pred, h_out, mutual_info, probs
    has_state = count > 0
    has_samples = beta > 0
    inv_denom = 1.0 / (n - correction)
    sources = _Sources(samples if has_samples else None, in_h, in_w, out_h, out_w, align_corners,
                       interp, sigma)
    with _device_guard(sigma):
        if chunk_c is None and C <= _SMALL_C_MAX:
            block_c, block_n = _mc_small_config(C, sources.interp)
            plane = sources.plane
            mc_kernels.mc_reduce_kernel[_grid(batch, pixels, block_n)](
                samples if has_samples else sigma,
                mean if has_state else sigma, m2 if has_state else sigma,
                entropy if has_state else sigma, *sources.tables(),
                sigma, pred, h_out if want_entropy else sigma,
                mutual_info if want_entropy else sigma, probs if want_probs else sigma,
                C, pixels, in_w, out_h, out_w, plane, batch * C * plane, beta, count, inv_denom,
                HAS_STATE=has_state, HAS_SAMPLES=has_samples, WANT_PROBS=want_probs,
                WANT_ENTROPY=want_entropy, BLOCK_C=block_c, BLOCK_N=block_n,
                WIDE=_wide(C, max(pixels, plane), block_n, wide), num_warps=_NUM_WARPS,
                **sources.options(),
            )
            return sigma, pred, h_out, mutual_info, probs
        # Large C: the samples (if any) are folded into a scratch state (the caller's state is
        # read by that launch, never written), then the outputs are reduced from it class chunk
        # by class chunk. Exact; the price is writing and re-reading the (B, C, N) mean and M2.
        if has_samples:
            scratch = (torch.empty((batch, C, pixels), **f32),
                       torch.empty((batch, C, pixels), **f32), torch.empty((batch, pixels), **f32))
            src = (mean, m2, entropy) if has_state else scratch
            _accumulate_chunked(src, scratch, samples, count, out_h, out_w, sources, chunk_c,
                                wide)
            state = scratch
        else:
            state = (mean, m2, entropy)
        _, block_c, block_n, _ = _tile_config(C, 1, _MC_TILE, chunk_c or _CHUNK_C)
        mc_kernels.mc_finalize_kernel[_grid(batch, pixels, block_n)](
            *state, sigma, pred, h_out if want_entropy else sigma,
            mutual_info if want_entropy else sigma, C, pixels, inv_denom,
            WANT_ENTROPY=want_entropy, BLOCK_C=block_c, BLOCK_N=block_n,
            WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    if want_probs:
        # A fresh tensor either way: the scratch mean, or a copy of the caller's.
        probs = state[0] if has_samples else state[0].clone()
    return sigma, pred, h_out, mutual_info, probs


# ------------------------------------------------------------------------------- registration

_FORWARD_SCHEMA = (
    "(Tensor input, Tensor target, Tensor? samples, Tensor? sigma, Tensor? weight, float alpha, "
    "int ignore_index, float label_smoothing, int correction) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor input, Tensor target, Tensor norm, Tensor pixel_weight, "
    "Tensor? weight, int ignore_index, float label_smoothing) -> Tensor"
)
_ACCUMULATE_SCHEMA = (
    "(Tensor(a!) mean, Tensor(b!) m2, Tensor(c!) entropy, Tensor samples, int count, int in_h, "
    "int in_w, int out_h, int out_w, bool align_corners) -> ()"
)
_REDUCE_SCHEMA = (
    "(Tensor? samples, Tensor? mean, Tensor? m2, Tensor? entropy, int count, int in_h, int in_w, "
    "int out_h, int out_w, bool align_corners, int correction, bool want_probs, "
    "bool want_entropy) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

triton_uce_forward = torch.library.custom_op(
    "uce_fast::triton_uce_forward", _forward, mutates_args=(), schema=_FORWARD_SCHEMA)
triton_uce_backward = torch.library.custom_op(
    "uce_fast::triton_uce_backward", _backward, mutates_args=(), schema=_BACKWARD_SCHEMA)
triton_mc_accumulate_ = torch.library.custom_op(
    "uce_fast::triton_mc_accumulate_", _mc_accumulate, mutates_args=("mean", "m2", "entropy"),
    schema=_ACCUMULATE_SCHEMA)
triton_mc_reduce = torch.library.custom_op(
    "uce_fast::triton_mc_reduce", _mc_reduce, mutates_args=(), schema=_REDUCE_SCHEMA)


triton_uce_forward.register_fake(_opglue.uce_forward_fake)
triton_uce_backward.register_fake(_opglue.uce_backward_fake)
triton_mc_accumulate_.register_fake(_opglue.mc_accumulate_fake)
triton_mc_reduce.register_fake(_opglue.mc_reduce_fake)
triton_uce_forward.register_autograd(_opglue.uce_backward_formula(triton_uce_backward),
                                     setup_context=_opglue.setup_context)


def _mark_constant(ctx, inputs, output):
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_derivative(ctx, *grads):
    raise RuntimeError("uce_fast: this op has no derivative")  # unreachable: outputs are constant


# The backward op (no double backward through the loss) and the uncertainty statistics (constants
# of the loss) are not differentiable: their outputs never require grad, so differentiating them
# fails loudly instead of silently.
for _op in (triton_uce_backward, triton_mc_reduce):
    _op.register_autograd(_no_derivative, setup_context=_mark_constant)


def uce_forward(input: Tensor, target: Tensor, samples: Tensor | None, sigma: Tensor | None,
                weight: Tensor | None, alpha: float, ignore_index: int, label_smoothing: float,
                correction: int) -> Tensor:
    """Per-pixel U-CE loss (B, N) float32 from the Triton op; differentiable w.r.t. ``input``."""
    return torch.ops.uce_fast.triton_uce_forward(
        input, target, samples, sigma, weight, alpha, ignore_index, label_smoothing, correction
    )[0]


def mc_accumulate_(mean: Tensor, m2: Tensor, entropy: Tensor, samples: Tensor, count: int,
                   in_size: tuple[int, int], out_size: tuple[int, int],
                   align_corners: bool) -> None:
    """Folds ``samples`` (S, B, C, in_h·in_w) into the state in place (Triton op)."""
    torch.ops.uce_fast.triton_mc_accumulate_(mean, m2, entropy, samples, count, *in_size,
                                             *out_size, align_corners)


def mc_reduce(samples: Tensor | None, mean: Tensor | None, m2: Tensor | None,
              entropy: Tensor | None, count: int, in_size: tuple[int, int],
              out_size: tuple[int, int], align_corners: bool, correction: int,
              want_probs: bool, want_entropy: bool) -> tuple[Tensor, ...]:
    """``(sigma, pred, entropy, mutual_info, mean_probs)`` from the Triton op."""
    return torch.ops.uce_fast.triton_mc_reduce(samples, mean, m2, entropy, count, *in_size,
                                               *out_size, align_corners, correction, want_probs,
                                               want_entropy)
