"""Lesson 04: residual variants: pre-activation, wide, grouped (ResNeXt), dense and squeeze-excitation networks,
each checked against its paper or torchvision and measured on the same footing.

What you will learn
    * Pre-activation (He et al. 2016): BN and ReLU before each convolution, nothing after the addition, so
      x_{l+1} = x_l + F(x_l) (Eq. 3), x_L = x_l + sum_i F(x_i) (Eq. 4), dE/dx_l = dE/dx_L (1 + d/dx_l sum_i F(x_i)) (Eq. 5).
    * Wide ResNet (Zagoruyko and Komodakis 2016): the same units, k times wider and far fewer; WRN-50-2.
    * ResNeXt (Xie et al. 2017): a bottleneck whose 3x3 convolution has C groups, y = x + sum_i T_i(x) (Eq. 3).
    * DenseNet (Huang et al. 2017): concatenate instead of add, x_l = H_l([x_0, ..., x_{l-1}]) (Eq. 2).
    * Squeeze-and-Excitation (Hu et al. 2018): gate each channel of the branch by
      s = sigmoid(W2 relu(W1 mean_{H,W}(u))) (Eqs. 2-4) before the addition.
    ResNeXt-50, WRN-50-2 and SE-ResNet-50 are lesson 02's ResNet with one change each; the tests prove the first two
    equal to torchvision's (SE-ResNet-50 has no torchvision counterpart).

Run
    python 04_residual_variants.py            # the checks, the table of 14 variants and a 40-step comparison
    python 04_residual_variants.py --full     # a longer comparison; meant for a GPU
    Runtime on 2 quiet CPU cores: 99-132 s in fp32 (an AMD EPYC without bf16; every timing the median of 5).
    With bf16 (AVX512-BF16) 55-86 s when each timing was one pass; not yet measured with the median of 5.

What you should see (seed 0, CPU)
    1. The grouped convolution and the 8 separate paths of a ResNeXt-29 block agree (printed: 0 to 6e-7).
    2. The SE gates of a fresh SE-ResNet-50 block lie between 0.46 and 0.54 and already change its output by 5%.
    3. A 1001-layer pre-activation ResNet (10.3M parameters) runs forward and backward on 2 images, every
       gradient finite. dE/dx_l does not vanish: it is smallest next to the loss (RMS 4.9e-5 at unit 333) and
       grows on its way back (3.6e+1 at unit 1), fastest where x_l is small (each branch's BN divides by it).
    4. One table of all 14 variants: parameters (10 equal to torchvision's or the papers' rounded figures: WRN-28-10
       36,479,194 for "36.5M", ResNeXt-50 25,028,904, DenseNet-121 7,978,856, SE-ResNet-50 28,088,024; pre-act-1001
       counts 10.33M where the paper says 10.2M), multiply-adds, median forward and step times, peak memory, errors.
    5. The equal-budget comparison: 40 steps of 32 images for five small variants, the same order and schedule: all
       train with one recipe; after 1,280 images (16% of the 8,000 it draws from), on one seed, it cannot rank them.

Try this (`--exercise N` runs number N; answers/04_residual_variants.md answers each, with numbers)
    1. `--deep-depth 164 --no-measure-latency`, then 2. `--deep-depth 2000 --no-measure-latency`: does the
       gradient RMS from the last unit to the first shrink or grow with depth?
    3. Make `PreActBottleneck.forward` return `F.relu(identity + out)` (a ReLU after the addition, as in lesson
       02's blocks) and rerun exercise 1: what happens to the signal and the gradient along the stages?
    4. Set `SEBottleneck.reduction = 4` and run with `--no-measure-latency`: how many parameters does SE add
       now (2C^2/r per block)?
"""

# %%
from __future__ import annotations

import functools
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for weights, inputs and data order [>= 0, < 4294967296]
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/04_residual_variants"  # folder for results.json and figures
FULL: bool = False  # longer comparison training on all of the training set (meant for a GPU)
DATASET: str = "cifar10"  # a quick run falls back if absent [cifar10 | cifar100 | fashion-mnist | synthetic]
DATA_DIR: Path = "data"  # where datasets are stored or downloaded
DOWNLOAD: bool = True  # download a missing dataset (needs the internet)
TRAIN_SIZE: int = 8000  # training images kept for the comparison (the quick run sees fewer than that) [> 0]
VAL_SIZE: int = 1000  # training images held out (not used for any choice here; kept for the data split) [> 0]
TEST_SIZE: int = 1000  # test images the comparison is evaluated on [> 0]
TRAIN_STEPS: int = 40  # SGD steps per model in the equal-budget comparison [> 0]
BATCH_SIZE: int = 32  # images per SGD step in the comparison [> 0]
LR: float = 0.1  # peak learning rate (He et al. 2015's CIFAR value), reached after a linear warm-up [> 0]
WARMUP_STEPS: int = 10  # steps of linear learning-rate warm-up [>= 0]
AUGMENT: bool = False  # random crop and flip during the comparison (worth it only for long runs)
PRECISION: str = "auto"  # autocast dtype of the comparison training [auto | fp32 | bf16 | fp16]
BN_RECALIBRATION_BATCHES: int = 20  # train-mode batches that re-estimate BN statistics before evaluation [>= 0]
MEASURE_LATENCY: bool = True  # time every variant's forward pass and training step (the slowest part of the run)
TIMING_BATCH: int = 1  # images per batch when timing every variant [> 0]
TIMING_REPEATS: int = 5  # timed repetitions per measurement (the median is reported), after one warm-up [> 0]
CIFAR_TIMING_SIZE: int = 32  # input height and width (pixels) for timing the CIFAR variants [>= 32]
IMAGENET_TIMING_SIZE: int = 64  # input side (pixels) for timing ImageNet variants (MACs: at 224) [>= 64]
DEEP_DEPTH: int = 1001  # depth of the very deep pre-activation network checked at initialisation (9n+2) [>= 11]
DEEP_BATCH: int = 2  # images in the very deep network's forward and backward pass [>= 2]
# --- end constants -----------------------------------------------------------------------------------

EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: {"deep_depth": 164, "measure_latency": False},
    2: {"deep_depth": 2000, "measure_latency": False},
    3: "in PreActBottleneck.forward, return `F.relu(identity + out)`; then run --exercise 1",
    4: "set `SEBottleneck.reduction = 4`; then run --no-measure-latency",
}

