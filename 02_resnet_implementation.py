"""Lesson 02: ResNet-18 to ResNet-152 and the CIFAR ResNets, verified against torchvision and the paper.

What you will learn
    * How He et al. assemble blocks into networks: a stem, stages that halve the resolution and double the width,
      global average pooling and one linear layer (ImageNet: Table 1; CIFAR: section 4.2).
    * The two blocks: `BasicBlock` (lesson 01's, two 3x3 convolutions) and `Bottleneck` (1x1 reduce, 3x3, 1x1
      expand; Fig. 5), which makes 50 to 152 layers affordable.
    * How to prove an implementation is the real thing: torchvision's `state_dict()` loads with `strict=True`
      and both give the same outputs; parameters, layers and multiply-adds match the published figures.
    * Where torchvision departs from the paper (the stride on the bottleneck's 3x3, "v1.5"; zero_init_residual),
      shortcut options A and B, and why the ImageNet stem is wrong for 32x32 images.

Paper
    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385). Every block
    computes y = F(x, {W_i}) + x (Eq. 1), or y = F(x, {W_i}) + W_s x (Eq. 2) where the shape changes, then a ReLU.

Run
    python 02_resnet_implementation.py                        # 53-71 s on 2 CPU cores, fp32, most of it timing
    python 02_resnet_implementation.py --no-measure-latency   # the counts only, about 10 s
    python 02_resnet_implementation.py --pretrained           # classify a photo with torchvision's ImageNet weights
    `--pretrained` needs the network once; the cached file is checked against its published hash and loaded with
    `weights_only=True`. Offline it prints one NOTICE and the rest of the lesson runs.

What you should see (seed 0; tests/test_02_resnet_implementation.py checks every count)
    * ResNet-18/34/50/101/152: 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808 parameters and
      1.814 / 3.664 / 4.089 / 7.801 / 11.514 G multiply-adds at 224x224, exactly torchvision's; 18 / 34 / 50 /
      101 / 152 weighted layers counted from the model.
    * CIFAR ResNet-20/32/44/56/110/1202 (option A): 269,722 / 464,154 / 658,586 / 853,018 / 1,727,962 /
      19,421,274 parameters, the same as their plain counterparts; option B adds 2,752.
    * The stride on the first 1x1 (v1) costs ResNet-50 3.858 G multiply-adds, on the 3x3 (v1.5) 4.089 G; the v1
      figures (3.86 / 7.57 / 11.28 G) are the paper's Table 1 (3.8 / 7.6 / 11.3 G): the paper counted v1.
    * `zero_init_residual=True`: all 12 of ResNet-50's identity-shortcut blocks are exact identities at
      initialisation (0 of 12 without it).
    * The ImageNet stem leaves 1x1 maps in layer4 for a 32x32 image, where 1/9 of each 3x3 kernel reads data; the
      CIFAR stem keeps 4x4 (0.694 of the taps), at 555 instead of 37 M multiply-adds.
    * Forward latency grows with multiply-adds but not in proportion (ResNet-50: 12% more than ResNet-34, and in
      two runs 13-30% slower at batch 1, 2.1x at batch 32); the times are the machine's, the counts are not.

Try this (`--exercise N` runs number N; answers/02_resnet_implementation.md answers each, with numbers)
    1. `--shape-model cifar-resnet56 --no-measure-latency`: maps go 32 -> 16 -> 8 while channels go 16 -> 32 -> 64.
       What does that do to each stage's share of the multiply-adds?
    2. `--shape-model resnet18 --image-size 32 --no-measure-latency`: what is left of a 32x32 image at layer4?
    3. `--shape-model cifar-resnet18 --no-measure-latency`: the same image through the 3x3 stem. Compare with 2.
    4. `--image-size 448 --no-measure-latency`: which column grows 4x, and which does not move?
    5. In Python: `m = resnet50(bottleneck_stride="1x1")`; load torchvision's `resnet50()` weights into it with
       `strict=True` and compare the outputs on one image. What do equal shapes prove?
"""

# %%
from __future__ import annotations

import functools
import hashlib
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for weights and inputs [>= 0, < 4294967296]
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/02_resnet_implementation"  # folder for results.json and figures
IMAGE_SIZE: int = 224  # side of the ImageNet input in pixels, for multiply-adds and latency [>= 32]
MEASURE_LATENCY: bool = True  # time forward passes (the slowest part of the run)
LATENCY_BATCH_SIZES: tuple[int, ...] = (1, 32)  # batch sizes for the latency columns [> 0]
LATENCY_SECONDS: float = 0.5  # timing budget per model and batch size: 3 passes or more until spent [>= 0]
SHAPE_MODEL: str = "resnet50"  # model of the per-stage shape table [in MEASURED_MODELS]
PRETRAINED: bool = False  # load torchvision's ImageNet weights (network needed once) and classify a sample image
PRETRAINED_MODEL: str = "resnet50"  # which ImageNet ResNet --pretrained loads [in IMAGENET_MODELS]
IMAGE: Path = ""  # image file for --pretrained (empty: matplotlib's sample photo grace_hopper.jpg)
# --- end constants -----------------------------------------------------------------------------------

EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: {"shape_model": "cifar-resnet56", "measure_latency": False},
    2: {"shape_model": "resnet18", "image_size": 32, "measure_latency": False},
    3: {"shape_model": "cifar-resnet18", "measure_latency": False},
    4: {"image_size": 448, "measure_latency": False},
    5: "in Python, not flags: see answers/02_resnet_implementation.md, exercise 5",
}

helpers.config(globals(), {})  # the values main() starts from (a notebook shows them)


# %% Lesson 01's blocks, repeated here so that this lesson stands alone (tests/test_standalone.py proves them equal)
def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """W_s x of Eq. 2: a strided 1x1 convolution and batch norm (the paper's option B)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class PlainBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and ReLU, no shortcut: y = relu(F(x))."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.bn2(self.conv2(out))  # F(x) = BN(W2 * relu(BN(W1 * x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x))


class ResidualBlock(PlainBlock):
    """y = relu(F(x) + shortcut(x)): the identity where shapes match (Eq. 1), `make_shortcut` where not (Eq. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, out_channels, stride)
        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if shape_changes else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (Eq. 1)


# A stride-2 block that doubles the channels, as lesson 01 builds it.
ResidualBlock(16, 32, stride=2)


# %% Blocks
def on_meta(build, *args, **kwargs) -> nn.Module:
    """Build a model on the "meta" device: shapes without storage, enough to count parameters and multiply-adds."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:  # mixes channels at each pixel
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(ResidualBlock):
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


# Why a bottleneck. A basic block that carries 256 channels costs 2 * 9 * 256^2 = 1.18M weights. The
# bottleneck (He et al. 2015, section 4.1 "Deeper Bottleneck Architectures", Fig. 5) reduces to 64
# channels with a 1x1 convolution, runs the 3x3 at 64 and expands back with another 1x1: 70k weights,
# about what a basic block at 64 channels costs, for four times the channels between blocks. That is how
# ResNet-50 gets 50 layers for 5% more multiply-adds than ResNet-34 in the paper's v1 (3.86 vs 3.66 G), 12%
# more in torchvision's v1.5 (4.09 G; the stride placement is explained next; this lesson's tables measure both).
#
# Where the stride goes. The paper downsamples in the first block of stages 2-4 ("conv3_1, conv4_1, and
# conv5_1 with a stride of 2", Table 1), and its released Caffe models put that stride on the first
# 1x1 convolution ("v1"). A 1x1 convolution with stride 2 reads one pixel in four, so that block's branch
# (and its 1x1 projection shortcut) never sees three quarters of its input. torchvision moves the stride
# to the 3x3 convolution, whose windows cover every pixel; this is known as "ResNet v1.5", and its
# resnet.py cites NVIDIA's "ResNet50 v1.5 for PyTorch" model card (DeepLearningExamples), which reports
# about 0.5% higher top-1 accuracy and about 5% lower throughput than v1. The price in compute: the first
# 1x1 now runs at the full input resolution, 0.231 GMACs more for ResNet-50/101/152 alike (measured below).
class Bottleneck(nn.Module):
    """The bottleneck block of He et al. 2015 (Fig. 5 right): 1x1 reduce to `width`, 3x3, 1x1 expand to
    4 * `width` channels, y = relu(F(x) + shortcut(x)).

    `stride_on="3x3"` subsamples in the 3x3 convolution (torchvision, "ResNet v1.5");
    `stride_on="1x1"` subsamples in the first 1x1 convolution (the paper's Caffe models, "v1").

    `groups` and `base_width` are torchvision's: the 3x3 convolution runs on int(width * base_width / 64) *
    groups channels split into `groups` independent groups. ResNet-50 is groups=1, base_width=64; lesson 04
    builds ResNeXt-50 (32 groups of 4) and Wide ResNet-50-2 (base width 128) from this same class."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        make_shortcut=projection_shortcut,
        stride_on: str = "3x3",
        groups: int = 1,
        base_width: int = 64,
    ):
        super().__init__()
        if stride_on not in ("3x3", "1x1"):
            raise ValueError(f"stride_on must be '3x3' or '1x1', not {stride_on!r}")
        out_channels = width * self.expansion
        inner = int(width * (base_width / 64.0)) * groups  # channels of the 3x3 convolution (width when groups=1)
        self.conv1 = conv1x1(in_channels, inner, stride if stride_on == "1x1" else 1)
        self.bn1 = nn.BatchNorm2d(inner)
        conv2_stride = stride if stride_on == "3x3" else 1
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=conv2_stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if shape_changes else None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): (B, C_in, H, W) -> (B, 4w, H/s, W/s)"""
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, w, H, W), or H/s, W/s in v1
        out = F.relu(self.bn2(self.conv2(out)))  # (B, w, ., .) -> (B, w, H/s, W/s), in `groups` groups
        return self.bn3(self.conv3(out))  # (B, w, H/s, W/s) -> (B, 4w, H/s, W/s)  (w: the inner width)

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


# Why zero-initialise the last batch norm. Goyal et al. 2017 ("Accurate, Large Minibatch SGD: Training
# ImageNet in 1 Hour", arXiv:1706.02677) set the scale gamma of the last batch norm of every residual
# branch to 0 at initialisation: each branch then outputs 0, each identity-shortcut block computes
# relu(0 + x) = x (its input x is already a ReLU output), and a 50-layer network starts as a stem, four
# projections and a classifier, which eased their large-batch training. torchvision offers it as
# `zero_init_residual` (off by default; its comment credits it with 0.2-0.3% accuracy). The lesson counts
# the blocks that are exact identities at initialisation, with and without it.
def init_like_torchvision(model: nn.Module, zero_init_residual: bool = False) -> nn.Module:
    """The initialisation He et al. 2015 use (from their "Delving Deep into Rectifiers") as
    torchvision applies it: Kaiming normal with fan_out and ReLU gain for convolutions, batch norm scale 1
    and shift 0; the classifier keeps PyTorch's default. Plain and residual nets get the same scheme.
    `zero_init_residual=True` then zeroes the scale of each branch's last batch norm."""
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


