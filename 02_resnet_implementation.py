"""Lesson 02: ResNet-18 to ResNet-152 and the CIFAR ResNets, verified against torchvision and the paper.

(Lesson card in progress: the models below are final; the measurements and prose follow.)
"""

# %%
from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

lesson01 = helpers.load_lesson(1)
conv3x3 = lesson01.conv3x3
projection_shortcut = lesson01.projection_shortcut
PlainBlock = lesson01.PlainBlock

# --- constants ---------------------------------------------------------------------------------------
SEED = 0  # random seed for weights and inputs
DEVICE = "auto"  # auto | cpu | cuda | mps
OUT = "outputs/02_resnet_implementation"  # folder for results.json and figures
# --- end constants -----------------------------------------------------------------------------------


# %% Blocks
def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution: mixes channels at each pixel; with stride 2 it also subsamples."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(lesson01.ResidualBlock):
    """Lesson 01's residual block, unchanged in what it computes: two 3x3 convolutions, y = relu(F(x) + x).

    What a whole network needs on top: `expansion` (output channels per unit of width, so stages can be
    built from either block) and `last_bn`, the batch norm that ends the branch (zeroed by
    `zero_init_residual`)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, width, stride, make_shortcut)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """The bottleneck block of He et al. 2015 (Fig. 5 right): 1x1 reduce, 3x3, 1x1 expand by 4.

    `stride_on="3x3"` subsamples in the 3x3 convolution (torchvision, "ResNet v1.5");
    `stride_on="1x1"` subsamples in the first 1x1 convolution (the 2015 paper and its Caffe models, "v1")."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        make_shortcut=projection_shortcut,
        stride_on: str = "3x3",
    ):
        super().__init__()
        if stride_on not in ("3x3", "1x1"):
            raise ValueError(f"stride_on must be '3x3' or '1x1', not {stride_on!r}")
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width, stride if stride_on == "1x1" else 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride if stride_on == "3x3" else 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if shape_changes else None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): (B, C_in, H, W) -> (B, 4w, H/s, W/s)"""
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, w, H, W), or H/s, W/s in v1
        out = F.relu(self.bn2(self.conv2(out)))  # (B, w, ., .) -> (B, w, H/s, W/s)
        return self.bn3(self.conv3(out))  # (B, w, H/s, W/s) -> (B, 4w, H/s, W/s)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)  # x (Eq. 1) or W_s x (Eq. 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (He et al. 2015, Eq. 1)


class ShortcutA(nn.Module):
    """Option A of He et al. 2015 (section 3.3): identity with zero padding for the extra channels and
    subsampling for the halved resolution; no parameters. (B, C_in, H, W) -> (B, C_out, H/s, W/s)"""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option A can only add channels")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H, W) -> (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))  # -> (B, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_stage(make_block, in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    """`num_blocks` blocks at one resolution; only the first changes the shape (stride, channels)."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(make_block(in_channels, width, stride if index == 0 else 1))
        in_channels = width * getattr(blocks[-1], "expansion", 1)
    return nn.Sequential(*blocks)


def init_like_torchvision(model: nn.Module, zero_init_residual: bool = False) -> nn.Module:
    """He et al. 2015's initialisation as torchvision applies it: Kaiming normal (fan_out, ReLU gain) for
    convolutions, batch norm scale 1 and shift 0; the classifier keeps PyTorch's default.

    `zero_init_residual` sets the scale of each branch's last batch norm to 0, so every residual block
    starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 5.1)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_bn.weight)
    return model


# %% ImageNet ResNets
class ResNet(nn.Module):
    """The ImageNet ResNets of He et al. 2015 (Table 1), with torchvision's module names.

    stem (7x7/2 conv, 3x3/2 max-pool) -> four stages of blocks at widths 64, 128, 256, 512 (stride 2 at
    the start of stages 2-4) -> global average pool -> fully connected classifier.
    `small_input_stem=True` replaces the stem by one 3x3 stride-1 convolution without max-pool, for
    32x32 images (the CIFAR ResNet-18)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        bottleneck_stride: str = "3x3",
        small_input_stem: bool = False,
    ):
        super().__init__()
        self.blocks_per_stage = list(blocks_per_stage)
        if small_input_stem:
            self.conv1 = conv3x3(3, 64)  # (B, 3, 32, 32) -> (B, 64, 32, 32)
            self.maxpool = nn.Identity()  # no pooling: 32x32 images have no resolution to spare
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 224 -> 112
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # 112 -> 56
        self.bn1 = nn.BatchNorm2d(64)
        make_block = block
        if block is Bottleneck:
            make_block = functools.partial(Bottleneck, stride_on=bottleneck_stride)
        channels = 64
        for index, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), start=1):
            stage = make_stage(make_block, channels, width, num_blocks, stride=1 if index == 1 else 2)
            self.add_module(f"layer{index}", stage)
            channels = width * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_like_torchvision(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 3, 224, 224) -> (B, 64, 56, 56)
        x = self.layer1(x)  # (B, 64, 56, 56) -> (B, 64e, 56, 56), e = block expansion
        x = self.layer2(x)  # -> (B, 128e, 28, 28)
        x = self.layer3(x)  # -> (B, 256e, 14, 14)
        return self.layer4(x)  # -> (B, 512e, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)  # (B, 512e, 7, 7) -> (B, 512e)
        return self.fc(x)  # (B, 512e) -> (B, num_classes)


