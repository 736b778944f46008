"""Training-harness metrics: mIoU, ECE, mUnc, NLL, Brier, AUROC and AURC against direct
computations, and exactness under sharding."""

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
    aurc_from_histograms,
    auroc_from_histograms,
    calibration_bins,
    score_bins,
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


# ------------------------------------------------------------------------------------------
# NLL, Brier, AURC, mutual information; exactness under sharding


def _probs_case(seed: int = 0, c: int = 5, shape=(2, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.2] = 255
    probs = torch.softmax(3 * torch.randn((shape[0], c, *shape[1:]), generator=g), dim=1)
    probs[0, :, 0, 0] = 0.0  # an underflowed probability: clamped in the NLL
    probs[0, 1, 0, 0] = 1.0
    conf, pred = probs.max(dim=1)
    sigma = torch.rand(shape, generator=g) * 0.3
    mi = torch.rand(shape, generator=g) * 0.5
    return pred, target, conf, sigma, probs, mi


def _direct_aurc(score, wrong):
    """Sorted list, most certain first: (1/N) sum_k E_k / k (no ties in the data)."""
    order = torch.argsort(score.double())
    errors = torch.cumsum(wrong[order].double(), 0)
    k = torch.arange(1, len(score) + 1, dtype=torch.float64)
    return float((errors / k).mean())


def test_nll_and_brier_against_direct_computation():
    pred, target, conf, sigma, probs, mi = _probs_case()
    m = SegmentationMetrics(5)
    m.update(pred, target, conf, sigma, probs=probs, mutual_info=mi)
    out = m.compute()
    valid = target != 255
    p = probs.permute(0, 2, 3, 1)[valid].double()  # (N, C)
    t = target[valid]
    onehot = torch.nn.functional.one_hot(t, 5).double()
    nll = -torch.log(p.gather(1, t[:, None]).squeeze(1).clamp(min=1e-12))
    assert out["NLL"] == pytest.approx(float(nll.mean()), rel=1e-12)
    assert out["Brier"] == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()), rel=1e-6)
    assert 0.0 <= out["Brier"] <= 2.0
    assert math.isfinite(out["NLL"]) and out["NLL"] <= -math.log(1e-12) + 1e-9


def test_brier_and_nll_known_values():
    # torch-uncertainty's example: probs [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], targets [0, 2]
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    conf, pred = probs.max(dim=1)
    m = SegmentationMetrics(3)
    m.update(pred, target, conf, probs=probs)
    out = m.compute()
    assert out["Brier"] == pytest.approx(0.52, abs=1e-6)
    assert out["NLL"] == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, rel=1e-6)


def test_aurc_equals_the_sorted_list_computation_without_ties():
    g = torch.Generator().manual_seed(4)
    n = 400
    # scores spread over decades, at least one histogram bin (0.23%) apart: no ties
    score = 1e-5 * torch.pow(torch.tensor(1.0 + 0.01), torch.randperm(n, generator=g).double())
    wrong = torch.rand(n, generator=g) < 0.2 + 0.5 * (score / score.max())
    pred = torch.where(wrong, 1, 0).view(1, 20, 20)
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    m = SegmentationMetrics(2)
    m.update(pred, target, 1.0 - score.view(1, 20, 20).float(), score.view(1, 20, 20).float(),
             mutual_info=score.view(1, 20, 20).float())
    out = m.compute()
    for key in ("AURC_sigma", "AURC_MI"):
        assert out[key] == pytest.approx(_direct_aurc(score, wrong), rel=1e-9), key
    # a perfect ranking gives the oracle value; a reversed one the worst
    assert out["AURC_oracle"] == pytest.approx(
        _direct_aurc(wrong.double() + 1e-3 * torch.rand(n, generator=g, dtype=torch.float64),
                     wrong), rel=1e-9)
    assert out["AURC_oracle"] <= out["AURC_sigma"]