# A bottleneck carrying 256 channels: 1x1 down to 64, the 3x3 at 64, 1x1 back up to 256 (Fig. 5, right).
Bottleneck(256, 64)


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
        groups: int = 1,
        width_per_group: int = 64,
    ):
        super().__init__()
        if small_input_stem:  # 32x32 images have no resolution to spare: keep it all
            self.conv1 = conv3x3(3, 64)  # (B, 3, 32, 32) -> (B, 64, 32, 32)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.Identity()
        else:  # 224x224 images: divide the side by 4 before the first block
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 224 -> 112
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # 112 -> 56
        make_block = block
        if block is Bottleneck:
            make_block = functools.partial(
                Bottleneck, stride_on=bottleneck_stride, groups=groups, base_width=width_per_group
            )
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


# He et al. 2015, Table 1: the block and the blocks per stage of each ImageNet ResNet.
IMAGENET_BLOCKS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
                   "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
                   "resnet152": (Bottleneck, [3, 8, 36, 3])}  # fmt: skip


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


IMAGENET_MODELS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101,
                   "resnet152": resnet152}  # fmt: skip


# Parameters of each ImageNet ResNet (built on the meta device: shapes only, no memory, no time).
{name: f"{helpers.count_parameters(on_meta(build)):,}" for name, build in IMAGENET_MODELS.items()}


