"""``UCELoss``: the ``nn.Module`` form of :func:`uce_fast.functional.uce_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from uce_fast.accumulator import MCAccumulator
from uce_fast.functional import uce_loss

__all__ = ["UCELoss"]


class UCELoss(nn.Module):
    """Uncertainty-aware cross-entropy, a drop-in for ``nn.CrossEntropyLoss`` plus MC samples.

    Options are those of :func:`uce_fast.uce_loss` (``alpha=10``, ``ignore_index=-100``,
    ``reduction="mean"``, ``weight=None``, ``label_smoothing=0``, ``avg_non_ignore=True``,
    ``correction=1``, ``backend="auto"``, ``align_corners=None``, ``check_labels=True``,
    ``ood_index=None``, ``ood_weight=None``: entropy maximisation at pixels labelled
    ``ood_index``, weighted λ = ``ood_weight`` (0.9 when only ``ood_index`` is given) against
    1 - λ for the known pixels). ``weight`` is kept as a buffer, so ``.to(device)`` moves it with
    the module.

    ``forward(input, target, samples=None, *, sigma=None)``: ``input`` (B, C, *spatial) logits,
    ``target`` (B, *spatial) int64, and exactly one of ``samples`` — a stack (β, B, C, *spatial),
    a low-resolution stack (β, B, C, h, w) upsampled inside the kernels, or an
    :class:`~uce_fast.MCAccumulator` — or ``sigma`` (B, *spatial); neither with ``alpha=0``.
    Returns the float32 loss
    (scalar, or (B, *spatial) with ``reduction="none"``).
    """

    weight: Tensor | None

    def __init__(
        self,
        alpha: float = 10.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        avg_non_ignore: bool = True,
        correction: int = 1,
        backend: str = "auto",
        align_corners: bool | None = None,
        check_labels: bool = True,
        ood_index: int | None = None,
        ood_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing
        self.avg_non_ignore = avg_non_ignore
        self.correction = correction
        self.backend = backend
        self.align_corners = align_corners
        self.check_labels = check_labels
        self.ood_index = ood_index
        self.ood_weight = ood_weight

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        samples: Tensor | MCAccumulator | None = None,
        *,
        sigma: Tensor | None = None,
    ) -> Tensor:
        return uce_loss(
            input,
            target,
            samples,
            sigma=sigma,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
            avg_non_ignore=self.avg_non_ignore,
            correction=self.correction,
            backend=self.backend,
            align_corners=self.align_corners,
            check_labels=self.check_labels,
            ood_index=self.ood_index,
            ood_weight=self.ood_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"avg_non_ignore={self.avg_non_ignore}, backend={self.backend!r}"
            + ("" if self.ood_index is None else
               f", ood_index={self.ood_index}, ood_weight={self.ood_weight}")
        )
