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


def _batch_statistics_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that normalise with the statistics of the batch they see (train mode, or
    no running statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]


def _per_group_batch_norm(module: nn.modules.batchnorm._BatchNorm,
                          groups: int) -> Callable[[Tensor], Tensor]:
    """A forward for ``module`` that normalises each of ``groups`` equal row blocks of its input
    with that block's own batch statistics, as ``groups`` separate passes would.

    The blocks are folded into the channel dim, (k·B, C, *) -> (B, k·C, L), so that one
    ``F.batch_norm`` computes the statistics of every (block, channel) over (B, L).
    """

    def forward(x: Tensor) -> Tensor:
        rows, channels = x.shape[:2]
        batch = rows // groups
        folded = x.reshape(groups, batch, channels, -1).transpose(0, 1)
        folded = folded.reshape(batch, groups * channels, -1)
        weight = None if module.weight is None else module.weight.repeat(groups)
        bias = None if module.bias is None else module.bias.repeat(groups)
        out = torch.nn.functional.batch_norm(folded, None, None, weight, bias, training=True,
                                             momentum=0.0, eps=module.eps)
        return out.reshape(batch, groups, channels, -1).transpose(0, 1).reshape(x.shape)

    return forward


@contextlib.contextmanager
def _batch_norm_per_group(model: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, BatchNorm layers that use batch statistics compute them per block of
    ``groups`` (see ``_per_group_batch_norm``); nothing is changed for ``groups == 1``."""
    norms = _batch_statistics_norms(model) if groups > 1 else []
    for m in norms:
        if isinstance(m, nn.SyncBatchNorm):
            raise ValueError(
                "per_forward > 1 with a SyncBatchNorm layer that normalises with batch "
                "statistics is not supported (its statistics span processes); use "
                "per_forward=1 or put it in eval mode")
    with forwards_replaced([(m, _per_group_batch_norm(m, groups)) for m in norms]):
        yield


@contextlib.contextmanager
def forwards_replaced(replacements: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Within the block each module's ``forward`` is the given function (its hooks still run);
    on exit each module gets back what it had, an instance attribute of its own included."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in replacements]
    for m, fn in replacements:
        m.forward = fn
    try:
        yield
    finally:
        for m, own in saved:
            if own is None:
                del m.forward
            else:
                m.forward = own


def _run_without_dropout(model: nn.Module | Callable, prefix: Callable[[Tensor], Tensor],
                         inputs: Tensor) -> Tensor:
    """``prefix(inputs)``, raising if a dropout module of ``model`` runs inside it: the prefix is
    computed once for all passes, so it must be deterministic."""
    if not isinstance(model, nn.Module):
        return prefix(inputs)
    fired: list[str] = []
    names = {id(m): name for name, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda mod, args: fired.append(names[id(mod)]))
               for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    try:
        out = prefix(inputs)
    finally:
        for h in handles:
            h.remove()
    if fired:
        raise ValueError(
            f"prefix must be the deterministic part of the model before its first dropout, but "
            f"dropout module {fired[0]!r} ran inside it")
    return out


@torch.no_grad()
def mc_sample(
    model: nn.Module | Callable[[Tensor], Tensor],
    inputs: Tensor,
    beta: int,
    *,
    per_forward: int = 1,
    accumulator: MCAccumulator | None = None,
    size: tuple[int, int] | None = None,
    align_corners: bool | None = None,
    backend: str = "auto",
    forward: Callable[[Tensor], Tensor] | None = None,
    prefix: Callable[[Tensor], Tensor] | None = None,
    first_sample: Tensor | None = None,
) -> MCAccumulator:
    """Draws ``beta`` MC-dropout forward passes of ``model`` on ``inputs`` into an accumulator.

    Runs under ``torch.no_grad()`` and :func:`mc_dropout` (when ``model`` is an ``nn.Module``);
    autocast, if wanted, is the caller's (wrap the call). The accumulator's state does not grow
    with ``beta``; no stack is built. Three exact ways to make the passes cheaper:

    * ``prefix``: the layers before the first dropout give the same output in every pass, so
      ``prefix(inputs)`` is computed once and only ``forward`` (the stochastic rest) runs per
      pass. (Features already computed by the training forward in the same BatchNorm mode can be
      passed directly as ``inputs`` with ``forward`` the rest of the model.)
    * ``first_sample``: the logits of a pass already run in the sampling distribution — the
      training forward, whose dropout is active — count as the first of the ``beta`` samples, so
      ``beta - 1`` passes are drawn. Exact when that pass normalised like the sample passes do:
      BatchNorm layers in train mode (batch statistics). Refused when the model's BatchNorm
      layers are in eval mode (running statistics), where the training forward's statistics
      differ from the samples'.
    * ``per_forward``: several passes in one batched forward.

    Args:
        model: the network (or any callable when ``forward`` is None).
        inputs: (B, ...) batch of inputs (of ``prefix``, else of ``forward``).
        beta: number of samples, >= 1 (>= 2 for a standard deviation), ``first_sample`` included.
        per_forward: passes per batched forward: the batch (or the prefix's output) is repeated
            this many times (B·per_forward rows, each with its own dropout mask) and split back
            into samples. BatchNorm layers that normalise with batch statistics compute them for
            each block of B rows separately, as separate passes would; exact. Memory of the
            forward grows accordingly. Default 1.
        accumulator: where to add the samples; default a new
            ``MCAccumulator(size, align_corners=align_corners, backend=backend, capacity=beta)``.
        size, align_corners, backend: options of the new accumulator (see
            :class:`MCAccumulator`): e.g. ``size=inputs.shape[-2:]`` with a model that returns
            logits at 1/4 resolution, to upsample inside the kernels.
        forward: ``forward(x) -> logits`` (B, C, ...) to call instead of ``model(x)``, e.g.
            ``lambda x: model(x)["out"]``, a model's low-resolution head, or with ``prefix`` the
            model after it. Required with ``prefix``.
        prefix: ``prefix(inputs) -> features``, the model up to its first dropout, run once
            (under ``mc_dropout``, so BatchNorm normalises as in the passes); a dropout module
            of ``model`` running inside it raises ``ValueError``. Default None.
        first_sample: (B, C, ...) logits to add as the first sample (detached); default None.

    Returns:
        The accumulator, with ``beta`` more samples.
    """
    if isinstance(beta, bool) or not isinstance(beta, int) or beta < 1:
        raise ValueError(f"beta must be a positive int, got {beta!r}")
    if isinstance(per_forward, bool) or not isinstance(per_forward, int) or per_forward < 1:
        raise ValueError(f"per_forward must be a positive int, got {per_forward!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        raise TypeError("inputs must be a torch.Tensor with a batch dim")
    if prefix is not None and forward is None:
        raise ValueError("prefix needs forward: the part of the model that maps the prefix's "
                         "output to logits")
    if first_sample is not None:
        if not isinstance(first_sample, Tensor):
            raise TypeError(f"first_sample must be a torch.Tensor of logits, got "
                            f"{type(first_sample).__name__}")
        running = [name for name, m in (model.named_modules() if isinstance(model, nn.Module)
                                         else ())
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
                   and m.running_mean is not None]
        if running:
            raise ValueError(
                f"first_sample is an MC sample only when the sample passes normalise like the "
                f"pass that produced it (BatchNorm with batch statistics, train mode), but "
                f"BatchNorm layer {running[0]!r} is in eval mode (running statistics): draw all "
                f"beta passes instead")
    if accumulator is None:
        accumulator = MCAccumulator(size, align_corners=align_corners, backend=backend,
                                    capacity=beta)
    run = forward if forward is not None else model
    is_module = isinstance(model, nn.Module)
    context = mc_dropout(model) if is_module else contextlib.nullcontext()
    with context:
        if first_sample is not None:
            accumulator.update(first_sample.detach())
        done = 0 if first_sample is None else 1
        if prefix is not None:
            inputs = _run_without_dropout(model, prefix, inputs)
        batch = inputs.shape[0]
        while done < beta:
            k = min(per_forward, beta - done)
            x = inputs if k == 1 else inputs.repeat(k, *([1] * (inputs.dim() - 1)))
            with _batch_norm_per_group(model, k) if is_module else contextlib.nullcontext():
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
