"""Anomaly-segmentation metrics (train/anomaly_metrics.py): pixel metrics against scikit-learn,
component metrics against a loop-by-loop re-implementation of the SegmentMeIfYouCan benchmark
code and hand-computed cases, exactness under 2-process DDP, and input checks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ndimage = pytest.importorskip("scipy.ndimage")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.anomaly_metrics import (  # noqa: E402
    SIOU_THRESHOLDS,
    AnomalyMetrics,
    component_scores,
    pixel_metrics_from_histograms,
    scaled_size_thresholds,
    uniform_bins,
)

NAMES = ("msp", "entropy", "sigma")
RANGES = dict.fromkeys(NAMES, (0.0, 1.0))
PIXEL_KEYS = ("AP", "AUROC", "FPR95", "best_F1", "threshold")
COMPONENT_FLOATS = ("sIoU_gt", "PPV", "F1_25", "F1_50", "F1_75", "F1_mean")
COUNTS = ("components_gt", "components_pred", "pixels_anomaly", "pixels_known")


def _centres(bins: np.ndarray, lo: float, hi: float, num_bins: int) -> np.ndarray:
    """The centre of each bin: binning it loses nothing."""
    return lo + (bins + 0.5) * (hi - lo) / num_bins


def _brute_best_f1(score: np.ndarray, anomaly: np.ndarray) -> tuple[float, float]:
    """Best pixel F1 over the thresholds "score >= v" for every distinct v, from the highest v
    down (the first maximum wins), from integer counts; returns (F1, v)."""
    best, best_v = -1.0, math.nan
    n_pos = int(anomaly.sum())
    for v in np.unique(score)[::-1]:
        pred = score >= v
        tp = int((pred & anomaly).sum())
        fp = int((pred & ~anomaly).sum())
        f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
        if f1 > best:
            best, best_v = f1, float(v)
    return best, best_v


# --------------------------------------------------------------------------- pixel level


@pytest.mark.parametrize("seed", range(320))
def test_pixel_metrics_equal_sklearn_on_bin_centred_scores(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    num_bins = (3, 16, 1000, 65536)[seed % 4]
    lo, hi = ((0.0, 1.0), (-3.0, 5.0))[(seed // 4) % 2]
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 10)), int(rng.integers(2, 12)))
    n = int(np.prod(shape))
    p_void = rng.uniform(0, 0.4)
    p_anomaly = rng.uniform(0.05, 0.6) * (1 - p_void)
    gt = rng.choice([0, 1, 255], size=n, p=[1 - p_void - p_anomaly, p_anomaly, p_void])
    gt[:2] = (0, 1)  # both classes present
    distinct = seed % 8 >= 4 and n <= num_bins  # without ties; otherwise ties are likely
    bins = rng.choice(num_bins, n, replace=False) if distinct else rng.integers(0, num_bins, n)
    score = _centres(bins, lo, hi, num_bins).astype(np.float32)
    void = gt == 255
    # void pixels may have any score (outside the range, NaN): never counted
    score[void] = rng.choice([lo - 7.0, hi + 7.0, np.nan, (lo + hi) / 2], size=int(void.sum()))
    metrics = AnomalyMetrics({"s": (lo, hi)}, num_bins=num_bins)
    metrics.update(torch.from_numpy(gt.reshape(shape)),
                   {"s": torch.from_numpy(score.reshape(shape))})
    out = metrics.compute()["s"]

    y, s = gt[~void] == 1, score[~void].astype(np.float64)
    assert out["pixels_anomaly"] == int(y.sum()) and out["pixels_known"] == int((~y).sum())
    assert out["AP"] == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=1e-12)
    assert out["AUROC"] == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    assert out["FPR95"] == pytest.approx(fpr[int(np.argmax(tpr >= 0.95))], abs=1e-12)
    best, v = _brute_best_f1(s, y)
    assert out["best_F1"] == pytest.approx(best, abs=1e-12)
    # the threshold is the lower edge of the bin of v
    assert out["threshold"] == pytest.approx(v - 0.5 * (hi - lo) / num_bins, abs=1e-5)


def _pixel_case(anomaly: list[float], known: list[float], num_bins: int = 10,
                void: list[float] = ()) -> dict:
    values = [*anomaly, *known, *void]
    labels = [1] * len(anomaly) + [0] * len(known) + [255] * len(void)
    metrics = AnomalyMetrics({"s": (0.0, 1.0)}, num_bins=num_bins, min_segment=1,
                             min_instance=1)
    metrics.update(torch.tensor(labels).view(1, 1, -1),
                   {"s": torch.tensor(values, dtype=torch.float32).view(1, 1, -1)})
    return metrics.compute()["s"]


def test_pixel_metrics_hand_computed():
    # perfect separation: AP 1, AUROC 1, FPR95 0, F1 1 at the lowest anomaly bin ([0.6, 0.7))
    out = _pixel_case([0.95, 0.65, 0.85], [0.05, 0.15, 0.55, 0.55])
    assert (out["AP"], out["AUROC"], out["FPR95"], out["best_F1"]) == (1.0, 1.0, 0.0, 1.0)
    assert out["threshold"] == pytest.approx(0.6)
    # reversed: 2 anomalies at 0.15, 3 known at 0.95. Recall rises only when everything is
    # predicted: AP = 2/5; AUROC 0; TPR 0.95 needs all known: FPR95 1;
    # F1 = 2*2 / (2*2 + 3 + 0) = 4/7 at [0.1, 0.2) and 0 above.
    out = _pixel_case([0.15, 0.15], [0.95, 0.95, 0.95], void=[0.45, 0.99])
    assert out["AP"] == pytest.approx(0.4) and out["AUROC"] == 0.0 and out["FPR95"] == 1.0
    assert out["best_F1"] == pytest.approx(4 / 7) and out["threshold"] == pytest.approx(0.1)
    assert out["pixels_anomaly"] == 2 and out["pixels_known"] == 3
    # ties: anomalies 0.95, 0.55; known 0.95, 0.15.
    # AP: at 0.95 P = 1/2, R = 1/2; at 0.55 P = 2/3, R = 1 -> 1/2 * 1/2 + 1/2 * 2/3 = 7/12.
    # AUROC: pairs (0.95, 0.95) 1/2, (0.95, 0.15) 1, (0.55, 0.95) 0, (0.55, 0.15) 1 -> 5/8.
    # FPR95: TPR reaches 1 at 0.55 with 1 of 2 known above -> 1/2.
    # F1: 0.95 -> 2/(2+1+1) = 1/2; 0.55 -> 4/(4+1) = 4/5; 0.15 -> 4/(4+2) = 2/3.
    out = _pixel_case([0.95, 0.55], [0.95, 0.15])
    assert out["AP"] == pytest.approx(7 / 12) and out["AUROC"] == pytest.approx(5 / 8)
    assert out["FPR95"] == 0.5 and out["best_F1"] == pytest.approx(0.8)
    assert out["threshold"] == pytest.approx(0.5)


def test_scores_outside_the_range_are_clamped_into_the_end_bins():
    assert uniform_bins(torch.tensor([-5.0, 0.0, 0.05, 0.95, 1.0, 7.0, math.inf]), 0.0, 1.0,
                        10).tolist() == [0, 0, 0, 9, 9, 9, 9]
    # an anomaly at 7 ties with a known pixel at 0.95 (both in the last bin): AUROC 1/2
    out = _pixel_case([7.0], [0.95])
    assert out["AUROC"] == 0.5 and out["AP"] == 0.5 and out["threshold"] == pytest.approx(0.9)


def test_missing_classes_give_nan_or_none():
    no_anomaly = _pixel_case([], [0.2, 0.7])
    for key in ("AP", "AUROC", "FPR95", "best_F1"):
        assert math.isnan(no_anomaly[key]), key
    for key in ("threshold", *COMPONENT_FLOATS, "components_gt", "components_pred"):
        assert no_anomaly[key] is None, key
    assert no_anomaly["pixels_anomaly"] == 0 and no_anomaly["pixels_known"] == 2
    no_known = _pixel_case([0.25, 0.75], [], void=[0.5])
    assert no_known["AP"] == 1.0 and no_known["best_F1"] == 1.0
    assert math.isnan(no_known["AUROC"]) and math.isnan(no_known["FPR95"])
    assert no_known["threshold"] == pytest.approx(0.2)
    # the two anomaly pixels are adjacent: one object, found whole
    assert no_known["components_gt"] == 1 and no_known["sIoU_gt"] == 1.0
    empty = AnomalyMetrics(RANGES).compute()
    assert set(empty) == set(NAMES)
    assert math.isnan(empty["msp"]["AP"]) and empty["msp"]["threshold"] is None
    assert empty["msp"]["pixels_anomaly"] == 0 and empty["msp"]["pixels_known"] == 0
    direct = pixel_metrics_from_histograms(torch.zeros(4), torch.tensor([1.0, 0, 0, 2]))
    assert direct["threshold_bin"] is None and math.isnan(direct["AP"])


# --------------------------------------------------------------------------- component level
# The benchmark's default_instancer, segment_metrics and MetricSegment.aggregate, loop by loop.


def _ref_instancer(anomaly_p, label_pixel_gt, thresh_p, thresh_segsize, thresh_instsize):
    segmentation = np.zeros(anomaly_p.shape)
    segmentation[anomaly_p > thresh_p] = 1
    anomaly_gt = np.zeros(label_pixel_gt.shape)
    anomaly_gt[label_pixel_gt == 1] = 1
    anomaly_pred = np.zeros(label_pixel_gt.shape)
    anomaly_pred[segmentation == 1] = 1
    anomaly_pred[label_pixel_gt == 255] = 0
    structure = np.ones((3, 3), dtype=np.uint8)
    anomaly_instances, n_anomaly = ndimage.label(anomaly_gt, structure)
    anomaly_seg_pred, n_seg_pred = ndimage.label(anomaly_pred, structure)
    labeled = np.copy(anomaly_seg_pred)
    for comp in range(n_seg_pred + 1):
        if len(anomaly_seg_pred[labeled == comp]) < thresh_segsize:
            anomaly_seg_pred[labeled == comp] = 0
    labeled = np.copy(anomaly_instances)
    label_pixel_gt = label_pixel_gt.copy()
    # id 0 (everything that is not an anomaly) is visited too, as in the benchmark; it is never
    # smaller than min_instance in these images (the module does not treat it as a component)
    for comp in range(n_anomaly + 1):
        if len(anomaly_instances[labeled == comp]) < thresh_instsize:
            label_pixel_gt[labeled == comp] = 255
    roi = label_pixel_gt < 255
    return anomaly_instances[roi], anomaly_seg_pred[roi]


def _ref_segment_metrics(anomaly_instances, anomaly_seg_pred):
    siou_gt = []
    for i in np.unique(anomaly_instances[anomaly_instances > 0]):
        tp_loc = anomaly_seg_pred[anomaly_instances == i]
        seg_ind = np.unique(tp_loc[tp_loc != 0])
        intersection = len(tp_loc[np.isin(tp_loc, seg_ind)])
        adjustment = len(anomaly_seg_pred[np.logical_and(~np.isin(anomaly_instances, [0, i]),
                                                         np.isin(anomaly_seg_pred, seg_ind))])
        adjusted_union = (np.sum(np.isin(anomaly_seg_pred, seg_ind))
                          + np.sum(anomaly_instances == i) - intersection - adjustment)
        siou_gt.append(intersection / adjusted_union)
    prec_pred = []
    for i in np.unique(anomaly_seg_pred[anomaly_seg_pred > 0]):
        tp_loc = anomaly_instances[anomaly_seg_pred == i]
        seg_ind = np.unique(tp_loc[tp_loc != 0])
        intersection = len(tp_loc[np.isin(tp_loc, seg_ind)])
        prec_pred.append(intersection / np.sum(anomaly_seg_pred == i))
    siou_gt, prec_pred = np.array(siou_gt), np.array(prec_pred)
    result = {"sIoU_gt": siou_gt, "prec_pred": prec_pred}
    for t in SIOU_THRESHOLDS:
        result[f"tp_{int(t * 100)}"] = np.count_nonzero(siou_gt >= t)
        result[f"fn_{int(t * 100)}"] = np.count_nonzero(siou_gt < t)
        result[f"fp_{int(t * 100)}"] = np.count_nonzero(prec_pred < t)
    return result


def _ref_aggregate(frames):
    out = {
        "sIoU_gt": sum(np.sum(r["sIoU_gt"]) for r in frames)
        / sum(len(r["sIoU_gt"]) for r in frames),
        "PPV": sum(np.sum(r["prec_pred"]) for r in frames)
        / sum(len(r["prec_pred"]) for r in frames),
        "F1_mean": 0.0,
    }
    for t in SIOU_THRESHOLDS:
        tp, fn, fp = (sum(r[f"{kind}_{int(t * 100)}"] for r in frames)
                      for kind in ("tp", "fn", "fp"))
        f1 = 2 * tp / (2 * tp + fn + fp)
        if t in (0.25, 0.5, 0.75):
            out[f"F1_{int(t * 100)}"] = f1
        out["F1_mean"] += f1 / len(SIOU_THRESHOLDS)
    out["components_gt"] = sum(len(r["sIoU_gt"]) for r in frames)
    out["components_pred"] = sum(len(r["prec_pred"]) for r in frames)
    return out


def _blob_scene(seed: int, n: int = 5, h: int = 48, w: int = 64, num_bins: int = 200):
    """Images with elliptic anomalies (some of a few pixels), void bands and rectangles, and
    three scores of decreasing quality (smoothed noise around the anomalies), at bin centres of
    ``num_bins`` bins over [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = np.zeros((n, h, w), np.uint8)
    for b in range(n):
        for _ in range(int(rng.integers(1, 7))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.4, 8, 2)
            gt[b][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        gt[b, :int(rng.integers(0, 6))] = 255
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        gt[b, y0:y0 + int(rng.integers(2, 9)), x0:x0 + int(rng.integers(2, 9))] = 255
    signal = ndimage.gaussian_filter((gt == 1).astype(np.float64), (0, 1, 1))
    scores = {}
    for k, name in enumerate(NAMES):
        noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), (0, 1.5, 1.5))
        raw = 1 / (1 + np.exp(-(5 * signal - 2.5 + (k + 1) * 2.5 * noise)))
        bins = np.clip((raw * num_bins).astype(np.int64), 0, num_bins - 1)
        scores[name] = _centres(bins, 0.0, 1.0, num_bins).astype(np.float32)
    return gt, scores


