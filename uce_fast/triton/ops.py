"""``torch.library`` ops of the Triton kernels: launchers, fake kernels and autograd.

The ops are the compiled ops' contract (contract: ``uce_fast.ops``) under their own names:
``uce_fast::triton_uce_forward``, ``triton_uce_backward``, ``triton_mc_accumulate_`` and
``triton_mc_reduce``, with the same arguments, outputs and semantics. They are defined when this
module is imported (``uce_fast.triton.register``, called where ``uce_fast`` is imported); nothing
is compiled until a kernel is first launched.

They are ``torch.library.custom_op``s: opaque to ``torch.compile`` (which traces them through their
fake kernels), so the forward can check its labels after the launch and raise. With
``check_labels`` the kernel raises a one-word flag for a bad label and the launcher reads it back
(one 4-byte device-to-host copy, the forward's only host synchronisation) and raises
``ValueError`` naming the first such label; without it, and while a CUDA graph is being captured
(where a host read is illegal), no flag is allocated, written or read. The kernels run on CUDA
tensors, and on CPU tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported).
"""

import contextlib
import functools
import math
import os
from typing import NamedTuple

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

# Elements per (BLOCK_C, BLOCK_N) register tile, at 4 warps (128 threads). The Monte-Carlo loops
# keep ~5 such tiles live (sample/exp/p, mean, M2, their difference, offsets): 2048 elements are
# 16 values per thread each. The CE-only forward and the backward keep ~3 (logits, p or grad,
# offsets): 4096 elements, 32 values per thread each. Either way a program reads 8-16 KB per step
# over the classes, enough bytes in flight at a few programs per SM. Registers and spills of every
# variant: scripts/triton_compile_check.py.
_MC_TILE = 2048
_CE_TILE = 4096
# Resampling on the fly adds, per element, four gathered values and their bilinear combination
# and, per pixel, four tap offsets and four weights: a quarter of the tile leaves them the
# registers. The gathered rows are not contiguous, so shorter rows cost no coalescing, and fewer
# registers allow more programs per SM.
_MC_RESAMPLE_TILE = 512
# Largest class count kept whole in registers (one read of the stack). Above it, class chunks:
# exact, but the stack is read twice.
_SMALL_C_MAX = 128
# Class chunk of the class-chunked paths: 32 classes (at 64 pixels, 256-byte fp32 rows).
_CHUNK_C = 32
_INT32_MAX = 2**31 - 1


