"""α warm-up of the training harness: the schedule, its option, and the loss at exponent 0."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uce_fast  # noqa: E402
from train.config import PRESETS, alpha_at, parse_args, warmup_iterations  # noqa: E402
from train.engine import compute_loss  # noqa: E402


def test_linear_ramp_from_zero_to_alpha():
    assert [alpha_at(10.0, i, 4) for i in range(7)] == [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0]
    assert [alpha_at(10.0, i, 0) for i in range(3)] == [10.0, 10.0, 10.0]  # off
    assert alpha_at(3.0, 50, 100) == pytest.approx(1.5)


def test_warmup_option_in_iterations_or_percent():
    assert warmup_iterations("0", 500) == 0
    assert warmup_iterations("40", 500) == 40
    assert warmup_iterations("25%", 500) == 125
    assert warmup_iterations("10%", 7440) == 744
    assert parse_args(["--alpha-warmup", "25%"]).alpha_warmup == "25%"
    for bad in ("-3", "abc", "120%", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--alpha-warmup", bad])
    with pytest.raises(SystemExit):
        parse_args(["--loss", "ce", "--alpha-warmup", "10"])


def test_warmup_is_off_in_every_preset():
    for name in PRESETS:
        assert parse_args(["--preset", name]).alpha_warmup == "0", name


def test_exponent_zero_is_cross_entropy_without_samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, 0] = 255
    samples = torch.randn(3, 2, 5, 6, 7, generator=g)
    criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=255)
    ce = F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(compute_loss("uce", criterion, logits, target, None, 255,
                                            alpha=0.0), ce)
    # the exponent of a step is the criterion's for that call
    ramp = compute_loss("uce", criterion, logits, target, samples, 255, alpha=2.5)
    torch.testing.assert_close(ramp, uce_fast.uce_loss(logits, target, samples, alpha=2.5,
                                                       ignore_index=255))
    assert criterion.alpha == 2.5
    with pytest.raises(ValueError, match="needs the MC samples"):
        compute_loss("uce", criterion, logits, target, None, 255, alpha=1.0)
