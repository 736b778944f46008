"""Anomaly-segmentation metrics at the pixel and the component level, exact under DDP.

The ground truth of an anomaly image is 1 (anomaly), 0 (known, in-distribution) or 255 (void)
per pixel; void pixels are left out of every metric. A method gives each pixel an anomaly score
(higher = more anomalous: ``1 - max softmax``, an entropy, the mutual information, the
MC-dropout sigma, ...). The definitions are those of the SegmentMeIfYouCan benchmark code
(github.com/SegmentMeIfYouCan/road-anomaly-benchmark, ``road_anomaly_benchmark/metrics``:
``pixel_classification.py``, ``pixel_classification_curves.py`` for the pixel level,
``instance_segmentation.py`` for the component level), which is the reference definition.

Pixel level. Lowering a threshold from high to low gives, at each threshold, the anomaly pixels
at or above it (TP), the known pixels at or above it (FP) and the anomaly pixels below it (FN).

* AP (AUPRC): ``sum_k (R_k - R_{k-1}) P_k`` over the thresholds from high to low, with recall
  ``R = TP / #anomaly`` and precision ``P = TP / (TP + FP)`` (1 while nothing is predicted);
  scikit-learn's ``average_precision_score`` convention, not the trapezoid.
* AUROC: the trapezoid under the ROC curve (FPR, TPR), ``FPR = FP / #known``, ``TPR = R``;
  a tie between an anomaly and a known pixel counts 1/2.
* FPR95: the FPR at the first threshold (from high to low) where TPR >= 0.95.
* best_F1: the maximum over the thresholds of the pixel F1 ``2 TP / (2 TP + FP + FN)``;
  ``threshold`` is where it is reached (the highest such threshold if several).

Component level, at the pixel-level best-F1 threshold of the same score, per image:

* The prediction is the pixels at or above the threshold, never a void pixel. The ground-truth
  components are the connected components of the anomaly pixels, the predicted components those
  of the prediction, both with 8-connectivity (a 3x3 structure).
* Predicted components of fewer than ``min_segment`` pixels are removed; ground-truth components
  of fewer than ``min_instance`` pixels become void. Predicted components are found (and their
  size for ``min_segment`` is counted) before that; everything below counts only the pixels
  that are not void afterwards (a predicted component with no such pixel does not count).
* sIoU of a ground-truth component G, with P the union of the predicted components that
  intersect G and A the anomaly pixels of the other ground-truth components:
  ``|G ∩ P| / |(G ∪ P) \\ A|`` (the benchmark's ``adjusted_union``; 0 if no predicted component
  touches G). ``sIoU_gt`` is its mean over all ground-truth components of all images.
* PPV (precision) of a predicted component P': ``|P' ∩ anomaly| / |P'|``; ``PPV`` is its mean
  over all predicted components (the benchmark's ``prec_pred``).
* For each tau in ``SIOU_THRESHOLDS`` = linspace(0.25, 0.75, 11): TP = ground-truth components
  with sIoU >= tau, FN = those with sIoU < tau, FP = predicted components with PPV < tau, summed
  over the images; ``F1(tau) = 2 TP / (2 TP + FN + FP)``. Reported: ``F1_25``, ``F1_50``,
  ``F1_75`` and ``F1_mean``, the mean over the 11 thresholds.

The benchmark's anomaly track uses ``min_segment`` = 500 and ``min_instance`` = 100 on
2048x1024 images; :func:`scaled_size_thresholds` scales them by the image area (8 and 2 for
128x256 images), which is the default per image.

Scores are histogrammed in ``num_bins`` uniform bins over a fixed range [lo, hi] per score:
bin k is ``[lo + k w, lo + (k + 1) w)`` with ``w = (hi - lo) / num_bins``, the last bin also
holds ``hi``, and values outside the range are clamped into the first or the last bin. Pixels
in one bin are tied: the thresholds are the bin edges, a pixel is predicted anomalous at
threshold bin t iff its bin index is >= t, and the reported ``threshold`` is the lower edge
``lo + t w`` of that bin. The pixel metrics are exact (as a sorted list of scores would give
them) for scores that are constant within each bin, e.g. at the bin centres.

Pixel statistics are histograms and component statistics are sums (of sIoU, PPV and counts),
so shards of the evaluation set on different ranks are added with ``all_reduce``; the result
equals that of one process over all images, up to the order of float64 additions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage
from torch import Tensor

__all__ = [
    "ANOMALY",
    "BENCHMARK_MIN_INSTANCE",
    "BENCHMARK_MIN_SEGMENT",
    "KNOWN",
    "SIOU_THRESHOLDS",
    "VOID",
    "AnomalyMetrics",
    "component_scores",
    "pixel_metrics_from_histograms",
    "scaled_size_thresholds",
    "uniform_bins",
]

#: The sIoU / PPV thresholds tau of the component F1 (the benchmark's ``thresh_sIoU``).
SIOU_THRESHOLDS = np.linspace(0.25, 0.75, 11)
#: The benchmark's anomaly-track size thresholds and the image area they are meant for.
BENCHMARK_MIN_SEGMENT, BENCHMARK_MIN_INSTANCE = 500, 100
_BENCHMARK_AREA = 2048 * 1024
#: Ground-truth values.
KNOWN, ANOMALY, VOID = 0, 1, 255
# Per score, the component sums: sum sIoU, #GT components, sum PPV, #predicted components,
# then TP and FP per tau (FN = #GT components - TP).
_N_TAU = len(SIOU_THRESHOLDS)
_N_SUMS = 4 + 2 * _N_TAU


def scaled_size_thresholds(height: int, width: int) -> tuple[int, int]:
    """``(min_segment, min_instance)`` for ``height`` x ``width`` images: the benchmark's 500 and
    100 pixels (for 2048x1024) times the area ratio, rounded to the nearest integer (halves up)
    and at least 1. (8, 2) for 128x256."""
    ratio = height * width / _BENCHMARK_AREA
    return (max(1, math.floor(BENCHMARK_MIN_SEGMENT * ratio + 0.5)),
            max(1, math.floor(BENCHMARK_MIN_INSTANCE * ratio + 0.5)))


def uniform_bins(score: Tensor, lo: float, hi: float, num_bins: int) -> Tensor:
    """Bin index (int64, the shape of ``score``) of each score in ``num_bins`` uniform bins over
    [lo, hi]: ``floor((s - lo) / (hi - lo) * num_bins)`` in float64, values outside the range
    clamped into bin 0 or ``num_bins - 1`` (``hi`` itself is in the last bin). NaN is not
    checked here."""
    s = score.double().clamp(min=lo, max=hi)
    return ((s - lo) * (num_bins / (hi - lo))).floor_().long().clamp_(0, num_bins - 1)


def pixel_metrics_from_histograms(anomaly: Tensor | np.ndarray, known: Tensor | np.ndarray
                                  ) -> dict[str, float | int | None]:
    """Pixel-level AP, AUROC, FPR95 and best F1 of a score from its histograms over anomaly and
    known pixels (1-D, the same ascending bins; a pixel is predicted at threshold bin t iff its
    bin is >= t).

    Returns ``AP``, ``AUROC``, ``FPR95``, ``best_F1`` (floats, ``nan`` where undefined: all
    without anomaly pixels, AUROC and FPR95 also without known pixels) and ``threshold_bin``,
    the bin t of the best F1 (the highest if several), None without anomaly pixels.
    """
    pos = np.asarray(torch.as_tensor(anomaly).double().cpu())[::-1]
    neg = np.asarray(torch.as_tensor(known).double().cpu())[::-1]
    num_bins = pos.shape[0]
    # Point k predicts the top k bins, i.e. threshold bin num_bins - k; point 0 predicts nothing.
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(neg)])
    n_pos, n_neg = tp[-1], fp[-1]
    out: dict[str, float | int | None] = {
        "AP": math.nan, "AUROC": math.nan, "FPR95": math.nan, "best_F1": math.nan,
        "threshold_bin": None,
    }
    if n_pos == 0:
        return out
    recall = tp / n_pos
    predicted = tp + fp
    precision = np.ones_like(tp)
    np.divide(tp, predicted, out=precision, where=predicted > 0)
    out["AP"] = float(np.sum(np.diff(recall) * precision[1:]))
    f1 = 2.0 * tp / (2.0 * tp + fp + (n_pos - tp))  # denominator >= n_pos > 0
    best = int(np.argmax(f1))  # first maximum: the highest threshold; >= 1 as f1[0] = 0
    out["best_F1"] = float(f1[best])
    out["threshold_bin"] = num_bins - best
    if n_neg > 0:
        fpr = fp / n_neg
        out["AUROC"] = float(np.sum(np.diff(fpr) * (recall[1:] + recall[:-1])) / 2.0)
        out["FPR95"] = float(fpr[int(np.argmax(recall >= 0.95))])
    return out


def _structure(ndim: int) -> np.ndarray:
    """8-connectivity within each image of an (..., H, W) array, none across images."""
    structure = np.zeros((3,) * ndim, dtype=bool)
    structure[(1,) * (ndim - 2)] = True
    return structure


class _GroundTruthComponents(NamedTuple):
    """The ground-truth components of a batch (..., H, W), flattened."""

    labels: np.ndarray  # int64 component id per pixel (0 = none), unique over the batch
    roi: np.ndarray  # bool: not void and not in a component of fewer than min_instance pixels
    area: np.ndarray  # (n + 1,) int64 pixels of each component in the roi (0 if voided)
    not_void: np.ndarray  # bool: gt != 255 (where a prediction may be)


def _ground_truth_components(gt: np.ndarray, min_instance: int) -> _GroundTruthComponents:
    labels, n = ndimage.label(gt == ANOMALY, structure=_structure(gt.ndim))
    labels = labels.ravel().astype(np.int64)
    area = np.bincount(labels, minlength=n + 1)
    small = area < min_instance
    small[0] = False  # the background is not a component
    area[small] = 0
    not_void = gt.ravel() != VOID
    return _GroundTruthComponents(labels, not_void & ~small[labels], area, not_void)


def _component_scores(truth: _GroundTruthComponents, predicted: np.ndarray,
                      min_segment: int) -> tuple[np.ndarray, np.ndarray]:
    """sIoU of each ground-truth and PPV of each predicted component (see the module doc);
    ``predicted`` bool (..., H, W)."""
    labels, n_pred = ndimage.label(predicted & truth.not_void.reshape(predicted.shape),
                                   structure=_structure(predicted.ndim))
    where = np.flatnonzero(labels)  # only the predicted pixels are visited from here
    p = labels.ravel()[where].astype(np.int64)
    keep = np.bincount(p, minlength=n_pred + 1) >= min_segment
    counted = keep[p] & truth.roi[where]
    p, g = p[counted], truth.labels[where[counted]]
    pred_area = np.bincount(p, minlength=n_pred + 1)
    pred_on_known = np.bincount(p[g == 0], minlength=n_pred + 1)
    both = g > 0
    n_gt = truth.area.shape[0] - 1
    intersection = np.bincount(g[both], minlength=n_gt + 1)
    # (ground-truth, predicted) component pairs that touch
    pairs = np.unique(g[both] * (n_pred + 1) + p[both])
    pair_gt, pair_pred = np.divmod(pairs, n_pred + 1)
    # |(G ∪ P) \ A| = |G| + the known pixels of the predicted components touching G
    union = truth.area + np.bincount(pair_gt, weights=pred_on_known[pair_pred],
                                     minlength=n_gt + 1)
    gt_ids = np.flatnonzero(truth.area[1:]) + 1
    pred_ids = np.flatnonzero(pred_area[1:]) + 1
    siou = intersection[gt_ids] / union[gt_ids]
    ppv = (pred_area[pred_ids] - pred_on_known[pred_ids]) / pred_area[pred_ids]
    return siou.astype(np.float64), ppv.astype(np.float64)


def component_scores(gt: np.ndarray, predicted: np.ndarray, min_segment: int,
                     min_instance: int) -> tuple[np.ndarray, np.ndarray]:
    """Component statistics of a prediction (see the module doc for the definitions).

    ``gt`` (H, W) or (B, H, W) with values 0 / 1 / 255, ``predicted`` bool of the same shape
    (the pixels at or above the threshold; void pixels are dropped here). Returns the sIoU of
    each ground-truth component and the PPV of each predicted component that count, as 1-D
    float64 arrays (components of different images never merge).
    """
    gt = np.asarray(gt)
    predicted = np.asarray(predicted, dtype=bool)
    if gt.ndim < 2 or predicted.shape != gt.shape:
        raise ValueError(f"gt {gt.shape} and predicted {predicted.shape} must be the same "
                         "(H, W) or (B, H, W) shape")
    return _component_scores(_ground_truth_components(gt, min_instance), predicted, min_segment)


def _component_sums(siou: np.ndarray, ppv: np.ndarray) -> np.ndarray:
    """The additive component statistics (``_N_SUMS`` float64 values) of a batch."""
    tp = (siou[:, None] >= SIOU_THRESHOLDS[None, :]).sum(0)
    fp = (ppv[:, None] < SIOU_THRESHOLDS[None, :]).sum(0)
    return np.concatenate([[siou.sum(), siou.size, ppv.sum(), ppv.size], tp, fp]).astype(
        np.float64)


class AnomalyMetrics:
    """Accumulates pixel histograms of anomaly scores and keeps each image's ground truth and
    binned scores; ``compute`` gives the pixel- and component-level metrics of every score.

    Args:
        score_ranges: score name -> (lo, hi), the finite range of its ``num_bins`` uniform bins
            (values outside are clamped into the first or the last bin). E.g. [0, 1] for
            ``1 - max softmax``, [0, log C] for an entropy over C classes.
        num_bins: bins per score (default 65536). The threshold resolution is (hi - lo) /
            num_bins; pixels in one bin are tied.
        min_segment: predicted components of fewer pixels are removed; None (default) means
            the benchmark's 500 scaled to each image's area (:func:`scaled_size_thresholds`).
        min_instance: ground-truth components of fewer pixels become void; None (default)
            means the benchmark's 100 scaled to each image's area.
        device: where the histograms live (and are all-reduced: a CUDA device with NCCL).

    Memory: besides the histograms (2 x num_bins int64 per score), every image is kept on the
    CPU for the component metrics, which need the dataset-wide threshold: 1 byte per pixel for
    the ground truth plus 2 bytes per pixel per score for the bin indices (4 bytes if
    ``num_bins`` > 65536), e.g. 256 images of 128x256 with 6 scores take 109 MB.
    """

    def __init__(self, score_ranges: Mapping[str, tuple[float, float]], *,
                 num_bins: int = 65536, min_segment: int | None = None,
                 min_instance: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not score_ranges:
            raise ValueError("score_ranges must name at least one score")
        ranges: dict[str, tuple[float, float]] = {}
        for name, bounds in score_ranges.items():
            lo, hi = (float(v) for v in bounds)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"score_ranges[{name!r}] = {bounds!r}: need finite lo < hi")
            ranges[name] = (lo, hi)
        if not 1 <= num_bins <= 2**31 - 1:
            raise ValueError(f"num_bins must be in [1, 2**31), got {num_bins}")
        for arg, value in (("min_segment", min_segment), ("min_instance", min_instance)):
            if value is not None and value < 0:
                raise ValueError(f"{arg} must be >= 0 or None, got {value}")
        self.score_ranges = ranges
        self.names = tuple(ranges)
        self.num_bins = num_bins
        self.min_segment = min_segment
        self.min_instance = min_instance
        self.device = torch.device(device)
        # per score, rows (known, anomaly)
        self.hist = torch.zeros(len(self.names), 2, num_bins, dtype=torch.int64,
                                device=self.device)
        self._bin_dtype = np.uint16 if num_bins <= 2**16 else np.int32
        self._gt: list[np.ndarray] = []  # (B, H, W) uint8 per update
        self._bins: dict[str, list[np.ndarray]] = {name: [] for name in self.names}

    def _size_thresholds(self, height: int, width: int) -> tuple[int, int]:
        min_segment, min_instance = scaled_size_thresholds(height, width)
        return (min_segment if self.min_segment is None else self.min_segment,
                min_instance if self.min_instance is None else self.min_instance)

    def threshold_value(self, name: str, threshold_bin: int) -> float:
        """The lower edge of bin ``threshold_bin`` of score ``name``, in score units."""
        lo, hi = self.score_ranges[name]
        return lo + threshold_bin * (hi - lo) / self.num_bins

    @torch.no_grad()
    def update(self, gt: Tensor, scores: Mapping[str, Tensor]) -> None:
        """Add a batch: ``gt`` (B, H, W) integer, 0 known / 1 anomaly / 255 void; ``scores``
        score name -> (B, H, W) float anomaly scores, exactly the names of ``score_ranges``.
        Scores of void pixels are not used (they may be NaN); NaN elsewhere is an error."""
        if not isinstance(gt, Tensor) or gt.dim() != 3:
            raise ValueError(f"gt must be a (B, H, W) tensor, got "
                             f"{tuple(gt.shape) if isinstance(gt, Tensor) else type(gt)}")
        if gt.dtype.is_floating_point or gt.dtype.is_complex:
            raise ValueError(f"gt must be an integer tensor, got {gt.dtype}")
        unknown = sorted(set(scores) - set(self.names))
        missing = sorted(set(self.names) - set(scores))
        if unknown or missing:
            raise ValueError(f"scores: unknown names {unknown}, missing names {missing}; "
                             f"expected {list(self.names)}")
        for name in self.names:
            score = scores[name]
            if not isinstance(score, Tensor) or score.shape != gt.shape:
                shape = tuple(score.shape) if isinstance(score, Tensor) else type(score)
                raise ValueError(f"scores[{name!r}] of shape {shape} does not match gt "
                                 f"{tuple(gt.shape)}")
        gt_cpu = gt.detach().cpu()
        legal = (gt_cpu == KNOWN) | (gt_cpu == ANOMALY) | (gt_cpu == VOID)
        if not bool(legal.all()):
            bad = torch.unique(gt_cpu[~legal])[:8].tolist()
            raise ValueError(f"gt values must be 0 (known), 1 (anomaly) or 255 (void), "
                             f"found {bad}")
        valids: dict[torch.device, tuple[Tensor, Tensor]] = {}
        bins: dict[str, Tensor] = {}
        for name in self.names:  # check every score before changing any state
            score = scores[name].detach()
            if score.device not in valids:
                g = gt_cpu.to(score.device)
                # histogram offset per pixel: 0 known, num_bins anomaly, 2 num_bins void
                valids[score.device] = (g != VOID, (g == ANOMALY).long() * self.num_bins
                                        + (g == VOID).long() * (2 * self.num_bins))
            valid, _ = valids[score.device]
            if bool(torch.isnan(score).logical_and_(valid).any()):
                raise ValueError(f"scores[{name!r}] has NaN at non-void pixels")
            lo, hi = self.score_ranges[name]
            bins[name] = torch.where(valid, uniform_bins(score, lo, hi, self.num_bins), 0)
        for k, name in enumerate(self.names):
            idx = bins[name]
            _, offset = valids[idx.device]
            counts = torch.bincount((offset + idx).view(-1), minlength=3 * self.num_bins)
            self.hist[k].view(-1).add_(counts[:2 * self.num_bins].to(self.device))
            self._bins[name].append(idx.cpu().numpy().astype(self._bin_dtype))
        self._gt.append(gt_cpu.numpy().astype(np.uint8))

    @staticmethod
    def _all_reduce(tensor: Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, dict[str, float | int | None]]:
        """The metrics of every score: ``AP``, ``AUROC``, ``FPR95``, ``best_F1`` (floats, nan
        where a class of pixels is missing), ``threshold`` (the best-F1 threshold in score
        units, None without anomaly pixels), ``sIoU_gt`` (None without ground-truth
        components), ``PPV`` (None without predicted components), ``F1_25``, ``F1_50``,
        ``F1_75``, ``F1_mean`` (None without components of either kind), ``components_gt``,
        ``components_pred`` (ints; None, like every component metric, without a threshold),
        ``pixels_anomaly``, ``pixels_known`` (ints).

        Collective under torch.distributed: every rank calls it and gets the same result, that
        of one process over all ranks' images. The accumulated state is not changed.
        """
        hist = self.hist.clone()
        self._all_reduce(hist)
        hist = hist.cpu()
        pixel = [pixel_metrics_from_histograms(hist[k, 1], hist[k, 0])
                 for k in range(len(self.names))]
        sums = np.zeros((len(self.names), _N_SUMS), dtype=np.float64)
        for i, gt in enumerate(self._gt):
            min_segment, min_instance = self._size_thresholds(*gt.shape[-2:])
            truth = _ground_truth_components(gt, min_instance)
            for k, name in enumerate(self.names):
                t = pixel[k]["threshold_bin"]
                if t is None:
                    continue
                predicted = self._bins[name][i] >= t
                siou, ppv = _component_scores(truth, predicted, min_segment)
                sums[k] += _component_sums(siou, ppv)
        reduced = torch.from_numpy(sums).to(self.device)
        self._all_reduce(reduced)
        sums = reduced.cpu().numpy()
        out: dict[str, dict[str, float | int | None]] = {}
        for k, name in enumerate(self.names):
            t = pixel[k]["threshold_bin"]
            result: dict[str, float | int | None] = {
                key: pixel[k][key] for key in ("AP", "AUROC", "FPR95", "best_F1")}
            result["threshold"] = None if t is None else self.threshold_value(name, t)
            result.update(self._component_metrics(sums[k]) if t is not None else dict.fromkeys(
                ("sIoU_gt", "PPV", "F1_25", "F1_50", "F1_75", "F1_mean", "components_gt",
                 "components_pred")))
            result["pixels_anomaly"] = int(hist[k, 1].sum())
            result["pixels_known"] = int(hist[k, 0].sum())
            out[name] = result
        return out

    @staticmethod
    def _component_metrics(sums: np.ndarray) -> dict[str, float | int | None]:
        siou_sum, n_gt, ppv_sum, n_pred = (float(v) for v in sums[:4])
        tp = sums[4:4 + _N_TAU]
        fp = sums[4 + _N_TAU:]
        fn = n_gt - tp
        denominator = 2.0 * tp + fn + fp
        f1 = [float(2.0 * a / d) if d > 0 else None
              for a, d in zip(tp, denominator, strict=True)]
        index = {round(100 * tau): j for j, tau in enumerate(SIOU_THRESHOLDS)}
        return {
            "sIoU_gt": siou_sum / n_gt if n_gt > 0 else None,
            "PPV": ppv_sum / n_pred if n_pred > 0 else None,
            "F1_25": f1[index[25]],
            "F1_50": f1[index[50]],
            "F1_75": f1[index[75]],
            "F1_mean": None if None in f1 else sum(f1) / len(f1),
            "components_gt": int(n_gt),
            "components_pred": int(n_pred),
        }