def _reference(gt, scores, min_segment, min_instance, num_bins=200):
    """Per score: the benchmark's component metrics at the brute-force best-F1 threshold and
    the per-image sIoU / PPV arrays."""
    valid = gt != 255
    out = {}
    for name, score in scores.items():
        _, v = _brute_best_f1(score[valid].astype(np.float64), gt[valid] == 1)
        # strictly between the lower edge of v's bin and its centre: "> thresh_p" = "bin >= t"
        thresh_p = v - 0.25 / num_bins
        frames = [_ref_segment_metrics(*_ref_instancer(score[b], gt[b], thresh_p, min_segment,
                                                       min_instance)) for b in range(len(gt))]
        out[name] = (v - 0.5 / num_bins, _ref_aggregate(frames), frames)
    return out


@pytest.mark.parametrize(("seed", "min_segment", "min_instance"),
                         [(0, 6, 12), (1, 1, 1), (2, 12, 25), (3, 8, 40)])
def test_component_metrics_equal_the_benchmark_on_random_blobs(seed, min_segment, min_instance):
    gt, scores = _blob_scene(seed)
    metrics = AnomalyMetrics(RANGES, num_bins=200, min_segment=min_segment,
                             min_instance=min_instance)
    for sl in (slice(0, 2), slice(2, 5)):
        metrics.update(torch.from_numpy(gt[sl]).long(),
                       {k: torch.from_numpy(v[sl]) for k, v in scores.items()})
    out = metrics.compute()
    reference = _reference(gt, scores, min_segment, min_instance)
    removed = 0
    for name in NAMES:
        threshold, ref, frames = reference[name]
        got = out[name]
        assert got["threshold"] == pytest.approx(threshold, abs=1e-6), name
        for key in ("components_gt", "components_pred"):
            assert got[key] == ref[key], (name, key)
        for key in COMPONENT_FLOATS:
            assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), (name, key)
        # per component, in the same order (images, then the raster order of the labelling)
        predicted = scores[name] >= threshold + 0.25 / 200
        siou, ppv = component_scores(gt, predicted, min_segment, min_instance)
        np.testing.assert_array_equal(siou, np.concatenate([f["sIoU_gt"] for f in frames]))
        np.testing.assert_array_equal(ppv, np.concatenate([f["prec_pred"] for f in frames]))
        _, everything = component_scores(gt, predicted, 1, 1)
        removed += len(everything) - len(ppv)
        assert got["components_gt"] > 3 and got["components_pred"] > 0
    if min_segment > 1:
        assert removed > 0  # min_segment did remove components


