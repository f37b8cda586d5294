"""The model zoo: every network ``model.name`` can pick, per task, built valid for Opacus.

Each builder takes ``data.channels`` input channels and gives ``data.num-classes`` outputs in
``data.spatial-dims`` dimensions (every network here supports 2D and 3D). Networks with a base
width use ``model.width`` (and ``model.depth`` resolution levels where the number of levels is
free: ``unet``, ``segresnet``, ``dynunet``, ``attentionunet``); those with standard sizes (the ResNets, DenseNet-121,
EfficientNet-B0, SE-ResNet-50, BasicUNet's five levels, SwinUNETR's four stages) keep them.
``model.dropout`` applies where a network has a dropout setting (EfficientNet-B0 keeps its own
0.2 dropout and drop-connect; the ResNets have none). Tabular networks (``mlp``, ``logistic``)
take the ``data.features`` of a row and their missing indicators (:func:`medfed.data.tabular.model_width`).

DP-SGD needs per-sample gradients, which Opacus computes with backward hooks. MONAI's networks
are made to fit them after building (:func:`opacus_ready`): BatchNorm (which mixes the samples of
a batch) becomes GroupNorm, activations are not in place, and the residual blocks that add their
shortcut in place (``out += residual``, which breaks the hooks) are given an out-of-place forward.
Nothing is downloaded: no pretrained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar, cast

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.blocks.squeeze_and_excitation import SEResNetBottleneck
from monai.networks.nets import (
    AttentionUnet,
    BasicUNet,
    DenseNet121,
    DynUNet,
    EfficientNetBN,
    FullyConnectedNet,
    SegResNet,
    SEResNet50,
    SwinUNETR,
    UNet,
    resnet18,
    resnet34,
    resnet50,
)
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock, WindowAttention
from monai.utils import optional_import
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from medfed.config import Config, ConfigError, ModelConfig
from medfed.data.tabular import model_width
from medfed.models.centernet import CenterNet
from medfed.models.cnn import ConvClassifier

__all__ = ["MODEL_BUILDERS", "build_network", "opacus_ready"]

Builder = Callable[[Config], nn.Module]
_Net = TypeVar("_Net", bound=nn.Module)


class _ResNetBlock(ResNetBlock):
    """MONAI's basic ResNet block with the shortcut added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As MONAI's, with ``out + residual`` instead of ``out += residual``."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + residual)


class _ResNetBottleneck(ResNetBottleneck):
    """MONAI's bottleneck ResNet block with the shortcut added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As MONAI's, with ``out + residual`` instead of ``out += residual``."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + residual)


class _SEResNetBottleneck(SEResNetBottleneck):
    """MONAI's SE-ResNet bottleneck with the shortcut added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As MONAI's ``SEBlock.forward``, with ``x + residual`` instead of ``x += residual``."""
        residual = self.project(x)
        out = self.se_layer(self.conv3(self.conv2(self.conv1(x))))
        return self.act(out + residual)


class _SegResBlock(ResBlock):
    """MONAI's SegResNet block with the identity added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As MONAI's, with ``x + identity`` instead of ``x += identity``."""
        out = self.conv1(self.act(self.norm1(x)))
        out = self.conv2(self.act(self.norm2(out)))
        return out + x


class _UnetResBlock(UnetResBlock):
    """MONAI's residual U-Net block (DynUNet, SwinUNETR encoders) with the shortcut added out of place."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """As MONAI's, with ``out + residual`` instead of ``out += residual``."""
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


class _RelativePositionBias(nn.Module):
    """A Swin window attention's learned relative position bias, as a layer of its own so that
    Opacus computes its per-sample gradient (:func:`_relative_position_bias_grad_sample`)."""

    def __init__(self, table: nn.Parameter) -> None:
        super().__init__()
        self.table = table

    def forward(self, index: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``attn`` ``(B, windows, heads, n, n)`` plus the bias of each token pair (``index``: ``(n * n,)``)."""
        n = attn.shape[-1]
        return attn + self.table[index].reshape(n, n, -1).permute(2, 0, 1)


