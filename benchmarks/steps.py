"""One whole training step of DeepLabV3+ per variant: CE, U-CE as the official code does it, and
U-CE with uce_fast and its sample-pass levers.

Every variant is forward, loss, backward and an SGD step (the paper's optimiser) on the same model
and batch; the U-CE variants add β no-grad Monte-Carlo-dropout passes:

* ``official-style``: the official code's loop — the model in train mode (dropout on, BatchNorm
  updating its running statistics in every pass) writing each pass into a preallocated float32
  (β, B, C, H, W) stack, then its loss (``baselines.official_style_uce``);
* ``uce_fast``: passes streamed into an ``MCAccumulator`` with BatchNorm batch statistics left
  untouched (``--sample-bn batch``), the fused loss; then each lever of ``train.engine
  .SampleLevers`` on its own, and all of them together with low-resolution samples.

``passes`` helpers time the sample passes alone: β plain no-grad passes of the model, and the
passes as the all-levers step draws them (given the training forward's parts).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from baselines import official_style_uce

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uce_fast  # noqa: E402
from train.engine import SampleLevers, draw_mc_samples, mc_dropout_mode  # noqa: E402
from train.models import build_model, param_groups  # noqa: E402

IGNORE = 255


@dataclass(frozen=True)
class Setting:
    """Model and batch of a step benchmark."""

    batch: int
    size: int
    classes: int = 19
    beta: int = 10
    amp: str = "off"  # "off" or "bf16"
    device: str = "cpu"

    @property
    def label(self) -> str:
        precision = "fp32" if self.amp == "off" else f"{self.amp} AMP"
        return (f"R18 OS16 B={self.batch} {self.size}² C={self.classes} β={self.beta} "
                f"{precision}")


CPU = Setting(batch=2, size=256)
CUDA = Setting(batch=4, size=768, amp="bf16", device="cuda")

#: Step variants: name -> (loss, levers, low-resolution samples).
VARIANTS: dict[str, tuple[str, SampleLevers | None, bool]] = {
    "CE": ("ce", None, False),
    "U-CE official-style": ("official", None, False),
    "U-CE uce_fast": ("uce", SampleLevers(), False),
    "+ shared prefix": ("uce", SampleLevers(shared_prefix=True), False),
    "+ training pass as sample": ("uce", SampleLevers(train_pass_sample=True), False),
    "+ 2 passes per forward": ("uce", SampleLevers(per_forward=2), False),
    "+ low-res samples": ("uce", SampleLevers(), True),
    "all levers": ("uce", SampleLevers(shared_prefix=True, train_pass_sample=True,
                                       per_forward=2), True),
    "all levers but batching": ("uce", SampleLevers(shared_prefix=True,
                                                    train_pass_sample=True), True),
}


def _autocast(s: Setting) -> Callable[[], contextlib.AbstractContextManager]:
    if s.amp == "off":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=s.device, dtype=torch.bfloat16)


def make_problem(s: Setting, seed: int = 0):
    """(model, optimizer, images, labels) at the paper's widths and optimiser."""
    torch.manual_seed(seed)
    model = build_model(s.classes, "resnet18").to(s.device).train()
    optimizer = torch.optim.SGD(param_groups(model, 0.01), lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    gen = torch.Generator(device=s.device).manual_seed(seed)
    images = torch.randn(s.batch, 3, s.size, s.size, device=s.device, generator=gen)
    labels = torch.randint(0, s.classes, (s.batch, s.size, s.size), device=s.device,
                           generator=gen)
    labels[:, :8] = IGNORE
    return model, optimizer, images, labels


def make_step(name: str, s: Setting, model, optimizer, images, labels) -> Callable[[], float]:
    """A callable running one training step of variant ``name``; returns the loss."""
    loss_kind, levers, low_res = VARIANTS[name]
    autocast = _autocast(s)
    criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=IGNORE)
    stack = None
    if loss_kind == "official":
        shape = (s.beta, s.batch, s.classes, s.size, s.size)
        stack = torch.empty(shape, device=s.device, dtype=torch.float32)  # as the official code

    def step() -> float:
        with autocast():
            parts = model(images, parts=True)
        logits = parts.logits
        if loss_kind == "ce":
            loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
        elif loss_kind == "official":
            with torch.no_grad(), autocast():
                for b in range(s.beta):  # train mode: dropout on, BatchNorm statistics updated
                    stack[b] = model(images)
            loss = official_style_uce(logits.float(), labels, stack, ignore_index=IGNORE)
        else:
            size = tuple(logits.shape[-2:]) if low_res else None
            samples, _ = draw_mc_samples(model, images, s.beta, bn="batch", autocast=autocast,
                                         size=size, levers=levers, parts=parts)
            loss = criterion(logits, labels, samples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


#: Sample-pass timings: name -> levers (None: β plain no-grad passes of the whole model).
PASSES: dict[str, tuple[SampleLevers | None, bool]] = {
    "β plain passes": (None, False),
    "β passes, all levers": (VARIANTS["all levers"][1], True),
}


def make_passes(name: str, s: Setting, model, images) -> Callable[[], None]:
    """A callable drawing one step's sample passes (the training forward's parts, which the
    levers reuse, are computed once outside it)."""
    levers, low_res = PASSES[name]
    autocast = _autocast(s)
    with torch.no_grad(), autocast():
        parts = model(images, parts=True)
    size = tuple(parts.logits.shape[-2:]) if low_res else None

    def plain() -> None:
        with torch.no_grad(), mc_dropout_mode(model, "batch"), autocast():
            for _ in range(s.beta):
                model(images)

    def levered() -> None:
        draw_mc_samples(model, images, s.beta, bn="batch", autocast=autocast, size=size,
                        levers=levers, parts=parts)

    return plain if levers is None else levered
