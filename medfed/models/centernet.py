"""A one-stage, anchor-free 2D or 3D detector (CenterNet-style) built from MONAI ``Convolution`` blocks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F

__all__ = ["OUTPUT_STRIDES", "CenterNet"]

# Heat map resolution per spatial dims: 1/4 of an image; 1/2 of a volume, whose voxels (a few mm in
# the small volumes a CPU trains on) are already coarse next to a nodule of a few mm
OUTPUT_STRIDES = {2: 4, 3: 2}


class CenterNet(nn.Module):
    """Objects as points: a heatmap of object centres per class, plus box size and centre offset.

    A strided encoder (conv + GroupNorm + ReLU blocks, down to 1/``4 * 2**depth`` of the input)
    and a top-down path (nearest-neighbour upsampling plus 1x1 lateral convolutions, as in a
    feature pyramid) give one feature map at 1/:data:`OUTPUT_STRIDES` of the input resolution (1/4
    of an image, 1/2 of a volume); a small head predicts,
    per output pixel (voxel), ``num_classes`` centre logits, the log box size along x, y (and z)
    in output pixels and the sub-pixel offset of the centre along the same axes (x: the last
    array axis, y: the one before, z: the first of a volume). No anchors, no transposed
    convolutions, no BatchNorm: every layer has a per-sample gradient rule in Opacus, and the model
    has one output tensor ``(B, num_classes + 2 * spatial_dims, *[S / stride] * spatial_dims)``.

    The centre logits start at log(0.1 / 0.9) (a prior of 0.1, as in CenterNet and RetinaNet), so
    that the focal loss is not swamped by the background at the first steps.

    Args:
        in_channels: image channels.
        num_classes: object classes (no background class).
        width: channels at 1/2 resolution, doubled at each stride-2 block.
        depth: stride-2 blocks below 1/4 resolution (receptive field grows with it).
        norm_groups: GroupNorm groups (must divide ``width``).
        norm: ``"group"`` (GroupNorm) or ``"none"``.
        spatial_dims: 2 (images) or 3 (volumes).
        encoder: another encoder instead of the strided blocks (``in_channels``, ``width`` and ``depth`` are then
            unused): a stem to 1/2 resolution, the stages after it (the first to 1/4, each next
            one to half the previous resolution) and the output channels of the stem and of each stage.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        depth: int = 2,
        norm_groups: int = 4,
        norm: str = "group",
        *,
        spatial_dims: int = 2,
        encoder: tuple[nn.Module, Sequence[nn.Module], Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.output_stride = OUTPUT_STRIDES[spatial_dims]
        norm_layer = ("group", {"num_groups": norm_groups}) if norm == "group" else None

        def block(cin: int, cout: int, stride: int = 1) -> Convolution:
            return Convolution(
                spatial_dims,
                cin,
                cout,
                strides=stride,
                kernel_size=3,
                act=("relu", {"inplace": False}),
                norm=norm_layer,
            )

        if encoder is None:
            self.stem: nn.Module = nn.Sequential(block(in_channels, width, 2), block(width, width))
            channels = [width] + [2 * width * 2**level for level in range(depth + 1)]  # at 1/2, 1/4, 1/8, ...
            stages: list[nn.Module] = []
            for cin, cout in itertools.pairwise(channels):
                stages.append(nn.Sequential(block(cin, cout, 2), block(cout, cout)))
        else:
            self.stem, stages, channels = encoder[0], list(encoder[1]), list(encoder[2])
        self.stages = nn.ModuleList(stages)
        pyramid = channels if self.output_stride == 2 else channels[1:]  # the stem's output from 1/2 on
        top = pyramid[0]
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.laterals = nn.ModuleList(conv(c, top, kernel_size=1) for c in pyramid)
        self.smooth = block(top, top)
        hidden = block(top, top)
        final = conv(top, num_classes + 2 * spatial_dims, kernel_size=1)
        self.head = nn.Sequential(hidden, final)
        with torch.no_grad():
            assert final.bias is not None  # a convolution has a bias unless told otherwise
            final.bias.zero_()
            final.bias[:num_classes] = math.log(0.1 / 0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` images or volumes (sides multiples of ``4 * 2**depth``) to
        ``(B, num_classes + 2 * spatial_dims, *spatial / output_stride)``."""
        x = self.stem(x)
        features = [x] if self.output_stride == 2 else []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        merged = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1]), strict=True):
            merged = lateral(feature) + F.interpolate(merged, size=feature.shape[2:], mode="nearest")
        return self.head(self.smooth(merged))
