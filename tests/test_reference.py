"""The reference against an independent per-pixel float64 loop over the formulas of U-CE."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, make_case

from uce_fast import reference


def _loop_uce(input, target, samples, alpha, weight, ignore_index, smoothing, correction):
    batch, classes = input.shape[:2]
    x = input.detach().double().reshape(batch, classes, -1)
    s = samples.double().reshape(samples.shape[0], batch, classes, -1)
    t = target.reshape(batch, -1)
    w = [1.0] * classes if weight is None else weight.double().tolist()
    out = torch.zeros(t.shape, dtype=torch.float64)
    beta = s.shape[0]
    for b in range(batch):
        for n in range(t.shape[1]):
            probs = [[math.exp(v) for v in s[i, b, :, n].tolist()] for i in range(beta)]
            probs = [[v / sum(row) for v in row] for row in probs]
            mean = [sum(p[c] for p in probs) / beta for c in range(classes)]
            k = max(range(classes), key=lambda c: (mean[c], -c))
            var = sum((p[k] - mean[k]) ** 2 for p in probs) / (beta - correction)
            label = int(t[b, n])
            if label == ignore_index:
                continue
            row = x[b, :, n].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            ce = (1 - smoothing) * w[label] * (lse - row[label])
            ce += smoothing / classes * sum(w[c] * (lse - row[c]) for c in range(classes))
            out[b, n] = (1 + math.sqrt(var)) ** alpha * ce
    return out.reshape(target.shape)


@pytest.mark.parametrize("spatial", [(), (5,), (3, 2)], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("correction", [0, 1])
def test_reference_matches_loop(spatial, weighted, smoothing, correction):
    input, target, samples = make_case(3, 4, spatial, 3, dtype=torch.float64, ignore_index=-1)
    weight = torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=torch.float64) if weighted else None
    sigma = reference.mc_uncertainty(samples, correction)[0]
    got = reference.weighted_cross_entropy(
        input, target, reference.uncertainty_weight(sigma, 2.5), weight=weight, ignore_index=-1,
        label_smoothing=smoothing)
    expected = _loop_uce(input, target, samples, 2.5, weight, -1, smoothing, correction)
    assert_close(got.detach(), expected)


def test_reference_dtypes():
    input, target, samples = make_case(2, 3, (4,), 2, dtype=torch.bfloat16)
    sigma, pred = reference.mc_uncertainty(samples)
    assert sigma.dtype == torch.float32 and pred.dtype == torch.int64
    loss = reference.weighted_cross_entropy(input, target, reference.uncertainty_weight(sigma, 1))
    assert loss.dtype == torch.float32
    assert reference.compute_dtype(input, None, samples.double()) == torch.float64