def _square_case():
    """A 4x4 ground-truth square (16 px) in a 10x10 image, its left half (8 px) predicted."""
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros((10, 10), bool)
    pred[2:6, 2:4] = True
    return gt, pred


def _two_objects_case():
    """Rows 2-5 of an 8x12 image: ground truth A in columns 1-2 (8 px), B in columns 7-9
    (12 px); one predicted component over columns 1-9 (36 px: A, B and 16 known px)."""
    gt = np.zeros((8, 12), np.uint8)
    gt[2:6, 1:3] = 1
    gt[2:6, 7:10] = 1
    pred = np.zeros((8, 12), bool)
    pred[2:6, 1:10] = True
    return gt, pred


def _through_the_class(gt: np.ndarray, pred: np.ndarray, **sizes) -> dict:
    """Scores 0.95 on the prediction and 0.05 elsewhere, 10 bins: the prediction is the
    best-F1 threshold's (checked by the caller through ``threshold``)."""
    metrics = AnomalyMetrics({"s": (0.0, 1.0)}, num_bins=10, **sizes)
    score = np.where(pred, 0.95, 0.05).astype(np.float32)
    metrics.update(torch.from_numpy(gt[None]).long(), {"s": torch.from_numpy(score[None])})
    return metrics.compute()["s"]


