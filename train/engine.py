"""Monte-Carlo sampling, the loss, the parity check against the reference, and evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import uce_fast
from train.anomaly_metrics import AnomalyMetrics
from train.metrics import SegmentationMetrics
from train.models import ForwardParts
from uce_fast.testing import uce_oracle

__all__ = [
    "ANOMALY_SCORES",
    "SAMPLE_BN_MODES",
    "ParityResult",
    "SampleLevers",
    "amp_context",
    "anomaly_score_ranges",
    "anomaly_scores",
    "compute_loss",
    "default_check_tolerance",
    "draw_mc_samples",
    "evaluate",
    "evaluate_anomalies",
    "init_batchnorm_statistics",
    "mc_dropout_mode",
    "parity_check",
]


def amp_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``amp`` in {"off", "bf16", "fp16"}."""
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


#: BatchNorm behaviour during the MC sample passes (see ``mc_dropout_mode``).
SAMPLE_BN_MODES = ("running", "batch", "update")


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module, bn: str = "running") -> Iterator[None]:
    """Dropout active; BatchNorm per ``bn``; every module's mode and flag restored on exit.

    * ``"running"`` (default): BatchNorm in eval mode, normalising with its running statistics,
      which are neither updated nor otherwise touched.
    * ``"batch"``: BatchNorm normalises with the statistics of the current batch, as in the
      training forward pass, without updating the running statistics.
    * ``"update"``: BatchNorm in train mode, updating its running statistics on every pass (the
      official code's behaviour, which skews them towards the sample passes).

    The first two are ``uce_fast.mc_dropout`` with BatchNorm put in eval / train mode first.
    """
    if bn not in SAMPLE_BN_MODES:
        raise ValueError(f"bn must be one of {SAMPLE_BN_MODES}, got {bn!r}")
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    if bn == "running":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    try:
        with contextlib.nullcontext() if bn == "update" else uce_fast.mc_dropout(model):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass(frozen=True)
class SampleLevers:
    """How the β Monte-Carlo passes of a step are made cheaper; each keeps the samples'
    distribution, so sigma's statistics are those of β independent passes.

    * ``shared_prefix``: the model's layers before its first dropout (``model.prefix``) run once
      per step: in ``"batch"`` mode the training forward's prefix output is reused as is (same
      batch statistics, same values); in ``"running"`` mode it is computed once in eval mode.
    * ``train_pass_sample``: the training forward's detached logits are the first sample
      (β − 1 passes). It is a draw from the sample distribution only where the passes normalise
      with batch statistics like the training forward (``"batch"``, ``"update"``).
    * ``per_forward``: passes per batched forward (BatchNorm batch statistics per original
      batch, see ``uce_fast.mc_sample``).
    """

    shared_prefix: bool = False
    train_pass_sample: bool = False
    per_forward: int = 1

    def check(self, bn: str) -> None:
        """Raises ``ValueError`` where a lever would change the samples' distribution."""
        if self.train_pass_sample and bn == "running":
            raise ValueError(
                "the training pass is no MC sample with --sample-bn running: it normalises with "
                "batch statistics, the sample passes with running statistics; use --sample-bn "
                "batch (or update), or draw all β passes")
        if self.per_forward > 1 and bn == "update":
            raise ValueError(
                "--samples-per-forward > 1 with --sample-bn update: BatchNorm would normalise "
                "and update its running statistics with the statistics of the repeated batch "
                "rather than those of each pass")


