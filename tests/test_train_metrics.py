"""Training-harness metrics: mIoU, ECE, mUnc and AUROC against direct computations."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.metrics import (  # noqa: E402
    SegmentationMetrics,
    auroc_from_histograms,
    calibration_bins,
)


def _case(seed: int = 0, c: int = 4, shape=(2, 9, 11)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.15] = 255
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target.clamp(max=c - 1),
                       torch.randint(0, c, shape, generator=g))
    conf = torch.rand(shape, generator=g) * 0.7 + 0.3
    conf.view(-1)[:5] = 1.0  # torchmetrics' extra bin
    sigma = torch.rand(shape, generator=g) * 0.4
    return pred, target, conf, sigma


def _direct_miou(pred, target, c):
    valid = target != 255
    ious = []
    for k in range(c):
        p, t = (pred == k) & valid, (target == k) & valid
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return sum(ious) / len(ious)


def _direct_ece(pred, target, conf, n_bins=15):
    """torchmetrics MulticlassCalibrationError(norm='l1') as written there."""
    valid = target != 255
    confidences, accuracies = conf[valid], (pred[valid] == target[valid]).float()
    boundaries = torch.linspace(0, 1, n_bins + 1)
    indices = torch.bucketize(confidences, boundaries, right=True) - 1
    count = torch.zeros(n_bins + 1).scatter_add_(0, indices, torch.ones_like(confidences))
    conf_bin = torch.zeros(n_bins + 1).scatter_add_(0, indices, confidences)
    acc_bin = torch.zeros(n_bins + 1).scatter_add_(0, indices, accuracies)
    conf_bin = torch.nan_to_num(conf_bin / count)
    acc_bin = torch.nan_to_num(acc_bin / count)
    prop = count / count.sum()
    return float(torch.sum(torch.abs(acc_bin - conf_bin) * prop))


def _direct_auroc(score_pos, score_neg):
    """Mann-Whitney: P(pos > neg) + P(pos == neg) / 2 over all pairs."""
    pos, neg = score_pos.double()[:, None], score_neg.double()[None, :]
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def test_miou_ece_munc_against_direct_computation():
    pred, target, conf, sigma = _case()
    m = SegmentationMetrics(4)
    m.update(pred, target, conf, sigma)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(_direct_miou(pred, target, 4), abs=1e-12)
    assert out["ECE"] == pytest.approx(_direct_ece(pred, target, conf), abs=1e-6)
    valid = target != 255
    assert out["mUnc"] == pytest.approx(float(sigma[valid].double().mean()), abs=1e-12)
    assert out["pixels"] == int(valid.sum())
    assert out["aAcc"] == pytest.approx(float((pred[valid] == target[valid]).double().mean()))


def test_streaming_updates_equal_one_update():
    pred, target, conf, sigma = _case(1, shape=(4, 8, 8))
    whole = SegmentationMetrics(4)
    whole.update(pred, target, conf, sigma)
    parts = SegmentationMetrics(4)
    for i in range(4):
        parts.update(pred[i:i + 1], target[i:i + 1], conf[i:i + 1], sigma[i:i + 1])
    a, b = whole.compute(), parts.compute()
    for key in ("mIoU", "ECE", "mUnc", "AUROC_sigma", "AUROC_conf", "pixels"):
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_miou_skips_absent_classes_and_ece_bins_like_torchmetrics():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    m = SegmentationMetrics(5)
    m.update(pred, target, torch.tensor([[0.5, 1.0, 0.9999, 0.2]]))
    out = m.compute()
    assert out["mIoU"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert out["IoU"][2:] == [None, None, None]
    assert calibration_bins(torch.tensor([0.0, 1 / 15 - 1e-6, 1 / 15 + 1e-6, 0.9999, 1.0])
                            ).tolist() == [0, 0, 1, 14, 15]
    assert out["ECE"] == pytest.approx(_direct_ece(pred, target, torch.tensor(
        [[0.5, 1.0, 0.9999, 0.2]])), abs=1e-7)


def test_auroc_from_histograms_equals_rank_auroc_on_binned_scores():
    g = torch.Generator().manual_seed(3)
    bins = 64
    pos_bins = torch.randint(10, 64, (300,), generator=g)
    neg_bins = torch.randint(0, 50, (500,), generator=g)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    expected = _direct_auroc(centres[pos_bins], centres[neg_bins])  # ties included
    got = auroc_from_histograms(torch.bincount(pos_bins, minlength=bins),
                                torch.bincount(neg_bins, minlength=bins))
    assert got == pytest.approx(expected, abs=1e-12)
    assert math.isnan(auroc_from_histograms(torch.zeros(4), torch.ones(4)))


def test_streaming_auroc_close_to_exact_rank_auroc():
    pred, target, conf, sigma = _case(2, shape=(3, 20, 20))
    wrong = (pred != target)
    sigma = torch.where(wrong, sigma + 0.1, sigma)  # informative but overlapping
    m = SegmentationMetrics(4)
    m.update(pred, target, conf, sigma)
    out = m.compute()
    valid = target != 255
    s, w = sigma[valid], wrong[valid]
    assert out["AUROC_sigma"] == pytest.approx(_direct_auroc(s[w], s[~w]), abs=1e-3)
    u = 1 - conf[valid]
    assert out["AUROC_conf"] == pytest.approx(_direct_auroc(u[w], u[~w]), abs=1e-3)


def test_without_sigma_munc_is_not_reported():
    pred, target, conf, _ = _case()
    m = SegmentationMetrics(4)
    m.update(pred, target, conf)
    out = m.compute()
    assert out["mUnc"] is None and out["AUROC_sigma"] is None
    assert 0.0 <= out["ECE"] <= 1.0