def test_aurc_with_ties_is_the_expected_value_over_tie_orders():
    wrong_hist = torch.tensor([1.0, 0.0, 2.0])
    correct_hist = torch.tensor([2.0, 1.0, 1.0])
    # enumerate all orders inside each bin: bin 0 = {w, c, c}, bin 1 = {c}, bin 2 = {w, w, c}
    import itertools
    blocks = [[1, 0, 0], [0], [1, 1, 0]]
    values = []
    for orders in itertools.product(*(set(itertools.permutations(b)) for b in blocks)):
        seq = [x for block in orders for x in block]
        e = torch.cumsum(torch.tensor(seq, dtype=torch.float64), 0)
        values.append(float((e / torch.arange(1, len(seq) + 1)).mean()))
    assert aurc_from_histograms(wrong_hist, correct_hist) == pytest.approx(
        sum(values) / len(values), rel=1e-12)
    assert math.isnan(aurc_from_histograms(torch.zeros(3), torch.zeros(3)))


def test_auroc_of_mutual_information():
    pred, target, conf, sigma, probs, _ = _probs_case(1, shape=(3, 16, 16))
    wrong = pred != target
    g = torch.Generator().manual_seed(9)
    mi = torch.rand(target.shape, generator=g) * 0.2 + 0.3 * wrong  # informative, overlapping
    m = SegmentationMetrics(5)
    m.update(pred, target, conf, sigma, probs=probs, mutual_info=mi)
    out = m.compute()
    valid = target != 255
    s, w = mi[valid], wrong[valid]
    assert out["AUROC_MI"] == pytest.approx(_direct_auroc(s[w], s[~w]), abs=2e-4)
    assert 0.5 < out["AUROC_MI"] <= 1.0


def test_score_bins_are_monotone_and_resolve_small_scores():
    s = torch.tensor([0.0, 5e-8, 1e-6, 1.003e-6, 1e-3, 0.5, 1.0, 2.0, 50.0])
    b = score_bins(s, 8192)
    assert b.tolist() == sorted(b.tolist())
    assert b[0] == b[1] == 0 and b[2] < b[3] and b[-1] == 8191


def test_sharded_metrics_sum_to_the_whole():
    pred, target, conf, sigma, probs, mi = _probs_case(2, shape=(4, 10, 12))
    whole = SegmentationMetrics(5)
    whole.update(pred, target, conf, sigma, probs=probs, mutual_info=mi)
    halves = [SegmentationMetrics(5), SegmentationMetrics(5)]
    for k, m in enumerate(halves):
        sl = slice(2 * k, 2 * k + 2)
        m.update(pred[sl], target[sl], conf[sl], sigma[sl], probs=probs[sl], mutual_info=mi[sl])
    summed = SegmentationMetrics(5)
    for a, b, c in zip(summed._tensors(), halves[0]._tensors(), halves[1]._tensors(),
                       strict=True):
        a += b + c  # what all_reduce(SUM) does over two ranks
    for a, b in zip(summed._tensors(), whole._tensors(), strict=True):
        if a.dtype == torch.int64:
            assert torch.equal(a, b)
    x, y = summed.compute(), whole.compute()
    for key in ("mIoU", "ECE", "mUnc", "AUROC_sigma", "AUROC_conf", "AUROC_MI", "AURC_sigma",
                "AURC_conf", "AURC_MI", "AURC_oracle", "pixels"):
        assert x[key] == y[key], key  # counts and histograms: exact
    for key in ("NLL", "Brier"):
        assert x[key] == pytest.approx(y[key], rel=1e-12), key  # float64 sums, other order
    assert x["IoU"] == y["IoU"]


def test_deterministic_evaluation_reports_no_mc_metrics():
    pred, target, conf, _, probs, _ = _probs_case(3)
    m = SegmentationMetrics(5)
    m.update(pred, target, conf, probs=probs)
    out = m.compute()
    for key in ("mUnc", "AUROC_sigma", "AURC_sigma", "AUROC_MI", "AURC_MI"):
        assert out[key] is None, key
    for key in ("NLL", "Brier", "AUROC_conf", "AURC_conf"):
        assert out[key] is not None and math.isfinite(out[key]), key
    without = SegmentationMetrics(5)
    without.update(pred, target, conf)
    assert without.compute()["NLL"] is None and without.compute()["Brier"] is None
