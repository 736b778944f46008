"""β sample passes with ``uce_fast.MCSampler`` against β plain passes, on the models users bring.

Per model: the median time of β plain no-grad passes under ``mc_dropout`` and of
``sampler.sample(images, β)`` right after a training forward on the same images (the levers it
found reuse that forward), over rounds in which both take their turn; on this repository's
DeepLabV3+ also the hand-written levers of the training harness (``train.engine.draw_mc_samples``
with the shared prefix, the training pass as a sample and low-resolution samples). Models whose
package is not installed are skipped (smp, torchvision and transformers run with torch 2.11's
wheel, see .ci/cuda-stack). CPU: B=2, 128², β=10, fp32. Results: ``results/sampler-cpu.json``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uce_fast  # noqa: E402

BATCH, SIZE, BETA, ROUNDS = 2, 128, 10, 5
SHAPE = f"B={BATCH} {SIZE}² β={BETA} fp32"


def _smp(arch):
    import segmentation_models_pytorch as smp

    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=19)
    uce_fast.add_dropout(model.encoder, 0.1)  # the paper's dropout after each encoder stage
    return model


def _tv(name):
    import torchvision.models.segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=19)


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=19, drop_path_rate=0.1))


def _repo():
    from train.models import build_model

    return build_model(19, "resnet18")


MODELS = {  # name -> (factory, module needed, (size, align_corners) the loss resamples to)
    "train.models DeepLabV3+ R18": (_repo, "torch", None),
    "smp DeepLabV3+ R18": (lambda: _smp("DeepLabV3Plus"), "segmentation_models_pytorch", None),
    "smp Unet R18": (lambda: _smp("Unet"), "segmentation_models_pytorch", None),
    "smp FPN R18": (lambda: _smp("FPN"), "segmentation_models_pytorch", None),
    "torchvision DeepLabV3 R50": (lambda: _tv("deeplabv3_resnet50"), "torchvision", None),
    "torchvision FCN R50": (lambda: _tv("fcn_resnet50"), "torchvision", None),
    "SegFormer-B0": (_segformer, "transformers", ((SIZE, SIZE), False)),
}


def _medians(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per callable, taking turns within each round after a warm-up round; a
    callable that returns a float reports its own timed part."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            own = fn()
            elapsed = own if isinstance(own, float) else time.perf_counter() - start
            if r:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.parametrize("name", [
    pytest.param(n, id=n, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None,
                                                   reason=f"{m} is not installed"))
    for n, (_, m, _) in MODELS.items()])
def test_sampler_passes(record, name):
    factory, _, resample = MODELS[name]
    torch.manual_seed(0)
    model = factory().train()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    size, align_corners = resample or (None, None)
    sampler = uce_fast.MCSampler(model)
    model(images)
    sampler.sample(images, BETA, size=size, align_corners=align_corners)  # the probe

    def plain() -> None:
        with torch.no_grad(), uce_fast.mc_dropout(model):
            for _ in range(BETA):
                model(images)

    def with_sampler() -> float:
        model(images)  # the training forward (not timed), whose work the sampler may reuse
        start = time.perf_counter()
        sampler.sample(images, BETA, size=size, align_corners=align_corners)
        return time.perf_counter() - start

    fns = {"β plain passes": plain, "MCSampler": with_sampler}
    if name.startswith("train.models"):
        from train.engine import SampleLevers, draw_mc_samples

        levers = SampleLevers(shared_prefix=True, train_pass_sample=True)

        def hand_written() -> float:
            parts = model(images, parts=True)
            start = time.perf_counter()
            draw_mc_samples(model, images, BETA, bn="batch", size=(SIZE, SIZE), levers=levers,
                            parts=parts)
            return time.perf_counter() - start

        fns["hand-written levers"] = hand_written
    medians = _medians(fns, ROUNDS)
    levers = "; ".join(f"{k}: {v.split(':')[0]}" for k, v in sampler.levers.items())
    for impl, median in medians.items():
        record("sampler-cpu", shape=SHAPE, model=name, impl=impl, median_s=median,
               plain_s=medians["β plain passes"], levers=levers)
    assert medians["MCSampler"] > 0
