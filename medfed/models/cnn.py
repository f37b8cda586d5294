"""A small convolutional classifier built from MONAI ``Convolution`` blocks."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["ConvClassifier"]


class ConvClassifier(nn.Module):
    """Strided conv blocks (GroupNorm + ReLU), global average and max pooling, linear head.

    Average pooling captures diffuse findings (an opacity over a lung), max pooling small focal
    ones (a nodule, a lesion): both are concatenated before the head, scaled by 1/sqrt(features)
    so that per-sample gradients have norms of order one. Without that scale they are ~20 at
    initialisation, every sample is clipped under DP-SGD, and training drifts to the majority class.

    GroupNorm instead of BatchNorm keeps samples independent, which DP-SGD's per-sample gradients
    require; activations are not in place so Opacus' backward hooks work.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        spatial_dims: 2 or 3.
        width: channels of the first block, doubled at each following block.
        depth: number of stride-2 blocks.
        norm_groups: GroupNorm groups (must divide ``width``).
        dropout: dropout before the linear head.
        norm: ``"group"`` (GroupNorm) or ``"none"``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 2,
        width: int = 16,
        depth: int = 3,
        norm_groups: int = 4,
        dropout: float = 0.0,
        norm: str = "group",
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for level in range(depth):
            out = width * 2**level
            blocks.append(
                Convolution(
                    spatial_dims,
                    channels,
                    out,
                    strides=1 if level == 0 else 2,
                    kernel_size=3,
                    act=("relu", {"inplace": False}),
                    norm=("group", {"num_groups": norm_groups}) if norm == "group" else None,
                )
            )
            channels = out
        self.features = nn.Sequential(*blocks)
        self.avg_pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1) if spatial_dims == 2 else nn.AdaptiveMaxPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * channels, num_classes)
        self.feature_scale = (2 * channels) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` images to ``(B, num_classes)`` logits."""
        features = self.features(x)
        pooled = torch.cat([self.avg_pool(features), self.max_pool(features)], dim=1) * self.feature_scale
        return self.head(self.dropout(torch.flatten(pooled, 1)))
