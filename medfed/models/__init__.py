"""Network builders on MONAI blocks, valid for Opacus (GroupNorm, no BatchNorm, no in-place ops)."""

from medfed.models.centernet import OUTPUT_STRIDES, CenterNet
from medfed.models.cnn import ConvClassifier

__all__ = ["OUTPUT_STRIDES", "CenterNet", "ConvClassifier"]
