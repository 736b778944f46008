"""Streaming segmentation metrics, exact under DDP: mIoU, ECE, mUnc and uncertainty AUROC.

Every statistic is a sum (confusion matrix, per-bin counts and sums, histograms), so shards of the
evaluation set can be accumulated on different ranks and added with ``all_reduce``; nothing is
approximated except the AUROC's ties within one histogram bin (4096 bins).

* mIoU: mean over classes with a non-empty union of TP / (TP + FP + FN), from the confusion
  matrix of the non-ignored pixels.
* ECE: torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")``:
  ``sum_b |acc_b - conf_b| * n_b / N`` over non-ignored pixels, with the confidence the maximum
  (mean) softmax probability, bins ``[k/15, (k+1)/15)`` and torchmetrics' extra bin for
  confidence exactly 1; computed from per-bin sums of correctness and confidence.
* mUnc: mean predictive uncertainty sigma (U-CE's MC-dropout sigma) over non-ignored pixels.
* AUROC: how well an uncertainty score ranks wrong pixels above correct ones,
  ``P(u_wrong > u_correct) + P(u_wrong = u_correct) / 2``, from histograms of the score for
  correct and wrong pixels. Reported for sigma (MC) and for ``1 - confidence``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SegmentationMetrics",
    "auroc_from_histograms",
    "calibration_bins",
]


def calibration_bins(confidence: Tensor, n_bins: int = 15) -> Tensor:
    """Bin index of each confidence as torchmetrics: ``bucketize(c, linspace(0, 1, n+1),
    right=True) - 1``; bins 0..n-1 are ``[k/n, (k+1)/n)``, bin n holds confidence 1."""
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype,
                                device=confidence.device)
    return (torch.bucketize(confidence, boundaries, right=True) - 1).clamp_(0, n_bins)


def auroc_from_histograms(positive: Tensor, negative: Tensor) -> float:
    """AUROC of a score from its histograms (same ascending bins) over positives and negatives.

    ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2``, where scores in the same bin count as equal.
    ``nan`` if either class is empty.
    """
    positive, negative = positive.double(), negative.double()
    n_pos, n_neg = float(positive.sum()), float(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = torch.cumsum(negative, 0) - negative
    return float((positive * (below + 0.5 * negative)).sum()) / (n_pos * n_neg)


class SegmentationMetrics:
    """Accumulates confusion matrix, calibration bins, sigma sums and uncertainty histograms."""

    def __init__(self, num_classes: int, ignore_index: int = 255, ece_bins: int = 15,
                 score_bins: int = 4096, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ece_bins = ece_bins
        self.score_bins = score_bins
        f64 = dict(dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.cal_count = torch.zeros(ece_bins + 1, **f64)
        self.cal_conf = torch.zeros(ece_bins + 1, **f64)
        self.cal_correct = torch.zeros(ece_bins + 1, **f64)
        self.sigma_sum = torch.zeros((), **f64)
        self.sigma_count = torch.zeros((), **f64)
        # rows: (correct, wrong); scores in [0, 1]
        self.hist_sigma = torch.zeros(2, score_bins, **f64)
        self.hist_conf = torch.zeros(2, score_bins, **f64)

    def _tensors(self) -> list[Tensor]:
        return [self.confusion, self.cal_count, self.cal_conf, self.cal_correct, self.sigma_sum,
                self.sigma_count, self.hist_sigma, self.hist_conf]

    def _histogram(self, hist: Tensor, score: Tensor, wrong: Tensor) -> None:
        idx = (score.double() * self.score_bins).long().clamp_(0, self.score_bins - 1)
        hist.view(-1).index_add_(0, wrong.long() * self.score_bins + idx,
                                 torch.ones_like(idx, dtype=torch.float64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, confidence: Tensor,
               sigma: Tensor | None = None) -> None:
        """Add a batch: ``pred``/``target`` (B, H, W) int, ``confidence`` (B, H, W) the maximum
        (mean) softmax probability, ``sigma`` (B, H, W) the MC uncertainty or None."""
        valid = target != self.ignore_index
        p, t = pred[valid].long(), target[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(f"target labels outside [0, {self.num_classes}) and not ignored")
        conf = confidence[valid].float()
        correct = p == t
        c = self.num_classes
        self.confusion += torch.bincount(t * c + p, minlength=c * c)
        idx = calibration_bins(conf, self.ece_bins)
        self.cal_count.index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
        self.cal_conf.index_add_(0, idx, conf.double())
        self.cal_correct.index_add_(0, idx, correct.double())
        self._histogram(self.hist_conf, 1.0 - conf, ~correct)
        if sigma is not None:
            s = sigma[valid].float()
            self.sigma_sum += s.double().sum()
            self.sigma_count += s.numel()
            self._histogram(self.hist_sigma, s, ~correct)

    def all_reduce(self) -> None:
        """Sum the statistics over all ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in self._tensors():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, object]:
        c = self.num_classes
        cm = self.confusion.view(c, c).double().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        present = union > 0
        n = float(self.cal_count.sum())
        out: dict[str, object] = {
            "mIoU": float(iou[present].mean()) if bool(present.any()) else math.nan,
            "IoU": [None if math.isnan(v) else v for v in iou.tolist()],
            "aAcc": float(tp.sum() / cm.sum()) if float(cm.sum()) > 0 else math.nan,
            "ECE": float((self.cal_correct - self.cal_conf).abs().sum().cpu()) / n
            if n > 0 else math.nan,
            "AUROC_conf": auroc_from_histograms(self.hist_conf[1].cpu(), self.hist_conf[0].cpu()),
            "pixels": int(n),
        }
        if float(self.sigma_count) > 0:
            out["mUnc"] = float(self.sigma_sum / self.sigma_count)
            out["AUROC_sigma"] = auroc_from_histograms(self.hist_sigma[1].cpu(),
                                                       self.hist_sigma[0].cpu())
        else:
            out["mUnc"] = None
            out["AUROC_sigma"] = None
        return out