FULL_OVERRIDES = {"train_size": 45000, "train_steps": 8000, "batch_size": 128, "augment": True, "warmup_steps": 200}


helpers.config(globals(), {})  # the values main() starts from (a notebook shows them)


# %% Lesson 02's blocks and ResNets and lesson 03's training recipe, repeated here in compact form (only what this
# lesson uses) so that it stands alone; tests/test_standalone.py proves each copy equal to its original.
def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:  # W_s x (Eq. 2), option B
    return nn.Sequential(conv(in_channels, out_channels, 1, stride), nn.BatchNorm2d(out_channels))


class ShortcutA(nn.Module):  # option A: subsample, then zero-pad the new channels; no parameters
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.new_channels, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.new_channels))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__()
        self.conv1, self.bn1 = conv(in_channels, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3), nn.BatchNorm2d(width)
        changes = stride != 1 or in_channels != width
        self.downsample = make_shortcut(in_channels, width, stride) if changes else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # F(x) = BN(W2 * relu(BN(W1 * x)))
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (B, C_in, H, W) -> (B, w, H/s, W/s)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (Eq. 1)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (the stride here: "v1.5"; in `groups` groups of base_width / 64 * width), 1x1 expand to 4w."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, make_shortcut=projection_shortcut, groups=1, base_width=64):
        nn.Module.__init__(self)
        inner, out_channels = int(width * (base_width / 64.0)) * groups, 4 * width
        self.conv1, self.bn1 = conv(in_channels, inner, 1), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = conv(inner, inner, 3, stride, groups), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = conv(inner, out_channels, 1), nn.BatchNorm2d(out_channels)
        changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if changes else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # (B, C_in, H, W) -> (B, w, H/s, W/s)
        return self.bn3(self.conv3(out))  # -> (B, 4w, H/s, W/s)


def make_stage(make_block, in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = []
    for index in range(num_blocks):
        blocks.append(make_block(in_channels, width, stride if index == 0 else 1))
        in_channels = width * blocks[-1].expansion
    return nn.Sequential(*blocks)


def init_like_torchvision(model: nn.Module) -> nn.Module:  # BN keeps its own init: scale 1, shift 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


class CifarResNet(nn.Module):
    """He et al. 2015, section 4.2: a 3x3 conv with 16 filters, three stages of n blocks at 16, 32, 64 filters
    (option A shortcuts), global average pooling and a linear layer: 6n + 2 weighted layers."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n, make_block = (depth - 2) // 6, functools.partial(BasicBlock, make_shortcut=ShortcutA)
        self.conv1, self.bn1 = conv(3, 16, 3), nn.BatchNorm2d(16)
        self.layer1 = make_stage(make_block, 16, 16, n, stride=1)
        self.layer2 = make_stage(make_block, 16, 32, n, stride=2)
        self.layer3 = make_stage(make_block, 32, 64, n, stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # -> (B, 64, 8, 8)
        return self.fc(self.avgpool(x).flatten(1))  # (B, 64, 8, 8) -> (B, 64) -> (B, K)


cifar_resnet = CifarResNet  # lesson 02's name: cifar_resnet(depth, num_classes)


class ResNet(nn.Module):
    """He et al.'s ImageNet ResNets (Table 1), torchvision's names: 7x7/2 conv, max-pool, stages 64-512, pool, fc."""

    def __init__(self, block, blocks_per_stage, num_classes=1000, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 224 -> 112
        self.bn1, self.maxpool = nn.BatchNorm2d(64), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # 112 -> 56
        make_block = block
        if block is Bottleneck:
            make_block = functools.partial(Bottleneck, groups=groups, base_width=width_per_group)
        channels = 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), start=1):
            self.add_module(f"layer{index}", make_stage(make_block, channels, width, count, 1 if index == 1 else 2))
            channels = width * block.expansion
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(channels, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, 3, 224, 224) -> (B, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # -> (B, 512e, 7, 7), e = block expansion
        return self.fc(self.avgpool(x).flatten(1))  # -> (B, 512e) -> (B, K)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def on_meta(build, *args, **kwargs) -> nn.Module:  # shapes without storage: enough to count parameters
    with torch.device("meta"):
        return build(*args, **kwargs)


CIFAR_MODELS = {f"resnet{depth}": functools.partial(cifar_resnet, depth) for depth in (20, 110)}  # as in lesson 02


def sgd_train(model, data, *, steps, batch_size, lr, device, generator, lr_milestones=(), warmup_steps=0,
              amp_dtype=None, augment=False, desc="train") -> list[dict]:  # fmt: skip
    """Lesson 03's recipe (He et al. 2015, section 4.2) without the options this lesson does not use: SGD (momentum
    0.9, weight decay 1e-4) for `steps` mini-batches, a linear warm-up over `warmup_steps`, then the learning rate
    divided by 10 at each milestone. One record per step: loss, error and learning rate."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    batches, history = helpers.endless_batches(len(data.train_x), batch_size, generator), []
    for step in (progress := helpers.Progress(range(steps), desc, unit="img", scale=batch_size)):
        warm = step < warmup_steps
        rate = lr * (step + 1) / warmup_steps if warm else lr * 0.1 ** sum(step >= m for m in lr_milestones)
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = next(batches).to(data.train_x.device)
        images, labels = data.train_x[index].to(device), data.train_y[index].to(device)
        if augment:
            images = helpers.random_crop_flip(images, generator=generator)
        with helpers.autocast(device, amp_dtype):
            logits = model(helpers.normalize(images, data.mean, data.std))
            loss = F.cross_entropy(logits.float(), labels)
        diverged = f"the training loss became {loss.item()} at step {step} (lower --lr)"
        helpers.require(torch.isfinite(loss).item(), diverged)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        error = (logits.argmax(1) != labels).float().mean().item()
        history.append({"step": step + 1, "loss": loss.item(), "error": error, "lr": rate})
        progress.set_postfix_str(f"loss {loss.item():.3f} err {error:.1%}")
    return history


# The copy's sizes, as lesson 02 counts them.
{f"resnet{d}": f"{helpers.count_parameters(cifar_resnet(d)):,} parameters" for d in (20, 56)}