@register_grad_sampler(_RelativePositionBias)
def _relative_position_bias_grad_sample(
    layer: _RelativePositionBias, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per image: the output gradient summed over windows, added up per table row (token pairs share rows)."""
    index = activations[0]
    per_pair = backprops.sum(dim=1).flatten(2).transpose(1, 2)  # (B, n * n, heads)
    grad_sample = per_pair.new_zeros(len(per_pair), *layer.table.shape)
    grad_sample.index_add_(1, index, per_pair)
    return {layer.table: grad_sample}


class _WindowAttention(WindowAttention):
    """MONAI's Swin window attention on ``(B, windows, n, C)``: the image, not the window, stays
    the first dimension of every layer's input, so Opacus' per-sample gradients are per image
    (MONAI folds the windows into the batch dimension). :class:`_SwinBlock` sets ``batch_size``."""

    batch_size: int
    position_bias: _RelativePositionBias
    relative_position_index: torch.Tensor

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Windows ``(B * windows, n, C)`` to ``(B * windows, n, C)``, as MONAI's."""
        _, n, c = x.shape
        x = x.reshape(self.batch_size, -1, n, c)
        b, windows = x.shape[:2]
        qkv = self.qkv(x).reshape(b, windows, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, windows, heads, n, n)
        attn = self.position_bias(self.relative_position_index[:n, :n].reshape(-1), attn)
        if mask is not None:
            attn = attn + mask[None, :, None]
        attn = self.attn_drop(self.softmax(attn)).to(v.dtype)
        x = (attn @ v).transpose(2, 3).reshape(b, windows, n, c)
        return self.proj_drop(self.proj(x)).reshape(-1, n, c)


class _SwinBlock(SwinTransformerBlock):
    """MONAI's Swin block, telling its :class:`_WindowAttention` the number of images."""

    attn: _WindowAttention

    def forward_part1(self, x: torch.Tensor, mask_matrix: torch.Tensor | None) -> torch.Tensor:
        """As MONAI's."""
        self.attn.batch_size = x.shape[0]
        return super().forward_part1(x, mask_matrix)


class _SwinTransformer(SwinTransformer):
    """MONAI's Swin encoder with its feature maps in standard (channels-first) memory layout for
    the convolutions that read them: Opacus' per-sample gradient of a 2D convolution is wrong for
    a channels-last input (its unfold assumes row-major strides), which MONAI's layer norm over the
    channels leaves behind. ``contiguous()`` is not enough: a 1x1 map is contiguous either way."""

    def proj_out(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """As MONAI's, in standard memory layout."""
        return super().proj_out(x, normalize).clone(memory_format=torch.contiguous_format)


class _DynUNet(DynUNet):
    """MONAI's DynUNet run from its blocks in order, without ``skip_layers``: that nested module
    registers every block a second time, and Opacus, hooking each registration, then gets the
    per-sample gradients wrong (its parameters would also be stored twice in the state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As MONAI's without deep supervision: ``(B, C, *spatial)`` to logits ``(B, num_classes, *spatial)``."""
        skips = []
        for block in [self.input_block, *self.downsamples]:
            x = block(x)
            skips.append(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.upsamples, reversed(skips), strict=True):
            x = block(x, skip)
        return self.output_block(x)


def _per_image_window_attention(net: _Net) -> _Net:
    """Give every Swin block of ``net`` per-image window attention (:class:`_WindowAttention`)
    and contiguous feature maps (:class:`_SwinTransformer`). The token-pair index of the position
    bias, fixed by the window size, leaves the state dict: federated updates carry weights only."""
    for module in net.modules():
        if type(module) is SwinTransformer:
            module.__class__ = _SwinTransformer
        elif type(module) is SwinTransformerBlock:
            module.__class__ = _SwinBlock
        elif type(module) is WindowAttention:
            table, index = module.relative_position_bias_table, cast(torch.Tensor, module.relative_position_index)
            del module.relative_position_bias_table, module.relative_position_index
            module.position_bias = _RelativePositionBias(table)
            module.register_buffer("relative_position_index", index, persistent=False)  # fixed: not sent or saved
            module.__class__ = _WindowAttention
    return net


# MONAI blocks whose forward adds in place -> the same block with an out-of-place forward (same parameters)
_OUT_OF_PLACE: dict[type[nn.Module], type[nn.Module]] = {
    ResNetBlock: _ResNetBlock,
    ResNetBottleneck: _ResNetBottleneck,
    SEResNetBottleneck: _SEResNetBottleneck,
    ResBlock: _SegResBlock,
    UnetResBlock: _UnetResBlock,
}


def opacus_ready(model: _Net, settings: ModelConfig) -> _Net:
    """Make a MONAI network fit Opacus' per-sample gradients, in place, keeping parameter names.

    BatchNorm and InstanceNorm with running statistics become GroupNorm with ``model.norm-groups``
    groups (or the largest divisor of the channel count that divides it), or, with
    ``model.norm = "none"``, every BatchNorm, InstanceNorm and GroupNorm becomes an identity.
    Activations and dropout are set not in place, and residual blocks that add in place get an
    out-of-place forward. Returns ``model``.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            replacement = _replacement_norm(child, settings)
            if replacement is not None:
                setattr(parent, name, replacement)
    for module in model.modules():
        if type(module) in _OUT_OF_PLACE:
            module.__class__ = _OUT_OF_PLACE[type(module)]
        if getattr(module, "inplace", False):
            module.inplace = False  # type: ignore[assignment]  # torch types unknown attributes as Tensor | Module
    return model


def _replacement_norm(module: nn.Module, settings: ModelConfig) -> nn.Module | None:
    """What ``module`` becomes under :func:`opacus_ready`, or None to keep it."""
    if settings.norm == "none" and isinstance(module, (_BatchNorm, _InstanceNorm, nn.GroupNorm)):
        return nn.Identity()
    if isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats):
        channels = module.num_features
        return nn.GroupNorm(math.gcd(settings.norm_groups, channels), channels, eps=module.eps, affine=module.affine)
    return None


def _group_norm(settings: ModelConfig) -> tuple[str, dict[str, int]]:
    """MONAI's norm argument for GroupNorm with ``model.norm-groups`` groups."""
    return ("group", {"num_groups": settings.norm_groups})


def _widths(settings: ModelConfig) -> list[int]:
    """``model.width`` doubled at each of ``model.depth`` levels."""
    return [settings.width * 2**level for level in range(settings.depth)]


def _levels(config: Config, least: int = 2) -> int:
    """``model.depth`` (resolution levels), refused below the ``least`` the network needs."""
    if config.model.depth < least:
        raise ConfigError(
            f"model.depth = {config.model.depth} is invalid for model.name = '{config.model.name}': "
            f"expected an integer in [{least}, 6] (resolution levels)"
        )
    return config.model.depth


# --- classification ---------------------------------------------------------------------------


def _cnn(config: Config) -> nn.Module:
    m, d = config.model, config.data
    return ConvClassifier(d.channels, d.num_classes, d.spatial_dims, m.width, m.depth, m.norm_groups, m.dropout, m.norm)


def _resnet(factory: Callable[..., ResNet]) -> Builder:
    def build(config: Config) -> nn.Module:
        d = config.data
        net = factory(spatial_dims=d.spatial_dims, n_input_channels=d.channels, num_classes=d.num_classes)
        return opacus_ready(net, config.model)

    return build


def _densenet121(config: Config) -> nn.Module:
    d = config.data
    net = DenseNet121(d.spatial_dims, d.channels, d.num_classes, dropout_prob=config.model.dropout)
    return opacus_ready(net, config.model)


def _efficientnet_b0(config: Config) -> nn.Module:
    d = config.data
    net = EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        spatial_dims=d.spatial_dims,
        in_channels=d.channels,
        num_classes=d.num_classes,
    )
    return opacus_ready(net, config.model)


def _seresnet50(config: Config) -> nn.Module:
    d = config.data
    net = SEResNet50(
        spatial_dims=d.spatial_dims,
        in_channels=d.channels,
        num_classes=d.num_classes,
        dropout_prob=config.model.dropout or None,
    )
    return opacus_ready(net, config.model)


# --- segmentation -----------------------------------------------------------------------------


def _unet(config: Config) -> nn.Module:
    """MONAI's UNet, ``model.width`` doubled at each of ``model.depth`` levels, each level's first
    convolution of stride 2; ``model.full-resolution`` adds a level of ``model.width`` in front at stride 1."""
    m, d = config.model, config.data
    channels = tuple(_widths(m))
    strides = (2,) * (len(channels) - 1)
    if m.full_resolution:
        channels, strides = (m.width, *channels), (1, *strides)
    return UNet(
        spatial_dims=d.spatial_dims,
        in_channels=d.channels,
        out_channels=d.num_classes,
        channels=channels,
        strides=strides,
        num_res_units=0,
        act=("relu", {"inplace": False}),
        # MONAI's UNet takes None for no norm layer; its annotation leaves None out
        norm=_group_norm(m) if m.norm == "group" else None,  # type: ignore[arg-type]
        dropout=m.dropout,
    )


def _basicunet(config: Config) -> nn.Module:
    m, d = config.model, config.data
    w = m.width
    net = BasicUNet(
        d.spatial_dims,
        d.channels,
        d.num_classes,
        features=(w, w, 2 * w, 4 * w, 8 * w, w),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=_group_norm(m),
        dropout=m.dropout,
    )
    return opacus_ready(net, m)


def _segresnet(config: Config) -> nn.Module:
    m, d = config.model, config.data
    levels = _levels(config)
    net = SegResNet(
        d.spatial_dims,
        init_filters=m.width,
        in_channels=d.channels,
        out_channels=d.num_classes,
        dropout_prob=m.dropout or None,
        act=("RELU", {"inplace": False}),
        norm=_group_norm(m),
        blocks_down=(1, 2, 2, 4, 4, 4)[:levels],  # MONAI's (1, 2, 2, 4) at 4 levels
        blocks_up=(1,) * (levels - 1),
    )
    return opacus_ready(net, m)


def _dynunet(config: Config) -> nn.Module:
    m, d = config.model, config.data
    levels = _levels(config, least=3)
    net = DynUNet(
        d.spatial_dims,
        d.channels,
        d.num_classes,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=_widths(m),
        dropout=m.dropout or None,
        norm_name=_group_norm(m),
        act_name=("leakyrelu", {"inplace": False, "negative_slope": 0.01}),
    )
    del net.skip_layers
    net.__class__ = _DynUNet
    return opacus_ready(net, m)


def _attentionunet(config: Config) -> nn.Module:
    m, d = config.model, config.data
    levels = _levels(config)
    net = AttentionUnet(
        d.spatial_dims, d.channels, d.num_classes, channels=_widths(m), strides=[2] * (levels - 1), dropout=m.dropout
    )
    return opacus_ready(net, m)


def _swinunetr(config: Config) -> nn.Module:
    m, d = config.model, config.data
    if not optional_import("einops")[1]:
        raise ConfigError(
            "model.name = 'swinunetr' needs the einops package, which is not installed: install it or pick another model.name"
        )
    if m.width % 12:
        raise ConfigError(
            f"model.width = {m.width} is invalid for model.name = 'swinunetr': expected a multiple of 12 "
            "(its feature size, split over 3, 6, 12 and 24 attention heads), e.g. 12, 24 or 48"
        )
    net = SwinUNETR(
        in_channels=d.channels,
        out_channels=d.num_classes,
        feature_size=m.width,
        norm_name=_group_norm(m),
        drop_rate=m.dropout,
        spatial_dims=d.spatial_dims,
    )
    return opacus_ready(_per_image_window_attention(net), m)


# --- detection --------------------------------------------------------------------------------


def _mlp(config: Config) -> nn.Module:
    """Tabular: ``model.depth - 1`` hidden layers of ``model.width`` units (ReLU, ``model.dropout``)."""
    m = config.model
    hidden = (m.width,) * (m.depth - 1)
    return FullyConnectedNet(model_width(config.data), config.data.num_classes, hidden, m.dropout, "RELU")


def _logistic(config: Config) -> nn.Module:
    """Tabular: logistic regression (one linear layer on the features)."""
    return FullyConnectedNet(model_width(config.data), config.data.num_classes, ())


def _centernet(config: Config) -> nn.Module:
    m, d = config.model, config.data
    return CenterNet(d.channels, d.num_classes, m.width, m.depth, m.norm_groups, m.norm, spatial_dims=d.spatial_dims)


def _centernet_resnet18(config: Config) -> nn.Module:
    """CenterNet's top-down path and head on a ResNet-18 encoder (stride-2 stem, 64-512 channels)."""
    m, d = config.model, config.data
    net = opacus_ready(
        resnet18(spatial_dims=d.spatial_dims, n_input_channels=d.channels, conv1_t_stride=2, feed_forward=False), m
    )
    stem = nn.Sequential(net.conv1, net.bn1, net.act)
    stages = [nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4]
    channels = [64, 64, 128, 256, 512]  # the stem, then each stage
    groups = math.gcd(m.norm_groups, channels[0])
    return CenterNet(
        d.channels,
        d.num_classes,
        norm_groups=groups,
        norm=m.norm,
        spatial_dims=d.spatial_dims,
        encoder=(stem, stages, channels),
    )


def _ddpm(config: Config) -> nn.Module:
    """The class-conditional diffusion model of :mod:`medfed.generative` (two levels, ``model.width``
    and twice it, GroupNorm of ``model.norm-groups``)."""
    from medfed.generative import ConditionalDiffusion  # MONAI's generative networks: loaded when used

    d, m = config.data, config.model
    return ConditionalDiffusion(d.channels, d.num_classes, m.width, m.norm_groups)


def _ddpm_mask(config: Config) -> nn.Module:
    """The mask-conditional diffusion model of :mod:`medfed.generative` (2D segmentation: an image
    from a label mask; the same two levels as ``ddpm``)."""
    from medfed.generative import MaskConditionalDiffusion

    d, m = config.data, config.model
    return MaskConditionalDiffusion(d.channels, d.num_classes, m.width, m.norm_groups)


MODEL_BUILDERS: dict[str, dict[str, Builder]] = {
    "classification": {
        "cnn": _cnn,
        "resnet18": _resnet(resnet18),
        "resnet34": _resnet(resnet34),
        "resnet50": _resnet(resnet50),
        "densenet121": _densenet121,
        "efficientnet-b0": _efficientnet_b0,
        "seresnet50": _seresnet50,
    },
    "segmentation": {
        "unet": _unet,
        "basicunet": _basicunet,
        "segresnet": _segresnet,
        "dynunet": _dynunet,
        "attentionunet": _attentionunet,
        "swinunetr": _swinunetr,
    },
    "detection": {"centernet": _centernet, "centernet-resnet18": _centernet_resnet18},
    "tabular": {"mlp": _mlp, "logistic": _logistic},
    "generation": {"ddpm": _ddpm, "ddpm-mask": _ddpm_mask},
}
MODEL_BUILDERS["instance-segmentation"] = MODEL_BUILDERS["segmentation"]  # the same networks, 4 output maps


# Input sizes, where a network needs them: (a multiple of, at least). Those with model.depth levels
# need exact halvings, as does swinunetr's five; basicunet pads where a halving is not exact;
# densenet121 and efficientnet-b0 run out of pixels below 32.
_DEPTH_SIZED = ("unet", "segresnet", "dynunet", "attentionunet")
_SIZE_RULES = {"swinunetr": (32, 32), "basicunet": (1, 16), "densenet121": (1, 32), "efficientnet-b0": (1, 32),
               "ddpm": (2, 4), "ddpm-mask": (2, 4)}  # fmt: skip


def _check_input_size(task: str, config: Config) -> None:
    """Refuse an input size that the network ``model.name`` cannot take, naming the setting."""
    name, depth = config.model.name, config.model.depth
    key, size = "data.image-size", config.data.image_size
    if task in ("segmentation", "instance-segmentation") and config.data.patch_size:
        key, size = "data.patch-size", config.data.patch_size
    multiple, least = (2 ** (depth - 1),) * 2 if name in _DEPTH_SIZED else _SIZE_RULES.get(name, (1, 1))
    if size % multiple or size < least:
        network = f"model.name = '{name}'" + (f" with model.depth = {depth}" if name in _DEPTH_SIZED else "")
        needed = f"a multiple of {multiple} (the network's total downsampling)" if multiple > 1 else f">= {least}"
        raise ConfigError(f"{key} = {size} is invalid for {network}: expected {needed}")


def build_network(task: str, config: Config) -> nn.Module:
    """The network ``model.name`` of ``task``, checked against the input size it will see.

    A segmentation network sees ``data.patch-size`` patches (sliding windows at evaluation) or,
    without patches, whole ``data.image-size`` images; other tasks see whole images. Where a
    network needs it, that size must be a multiple of its total downsampling (so that its skip
    connections line up) or large enough for all its downsampling.
    """
    builders = MODEL_BUILDERS[task]
    name = config.model.name
    if name not in builders:
        raise ConfigError(f"model.name = {name!r} is invalid: expected one of {list(builders)} for run.task = '{task}'")
    _check_input_size(task, config)
    if config.model.full_resolution and name != "unet":
        raise ConfigError(
            f"model.full-resolution = true is invalid for model.name = '{name}': only 'unet' has it "
            "(set it to false, or pick model.name = 'unet')"
        )
    network = builders[name](config)
    if config.model.input_norm:
        network.register_forward_pre_hook(_standardise_input)
    return network


def _standardise_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``model.input-norm``: each image's channels to zero mean and unit variance (a forward pre-hook,
    so the network's parameters and their names stay as they are; per image, as DP requires)."""
    images, *rest = args
    axes = tuple(range(2, images.dim()))
    mean = images.mean(dim=axes, keepdim=True)
    std = images.std(dim=axes, keepdim=True)
    return ((images - mean) / (std + 1e-5), *rest)
