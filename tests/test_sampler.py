"""MCSampler: the levers it finds by itself are exact (the samples of plain passes under the same
random state), the ones that would not be are refused, and bad models get clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_sampler_exact, plain_passes
from torch import nn
from torch.overrides import TorchFunctionMode

import uce_fast
from uce_fast import MCSampler, add_dropout


class Counter(TorchFunctionMode):
    """Counts torch calls by name."""

    def __init__(self):
        super().__init__()
        self.n: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "?")
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class DropPath(nn.Module):
    """timm's DropPath: random per sample, but not a dropout module."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Net(nn.Module):
    """A small segmentation net: stem, two stages, a head at 1/2 resolution, and an output that
    is upsampled (module or F.interpolate) or not, returned as a tensor, dict, object or tuple."""

    def __init__(self, classes=4, *, upsample="module", align_corners=True, output="tensor",
                 drop="module", drop_path=0.0, first_bn=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(8) if first_bn else nn.Identity(), nn.ReLU())
        self.drop_path = DropPath(drop_path)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout2d(0.3) if drop == "module" else None
        self.functional_drop = drop == "functional"
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)
        self.upsample_kind = upsample
        self.align_corners = align_corners
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.output = output

    def forward(self, x):
        size = x.shape[-2:]
        h = self.drop_path(self.stage1(self.stem(x)))
        if self.drop is not None:
            h = self.drop(h)
        elif self.functional_drop:
            h = F.dropout(h, 0.3, training=self.training)
        logits = self.head(self.stage2(h))
        if self.upsample_kind == "module":
            logits = self.up(logits)
        elif self.upsample_kind == "functional":
            logits = F.interpolate(logits, size=size, mode="bilinear",
                                   align_corners=self.align_corners)
        if self.output == "dict":
            return {"out": logits, "aux": logits.detach() * 0}
        if self.output == "object":
            return type("Output", (), {"logits": logits})()
        if self.output == "tuple":
            return logits, h
        return logits