# %% Pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks")
class PreActBlock(nn.Module):
    """The basic pre-activation unit: x_{l+1} = x_l + F(x_l), F = conv(relu(BN(conv(relu(BN(x)))))), nothing after the
    addition, so the identity path is bare (He et al. 2016, Eqs. 4-5). Where the shape changes, the 1x1 projection
    reads the pre-activated input, as in the paper's code. `dropout` between the convolutions: Wide ResNet's option."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        out_channels = width * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv(in_channels, width, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv(width, out_channels, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shape_changes = stride != 1 or in_channels != out_channels
        self.shortcut = conv(in_channels, out_channels, 1, stride) if shape_changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))  # (B, C_in, H, W), the pre-activation
        out = self.conv1(pre)  # (B, C_in, H, W) -> (B, width, H/s, W/s)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))  # (B, width, H/s, W/s) -> (B, C_out, H/s, W/s)
        identity = x if self.shortcut is None else self.shortcut(pre)  # bare x, or a projection of it
        return identity + out  # x_{l+1} = x_l + F(x_l, W_l)  (He et al. 2016, Eq. 3): nothing after the sum


class PreActBottleneck(PreActBlock):
    """BN-ReLU-1x1, BN-ReLU-3x3 (the stride here, as torchvision; the paper's code strides the 1x1), BN-ReLU-1x1 to 4w."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dropout: float = 0.0):
        nn.Module.__init__(self)
        out_channels = width * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv(in_channels, width, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv(width, width, 3, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), conv(width, out_channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        shape_changes = stride != 1 or in_channels != out_channels
        self.shortcut = conv(in_channels, out_channels, 1, stride) if shape_changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))  # (B, C_in, H, W)
        out = self.conv1(pre)  # (B, C_in, H, W) -> (B, width, H, W)
        out = self.conv2(F.relu(self.bn2(out)))  # (B, width, H, W) -> (B, width, H/s, W/s)
        out = self.conv3(self.dropout(F.relu(self.bn3(out))))  # (B, width, H/s, W/s) -> (B, 4 width, H/s, W/s)
        identity = x if self.shortcut is None else self.shortcut(pre)
        return identity + out  # x_{l+1} = x_l + F(x_l, W_l)  (He et al. 2016, Eq. 3)


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet: a 3x3 stem, three stages of units at 32x32, 16x16 and 8x8 of inner `widths`
    (16, 32, 64 for He et al.; times k for a Wide ResNet), the BN-ReLU the last unit leaves out, pooling, linear."""

    def __init__(self, block, blocks_per_stage: int, widths=(16, 32, 64), num_classes=10, dropout=0.0):
        super().__init__()
        self.conv1 = conv(3, 16, 3)
        stages, channels, make_unit = [], 16, functools.partial(block, dropout=dropout)
        for index, width in enumerate(widths):
            stages.append(make_stage(make_unit, channels, width, blocks_per_stage, stride=1 if index == 0 else 2))
            channels = width * block.expansion
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels)  # the units add un-normalised signals: normalise once at the end
        self.fc = nn.Linear(channels, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        x = self.layer1(x)  # -> (B, 16 e, 32, 32)   e = block.expansion times the width factor
        x = self.layer2(x)  # -> (B, 32 e, 16, 16)
        x = self.layer3(x)  # -> (B, 64 e, 8, 8)
        x = F.relu(self.bn(x)).mean(dim=(2, 3))  # (B, 64 e, 8, 8) -> (B, 64 e)
        return self.fc(x)  # (B, num_classes)


def preact_resnet(depth: int, num_classes: int = 10, bottleneck: bool | None = None) -> PreActResNet:
    """Depth 6n+2 with basic units (2 layers each) or 9n+2 with bottlenecks (3 layers each); the paper's
    164- and 1001-layer nets are bottleneck nets (n = 18 and 111)."""
    bottleneck = depth >= 164 if bottleneck is None else bottleneck
    layers_per_unit, kind = (3, "bottleneck") if bottleneck else (2, "basic")
    rule = f"a pre-activation ResNet with {kind} units has depth {3 * layers_per_unit}n+2 (got {depth})"
    helpers.require((depth - 2) % (3 * layers_per_unit) == 0 and depth > 2, rule)
    block = PreActBottleneck if bottleneck else PreActBlock
    return PreActResNet(block, (depth - 2) // (3 * layers_per_unit), num_classes=num_classes)


# A pre-activation unit that halves the map and doubles the channels: BN and ReLU come before each conv.
PreActBlock(16, 32, stride=2)


# %% Wide ResNet (Zagoruyko and Komodakis 2016): fewer, wider pre-activation units
def wide_resnet(depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0) -> PreActResNet:
    """WRN-d-k: pre-activation basic units k times wider (16k, 32k, 64k channels), n = (d - 4) / 6 per stage. All
    three stages open with a 1x1 projection, and d counts the stem, the 6n convolutions and those three: 6n + 4."""
    helpers.require((depth - 4) % 6 == 0 and depth > 4, f"a Wide ResNet has depth 6n+4, e.g. 16, 28, 40 (got {depth})")
    helpers.require(widen_factor >= 1, f"the widening factor k must be at least 1 (got {widen_factor})")
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return PreActResNet(PreActBlock, (depth - 4) // 6, widths, num_classes, dropout)


def wide_resnet50_2(num_classes: int = 1000) -> nn.Module:
    """ImageNet WRN-50-2: ResNet-50 with the bottleneck's inner width doubled; output widths unchanged."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width_per_group=128)


# Parameters of two wide CIFAR networks (Zagoruyko and Komodakis 2016, Tables 4-5: 11.0M and 36.5M).
{f"WRN-{d}-{k}": f"{helpers.count_parameters(on_meta(wide_resnet, d, k)):,}" for d, k in ((16, 8), (28, 10))}


# %% ResNeXt (Xie et al. 2017): a bottleneck whose 3x3 convolution is split into C groups
# The ResNeXt block is lesson 02's Bottleneck with its 3x3 convolution split into C = `groups` groups of d channels
# (Xie et al. 2017, Fig. 3c). It computes y = relu(x + sum_{i=1}^{C} T_i(x)) (Eq. 3): each group is one narrow path
# T_i (1x1 reduce to d, 3x3, 1x1 expand), and the last 1x1 convolution sums the C paths, since a 1x1 convolution
# over concatenated groups is the sum of 1x1 convolutions over each (`aggregated_paths` checks this numerically).
def resnext50_32x4d(num_classes: int = 1000) -> nn.Module:
    """ResNeXt-50 (32x4d): ResNet-50 with 32 groups of 4 channels per 64 of width in each bottleneck."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, groups=32, width_per_group=4)


def aggregated_paths(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """The block's branch computed as C separate narrow paths T_i and summed (Fig. 3a, Eq. 2), with the
    grouped block's own weights: path i owns channels [i d, (i+1) d) of conv1, bn1, conv2 and bn2, and
    the matching input channels of conv3. Call with the block in eval mode (BN as a fixed affine map)."""
    cardinality = block.conv2.groups
    d = block.conv2.out_channels // cardinality
    total = 0
    for i in range(cardinality):
        part = slice(i * d, (i + 1) * d)

        def bn(norm: nn.BatchNorm2d, h: torch.Tensor, part=part) -> torch.Tensor:  # path i's channels of a BN
            statistics = norm.running_mean[part], norm.running_var[part], norm.weight[part], norm.bias[part]
            return F.batch_norm(h, *statistics, training=False, eps=norm.eps)

        h = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight[part])))  # (B, C_in, H, W) -> (B, d, H, W)
        h = F.conv2d(h, block.conv2.weight[part], stride=block.conv2.stride, padding=1)  # -> (B, d, H/s, W/s)
        h = F.relu(bn(block.bn2, h))
        total = total + F.conv2d(h, block.conv3.weight[:, part])  # T_i(x): (B, d, ..) -> (B, 4 width, ..)
    return block.bn3(total)  # F(x) = sum_i T_i(x)  (Eq. 2), then the block's last BN


class CifarResNeXt(nn.Module):
    """ResNeXt-29 for CIFAR (Xie et al. 2017, CIFAR experiments): a 64-channel 3x3 stem, three stages of three
    blocks with 256, 512 and 1024 output channels; the path width d doubles at every stage."""

    def __init__(self, cardinality: int = 8, base_width: int = 64, depth: int = 29, num_classes: int = 10):
        super().__init__()
        helpers.require((depth - 2) % 9 == 0 and depth > 2, f"a CIFAR ResNeXt has depth 9n+2, e.g. 29 (got {depth})")
        blocks_per_stage = (depth - 2) // 9
        make_block = functools.partial(Bottleneck, groups=cardinality, base_width=base_width)
        self.conv1, self.bn1 = conv(3, 64, 3), nn.BatchNorm2d(64)
        self.layer1 = make_stage(make_block, 64, 64, blocks_per_stage, stride=1)
        self.layer2 = make_stage(make_block, 256, 128, blocks_per_stage, stride=2)
        self.layer3 = make_stage(make_block, 512, 256, blocks_per_stage, stride=2)
        self.fc = nn.Linear(1024, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 64, 32, 32)
        x = self.layer1(x)  # -> (B, 256, 32, 32)
        x = self.layer2(x)  # -> (B, 512, 16, 16)
        x = self.layer3(x)  # -> (B, 1024, 8, 8)
        return self.fc(x.mean(dim=(2, 3)))  # (B, 1024) -> (B, num_classes)


# ResNeXt-50's block: the 3x3 convolution has groups=32, 32 paths of width 4.
Bottleneck(256, 64, groups=32, base_width=4)


# %% DenseNet (Huang et al. 2017): concatenate instead of add
class DenseLayer(nn.Module):
    """H_l of DenseNet-B: BN-ReLU-1x1 conv to bn_size*k channels, BN-ReLU-3x3 conv to k new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(in_channels), conv(in_channels, bn_size * growth_rate, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(bn_size * growth_rate), conv(bn_size * growth_rate, growth_rate, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, dim=1)  # [x_0, x_1, ..., x_{l-1}]: (B, C_0 + (l-1) k, H, W)
        x = self.conv1(F.relu(self.norm1(x)))  # -> (B, bn_size k, H, W): the bottleneck caps the cost
        return self.conv2(F.relu(self.norm2(x)))  # x_l = H_l([x_0, ..., x_{l-1}])  (Huang et al. 2017, Eq. 2)


class DenseBlock(nn.ModuleDict):
    """`num_layers` DenseLayers; each reads every earlier output, so the block's width grows by k per layer."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))  # the input of layer l is never overwritten, only extended
        return torch.cat(features, dim=1)  # (B, C_0, H, W) -> (B, C_0 + L k, H, W)


def transition(in_channels: int, out_channels: int) -> nn.Sequential:  # (B, C, H, W) -> (B, theta C, H/2, W/2)
    """BN-ReLU-1x1 conv to theta C channels (compression), then a 2x2 average pool, with torchvision's names."""
    layers = {"norm": nn.BatchNorm2d(in_channels), "relu": nn.ReLU(), "conv": conv(in_channels, out_channels, 1)}
    return nn.Sequential(OrderedDict(**layers, pool=nn.AvgPool2d(2)))


class DenseNet(nn.Module):
    """DenseNet-BC with torchvision's module names, so that its state_dicts load. `cifar=True`: the paper's CIFAR
    stem, one 3x3 convolution to 2k channels, instead of the 7x7/2 conv and max pool."""

    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 compression=0.5, num_classes=1000, cifar=False):  # fmt: skip
        super().__init__()
        stem = [("conv0", conv(3, num_init_features, 3))]
        if not cifar:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]  # fmt: skip
        self.features = nn.Sequential(OrderedDict(stem))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate, bn_size))
            channels += num_layers * growth_rate
            if i < len(block_config) - 1:
                compressed = int(math.floor(channels * compression))
                self.features.add_module(f"transition{i + 1}", transition(channels, compressed))
                channels = compressed
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))  # (B, 3, H, W) -> (B, C, H/32, W/32) (ImageNet) or (B, C, H/4, W/4) (CIFAR)
        return self.classifier(x.mean(dim=(2, 3)))  # (B, C) -> (B, num_classes)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121 (k = 32, blocks of 6, 12, 24, 16 layers, theta = 0.5), as torchvision builds it."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10) -> DenseNet:
    """CIFAR DenseNet-BC: three dense blocks of (depth - 4) / 6 bottleneck layers, 2k stem channels, theta 0.5."""
    helpers.require((depth - 4) % 6 == 0 and depth > 4, f"a CIFAR DenseNet-BC has depth 6n+4 (got {depth})")
    n = (depth - 4) // 6
    return DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes, cifar=True)


