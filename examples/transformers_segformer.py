"""U-CE in the transformers ``Trainer`` with SegFormer (``compute_loss``; random data, CPU).

SegFormer's ``.logits`` are at 1/4 resolution and the loss upsamples them: the sampler is told
the labels' size and the loss's ``align_corners`` and resamples inside its kernels; stochastic
depth (SegFormer's ``DropPath``) is random too, so only what runs before it is computed once.
Run: ``python examples/transformers_segformer.py --steps 3``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
    Trainer,
    TrainingArguments,
)

import uce_fast


class UCETrainer(Trainer):
    def __init__(self, *args, beta: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.criterion = uce_fast.UCELoss(alpha=10.0, ignore_index=255)
        self.sampler = uce_fast.MCSampler(self.model)
        self.beta = beta

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        images, labels = inputs["pixel_values"], inputs["labels"]
        outputs = model(pixel_values=images)
        logits = F.interpolate(outputs.logits, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        samples = self.sampler.sample(images, self.beta, size=tuple(labels.shape[-2:]),
                                      align_corners=False)
        loss = self.criterion(logits, labels, samples)
        print(f"loss {loss.item():.4f}")
        return (loss, outputs) if return_outputs else loss


class RandomScenes(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n, size, size), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--beta", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    classes = 19
    config = SegformerConfig(num_labels=classes, hidden_sizes=[16, 32, 64, 128],
                             depths=[1, 1, 1, 1], decoder_hidden_size=64, drop_path_rate=0.1)
    model = SegformerForSemanticSegmentation(config)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps,
                                     per_device_train_batch_size=2, report_to=[],
                                     use_cpu=True, save_strategy="no", logging_strategy="no",
                                     remove_unused_columns=False, disable_tqdm=True)
        trainer = UCETrainer(model=model, args=training,
                             train_dataset=RandomScenes(2 * args.steps, args.size, classes),
                             beta=args.beta)
        trainer.train()
    print(f"levers: {trainer.sampler.levers}")


if __name__ == "__main__":
    main()
