"""mc_dropout and mc_sample: dropout on, BatchNorm untouched, samples into an accumulator."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend_params, device_of
from torch import nn

import uce_fast
from uce_fast import reference


def _model(classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout2d(0.5), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                         nn.Dropout(0.3), nn.Conv2d(8, classes, 1))


def _bn_buffers(model):
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_mc_dropout_turns_dropout_on_and_leaves_batchnorm_alone(train_mode):
    model = _model()
    model[1].running_mean.uniform_(-1, 1)  # not the identity statistics
    model.train(train_mode)
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = _bn_buffers(model)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad(), uce_fast.mc_dropout(model) as same:
        assert same is model
        assert model[3].training and model[6].training
        assert model[1].training == train_mode and model[5].training == train_mode
        a, b = model(x), model(x)
        assert not torch.equal(a, b)  # dropout draws fresh masks
        hidden = model[0](x)
        normed = model[1](hidden)
    expected_stats = (hidden.mean((0, 2, 3)), hidden.var((0, 2, 3), unbiased=False)) \
        if train_mode else (model[1].running_mean, model[1].running_var)
    expected = (hidden - expected_stats[0].view(1, -1, 1, 1)) / torch.sqrt(
        expected_stats[1].view(1, -1, 1, 1) + model[1].eps)
    expected = expected * model[1].weight.view(1, -1, 1, 1) + model[1].bias.view(1, -1, 1, 1)
    assert_close(normed, expected, scale=10)
    for before, after in zip(buffers, _bn_buffers(model), strict=True):
        assert torch.equal(before, after)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_mc_dropout_restores_on_exception():
    model = _model().eval()
    with pytest.raises(RuntimeError, match="boom"), uce_fast.mc_dropout(model):
        raise RuntimeError("boom")
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("backend", backend_params(["torch", "cpu"]))
@pytest.mark.parametrize("per_forward", [1, 3, 7])
def test_mc_sample_draws_beta_samples(backend, per_forward):
    model = _model().eval()
    buffers = _bn_buffers(model)
    x = torch.randn(2, 3, 8, 8, device=device_of(backend))
    torch.manual_seed(1)
    acc = uce_fast.mc_sample(model, x, 7, per_forward=per_forward, backend=backend)
    assert acc.count == 7 and acc.shape == (2, 5, 8, 8) and acc.backend == backend
    assert float(acc.sigma().mean()) > 0  # dropout was on
    assert not model[3].training  # and is off again
    for before, after in zip(buffers, _bn_buffers(model), strict=True):
        assert torch.equal(before, after)


def test_mc_sample_splits_batched_forwards_into_their_samples():
    """With several samples per forward, sample j is rows [j·B, (j+1)·B) of the output."""
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        rows = torch.arange(x.shape[0], dtype=torch.float32).view(-1, 1, 1, 1)
        logits = x[:, :1].repeat(1, 3, 1, 1).clone()
        logits[:, 0:1] += rows // 2 + 0.1 * torch.arange(2).repeat(x.shape[0] // 2).view(-1, 1,
                                                                                        1, 1)
        return logits

    x = torch.randn(2, 1, 4, 4)
    acc = uce_fast.mc_sample(nn.Identity(), x, 5, per_forward=2, forward=forward,
                             backend="torch")
    assert calls == [4, 4, 2]
    expected = uce_fast.MCAccumulator(backend="torch")
    for rows in (forward(x.repeat(2, 1, 1, 1)), forward(x.repeat(2, 1, 1, 1)), forward(x)):
        expected.update_stack(rows.view(-1, 2, 3, 4, 4))
    for a, b in zip(acc.stats(), expected.stats(), strict=True):
        assert torch.equal(a, b)


def test_mc_sample_low_resolution_head():
    """A model predicting at 1/4 resolution, upsampled inside the kernels."""
    model = _model().eval()
    x = torch.randn(1, 3, 16, 16)

    def low_res(inp):
        return model(inp[:, :, ::4, ::4])

    torch.manual_seed(2)
    acc = uce_fast.mc_sample(model, x, 4, forward=low_res, size=(16, 16), align_corners=True,
                             backend="torch")
    torch.manual_seed(2)
    with torch.no_grad(), uce_fast.mc_dropout(model):
        stack = torch.stack([low_res(x) for _ in range(4)])
    ref = uce_fast.predictive_uncertainty(reference.upsample(stack, (16, 16), True),
                                          backend="torch")
    assert acc.shape == (1, 5, 16, 16)
    assert_close(acc.sigma(), ref)


def test_mc_sample_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="beta must be a positive int"):
        uce_fast.mc_sample(model, torch.randn(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="per_forward must be a positive int"):
        uce_fast.mc_sample(model, torch.randn(1, 3, 4, 4), 2, per_forward=0)
    with pytest.raises(ValueError, match="the forward must return logits"):
        uce_fast.mc_sample(model, torch.randn(1, 3, 4, 4), 2, forward=lambda x: x[0])