def test_half_covered_square():
    # sIoU = |G ∩ P| / (|G| + known pixels of P) = 8 / (16 + 0) = 1/2, PPV = 8/8 = 1.
    # TP for tau <= 1/2 (6 of 11 thresholds), else FN; no FP: F1 = 1 for tau <= 1/2, else 0.
    gt, pred = _square_case()
    siou, ppv = component_scores(gt, pred, 1, 1)
    assert siou.tolist() == [0.5] and ppv.tolist() == [1.0]
    # pixel F1 at 0.9: 2*8 / (2*8 + 0 + 8) = 2/3, at 0: 2*16 / (2*16 + 84) < 2/3
    out = _through_the_class(gt, pred, min_segment=1, min_instance=1)
    assert out["threshold"] == pytest.approx(0.9) and out["best_F1"] == pytest.approx(2 / 3)
    assert out["sIoU_gt"] == 0.5 and out["PPV"] == 1.0
    assert (out["F1_25"], out["F1_50"], out["F1_75"]) == (1.0, 1.0, 0.0)
    assert out["F1_mean"] == pytest.approx(6 / 11)
    assert (out["components_gt"], out["components_pred"]) == (1, 1)


def test_one_prediction_over_two_objects_uses_the_adjusted_union():
    # The predicted component P touches A and B. sIoU(A) = 8 / |(A ∪ P) \ B| = 8 / (36 - 12)
    # = 1/3 (8/36 without the adjustment); sIoU(B) = 12 / (36 - 8) = 3/7; PPV = 20/36 = 5/9.
    # tau:  .25 .30 .35 .40 .45 .50 .55 .60 .65 .70 .75
    # TP:    2   2   1   1   0   0   0   0   0   0   0   (FN = 2 - TP)
    # FP:    0   0   0   0   0   0   0   1   1   1   1   (5/9 < tau)
    # F1:    1   1  2/3 2/3  0   0   0   0   0   0   0   -> mean (10/3) / 11 = 10/33
    gt, pred = _two_objects_case()
    siou, ppv = component_scores(gt, pred, 1, 1)
    np.testing.assert_allclose(siou, [1 / 3, 3 / 7], rtol=1e-15)
    np.testing.assert_allclose(ppv, [5 / 9], rtol=1e-15)
    # pixel F1 at 0.9: 40 / (40 + 16) beats 40 / (40 + 76) at 0
    out = _through_the_class(gt, pred, min_segment=1, min_instance=1)
    assert out["threshold"] == pytest.approx(0.9)
    assert out["sIoU_gt"] == pytest.approx(8 / 21) and out["PPV"] == pytest.approx(5 / 9)
    assert (out["F1_25"], out["F1_50"], out["F1_75"]) == (1.0, 0.0, 0.0)
    assert out["F1_mean"] == pytest.approx(10 / 33)