# One DenseNet-BC layer: BN-ReLU-1x1 to 4k channels, BN-ReLU-3x3 to k = 12 new channels, concatenated.
DenseLayer(64, 12)


# %% Squeeze-and-Excitation (Hu et al. 2018): rescale the branch's channels by a gate computed from itself
class SqueezeExcitation(nn.Module):
    """Squeeze (global average pool), excite (an MLP with C / r hidden units and a sigmoid), scale each channel."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def scales(self, u: torch.Tensor) -> torch.Tensor:
        z = u.mean(dim=(2, 3))  # z_c = mean over H, W of u_c  (Hu et al. 2018, Eq. 2): (B, C, H, W) -> (B, C)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))  # s = sigmoid(W2 relu(W1 z))  (Eq. 3): (B, C)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.scales(u)[:, :, None, None]  # x~_c = s_c u_c  (Eq. 4): (B, C, H, W)


class SEBottleneck(Bottleneck):
    """Lesson 02's bottleneck with SE at the end of the branch: y = relu(x + SE(F(x))) (Hu et al. 2018, Fig. 3)."""

    reduction = 16  # r: the excitation MLP's hidden layer has C / r units

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, width, stride, make_shortcut)
        self.se = SqueezeExcitation(width * self.expansion, self.reduction)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().branch(x))  # F(x) -> s * F(x): (B, 4 width, H/s, W/s), same shape


