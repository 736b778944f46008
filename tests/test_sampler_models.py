"""MCSampler on the models users bring (tiny configs, no downloaded weights): exact against plain
passes, and each lever found or refused as expected. segmentation_models_pytorch, torchvision and
transformers are needed (the CI installs them with torch 2.11's wheel, ``.ci/cuda-stack``: PyPI's
torchvision is a CUDA build that does not import with a CPU-only torch); skipped without them."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_sampler_exact

from uce_fast import MCSampler, add_dropout

PREFIX_SMP = ("used: encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool, "
              "encoder.layer1.0")


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed")


def _smp(arch: str):
    import segmentation_models_pytorch as smp

    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=5)
    add_dropout(model.encoder, 0.1)  # the paper's dropout after each encoder stage
    return model


def _torchvision(name: str):
    import torchvision.models.segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=5)


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=5, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=32,
                             drop_path_rate=0.1)
    return SegformerForSemanticSegmentation(config)


def _repo_model():
    from train.models import build_model

    return build_model(5, width=16, decoder_channels=32, skip_channels=8)


# name, factory, needed module, expected levers (the start of each lever's report, or one per
# mode), resample size.
MODELS = [
    ("smp.DeepLabV3Plus", lambda: _smp("DeepLabV3Plus"), "segmentation_models_pytorch",
     {"shared_prefix": PREFIX_SMP, "low_res": "used", "train_pass": "used"}, None),
    ("smp.Unet", lambda: _smp("Unet"), "segmentation_models_pytorch",
     {"shared_prefix": PREFIX_SMP, "low_res": "not used: the model does not upsample",
      "train_pass": "used"}, None),
    ("smp.FPN", lambda: _smp("FPN"), "segmentation_models_pytorch",
     {"shared_prefix": PREFIX_SMP, "low_res": "used", "train_pass": "used"}, None),
    ("torchvision.deeplabv3_resnet50", lambda: _torchvision("deeplabv3_resnet50"),
     "torchvision",
     {"shared_prefix": "used: backbone, classifier.0.convs.0", "low_res": "used",
      "train_pass": "used"}, None),
    ("torchvision.fcn_resnet50", lambda: _torchvision("fcn_resnet50"), "torchvision",
     {"shared_prefix": "used: backbone, classifier.0, classifier.1, classifier.2",
      "low_res": "used", "train_pass": "used"}, None),
    ("transformers.SegFormer", _segformer, "transformers",
     # In train mode stochastic depth (torch.rand in SegformerDropPath) ends the prefix in
     # stage 1; in eval mode it is off and the whole encoder runs once.
     {"shared_prefix": {"train": "used: segformer.stages.0, segformer.stages.1.patch_embeddings",
                        "eval": "used: segformer, decode_head.linear_projections.0"},
      "low_res": "not used: the model does not upsample", "train_pass": "used"}, (64, 64)),
    ("train.models.DeepLabV3Plus", _repo_model, "torch",
     {"shared_prefix": "used: encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool, "
                       "encoder.layer1", "low_res": "used", "train_pass": "used"}, None),
]


@pytest.mark.parametrize(("name", "factory", "module", "levers", "size"),
                         [pytest.param(*m, id=m[0], marks=_needs(m[2])) for m in MODELS])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sampler_on_the_models_users_bring(name, factory, module, levers, size, mode):
    torch.manual_seed(0)
    model = factory().train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    sampler = assert_sampler_exact(model, x, beta=4, size=size,
                                   align_corners=None if size is None else False)
    for lever, want in levers.items():
        want = want[mode] if isinstance(want, dict) else want
        assert sampler.levers[lever].startswith(want), (lever, sampler.levers[lever])
    # The training forward is a sample only when its dropout was on (train mode).
    assert sampler.last["train_pass"] == (mode == "train")
    assert sampler.last["prefix_from_training"]


@_needs("torchvision")
def test_a_model_without_dropout_is_refused():
    """torchvision's LR-ASPP MobileNetV3 has no dropout in its segmentation form."""
    model = _torchvision("lraspp_mobilenet_v3_large").train()
    with pytest.raises(ValueError, match=r"no active dropout"):
        MCSampler(model).sample(torch.randn(2, 3, 64, 64), 3)