IMAGENET_BLOCKS = {  # He et al. 2015, Table 1
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _imagenet_resnet(name: str, num_classes: int, zero_init_residual: bool, bottleneck_stride: str) -> ResNet:
    block, blocks_per_stage = IMAGENET_BLOCKS[name]
    return ResNet(block, blocks_per_stage, num_classes, zero_init_residual, bottleneck_stride)


def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return _imagenet_resnet("resnet18", num_classes, zero_init_residual, "3x3")


def resnet34(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return _imagenet_resnet("resnet34", num_classes, zero_init_residual, "3x3")


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False, bottleneck_stride: str = "3x3") -> ResNet:
    return _imagenet_resnet("resnet50", num_classes, zero_init_residual, bottleneck_stride)


def resnet101(num_classes: int = 1000, zero_init_residual: bool = False, bottleneck_stride: str = "3x3") -> ResNet:
    return _imagenet_resnet("resnet101", num_classes, zero_init_residual, bottleneck_stride)


def resnet152(num_classes: int = 1000, zero_init_residual: bool = False, bottleneck_stride: str = "3x3") -> ResNet:
    return _imagenet_resnet("resnet152", num_classes, zero_init_residual, bottleneck_stride)


IMAGENET_MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}


# %% CIFAR ResNets
class CifarResNet(nn.Module):
    """The CIFAR-10 networks of He et al. 2015, section 4.2: a 3x3 convolution with 16 filters, then three
    stages of n blocks with 16, 32, 64 filters on 32x32, 16x16, 8x8 maps, global average pooling and a
    fully connected layer: 6n + 2 weighted layers."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), not {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (projection), not {shortcut!r}")
        self.depth, self.shortcut_option, self.plain = depth, shortcut, plain
        blocks_per_stage = (depth - 2) // 6
        if plain:
            make_block = PlainBlock  # the same layers with every shortcut removed
        else:
            make_block = functools.partial(
                BasicBlock, make_shortcut=ShortcutA if shortcut == "A" else projection_shortcut
            )
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_stage(make_block, 16, 16, blocks_per_stage, stride=1)
        self.layer2 = make_stage(make_block, 16, 32, blocks_per_stage, stride=2)
        self.layer3 = make_stage(make_block, 32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_like_torchvision(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        x = self.layer1(x)  # (B, 16, 32, 32), n blocks
        x = self.layer2(x)  # -> (B, 32, 16, 16)
        return self.layer3(x)  # -> (B, 64, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)  # (B, 64, 8, 8) -> (B, 64)
        return self.fc(x)  # (B, 64) -> (B, num_classes)


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False) -> CifarResNet:
    """ResNet-`depth` for 32x32 images (depth = 6n+2); `plain=True` removes every shortcut."""
    return CifarResNet(depth, num_classes, shortcut, plain)


def cifar_resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 with the small-input stem (3x3 stride-1 convolution, no max-pool) for 32x32 images."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, small_input_stem=True)


CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_MODELS = {  # name -> builder(num_classes); ResNet-1202 is left out (19.4M parameters, slow to train)
    **{f"resnet{depth}": functools.partial(cifar_resnet, depth) for depth in CIFAR_DEPTHS[:-1]},
    "resnet18": cifar_resnet18,
}


# %%
def main(**overrides):
    cfg = helpers.config(globals(), overrides)
    started = time.perf_counter()
    device = helpers.pick_device(cfg.device)
    out_dir = helpers.output_dir(cfg)
    results = {}
    helpers.save_results(out_dir, results, cfg, device, started)
    return results


if __name__ == "__main__":
    helpers.run_cli(main, globals())
