"""U-CE in a plain PyTorch loop with a torchvision model (random data, CPU by default).

torchvision's DeepLabV3 returns ``{"out": logits}`` and upsamples with ``F.interpolate(...,
align_corners=False)`` inside its forward; its only dropout is in the ASPP projection, so the
sampler computes the backbone and most of the head once per step and skips the final upsampling
in the passes. Run: ``python examples/torchvision_plain.py --steps 3``.
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models.segmentation import deeplabv3_resnet50

import uce_fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--beta", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    classes = 19
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=classes).train()
    criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=255)
    sampler = uce_fast.MCSampler(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(args.steps):
        images = torch.randn(2, 3, args.size, args.size)
        labels = torch.randint(0, classes, (2, args.size, args.size))
        logits = model(images)["out"]
        loss = criterion(logits, labels, sampler.sample(images, args.beta))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print(f"levers: {sampler.levers}")


if __name__ == "__main__":
    main()