def test_small_predicted_component_is_removed_by_min_segment():
    gt, pred = _square_case()
    pred[8, 8:10] = True  # 2 predicted pixels on known ground, away from the square
    siou, ppv = component_scores(gt, pred, min_segment=3, min_instance=1)
    assert siou.tolist() == [0.5] and ppv.tolist() == [1.0]
    # kept, it is a false positive at every tau: PPV (1 + 0) / 2, F1(0.25) = 2 / (2 + 0 + 1)
    siou, ppv = component_scores(gt, pred, min_segment=2, min_instance=1)
    assert siou.tolist() == [0.5] and ppv.tolist() == [1.0, 0.0]
    out = _through_the_class(gt, pred, min_segment=2, min_instance=1)
    assert out["threshold"] == pytest.approx(0.9)
    assert out["PPV"] == 0.5 and out["F1_25"] == pytest.approx(2 / 3)
    assert out["components_pred"] == 2
    assert _through_the_class(gt, pred, min_segment=3, min_instance=1)["components_pred"] == 1


def test_small_ground_truth_component_becomes_void():
    gt, pred = _square_case()
    gt[7:9, 7:9] = 1  # a 2x2 object (4 px), exactly predicted
    pred[7:9, 7:9] = True
    # kept (min_instance 4): found perfectly
    siou, ppv = component_scores(gt, pred, min_segment=1, min_instance=4)
    assert siou.tolist() == [0.5, 1.0] and ppv.tolist() == [1.0, 1.0]
    # void (min_instance 5): the object and the prediction on it leave every statistic
    siou, ppv = component_scores(gt, pred, min_segment=1, min_instance=5)
    assert siou.tolist() == [0.5] and ppv.tolist() == [1.0]
    # a predicted component over the voided object and 2 known pixels (6 px): its size for
    # min_segment counts the voided pixels (kept at 6, removed at 7); what counts of it is the
    # 2 known pixels, PPV 0
    pred[7:9, 9] = True
    siou, ppv = component_scores(gt, pred, min_segment=6, min_instance=5)
    assert siou.tolist() == [0.5] and ppv.tolist() == [1.0, 0.0]
    _, ppv = component_scores(gt, pred, min_segment=7, min_instance=5)
    assert ppv.tolist() == [1.0]


