"""Streaming segmentation metrics, exact under DDP: mIoU, calibration, proper scoring rules and
how well uncertainty ranks errors.

Every statistic is a sum (confusion matrix, per-bin counts and sums, histograms, sums of
per-pixel scores), so shards of the evaluation set can be accumulated on different ranks and
added with ``all_reduce``; the result equals that of one process up to the order of float64
additions. All metrics are over the non-ignored pixels. ``p`` is the predictive distribution:
the mean softmax of the MC-dropout passes with MC evaluation, the softmax of one deterministic
pass otherwise.

* mIoU: mean over classes with a non-empty union of TP / (TP + FP + FN), from the confusion
  matrix; ``IoU`` lists the per-class values (None where the union is empty).
* ECE: torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")``:
  ``sum_b |acc_b - conf_b| * n_b / N``, with the confidence ``max_c p_c``, bins
  ``[k/15, (k+1)/15)`` and torchmetrics' extra bin for confidence exactly 1.
* NLL: mean of ``-log max(p_y, 1e-12)`` (y the target class). The clamp keeps a probability
  that underflowed to 0 in float32 finite (at most 27.6 per pixel).
* Brier: mean of ``sum_c (p_c - [c = y])^2``, the multiclass Brier score, not divided by the
  number of classes (torch-uncertainty's ``BrierScore``); between 0 and 2.
* mUnc: mean predictive uncertainty sigma (U-CE's MC-dropout sigma).
* AUROC of an uncertainty score u for separating wrong from correct pixels:
  ``P(u_wrong > u_correct) + P(u_wrong = u_correct) / 2``. For sigma, ``1 - confidence`` and the
  mutual information (BALD, MC only).
* AURC of u (Geifman & El-Yaniv 2017): pixels sorted by u ascending (most certain first); the
  risk at k retained pixels is the error rate among them, E_k / k; AURC = (1/N) sum_k E_k / k,
  the area under the risk-coverage curve at coverages k/N. Lower is better. ``AURC_oracle``
  is the same for a perfect ranking (all errors last); AURC minus it is the excess AURC (E-AURC),
  which does not reward accuracy.

Ranking metrics are computed from histograms of u over correct and wrong pixels (8192 bins,
log-spaced over [1e-7, 10], everything below 1e-7 in the first bin): scores in one bin count
as tied. For the AUROC a tie counts 1/2; for the AURC the pixels of a bin are one block
retained in random order, i.e. E_k inside a block is the block's expected error count
(linear in the pixels taken), which is the expected AURC over random tie-breaking and equals
the sorted-list AURC when no two pixels share a bin. The log spacing resolves the small scores
where most pixels lie (adjacent bins differ by 0.23%).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "NLL_EPS",
    "SegmentationMetrics",
    "aurc_from_histograms",
    "auroc_from_histograms",
    "calibration_bins",
    "score_bins",
]

#: Probabilities are clamped at this value in the NLL.
NLL_EPS = 1e-12
_SCORE_LO, _SCORE_HI = 1e-7, 10.0


def calibration_bins(confidence: Tensor, n_bins: int = 15) -> Tensor:
    """Bin index of each confidence as torchmetrics: ``bucketize(c, linspace(0, 1, n+1),
    right=True) - 1``; bins 0..n-1 are ``[k/n, (k+1)/n)``, bin n holds confidence 1."""
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype,
                                device=confidence.device)
    return (torch.bucketize(confidence, boundaries, right=True) - 1).clamp_(0, n_bins)


def score_bins(score: Tensor, n_bins: int) -> Tensor:
    """Histogram bin of each uncertainty score: monotone in the score, log-spaced over
    [1e-7, 10] (bin 0 holds everything below 1e-7, the last bin everything above 10)."""
    s = score.double().clamp(min=_SCORE_LO, max=_SCORE_HI)
    t = torch.log(s / _SCORE_LO) / math.log(_SCORE_HI / _SCORE_LO)
    return (t * (n_bins - 1)).long().clamp_(0, n_bins - 1)


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


def _harmonic_difference(start: Tensor, count: Tensor) -> Tensor:
    """``H(start + count) - H(start)`` = sum_{j=1..count} 1 / (start + j), elementwise."""
    return torch.special.digamma(start + count + 1) - torch.special.digamma(start + 1)


def aurc_from_histograms(wrong: Tensor, correct: Tensor) -> float:
    """AURC of an uncertainty score from its histograms (ascending bins) over wrong and correct
    pixels: ``(1/N) sum_k E_k / k`` with the pixels retained most certain first, each bin one
    block in random order (its expected error count, linear in the pixels taken from it).

    A block of n pixels with w errors after K pixels with E errors contributes
    ``sum_{j=1..n} (E + w j / n) / (K + j) = (E - w K / n) (H(K + n) - H(K)) + w``.
    ``nan`` without pixels.
    """
    wrong, correct = wrong.double().cpu(), correct.double().cpu()
    count = wrong + correct
    total = float(count.sum())
    if total == 0:
        return math.nan
    keep = count > 0
    w, n = wrong[keep], count[keep]
    before = torch.cumsum(n, 0) - n  # K
    errors_before = torch.cumsum(w, 0) - w  # E
    block = (errors_before - w * before / n) * _harmonic_difference(before, n) + w
    return float(block.sum()) / total


def _oracle_aurc(errors: float, total: float) -> float:
    """AURC of a perfect ranking: the correct pixels first, then the errors."""
    if total == 0:
        return math.nan
    correct = torch.tensor([total - errors], dtype=torch.float64)
    return aurc_from_histograms(torch.tensor([0.0, errors], dtype=torch.float64),
                                torch.cat([correct, torch.zeros(1, dtype=torch.float64)]))


class SegmentationMetrics:
    """Accumulates the confusion matrix, calibration bins, score sums and uncertainty
    histograms of segmentation predictions; ``compute`` turns them into the metrics."""

    #: Histogrammed uncertainty scores: sigma, 1 - confidence, mutual information.
    SCORES = ("sigma", "conf", "MI")

    def __init__(self, num_classes: int, ignore_index: int = 255, ece_bins: int = 15,
                 score_bins: int = 8192, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ece_bins = ece_bins
        self.score_bins = score_bins
        f64 = dict(dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.cal_count = torch.zeros(ece_bins + 1, **f64)
        self.cal_conf = torch.zeros(ece_bins + 1, **f64)
        self.cal_correct = torch.zeros(ece_bins + 1, **f64)
        # sums: sigma, sigma count, NLL, Brier, probability pixels
        self.sums = torch.zeros(5, **f64)
        # per score, rows (correct, wrong)
        self.hist = torch.zeros(len(self.SCORES), 2, score_bins, **f64)

    def _tensors(self) -> list[Tensor]:
        return [self.confusion, self.cal_count, self.cal_conf, self.cal_correct, self.sums,
                self.hist]

    def _histogram(self, which: str, score: Tensor, wrong: Tensor) -> None:
        hist = self.hist[self.SCORES.index(which)]
        idx = score_bins(score, self.score_bins)
        hist.view(-1).index_add_(0, wrong.long() * self.score_bins + idx,
                                 torch.ones_like(idx, dtype=torch.float64))

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, confidence: Tensor,
               sigma: Tensor | None = None, *, probs: Tensor | None = None,
               mutual_info: Tensor | None = None) -> None:
        """Add a batch: ``pred``/``target`` (B, H, W) int, ``confidence`` (B, H, W) the maximum
        predictive probability, ``sigma`` (B, H, W) the MC uncertainty or None, ``probs``
        (B, C, H, W) the predictive distribution (for NLL and Brier) or None, ``mutual_info``
        (B, H, W) the MC mutual information or None."""
        valid = target != self.ignore_index
        p, t = pred[valid].long(), target[valid].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(f"target labels outside [0, {self.num_classes}) and not ignored")
        conf = confidence[valid].float()
        correct = p == t
        wrong = ~correct
        c = self.num_classes
        self.confusion += torch.bincount(t * c + p, minlength=c * c)
        idx = calibration_bins(conf, self.ece_bins)
        self.cal_count.index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
        self.cal_conf.index_add_(0, idx, conf.double())
        self.cal_correct.index_add_(0, idx, correct.double())
        self._histogram("conf", 1.0 - conf, wrong)
        if sigma is not None:
            s = sigma[valid].float()
            self.sums[0] += s.double().sum()
            self.sums[1] += s.numel()
            self._histogram("sigma", s, wrong)
        if mutual_info is not None:
            self._histogram("MI", mutual_info[valid].float(), wrong)
        if probs is not None:
            if probs.shape[1] != c or probs.shape[0] != target.shape[0] \
                    or probs.shape[2:] != target.shape[1:]:
                raise ValueError(f"probs of shape {tuple(probs.shape)} do not match "
                                 f"{c} classes and targets {tuple(target.shape)}")
            safe = torch.where(valid, target, 0).long().unsqueeze(1)
            p_true = probs.gather(1, safe).squeeze(1)[valid].double()
            squares = probs.float().pow(2).sum(1)[valid].double()
            self.sums[2] += -torch.log(p_true.clamp(min=NLL_EPS)).sum()
            self.sums[3] += (squares - 2.0 * p_true + 1.0).sum()
            self.sums[4] += p_true.numel()

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
        sums = self.sums.cpu()
        hist = self.hist.cpu()
        errors = float(cm.sum() - tp.sum())
        out: dict[str, object] = {
            "mIoU": float(iou[present].mean()) if bool(present.any()) else math.nan,
            "IoU": [None if math.isnan(v) else v for v in iou.tolist()],
            "aAcc": float(tp.sum() / cm.sum()) if float(cm.sum()) > 0 else math.nan,
            "ECE": float((self.cal_correct - self.cal_conf).abs().sum().cpu()) / n
            if n > 0 else math.nan,
            "NLL": float(sums[2] / sums[4]) if float(sums[4]) > 0 else None,
            "Brier": float(sums[3] / sums[4]) if float(sums[4]) > 0 else None,
            "pixels": int(n),
            "AURC_oracle": _oracle_aurc(errors, n),
        }
        have = {"sigma": float(sums[1]) > 0, "conf": n > 0, "MI": bool(hist[2].sum() > 0)}
        for k, name in enumerate(self.SCORES):
            if have[name]:
                out[f"AUROC_{name}"] = auroc_from_histograms(hist[k, 1], hist[k, 0])
                out[f"AURC_{name}"] = aurc_from_histograms(hist[k, 1], hist[k, 0])
            else:
                out[f"AUROC_{name}"] = None
                out[f"AURC_{name}"] = None
        out["mUnc"] = float(sums[0] / sums[1]) if have["sigma"] else None
        return out
