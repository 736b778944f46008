"""uce_fast: fused kernels for U-CE, the uncertainty-aware cross-entropy for segmentation."""

from uce_fast.functional import available_backends, predictive_uncertainty, uce_loss
from uce_fast.modules import UCELoss

__all__ = ["UCELoss", "available_backends", "predictive_uncertainty", "uce_loss"]
__version__ = "0.1.0"
