"""Lesson 02: ResNet-18 to ResNet-152 and the CIFAR ResNets, verified against torchvision and the paper.

(Lesson card in progress: the models below are final; the measurements and prose follow.)
"""

# %%
from __future__ import annotations

import functools
import time
from pathlib import Path

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
IMAGE_SIZE = 224  # side of the ImageNet input in pixels, for multiply-adds and latency
MEASURE_LATENCY = True  # time forward passes (the slowest part of the run)
LATENCY_BATCH_SIZES = (1, 32)  # batch sizes for the latency columns
LATENCY_SECONDS = 0.3  # timing budget per model and batch size: repeat until spent, at least once
SHAPE_MODEL = "resnet50"  # model for the per-stage shape table (an ImageNet or CIFAR model name)
PRETRAINED = False  # load torchvision's ImageNet weights (network needed once) and classify a sample image
PRETRAINED_MODEL = "resnet50"  # which ImageNet ResNet --pretrained loads
IMAGE = ""  # image file for --pretrained (empty: matplotlib's sample photo grace_hopper.jpg)
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
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 224 -> 112
        self.bn1 = nn.BatchNorm2d(64)
        if small_input_stem:
            self.maxpool = nn.Identity()  # no pooling: 32x32 images have no resolution to spare
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # 112 -> 56
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


# %% Counting what the names promise
def layers_on_main_path(model: nn.Module) -> int:
    """Weighted layers (convolutions and the classifier) that a signal passes through in sequence: what
    "ResNet-50" counts. Projection shortcuts (`downsample`) run beside the branch and are not counted."""
    return sum(1 for name, _ in helpers.weighted_layers(model) if "downsample" not in name)