class SEBasicBlock(BasicBlock):
    """Lesson 02's basic block with the SE module on its branch, for the CIFAR SE-ResNets."""

    reduction = 16

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=ShortcutA):
        super().__init__(in_channels, width, stride, make_shortcut)
        self.se = SqueezeExcitation(width, self.reduction)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().branch(x))  # (B, width, H/s, W/s), channels rescaled


class SECifarResNet(CifarResNet):
    """Lesson 02's CIFAR ResNet (option A shortcuts) with SE basic blocks in its three stages."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__(depth, num_classes)  # then its stages are replaced (kept so for the seeds' numbers)
        n = (depth - 2) // 6
        self.layer1 = make_stage(SEBasicBlock, 16, 16, n, stride=1)
        self.layer2 = make_stage(SEBasicBlock, 16, 32, n, stride=2)
        self.layer3 = make_stage(SEBasicBlock, 32, 64, n, stride=2)
        init_like_torchvision(self)


def se_resnet50(num_classes: int = 1000) -> nn.Module:
    """SE-ResNet-50 with reduction 16: lesson 02's ResNet-50 built from SEBottleneck."""
    return ResNet(SEBottleneck, [3, 4, 6, 3], num_classes=num_classes)


# The gate of a 256-channel block: squeeze to 256/16 = 16 units, excite back to 256 gates.
SqueezeExcitation(256)


# %% Every variant by name, with what its paper reports
_cifar = functools.partial  # a CIFAR builder with its arguments fixed: builder(num_classes)
CIFAR_VARIANTS = {  # name -> builder(num_classes): the CIFAR networks of the papers, 32x32 inputs
    "resnet20": CIFAR_MODELS["resnet20"], "resnet110": CIFAR_MODELS["resnet110"],
    "preact_resnet164": _cifar(preact_resnet, 164), "wrn_16_8": _cifar(wide_resnet, 16, 8),
    "wrn_40_4": _cifar(wide_resnet, 40, 4), "wrn_28_10": _cifar(wide_resnet, 28, 10),
    "resnext29_8x64d": lambda num_classes=10: CifarResNeXt(8, 64, 29, num_classes),
    "densenet_bc_100_12": _cifar(densenet_bc, 100, 12),
}  # fmt: skip
IMAGENET_VARIANTS = {  # name -> builder(num_classes): 224x224 inputs
    "resnet50": resnet50, "wide_resnet50_2": wide_resnet50_2, "resnext50_32x4d": resnext50_32x4d,
    "densenet121": densenet121, "se_resnet50": se_resnet50,
}  # fmt: skip
SMALL_CIFAR_VARIANTS = {  # the equal-budget comparison: small members of each family
    "resnet20": CIFAR_MODELS["resnet20"], "preact_resnet20": _cifar(preact_resnet, 20),
    "se_resnet20": _cifar(SECifarResNet, 20), "wrn_16_2": _cifar(wide_resnet, 16, 2),
    "densenet_bc_40_12": _cifar(densenet_bc, 40, 12),
}  # fmt: skip
# Parameter counts the papers and torchvision give (CIFAR nets with 10 classes, ImageNet nets with 1000):
# He et al. 2016 Table 4 "1.7M"; Zagoruyko and Komodakis 2016 "11.0M" and "36.5M"; Xie et al. 2017 Table 7
# "34.4M"; Huang et al. 2017 Table 2 "0.8M"; torchvision; SE-ResNet-50 = ResNet-50's 25,557,032 + 2,530,992 in SE.
EXPECTED_PARAMETERS = {
    "preact_resnet164": 1_703_258, "wrn_16_8": 10_961_370, "wrn_40_4": 8_949_210, "wrn_28_10": 36_479_194,
    "resnext29_8x64d": 34_426_698, "densenet_bc_100_12": 769_162, "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904, "densenet121": 7_978_856, "se_resnet50": 28_088_024,
}  # fmt: skip
# Test error (%) each paper reports: CIFAR-10 with standard augmentation (crop + flip) for the CIFAR nets,
# ImageNet top-1 on single 224x224 centre crops for the ImageNet nets.
PAPER_ERRORS = {
    "resnet20": (8.75, "He et al. 2015, Table 6"), "resnet110": (6.43, "He et al. 2015, Table 6"),
    "preact_resnet164": (5.46, "He et al. 2016, Table 3"), "preact_resnet1001": (4.92, "He et al. 2016, Table 3"),
    "wrn_16_8": (4.27, "Zagoruyko & Komodakis 2016, CIFAR table"),
    "wrn_40_4": (4.53, "Zagoruyko & Komodakis 2016, CIFAR table"),
    "wrn_28_10": (4.00, "Zagoruyko & Komodakis 2016 (3.89 w/ dropout)"),
    "resnext29_8x64d": (3.65, "Xie et al. 2017, Table 7"), "densenet_bc_100_12": (4.51, "Huang et al. 2017, Table 2"),
    "resnet50": (23.9, "Xie et al. 2017, Table 3 (their ResNet-50)"),
    "wide_resnet50_2": (21.9, "Zagoruyko & Komodakis 2016, ImageNet table"),
    "resnext50_32x4d": (22.2, "Xie et al. 2017, Table 3"), "densenet121": (25.02, "Huang et al. 2017, Table 3"),
    "se_resnet50": (23.29, "Hu et al. 2018, Table 2"),
}  # fmt: skip


