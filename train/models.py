"""DeepLabV3+ with a Monte-Carlo-dropout ResNet encoder, in plain PyTorch.

The architecture follows the official U-CE code, which uses segmentation_models_pytorch's
``DeepLabV3Plus(encoder_output_stride=16, decoder_channels=256, decoder_atrous_rates=(12, 24, 36),
upsampling=4)`` with the encoder replaced by a ResNet that applies ``nn.Dropout(p)`` after each of
the four residual stages:

* encoder: torchvision ResNet (BasicBlock for ResNet-18, Bottleneck for ResNet-101) whose
  state_dict keys are torchvision's (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``), so
  ImageNet weights load directly; output stride 16: every conv of ``layer4`` has stride 1 and
  dilation 2 (padding ``(k // 2) * 2``), as smp's ``make_dilated(16)``;
* ASPP on the ``layer4`` features: a 1×1 branch, three separable 3×3 branches with rates
  12/24/36 (depthwise + pointwise, BN, ReLU), an image-pooling branch, then a 1×1 projection with
  BN, ReLU and ``Dropout(0.5)``, then a separable 3×3 conv + BN + ReLU;
* ×4 bilinear upsampling (align_corners=True) of the ASPP output, a 48-channel low-level skip from
  ``layer1`` (1×1 conv + BN + ReLU), concatenation, a separable 3×3 conv to 256 + BN + ReLU;
* segmentation head: 1×1 conv to the classes, ×4 bilinear upsampling (align_corners=True).

``forward(x, upsample=False)`` returns the logits before the final ×4 upsampling (1/4 of the input
resolution). Widths are configurable (``width``, ``decoder_channels``, ``skip_channels``) so that a
tiny model trains on a CPU; the defaults are the paper's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ENCODERS",
    "DeepLabV3Plus",
    "ForwardParts",
    "ResNetEncoder",
    "build_model",
    "load_pretrained_encoder",
    "param_groups",
]

#: Encoder name -> (block type, blocks per stage).
ENCODERS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same attribute names, hence the same state_dict keys)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet V1.5: the stride sits on the 3×3 conv)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet trunk (no avgpool/fc) with MC dropout after each residual stage, output stride 16.

    Returns ``(low_level, high_level)``: the ``layer1`` features (stride 4) and the ``layer4``
    features (stride 16), each after its dropout, as the official code's encoder does.
    """

    def __init__(self, name: str = "resnet18", dropout: float = 0.2, width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
        kind, layers = ENCODERS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._cin = width
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        # smp make_dilated(16): every conv of layer4 gets stride 1 and dilation 2.
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=1, dilation=2)
        self.dropout = nn.Dropout(p=dropout)
        self.low_level_channels = width * block.expansion
        self.out_channels = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self._cin != planes * expansion:
            downsample = nn.Sequential(
                _conv1x1(self._cin, planes * expansion, stride),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [block(self._cin, planes, stride, dilation, downsample)]
        self._cin = planes * expansion
        layers += [block(self._cin, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def prefix(self, x: Tensor) -> Tensor:
        """The deterministic part: stem and ``layer1``, before the first dropout (stride 4)."""
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def from_prefix(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The stochastic rest: dropout after ``layer1`` (the decoder's skip input), then
        ``layer2..4`` each followed by dropout; returns ``(low_level, high_level)``."""
        low = self.dropout(h)
        x = self.dropout(self.layer2(low))
        x = self.dropout(self.layer3(x))
        x = self.dropout(self.layer4(x))
        return low, x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_prefix(self.prefix(x))


class SeparableConv2d(nn.Sequential):
    """Depthwise k×k conv followed by a pointwise 1×1 conv (smp's SeparableConv2d)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, kernel_size, padding=padding, dilation=dilation, groups=cin,
                      bias=False),
            nn.Conv2d(cin, cout, 1, bias=bias),
        )


def _sep_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(SeparableConv2d(cin, cout, 3, padding=dilation, dilation=dilation),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average, 1×1 conv + BN + ReLU, broadcast back (bilinear)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with separable atrous branches and a dropout projection."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        branches: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                          nn.ReLU(inplace=True))
        ]
        branches += [_sep_bn_relu(cin, cout, rate) for rate in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * cout, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    def __init__(self, high_channels: int, low_channels: int, channels: int = 256,
                 skip_channels: int = 48, rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.aspp = nn.Sequential(
            ASPP(high_channels, channels, rates),
            SeparableConv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.up = nn.UpsamplingBilinear2d(scale_factor=4)  # align_corners=True
        self.block1 = nn.Sequential(
            nn.Conv2d(low_channels, skip_channels, 1, bias=False),
            nn.BatchNorm2d(skip_channels),
            nn.ReLU(inplace=True),
        )
        self.block2 = _sep_bn_relu(channels + skip_channels, channels)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        high = self.up(self.aspp(high))
        return self.block2(torch.cat([high, self.block1(low)], dim=1))


class ForwardParts(NamedTuple):
    """What ``DeepLabV3Plus.forward(x, parts=True)`` returns besides the logits: everything a
    U-CE step can reuse for its Monte-Carlo passes."""

    logits: Tensor  # (B, C, H, W), or (B, C, H/4, W/4) with upsample=False
    low_res_logits: Tensor  # (B, C, H/4, W/4): before the head's ×4 upsampling
    prefix: Tensor  # the output of ``prefix(x)``: stem and layer1, before the first dropout


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (output stride 16) on a MC-dropout ResNet; ``encoder``, ``decoder``, ``head``.

    ``forward(x)`` returns (B, num_classes, H, W) logits for H, W divisible by 16;
    ``forward(x, upsample=False)`` returns the (B, num_classes, H/4, W/4) logits before the head's
    ×4 bilinear upsampling; ``forward(x, parts=True)`` a :class:`ForwardParts`.

    The model splits at its first dropout: ``forward(x) == suffix(prefix(x))``, where ``prefix``
    (stem and ``layer1``) is deterministic for a given BatchNorm mode and ``suffix`` holds every
    dropout — so Monte-Carlo passes can compute the prefix once (``uce_fast.mc_sample(...,
    prefix=model.prefix, forward=model.suffix)``).
    """

    output_stride = 16

    def __init__(self, num_classes: int, encoder: str = "resnet18", dropout: float = 0.2,
                 width: int = 64, decoder_channels: int = 256, skip_channels: int = 48,
                 atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = ResNetEncoder(encoder, dropout=dropout, width=width)
        self.decoder = DeepLabV3PlusDecoder(self.encoder.out_channels,
                                            self.encoder.low_level_channels, decoder_channels,
                                            skip_channels, tuple(atrous_rates))
        self.head = nn.Conv2d(decoder_channels, num_classes, 1)
        self.head_upsample = nn.UpsamplingBilinear2d(scale_factor=4)  # align_corners=True
        for m in self.decoder.modules():  # smp initialize_decoder
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.head.weight)  # smp initialize_head
        nn.init.zeros_(self.head.bias)

    def prefix(self, x: Tensor) -> Tensor:
        """Stem and ``layer1`` of the encoder: the layers before the first dropout."""
        h, w = x.shape[-2:]
        if h % self.output_stride or w % self.output_stride:
            raise ValueError(
                f"input height and width must be divisible by {self.output_stride}, got {h}×{w}"
            )
        return self.encoder.prefix(x)

    def suffix(self, h: Tensor, upsample: bool = True) -> Tensor:
        """The rest of the model on the output of :meth:`prefix`: logits, (B, C, H, W), or
        (B, C, H/4, W/4) with ``upsample=False``."""
        logits = self.head(self.decoder(*self.encoder.from_prefix(h)))
        return self.head_upsample(logits) if upsample else logits

    def forward(self, x: Tensor, upsample: bool = True,
                parts: bool = False) -> Tensor | ForwardParts:
        h = self.prefix(x)
        low_res = self.suffix(h, upsample=False)
        logits = self.head_upsample(low_res) if upsample else low_res
        return ForwardParts(logits, low_res, h) if parts else logits


def build_model(num_classes: int, encoder: str = "resnet18", dropout: float = 0.2,
                width: int = 64, decoder_channels: int = 256, skip_channels: int = 48,
                atrous_rates: Sequence[int] = (12, 24, 36),
                pretrained: str | os.PathLike[str] | None = None) -> DeepLabV3Plus:
    """A DeepLabV3+ model; ``pretrained`` is a local torchvision-format ImageNet checkpoint."""
    model = DeepLabV3Plus(num_classes, encoder, dropout, width, decoder_channels, skip_channels,
                          atrous_rates)
    if pretrained:
        load_pretrained_encoder(model.encoder, pretrained)
    return model


def load_pretrained_encoder(encoder: ResNetEncoder, path: str | os.PathLike[str]) -> None:
    """Load torchvision-format ResNet weights from the local file ``path`` into ``encoder``.

    The file holds a state_dict (or a dict with a ``"state_dict"`` or ``"model"`` entry) with
    torchvision's key names; ``fc.*`` entries are ignored. Every other key must match the encoder
    exactly (BatchNorm ``num_batches_tracked`` may be absent, as in torchvision's own files), with
    the same shapes; anything else raises ``ValueError`` naming the keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found: {path} (expected a local torchvision-format "
            f"{encoder.name} checkpoint, e.g. the file torchvision downloads for "
            f"{encoder.name}; nothing is downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a torchvision {encoder.name}: "
            f"missing keys {_short(missing)}, unexpected keys {_short(unexpected)}"
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(
            f"{path}: shapes differ from {encoder.name} (width {encoder.width}): {_short(wrong)}"
        )
    state = {k: v for k, v in state.items()}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    encoder.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}]{more}"


def param_groups(model: DeepLabV3Plus, lr: float, decoder_lr_mult: float = 10.0
                 ) -> list[dict[str, object]]:
    """SGD parameter groups: the encoder at ``lr``, decoder and head at ``lr * decoder_lr_mult``."""
    def params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    return [
        {"params": params([model.encoder]), "lr": lr, "name": "encoder"},
        {"params": params([model.decoder, model.head]), "lr": lr * decoder_lr_mult,
         "name": "decoder+head"},
    ]
