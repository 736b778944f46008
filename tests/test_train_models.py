"""Training-harness models: DeepLabV3+ shapes, output stride/dilation, torchvision ResNet keys,
pretrained loading and the parameter groups."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.models import ResNetEncoder, build_model, param_groups  # noqa: E402

# torchvision.models.resnet18().state_dict().keys(), in order.
TORCHVISION_RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var", "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight", "layer1.1.bn1.weight", "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean", "layer1.1.bn1.running_var", "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight", "layer1.1.bn2.weight", "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean", "layer1.1.bn2.running_var", "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean", "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight", "layer2.0.bn2.weight", "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var", "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked", "layer2.1.conv1.weight", "layer2.1.bn1.weight",
    "layer2.1.bn1.bias", "layer2.1.bn1.running_mean", "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked", "layer2.1.conv2.weight", "layer2.1.bn2.weight",
    "layer2.1.bn2.bias", "layer2.1.bn2.running_mean", "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked", "layer3.0.conv1.weight", "layer3.0.bn1.weight",
    "layer3.0.bn1.bias", "layer3.0.bn1.running_mean", "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked", "layer3.0.conv2.weight", "layer3.0.bn2.weight",
    "layer3.0.bn2.bias", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked", "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight", "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean", "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked", "layer3.1.conv1.weight", "layer3.1.bn1.weight",
    "layer3.1.bn1.bias", "layer3.1.bn1.running_mean", "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked", "layer3.1.conv2.weight", "layer3.1.bn2.weight",
    "layer3.1.bn2.bias", "layer3.1.bn2.running_mean", "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked", "layer4.0.conv1.weight", "layer4.0.bn1.weight",
    "layer4.0.bn1.bias", "layer4.0.bn1.running_mean", "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked", "layer4.0.conv2.weight", "layer4.0.bn2.weight",
    "layer4.0.bn2.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked", "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight", "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean", "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked", "layer4.1.conv1.weight", "layer4.1.bn1.weight",
    "layer4.1.bn1.bias", "layer4.1.bn1.running_mean", "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked", "layer4.1.conv2.weight", "layer4.1.bn2.weight",
    "layer4.1.bn2.bias", "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked", "fc.weight", "fc.bias",
]


def test_resnet18_state_dict_keys_are_torchvision_keys():
    encoder = ResNetEncoder("resnet18")
    keys = list(encoder.state_dict().keys())
    assert keys == [k for k in TORCHVISION_RESNET18_KEYS if not k.startswith("fc.")]
    state = encoder.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert encoder.out_channels == 512 and encoder.low_level_channels == 64


def test_resnet101_keys_and_bottleneck_shapes():
    state = ResNetEncoder("resnet101").state_dict()
    blocks = {k.split(".")[0]: int(k.split(".")[1]) + 1 for k in state if k.startswith("layer")}
    assert blocks == {"layer1": 3, "layer2": 4, "layer3": 23, "layer4": 3}
    assert state["layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert "layer1.0.bn3.running_var" in state and "layer1.0.downsample.1.weight" in state
    assert len(state) == 624  # torchvision's 626, less fc.weight and fc.bias


@pytest.mark.parametrize("name", ["resnet18", "resnet101"])
def test_output_stride_16_with_dilated_layer4(name):
    encoder = ResNetEncoder(name, width=8)
    for module_name, m in encoder.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if module_name.startswith("layer4"):
            assert m.stride == (1, 1), module_name
            if m.kernel_size == (3, 3):
                assert m.dilation == (2, 2) and m.padding == (2, 2), module_name
        else:
            assert m.dilation == (1, 1), module_name
    assert encoder.layer3[0].downsample[0].stride == (2, 2)
    low, high = encoder(torch.randn(2, 3, 64, 96))
    assert low.shape[-2:] == (16, 24)  # stride 4
    assert high.shape[-2:] == (4, 6)  # stride 16
    assert high.shape[1] == encoder.out_channels and low.shape[1] == encoder.low_level_channels


def test_deeplab_output_shapes_and_structure():
    torch.manual_seed(0)
    model = build_model(5, "resnet18", dropout=0.1, width=8, decoder_channels=32,
                        skip_channels=12, atrous_rates=(2, 4, 6))
    x = torch.randn(2, 3, 64, 96)
    assert model(x).shape == (2, 5, 64, 96)
    assert model(x, upsample=False).shape == (2, 5, 16, 24)
    model.eval()
    full, low = model(x), model(x, upsample=False)
    ref = nn.functional.interpolate(low, scale_factor=4, mode="bilinear", align_corners=True)
    torch.testing.assert_close(full, ref)
    # MC dropout after each of the four stages; the ASPP projection's Dropout(0.5)
    assert model.encoder.dropout.p == 0.1
    assert model.decoder.aspp[0].project[-1].p == 0.5
    # separable atrous branches (depthwise + pointwise) with the given rates
    rates = [b[0][0].dilation[0] for b in model.decoder.aspp[0].convs[1:4]]
    assert rates == [2, 4, 6]
    depthwise = model.decoder.aspp[0].convs[1][0][0]
    assert depthwise.groups == depthwise.in_channels == model.encoder.out_channels
    assert model.decoder.block1[0].out_channels == 12
    assert model.head.out_channels == 5
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 3, 40, 48))


def test_paper_sized_decoder_defaults():
    model = build_model(19, "resnet18")
    assert model.decoder.block1[0].out_channels == 48
    assert model.decoder.block2[0][1].out_channels == 256
    assert [b[0][0].dilation[0] for b in model.decoder.aspp[0].convs[1:4]] == [12, 24, 36]


def _torchvision_style_file(tmp_path: Path, name: str = "resnet18") -> tuple[Path, dict]:
    torch.manual_seed(1)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in ResNetEncoder(name).state_dict().items()
             if not k.endswith("num_batches_tracked")}  # as in torchvision's own files
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    path, state = _torchvision_style_file(tmp_path)
    model = build_model(19, "resnet18", pretrained=path)
    loaded = model.encoder.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    build_model(19, "resnet18", pretrained=tmp_path / "wrapped.pth")


def test_pretrained_key_and_shape_checks(tmp_path):
    path, state = _torchvision_style_file(tmp_path)
    broken = dict(state)
    del broken["layer3.1.bn2.running_mean"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"layer3\.1\.bn2\.running_mean.*layer5\.0\.conv1"):
        build_model(19, "resnet18", pretrained=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=re.escape("conv1.weight: (64, 3, 7, 7) vs (8, 3, 7, 7)")):
        build_model(19, "resnet18", width=8, pretrained=path)
    with pytest.raises(ValueError, match="missing keys"):
        build_model(19, "resnet101", pretrained=path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model(19, "resnet18", pretrained=tmp_path / "absent.pth")


def test_param_groups_split_encoder_and_decoder_head():
    model = build_model(7, "resnet18", width=8, decoder_channels=16, skip_channels=8)
    groups = param_groups(model, lr=0.01)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    enc = {id(p) for p in groups[0]["params"]}
    dec = {id(p) for p in groups[1]["params"]}
    assert enc == {id(p) for p in model.encoder.parameters()}
    assert dec == {id(p) for p in [*model.decoder.parameters(), *model.head.parameters()]}
    assert enc | dec == {id(p) for p in model.parameters()} and not enc & dec