# What each paper reports (test error, %), next to which the lesson prints its own measurements.
helpers.format_table([{"model": m, "paper_err_%": e, "source": src} for m, (e, src) in PAPER_ERRORS.items()])


# %% Measuring: latency, peak memory
def peak_memory_bytes(step: Callable[[], None], model: nn.Module, optimizer, device: torch.device) -> int | None:
    """Peak bytes of live tensors in one training step (weights, gradients, optimizer state, saved activations,
    temporaries): CUDA's allocator high-water mark; on the CPU torch's MemTracker, which follows every tensor (process
    RSS would also count the Python heap); else None."""
    if device.type == "cuda":
        helpers.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        helpers.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        return None
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def measure(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, repeats: int) -> dict:
    """Median fp32 latency of a forward pass (eval, no gradients) and of a training step, and the step's peak memory."""
    model.to(device)
    x = torch.randn(input_shape, device=device)
    labels = torch.zeros(input_shape[0], dtype=torch.long, device=device)
    with torch.no_grad():
        forward_s = helpers.median_time(lambda: model.eval()(x), device, repeats)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model.train()(x), labels).backward()
        optimizer.step()

    train_s = helpers.median_time(train_step, device, repeats)  # its warm-up creates the momentum buffers
    peak = peak_memory_bytes(train_step, model, optimizer, device)
    return {"forward_ms": 1000 * forward_s, "train_step_ms": 1000 * train_s, "peak_mb": peak and peak / 1e6}


def variant_table(cfg, device: torch.device) -> list[dict]:
    """Every variant's parameters, multiply-adds at its native size and, with `measure_latency`, time and memory."""
    rows = []
    jobs = [(n, b, "CIFAR", 10, 32, cfg.cifar_timing_size) for n, b in CIFAR_VARIANTS.items()]
    jobs += [(n, b, "ImageNet", 1000, 224, cfg.imagenet_timing_size) for n, b in IMAGENET_VARIANTS.items()]
    for name, build, family, num_classes, native, timed in helpers.Progress(jobs, "timing variants"):
        torch.manual_seed(cfg.seed)
        model = build(num_classes=num_classes)
        parameters, timing = helpers.count_parameters(model), dict.fromkeys(("forward_ms", "train_step_ms", "peak_mb"))
        if cfg.measure_latency:
            timing = measure(model, (cfg.timing_batch, 3, timed, timed), device, cfg.timing_repeats)
        state_mb = 3 * parameters * 4 / 1e6  # fp32 weights, their gradients and SGD's momentum buffers, in MB
        timing["activation_mb"] = timing["peak_mb"] and timing["peak_mb"] - state_mb  # what the images cost
        macs = helpers.count_multiply_adds(model.to("meta"), (1, 3, native, native), device="meta")  # shapes only
        rows.append({"model": name, "data": family, "params_M": parameters / 1e6, "parameters": parameters,
                     "expected": EXPECTED_PARAMETERS.get(name), "GMACs": macs / 1e9,
                     "timed_at": f"{cfg.timing_batch}x{timed}x{timed}", **timing,
                     "paper_err_%": PAPER_ERRORS[name][0], "source": PAPER_ERRORS[name][1]})  # fmt: skip
    deep = on_meta(preact_resnet, 1001)  # its cost, without building the deep network for real a second time
    error, source = PAPER_ERRORS["preact_resnet1001"]
    rows.insert(3, {"model": "preact_resnet1001", "data": "CIFAR", "params_M": helpers.count_parameters(deep) / 1e6,
                    "parameters": helpers.count_parameters(deep), "expected": None, "timed_at": "see above",
                    "GMACs": helpers.count_multiply_adds(deep, (1, 3, 32, 32), device="meta") / 1e9,
                    "paper_err_%": error, "source": source})  # fmt: skip
    return rows


# main times every variant (importing the lesson times nothing); here, the multiply-adds of one 32x32 image through
# the smallest CIFAR ResNet, the kind of work one timed row does.
f"resnet8: {helpers.count_multiply_adds(cifar_resnet(8), (1, 3, 32, 32)) / 1e6:.1f} M multiply-adds per image"


