"""Drawing Monte-Carlo-dropout samples: dropout on, BatchNorm untouched, into an accumulator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from uce_fast.accumulator import MCAccumulator

__all__ = ["DROPOUT_TYPES", "mc_dropout", "mc_sample"]

#: Module types ``mc_dropout`` switches to train mode (their subclasses included).
DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager for MC-dropout sampling: dropout on, everything else as it was.

    Inside the block every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout`` and subclasses) is in train mode. BatchNorm layers keep their mode —
    eval: running statistics; train: the batch's statistics — and never update their running
    statistics or ``num_batches_tracked``. Other modules are untouched. On exit (also on an
    exception) every flag is restored. Dropout written as ``F.dropout(x, training=self.training)``
    inside another module follows that module's mode and is not switched.

    Yields the model. Wrap the forward passes in ``torch.no_grad()`` yourself, or use
    :func:`mc_sample`.
    """
    dropouts = [(m, m.training) for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    norms = [(m, m.track_running_stats) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m, _ in dropouts:
        m.train()
    for m, _ in norms:
        # In train mode with tracking off, BatchNorm normalises with the batch's statistics and
        # passes no running buffers to F.batch_norm: nothing is updated, not even the counter.
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, mode in dropouts:
            m.train(mode)
        for m, track in norms:
            m.track_running_stats = track


@torch.no_grad()
def mc_sample(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    beta: int,
    *,
    per_forward: int = 1,
    accumulator: MCAccumulator | None = None,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
    backend: str = "auto",
    forward: Callable[[Tensor], Tensor] | None = None,
) -> MCAccumulator:
    """Draws ``beta`` MC-dropout forward passes of ``model`` on ``inputs`` into an accumulator.

    Runs under ``torch.no_grad()`` and :func:`mc_dropout` (when ``model`` is an ``nn.Module``);
    autocast, if wanted, is the caller's (wrap the call). The accumulator's state does not grow
    with ``beta``; no stack is built.

    Args:
        model: the network (or any callable when ``forward`` is None).
        inputs: (B, ...) batch of inputs.
        beta: number of passes, >= 1 (>= 2 for a standard deviation).
        per_forward: passes per batched forward: the batch is repeated this many times
            (B·per_forward rows, each with its own dropout mask) and split back into samples —
            fewer, larger forward passes; memory of the forward grows accordingly. Default 1.
            Identical in distribution to separate passes (BatchNorm in train mode sees the
            repeated batch, whose statistics are those of the batch).
        accumulator: where to add the samples; default a new
            ``MCAccumulator(size, align_corners=align_corners, backend=backend, capacity=beta)``.
        size, align_corners, backend: options of the new accumulator (see
            :class:`MCAccumulator`): e.g. ``size=inputs.shape[-2:]`` with a model that returns
            logits at 1/4 resolution, to upsample inside the kernels.
        forward: ``forward(x) -> logits`` (B, C, ...) to call instead of ``model(x)``, e.g.
            ``lambda x: model(x)["out"]`` or a model's low-resolution head.

    Returns:
        The accumulator, with ``beta`` more samples.
    """
    if isinstance(beta, bool) or not isinstance(beta, int) or beta < 1:
        raise ValueError(f"beta must be a positive int, got {beta!r}")
    if isinstance(per_forward, bool) or not isinstance(per_forward, int) or per_forward < 1:
        raise ValueError(f"per_forward must be a positive int, got {per_forward!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        raise TypeError("inputs must be a torch.Tensor with a batch dim")
    if accumulator is None:
        accumulator = MCAccumulator(size, align_corners=align_corners, backend=backend,
                                    capacity=beta)
    run = forward if forward is not None else model
    batch = inputs.shape[0]
    context = mc_dropout(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with context:
        done = 0
        while done < beta:
            k = min(per_forward, beta - done)
            x = inputs if k == 1 else inputs.repeat(k, *([1] * (inputs.dim() - 1)))
            logits = run(x)
            if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[0] != k * batch:
                raise ValueError(
                    f"the forward must return logits (B·per_forward, C, ...) = ({k * batch}, ...),"
                    f" got {getattr(logits, 'shape', type(logits).__name__)}")
            if k == 1:
                accumulator.update(logits)
            else:
                accumulator.update_stack(logits.view(k, batch, *logits.shape[1:]))
            del logits
            done += k
    return accumulator