def test_void_is_never_predicted_and_components_are_8_connected():
    gt = np.zeros((6, 10), np.uint8)
    gt[:, 4] = 255
    pred = np.zeros((6, 10), bool)
    pred[2, 2:7] = True  # crosses the void column: two components of 2 px, both known
    siou, ppv = component_scores(gt, pred, 1, 1)
    assert siou.size == 0 and ppv.tolist() == [0.0, 0.0]
    gt = np.zeros((6, 10), np.uint8)
    gt[1, 1] = gt[2, 2] = 1  # diagonal neighbours: one object
    pred = np.zeros((6, 10), bool)
    pred[2, 2] = pred[3, 3] = True  # diagonal neighbours: one component, half on the object
    siou, ppv = component_scores(gt, pred, 1, 1)
    # sIoU = 1 / (2 + 1 known px of the prediction) = 1/3
    np.testing.assert_allclose(siou, [1 / 3])
    np.testing.assert_allclose(ppv, [0.5])
    # images of a batch never merge: the same two pixels in two images are two objects
    siou, _ = component_scores(np.stack([gt, gt]), np.stack([pred, pred]), 1, 1)
    assert siou.size == 2


def test_no_components_give_none_and_f1_from_the_misses():
    gt = np.zeros((1, 10, 10), np.uint8)
    gt[0, 2:6, 2:6] = 1
    metrics = AnomalyMetrics({"s": (0.0, 1.0)}, num_bins=10, min_segment=100, min_instance=1)
    score = np.where(gt == 1, 0.95, 0.05).astype(np.float32)
    metrics.update(torch.from_numpy(gt), {"s": torch.from_numpy(score)})
    out = metrics.compute()["s"]  # the only predicted component (16 px) is below min_segment
    assert out["components_pred"] == 0 and out["PPV"] is None
    assert out["sIoU_gt"] == 0.0 and out["F1_25"] == 0.0 and out["F1_mean"] == 0.0
    metrics = AnomalyMetrics({"s": (0.0, 1.0)}, num_bins=10, min_segment=100, min_instance=17)
    metrics.update(torch.from_numpy(gt), {"s": torch.from_numpy(score)})
    out = metrics.compute()["s"]  # and the only object is below min_instance
    assert out["components_gt"] == 0 and out["sIoU_gt"] is None and out["F1_mean"] is None