# %% CIFAR ResNets
# Option A or B. Where a stage halves the resolution and doubles the channels, the shortcut must change
# shape too. He et al. 2015 (section 3.3, Table 3) compare (A) subsampling plus zero channels, free of
# parameters, (B) 1x1 projections only there, and (C) projections everywhere; on ImageNet B beat A by
# about half a point of top-1 error and C beat B slightly, so the ImageNet models use B. On CIFAR
# (section 4.2) they use A "in all cases", so that each residual net has exactly the parameters of its
# plain counterpart and the comparison of lesson 03 is between the same layers with and without
# shortcuts. Option B adds two projections (16->32 and 32->64, with their batch norms): 2,752 parameters.
class CifarResNet(nn.Module):
    """The CIFAR-10 networks of He et al. 2015, section 4.2: a 3x3 convolution with 16 filters, then three
    stages of n blocks with 16, 32, 64 filters on 32x32, 16x16, 8x8 maps, global average pooling and a
    fully connected layer: 6n + 2 weighted layers."""

    def __init__(self, depth: int, num_classes=10, shortcut: str = "A", plain=False, zero_init_residual=False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), not {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (projection), not {shortcut!r}")
        self.depth, self.shortcut_option, self.plain = depth, shortcut, plain
        blocks_per_stage = (depth - 2) // 6
        make_block = functools.partial(BasicBlock, make_shortcut=ShortcutA if shortcut == "A" else projection_shortcut)
        make_block = PlainBlock if plain else make_block  # plain: the same layers with every shortcut removed
        self.conv1, self.bn1 = conv3x3(3, 16), nn.BatchNorm2d(16)
        self.layer1 = make_stage(make_block, 16, 16, blocks_per_stage, stride=1)
        self.layer2 = make_stage(make_block, 16, 32, blocks_per_stage, stride=2)
        self.layer3 = make_stage(make_block, 32, 64, blocks_per_stage, stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, num_classes)
        init_like_torchvision(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        x = self.layer1(x)  # (B, 16, 32, 32), n blocks
        x = self.layer2(x)  # -> (B, 32, 16, 16)
        return self.layer3(x)  # -> (B, 64, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)  # (B, 64, 8, 8) -> (B, 64)
        return self.fc(x)  # (B, 64) -> (B, num_classes)


def cifar_resnet(depth: int, num_classes=10, shortcut="A", plain=False, zero_init_residual=False) -> CifarResNet:
    """ResNet-`depth` for 32x32 images (depth = 6n+2); `plain=True` removes every shortcut."""
    return CifarResNet(depth, num_classes, shortcut, plain, zero_init_residual)


# Why not the ImageNet stem on 32x32 images. The 7x7 stride-2 convolution and the max-pool divide the
# side by 4 before the first block, which suits 224x224 photos. A 32x32 image leaves 8x8 maps for layer1
# and 1x1 maps for layer4. A 3x3 convolution on a 1x1 map reads its one pixel with the centre tap and
# zero padding with the other eight: layer4's convolutions (all but its first) act as 1x1 convolutions,
# and 8/9 of their weights only ever multiply zeros, so the net has no spatial context at depth. The
# CIFAR stem (a 3x3 stride-1 convolution, no max-pool) keeps 32x32 maps in layer1 and 4x4 in layer4; it
# costs 15x the multiply-adds (555 vs 37 MMACs, measured below) because every layer now works on 16x
# more positions. Lesson 06 trains this network.
# The same stem on ResNet-34/50/101/152 gives the "CIFAR ResNet-50" and friends of the widely used CIFAR
# implementations (kuangliu/pytorch-cifar, 21.3M to 58.2M parameters for 10 classes): the ImageNet
# stages and blocks unchanged, only the stem swapped. Names: `resnet20` ... `resnet110` are He et al.'s
# 6n+2 CIFAR nets; `cifar_resnetNN` is ImageNet's ResNet-NN with the 32x32 stem; plain `resnetNN` for
# NN in 18/34/50/101/152 is always the ImageNet net (above), in every lesson.
def cifar_stem_resnet(name: str, num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet `name` (resnet18 ... resnet152) with the small-input stem (3x3 stride-1 convolution,
    no max-pool) for 32x32 images."""
    block, blocks_per_stage = IMAGENET_BLOCKS[name]
    return ResNet(block, blocks_per_stage, num_classes, zero_init_residual, small_input_stem=True)


def cifar_resnet18(num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 with the small-input stem for 32x32 images (lesson 06's --full model)."""
    return cifar_stem_resnet("resnet18", num_classes, zero_init_residual)


CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_MODELS = {  # name -> builder(num_classes); ResNet-1202 is left out (19.4M parameters, slow to train)
    # ResNet-8 (n = 1, one block per stage) is not in the paper's table; it is lesson 06's CPU quick demo
    **{f"resnet{depth}": functools.partial(cifar_resnet, depth) for depth in (8, *CIFAR_DEPTHS[:-1])},
    **{f"cifar_{name}": functools.partial(cifar_stem_resnet, name) for name in IMAGENET_BLOCKS},
}


# Parameters of the CIFAR ResNets with option A shortcuts (the paper's Table 6 quotes 0.27M to 19.4M; main counts
# ResNet-1202 too).
{f"resnet{d}": f"{helpers.count_parameters(on_meta(cifar_resnet, d)):,}" for d in CIFAR_DEPTHS[:-1]}


# %% Counting what the names promise
def multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass, from torch's FLOP counter, on the device the model lives on."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return helpers.count_multiply_adds(model, input_shape, device=device)


def layers_on_main_path(model: nn.Module) -> int:
    """Weighted layers (convolutions and the classifier) that a signal passes through in sequence: what
    the 50 of "ResNet-50" counts. Projection shortcuts (`downsample`) run beside a branch, not in sequence
    with it, and the paper does not count them."""
    return sum(1 for name, _ in helpers.weighted_layers(model) if "downsample" not in name)


def blocks_per_stage(model: nn.Module) -> str:
    return "/".join(str(len(stage)) for name, stage in model.named_children() if name.startswith("layer"))


def measure_latency(models: list[nn.Module], input_shape: tuple[int, ...], device: torch.device, seconds: float):
    """Each model's fastest forward pass in ms (eval, fp32): on a shared machine noise only adds time. The models
    take turns, a pass each per round, so that a slow spell hits them alike: at least 3 passes each, more until
    `seconds` are spent (one if a pass takes longer), after warm-ups at batch 1 and, where cheap, the full batch."""
    x, times = torch.randn(input_shape, device=device), [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model.eval()(x[:1])
            helpers.synchronize(device)
            begin = time.perf_counter()
            model(x[:1])
            helpers.synchronize(device)
            if input_shape[0] > 1 and (time.perf_counter() - begin) * input_shape[0] < seconds:
                model(x)
        needs_more = lambda t: not t or sum(t) < seconds or (len(t) < 3 and t[0] < seconds)  # noqa: E731
        while any(map(needs_more, times)):
            for model, passes in zip(models, times):
                if needs_more(passes):
                    helpers.synchronize(device)
                    begin = time.perf_counter()
                    model(x)
                    helpers.synchronize(device)
                    passes.append(time.perf_counter() - begin)
    return [{"ms": 1000 * min(passes), "repeats": len(passes)} for passes in times]


def add_latencies(rows: list[dict], builds: list, side: int, device: torch.device, cfg) -> None:
    """Time freshly built models (real weights, on `device`) at each batch size of the config, in turns."""
    if not cfg.measure_latency:
        return
    torch.manual_seed(cfg.seed)
    models = [build().to(device) for build in builds]
    for batch in cfg.latency_batch_sizes:
        for row, timing in zip(rows, measure_latency(models, (batch, 3, side, side), device, cfg.latency_seconds)):
            row[f"ms@{batch}"], row[f"repeats@{batch}"] = timing["ms"], timing["repeats"]


def stage_shapes(model: nn.Module, side: int) -> list[dict]:
    """Output shape, parameters and multiply-adds of each top-level module for one side x side image, from
    a forward pass with hooks (on the meta device when the model lives there)."""
    inputs_outputs = {}
    hooks = [child.register_forward_hook(lambda _m, args, out, name=name: inputs_outputs.update({name: (args[0], out)}))
             for name, child in model.named_children()]  # fmt: skip
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side, device=next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    rows = []
    for name, child in model.named_children():
        x, out = inputs_outputs[name]
        rows.append({"module": name, "blocks": len(child) if isinstance(child, nn.Sequential) else None,
                     "output shape": "x".join(str(d) for d in out.shape),  # B x C x H x W
                     "params": helpers.count_parameters(child),
                     "MMACs": helpers.count_multiply_adds(child, tuple(x.shape), device=x.device) / 1e6})  # fmt: skip
    return rows


def fraction_of_taps_on_data(height: int, width: int) -> float:
    """Share of a padded 3x3 convolution's (output pixel, tap) pairs that read the input rather than the
    zero padding, on an H x W map. On a 1x1 map only the centre tap does: 1/9."""
    ones = torch.ones(1, 1, height, width)
    return (F.conv2d(ones, torch.ones(1, 1, 3, 3), padding=1).mean() / 9).item()


# Every model the lesson measures: name -> (builder without arguments, input side in pixels).
MEASURED_MODELS = {
    **{name: (build, 224) for name, build in IMAGENET_MODELS.items()},
    **{f"cifar-resnet{depth}": (functools.partial(cifar_resnet, depth), 32) for depth in CIFAR_DEPTHS},
    "cifar-resnet18": (cifar_resnet18, 32),
}
PAPER_TABLE1_GFLOPS = {  # He et al. 2015, Table 1, "FLOPs" (they count multiply-adds)
    "resnet18": 1.8,
    "resnet34": 3.6,
    "resnet50": 3.8,
    "resnet101": 7.6,
    "resnet152": 11.3,
}


# ResNet-18's stages on one 224x224 image: the table `main` prints for SHAPE_MODEL.
helpers.format_table(stage_shapes(on_meta(resnet18), 224))


# %% The measurements, one table each
def imagenet_table(cfg, device: torch.device) -> list[dict]:
    """Blocks, layers, parameters and multiply-adds of the five ImageNet ResNets, against torchvision's
    published figures (its weights' metadata, "_ops" = GMACs at 224x224), and their forward latency."""
    import torchvision

    rows = []
    for name, build in IMAGENET_MODELS.items():
        model = on_meta(build)
        published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] if cfg.image_size == 224 else None
        row = {"model": name, "blocks/stage": blocks_per_stage(model), "layers": layers_on_main_path(model),
               "params": helpers.count_parameters(model), "published": published,  # published: for 224x224 only
               "GMACs": multiply_adds(model, (1, 3, cfg.image_size, cfg.image_size)) / 1e9}  # fmt: skip
        row["off %"] = None if row["published"] is None else 100 * (row["GMACs"] / row["published"] - 1)
        rows.append(row)
    add_latencies(rows, list(IMAGENET_MODELS.values()), cfg.image_size, device, cfg)
    timed = [(f"ms@{b}", ".1f") for b in cfg.latency_batch_sizes] if cfg.measure_latency else []
    columns = [("model", ""), ("blocks/stage", ""), ("layers", "d"), ("params", ",d"), ("GMACs", ".3f")]
    title = (f"ImageNet ResNets at {cfg.image_size}x{cfg.image_size} (published: torchvision's weights metadata; "
             f"ms@B: fastest forward pass at batch B on {helpers.device_name(device)})")  # fmt: skip
    helpers.print_table(rows, [*columns, ("published", ".3f"), ("off %", "+.2f"), *timed], title)
    if cfg.measure_latency:
        spans = [(b, [r[f"repeats@{b}"] for r in rows]) for b in cfg.latency_batch_sizes]
        repeats = ", ".join(f"batch {b}: {min(counts)}-{max(counts)}" for b, counts in spans)
        print(f"latency = the fastest of repeated passes ({repeats} per model; raise --latency-seconds for more)\n")
    return rows


def cifar_table(cfg, device: torch.device) -> list[dict]:
    """The 6n+2 CIFAR ResNets with option A and option B shortcuts, and the CIFAR-stem ResNet-18."""
    rows = []
    for name, (build, side) in MEASURED_MODELS.items():
        if not name.startswith("cifar-"):
            continue
        model = on_meta(build)
        row = {"model": name, "blocks/stage": blocks_per_stage(model), "layers": layers_on_main_path(model),
               "params": helpers.count_parameters(model), "params (B)": None,
               "MMACs": multiply_adds(model, (1, 3, side, side)) / 1e6}  # fmt: skip
        if isinstance(model, CifarResNet):
            row["params (B)"] = helpers.count_parameters(on_meta(cifar_resnet, model.depth, shortcut="B"))
        rows.append(row)
    to_time = {name: build for name, (build, _) in MEASURED_MODELS.items() if name.startswith("cifar-")}
    to_time.pop("cifar-resnet1202")  # at batch 32 it alone would take seconds on a laptop CPU
    add_latencies([r for r in rows if r["model"] in to_time], list(to_time.values()), 32, device, cfg)
    timed = [(f"ms@{b}", ".1f") for b in cfg.latency_batch_sizes] if cfg.measure_latency else []
    columns = [("model", ""), ("blocks/stage", ""), ("layers", "d"), ("params", ",d"), ("params (B)", ",d")]
    title = "CIFAR ResNets at 32x32, 10 classes (params: option A shortcuts; params (B): projection shortcuts; "
    helpers.print_table(rows, [*columns, ("MMACs", ".1f"), *timed], title + "ResNet-1202 is not timed)")
    return rows


def stride_table(cfg) -> dict:
    """Bottleneck stride on the first 1x1 convolution (v1, the paper) or on the 3x3 (v1.5, torchvision)."""
    rows = []
    for name in ("resnet50", "resnet101", "resnet152"):
        v1 = multiply_adds(on_meta(IMAGENET_MODELS[name], bottleneck_stride="1x1"), (1, 3, 224, 224)) / 1e9
        v15 = multiply_adds(on_meta(IMAGENET_MODELS[name], bottleneck_stride="3x3"), (1, 3, 224, 224)) / 1e9
        rows.append({"model": name, "v1": v1, "v1.5": v15, "v1.5 - v1": v15 - v1, "paper": PAPER_TABLE1_GFLOPS[name]})
    # The only difference is the first 1x1 of the first block of stages 2-4: v1.5 runs it on the block's
    # input resolution (H x W), v1 on a quarter of it, so v1.5 costs C_in * w * H * W * 3/4 more per stage.
    stages = ((256, 128, 56), (512, 256, 28), (1024, 512, 14))  # (C_in, w, H) of each stage's first block
    predicted = sum(c_in * width * side * side * 3 / 4 for c_in, width, side in stages)
    title = ("Bottleneck stride on the first 1x1 (v1) or the 3x3 (v1.5), GMACs at 224x224; paper: He et al. 2015, "
             f"Table 1; predicted v1.5 - v1 = {predicted / 1e9:.3f}")  # fmt: skip
    helpers.print_table(
        rows, [("model", ""), ("v1", ".3f"), ("v1.5", ".3f"), ("v1.5 - v1", ".3f"), ("paper", ".1f")], title
    )
    return {"rows": rows, "predicted_difference_gmacs": predicted / 1e9}


def block_table() -> list[dict]:
    """BasicBlock vs Bottleneck on a 56x56 map: the same 3x3 width (He et al. 2015, Fig. 5), and the same
    number of channels carried between blocks."""
    side = 56
    blocks = {"basic 64->64, 3x3 width 64": on_meta(BasicBlock, 64, 64),
              "bottleneck 256->256, 3x3 width 64": on_meta(Bottleneck, 256, 64),
              "basic 256->256, 3x3 width 256": on_meta(BasicBlock, 256, 256)}  # fmt: skip
    rows = [{"block": label, "layers": len(helpers.weighted_layers(block)), "params": helpers.count_parameters(block),
             "MMACs": multiply_adds(block, (1, block.conv1.in_channels, side, side)) / 1e6}
            for label, block in blocks.items()]  # fmt: skip
    helpers.print_table(rows, "block layers:d params:,d MMACs:.1f", f"One block on a {side}x{side} map")
    return rows


def zero_init_table(cfg) -> list[dict]:
    """How far each ResNet-50 block without a projection moves its input at initialisation, with and
    without `zero_init_residual` (train mode, as in the first steps of training)."""
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(cfg.seed))  # (B, 3, H, W)
    rows = []
    for zero_init in (False, True):
        torch.manual_seed(cfg.seed)
        model = resnet50(zero_init_residual=zero_init).train()
        changes = []

        def record(_block, args, out, changes=changes):  # |y - x| / |x| of one block
            changes.append(((out - args[0]).norm() / args[0].norm()).item())

        blocks = [m for m in model.modules() if isinstance(m, Bottleneck) and m.downsample is None]
        hooks = [block.register_forward_hook(record) for block in blocks]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        rows.append({"zero_init_residual": str(zero_init), "blocks": len(changes),
                     "exact identities": sum(change == 0 for change in changes),
                     "mean |y-x|/|x|": sum(changes) / len(changes)})  # fmt: skip
    columns = [("zero_init_residual", ""), ("blocks", "d"), ("exact identities", "d"), ("mean |y-x|/|x|", ".3f")]
    title = "ResNet-50 at initialisation, the 12 blocks without a projection, 4 images of 64x64 (train mode)"
    helpers.print_table(rows, columns, title)
    return rows


def stem_table() -> list[dict]:
    """ResNet-18 on 32x32 images with the ImageNet stem and with the CIFAR stem."""
    rows = []
    stems = {"ImageNet stem: 7x7/2 conv + max-pool": on_meta(resnet18, num_classes=10),
             "CIFAR stem: 3x3/1 conv": on_meta(cifar_resnet18)}  # fmt: skip
    for label, model in stems.items():
        shapes = {r["module"]: r["output shape"] for r in stage_shapes(model, 32)}
        layer4_side = int(shapes["layer4"].split("x")[-1])
        rows.append({"stem": label, "layer1 map": shapes["layer1"].split("x", 2)[-1],
                     "layer4 map": shapes["layer4"].split("x", 2)[-1],
                     "layer4 taps on data": fraction_of_taps_on_data(layer4_side, layer4_side),
                     "params": helpers.count_parameters(model), "MMACs": multiply_adds(model, (1, 3, 32, 32)) / 1e6})  # fmt: skip
    columns = [("stem", ""), ("layer1 map", ""), ("layer4 map", ""), ("layer4 taps on data", ".3f"), ("params", ",d")]
    title = "ResNet-18 on a 32x32 image, 10 classes (taps on data: share of layer4's 3x3 taps that read the map, "
    helpers.print_table(rows, [*columns, ("MMACs", ".1f")], title + "not the zero padding)")
    return rows


# Share of a 3x3 kernel's taps that read data rather than zero padding, by map side (the stem table's last column).
helpers.format_table([{"map": f"{n}x{n}", "taps_on_data": fraction_of_taps_on_data(n, n)} for n in (1, 2, 4, 8, 32)])


# %% Loading torchvision's ImageNet weights (optional, needs the network once)
def classify_with_pretrained(model_name: str, image_path: str) -> dict:
    """Load torchvision's ImageNet weights for `model_name` into the lesson's model (strict) and classify
    one image. Without network access (and no cached file), print one notice and return."""
    import contextlib
    import io
    import urllib.error

    import torchvision

    weights, cached, expected = cached_weights(model_name)
    try:
        if not cached.exists():  # torch.hub prints "Downloading: ..." before it fails: keep a failure to one line
            cached.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=expected, progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        reason = helpers.error_summary(getattr(error, "reason", None) or error)
        print(f"NOTICE: --pretrained skipped: torchvision's {model_name} {weights.name} weights could not be loaded from "
              f"the torch cache or the network ({reason}); everything above ran without them.", flush=True)  # fmt: skip
        return {"loaded": False, "weights": f"{model_name}.{weights.name}", "reason": reason}
    check_cached_weights(model_name, cached, expected)  # checked like a download, before it is unpickled
    model = IMAGENET_MODELS[model_name]()
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)  # every name and shape matches, or this raises
    except Exception as error:  # noqa: BLE001 - a damaged file, whatever its damage, is one line
        why = f"{helpers.error_summary(error)} (delete it to download it again)"
        raise helpers.UserError(f"cannot load {cached}: {why}") from None
    reference = torchvision.models.get_model(model_name)
    reference.load_state_dict(state)
    image = torchvision.io.read_image(image_path, mode=torchvision.io.ImageReadMode.RGB)  # (3, H, W) uint8
    batch = weights.transforms()(image).unsqueeze(0)  # resize, centre-crop 224, normalise: (1, 3, 224, 224)
    model.eval(), reference.eval()
    with torch.no_grad():
        probs = model(batch).softmax(1)[0]
        reference_probs = reference(batch).softmax(1)[0]
    top = probs.topk(5)
    ranked = enumerate(zip(top.values.tolist(), top.indices.tolist()))
    rows = [{"rank": i + 1, "class": weights.meta["categories"][k], "probability": p} for i, (p, k) in ranked]
    helpers.print_table(rows, "rank:d class probability:.3f", f"{model_name} on {image_path}")
    difference = (probs - reference_probs).abs().max().item()
    print(f"largest probability difference to torchvision's own {model_name}: {difference:.2e}\n")
    return {"loaded": True, "weights": f"{model_name}.{weights.name}", "image": image_path, "top5": rows,
            "max_prob_difference_vs_torchvision": difference}  # fmt: skip


def cached_weights(model_name: str):
    """torchvision's weights entry for `model_name`, the file torch.hub caches it in, and the start of that file's
    SHA-256, which torch.hub puts in the file's name (resnet50-11ad3fa6.pth)."""
    import torchvision

    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return weights, cached, re.search(r"-([a-f0-9]+)\.", cached.name)[1]


def check_cached_weights(model_name: str, cached: Path, expected: str) -> None:
    """A cached file is checked like a download: its SHA-256 must start as its name says. Only then is it loaded, and
    then with weights_only=True, so a file planted in the cache is never unpickled freely."""
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    what = f"its SHA-256 starts {digest[: len(expected)]}, not {expected} (delete it to download it again)"
    helpers.require(digest.startswith(expected), f"{cached} is not torchvision's {model_name} weights: {what}")


def readable_image(path: str) -> None:
    """Decode the image now, before the minutes of work: a text or empty file is one error line."""
    import torchvision

    try:
        torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as error:
        raise helpers.UserError(
            f"--image {path} is not an image torchvision can read: {helpers.error_summary(error)} (pass a JPEG or PNG)"
        ) from None


def default_sample_image() -> str | None:
    """matplotlib ships a photo of Grace Hopper (600x512 JPEG) in its sample data; torchvision ships none."""
    try:
        import matplotlib.cbook

        return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (OSError, ValueError):
        return None


# The photo --pretrained classifies unless --image names another.
default_sample_image()


# %% The run
@helpers.constants_as_keywords
def main(**overrides):
    """The parts of "What you will learn", in order; saves results.json and resnet_family.png in `out`."""
    cfg = helpers.config(globals(), overrides)
    if cfg.measure_latency:  # the stem's output, (B, 64, side/2, side/2) in float32, a few times over
        helpers.require_memory(
            4 * 8 * 64 * max(cfg.latency_batch_sizes) * (cfg.image_size // 2) ** 2,
            "--image-size x --latency-batch-sizes",
        )
    image = cfg.image or default_sample_image()
    if cfg.pretrained:  # check before the minutes of work, not after
        helpers.require(image is not None, "matplotlib's sample photo grace_hopper.jpg is missing (pass --image PATH)")
        helpers.require(Path(image).is_file(), f"--image {image} is not a file (pass the path of a JPEG or PNG)")
        readable_image(image)
        _, cached, expected = cached_weights(cfg.pretrained_model)
        if cached.exists():
            check_cached_weights(cfg.pretrained_model, cached, expected)
    started = time.perf_counter()
    device = helpers.pick_device(cfg.device)
    out_dir = helpers.output_dir(cfg, "results.json", "resnet_family.png")
    helpers.seed_everything(cfg.seed)
    results = whole_networks(cfg, device)  # 1. stem, stages, pooling, classifier; 3. against the published counts
    results["block_comparison"] = block_table()  # 2. the two blocks
    results |= departures_from_the_paper(cfg)  # 4. v1.5 stride, zero_init_residual, options A/B, the stem
    if cfg.pretrained:  # 3. the real thing: torchvision's ImageNet weights, loaded strictly
        results["pretrained"] = classify_with_pretrained(cfg.pretrained_model, image)
    print(f"figure: {plot_models(results, out_dir / 'resnet_family.png')}")
    path = helpers.save_results(out_dir, results, cfg, device, started)
    print(f"results: {path}  ({time.perf_counter() - started:.1f} s)")
    return results


def whole_networks(cfg, device: torch.device) -> dict:
    """Part 1: the ImageNet and CIFAR families against their published counts, and one model stage by stage."""
    results = {"imagenet_models": imagenet_table(cfg, device), "cifar_models": cifar_table(cfg, device)}
    build, side = MEASURED_MODELS[cfg.shape_model]
    side = cfg.image_size if side == 224 else side
    shape_rows = stage_shapes(on_meta(build), side)
    helpers.print_table(
        shape_rows,
        [("module", ""), ("blocks", "d"), ("output shape", ""), ("params", ",d"), ("MMACs", ".1f")],
        f"{cfg.shape_model} module by module, one {side}x{side} image (output shape: B x C x H x W)",
    )
    results["stage_shapes"] = {"model": cfg.shape_model, "side": side, "rows": shape_rows}
    return results


def departures_from_the_paper(cfg) -> dict:
    """Part 4: where the bottleneck strides (v1 vs v1.5), zero_init_residual, and the stem on 32x32 images."""
    return {
        "stride_placement": stride_table(cfg),
        "zero_init_residual": zero_init_table(cfg),
        "stem_on_32x32": stem_table(),
    }


def plot_models(results: dict, path: Path) -> Path:
    """Parameters, multiply-adds (v1 and v1.5) and, if measured, latency of the five ImageNet ResNets."""
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    rows = results["imagenet_models"]
    names = [r["model"].replace("resnet", "ResNet-") for r in rows]
    timed = [key for key in rows[0] if key.startswith("ms@")]
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(14 if timed else 9.5, 3.8))
    axes[0].bar(names, [r["params"] / 1e6 for r in rows], color="tab:blue")
    axes[0].set_ylabel("parameters (millions)")
    axes[0].set_title("Parameters")
    v1 = {r["model"]: r["v1"] for r in results["stride_placement"]["rows"]}
    positions = list(range(len(rows)))
    axes[1].bar(
        [p - 0.2 for p in positions],
        [r["GMACs"] for r in rows],
        width=0.4,
        label="as built (torchvision; v1.5 bottlenecks)",
    )
    bottlenecked = [(p, v1[r["model"]]) for p, r in zip(positions, rows) if r["model"] in v1]
    axes[1].bar(
        [p + 0.2 for p, _ in bottlenecked], [g for _, g in bottlenecked], width=0.4, label="v1 bottlenecks (the paper)"
    )
    axes[1].set_xticks(positions, names)
    axes[1].set_ylabel("multiply-adds per image (G)")
    axes[1].set_title("Compute per 224x224 image")
    axes[1].legend(fontsize=8)
    if timed:
        for key in timed:
            axes[2].plot([r["GMACs"] for r in rows], [r[key] for r in rows], "o-", label=f"batch {key[3:]}")
        for r, name in zip(rows, names):
            axes[2].annotate(name, (r["GMACs"], r[timed[-1]]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        axes[2].set_xlabel("multiply-adds per image (G)")
        axes[2].set_ylabel("forward time per batch (ms)")
        axes[2].set_yscale("log")
        axes[2].set_title("Measured forward latency")
        axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return helpers.save_figure(fig, path)


if __name__ == "__main__":
    helpers.run_cli(main, globals())