@pytest.mark.parametrize("upsample", ["module", "functional"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("output", ["tensor", "dict", "object", "tuple"])
def test_levers_found_and_exact(upsample, align_corners, output):
    torch.manual_seed(0)
    model = Net(upsample=upsample, align_corners=align_corners, output=output).train()
    sampler = assert_sampler_exact(model, torch.randn(2, 3, 16, 12))
    assert sampler.levers["shared_prefix"] == "used: stem, stage1, drop_path"
    assert sampler.levers["low_res"] == "used" and sampler.levers["train_pass"] == "used"
    assert sampler._plan.final_interp.align_corners is align_corners


def test_levers_save_the_work_they_claim():
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 3, 16, 12)
    sampler = MCSampler(model)
    model(x)
    sampler.sample(x, 4)  # the probe
    model(x)
    with Counter() as c:
        sampler.sample(x, 4)
    assert sampler.last == {"train_pass": True, "prefix_from_training": True,
                            "reuse_refused": ""}
    # 3 passes (the training pass is the first sample) of stage2 + head only; no upsampling.
    assert c.n["conv2d"] == 3 * 2 and c.n.get("interpolate", 0) == 0
    with Counter() as c:  # no training forward on these inputs: the prefix is computed once
        sampler.sample(x, 4)
    assert c.n["conv2d"] == 2 + 4 * 2


def test_no_upsampling_in_the_model_needs_size_and_align_corners():
    torch.manual_seed(0)
    model = Net(upsample="none", output="object").train()
    x = torch.randn(2, 3, 16, 12)
    with pytest.raises(ValueError, match="size needs align_corners"):
        MCSampler(model).sample(x, 3, size=(16, 12))
    sampler = assert_sampler_exact(model, x, size=(16, 12), align_corners=False)
    assert sampler.levers["low_res"].startswith("not used: the model does not upsample")


def test_stochastic_depth_ends_the_prefix():
    torch.manual_seed(0)
    model = Net(drop_path=0.2).train()
    sampler = assert_sampler_exact(model, torch.randn(2, 3, 16, 12))
    # DropPath draws random numbers (bernoulli_) inside 'drop_path': nothing after it is cached.
    assert sampler.levers["shared_prefix"] == "used: stem, stage1"


def test_eval_mode_batch_norm_and_a_mode_change():
    torch.manual_seed(0)
    model = Net().eval()
    assert_sampler_exact(model, torch.randn(2, 3, 16, 12))  # BatchNorm with running statistics
    model.train()
    x = torch.randn(2, 3, 16, 12)
    sampler = MCSampler(model)
    model(x)
    sampler.sample(x, 3)
    model(x)                    # training forward in train mode ...
    model.stem[1].eval()        # ... but its BatchNorm changes mode before the samples
    torch.manual_seed(5)
    acc = sampler.sample(x, 3)
    assert not sampler.last["train_pass"] and "modes" in sampler.last["reuse_refused"]
    torch.manual_seed(5)
    want = uce_fast.predictive_uncertainty(plain_passes(model, x, 3), backend="torch")
    torch.testing.assert_close(acc.sigma(), want, rtol=1e-4, atol=2e-6)


def test_functional_dropout_follows_the_mode():
    torch.manual_seed(0)
    model = Net(drop="functional").train()
    assert_sampler_exact(model, torch.randn(2, 3, 16, 12))
    model.eval()
    with pytest.raises(ValueError, match=r"training=False \(F\.dropout in .*cannot be switched on"):
        MCSampler(model).sample(torch.randn(2, 3, 16, 12), 3)


def test_a_model_without_dropout_is_refused():
    model = Net(drop="none").train()
    with pytest.raises(ValueError, match=r"no active dropout.*sigma = 0"):
        MCSampler(model).sample(torch.randn(2, 3, 16, 12), 3)


def test_levers_asked_for_where_not_exact_raise():
    model = Net(upsample="none").train()
    with pytest.raises(ValueError, match=r"low_res=True is not exact.*does not upsample"):
        MCSampler(model, low_res=True).sample(torch.randn(2, 3, 16, 12), 3, size=(16, 12),
                                              align_corners=True)
    model = Net(drop_path=0.5).train()
    model.stem = nn.Sequential(DropPath(0.5), model.stem)
    with pytest.raises(ValueError, match=r"shared_prefix=True is not exact.*bernoulli_"):
        MCSampler(model, shared_prefix=True).sample(torch.randn(2, 3, 16, 12), 3)


def test_train_pass_required_but_not_exact_raises():
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 3, 16, 12)
    sampler = MCSampler(model, train_pass=True)
    model(x)
    sampler.sample(x, 3)
    model(x)
    model.stem[1].eval()  # BatchNorm changes mode between the training forward and the passes
    with pytest.raises(ValueError, match=r"train_pass=True.*BatchNorm modes"):
        sampler.sample(x, 3)
    model.stem[1].train()
    with pytest.raises(ValueError, match=r"train_pass=True.*other inputs"):
        model(x)
        sampler.sample(x.clone(), 3)


def test_levers_off_are_plain_passes():
    torch.manual_seed(0)
    model = Net().train()
    sampler = assert_sampler_exact(model, torch.randn(2, 3, 16, 12), shared_prefix=False,
                           low_res=False, train_pass=False)
    assert set(sampler.levers.values()) == {"off"}


def test_per_forward_batches_passes_and_keeps_running_statistics():
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 3, 16, 12)
    sampler = MCSampler(model, per_forward=3)
    before = [b.clone() for b in model.buffers()]
    acc = sampler.sample(x, 7)
    assert acc.count == 7 and acc.shape == (2, 4, 16, 12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    with Counter() as c:
        model(x)
        sampler.sample(x, 7)
    assert c.n["conv2d"] == 4 + 2 + 2  # training forward, then 6 passes in 2 forwards


def test_the_loss_takes_the_sampler_accumulator():
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 3, 16, 12)
    labels = torch.randint(0, 4, (2, 16, 12))
    sampler = MCSampler(model)
    criterion = uce_fast.UCELoss()
    for _ in range(2):
        logits = model(x)
        loss = criterion(logits, labels, sampler.sample(x, 4))
        loss.backward()
        assert torch.isfinite(loss)


def test_add_dropout_after_each_stage():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            for i in range(1, 5):
                setattr(self, f"layer{i}", nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            x = self.conv1(x)
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return x

    encoder = add_dropout(Encoder(), 0.2)
    assert isinstance(encoder.layer3[1], nn.Dropout2d) and encoder.layer3[1].p == 0.2
    sampler = MCSampler(encoder.train())
    x = torch.randn(1, 3, 8, 8)
    sampler.sample(x, 3)
    assert sampler.levers["shared_prefix"] == "used: conv1, layer1.0"
    with pytest.raises(ValueError, match=r"needs stages.*has children"):
        add_dropout(nn.Sequential(nn.Conv2d(3, 3, 1)))
