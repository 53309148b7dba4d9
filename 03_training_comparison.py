"""Lesson 03: plain vs residual networks trained under identical conditions; the degradation problem measured.

What you will learn
    1. The degradation problem: a deeper plain network ends with a HIGHER TRAINING error than a shallower one (so
       it is not overfitting), while the same layers with identity shortcuts, trained the same way, do not (He et
       al. 2015, Fig. 1 and 6). The residual pair is the control: a plain gap alone could mean "deeper starts slower".
    2. How to compare architectures fairly: the same initialisation and seed, mini-batches, order, optimiser,
       schedule (warm-up included), precision and memory layout for every model.
    3. Why, with batch norm, the trouble is optimisation and not vanishing gradients: every weighted layer's
       gradient is measured at initialisation and during training.
    4. A pitfall: after a short run at a high learning rate, batch norm's running statistics lag the weights, and
       eval-mode error is wrong until they are re-estimated.

Paper
    He et al. 2015, section 4.2 (CIFAR-10): 6n+2 weighted layers, option-A shortcuts (no extra parameters),
    y = F(x, {W_i}) + x (Eq. 1) for the residual nets and y = F(x, {W_i}) for the plain ones; SGD, momentum 0.9,
    weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k of 64k iterations. Section 4.1: "We argue
    that this optimization difficulty is unlikely to be caused by vanishing gradients."
    The one departure: 70 iterations instead of 64,000, and every net (plain and residual alike) warms up
    linearly over 30 iterations to lr 0.05. At lr 0.1 from step one the deep RESIDUAL net spends the whole short
    run recovering from its first steps, and the run could not tell degradation from "deeper starts slower"
    (measured; the README's "Results measured here" gives the numbers).

Run
    python 03_training_comparison.py                  # 4 nets x 70 iterations of 128 images
    python 03_training_comparison.py --depths 20 32 44 56
    python 03_training_comparison.py --full           # the paper's schedule on CIFAR-10 (a GPU: hours)
    Runtime on 2 quiet CPU cores: 183-235 s in fp32 (an AMD EPYC with AVX2 and no bf16, where auto means fp32).
    With bf16 (AVX512-BF16) not yet measured at 70 iterations; the earlier 100-iteration default took 158 s there.
    Without CIFAR-10 a quick run falls back loudly to Fashion-MNIST (or the synthetic set).

What you should see (seed 0, Fashion-MNIST fallback, fp32; the slow test in tests/test_03_training_comparison.py)
    model       train err   held-out err (stale BN -> re-estimated)   grad first/last conv at init
    plain-20      34.4%       44.8% -> 32.4%                             12
    plain-56      74.8%       88.0% -> 72.1%                             1,910
    resnet-20     28.7%       33.9% -> 28.0%                             2.4
    resnet-56     29.3%       42.6% -> 26.7%                             7.2
    * The verdict, against its control and a noise band the run estimates from its own curves: plain gap +40.3
      points, residual gap +0.6, band +-5.1: "degradation reproduced".
    * Gradients do not vanish in the plain net at initialisation, they explode towards the input. After 70
      iterations the profile has flipped: plain-56's first conv gets 0.12x its last conv's gradient.
    * With BN's running statistics as training left them, held-out error is up to 16 points higher; re-estimated
      over 20 batches, it sits within 3 points of the training error for every model.

Try this (`--exercise N` runs number N; answers/03_training_comparison.md answers each, with numbers)
    1. `--depths 8 20` (about 90 s): does the plain net already degrade between 8 and 20 layers? Try seeds 1, 2.
    2. `--lr 0.1 --warmup-iterations 0`: the paper's start. Which half of the claim survives 70 iterations?
    3. `--depths 20 --bn-recalibration-batches 1`: how far is one batch from the default 20 (held-out error)?
    4. `--depths 20 --precision fp32`, then 5. the same with `--no-channels-last`: the same curves, and how
       much slower?
"""