def _small_config(C: int, tile: int, min_pixels: int = 16) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) with all C classes in one ``tile``-element tile. Long rows for small C:
    at C = 2, 1024 pixels per program keep enough bytes in flight."""
    block_c = triton.next_power_of_2(C)
    return block_c, max(min_pixels, min(1024, tile // block_c))


def _chunked_config(chunk_c: int | None, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) of a class-chunked kernel: ``chunk_c`` (default ``_CHUNK_C``) classes
    per chunk."""
    block_c = chunk_c or _CHUNK_C
    return block_c, max(16, min(128, tile // block_c))


def _chunked(C: int, chunk_c: int | None) -> bool:
    """Whether a problem takes the class-chunked path (``chunk_c`` forces it, for tests)."""
    return chunk_c is not None or C > _SMALL_C_MAX


def _mc_tile(resample: bool) -> int:
    return _MC_RESAMPLE_TILE if resample else _MC_TILE


def _grid(batch: int, pixels: int, block_n: int) -> tuple[int]:
    return (batch * triton.cdiv(pixels, block_n),)


def _wide(C: int, pixels: int, block_n: int, force: bool) -> bool:
    """Whether the offsets inside a tile, c·N + j, need int64 (tile bases always are)."""
    return force or C * pixels + block_n >= 2**31


def _bwd_config(C: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) for the backward kernel (no state carried across class chunks)."""
    block_c = min(triton.next_power_of_2(C), 64)
    return block_c, max(64, min(1024, _CE_TILE // block_c))


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on CPU tensors)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------------ checks


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


def _check_layout(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                  device: torch.device) -> None:
    """``t`` is a contiguous tensor of ``dtype`` and ``shape`` on ``device``."""
    _check_same_device(t, name, device)
    if t.dtype != dtype:
        raise RuntimeError(f"uce_fast: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise RuntimeError(f"uce_fast: {name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise RuntimeError(f"uce_fast: {name} must be contiguous")


def _check_pixels(t: Tensor, name: str, batch: int, pixels: int, dtype: torch.dtype,
                  device: torch.device, planes: int = 1) -> None:
    """``t`` is a contiguous (batch, pixels) tensor of ``dtype``, (planes, batch, pixels) when
    ``planes`` > 1."""
    shape = (batch, pixels) if planes == 1 else (planes, batch, pixels)
    _check_layout(t, name, dtype, shape, device)


def _check_weight(weight: Tensor | None, C: int, device: torch.device) -> None:
    if weight is None:
        return
    _check_same_device(weight, "weight", device)
    if weight.dtype != torch.float32 or tuple(weight.shape) != (C,) or not weight.is_contiguous():
        raise RuntimeError(
            f"uce_fast: weight must be a contiguous float32 tensor of shape ({C},), got "
            f"{weight.dtype} {tuple(weight.shape)}")


def _check_fused_stack(samples: Tensor, correction: int, input: Tensor) -> int:
    """The forward's stack: (β, B, C, N) of ``input``'s B, C, N and device, β >= 2, correction in
    [0, β). Returns β."""
    _check_logits(samples, "samples", 4, "(beta, B, C, N)")
    _check_same_device(samples, "samples", input.device)
    batch, C, pixels = input.shape
    if tuple(samples.shape[1:]) != (batch, C, pixels):
        raise RuntimeError(
            f"uce_fast: samples must have shape (beta, {batch}, {C}, {pixels}) to match input, "
            f"got {tuple(samples.shape)}")
    beta = samples.shape[0]
    if beta < 2:
        raise ValueError(f"uce_fast: need at least 2 Monte-Carlo samples, got beta = {beta}")
    if not 0 <= correction < beta:
        raise ValueError(
            f"uce_fast: correction must be in [0, beta) = [0, {beta}), got {correction}")
    return beta


def _check_stream_samples(samples: Tensor, in_h: int, in_w: int) -> None:
    """The streaming ops' samples: (S, B, C, in_h·in_w), at least one class."""
    _check_logits(samples, "samples", 4, "(S, B, C, in_h * in_w)")
    if samples.shape[2] < 1:
        raise RuntimeError("uce_fast: samples must have at least one class")
    if samples.shape[3] != in_h * in_w:
        raise RuntimeError(
            f"uce_fast: samples must have in_h * in_w = {in_h} * {in_w} pixels, got "
            f"{samples.shape[3]}")


def _check_state(t: Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> None:
    _check_device(t, name)
    _check_layout(t, name, torch.float32, shape, device)


def _check_mc_sizes(count: int, in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether the samples are resampled (sizes differ); raises on sizes the kernels cannot take."""
    if min(in_h, in_w, out_h, out_w) < 0:
        raise RuntimeError(
            f"uce_fast: sizes must be >= 0, got in ({in_h}, {in_w}), out ({out_h}, {out_w})")
    if max(in_h * in_w, out_h * out_w) > _INT32_MAX:
        raise RuntimeError("uce_fast: more than 2^31 - 1 pixels per class plane")
    if count < 0:
        raise ValueError(f"uce_fast: count must be >= 0, got {count}")
    resample = (in_h, in_w) != (out_h, out_w)
    if resample and out_h * out_w > 0 and in_h * in_w == 0:
        raise RuntimeError(
            f"uce_fast: cannot resample from ({in_h}, {in_w}) to ({out_h}, {out_w})")
    return resample


def _smoothing_terms(label_smoothing: float, C: int) -> tuple[float, float]:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"uce_fast: label_smoothing must be in [0, 1], got {label_smoothing}")
    return 1.0 - label_smoothing, label_smoothing / C


def _negative_base_sign(alpha: float) -> float:
    """Sign of (1 + sigma) ** alpha for a negative base, as powf: ±1 for integer alpha, else NaN."""
    if not float(alpha).is_integer():
        return math.nan
    return -1.0 if int(alpha) % 2 else 1.0


def _ood_terms(ood_index: int, ood_scale: float, C: int, ignore_index: int) -> tuple[bool, float]:
    """Checks the entropy-maximisation arguments as the compiled ops do; (whether OoD pixels are
    on, 1 / C: their smoothing factor)."""
    if not (ood_index == ignore_index or ood_index < 0 or ood_index >= C):
        raise ValueError(
            f"uce_fast: ood_index must be outside [0, {C}) (or equal ignore_index to turn "
            f"entropy maximisation off), got {ood_index}")
    if not 0.0 <= ood_scale <= 3.4e38:
        raise ValueError(f"uce_fast: ood_scale must be a finite number >= 0, got {ood_scale}")
    return ood_index != ignore_index and ood_scale > 0.0, 1.0 / max(C, 1)


def _raise_bad_label(target: Tensor, C: int, ignore_index: int, ood_index: int) -> None:
    bad = ((target < 0) | (target >= C)) & (target != ignore_index) & (target != ood_index)
    value = int(target[bad].flatten()[0])
    raise ValueError(_opglue.bad_label_message(value, C, ignore_index, ood_index))


# ---------------------------------------------------------------------------- sample sources


def _f32_div(a: int, b: int) -> float:
    """float32(a) / float32(b) rounded to float32 (exactly representable in a Python float)."""
    return float(torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32))


def _source_index(in_size: int, out_size: int, align_corners: bool,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """[i0; i1] (2, out) int32 and [l0; l1] (2, out) float32 of the bilinear source index along
    one dim (contract: ``uce_fast.ops``): float32, one torch op per step, so that each product
    and sum is rounded on its own."""
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


class _Sources(NamedTuple):
    """Where a tile's sample values come from: the sizes and constexprs the kernels take, and,
    when resampling, the bilinear tables of the rows and of the columns (ty, wy, tx, wx)."""

    resample: bool
    round: bool  # resampled values are rounded to the samples' dtype
    bf16_bits: bool  # ... on the bits (bfloat16 under the interpreter)
    in_w: int
    out_h: int
    out_w: int
    plane: int  # source pixels per class plane
    tables: tuple[Tensor, Tensor, Tensor, Tensor] | None

    def table_args(self, dummy: Tensor) -> tuple[Tensor, ...]:
        return self.tables if self.tables is not None else (dummy,) * 4

    def sizes(self) -> tuple[int, int, int, int]:
        """The kernels' (in_w, out_h, out_w, plane) arguments."""
        return self.in_w, self.out_h, self.out_w, self.plane

    def options(self) -> dict:
        """The kernels' constexprs for the sample source, and the compile option that keeps
        the bilinear formula's products and sums separately rounded."""
        return dict(RESAMPLE=self.resample, ROUND=self.round, BF16_BITS=self.bf16_bits,
                    enable_fp_fusion=not self.resample)


def _resampled(dtype: torch.dtype, device: torch.device, in_h: int, in_w: int, out_h: int,
               out_w: int, align_corners: bool, on_device: bool = False) -> _Sources:
    """The source of samples resampled from (in_h, in_w) to (out_h, out_w). The tables are
    computed on the CPU (the same float32 operations, each rounded on its own) and copied to
    ``device`` by a copy that is complete when it returns, so that launches on any stream may read
    them; ``on_device``: computed on ``device`` itself (while a CUDA graph is being captured,
    where such a copy is illegal)."""
    where = device if on_device else torch.device("cpu")
    tables = (*_source_index(in_h, out_h, align_corners, where),
              *_source_index(in_w, out_w, align_corners, where))
    return _Sources(True, dtype != torch.float32, INTERPRET and dtype == torch.bfloat16, in_w,
                    out_h, out_w, in_h * in_w, tuple(t.to(device) for t in tables))


_cached_resampled = functools.lru_cache(maxsize=64)(_resampled)


def _sources(samples: Tensor | None, in_h: int, in_w: int, out_h: int, out_w: int,
             align_corners: bool, resample: bool) -> _Sources:
    """The sample source of a launch. The bilinear tables are built once per (dtype, device,
    sizes, align_corners); while a CUDA graph is being captured they are built by the graph
    itself and not kept (its tensors hold values only when it replays)."""
    if samples is None or not resample:
        return _Sources(False, False, False, in_w, out_h, out_w, out_h * out_w, None)
    key = (samples.dtype, samples.device, in_h, in_w, out_h, out_w, bool(align_corners))
    return _resampled(*key, on_device=True) if _capturing(samples) else _cached_resampled(*key)


# --------------------------------------------------------------------------------- launchers


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """``t``, or ``dummy`` for a pointer argument that the kernel variant does not read."""
    return dummy if t is None else t


def _normalisers(S: int, batch: int, pixels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The class-chunked kernels' scratch: each sample's per-pixel max and 1 / Σ exp(x - max),
    two (S, B, N) float32 tensors (8 bytes per sample and pixel); ``like`` twice for S = 0."""
    if S == 0:
        return like, like
    return (torch.empty((S, batch, pixels), device=like.device, dtype=torch.float32),
            torch.empty((S, batch, pixels), device=like.device, dtype=torch.float32))


def _launch_reduce(samples: Tensor | None, state: tuple[Tensor, Tensor, Tensor] | None,
                   count: int, sources: _Sources, inv_denom: float, sigma: Tensor,
                   pred: Tensor | None = None, h_out: Tensor | None = None,
                   mutual_info: Tensor | None = None, probs: Tensor | None = None, *,
                   chunk_c: int | None, wide: bool) -> None:
    """mc_reduce's kernels: the samples (S, B, C, plane) or None folded after the state
    (mean, m2, entropy) of ``count`` samples (None when count == 0) into ``sigma`` (B, N) and,
    where given, ``pred``, the entropy maps (``h_out``, ``mutual_info``) and ``probs``. The fused
    forward calls it for a class-chunked stack (sigma alone)."""
    batch, pixels = sigma.shape
    C = (samples if samples is not None else state[0]).shape[-2]
    S = 0 if samples is None else samples.shape[0]
    dummy = sigma
    inputs = (_or(samples, dummy), *(state if state is not None else (dummy,) * 3))
    outputs = (sigma, _or(pred, dummy), _or(h_out, dummy), _or(mutual_info, dummy),
               _or(probs, dummy))
    flags = dict(HAS_STATE=state is not None, HAS_SAMPLES=S > 0, WANT_PRED=pred is not None,
                 WANT_PROBS=probs is not None, WANT_ENTROPY=h_out is not None,
                 num_warps=_NUM_WARPS, **sources.options())
    dims = (C, pixels, *sources.sizes(), batch * C * sources.plane)
    if not _chunked(C, chunk_c):
        block_c, block_n = _small_config(C, _mc_tile(sources.resample),
                                         8 if sources.resample else 16)
        mc_kernels.mc_reduce_kernel[_grid(batch, pixels, block_n)](
            *inputs, *sources.table_args(dummy), *outputs, *dims, S, count, inv_denom,
            BLOCK_C=block_c, BLOCK_N=block_n,
            WIDE=_wide(C, max(pixels, sources.plane), block_n, wide), **flags)
        return
    block_c, block_n = _chunked_config(chunk_c, _mc_tile(sources.resample))
    mc_kernels.mc_reduce_chunked_kernel[_grid(batch, pixels, block_n)](
        *inputs, *_normalisers(S, batch, pixels, dummy), *sources.table_args(dummy), *outputs,
        *dims, batch * pixels, S, count, inv_denom, BLOCK_C=block_c, BLOCK_N=block_n,
        WIDE=_wide(C, max(pixels, sources.plane), block_n, wide), **flags)


def _forward(input: Tensor, target: Tensor, samples: Tensor | None, sigma: Tensor | None,
             weight: Tensor | None, alpha: float, ignore_index: int, label_smoothing: float,
             correction: int, check_labels: bool, ood_index: int, ood_scale: float, *,
             chunk_c: int | None = None, wide: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    _check_logits(input, "input", 3, "(B, C, N)")
    batch, C, pixels = input.shape
    if C < 1:
        raise RuntimeError("uce_fast: input must have at least one class")
    _check_pixels(target, "target", batch, pixels, torch.int64, input.device)
    if (samples is None) == (sigma is None):
        raise RuntimeError("uce_fast: exactly one of samples and sigma must be given")
    _check_weight(weight, C, input.device)
    one_minus_eps, eps_over_c = _smoothing_terms(label_smoothing, C)
    ood_on, inv_c = _ood_terms(ood_index, ood_scale, C, ignore_index)
    # For the sigma form: values of the unused arguments that add no JIT specialisation.
    beta, inv_denom = 2, 1.0
    if samples is not None:
        beta = _check_fused_stack(samples, correction, input)
        inv_denom = 1.0 / (beta - correction)
    else:
        _check_pixels(sigma, "sigma", batch, pixels, torch.float32, input.device)

    loss = torch.empty((batch, pixels), device=input.device, dtype=torch.float32)
    norm = torch.empty((2, batch, pixels), device=input.device, dtype=torch.float32)
    pixel_weight = torch.empty_like(loss)
    if batch * pixels == 0:
        return loss, norm, pixel_weight
    chunked = _chunked(C, chunk_c)
    # No host read while a CUDA graph is being captured: the labels are then unchecked.
    check = bool(check_labels) and not _capturing(input)
    flag = torch.zeros(1, device=input.device, dtype=torch.int32) if check else None
    with _device_guard(input):
        if samples is not None and chunked:
            # Class chunks: sigma first, by mc_reduce's class-chunked kernel (the same per-pixel
            # code), written and read back below (4 bytes per pixel each way).
            sigma = torch.empty((batch, pixels), device=input.device, dtype=torch.float32)
            _launch_reduce(samples, None, 0, _sources(samples, 1, pixels, 1, pixels, False, False),
                           inv_denom, sigma, chunk_c=chunk_c, wide=wide)
            samples, beta, inv_denom = None, 2, 1.0
        if chunked:
            block_c, block_n = _chunked_config(chunk_c, _CE_TILE)
        else:
            block_c, block_n = _small_config(C, _CE_TILE if samples is None else _MC_TILE)
        kernels.uce_forward_kernel[_grid(batch, pixels, block_n)](
            input, target, _or(samples, loss), _or(sigma, loss), _or(weight, loss),
            loss, norm[0], norm[1], pixel_weight, _or(flag, loss),
            C, pixels, 0 if samples is None else batch * C * pixels, beta, inv_denom,
            float(alpha), _negative_base_sign(alpha), ignore_index, one_minus_eps, eps_over_c,
            ood_index, float(ood_scale), inv_c, HAS_SAMPLES=samples is not None,
            HAS_WEIGHT=weight is not None,
            # OoD pixels need the smoothing sum (their eps is 1): no variant of their own.
            SMOOTH=eps_over_c != 0.0 or ood_on, CHECK_LABELS=check, CHUNKED=chunked,
            BLOCK_C=block_c, BLOCK_N=block_n, WIDE=_wide(C, pixels, block_n, wide),
            num_warps=_NUM_WARPS,
        )
    # The one 4-byte device-to-host read: a bad label is reported as an error, never as a loss.
    if check and int(flag.item()) != 0:
        _raise_bad_label(target, C, ignore_index, ood_index)
    return loss, norm, pixel_weight


def _backward(grad_loss: Tensor, input: Tensor, target: Tensor, norm: Tensor,
              pixel_weight: Tensor, weight: Tensor | None, ignore_index: int,
              label_smoothing: float, ood_index: int, ood_scale: float, *,
              wide: bool = False) -> Tensor:
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
    ood_on, inv_c = _ood_terms(ood_index, ood_scale, C, ignore_index)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    if batch * pixels == 0 or C == 0:
        return grad_input
    block_c, block_n = _bwd_config(C)
    with _device_guard(input):
        kernels.uce_backward_kernel[_grid(batch, pixels, block_n)](
            grad_loss, input, target, norm[0], norm[1], pixel_weight, _or(weight, pixel_weight),
            grad_input, C, pixels, ignore_index, one_minus_eps, eps_over_c, ood_index,
            float(ood_scale), inv_c, HAS_WEIGHT=weight is not None,
            SMOOTH=eps_over_c != 0.0 or ood_on, BLOCK_C=block_c, BLOCK_N=block_n,
            WIDE=_wide(C, pixels, block_n, wide), num_warps=_NUM_WARPS,
        )
    return grad_input


def _mc_accumulate(mean: Tensor, m2: Tensor, entropy: Tensor, samples: Tensor, count: int,
                   in_h: int, in_w: int, out_h: int, out_w: int, align_corners: bool, *,
                   chunk_c: int | None = None, wide: bool = False) -> None:
    resample = _check_mc_sizes(count, in_h, in_w, out_h, out_w)
    _check_stream_samples(samples, in_h, in_w)
    beta, batch, C, _ = samples.shape
    pixels = out_h * out_w
    _check_state(mean, "mean", (batch, C, pixels), samples.device)
    _check_state(m2, "m2", (batch, C, pixels), samples.device)
    _check_state(entropy, "entropy", (batch, pixels), samples.device)
    if count + beta > _INT32_MAX:
        raise ValueError("uce_fast: too many Monte-Carlo samples")
    if batch * pixels == 0 or beta == 0:
        return
    sources = _sources(samples, in_h, in_w, out_h, out_w, align_corners, resample)
    args = (*sources.sizes(), batch * C * sources.plane)
    options = dict(HAS_STATE=count > 0, num_warps=_NUM_WARPS, **sources.options())
    tables = sources.table_args(entropy)
    with _device_guard(samples):
        if _chunked(C, chunk_c):
            block_c, block_n = _chunked_config(chunk_c, _mc_tile(sources.resample))
            mc_kernels.mc_accumulate_chunked_kernel[_grid(batch, pixels, block_n)](
                samples, mean, m2, entropy, *_normalisers(beta, batch, pixels, entropy), *tables,
                C, pixels, *args, batch * pixels, beta, count, BLOCK_C=block_c,
                BLOCK_N=block_n, WIDE=_wide(C, max(pixels, sources.plane), block_n, wide),
                **options)
            return
        block_c, block_n = _small_config(C, _mc_tile(sources.resample),
                                         8 if sources.resample else 16)
        mc_kernels.mc_accumulate_kernel[_grid(batch, pixels, block_n)](
            samples, mean, m2, entropy, *tables, C, pixels, *args, beta, count,
            BLOCK_C=block_c, BLOCK_N=block_n,
            WIDE=_wide(C, max(pixels, sources.plane), block_n, wide), **options)


def _mc_reduce(samples: Tensor | None, mean: Tensor | None, m2: Tensor | None,
               entropy: Tensor | None, count: int, in_h: int, in_w: int, out_h: int, out_w: int,
               align_corners: bool, correction: int, want_probs: bool, want_entropy: bool, *,
               chunk_c: int | None = None,
               wide: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    resample = _check_mc_sizes(count, in_h, in_w, out_h, out_w)
    pixels = out_h * out_w
    if samples is not None:
        _check_stream_samples(samples, in_h, in_w)
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
    samples = samples if beta > 0 else None
    with _device_guard(sigma):
        _launch_reduce(samples, (mean, m2, entropy) if count > 0 else None, count,
                       _sources(samples, in_h, in_w, out_h, out_w, align_corners, resample),
                       1.0 / (n - correction), sigma, pred,
                       h_out if want_entropy else None, mutual_info if want_entropy else None,
                       probs if want_probs else None, chunk_c=chunk_c, wide=wide)
    return sigma, pred, h_out, mutual_info, probs


# ------------------------------------------------------------------------------- registration

_FORWARD_SCHEMA = (
    "(Tensor input, Tensor target, Tensor? samples, Tensor? sigma, Tensor? weight, float alpha, "
    "int ignore_index, float label_smoothing, int correction, bool check_labels, int ood_index, "
    "float ood_scale) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor input, Tensor target, Tensor norm, Tensor pixel_weight, "
    "Tensor? weight, int ignore_index, float label_smoothing, int ood_index, float ood_scale) "
    "-> Tensor"
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
                correction: int, check_labels: bool, ood_index: int, ood_scale: float) -> Tensor:
    """Per-pixel U-CE loss (B, N) float32 from the Triton op; differentiable w.r.t. ``input``."""
    return torch.ops.uce_fast.triton_uce_forward(
        input, target, samples, sigma, weight, alpha, ignore_index, label_smoothing, correction,
        check_labels, ood_index, ood_scale,
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