def test_size_thresholds_scale_with_the_image_area_and_are_the_default():
    assert scaled_size_thresholds(1024, 2048) == (500, 100)
    assert scaled_size_thresholds(128, 256) == (8, 2)
    assert scaled_size_thresholds(8, 8) == (1, 1)
    gt, scores = _blob_scene(5, n=3, h=128, w=256)
    results = []
    for sizes in ({}, {"min_segment": 8, "min_instance": 2},
                  {"min_segment": 1, "min_instance": 1}):
        metrics = AnomalyMetrics(RANGES, num_bins=200, **sizes)
        metrics.update(torch.from_numpy(gt).long(),
                       {k: torch.from_numpy(v) for k, v in scores.items()})
        results.append(metrics.compute())
    assert results[0] == results[1]
    assert results[0] != results[2]


def test_streaming_updates_equal_one_update_and_compute_is_repeatable():
    gt, scores = _blob_scene(7, n=4)
    one = AnomalyMetrics(RANGES, num_bins=256)
    one.update(torch.from_numpy(gt), {k: torch.from_numpy(v) for k, v in scores.items()})
    parts = AnomalyMetrics(RANGES, num_bins=256)
    for b in range(4):
        parts.update(torch.from_numpy(gt[b:b + 1]),
                     {k: torch.from_numpy(v[b:b + 1]) for k, v in scores.items()})
    first = parts.compute()
    assert first == parts.compute()
    for name in NAMES:
        for key, value in one.compute()[name].items():
            if isinstance(value, float):
                assert first[name][key] == pytest.approx(value, rel=1e-12), (name, key)
            else:
                assert first[name][key] == value, (name, key)


# --------------------------------------------------------------------------- DDP


