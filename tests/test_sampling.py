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
    ref = uce_fast.predictive_uncertainty(reference.resample(stack, (16, 16), True),
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


class _RowScale(nn.Dropout):
    """A deterministic stand-in for dropout (a subclass, so mc_dropout switches it on): in train
    mode the j-th block of ``batch`` rows it has seen is scaled by 1 + 0.1·j, so each pass — or
    each block of B rows of a batched pass — gets its own known factor, without randomness."""

    def __init__(self, batch):
        super().__init__(0.5)
        self.batch = batch
        self.calls = 0

    def forward(self, x):
        if not self.training:
            return x
        blocks = x.shape[0] // self.batch
        index = self.calls + torch.arange(blocks, dtype=x.dtype).repeat_interleave(self.batch)
        self.calls += blocks
        return x * (1 + 0.1 * index).view(-1, *([1] * (x.dim() - 1)))


def _split_model(batch):
    torch.manual_seed(0)
    prefix = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    rest = nn.Sequential(_RowScale(batch), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.3), nn.Conv2d(8, 5, 1))
    return nn.Sequential(prefix, rest)


@pytest.mark.parametrize("train_mode", [False, True], ids=["bn-running", "bn-batch"])
def test_prefix_computed_once_equals_whole_passes(train_mode):
    """The split passes equal the unsplit model's under the same RNG, in both BatchNorm modes."""
    x = torch.randn(3, 3, 6, 6)
    stats = []
    for split in (False, True):
        model = _split_model(3).train(train_mode)
        torch.manual_seed(5)
        if split:
            acc = uce_fast.mc_sample(model, x, 4, prefix=model[0], forward=model[1],
                                     backend="torch")
        else:
            acc = uce_fast.mc_sample(model, x, 4, backend="torch")
        stats.append(acc.stats())
    for a, b in zip(*stats, strict=True):
        assert torch.equal(a, b)


def test_prefix_with_dropout_is_refused():
    model = _split_model(2)
    with pytest.raises(ValueError, match=r"prefix must be .* dropout module '1.0' ran"):
        uce_fast.mc_sample(model, torch.randn(2, 3, 4, 4), 3,
                           prefix=lambda x: model[1][0](model[0](x)), forward=model[1][1:])
    with pytest.raises(ValueError, match="prefix needs forward"):
        uce_fast.mc_sample(model, torch.randn(2, 3, 4, 4), 3, prefix=model[0])


@pytest.mark.parametrize("per_forward", [2, 3])
@pytest.mark.parametrize("train_mode", [False, True], ids=["bn-running", "bn-batch"])
def test_batched_passes_equal_separate_passes(per_forward, train_mode):
    """per_forward=k: BatchNorm with batch statistics normalises each block of B rows on its own,
    so k passes in one forward equal k separate passes."""
    x = torch.randn(2, 3, 5, 5)
    stats = []
    for k in (1, per_forward):
        model = _split_model(2).train(train_mode)
        model[1][4] = nn.Identity()  # only the deterministic stand-in varies between passes
        stats.append(uce_fast.mc_sample(model, x, 5, per_forward=k, backend="torch").stats())
    for a, b in zip(*stats, strict=True):
        if a.dtype == torch.int64:
            assert torch.equal(a, b)
        else:
            assert_close(a, b, scale=10)


def test_batch_norm_per_group_matches_separate_batches():
    from uce_fast.sampling import _per_group_batch_norm

    bn = nn.BatchNorm2d(4)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x = torch.randn(3 * 2, 4, 5, 3)
    got = _per_group_batch_norm(bn, 3)(x)
    want = torch.cat([torch.nn.functional.batch_norm(x[2 * g:2 * g + 2], None, None, bn.weight,
                                                     bn.bias, training=True, eps=bn.eps)
                      for g in range(3)])
    assert_close(got, want)


def test_first_sample_counts_as_a_sample():
    model = _split_model(2).train()
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(3)
    with torch.no_grad():
        first = model(x)
    torch.manual_seed(4)
    acc = uce_fast.mc_sample(model, x, 4, first_sample=first, backend="torch")
    torch.manual_seed(4)
    with torch.no_grad(), uce_fast.mc_dropout(model):
        rest = [model(x) for _ in range(3)]
    want = uce_fast.predictive_uncertainty(torch.stack([first, *rest]), backend="torch")
    assert acc.count == 4
    assert_close(acc.sigma(), want)


def test_first_sample_is_refused_with_running_statistics():
    model = _split_model(2).eval()
    with pytest.raises(ValueError, match=r"first_sample .* BatchNorm layer '0.1' is in eval mode"):
        uce_fast.mc_sample(model, torch.randn(2, 3, 4, 4), 3,
                           first_sample=torch.zeros(2, 5, 4, 4))