@torch.no_grad()
def draw_mc_samples(model: nn.Module, images: Tensor, beta: int, *, bn: str = "running",
                    autocast: Callable[[], contextlib.AbstractContextManager]
                    = contextlib.nullcontext, size: tuple[int, int] | None = None,
                    keep_stack: bool = False, backend: str = "auto",
                    levers: SampleLevers = SampleLevers(), parts: ForwardParts | None = None,
                    ) -> tuple[uce_fast.MCAccumulator, Tensor | None]:
    """``beta`` stochastic (MC-dropout) samples, streamed into a ``uce_fast.MCAccumulator``.

    Runs without gradient, dropout on, BatchNorm per ``mc_dropout_mode(model, bn)``, through
    ``uce_fast.mc_sample`` with the ``levers`` (``parts``, the training forward's
    :class:`ForwardParts`, is needed for ``train_pass_sample`` and reused by ``shared_prefix``
    in ``"batch"`` mode). No stack of samples is built: each pass is folded into the accumulator
    (whose memory does not depend on ``beta``) and freed. With ``size`` the passes stop before
    the model's final ×4 upsampling and the accumulator upsamples to ``size`` inside its kernels,
    with the head's ``align_corners=True``, so no full-resolution sample exists at all. With
    ``keep_stack`` the samples are also returned stacked, (β, B, C, h, w) in the logits' dtype
    (the autocast dtype under AMP) — for the parity check, which needs them.

    Returns ``(accumulator, stack or None)``.
    """
    levers.check(bn)
    low_res = size is not None
    first = None
    if levers.train_pass_sample:
        if parts is None:
            raise ValueError("train_pass_sample needs the training forward's parts")
        first = (parts.low_res_logits if low_res else parts.logits).detach()
    inputs, prefix = images, None
    if levers.shared_prefix:
        if bn == "batch" and parts is not None:
            inputs = parts.prefix.detach()  # the same batch statistics: the same values
        else:
            prefix = model.prefix
    stack: list[Tensor] = [] if first is None else [first.unsqueeze(0)]

    def forward(x: Tensor) -> Tensor:
        # x is the prefix's output with a shared prefix, else the images
        logits = (model.suffix(x, upsample=not low_res) if levers.shared_prefix
                  else model(x, upsample=not low_res))
        if keep_stack:
            stack.append(logits.view(-1, images.shape[0], *logits.shape[1:]))
        return logits

    # mc_sample enters uce_fast.mc_dropout for an nn.Module; in "update" mode BatchNorm must keep
    # updating its running statistics (mc_dropout_mode skips mc_dropout there), so mc_sample gets
    # the model as a plain callable.
    target = model if bn != "update" else (lambda x: model(x))
    with mc_dropout_mode(model, bn), autocast():
        acc = uce_fast.mc_sample(target, inputs, beta, per_forward=levers.per_forward,
                                 size=size, align_corners=True, backend=backend, forward=forward,
                                 prefix=prefix, first_sample=first)
    return acc, torch.cat(stack) if keep_stack else None