def _shards(gt, scores, rank: int, layout: str):
    """This rank's batches: "uneven" gives rank 0 images 0-2 in two batches and rank 1 images
    3-4; "empty" gives rank 0 everything and rank 1 nothing."""
    if layout == "uneven":
        slices = [slice(0, 1), slice(1, 3)] if rank == 0 else [slice(3, 5)]
    else:
        slices = [slice(0, 5)] if rank == 0 else []
    return [(torch.from_numpy(gt[s]).long(), {k: torch.from_numpy(v[s]) for k, v in scores.items()})
            for s in slices]


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        gt, scores = _blob_scene(11)
        results = {}
        for layout in ("uneven", "empty"):
            metrics = AnomalyMetrics(RANGES, num_bins=200, min_segment=6, min_instance=5)
            for batch in _shards(gt, scores, rank, layout):
                metrics.update(*batch)
            results[layout] = metrics.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    gt, scores = _blob_scene(11)
    whole = AnomalyMetrics(RANGES, num_bins=200, min_segment=6, min_instance=5)
    whole.update(torch.from_numpy(gt).long(), {k: torch.from_numpy(v) for k, v in scores.items()})
    expected = whole.compute()
    assert ranks[0] == ranks[1]  # identical on every rank
    for layout in ("uneven", "empty"):
        for name in NAMES:
            got, want = ranks[0][layout][name], expected[name]
            for key in (*PIXEL_KEYS, *COUNTS):  # histograms and counts: exact
                assert got[key] == want[key], (layout, name, key)
            for key in COMPONENT_FLOATS:  # float64 sums in another order
                assert got[key] == pytest.approx(want[key], rel=1e-12), (layout, name, key)
            assert want["components_gt"] > 3 and want["components_pred"] > 0


# --------------------------------------------------------------------------- bad input


def _good_batch():
    gt = torch.zeros(2, 4, 5, dtype=torch.long)
    gt[:, 1, 1] = 1
    gt[:, 0, 0] = 255
    return gt, {name: torch.rand(2, 4, 5) for name in NAMES}


def test_bad_input_raises_value_error_naming_the_argument():
    metrics = AnomalyMetrics(RANGES)
    gt, scores = _good_batch()
    with pytest.raises(ValueError, match=r"gt must be a \(B, H, W\)"):
        metrics.update(gt[0], scores)
    with pytest.raises(ValueError, match="gt must be an integer"):
        metrics.update(gt.float(), scores)
    with pytest.raises(ValueError, match=r"gt values .* found \[2\]"):
        metrics.update(torch.where(gt == 1, 2, gt), scores)
    with pytest.raises(ValueError, match=r"scores\['entropy'\] of shape \(2, 4, 4\)"):
        metrics.update(gt, {**scores, "entropy": scores["entropy"][..., :4]})
    with pytest.raises(ValueError, match=r"unknown names \['energy'\]"):
        metrics.update(gt, {**scores, "energy": scores["msp"]})
    with pytest.raises(ValueError, match=r"missing names \['sigma'\]"):
        metrics.update(gt, {k: v for k, v in scores.items() if k != "sigma"})
    bad = scores["sigma"].clone()
    bad[1, 1, 1] = math.nan
    with pytest.raises(ValueError, match=r"scores\['sigma'\] has NaN"):
        metrics.update(gt, {**scores, "sigma": bad})
    # nothing of the rejected batches was kept
    assert int(metrics.hist.sum()) == 0 and not metrics._gt
    # NaN at a void pixel is not an error
    bad = scores["sigma"].clone()
    bad[0, 0, 0] = math.nan
    metrics.update(gt, {**scores, "sigma": bad})
    assert metrics.compute()["sigma"]["pixels_known"] == 2 * 18
    with pytest.raises(ValueError, match=r"score_ranges\['msp'\]"):
        AnomalyMetrics({"msp": (1.0, 0.0)})
    with pytest.raises(ValueError, match="num_bins"):
        AnomalyMetrics(RANGES, num_bins=0)
    with pytest.raises(ValueError, match="min_segment"):
        AnomalyMetrics(RANGES, min_segment=-1)
    with pytest.raises(ValueError, match="score_ranges"):
        AnomalyMetrics({})