# %% A 1001-layer pre-activation ResNet at initialisation
def deep_gradient_check(depth: int, batch: int, seed: int, device: torch.device) -> dict:
    """One forward and backward pass of a `depth`-layer pre-activation ResNet on random images: the RMS of every unit's
    input x_l and of dE/dx_l. He et al. 2016, Eq. 5: dE/dx_l = dE/dx_L (1 + d/dx_l sum_{i=l}^{L-1} F(x_i)); the 1 (the
    identity path) makes the gradient unlikely to be cancelled out (the paper's argument). Across a stage's
    projection shortcut the argument does not reach; this run measures what happens."""
    torch.manual_seed(seed)
    model = preact_resnet(depth).to(device).train()
    units, unit_inputs = [m for m in model.modules() if isinstance(m, PreActBlock)], []

    def keep_input(module, args):
        args[0].retain_grad()  # keep dE/dx_l of this non-leaf tensor after backward
        unit_inputs.append(args[0])

    handles = [unit.register_forward_pre_hook(keep_input) for unit in units]
    images, labels = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    for handle in handles:
        handle.remove()
    grads = [x.grad.norm().item() / math.sqrt(x[0].numel()) for x in unit_inputs]  # RMS per image
    signals = [x.detach().pow(2).mean().sqrt().item() for x in unit_inputs]
    weight_grads = [m.weight.grad.norm().item() for _, m in helpers.weighted_layers(model)]
    n = len(units) // 3
    ends = (0, n - 1, n, 2 * n - 1, 2 * n, len(units) - 1)  # the first and last unit of each stage
    stage_ends = [{"unit": i + 1, "grad_rms": grads[i], "signal_rms": signals[i]} for i in ends]
    return {"depth": depth, "units": len(units), "weighted_layers": len(weight_grads), "batch": batch,
            "parameters": helpers.count_parameters(model), "loss": loss.item(),
            "all_finite": all(math.isfinite(g) for g in grads + weight_grads), "grad_rms_first_unit": grads[0],
            "grad_rms_last_unit": grads[-1], "grad_rms_min": min(grads), "grad_rms_max": max(grads),
            "grad_ratio_first_to_last": grads[0] / grads[-1], "stage_ends": stage_ends,
            "weight_grad_norm_min": min(weight_grads), "weight_grad_norm_max": max(weight_grads),
            "grad_rms_per_unit": grads, "signal_rms_per_unit": signals}  # fmt: skip


# The network the run checks at initialisation, built on the meta device (shapes only): its parameter count.
f"preact_resnet({DEEP_DEPTH}): {helpers.count_parameters(on_meta(preact_resnet, DEEP_DEPTH)):,} parameters"


