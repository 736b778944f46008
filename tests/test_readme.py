"""The README's quick-start code block, run as a user copies it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_trains_and_draws_exact_cheap_samples():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Dropout2d(0.2), nn.Conv2d(8, 5, 1),
        nn.UpsamplingBilinear2d(scale_factor=2)).train()
    namespace = {"model": model}
    exec(compile(_quick_start(), "README quick start", "exec"), namespace)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    running = model[1].running_mean.clone()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, 0] = 255
    losses = [float(namespace["training_step"](model, images, labels, optimizer).detach())
              for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    sampler = namespace["sampler"]
    assert sampler.levers == {"shared_prefix": "used: 0, 1, 2", "low_res": "used",
                              "train_pass": "used"}
    assert sampler.last["train_pass"] and sampler.last["prefix_from_training"]
    # Only the three training forwards moved the BatchNorm statistics, not the 27 sample passes.
    assert not torch.equal(model[1].running_mean, running)
    assert int(model[1].num_batches_tracked) == 3