# %%
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for every model's weights and the shared data order [>= 0, < 4294967296]
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/03_training_comparison"  # folder for results.json and figures
FULL: bool = False  # the paper's schedule: 64k iterations, lr/10 at 32k and 48k, 45k/5k split, augmentation (GPU)
DATASET: str = "cifar10"  # a quick run falls back if absent [cifar10 | cifar100 | fashion-mnist | synthetic]
DATA_DIR: Path = "data"  # where datasets are stored or downloaded
DOWNLOAD: bool = True  # download a missing dataset through torchvision (needs the internet; checksums verified)
DEPTHS: tuple[int, ...] = (20, 56)  # depths (6n+2), each plain and residual (paper: 20 32 44 56 110) [>= 8]
ITERATIONS: int = 70  # SGD iterations per model (paper: 64000) [> 0]
BATCH_SIZE: int = 128  # images per iteration (paper: 128) [> 0]
LR: float = 0.05  # peak learning rate (paper: 0.1; see "A gentle start" in the card) [> 0]
MOMENTUM: float = 0.9  # SGD momentum (paper: 0.9) [>= 0, < 1]
WEIGHT_DECAY: float = 0.0001  # L2 weight decay (paper: 1e-4) [>= 0]
LR_MILESTONES: tuple[int, ...] = (32000, 48000)  # iterations where the lr is divided by 10 (paper) [>= 0]
WARMUP_ITERATIONS: int = 30  # warm-up length for every net at least WARMUP_DEPTH deep (paper: 400) [>= 0]
WARMUP_DEPTH: int = 0  # nets at least this deep are warmed up (0: every net; paper: only the 110-layer net) [>= 0]
WARMUP_LR: float = 0.0  # constant warm-up lr (0: linear ramp from LR/WARMUP_ITERATIONS up to LR; paper: 0.01) [>= 0]
TRAIN_SIZE: int = 10000  # training images kept (the quick run sees 8,960 draws from them) [> 0]
VAL_SIZE: int = 1000  # training images held out for the held-out error (paper: 5000 of 50000, to tune) [> 0]
AUGMENT: bool = False  # pad-4 random crop and horizontal flip (paper: yes; too few iterations here to matter)
PRECISION: str = "auto"  # autocast dtype (auto: bf16 where native, else fp32/fp16) [auto | fp32 | bf16 | fp16]
CHANNELS_LAST: bool = True  # NHWC memory layout (faster on AVX-512 CPUs, see the README; Try this, 5)
GRAD_CHECKPOINTS: int = 4  # evenly spaced times at which every layer's gradient is recorded [> 0]
BN_RECALIBRATION_BATCHES: int = 20  # training batches that re-estimate batch-norm statistics before evaluation [>= 0]
END_FRACTION: float = 0.2  # the verdict compares mean training error over this final fraction (20%) [> 0, <= 1]
NOISE_Z: float = 2.0  # standard errors a difference of end errors must exceed to count (noise band) [>= 0]
SMOOTHING: int = 20  # iterations in the moving average of the plotted training error [> 0]
EVAL_TEST: bool = False  # also report test-set error (never used to choose anything)
# --- end constants -----------------------------------------------------------------------------------

EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: {"depths": (8, 20)},
    2: {"lr": 0.1, "warmup_iterations": 0},
    3: {"depths": (20,), "bn_recalibration_batches": 1},
    4: {"depths": (20,), "precision": "fp32"},
    5: {"depths": (20,), "precision": "fp32", "channels_last": False},
}

FULL_OVERRIDES = {
    "depths": (20, 32, 44, 56, 110),
    "iterations": 64000,
    "lr": 0.1,
    "warmup_iterations": 400,
    "warmup_depth": 110,
    "warmup_lr": 0.01,
    "train_size": 45000,
    "val_size": 5000,
    "augment": True,
    "grad_checkpoints": 8,
    "bn_recalibration_batches": 100,
    "end_fraction": 0.05,
    "smoothing": 400,
    "eval_test": True,
}

helpers.config(globals(), {})  # the values main() starts from (a notebook shows them)


# %% Lesson 02's CIFAR ResNet, repeated here so that this lesson stands alone (tests/test_standalone.py proves the copy
# equal to lesson 02's: strict state_dict loads both ways, equal outputs).
def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """W_s x of Eq. 2: a strided 1x1 convolution and batch norm (option B)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class ShortcutA(nn.Module):
    """Option A: subsample and zero-pad the new channels; no parameters. (B, C_in, H, W) -> (B, C_out, H/s, W/s)"""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))


class PlainBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, no shortcut: y = relu(F(x))."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # F(x) = BN(W2 * relu(BN(W1 * x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x))


class BasicBlock(PlainBlock):
    """y = relu(F(x) + shortcut(x)): the identity where shapes match (Eq. 1), `make_shortcut` where not (Eq. 2)."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, width, stride)
        shape_changes = stride != 1 or in_channels != width
        self.downsample = make_shortcut(in_channels, width, stride) if shape_changes else None

    last_bn = property(lambda self: self.bn2)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (Eq. 1)


