"""UCELoss: a drop-in nn.Module with the options of uce_loss."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend_params, device_of, make_case
from torch import nn

import uce_fast


@pytest.mark.parametrize("backend", backend_params())
def test_module_equals_functional(backend):
    input, target, samples = make_case(2, 19, (7, 9), 4, device=device_of(backend),
                                       ignore_index=255)
    weight = torch.rand(19, device=input.device)
    options = dict(alpha=5.0, ignore_index=255, reduction="sum", weight=weight,
                   label_smoothing=0.05, avg_non_ignore=False, correction=0, backend=backend)
    module = uce_fast.UCELoss(**options)
    assert_close(module(input, target, samples), uce_fast.uce_loss(input, target, samples,
                                                                   **options))
    sigma = uce_fast.predictive_uncertainty(samples, correction=0)
    assert_close(module(input, target, sigma=sigma), module(input, target, samples))


def test_module_defaults_and_buffer():
    module = uce_fast.UCELoss(weight=torch.ones(3))
    assert (module.alpha, module.ignore_index, module.reduction) == (10.0, -100, "mean")
    assert (module.label_smoothing, module.avg_non_ignore, module.correction) == (0.0, True, 1)
    assert module.backend == "auto"
    assert "weight" in dict(module.named_buffers())
    assert "weight" in module.state_dict()
    assert module.to(torch.float64).weight.dtype == torch.float64
    assert "alpha=10.0" in repr(module)
    assert uce_fast.UCELoss().weight is None


def test_module_in_a_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
                          nn.Conv2d(8, 5, 1))
    criterion = uce_fast.UCELoss(ignore_index=255)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 5, (2, 8, 8))
    losses = []
    for _ in range(5):
        logits = model(images)
        with torch.no_grad():
            samples = torch.stack([model(images) for _ in range(3)])
        loss = criterion(logits, labels, samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
