"""U-CE in a Lightning ``training_step`` with segmentation_models_pytorch (random data, CPU).

smp's DeepLabV3+ gets ``Dropout2d`` after each encoder stage, as the U-CE paper does
(``uce_fast.add_dropout``); its head upsamples ×4 with ``UpsamplingBilinear2d``
(``align_corners=True``), which the sampler skips in the passes and hands to the accumulator.
Run: ``python examples/lightning_smp.py --steps 3``.
"""

from __future__ import annotations

import argparse

import lightning as L
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader, TensorDataset

import uce_fast


class Segmenter(L.LightningModule):
    def __init__(self, classes: int, beta: int) -> None:
        super().__init__()
        self.model = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=classes)
        uce_fast.add_dropout(self.model.encoder, p=0.1)
        self.criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=255)
        self.sampler = uce_fast.MCSampler(self.model)
        self.beta = beta

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        loss = self.criterion(logits, labels, self.sampler.sample(images, self.beta))
        self.log("loss", loss, prog_bar=False)
        print(f"step {batch_idx}: loss {loss.item():.4f}")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--beta", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    classes = 19
    n = 2 * args.steps
    data = TensorDataset(torch.randn(n, 3, args.size, args.size),
                         torch.randint(0, classes, (n, args.size, args.size)))
    module = Segmenter(classes, args.beta)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=2))
    print(f"levers: {module.sampler.levers}")


if __name__ == "__main__":
    main()