def blocks_per_stage(model: nn.Module) -> list[int]:
    return [len(stage) for name, stage in model.named_children() if name.startswith("layer")]


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, seconds: float) -> dict:
    """Median forward time in milliseconds (inference mode, eval, fp32). Repeats until `seconds` have been
    spent, at least once, after one warm-up pass; the warm-up is skipped when one pass would take longer
    than `seconds` (estimated from batch size 1), because on a CPU the first large pass costs about what
    the second does, while repeating it would blow the run's time budget."""
    model.eval()
    with torch.inference_mode():
        x1 = torch.randn((1, *input_shape[1:]), device=device)
        model(x1)  # first pass: allocations, kernel selection, weight layout
        helpers.synchronize(device)
        begin = time.perf_counter()
        model(x1)
        helpers.synchronize(device)
        estimate = (time.perf_counter() - begin) * input_shape[0]
        x = torch.randn(input_shape, device=device)
        if input_shape[0] > 1 and estimate < seconds:
            model(x)
        times = []
        while not times or sum(times) < seconds:
            helpers.synchronize(device)
            begin = time.perf_counter()
            model(x)
            helpers.synchronize(device)
            times.append(time.perf_counter() - begin)
    return {"ms": 1000 * sorted(times)[len(times) // 2], "repeats": len(times)}


def stage_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """Output shape, parameters and multiply-adds of each top-level child, from one forward pass with hooks."""
    shapes = {}
    hooks = [
        child.register_forward_hook(
            lambda _m, inputs, out, name=name: shapes.update({name: (inputs[0].shape, out.shape)})
        )
        for name, child in model.named_children()
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_shape))
    for hook in hooks:
        hook.remove()
    rows = []
    for name, child in model.named_children():
        if name not in shapes:  # not called in forward (none in these models)
            continue
        in_shape, out_shape = shapes[name]
        macs = helpers.count_multiply_adds(child, tuple(in_shape))
        rows.append(
            {
                "module": name,
                "blocks": len(child) if isinstance(child, nn.Sequential) else None,
                "output shape": "x".join(str(d) for d in out_shape),
                "params": helpers.count_parameters(child),
                "MMACs": macs / 1e6,
            }
        )
    return rows


def fraction_of_taps_on_data(height: int, width: int) -> float:
    """Share of a padded 3x3 convolution's (output pixel, tap) pairs that read real input rather than the
    zero padding, on an H x W map. 1x1 maps: only the centre tap, 1/9."""
    ones = torch.ones(1, 1, height, width)
    return (F.conv2d(ones, torch.ones(1, 1, 3, 3), padding=1).mean() / 9).item()


# %% Loading torchvision's ImageNet weights (optional, needs the network once)
def classify_with_pretrained(model_name: str, image_path: str) -> dict:
    """Load torchvision's ImageNet weights for `model_name` into the lesson's model (strict) and classify
    one image. Without network access (and no cached file), print one notice and return."""
    import contextlib
    import io
    import urllib.error

    import torchvision

    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub prints "Downloading: ..." before failing
            state = weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        reason = str(getattr(error, "reason", error)).splitlines()[0][:100]
        print(
            f"NOTICE: --pretrained skipped: torchvision's {model_name} {weights.name} weights are not cached and could "
            f"not be downloaded ({reason}); the rest of the lesson ran without them.",
            flush=True,
        )
        return {"loaded": False, "weights": f"{model_name}.{weights.name}", "reason": reason}
    model = IMAGENET_MODELS[model_name]()
    model.load_state_dict(state, strict=True)  # every name and shape matches, or this raises
    reference = torchvision.models.get_model(model_name)
    reference.load_state_dict(state)
    image = torchvision.io.read_image(image_path, mode=torchvision.io.ImageReadMode.RGB)  # (3, H, W) uint8
    batch = weights.transforms()(image).unsqueeze(0)  # resize, centre-crop 224, normalise: (1, 3, 224, 224)
    model.eval(), reference.eval()
    with torch.no_grad():
        probs = model(batch).softmax(1)[0]
        reference_probs = reference(batch).softmax(1)[0]
    top = probs.topk(5)
    rows = [
        {"rank": i + 1, "class": weights.meta["categories"][k], "probability": p}
        for i, (p, k) in enumerate(zip(top.values.tolist(), top.indices.tolist()))
    ]
    helpers.print_table(rows, [("rank", "d"), ("class", ""), ("probability", ".3f")], f"{model_name} on {image_path}")
    difference = (probs - reference_probs).abs().max().item()
    print(f"largest probability difference to torchvision's own {model_name}: {difference:.2e}\n")
    return {
        "loaded": True,
        "weights": f"{model_name}.{weights.name}",
        "image": image_path,
        "top5": rows,
        "max_prob_difference_vs_torchvision": difference,
    }


def default_sample_image() -> str | None:
    """matplotlib ships a photo of Grace Hopper (600x512 JPEG) in its sample data; torchvision ships none."""
    try:
        import matplotlib.cbook

        return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (OSError, ValueError):
        return None


# %% The run
def main(**overrides):
    cfg = helpers.config(globals(), overrides)
    started = time.perf_counter()
    helpers.require(cfg.image_size >= 32, "--image-size must be at least 32 pixels (ResNets downsample by 32)")
    helpers.require(cfg.latency_seconds >= 0, "--latency-seconds must be zero or positive")
    helpers.require(all(b > 0 for b in cfg.latency_batch_sizes), "--latency-batch-sizes must be positive")
    helpers.require(
        cfg.shape_model in IMAGENET_MODELS or cfg.shape_model in CIFAR_MODELS,
        f"unknown --shape-model {cfg.shape_model!r} (use one of {', '.join(sorted({*IMAGENET_MODELS, *CIFAR_MODELS}))})",
    )
    helpers.require(
        cfg.pretrained_model in IMAGENET_MODELS, f"--pretrained-model must be one of {', '.join(IMAGENET_MODELS)}"
    )
    device = helpers.pick_device(cfg.device)
    out_dir = helpers.output_dir(cfg)
    helpers.seed_everything(cfg.seed)
    results = {}
    latency_columns = [(f"ms@{b}", ".1f") for b in cfg.latency_batch_sizes] if cfg.measure_latency else []

    # ImageNet models: blocks, layers, parameters, multiply-adds against torchvision's published figures.
    import torchvision

    imagenet_rows = []
    for name, build in IMAGENET_MODELS.items():
        model = build()
        published = torchvision.models.get_model_weights(name).DEFAULT.meta  # "_ops" is GMACs at 224x224
        macs = helpers.count_multiply_adds(model, (1, 3, cfg.image_size, cfg.image_size))
        row = {
            "model": name,
            "blocks/stage": "/".join(map(str, blocks_per_stage(model))),
            "layers": layers_on_main_path(model),
            "params": helpers.count_parameters(model),
            "GMACs": macs / 1e9,
            "published": published["_ops"] if cfg.image_size == 224 else None,
        }
        row["off %"] = None if row["published"] is None else 100 * (row["GMACs"] / row["published"] - 1)
        if cfg.measure_latency:
            model.to(device)
            for batch in cfg.latency_batch_sizes:
                timing = measure_latency(model, (batch, 3, cfg.image_size, cfg.image_size), device, cfg.latency_seconds)
                row[f"ms@{batch}"], row[f"repeats@{batch}"] = timing["ms"], timing["repeats"]
        imagenet_rows.append(row)
        print(f"  measured {name}", flush=True)
    helpers.print_table(
        imagenet_rows,
        [
            ("model", ""),
            ("blocks/stage", ""),
            ("layers", "d"),
            ("params", ",d"),
            ("GMACs", ".3f"),
            ("published", ".3f"),
            ("off %", "+.2f"),
            *latency_columns,
        ],
        f"ImageNet ResNets at {cfg.image_size}x{cfg.image_size} (published = torchvision's weights metadata; "
        f"ms@B = forward latency at batch B on {helpers.device_name(device)})",
    )
    results["imagenet_models"] = imagenet_rows

    # CIFAR models: 6n+2 layers, option A (no parameters in any shortcut) against option B (projections).
    cifar_rows = []
    cifar_builders = {f"resnet{d}": functools.partial(cifar_resnet, d) for d in CIFAR_DEPTHS}
    cifar_builders["resnet18"] = cifar_resnet18
    for name, build in cifar_builders.items():
        model = build(10)
        row = {
            "model": name if name != "resnet18" else "resnet18 (CIFAR stem)",
            "blocks/stage": "/".join(map(str, blocks_per_stage(model))),
            "layers": layers_on_main_path(model),
            "params": helpers.count_parameters(model),
            "params (B)": helpers.count_parameters(cifar_resnet(model.depth, shortcut="B"))
            if name != "resnet18"
            else None,
            "MMACs": helpers.count_multiply_adds(model, (1, 3, 32, 32)) / 1e6,
        }
        if cfg.measure_latency and name != "resnet1202":  # 1202 at batch 32 alone would take seconds on a CPU
            model.to(device)
            for batch in cfg.latency_batch_sizes:
                timing = measure_latency(model, (batch, 3, 32, 32), device, cfg.latency_seconds)
                row[f"ms@{batch}"], row[f"repeats@{batch}"] = timing["ms"], timing["repeats"]
        cifar_rows.append(row)
    helpers.print_table(
        cifar_rows,
        [
            ("model", ""),
            ("blocks/stage", ""),
            ("layers", "d"),
            ("params", ",d"),
            ("params (B)", ",d"),
            ("MMACs", ".1f"),
            *latency_columns,
        ],
        "CIFAR ResNets at 32x32, 10 classes (params = option A shortcuts, params (B) = projection shortcuts; "
        "ResNet-1202 not timed)",
    )
    results["cifar_models"] = cifar_rows

    # Where the bottleneck subsamples: the 1x1 (paper, "v1") or the 3x3 (torchvision, "v1.5").
    paper_table1 = {"resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}  # He et al. 2015, Table 1, "FLOPs" (x10^9)
    stride_rows = []
    for name, paper in paper_table1.items():
        v1 = helpers.count_multiply_adds(IMAGENET_MODELS[name](bottleneck_stride="1x1"), (1, 3, 224, 224)) / 1e9
        v15 = (
            next(r["GMACs"] for r in imagenet_rows if r["model"] == name)
            if cfg.image_size == 224
            else (helpers.count_multiply_adds(IMAGENET_MODELS[name](), (1, 3, 224, 224)) / 1e9)
        )
        stride_rows.append({"model": name, "v1 GMACs": v1, "v1.5 GMACs": v15, "extra GMACs": v15 - v1, "paper": paper})
    # The only difference: the first 1x1 of each stage's first block (stages 2-4) runs at the input's
    # resolution in v1.5, at a quarter of it in v1. Per stage: C_in * w * H * W * (1 - 1/4) multiply-adds.
    predicted_extra = sum(
        cin * width * side * side * 3 / 4 for cin, width, side in ((256, 128, 56), (512, 256, 28), (1024, 512, 14))
    )
    helpers.print_table(
        stride_rows,
        [("model", ""), ("v1 GMACs", ".3f"), ("v1.5 GMACs", ".3f"), ("extra GMACs", ".3f"), ("paper", ".1f")],
        f"Bottleneck stride on the first 1x1 (v1, the paper) or the 3x3 (v1.5, torchvision), 224x224; "
        f"predicted extra: {predicted_extra / 1e9:.3f} GMACs",
    )
    results["stride_placement"] = {"rows": stride_rows, "predicted_extra_gmacs": predicted_extra / 1e9}

    # Per-stage shapes of one model.
    side = 32 if cfg.shape_model in CIFAR_MODELS and cfg.shape_model not in IMAGENET_MODELS else cfg.image_size
    shape_model = (IMAGENET_MODELS.get(cfg.shape_model) or CIFAR_MODELS[cfg.shape_model])()
    shape_rows = stage_shapes(shape_model, (1, 3, side, side))
    helpers.print_table(
        shape_rows,
        [("module", ""), ("blocks", "d"), ("output shape", ""), ("params", ",d"), ("MMACs", ".1f")],
        f"{cfg.shape_model}, one {side}x{side} image, stage by stage (B x C x H x W)",
    )
    results["stage_shapes"] = {"model": cfg.shape_model, "input": side, "rows": shape_rows}

    # BasicBlock vs Bottleneck: the same 3x3 width (He et al. 2015, Fig. 5) and the same output width.
    side = 56
    blocks = {
        "basic, 64 -> 64 (3x3 width 64)": BasicBlock(64, 64),
        "bottleneck, 256 -> 256 (3x3 width 64)": Bottleneck(256, 64),
        "basic, 256 -> 256 (3x3 width 256)": BasicBlock(256, 256),
    }
    block_rows = []
    for label, block in blocks.items():
        channels = block.conv1.in_channels
        block_rows.append(
            {
                "block": label,
                "layers": len(helpers.weighted_layers(block)),
                "params": helpers.count_parameters(block),
                "MMACs": helpers.count_multiply_adds(block, (1, channels, side, side)) / 1e6,
            }
        )
    helpers.print_table(
        block_rows,
        [("block", ""), ("layers", "d"), ("params", ",d"), ("MMACs", ".1f")],
        f"One block on a {side}x{side} map",
    )
    results["block_comparison"] = block_rows

    # zero_init_residual: with gamma = 0 in each branch's last BN, every block without a projection is
    # exactly the identity at initialisation (its input is a ReLU output, so relu(0 + x) = x).
    identity_rows = []
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(cfg.seed))
    for zero_init in (False, True):
        torch.manual_seed(cfg.seed)
        model = resnet50(zero_init_residual=zero_init).train()  # batch statistics, as in the first steps
        changes = []
        hooks = [
            block.register_forward_hook(
                lambda _block, inputs, out, changes=changes: changes.append(
                    ((out - inputs[0]).norm() / inputs[0].norm()).item()
                )
            )
            for block in model.modules()
            if isinstance(block, Bottleneck) and block.downsample is None
        ]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        identity_rows.append(
            {
                "zero_init_residual": str(zero_init),
                "identity-shaped blocks": len(changes),
                "exact identities": sum(c == 0 for c in changes),
                "mean |y-x|/|x|": sum(changes) / len(changes),
            }
        )
    helpers.print_table(
        identity_rows,
        [
            ("zero_init_residual", ""),
            ("identity-shaped blocks", "d"),
            ("exact identities", "d"),
            ("mean |y-x|/|x|", ".3f"),
        ],
        "ResNet-50 at initialisation: how far each block without a projection moves its input (train mode, 64x64)",
    )
    results["zero_init_residual"] = identity_rows

    # The ImageNet stem on 32x32 images: the map is 8x8 before the first block and 1x1 in the last stage.
    stem_rows = []
    for label, model in (
        ("ImageNet stem (7x7/2 + max-pool)", resnet18(num_classes=10)),
        ("CIFAR stem (3x3/1)", cifar_resnet18()),
    ):
        rows = {r["module"]: r for r in stage_shapes(model, (1, 3, 32, 32))}
        last_side = int(rows["layer4"]["output shape"].split("x")[-1])
        stem_rows.append(
            {
                "stem": label,
                "layer1 map": rows["layer1"]["output shape"].split("x", 2)[-1],
                "layer4 map": rows["layer4"]["output shape"].split("x", 2)[-1],
                "layer4 taps on data": fraction_of_taps_on_data(last_side, last_side),
                "params": helpers.count_parameters(model),
                "MMACs": helpers.count_multiply_adds(model, (1, 3, 32, 32)) / 1e6,
            }
        )
    helpers.print_table(
        stem_rows,
        [
            ("stem", ""),
            ("layer1 map", ""),
            ("layer4 map", ""),
            ("layer4 taps on data", ".3f"),
            ("params", ",d"),
            ("MMACs", ".1f"),
        ],
        "ResNet-18 on one 32x32 image, 10 classes ('taps on data': share of layer4's 3x3 taps that read pixels, not padding)",
    )
    results["stem_on_32x32"] = stem_rows

    if cfg.pretrained:
        image = cfg.image or default_sample_image()
        helpers.require(image is not None, "no sample image found in matplotlib's sample data (pass --image PATH)")
        helpers.require(Path(image).is_file(), f"--image {image} does not exist (pass the path of a JPEG or PNG file)")
        results["pretrained"] = classify_with_pretrained(cfg.pretrained_model, image)

    figure = plot_models(imagenet_rows, stride_rows, out_dir / "resnet_family.png")
    print(f"figure: {figure}")
    path = helpers.save_results(out_dir, results, cfg, device, started)
    print(f"results: {path}  ({time.perf_counter() - started:.1f} s)")
    return results


def plot_models(imagenet_rows: list[dict], stride_rows: list[dict], path: Path) -> Path:
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    names = [r["model"].replace("resnet", "ResNet-") for r in imagenet_rows]
    timed = [k for k in imagenet_rows[0] if k.startswith("ms@")]
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(14 if timed else 9.5, 3.8))
    axes[0].bar(names, [r["params"] / 1e6 for r in imagenet_rows], color="tab:blue")
    axes[0].set_ylabel("parameters (millions)")
    axes[0].set_title("Parameters")
    v1 = {r["model"]: r["v1 GMACs"] for r in stride_rows}
    positions = range(len(names))
    axes[1].bar(
        [p - 0.2 for p in positions], [r["GMACs"] for r in imagenet_rows], width=0.4, label="v1.5 (stride on 3x3)"
    )
    axes[1].bar(
        [p + 0.2 for p, r in zip(positions, imagenet_rows) if r["model"] in v1],
        [v1[r["model"]] for r in imagenet_rows if r["model"] in v1],
        width=0.4,
        label="v1 (stride on first 1x1)",
    )
    axes[1].set_xticks(list(positions), names)
    axes[1].set_ylabel("multiply-adds per image (G)")
    axes[1].set_title("Compute at 224x224")
    axes[1].legend(fontsize=8)
    if timed:
        for key in timed:
            axes[2].plot(
                [r["GMACs"] for r in imagenet_rows], [r[key] for r in imagenet_rows], "o-", label=f"batch {key[3:]}"
            )
        for r, name in zip(imagenet_rows, names):
            axes[2].annotate(name, (r["GMACs"], r[timed[-1]]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        axes[2].set_xlabel("multiply-adds per image (G)")
        axes[2].set_ylabel("forward time (ms)")
        axes[2].set_yscale("log")
        axes[2].set_title("Measured forward latency")
        axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return helpers.save_figure(fig, path)


if __name__ == "__main__":
    helpers.run_cli(main, globals())