def make_stage(make_block, in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = []
    for index in range(num_blocks):
        blocks.append(make_block(in_channels, width, stride if index == 0 else 1))
        in_channels = width * getattr(blocks[-1], "expansion", 1)
    return nn.Sequential(*blocks)


def init_like_torchvision(model: nn.Module, zero_init_residual: bool = False) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules() if zero_init_residual else ():
        if hasattr(module, "last_bn"):
            nn.init.zeros_(module.last_bn.weight)
    return model


class CifarResNet(nn.Module):
    """He et al. 2015, section 4.2: a 3x3 conv with 16 filters, three stages of n blocks at 16, 32, 64 filters,
    global average pooling and a linear layer: 6n + 2 weighted layers. `plain=True` removes every shortcut."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: str = "A",
        plain: bool = False,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), not {depth}")
        self.depth, self.shortcut_option, self.plain = depth, shortcut, plain
        n = (depth - 2) // 6
        make_block = (
            PlainBlock
            if plain
            else functools.partial(BasicBlock, make_shortcut=ShortcutA if shortcut == "A" else projection_shortcut)
        )
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_stage(make_block, 16, 16, n, stride=1)
        self.layer2 = make_stage(make_block, 16, 32, n, stride=2)
        self.layer3 = make_stage(make_block, 32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_like_torchvision(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        return self.layer3(self.layer2(self.layer1(x)))  # -> (B, 16, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))  # (B, 64, 8, 8) -> (B, 64) -> (B, K)


def cifar_resnet(
    depth: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False, zero_init_residual: bool = False
) -> CifarResNet:
    return CifarResNet(depth, num_classes, shortcut, plain, zero_init_residual)


# The copy's sizes, as lesson 02 counts them.
{f"resnet{d}": f"{helpers.count_parameters(cifar_resnet(d)):,} parameters" for d in (20, 56)}


# %% The models: one family, with and without shortcuts
# He et al. 2015 (section 4.2) compare nets that differ only in the shortcuts: the same 6n+2 weighted
# layers, the same widths (16, 32, 64), option-A shortcuts that add no parameters, batch norm after every
# convolution, and the same initialisation (Kaiming normal, "Delving Deep into Rectifiers"). Lesson 02's
# `cifar_resnet(depth, plain=True)` removes every shortcut and nothing else, so any difference in training
# below comes from the "+ x" alone.
def build_model(depth: int, plain: bool, num_classes: int, seed: int) -> nn.Module:
    """Plain or residual CIFAR net, its weights drawn from the same seed as every other model's."""
    torch.manual_seed(seed)
    return cifar_resnet(depth, num_classes=num_classes, plain=plain)


def model_name(depth: int, plain: bool) -> str:
    return f"{'plain' if plain else 'resnet'}-{depth}"


def family_table(depths) -> helpers.Table:
    """Every depth as a plain and as a residual net: the same weighted layers and the same parameters."""
    rows = []
    for depth in depths:
        for plain in (True, False):
            model = build_model(depth, plain, num_classes=10, seed=0)
            layers, params = len(helpers.weighted_layers(model)), helpers.count_parameters(model)
            rows.append({"model": model_name(depth, plain), "weighted layers": layers, "parameters": params})
    return helpers.format_table(rows, [("model", ""), ("weighted layers", "d"), ("parameters", ",d")])


family_table(DEPTHS)


# %% He et al.'s training recipe
# Section 4.2 of the paper: SGD with momentum 0.9 and weight decay 1e-4, mini-batches of 128, the learning
# rate divided by 10 at fixed iterations, and for the 110-layer net a small constant rate until training
# error falls below 80%. Lessons 04 and 05 train with the same function (they import it from here).
def learning_rate(
    step: int, lr: float, milestones: Iterable[int], warmup_steps: int = 0, warmup_lr: float | None = None
) -> float:
    """The learning rate of iteration `step` (0-based): `lr` divided by 10 at each milestone passed; during the
    warm-up, either the constant `warmup_lr` (the paper's 0.01 for 110 layers) or a linear ramp up to `lr`."""
    if step < warmup_steps:
        return warmup_lr if warmup_lr is not None else lr * (step + 1) / warmup_steps
    return lr * 0.1 ** sum(step >= m for m in milestones)


def sgd_train(
    model: nn.Module,
    data: helpers.ImageData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_milestones: Iterable[int] = (),
    warmup_steps: int = 0,
    warmup_lr: float | None = None,
    amp_dtype: torch.dtype | None = None,
    augment: bool = False,
    channels_last: bool = False,
    on_backward: Callable[[int, nn.Module], None] | None = None,
    desc: str = "train",
) -> list[dict]:
    """Train with SGD for `steps` mini-batches, the way He et al. 2015 train their CIFAR nets: momentum,
    weight decay, the learning rate divided by 10 at each milestone, and optionally a constant warm-up
    learning rate for the first `warmup_steps` (their 110-layer net used 0.01 until training error fell
    below 80%, about 400 iterations). `data` may live on `device` already (fastest) or on the CPU.

    Returns one record per step: loss and error of that mini-batch (the quantity the paper plots as
    training error), the learning rate, and the elapsed time. `on_backward(step, model)` runs after the
    gradients exist and before the update, for measuring them."""
    helpers.require(steps > 0, "the number of training steps must be positive (raise --iterations or --epochs)")
    helpers.require(batch_size > 0, "the batch size must be positive (raise --batch-size)")
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    milestones = sorted(lr_milestones)
    batches = helpers.endless_batches(len(data.train_x), batch_size, generator)
    history, started = [], time.perf_counter()
    progress = helpers.Progress(range(steps), desc, unit="img", scale=batch_size)
    for step in progress:
        rate = learning_rate(step, lr, milestones, warmup_steps, warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = next(batches).to(data.train_x.device)
        images, labels = (
            data.train_x[index].to(device, non_blocking=True),
            data.train_y[index].to(device, non_blocking=True),
        )
        if augment:
            images = helpers.random_crop_flip(images, generator=generator)
        x = helpers.normalize(images, data.mean, data.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with helpers.autocast(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        diverged = f"the training loss became {loss.item()} at step {step} (lower --lr)"
        helpers.require(torch.isfinite(loss).item(), diverged)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if on_backward is not None:
            scaler.unscale_(optimizer)
            on_backward(step, model)
        scaler.step(optimizer)
        scaler.update()
        error = (logits.argmax(1) != labels).float().mean().item()
        history.append(
            {"step": step + 1, "loss": loss.item(), "error": error, "lr": rate, "time_s": time.perf_counter() - started}
        )
        progress.set_postfix_str(f"loss {loss.item():.3f} err {error:.1%}")
    helpers.synchronize(device)
    return history


helpers.format_table(
    [
        {"iteration": step, "lr": learning_rate(step, LR, LR_MILESTONES, WARMUP_ITERATIONS, WARMUP_LR or None)}
        for step in sorted({0, WARMUP_ITERATIONS // 2, WARMUP_ITERATIONS, ITERATIONS - 1, *LR_MILESTONES})
    ],
    [("iteration", "d"), ("lr", ".5f")],
    title="This run's learning rate at a few iterations (milestones past ITERATIONS never arrive)",
)


# %% Gradient norms of every weighted layer
# The paper (section 4.1) argues that the trouble of deep plain nets is "unlikely to be caused by vanishing
# gradients": with batch norm the forward signals keep non-zero variance and the backward gradients
# "exhibit healthy norms". We check by recording ||dL/dW|| for every convolution and the classifier, at
# initialisation (the first mini-batch, before any update) and at checkpoints during training. Because
# batch norm makes a convolution's output invariant to the scale of its weights, what a step of SGD does
# to a layer depends on the gradient relative to the weights, so ||dL/dW|| / ||W|| is recorded too.
def layer_gradient_norms(model: nn.Module) -> dict:
    """||dL/dW|| and ||dL/dW|| / ||W|| of every weighted layer, input to output (gradients must exist)."""
    grads, relative = [], []
    for _, layer in helpers.weighted_layers(model):
        grad_norm = layer.weight.grad.detach().float().norm().item()
        grads.append(grad_norm)
        relative.append(grad_norm / layer.weight.detach().float().norm().clamp_min(1e-12).item())
    return {"grad_norm": grads, "relative": relative}


def gradient_summary(grad_norms: list[float]) -> dict:
    """The facts the lesson reads off one gradient profile (weighted layers in order; last is the classifier)."""
    convs = grad_norms[:-1]
    return {
        "first_conv": convs[0],
        "last_conv": convs[-1],
        "classifier": grad_norms[-1],
        "smallest_conv": min(convs),
        "first_over_last_conv": convs[0] / convs[-1],
    }


def checkpoint_steps(iterations: int, count: int) -> list[int]:
    """Step indices (0-based) whose gradients are recorded: 0 is initialisation, then `count` even spaces.
    The gradient of step s is taken after s updates, so it describes the weights after s iterations."""
    return sorted({0} | {max(0, round(iterations * k / count) - 1) for k in range(1, count + 1)})


checkpoint_steps(ITERATIONS, GRAD_CHECKPOINTS)  # the steps whose layer gradients the run records


# Batch-norm statistics for evaluation. Pitfall. In training mode batch norm normalises with the current
# batch's mean and variance; in eval mode with running averages updated by momentum 0.1 at every step. After a few hundred steps at learning rate
# 0.1 the weights still change fast, so the running averages describe weights from tens of steps ago and
# the eval-mode network is not the network that was trained: measured below, held-out error with the raw
# running statistics is far above the training error. Re-estimating the statistics with the final weights
# (a plain average over some training batches, no gradient, no weight change) fixes the mismatch; both
# numbers are reported. After the paper's 64k iterations, at learning rate 0.001 for the last 16k, the
# two agree closely.
# helpers.recalibrate_batch_norm does the re-estimation; train_one calls it.


def train_one(
    cfg, data: helpers.ImageData, depth: int, plain: bool, device: torch.device, amp_dtype: torch.dtype | None
) -> dict:
    """Train one net with the shared recipe; return its curves, gradients, held-out error and timings.

    Identical conditions: the same seed for the weights, a fresh data-order generator with the same seed
    (so every model sees the same mini-batches in the same order, and the same augmentation), the same
    optimiser, learning rate, schedule, precision and memory layout."""
    name = model_name(depth, plain)
    model = build_model(depth, plain, data.num_classes, cfg.seed)
    layer_names = [n for n, _ in helpers.weighted_layers(model)]
    record_at = set(checkpoint_steps(cfg.iterations, cfg.grad_checkpoints))
    gradients: dict[int, dict] = {}

    def on_backward(step: int, net: nn.Module) -> None:
        if step in record_at:
            gradients[step] = layer_gradient_norms(net)

    warmup = cfg.warmup_iterations if depth >= cfg.warmup_depth else 0
    generator = torch.Generator().manual_seed(cfg.seed)  # the same data order for every model
    started = time.perf_counter()
    history = sgd_train(
        model,
        data,
        steps=cfg.iterations,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=device,
        generator=generator,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_milestones=cfg.lr_milestones,
        warmup_steps=warmup,
        warmup_lr=cfg.warmup_lr or None,  # None: linear ramp
        amp_dtype=amp_dtype,
        augment=cfg.augment,
        channels_last=cfg.channels_last,
        on_backward=on_backward,
        desc=name,
    )
    train_s = history[-1]["time_s"]

    eval_kwargs = {"device": device, "amp_dtype": amp_dtype, "channels_last": cfg.channels_last}
    stale = helpers.evaluate(model, data.val_x, data.val_y, data.mean, data.std, **eval_kwargs)
    calibration = torch.Generator().manual_seed(cfg.seed + 1)  # its own generator: the training order is untouched
    batches = helpers.training_batches(data, cfg.bn_recalibration_batches, cfg.batch_size, device, calibration)
    helpers.recalibrate_batch_norm(model, batches, amp_dtype, cfg.channels_last)
    held_out = helpers.evaluate(model, data.val_x, data.val_y, data.mean, data.std, **eval_kwargs)
    test = (
        helpers.evaluate(model, data.test_x, data.test_y, data.mean, data.std, **eval_kwargs) if cfg.eval_test else None
    )
    wall_s = time.perf_counter() - started

    errors = [h["error"] for h in history]
    losses = [h["loss"] for h in history]
    return {
        "name": name,
        "kind": "plain" if plain else "resnet",
        "depth": depth,
        "parameters": helpers.count_parameters(model),
        "weighted_layers": len(layer_names),
        "warmup_iterations": warmup,
        "end_train_error": end_value(errors, cfg.end_fraction),
        "end_train_loss": end_value(losses, cfg.end_fraction),
        "val_error_running_stats": stale["error"],
        "val_error": held_out["error"],
        "val_loss": held_out["loss"],
        "test_error": test["error"] if test else None,
        "images_per_s": cfg.iterations * cfg.batch_size / train_s,
        "train_s": train_s,
        "wall_s": wall_s,
        "gradient_at_init": gradient_summary(gradients[0]["grad_norm"]),
        "curve": {"error": errors, "loss": losses, "lr": [h["lr"] for h in history]},
        "gradients": {"layers": layer_names, "by_iteration": {str(s): g for s, g in sorted(gradients.items())}},
    }


def shared_recipe(cfg) -> helpers.Table:
    """What every model of the run shares (the only difference between two models is depth or the "+ x")."""
    warmup = "every net" if cfg.warmup_depth == 0 else f"nets of {cfg.warmup_depth}+ layers"
    ramp = "linear ramp" if not cfg.warmup_lr else f"constant lr {cfg.warmup_lr:g}"
    rows = [
        {"setting": "weights", "value": f"Kaiming normal, seed {cfg.seed}"},
        {"setting": "mini-batches", "value": f"{cfg.batch_size} images, one order drawn from seed {cfg.seed}"},
        {"setting": "optimiser", "value": f"SGD, momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g}"},
        {"setting": "learning rate", "value": f"{cfg.lr:g} after {cfg.warmup_iterations} warm-up iterations"},
        {"setting": "warm-up", "value": f"{ramp}, for {warmup}"},
        {"setting": "iterations", "value": f"{cfg.iterations}, lr / 10 at {', '.join(map(str, cfg.lr_milestones))}"},
        {"setting": "precision", "value": f"autocast {cfg.precision}, channels-last {cfg.channels_last}"},
    ]
    return helpers.format_table(rows, [("setting", ""), ("value", "")], "Identical conditions for every model")


shared_recipe(helpers.config(globals(), {}))


# %% The verdict, computed from the curves, against its control and its own noise
# Mini-batch training error is noisy (a batch of 128 images moves it by 0.8 points per mistake), so "the
# error a model ends with" is the mean over the last END_FRACTION of the iterations, and its standard error
# is estimated from the spread of the mini-batch errors in that window (std / sqrt(count); neighbouring
# batches are correlated, so this understates the noise a little, and it does not include seed-to-seed
# spread, which the card reports separately). A difference counts only when it exceeds NOISE_Z combined
# standard errors of the end errors it is made of.
# The claim of He et al. (Fig. 1, Fig. 6) is a comparison with a control: the deeper plain net ends with a
# HIGHER training error than the shallower one (degradation; not overfitting, since it is the training
# error), while the residual pair, trained identically, does not. A plain gap alone is not the degradation
# problem: deeper nets can simply start slower, and then the residual pair shows the same gap. So the
# verdict is "reproduced" only when the plain gap is above noise AND exceeds the residual gap by more than
# the noise; "contradicted" when the residual gap exceeds the plain gap by more than the noise; otherwise
# this run cannot tell.
def end_value(values: list[float], fraction: float) -> float:
    """Mean of the last `fraction` of `values` (at least one value)."""
    return end_statistics(values, fraction)[0]


def end_statistics(values: list[float], fraction: float) -> tuple[float, float]:
    """Mean of the last `fraction` of `values` and its standard error (0 for a single value)."""
    helpers.require(len(values) > 0, "no values to average (the curve is empty)")
    window = values[-max(1, math.ceil(len(values) * fraction)) :]
    mean = sum(window) / len(window)
    if len(window) < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in window) / (len(window) - 1)
    return mean, math.sqrt(variance / len(window))


def noise_band(standard_errors: list[float], noise_z: float) -> float:
    """NOISE_Z standard errors of a sum or difference of independent means."""
    return noise_z * math.sqrt(sum(se**2 for se in standard_errors))


def degradation_verdict(curves: dict[str, dict[int, list[float]]], end_fraction: float, noise_z: float) -> dict:
    """`curves["plain"][depth]` and `curves["resnet"][depth]` are training-error curves (one value per
    iteration). Compares the shallowest and deepest depth trained in both families."""
    depths = sorted(set(curves["plain"]) & set(curves["resnet"]))
    helpers.require(len(depths) >= 2, "the verdict needs at least two depths in both families (pass --depths 20 56)")
    shallow, deep = depths[0], depths[-1]
    stats = {k: {d: end_statistics(curves[k][d], end_fraction) for d in depths} for k in ("plain", "resnet")}
    end = {k: {d: stats[k][d][0] for d in depths} for k in stats}
    se = {k: {d: stats[k][d][1] for d in depths} for k in stats}
    plain_gap = end["plain"][deep] - end["plain"][shallow]  # > 0: the deeper plain net trains worse
    resnet_gap = end["resnet"][deep] - end["resnet"][shallow]
    four = [se[k][d] for k in se for d in (shallow, deep)]
    bands = {
        "plain_gap": noise_band([se["plain"][shallow], se["plain"][deep]], noise_z),
        "resnet_gap": noise_band([se["resnet"][shallow], se["resnet"][deep]], noise_z),
        "deep_pair": noise_band([se["plain"][deep], se["resnet"][deep]], noise_z),
        "gap_difference": noise_band(four, noise_z),
    }
    excess = plain_gap - resnet_gap  # how much more depth costs without shortcuts than with them
    deeper_plain_is_worse = plain_gap > bands["plain_gap"]
    if deeper_plain_is_worse and excess > bands["gap_difference"]:
        outcome = "reproduced"
    elif -excess > bands["gap_difference"]:
        outcome = "contradicted"
    else:
        outcome = "cannot tell"
    return {
        "shallow_depth": shallow,
        "deep_depth": deep,
        "end_fraction": end_fraction,
        "noise_z": noise_z,
        "end_train_error": end,
        "end_standard_error": se,
        "plain_gap": plain_gap,
        "resnet_gap": resnet_gap,
        "gap_difference": excess,
        "noise_band": bands,
        "deeper_plain_is_worse": deeper_plain_is_worse,
        "deeper_resnet_matches_or_beats": resnet_gap <= bands["resnet_gap"],
        "deep_resnet_beats_deep_plain": end["plain"][deep] - end["resnet"][deep] > bands["deep_pair"],
        "outcome": outcome,
        "degradation_reproduced": outcome == "reproduced",
    }


def verdict_sentence(verdict: dict) -> str:
    """The verdict as one line a learner can check against the table."""
    s, d, band = verdict["shallow_depth"], verdict["deep_depth"], verdict["noise_band"]["gap_difference"]
    gaps = (
        f"training error, deeper minus shallower: plain {100 * verdict['plain_gap']:+.1f} points "
        f"(plain-{d} vs plain-{s}), residual {100 * verdict['resnet_gap']:+.1f} points (resnet-{d} vs resnet-{s}); "
        f"difference {100 * verdict['gap_difference']:+.1f} points, noise band +-{100 * band:.1f} "
        f"({verdict['noise_z']:g} standard errors)"
    )
    meaning = {
        "reproduced": "degradation reproduced: the deeper plain net trains worse, and the residual control shows "
        "it is the missing shortcuts, not depth alone",
        "contradicted": "contradicted: depth costs the residual nets more than the plain ones in this run",
        "cannot tell": "this run cannot tell degradation from noise or from deeper nets merely starting slower",
    }[verdict["outcome"]]
    return f"verdict: {meaning}. {gaps}"


def depth_trend(end_errors: dict[int, float], standard_errors: dict[int, float], noise_z: float) -> str:
    """How training error moves from each depth to the next: "rises", "falls" or "flat" (within noise)."""
    depths = sorted(end_errors)
    steps = []
    for a, b in zip(depths, depths[1:]):
        change = end_errors[b] - end_errors[a]
        band = noise_band([standard_errors[a], standard_errors[b]], noise_z)
        steps.append("rises" if change > band else "falls" if change < -band else "flat")
    if all(step == "rises" for step in steps):
        return "rises monotonically with depth"
    if all(step == "falls" for step in steps):
        return "falls monotonically with depth"
    return "not monotonic: " + ", ".join(f"{a}->{b} {step}" for a, b, step in zip(depths, depths[1:], steps))


def binned_curve(curve: dict, iterations: int, max_points: int = 2000) -> dict:
    """The curves as means over bins of consecutive iterations, so that results.json of a 64k-iteration run
    stays small; `bin` iterations per point (1 in the quick run: every iteration is kept)."""
    size = max(1, math.ceil(iterations / max_points))
    binned = {
        key: [sum(v[i : i + size]) / len(v[i : i + size]) for i in range(0, len(v), size)] for key, v in curve.items()
    }
    return {"bin": size, **binned}


# How the verdict reads, on made-up flat curves: a 20-point plain gap against a 1-point residual gap.
verdict_sentence(
    degradation_verdict(
        {"plain": {20: [0.2] * 50, 56: [0.4] * 50}, "resnet": {20: [0.2] * 50, 56: [0.21] * 50}}, 0.2, 2
    )
)


# %% Figures, and the whole run
def plot_training_error(models: list[dict], smoothing: int, path: Path) -> Path:
    """Fig. 6 of the paper: training error against iterations, plain nets left, residual nets right;
    held-out error (after BN recalibration) as a marker at the end of each curve."""
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    depths = sorted({m["depth"] for m in models})
    colours = {d: plt.cm.viridis(i / max(1, len(depths) - 1) * 0.85) for i, d in enumerate(depths)}
    for ax, kind, title in zip(axes, ("plain", "resnet"), ("plain networks", "residual networks")):
        for m in (m for m in models if m["kind"] == kind):
            curve = [100 * e for e in helpers.smooth(m["curve"]["error"], smoothing)]
            steps = range(1, len(curve) + 1)
            ax.plot(steps, curve, color=colours[m["depth"]], lw=1.2, label=f"{m['name']} (training)")
            ax.plot(len(curve), 100 * m["val_error"], "o", color=colours[m["depth"]], ms=7)
        ax.set_title(f"{title}: training error (dots: held-out error)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(f"error (%), moving average over {smoothing} iterations")
    fig.tight_layout()
    return helpers.save_figure(fig, path)


def plot_gradients(models: list[dict], path: Path) -> Path:
    """||dL/dW|| of every weighted layer of the deepest nets, at initialisation and at each checkpoint."""
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    deepest = max(m["depth"] for m in models)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("plain", "resnet")):
        model = next(m for m in models if m["kind"] == kind and m["depth"] == deepest)
        checkpoints = model["gradients"]["by_iteration"]
        for i, (step, grads) in enumerate(checkpoints.items()):
            label = "initialisation" if step == "0" else f"after {int(step)} iterations"
            layers = range(1, len(grads["grad_norm"]) + 1)
            colour = plt.cm.plasma(i / max(1, len(checkpoints) - 1) * 0.85)
            ax.plot(layers, grads["grad_norm"], marker=".", ms=3, lw=1, color=colour, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{model['name']}: gradient norm by layer")
        ax.set_xlabel("weighted layer (1 = first convolution, last = classifier)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("||dL/dW|| (Frobenius norm)")
    fig.tight_layout()
    return helpers.save_figure(fig, path)


def load_data(cfg) -> helpers.ImageData:
    """The training set with a held-out part (helpers.load_data states the rule for a missing dataset)."""
    return helpers.load_data(cfg, test_size=None if cfg.eval_test else 1)


def validate(cfg) -> None:
    """What the constants' declarations cannot say (they check every range and the seed)."""
    for depth in cfg.depths:
        helpers.require((depth - 2) % 6 == 0, f"depth {depth} is not 6n+2 (use 8, 14, 20, 32, 44, 56, 110, ...)")
    # the activations one training step keeps for backward: about 3 maps of (B, 16, 32, 32) floats per layer
    helpers.require_memory(4 * 3 * cfg.batch_size * 16 * 32 * 32 * max(cfg.depths), "--depths x --batch-size")


def train_all(cfg, data: helpers.ImageData, device: torch.device, amp_dtype: torch.dtype | None) -> list[dict]:
    """Phase 2, identical conditions: every depth as a plain and as a residual net, one after another."""
    print(
        f"{data.name}: {len(data.train_x)} training images, {len(data.val_x)} held out; {cfg.iterations} iterations "
        f"of batch {cfg.batch_size} per model, peak lr {cfg.lr:g} after a {cfg.warmup_iterations}-iteration warm-up, "
        f"on {helpers.device_name(device)}, autocast {amp_dtype or 'off (fp32)'}, channels-last {cfg.channels_last}",
        flush=True,
    )
    models = []
    for plain in (True, False):
        for depth in sorted(cfg.depths):
            m = train_one(cfg, data, depth, plain, device, amp_dtype)
            models.append(m)
            print(
                f"  {m['name']:>10}: training error {m['end_train_error']:.1%} (mean of last {cfg.end_fraction:.0%}), "
                f"held-out {m['val_error']:.1%}, {m['images_per_s']:.0f} img/s, {m['wall_s']:.0f} s",
                flush=True,
            )
    return models


def print_model_table(models: list[dict], cfg, data: helpers.ImageData) -> None:
    rows = [
        {
            "model": m["name"],
            "params": m["parameters"],
            "train err %": 100 * m["end_train_error"],
            "train loss": m["end_train_loss"],
            "held-out err % (stale BN)": 100 * m["val_error_running_stats"],
            "held-out err %": 100 * m["val_error"],
            **({"test err %": 100 * m["test_error"]} if cfg.eval_test else {}),
            "grad 1st/last conv": m["gradient_at_init"]["first_over_last_conv"],
            "img/s": m["images_per_s"],
            "wall s": m["wall_s"],
        }
        for m in models
    ]
    formats = {"model": "", "params": ",d", "grad 1st/last conv": ".3g", "img/s": ".0f", "wall s": ".1f"}
    helpers.print_table(
        rows,
        [(key, formats.get(key, ".3f" if key == "train loss" else ".1f")) for key in rows[0]],
        f"{data.name}, {cfg.iterations} iterations each; train err/loss: mean over the last {cfg.end_fraction:.0%} "
        f"of iterations; held-out: {len(data.val_x)} images, BN statistics re-estimated (stale BN: as trained); "
        "grad: ||dL/dW|| ratio at initialisation",
    )


def judge_degradation(models: list[dict], cfg) -> dict | None:
    """Phase 1, the degradation problem: the verdict against the residual control, and the trend with depth."""
    if len(cfg.depths) < 2:
        return None
    families = ("plain", "resnet")
    curves = {k: {m["depth"]: m["curve"]["error"] for m in models if m["kind"] == k} for k in families}
    verdict = degradation_verdict(curves, cfg.end_fraction, cfg.noise_z)
    print(verdict_sentence(verdict), flush=True)
    if len(cfg.depths) >= 3:
        verdict["trend"] = {
            k: depth_trend(verdict["end_train_error"][k], verdict["end_standard_error"][k], cfg.noise_z)
            for k in families
        }
        for k in families:
            print(f"  {k} nets: training error {verdict['trend'][k]}", flush=True)
    return verdict


def report_gradients_and_bn(models: list[dict]) -> dict:
    """Phases 3 and 4: the gradient profile of the deepest nets at initialisation and at the end of training,
    and how much stale batch-norm statistics cost on held-out images."""
    deepest = max(m["depth"] for m in models)
    facts = {}
    for m in (m for m in models if m["depth"] == deepest):
        by_step = m["gradients"]["by_iteration"]
        at_init = gradient_summary(by_step["0"]["grad_norm"])["first_over_last_conv"]
        at_end = gradient_summary(by_step[max(by_step, key=int)]["grad_norm"])["first_over_last_conv"]
        facts[m["name"]] = {"first_over_last_conv_at_init": at_init, "first_over_last_conv_at_end": at_end}
        print(
            f"  {m['name']}: first conv / last conv gradient {at_init:.3g} at initialisation, "
            f"{at_end:.3g} at the end of training",
            flush=True,
        )
    worst = max(models, key=lambda m: m["val_error_running_stats"] - m["val_error"])
    print(
        f"  stale BN statistics: up to {worst['val_error_running_stats'] - worst['val_error']:+.1%} held-out error "
        f"({worst['name']}: {worst['val_error_running_stats']:.1%} before re-estimation, "
        f"{worst['val_error']:.1%} after)",
        flush=True,
    )
    return facts


@helpers.constants_as_keywords
def main(**overrides):
    """Train plain and residual nets of DEPTHS under identical conditions and judge the degradation problem
    (the four parts of "What you will learn"); saves results.json and two figures in `out`."""
    cfg = helpers.config(globals(), overrides, FULL_OVERRIDES)
    started = time.perf_counter()
    validate(cfg)
    device = helpers.pick_device(cfg.device)
    amp_dtype = helpers.autocast_dtype(device, cfg.precision)
    out_dir = helpers.output_dir(cfg, "results.json", "training_error.png", "gradient_norms.png")
    helpers.seed_everything(cfg.seed)
    data = load_data(cfg).to(device)

    models = train_all(cfg, data, device, amp_dtype)
    print_model_table(models, cfg, data)
    verdict = judge_degradation(models, cfg)
    gradient_facts = report_gradients_and_bn(models)

    results = {"dataset": data.name, "fell_back_from": cfg.dataset if data.name != cfg.dataset else None}
    results["precision"] = str(amp_dtype) if amp_dtype else "fp32"
    results["models"] = [{**m, "curve": binned_curve(m["curve"], cfg.iterations)} for m in models]
    results["gradient_profile"] = gradient_facts
    if verdict is not None:
        results["verdict"] = verdict
    print(f"figure: {plot_training_error(models, cfg.smoothing, out_dir / 'training_error.png')}")
    print(f"figure: {plot_gradients(models, out_dir / 'gradient_norms.png')}")
    path = helpers.save_results(out_dir, results, cfg, device, started)
    print(f"results: {path}  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    helpers.run_cli(main, globals())