@torch.no_grad()
def init_batchnorm_statistics(model: nn.Module, batches: Iterable[Tensor], *,
                              autocast: Callable[[], contextlib.AbstractContextManager]
                              = contextlib.nullcontext) -> tuple[int, int]:
    """Set the running statistics of untouched BatchNorm layers from ``batches``.

    The MC sample passes run BatchNorm in eval mode, i.e. on its running statistics. A freshly
    initialised layer has mean 0 and variance 1 there, which for the first steps of a run from
    scratch makes the samples, sigma and hence the U-CE weights meaningless (and large enough to
    wreck the run). This sets the statistics of every layer still at that initial state to the
    exact average over ``batches`` (forward passes in train mode, no gradient, no parameter
    change); layers with statistics (e.g. from ImageNet weights) are left alone and run in eval
    mode meanwhile. Training itself is unchanged: its forward passes use batch statistics.

    Returns ``(layers initialised, batches used)``.
    """
    fresh = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.running_mean is not None and int(m.num_batches_tracked) == 0
             and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]
    if not fresh:
        return 0, 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in fresh]
    model.train()
    fresh_ids = {id(m) for m in fresh}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in fresh_ids:
            m.eval()
    for m in fresh:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    used = 0
    try:
        with autocast():
            for images in batches:
                model(images)
                used += 1
    finally:
        for m, momentum in zip(fresh, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    return len(fresh), used


def default_check_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the parity check for logits of ``dtype``.

    Both backends compute in float32 from the same inputs, so float32 results differ by rounding
    only (~1e-6); low-precision gradients may differ by one rounding of their own dtype.
    """
    return {torch.float16: 4e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-4)


@dataclass
class ParityResult:
    loss: float
    loss_ref: float
    loss_abs: float
    loss_rel: float
    grad_abs: float
    grad_rel: float
    tol: float
    dtype: str
    ok: bool
    ties: int = 0
    flips: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return (f"loss {self.loss:.8g} vs reference {self.loss_ref:.8g} (abs {self.loss_abs:.3g}, "
                f"rel {self.loss_rel:.3g}); logits gradient max abs diff {self.grad_abs:.3g}, "
                f"rel {self.grad_rel:.3g} (of max |grad|); tolerance {self.tol:g} ({self.dtype}); "
                f"{self.ties} near-tie pixels, {self.flips} decided for another class than the "
                f"float64 first maximum")


def parity_check(loss: Tensor, logits: Tensor, logits_grad: Tensor, target: Tensor,
                 samples: Tensor, *, alpha: float, ignore_index: int, grad_scale: float = 1.0,
                 tol: float | None = None, ood_index: int | None = None,
                 ood_weight: float | None = None) -> ParityResult:
    """Compare U-CE and its logits gradient with the float64 oracle (``uce_fast.testing``).

    ``loss`` and ``logits_grad`` are what the training step got from the configured backend;
    ``samples`` is the stack of the passes (low-resolution ones are resampled as the model's head
    does, ``align_corners=True``). ``logits_grad`` is the gradient of ``loss * grad_scale`` (the
    GradScaler's scale, 1 without one), so the oracle's gradient is taken of the scaled loss too.
    Where the two largest mean probabilities of a pixel are within float32 rounding of each
    other, either class is a correct float32 answer: the oracle takes the one the backend's
    gradient matches there, and the result counts those pixels. The gradient difference is
    relative to max |reference|. ``ood_index``/``ood_weight``: the entropy-maximisation term of
    the loss, if any.
    """
    ref = uce_oracle(logits, target, samples, got_grad=logits_grad, grad_output=grad_scale,
                     alpha=alpha, ignore_index=ignore_index, align_corners=True,
                     ood_index=ood_index, ood_weight=ood_weight)
    tol = default_check_tolerance(logits.dtype) if tol is None else tol
    value, ref_value = float(loss.detach()), float(ref.loss)
    loss_abs = abs(value - ref_value)
    loss_rel = loss_abs / max(abs(ref_value), 1e-30)
    diff = (logits_grad.double() - ref.grad).abs()
    grad_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.grad.abs().max()) if diff.numel() else 0.0
    grad_rel = grad_abs / scale if scale > 0 else grad_abs
    if grad_scale != 1.0:
        grad_abs /= grad_scale
    ok = (math.isfinite(value) and math.isfinite(grad_rel) and loss_rel <= tol
          and grad_rel <= tol)
    return ParityResult(value, ref_value, loss_abs, loss_rel, grad_abs, grad_rel, tol,
                        str(logits.dtype).replace("torch.", ""), ok, ref.ties, ref.flips)


def compute_loss(kind: str, criterion: nn.Module | None, logits: Tensor, target: Tensor,
                 samples: uce_fast.MCAccumulator | Tensor | None, ignore_index: int,
                 alpha: float | None = None, *, ood_index: int | None = None,
                 ood_weight: float | None = None, backend: str = "auto") -> Tensor:
    """CE (``F.cross_entropy`` in float32, as ``nn.CrossEntropyLoss``) or U-CE (``criterion``),
    each with entropy maximisation at the pixels labelled ``ood_index`` when it is given.

    ``alpha`` overrides U-CE's exponent for this step (the ``--alpha-warmup`` ramp). With an
    exponent of 0 every weight is 1 and the loss is CE: no samples are needed (``samples`` may
    then be None). CE with entropy maximisation is ``uce_fast.uce_loss`` with α = 0 (weighted
    ``ood_weight`` against ``1 - ood_weight``, as the criterion's own term); ``backend`` runs it.
    """
    if kind != "ce":
        assert criterion is not None
        if alpha is not None:
            criterion.alpha = alpha
        if samples is not None:
            return criterion(logits, target, samples)
        if criterion.alpha != 0:
            raise ValueError("U-CE with a non-zero exponent needs the MC samples")
    if ood_index is None:
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return uce_fast.uce_loss(logits, target, alpha=0.0, ignore_index=ignore_index,
                             ood_index=ood_index, ood_weight=ood_weight, backend=backend)


def _one_pass_probs(model: nn.Module, images: Tensor,
                    autocast: Callable[[], contextlib.AbstractContextManager]) -> Tensor:
    """Softmax (B, C, H, W) float32 of one deterministic pass: eval mode, dropout off."""
    was_training = model.training
    model.eval()
    try:
        with autocast():
            logits = model(images)
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1)


def _mc_statistics(model: nn.Module, images: Tensor, mc_samples: int,
                   autocast: Callable[[], contextlib.AbstractContextManager]
                   ) -> uce_fast.MCStats:
    """``uce_fast.mc_stats`` of ``mc_samples`` MC-dropout passes (BatchNorm in eval mode)."""
    acc, _ = draw_mc_samples(model, images, mc_samples, autocast=autocast,
                             levers=SampleLevers(shared_prefix=True))
    return uce_fast.mc_stats(acc)


def _rng_fork(device: torch.device, seed: int):
    """A forked RNG seeded with ``seed``: evaluation's dropout masks neither depend on nor
    disturb the training RNG."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    fork = torch.random.fork_rng(devices=cuda, device_type=device.type if cuda else "cuda")

    @contextlib.contextmanager
    def seeded():
        with fork:
            torch.manual_seed(seed)
            yield

    return seeded()


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, num_classes: int, *,
             device: torch.device, mc_samples: int = 0, ignore_index: int = 255,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             seed: int = 0, on_batch: Callable[..., None] | None = None) -> dict[str, object]:
    """Metrics over this rank's share of ``loader``, summed over all ranks.

    With ``mc_samples >= 2`` the predictive distribution is the mean softmax of that many
    MC-dropout passes (BatchNorm in eval mode), the prediction its argmax, sigma U-CE's
    predictive uncertainty and the mutual information BALD's (``uce_fast.mc_stats`` of an
    accumulator); otherwise it is the softmax of one deterministic pass in eval mode (no sigma,
    no mutual information).
    Dropout masks come from a forked RNG seeded with ``seed``, so evaluation neither depends on
    nor disturbs the training RNG. ``on_batch(images, labels, pred, uncertainty)`` is called for
    each batch (for panels).
    """
    metrics = SegmentationMetrics(num_classes, ignore_index, device=device)
    with _rng_fork(device, seed):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if mc_samples >= 2:
                stats = _mc_statistics(model, images, mc_samples, autocast)
                pred, sigma, probs = stats.pred, stats.sigma, stats.mean_probs
                mutual_info = stats.mutual_info
                conf = probs.gather(1, pred.unsqueeze(1)).squeeze(1)
                uncertainty = sigma
            else:
                probs = _one_pass_probs(model, images, autocast)
                conf, pred = probs.max(dim=1)
                sigma = mutual_info = None
                uncertainty = 1.0 - conf
            metrics.update(pred, labels, conf, sigma, probs=probs, mutual_info=mutual_info)
            del probs
            if on_batch is not None:
                on_batch(images, labels, pred, uncertainty)
    metrics.all_reduce()
    return metrics.compute()


#: Anomaly scores (higher = more anomalous): name -> what it is. The first two come from one
#: deterministic pass, the others from the MC-dropout passes (``uce_fast.mc_stats``).
ANOMALY_SCORES = {
    "msp": "1 - max softmax, one pass",
    "entropy": "softmax entropy, one pass",
    "mc_msp": "1 - max mean softmax, MC dropout",
    "mc_entropy": "entropy of the mean softmax, MC dropout",
    "mc_mi": "mutual information, MC dropout",
    "mc_sigma": "sigma (U-CE's), MC dropout",
}
#: The bound of MC sigma's histogram: the largest standard deviation (correction 1) of values in
#: [0, 1] over β >= 2 samples is sqrt(β / (4 (β - 1))) <= 0.7072.
_SIGMA_MAX = 0.75


def anomaly_score_ranges(num_classes: int, mc: bool) -> dict[str, tuple[float, float]]:
    """The value range of each anomaly score (its histogram's bins span it): [0, 1] for
    1 − max softmax, [0, ln C] for entropies and the mutual information, [0, 0.75] for sigma;
    without MC dropout only the one-pass scores."""
    log_c = math.log(num_classes)
    ranges = {"msp": (0.0, 1.0), "entropy": (0.0, log_c)}
    if mc:
        ranges.update(mc_msp=(0.0, 1.0), mc_entropy=(0.0, log_c), mc_mi=(0.0, log_c),
                      mc_sigma=(0.0, _SIGMA_MAX))
    return ranges


@torch.no_grad()
def anomaly_scores(model: nn.Module, images: Tensor, *, mc_samples: int = 0,
                   autocast: Callable[[], contextlib.AbstractContextManager]
                   = contextlib.nullcontext) -> dict[str, Tensor]:
    """The :data:`ANOMALY_SCORES` of ``images`` (B, 3, H, W): name -> (B, H, W) float32; the MC
    ones only with ``mc_samples >= 2``."""
    probs = _one_pass_probs(model, images, autocast)
    scores = {"msp": 1.0 - probs.amax(dim=1),
              "entropy": torch.special.entr(probs).sum(dim=1)}
    del probs
    if mc_samples >= 2:
        stats = _mc_statistics(model, images, mc_samples, autocast)
        scores.update(mc_msp=1.0 - stats.mean_probs.amax(dim=1), mc_entropy=stats.entropy,
                      mc_mi=stats.mutual_info, mc_sigma=stats.sigma)
    return scores


@torch.no_grad()
def evaluate_anomalies(model: nn.Module, loader: torch.utils.data.DataLoader, num_classes: int,
                       *, device: torch.device, mc_samples: int = 0,
                       autocast: Callable[[], contextlib.AbstractContextManager]
                       = contextlib.nullcontext, seed: int = 0, keep: int = 0
                       ) -> tuple[dict[str, dict[str, object]], list[tuple[Tensor, ...]]]:
    """Anomaly-segmentation metrics (``train.anomaly_metrics``) of every score over this rank's
    share of ``loader`` (labels 1 anomaly, 0 known, 255 void), exact over all ranks.

    The component metrics' size thresholds are the benchmark's scaled to each image's area
    (``AnomalyMetrics``' default). The dropout masks come from a forked RNG seeded with ``seed``.
    Returns ``(metrics per score, panels)``: the first ``keep`` images of this rank as
    ``(image, gt, scores)`` on the CPU.
    """
    metrics = AnomalyMetrics(anomaly_score_ranges(num_classes, mc_samples >= 2))
    panels: list[tuple[Tensor, ...]] = []
    with _rng_fork(device, seed):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            scores = anomaly_scores(model, images, mc_samples=mc_samples, autocast=autocast)
            metrics.update(labels.cpu(), {k: v.cpu() for k, v in scores.items()})
            for i in range(min(keep - len(panels), images.shape[0])):
                panels.append((images[i].cpu(), labels[i].cpu(),
                               {k: v[i].cpu() for k, v in scores.items()}))
    return metrics.compute(), panels  # collective: also on a rank with no images