# %% The equal-budget training comparison
def compare_training(cfg, data: helpers.ImageData, device: torch.device) -> dict:
    """Each small CIFAR variant trained on the same images in the same order, steps, batch size and schedule."""
    data, amp_dtype = data.to(device), helpers.autocast_dtype(device, cfg.precision)
    milestones = (cfg.train_steps // 2, cfg.train_steps * 3 // 4) if cfg.full else ()
    rows, curves = [], {}
    for name, build in SMALL_CIFAR_VARIANTS.items():
        generator = helpers.seed_everything(cfg.seed)  # same data order for every model
        model, start = build(num_classes=data.num_classes), time.perf_counter()
        history = sgd_train(model, data, steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr, device=device,
                            generator=generator, lr_milestones=milestones, warmup_steps=cfg.warmup_steps,
                            amp_dtype=amp_dtype, augment=cfg.augment, desc=name)  # fmt: skip
        train_s = time.perf_counter() - start
        # Re-estimate BN statistics with the final weights (lesson 03 explains why), in the run's autocast dtype
        order = torch.Generator().manual_seed(0)
        calibration = helpers.training_batches(data, cfg.bn_recalibration_batches, cfg.batch_size, device, order)
        helpers.recalibrate_batch_norm(model, calibration, amp_dtype)
        test = helpers.evaluate(model, data.test_x, data.test_y, data.mean, data.std, device, amp_dtype)
        tail = statistics.mean(h["loss"] for h in history[-max(1, cfg.train_steps // 5) :])
        rows.append({"model": name, "params_M": helpers.count_parameters(model) / 1e6, "steps": cfg.train_steps,
                     "images_seen": cfg.train_steps * cfg.batch_size, "train_s": train_s, "last_train_loss": tail,
                     "test_err_%": 100 * test["error"]})  # fmt: skip
        curves[name] = [h["loss"] for h in history]
    return {"dataset": data.name, "train_images": len(data.train_x), "test_images": len(data.test_x), "rows": rows,
            "curves": curves}  # fmt: skip


# The small members of each family that the equal-budget comparison trains.
list(SMALL_CIFAR_VARIANTS)


# %% Two checks of what the new blocks compute
def grouped_equals_paths(seed: int) -> dict:
    """A ResNeXt-29 8x64d stage-2 block (8 paths of width 128) computed both ways on the same weights."""
    torch.manual_seed(seed)
    block = Bottleneck(256, 128, stride=2, groups=8, base_width=64)
    for norm in (block.bn1, block.bn2, block.bn3):  # non-trivial BN statistics and affine parameters
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        grouped, paths = block.eval().branch(x), aggregated_paths(block, x)
    return {"cardinality": block.conv2.groups, "path_width": block.conv2.out_channels // block.conv2.groups,
            "output_shape": list(grouped.shape), "max_abs_difference": (grouped - paths).abs().max().item(),
            "output_rms": grouped.pow(2).mean().sqrt().item()}  # fmt: skip


def se_effect(seed: int) -> dict:
    """The SE gates of one SE-ResNet-50 stage-3 block at initialisation, and how much they change its output."""
    torch.manual_seed(seed)
    block = SEBottleneck(1024, 256).eval()
    x = torch.randn(2, 1024, 14, 14)
    with torch.no_grad():
        branch = Bottleneck.branch(block, x)  # F(x) without the SE module
        gates = block.se.scales(branch)  # (B, C)
        with_se, without_se = block(x), F.relu(branch + block.shortcut(x))
    return {"channels": gates.shape[1], "hidden_units": block.se.fc1.out_features, "gate_min": gates.min().item(),
            "gate_max": gates.max().item(), "gate_mean": gates.mean().item(),
            "output_relative_change": ((with_se - without_se).norm() / without_se.norm()).item()}  # fmt: skip


# The grouped 3x3 convolution and the sum of its C separate paths give the same output.
grouped_equals_paths(0)


# %% The run
def plot(results: dict, path) -> None:
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    for ax, family in zip(axes, ("CIFAR", "ImageNet")):  # one panel each: their errors lie 15 points apart
        rows = [r for r in results["variants"] if r["data"] == family]
        ax.scatter([r["GMACs"] for r in rows], [r["paper_err_%"] for r in rows], color=f"C{family == 'ImageNet':d}")
        for r in rows:  # each label placed by hand beside its point, clear of its close neighbours
            dx, dy = LABEL_OFFSETS.get(r["model"], (5, 3))
            ax.annotate(r["model"], (r["GMACs"], r["paper_err_%"]), xytext=(dx, dy), textcoords="offset points",
                        fontsize=8, ha="right" if dx < 0 else "left", va="top" if dy < 0 else "bottom")  # fmt: skip
        ax.set(xscale="log", xlabel="multiply-adds per image (G, log scale)", ylabel="paper's test error (%)")
        ax.set_title("CIFAR-10 test error (cited)" if family == "CIFAR" else "ImageNet top-1 error (cited)")
        ax.margins(x=0.2, y=0.12)
    window = max(1, results["config"]["train_steps"] // 10)
    for name, losses in results["training"]["curves"].items():
        axes[2].plot(range(1, len(losses) + 1), helpers.smooth(losses, window), label=name)
    axes[2].set(xlabel="SGD step", ylabel=f"training loss (moving average of {window})")
    axes[2].set_title(f"Equal budget on {results['training']['dataset']} (measured)")
    axes[2].legend(fontsize=8)
    helpers.save_figure(fig, path)


LABEL_OFFSETS = {  # points right and up of the marker; negative: left or below
    "preact_resnet164": (-5, 3), "densenet_bc_100_12": (5, -3), "wrn_40_4": (-5, 3), "wrn_16_8": (-5, -3),
    "wrn_28_10": (-5, 3), "resnext29_8x64d": (-5, -3), "resnet50": (-6, 2), "se_resnet50": (-6, -2),
    "resnext50_32x4d": (-6, -3), "wide_resnet50_2": (-6, 3)}  # fmt: skip


@helpers.constants_as_keywords
def main(**overrides):
    """The five variants of "What you will learn", then all of them measured and trained on the same footing;
    saves results.json and variants.png in `out`."""
    cfg = helpers.config(globals(), overrides, FULL_OVERRIDES)
    per_unit = 9 if cfg.deep_depth >= 164 else 6  # preact_resnet's rule: bottleneck units from depth 164 on
    rule = f"{per_unit}n+2 (bottleneck units from depth 164 on), e.g. 164 or 1001, not {cfg.deep_depth}"
    helpers.require(cfg.deep_depth > 2 and (cfg.deep_depth - 2) % per_unit == 0, f"--deep-depth must be {rule}")
    for flag, side in (("cifar", cfg.cifar_timing_size), ("imagenet", cfg.imagenet_timing_size)):  # a wide activation
        helpers.require_memory(4 * 16 * 256 * cfg.timing_batch * side**2, f"--timing-batch x --{flag}-timing-size")
    helpers.require_memory(4 * 256 * 32 * 32 * cfg.deep_batch * (cfg.deep_depth // 3), "--deep-depth x --deep-batch")
    started, device = time.perf_counter(), helpers.pick_device(cfg.device)
    out_dir = helpers.output_dir(cfg, "results.json", "variants.png")
    data = helpers.load_data(cfg, test_size=cfg.test_size)  # before the timing, so that a data problem stops it now
    print(f"device: {helpers.device_name(device)}\n")

    # Pre-activation: a 1001-layer network, forward and backward at initialisation; nothing vanishes (Eq. 5)
    deep = deep_gradient_check(cfg.deep_depth, cfg.deep_batch, cfg.seed, device)
    print(f"Pre-activation ResNet-{deep['depth']} ({deep['units']} residual units, {deep['weighted_layers']} weighted "
          f"layers, {deep['parameters'] / 1e6:.1f}M parameters), batch {deep['batch']}: "
          f"loss {deep['loss']:.2f}, all gradients finite: {deep['all_finite']}")  # fmt: skip
    title = "RMS of each unit's input x_l and of dE/dx_l, at the first and last unit of each stage"
    helpers.print_table(deep["stage_ends"], "unit:d signal_rms:.2f grad_rms:.2e", title)

    # ResNeXt: the grouped convolution is C parallel paths, summed (Eq. 3)
    paths = grouped_equals_paths(cfg.seed)
    print(f"ResNeXt block, grouped form vs {paths['cardinality']} separate paths of width {paths['path_width']}: "
          f"max |difference| = {paths['max_abs_difference']:.1e} (outputs of RMS {paths['output_rms']:.2f})")  # fmt: skip

    # Squeeze-and-excitation: gates in (0, 1) that rescale the branch (Eqs. 2-4)
    se = se_effect(cfg.seed)
    print(f"SE gates of a {se['channels']}-channel block (r = 16, {se['hidden_units']} hidden units) at initialisation: "
          f"{se['gate_min']:.3f} to {se['gate_max']:.3f}, mean {se['gate_mean']:.3f}; they change the block's output "
          f"by {100 * se['output_relative_change']:.0f}% (relative L2)\n")  # fmt: skip

    # Every variant on the same footing: parameters, multiply-adds, latency, memory
    variants = variant_table(cfg, device)
    title = (f"Residual variants on {helpers.device_name(device)}, fp32. MACs per image at the native size "
             f"(32x32 CIFAR, 224x224 ImageNet); median latency of {cfg.timing_repeats} runs and peak memory "
             f"at BxHxW = timed_at")  # fmt: skip
    columns = "model data params_M:.2f GMACs:.3f"
    if cfg.measure_latency:
        columns += " timed_at forward_ms:.1f train_step_ms:.1f peak_mb:.0f activation_mb:.0f"
    helpers.print_table(variants, columns + " paper_err_%:.2f source", title)
    compared = [r for r in variants if r["expected"] is not None]  # pinned: torchvision's, the papers' rounded figures
    mismatched = [r["model"] for r in compared if r["parameters"] != r["expected"]]
    print(f"parameter counts equal to the pinned ones: {mismatched or f'all {len(compared)}'}\n")

    # The small variants trained with the same budget of images, steps and schedule
    training = compare_training(cfg, data, device)
    title = (f"Equal budget on {training['dataset']}: {cfg.train_steps} steps of {cfg.batch_size} images each (test "
             f"error on {training['test_images']} test images, after BN recalibration)")  # fmt: skip
    columns = "model params_M:.3f steps:d images_seen:d train_s:.1f last_train_loss:.3f test_err_%:.1f"
    helpers.print_table(training["rows"], columns, title)

    results = {"deep_preact": deep, "grouped_conv_equivalence": paths, "squeeze_excitation": se, "variants": variants,
               "parameter_mismatches": mismatched, "training": training}  # fmt: skip
    plot({"config": dict(cfg), **results}, out_dir / "variants.png")
    helpers.save_results(out_dir, results, cfg, device, started)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'variants.png'} in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    helpers.run_cli(main, globals())
