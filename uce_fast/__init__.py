"""uce_fast: fused kernels for U-CE, the uncertainty-aware cross-entropy for segmentation."""

from uce_fast.accumulator import MCAccumulator, MCStats
from uce_fast.functional import available_backends, mc_stats, predictive_uncertainty, uce_loss
from uce_fast.modules import UCELoss
from uce_fast.sampler import MCSampler, add_dropout, logits_of
from uce_fast.sampling import mc_dropout, mc_sample

__all__ = [
    "MCAccumulator",
    "MCSampler",
    "MCStats",
    "UCELoss",
    "add_dropout",
    "available_backends",
    "logits_of",
    "mc_dropout",
    "mc_sample",
    "mc_stats",
    "predictive_uncertainty",
    "uce_loss",
]
__version__ = "0.1.0"
