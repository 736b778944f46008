"""``MCAccumulator``: Monte-Carlo statistics taken one sample at a time, without the stack.

U-CE's uncertainty needs, per pixel and class, the mean and the spread of the softmax
probabilities over β stochastic forward passes. Stacking the passes costs β full-resolution
logit tensors (1.8 GB at B=4, C=19, 768², β=10 in float32). The accumulator instead folds each
pass into a float32 Welford state — mean and M2 per (pixel, class), and the mean per-sample
entropy per pixel — whose size does not depend on β; a fused kernel does the softmax and the
update in one read of the sample.

Samples may also come at a lower resolution than the statistics (``size=``): the bilinear
upsampling (``F.interpolate(mode="bilinear")``'s exact index and weight formula) happens inside
the kernels, so the full-resolution sample never exists. Low-resolution samples are small
(1/16 of the full-resolution ones at ×4), smaller than the full-resolution state for β up to
2·16 = 32 in float32, so by default they are kept as they are and reduced in one fused pass when
the statistics are asked for, and folded into the state only once they would outgrow it
(``store=``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from uce_fast import _dispatch

__all__ = ["STORES", "MCAccumulator", "MCStats"]

#: How an accumulator keeps what it has seen; see :class:`MCAccumulator`.
STORES = ("auto", "state", "samples")


class MCStats(NamedTuple):
    """Monte-Carlo dropout statistics of β samples, float32 unless stated.

    Attributes:
        mean_probs: (B, C, *spatial) mean over samples of the softmax probabilities.
        pred: (B, *spatial) int64, the argmax of ``mean_probs`` (first maximum on ties).
        sigma: (B, *spatial) standard deviation over samples of the probability of ``pred``
            (U-CE's uncertainty).
        entropy: (B, *spatial) predictive entropy ``H(mean_probs) = -Σ_c p̄_c log p̄_c``.
        mutual_info: (B, *spatial) mutual information (BALD) ``H(mean_probs) - mean_b H(p_b)``,
            clamped at 0 (it is >= 0 up to rounding).
    """

    mean_probs: Tensor
    pred: Tensor
    sigma: Tensor
    entropy: Tensor
    mutual_info: Tensor


def _check_size(size: object) -> tuple[int, int] | None:
    if size is None:
        return None
    if (not isinstance(size, tuple | list) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be None or (H, W) with two positive ints, got {size!r}")
    return int(size[0]), int(size[1])


class MCAccumulator:
    """Streaming Monte-Carlo-dropout statistics: U-CE's ``samples`` without the stack.

    Feed it the logits of each stochastic forward pass with :meth:`update` (or several passes at
    once with :meth:`update_stack`), then pass it as ``samples=`` to ``uce_fast.uce_loss`` /
    ``UCELoss``, or finalise it with :meth:`sigma` or :meth:`stats`. The results equal those of
    the stacked samples up to float32 rounding.

    Args:
        size: (H, W) of the statistics when the samples come at a lower (or any other)
            resolution: each sample is upsampled on the fly, inside the kernels, with the source
            index and weight formula of ``F.interpolate(sample, size, mode="bilinear",
            align_corners=align_corners)`` (float32 arithmetic, each operation rounded; the value
            rounded to the sample's dtype). Default None: the
            samples' own spatial shape (any number of spatial dims).
        align_corners: as in ``F.interpolate``; required (no default) when samples come at
            another resolution than ``size``: it must match the model's own upsampling of its
            logits (smp's and this repository's DeepLabV3+ heads use True, torchvision's models
            and SegFormer-style losses False). :class:`~uce_fast.MCSampler` passes it itself.
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton", chosen at the first
            update from the samples' device and dtype.
        store: what is kept between updates.
            ``"state"``: the float32 Welford state at the output resolution — 2·B·C·H·W + B·H·W
            floats, independent of β.
            ``"samples"``: the samples as given (their dtype and resolution), reduced in one
            fused pass when the statistics are asked for; grows by one sample per update.
            ``"auto"`` (default): ``"state"`` for samples at the output resolution; for samples
            at another resolution, ``"samples"`` while they take fewer bytes than the state
            would, then folded into the state, which then streams.
        capacity: with stored samples, how many will come (e.g. β): they are then written into
            one preallocated buffer instead of being concatenated when reduced (which briefly
            needs their size twice). Default None.

    Memory: :attr:`nbytes` is what the accumulator holds.
    """

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        *,
        align_corners: bool | None = None,
        backend: str = "auto",
        store: str = "auto",
        capacity: int | None = None,
    ) -> None:
        self.size = _check_size(size)
        if align_corners is not None and not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be a bool (or None at the samples' own "
                            f"resolution), got {type(align_corners).__name__}")
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 1):
            raise ValueError(f"capacity must be None or a positive int, got {capacity!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.align_corners = align_corners
        self.store = store
        self.capacity = capacity
        self._backend_request = backend
        self.reset()

    # ----------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forgets every sample and frees the state (the options are kept)."""
        self.backend: str | None = None
        self._shape: tuple[int, ...] | None = None  # (B, C, *in_spatial) of the samples
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._out_spatial: tuple[int, ...] = ()
        self._count = 0  # samples folded into the state
        self._state: tuple[Tensor, Tensor, Tensor] | None = None
        self._buffer: list[Tensor] = []
        self._prealloc: Tensor | None = None
        self._filled = 0
        self._keep_samples = False

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count + self._buffered

    @property
    def shape(self) -> tuple[int, ...] | None:
        """(B, C, *spatial) of the statistics; None before the first update."""
        if self._shape is None:
            return None
        return (*self._shape[:2], *self._out_spatial)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the accumulator holds (state and stored samples)."""
        held = [*(self._state or ()), *self._buffer]
        if self._prealloc is not None:
            held.append(self._prealloc)
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def _buffered(self) -> int:
        return self._filled if self._prealloc is not None else sum(t.shape[0] for t in self._buffer)

    @property
    def _op_sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(in_size, out_size) for the ops: (h, w) and (H, W) when resampling, else (1, N) twice
        (any spatial shape, flattened)."""
        if self._resampled:
            return tuple(self._shape[2:]), tuple(self._out_spatial)  # type: ignore[return-value]
        flat = (1, math.prod(self._out_spatial))
        return flat, flat

    @property
    def _resampled(self) -> bool:
        return self._shape is not None and tuple(self._shape[2:]) != self._out_spatial

    def _state_nbytes(self) -> int:
        batch, classes = self._shape[:2]
        pixels = math.prod(self._out_spatial)
        itemsize = 8 if self._state_dtype == torch.float64 else 4
        return (2 * classes + 1) * batch * pixels * itemsize

    @property
    def _state_dtype(self) -> torch.dtype:
        return torch.float64 if self._dtype == torch.float64 else torch.float32

    # ---------------------------------------------------------------------------- updates

    def update(self, logits: Tensor) -> None:
        """Adds one stochastic forward pass.

        Args:
            logits: (B, C, *spatial) logits of one MC-dropout pass, float32/float16/bfloat16
                (float64 on the "torch" backend); treated as a constant (detached). Every update
                must have the same shape, dtype and device; ``*spatial`` is two dims (h, w) when
                ``size`` differs from it.
        """
        _dispatch.check_tensor("logits", logits, _dispatch.FLOAT_DTYPES,
                               "a floating tensor (B, C, *spatial)")
        if logits.dim() < 2:
            raise ValueError(f"logits must have shape (B, C, *spatial), got {tuple(logits.shape)}")
        self._add(logits.unsqueeze(0), "logits")

    def update_stack(self, samples: Tensor) -> None:
        """Adds several stochastic forward passes at once (one kernel launch).

        Args:
            samples: (S, B, C, *spatial) logits of S >= 1 passes, as for :meth:`update`.
        """
        _dispatch.check_tensor("samples", samples, _dispatch.FLOAT_DTYPES,
                               "a floating tensor (S, B, C, *spatial)")
        if samples.dim() < 3 or samples.shape[0] < 1:
            raise ValueError(
                f"samples must have shape (S, B, C, *spatial) with S >= 1, "
                f"got {tuple(samples.shape)}")
        self._add(samples, "samples")

    def _first(self, stack: Tensor, name: str) -> None:
        shape = tuple(stack.shape[1:])
        spatial = shape[2:]
        out = spatial if self.size is None else self.size
        if self.size is not None and len(spatial) != 2:
            raise ValueError(
                f"{name} must have two spatial dims (B, C, h, w) to be upsampled to size="
                f"{self.size}, got shape {tuple(stack.shape[1:])}")
        if tuple(out) != spatial and self.align_corners is None:
            raise ValueError(
                f"{name} at {'x'.join(map(str, spatial))} are resampled to size={self.size}: "
                f"give align_corners= to match the model's own upsampling of its logits (e.g. "
                f"True for smp's DeepLabV3+ head, False for torchvision's models); "
                f"uce_fast.MCSampler passes it itself")
        self.backend = _dispatch.resolve_backend(self._backend_request, stack.device,
                                                 (stack.dtype,))
        self._shape, self._dtype, self._device = shape, stack.dtype, stack.device
        self._out_spatial = tuple(out)
        sample_nbytes = math.prod(shape) * stack.element_size()
        if self.store == "samples":
            self._keep_samples = True
        elif self.store == "auto" and self._resampled:
            planned = self.capacity or 1
            self._keep_samples = planned * sample_nbytes <= self._state_nbytes()
        if self._keep_samples and self.capacity is not None:
            self._prealloc = torch.empty((self.capacity, *shape), dtype=stack.dtype,
                                         device=stack.device)

    def _add(self, stack: Tensor, name: str) -> None:
        stack = stack.detach()
        if self._shape is None:
            self._first(stack, name)
        elif tuple(stack.shape[1:]) != self._shape:
            raise ValueError(f"{name} must have shape (B, C, *spatial) = {self._shape} like the "
                             f"earlier updates, got {tuple(stack.shape[1:])}")
        elif stack.dtype != self._dtype:
            raise TypeError(f"{name} must have dtype {self._dtype} like the earlier updates, "
                            f"got {stack.dtype}")
        elif stack.device != self._device:
            raise ValueError(f"{name} is on {stack.device} but the earlier updates were on "
                             f"{self._device}; expected the same")
        if not self._keep_samples:
            self._fold(stack)
        elif self._prealloc is not None:
            end = self._filled + stack.shape[0]
            if end > self._prealloc.shape[0]:
                raise ValueError(f"capacity={self.capacity} samples exceeded ({end} given)")
            self._prealloc[self._filled:end].copy_(stack)
            self._filled = end
        else:
            self._buffer.append(stack.clone(memory_format=torch.contiguous_format))
            if (self.store == "auto"
                    and sum(t.numel() * t.element_size() for t in self._buffer)
                    > self._state_nbytes()):
                buffer, self._buffer, self._keep_samples = self._buffer, [], False
                for chunk in buffer:
                    self._fold(chunk)

    def _flat(self, stack: Tensor) -> Tensor:
        batch, classes = self._shape[:2]
        return stack.contiguous().view(stack.shape[0], batch, classes, -1)

    def _fold(self, stack: Tensor) -> None:
        if self._state is None:
            batch, classes = self._shape[:2]
            pixels = math.prod(self._out_spatial)
            opts = {"dtype": self._state_dtype, "device": self._device}
            self._state = (torch.empty((batch, classes, pixels), **opts),
                           torch.empty((batch, classes, pixels), **opts),
                           torch.empty((batch, pixels), **opts))
        _dispatch.kernel_ops(self.backend).mc_accumulate_(
            *self._state, self._flat(stack), self._count, *self._op_sizes,
            bool(self.align_corners))
        self._count += stack.shape[0]

    # ---------------------------------------------------------------------------- results

    def _samples(self) -> Tensor | None:
        if self._prealloc is not None:
            return self._prealloc[:self._filled] if self._filled else None
        if not self._buffer:
            return None
        return self._buffer[0] if len(self._buffer) == 1 else torch.cat(self._buffer)

    def _reduce(self, correction: int, want_probs: bool, want_entropy: bool) -> tuple[Tensor, ...]:
        total = self.count
        if total < 2:
            raise ValueError(f"the accumulator needs β >= 2 samples for a standard deviation, "
                             f"has {total}")
        _dispatch.check_correction(correction, total)
        samples = self._samples()
        state = self._state if self._count > 0 else (None, None, None)
        ops = _dispatch.kernel_ops(self.backend)
        sigma, pred, entropy, mutual_info, mean_probs = ops.mc_reduce(
            None if samples is None else self._flat(samples), *state, self._count,
            *self._op_sizes, bool(self.align_corners), correction, want_probs,
            want_entropy)
        batch, classes = self._shape[:2]
        maps = (batch, *self._out_spatial)
        out = [sigma.view(maps), pred.view(maps)]
        if want_entropy:
            out += [entropy.view(maps), mutual_info.view(maps)]
        if want_probs:
            out.append(mean_probs.view(batch, classes, *self._out_spatial))
        return tuple(out)

    def sigma(self, correction: int = 1, *,
              return_prediction: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """U-CE's uncertainty of the samples so far (the accumulator is unchanged).

        Args:
            correction: standard-deviation divisor offset; 1 (unbiased, default).
            return_prediction: also return the predicted class.

        Returns:
            sigma (B, *spatial) float32 (float64 on "torch" with float64 samples): the standard
            deviation of the softmax probability of the class with the highest mean
            probability; with ``return_prediction``, ``(sigma, pred)``, pred int64.
        """
        sigma, pred = self._reduce(correction, False, False)
        return (sigma, pred) if return_prediction else sigma

    def stats(self, correction: int = 1) -> MCStats:
        """Every Monte-Carlo statistic of the samples so far, see :class:`MCStats`."""
        sigma, pred, entropy, mutual_info, mean_probs = self._reduce(correction, True, True)
        return MCStats(mean_probs, pred, sigma, entropy, mutual_info)

    @classmethod
    def _of_stack(cls, samples: Tensor, size: tuple[int, int] | None, align_corners: bool | None,
                  backend: str) -> MCAccumulator:
        """An accumulator over a whole stack (β, B, C, *spatial) that keeps it without copying."""
        acc = cls(size, align_corners=align_corners, backend=backend, store="samples")
        acc._first(samples.detach(), "samples")
        acc._buffer = [samples.detach()]
        return acc

    def __repr__(self) -> str:
        return (f"MCAccumulator(count={self.count}, shape={self.shape}, size={self.size}, "
                f"align_corners={self.align_corners}, backend={self.backend!r}, "
                f"store={self.store!r}, nbytes={self.nbytes})")
