"""Equinox models that mirror common Flax and torchvision models, for conversion
and examples."""

from .._conv import (
    ChannelsLastConv as ChannelsLastConv,
    ChannelsLastConv2d as ChannelsLastConv2d,
)
from ._layout import channels_last_conv as channels_last_conv
from .mlp import SeedMLP as SeedMLP
from .resnet import (
    ResNet as ResNet,
    ResNet18 as ResNet18,
    ResNet34 as ResNet34,
    ResNetBlock as ResNetBlock,
)
from .torchvision_resnet import (
    BasicBlock as BasicBlock,
    Bottleneck as Bottleneck,
    Downsample as Downsample,
    TorchResNet as TorchResNet,
    TorchResNet18 as TorchResNet18,
    TorchResNet34 as TorchResNet34,
    TorchResNet50 as TorchResNet50,
    TorchResNeXt50_32x4d as TorchResNeXt50_32x4d,
    TorchWideResNet50_2 as TorchWideResNet50_2,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ChannelsLastConv",
    "ChannelsLastConv2d",
    "Downsample",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNetBlock",
    "SeedMLP",
    "TorchResNet",
    "TorchResNet18",
    "TorchResNet34",
    "TorchResNet50",
    "channels_last_conv",
]
