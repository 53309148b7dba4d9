"""Lesson 05: seeing residual networks: gradient flow, loss landscape, block diagrams, feature maps.

What you will learn
    * How the gradient is spread over the layers of plain and residual networks at initialisation, with and
      without batch norm, and why "plain nets' gradients vanish" is not what a batch-normalised plain net does.
    * Li et al. 2018's filter-normalised directions ("Visualizing the Loss Landscape of Neural Nets"): two Gaussian
      directions d1, d2, each filter rescaled to the norm of the trained filter,
          d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}||,     f(alpha, beta) = L(theta + alpha d1 + beta d2),
      how to read a number off the grid, and how to check that a difference survives other directions.
    * The basic, bottleneck and pre-activation blocks drawn with shapes measured on the real blocks (He et al. 2015,
      Eq. 1: y = F(x, {W_i}) + x), and feature maps after the stem and each stage of a trained network.

Run
    python 05_visualization.py            # two 20-layer nets, 100 steps each, and 2 x 3 direction pairs x 81 points
    python 05_visualization.py --full     # the ResNet-56 pair, 6000 steps, 51x51 grid: meant for a GPU
    Runtime on 2 quiet CPU cores: 121-199 s with bf16 training (AVX512-BF16), 127-167 s in fp32 (an AMD EPYC
    without bf16); the landscape itself is always fp32.

What you should see (seed 0, Fashion-MNIST fallback; one batch of 32 training images)
    Gradient RMS of dL/dW at initialisation (fp32 on both machines):
                first conv / last conv          last-conv RMS without BN
        depth   plain+BN    residual+BN         plain       residual
        20      1.3e2       32                  3.9e-4      6.6e-2
        56      2.0e4       1.0e2               2.8e-5      1.5e2
        110     3.4e7-4.1e7 1.6e2               3.6e-5      2.4e7
    * With batch norm the plain net's gradients EXPLODE towards the input, exponentially in depth (Yang et al.
      2019); in the residual net the largest and smallest layer gradients differ by less than 300x at every depth.
    * Without batch norm the residual net's signal roughly doubles in variance per block, so its gradients grow to
      2.4e7 at 110 layers: shortcuts need BN, or a zero-initialised or scaled branch, to stay well-conditioned.
    Loss landscape of the two trained nets (9x9 grid over [-1, 1]^2, 256 training images):
        trained in   net          centre loss   rise at r=0.5   highest rise   upward-curving share, 3 pairs
        bf16         plain-20     0.93          1.18            695            41, 41, 51%
                     ResNet-20    0.96          1.10            69             49, 63, 47%
        fp32         plain-20     0.90          1.67            549            55, 39, 51%
                     ResNet-20    0.96          0.52            51             69, 86, 76%
    * Far from the centre the plain net's loss climbs about ten times higher in both runs. Near the centre, and in
      the share of points that curve upward, the two runs disagree with each other; the run judges each difference
      against its own direction pairs and calls it within noise both times.

Try this (`--exercise N` runs number N; answers/05_visualization.md answers each, with numbers)
    1. `--gradient-depths 20 56 110 218`: how does the plain+BN first/last ratio grow with depth?
    2. `--grid-radius 0.5 --grid-points 11 --summary-radius 0.25`: zoom in. Does the residual net still have the
       larger upward-curving share, and where do the slices curve downward?
    3. `--landscape-depth 32` (about 5 minutes): do the rise and the share separate more than at 20 layers?
    4. In `filter_normalized_direction`, delete the line `d = d * scale.view(...)` (a plain Gaussian direction):
       does the weights' scale, rather than the geometry, now decide the picture (Li et al. 2018, section 4)?
"""

# %%
from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for weights, directions and data order [>= 0, < 4294967296]
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/05_visualization"  # folder for results.json and the four figures
FULL: bool = False  # deeper nets, longer training and a 51x51 landscape grid (meant for a GPU)
DATASET: str = "cifar10"  # a quick run falls back if absent [cifar10 | cifar100 | fashion-mnist | synthetic]
DATA_DIR: Path = "data"  # where datasets are stored or downloaded
DOWNLOAD: bool = True  # download a missing dataset (needs the internet)
TRAIN_SIZE: int = 5000  # training images the two landscape networks are trained on [> 0]
VAL_SIZE: int = 500  # training images held out; the feature maps show one of them [> 0]
GRADIENT_DEPTHS: tuple[int, ...] = (20, 56, 110)  # depths (6n+2) whose gradients are measured at init [>= 8]
GRADIENT_BATCH: int = 32  # images in the batch whose loss gradient is measured [> 0]
LANDSCAPE_DEPTH: int = 20  # depth (6n+2) of the plain and residual network whose loss landscape is drawn [>= 8]
TRAIN_STEPS: int = 100  # SGD steps per landscape network [> 0]
BATCH_SIZE: int = 32  # images per SGD step [> 0]
LR: float = 0.1  # peak learning rate (He et al. 2015's CIFAR value), after a linear warm-up [> 0]
WARMUP_STEPS: int = 10  # steps of linear learning-rate warm-up [>= 0]
PRECISION: str = "auto"  # autocast dtype for training only (the landscape is fp32) [auto | fp32 | bf16 | fp16]
BN_RECALIBRATION_BATCHES: int = 20  # train-mode batches that re-estimate BN statistics after training [>= 0]
GRID_POINTS: int = 9  # landscape grid points per axis (odd, so that the trained weights are a grid point) [>= 3]
GRID_RADIUS: float = 1.0  # the grid spans [-r, r] along both filter-normalised directions [> 0]
LOSS_IMAGES: int = 256  # training images the loss at each grid point is averaged over [> 0]
SUMMARY_RADIUS: float = 0.5  # radius of the circle on which the loss rise is measured [> 0]
DIRECTION_PAIRS: int = 3  # random direction pairs per net; the first is drawn, all give an upward-curving share [> 0]
FEATURE_CHANNELS: int = 4  # feature maps shown per stage [> 0]
RESIDUAL_CHECKPOINT: Path = ""  # optional state_dict (.pt) of cifar_resnet(LANDSCAPE_DEPTH) to use instead of training
PLAIN_CHECKPOINT: Path = ""  # optional state_dict (.pt) of cifar_resnet(LANDSCAPE_DEPTH, plain=True)
# --- end constants -----------------------------------------------------------------------------------

EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: {"gradient_depths": (20, 56, 110, 218)},
    2: {"grid_radius": 0.5, "grid_points": 11, "summary_radius": 0.25},
    3: {"landscape_depth": 32},
    4: "in filter_normalized_direction, delete the line `d = d * scale.view(...)`; then run with no flags",
}

FULL_OVERRIDES = {
    "train_size": 45000,
    "landscape_depth": 56,
    "train_steps": 6000,
    "batch_size": 128,
    "warmup_steps": 200,
    "grid_points": 51,
    "loss_images": 10000,
    "gradient_batch": 128,
}
OUTPUT_FILES = ("results.json", "gradient_flow.png", "loss_landscape.png", "architecture.png", "feature_evolution.png")
LOSS_COLOUR_CAP = 10.0  # Li et al.'s plot_2D.py draws contours up to a loss of 10; higher values are clipped


helpers.config(globals(), {})  # the values main() starts from (a notebook shows them)


# %% Lesson 02's blocks and CIFAR ResNet and lesson 03's training recipe, repeated here in compact form (only what
# this lesson uses) so that it stands alone; tests/test_standalone.py proves each copy equal to its original.
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


class PlainBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv(in_channels, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3), nn.BatchNorm2d(width)

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # F(x) = BN(W2 * relu(BN(W1 * x)))
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # (B, C_in, H, W) -> (B, w, H/s, W/s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x))


class BasicBlock(PlainBlock):
    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, width, stride)
        changes = stride != 1 or in_channels != width
        self.downsample = make_shortcut(in_channels, width, stride) if changes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.branch(x) + shortcut)  # y = relu(F(x, {W_i}) + x)  (Eq. 1)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (the stride here: "v1.5"), 1x1 expand to 4w."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, make_shortcut=projection_shortcut):
        nn.Module.__init__(self)
        self.conv1, self.bn1 = conv(in_channels, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, 4 * width, 1), nn.BatchNorm2d(4 * width)
        changes = stride != 1 or in_channels != 4 * width
        self.downsample = make_shortcut(in_channels, 4 * width, stride) if changes else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # (B, C_in, H, W) -> (B, w, H/s, W/s)
        return self.bn3(self.conv3(out))  # -> (B, 4w, H/s, W/s)


def make_stage(make_block, in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = []
    for index in range(num_blocks):
        blocks.append(make_block(in_channels, width, stride if index == 0 else 1))
        in_channels = width * blocks[-1].expansion
    return nn.Sequential(*blocks)


class CifarResNet(nn.Module):
    """He et al. 2015, section 4.2: a 3x3 conv with 16 filters, three stages of n blocks at 16, 32, 64 filters
    (option A shortcuts), global average pooling and a linear layer: 6n + 2 weighted layers. `plain=True` removes
    every shortcut."""

    def __init__(self, depth: int, num_classes: int = 10, plain: bool = False):
        super().__init__()
        n = (depth - 2) // 6
        make_block = PlainBlock if plain else functools.partial(BasicBlock, make_shortcut=ShortcutA)
        self.conv1, self.bn1 = conv(3, 16, 3), nn.BatchNorm2d(16)
        self.layer1 = make_stage(make_block, 16, 16, n, stride=1)
        self.layer2 = make_stage(make_block, 16, 32, n, stride=2)
        self.layer3 = make_stage(make_block, 32, 64, n, stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, num_classes)
        for module in self.modules():  # He et al.'s init, as torchvision applies it
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, 16, 32, 32)
        return self.layer3(self.layer2(self.layer1(x)))  # -> (B, 64, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))  # (B, 64, 8, 8) -> (B, 64) -> (B, K)


def cifar_resnet(depth: int, num_classes: int = 10, plain: bool = False) -> CifarResNet:
    return CifarResNet(depth, num_classes, plain)


# Lesson 03's training recipe (He et al. 2015, section 4.2), repeated here without the options this lesson does not use
# (channels-last, gradient hooks, a constant warm-up rate), so that this lesson stands alone.
def sgd_train(model, data, *, steps, batch_size, lr, device, generator, lr_milestones=(), warmup_steps=0,
              amp_dtype=None, augment=False, desc="train") -> list[dict]:  # fmt: skip
    """SGD (momentum 0.9, weight decay 1e-4) for `steps` mini-batches: a linear warm-up over `warmup_steps`, then the
    learning rate divided by 10 at each milestone. One record per step: loss, error and learning rate."""
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


# %% Gradient flow at initialisation
def without_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by an identity, keeping everything else (weights, initialisation)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            without_batch_norm(child)
    return model


def layer_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Root-mean-square of dL/dW for every convolution and the classifier, from input to output.

    RMS rather than the norm, so that a 16-channel and a 64-channel layer are compared per weight."""
    model.train()  # BN at initialisation normalises with the batch's own statistics, as in training
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    rows = []
    for index, (name, layer) in enumerate(helpers.weighted_layers(model), start=1):
        grad = layer.weight.grad
        rms = grad.pow(2).mean().sqrt().item() if grad is not None else float("nan")
        rows.append({"layer": index, "name": name, "grad_rms": rms})
    return rows


def gradient_flow(depths, images: torch.Tensor, labels: torch.Tensor, seed: int) -> list[dict]:
    """Per-layer gradients of plain and residual CIFAR nets at initialisation, with and without BN."""
    runs = []
    for depth in depths:
        for batch_norm in (True, False):
            for plain in (True, False):
                torch.manual_seed(seed)  # the same initial weights for plain and residual
                model = cifar_resnet(depth, plain=plain).to(images.device)  # where the images are: CPU, GPU or MPS
                if not batch_norm:
                    without_batch_norm(model)
                layers = layer_gradients(model, images, labels)
                runs.append({"depth": depth, "plain": plain, "batch_norm": batch_norm, "layers": layers})
    return runs


def gradient_table(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        grads = [layer["grad_rms"] for layer in run["layers"]]
        first, last = grads[0], grads[-2]  # first and last convolution (grads[-1] is the classifier)
        rows.append({"depth": run["depth"], "net": "plain" if run["plain"] else "residual",
                     "BN": "yes" if run["batch_norm"] else "no", "first_conv": first, "last_conv": last,
                     "first/last": first / last if last > 0 else float("inf"), "min": min(grads), "max": max(grads)})  # fmt: skip
    return rows


# Gradient RMS of each layer of an 8-layer residual net at initialisation, on 4 random images.
torch.manual_seed(0)
helpers.format_table(layer_gradients(cifar_resnet(8), torch.randn(4, 3, 32, 32), torch.arange(4)))


# %% Filter-normalised directions and the loss surface (Li et al. 2018)
# Why filter normalisation. A ReLU network with batch norm computes the same function when the weights of
# one filter are multiplied by any positive number, so "a step of size 1 along a random direction" means
# nothing by itself: it is a small step for a filter with large weights and a huge one for a filter with
# small weights, and two networks (or two layers) cannot be compared. Li et al. 2018 ("Visualizing the
# Loss Landscape of Neural Nets", section 4) draw a Gaussian direction d and rescale each filter of it to
# the norm of the matching filter of the trained weights theta:
#     d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}||      (i: layer, j: filter)
# so that alpha = 1 perturbs every filter by as much as its own size. A "filter" is one output unit: one
# slice along the first dimension of a convolution or linear weight. Biases and BN scale/shift are left
# out (direction 0), as the authors' code does with `--xignore biasbn` (net_plotter.py zeroes every
# parameter with dim <= 1). The surface is f(alpha, beta) = L(theta + alpha d1 + beta d2).
def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction, a tensor per parameter of `model`, filter-normalised (Li et al. 2018, sec. 4)."""
    direction = []
    for weight in model.parameters():
        d = torch.randn(weight.shape, generator=generator).to(weight.device)
        if weight.dim() <= 1:  # bias, BN scale gamma or shift beta: not perturbed
            d.zero_()
        else:
            filter_norms = weight.detach().flatten(1).norm(dim=1)  # (C_out,) ||theta_{i,j}||
            direction_norms = d.flatten(1).norm(dim=1)  # (C_out,) ||d_{i,j}||
            scale = filter_norms / (direction_norms + 1e-10)
            d = d * scale.view(-1, *([1] * (d.dim() - 1)))  # d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||theta_{i,j}||
        direction.append(d)
    return direction


# How batch norm is evaluated at a perturbed point. The authors' evaluation.py puts the network in eval
# mode (`net.eval()`) before computing the loss at each grid point, so every perturbed network uses the
# running mean and variance stored with the trained weights, unchanged: BN does not re-normalise away the
# perturbation. We do the same. Their networks were trained for 300 epochs, so those stored statistics
# match the trained weights; after a short run at lr 0.1 they may lag behind (the run prints the loss with
# the stored and with the re-estimated statistics), so we re-estimate them once, at the centre, with
# train-mode passes over training images; then they stay fixed for the whole grid, as in the paper.
@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Cross-entropy averaged over all images of `batches`, in eval mode (stored BN statistics), fp32."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        count += len(y)
    return total / count


@torch.no_grad()
def loss_surface(
    model: nn.Module, directions: tuple[list[torch.Tensor], list[torch.Tensor]], coords: np.ndarray, batches
) -> np.ndarray:
    """f(alpha, beta) = L(theta + alpha d1 + beta d2) on the grid coords x coords; rows are beta, columns
    alpha. The model's own weights are restored afterwards."""
    params = list(model.parameters())
    centre = [p.detach().clone() for p in params]
    d1, d2 = directions
    surface = np.zeros((len(coords), len(coords)))
    cells = [(i, j) for i in range(len(coords)) for j in range(len(coords))]
    try:
        for i, j in helpers.Progress(cells, "loss grid", unit="pt"):
            beta, alpha = float(coords[i]), float(coords[j])
            for p, theta, a, b in zip(params, centre, d1, d2):
                p.copy_(theta + alpha * a + beta * b)  # theta + alpha d1 + beta d2
            surface[i, j] = mean_loss(model, batches)
    finally:
        for p, theta in zip(params, centre):
            p.copy_(theta)
    return surface


def circle_mean(coords: np.ndarray, surface: np.ndarray, radius: float, points: int = 64) -> float:
    """Mean of the surface on a circle of `radius` around the centre, by bilinear interpolation."""
    step = coords[1] - coords[0]
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    values = []
    for x, y in zip(radius * np.cos(angles), radius * np.sin(angles)):
        fx, fy = (x - coords[0]) / step, (y - coords[0]) / step  # fractional column and row
        j, i = min(int(fx), len(coords) - 2), min(int(fy), len(coords) - 2)
        tx, ty = fx - j, fy - i
        top = (1 - tx) * surface[i, j] + tx * surface[i, j + 1]
        bottom = (1 - tx) * surface[i + 1, j] + tx * surface[i + 1, j + 1]
        values.append((1 - ty) * top + ty * bottom)
    return float(np.mean(values))


def upward_curving_share(coords: np.ndarray, surface: np.ndarray) -> float:
    """Share of interior grid points where this 2-D slice curves upward in every direction: its
    finite-difference 2x2 Hessian is positive semi-definite. A simple reading of one slice, not Li et al.'s
    measure: they map |lambda_min / lambda_max| of the full Hessian (sec. 6). Downward curvature in the
    slice implies a negative eigenvalue of the full Hessian too (the slice's Hessian is P^T H P); upward
    curvature in the slice says nothing about the directions the slice leaves out."""
    h = coords[1] - coords[0]
    f = surface
    f_xx = (f[1:-1, 2:] - 2 * f[1:-1, 1:-1] + f[1:-1, :-2]) / h**2  # d2f/dalpha2
    f_yy = (f[2:, 1:-1] - 2 * f[1:-1, 1:-1] + f[:-2, 1:-1]) / h**2  # d2f/dbeta2
    f_xy = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / (4 * h**2)
    tolerance = 1e-9 * max(1.0, float(np.abs(f).max())) / h**2  # round-off of a flat region is not curvature
    upward = (f_xx >= -tolerance) & (f_yy >= -tolerance) & (f_xx * f_yy - f_xy**2 >= -(tolerance**2))
    return float(upward.mean())


def compare_shares(plain: list[float], residual: list[float]) -> dict:
    """Does "the residual slice curves upward at more grid points" hold across direction pairs? It holds
    when every pair gives the same sign and the mean difference exceeds the spread between pairs."""
    differences = [r - p for p, r in zip(plain, residual)]
    mean = float(np.mean(differences))
    spread = float(np.ptp(differences)) if len(differences) > 1 else float("inf")
    same_sign = all(d > 0 for d in differences) or all(d < 0 for d in differences)
    return {"differences": differences, "mean_difference": mean, "spread": spread,
            "holds": bool(same_sign and abs(mean) > spread)}  # fmt: skip


def summarize_surface(coords: np.ndarray, surface: np.ndarray, radius: float) -> dict:
    """The numbers printed beside the landscape, all read off the grid."""
    centre = len(coords) // 2
    centre_loss = float(surface[centre, centre])
    return {"centre_loss": centre_loss, "min_loss": float(surface.min()),
            "rise_at_radius": circle_mean(coords, surface, radius) - centre_loss,
            "max_rise": float(surface.max()) - centre_loss,
            "upward_curving_share": upward_curving_share(coords, surface)}  # fmt: skip


# Filter by filter, a filter-normalised direction has the norm of the weights it perturbs.
example_layer = nn.Conv2d(3, 4, kernel_size=3)
direction = filter_normalized_direction(example_layer, torch.Generator().manual_seed(0))
torch.stack(
    [example_layer.weight.detach().flatten(1).norm(dim=1), direction[0].flatten(1).norm(dim=1)]
)  # (2, C_out): equal rows


# %% Training (or loading) the two landscape networks
def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict, or a checkpoint dict holding one under "model", into `model`."""
    file = Path(path)
    helpers.require(file.is_file(), f"checkpoint {path} does not exist (check the path, or leave it empty to train)")
    try:
        with warnings.catch_warnings():  # a plain pickle makes torch warn before it refuses: the refusal is enough
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise helpers.UserError(
            f"cannot load {path}: {helpers.error_summary(error)} (pass a state_dict file)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise helpers.UserError(
            f"{path} does not hold weights of this network: {helpers.error_summary(error)} "
            "(pass weights of the same depth and kind, or leave the flag empty to train)"
        ) from None
    bad = [name for name, x in model.state_dict().items() if x.is_floating_point() and not torch.isfinite(x).all()]
    diverged = f"{path} holds NaN or infinity in {len(bad)} tensors, e.g. {bad[0] if bad else ''}"
    helpers.require(not bad, f"{diverged} (pass weights of a run that did not diverge)")


def landscape_network(cfg, data: helpers.ImageData, plain: bool, device, amp_dtype) -> tuple[nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    model = cifar_resnet(cfg.landscape_depth, num_classes=data.num_classes, plain=plain).to(device)
    checkpoint = cfg.plain_checkpoint if plain else cfg.residual_checkpoint
    if checkpoint:
        load_weights(model, checkpoint)
        return model.to(device), {"source": checkpoint, "final_train_loss": np.nan, "final_train_error": np.nan}
    history = sgd_train(model, data, steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                        warmup_steps=cfg.warmup_steps, lr_milestones=(cfg.train_steps // 2, cfg.train_steps * 3 // 4),
                        device=device, generator=torch.Generator().manual_seed(cfg.seed), amp_dtype=amp_dtype,
                        augment=cfg.full, desc="plain" if plain else "residual")  # fmt: skip
    tail = max(1, len(history) // 10)
    return model, {"source": f"trained here for {cfg.train_steps} steps",
                   "final_train_loss": float(np.mean([h["loss"] for h in history[-tail:]])),
                   "final_train_error": float(np.mean([h["error"] for h in history[-tail:]]))}  # fmt: skip


# The two landscape networks have the same layers and parameters; only the shortcuts differ.
{kind: f"{helpers.count_parameters(cifar_resnet(LANDSCAPE_DEPTH, plain=kind == 'plain')):,} parameters"
 for kind in ("plain", "residual")}  # fmt: skip


# %% Feature maps after the stem and each stage
@torch.no_grad()
def stage_features(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Activations of one image after the stem and after each stage: the CIFAR net's forward_features."""
    model.eval()
    out = [("input", x)]
    x = F.relu(model.bn1(model.conv1(x)))  # (1, 3, 32, 32) -> (1, 16, 32, 32)
    out.append(("stem", x))
    for name in ("layer1", "layer2", "layer3"):
        x = getattr(model, name)(x)  # layer1 keeps 32x32; layer2 -> (1, 32, 16, 16); layer3 -> (1, 64, 8, 8)
        out.append((name, x))
    return out


def feature_table(features: list[tuple[str, torch.Tensor]]) -> list[dict]:
    rows = []
    for name, x in features[1:]:
        _, channels, height, width = x.shape
        rows.append({"stage": name, "channels": channels, "size": f"{height}x{width}", "mean": x.mean().item(),
                     "zero_share": (x == 0).float().mean().item(),
                     "dead_channels": int((x.flatten(2).amax(2) == 0).sum().item())})  # fmt: skip
    return rows


# The feature maps of an untrained 8-layer net on one random image, stage by stage.
helpers.format_table(feature_table(stage_features(cifar_resnet(8).eval(), torch.randn(1, 3, 32, 32))))


# %% Block diagrams, with shapes measured on the real blocks
def block_shapes(block: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape (C, H, W) of every submodule of `block` for input x, from forward hooks."""
    shapes, hooks = {}, []

    def record(module, inputs, output, name):  # returns None: a hook that returns a value replaces the output
        shapes.setdefault(name, tuple(output.shape[1:]))

    for name, module in block.named_modules():
        if name:
            hooks.append(module.register_forward_hook(functools.partial(record, name=name)))
    with torch.no_grad():
        shapes["output"] = tuple(block.eval()(x).shape[1:])
    for hook in hooks:
        hook.remove()
    shapes["input"] = tuple(x.shape[1:])
    return shapes


def architecture_specs() -> list[dict]:
    """What each diagram draws: a list of layers (label, shape) on the branch, and the shortcut."""

    def fmt(shape) -> str:
        return "x".join(str(s) for s in shape)

    basic = block_shapes(BasicBlock(64, 64), torch.zeros(1, 64, 56, 56))
    bottleneck = block_shapes(Bottleneck(256, 64), torch.zeros(1, 256, 56, 56))
    return [
        {
            "title": "basic block\n(He et al. 2015, Fig. 2)",
            "input": fmt(basic["input"]),
            "branch": [
                ("3x3 conv, 64", fmt(basic["conv1"])),
                ("batch norm", fmt(basic["bn1"])),
                ("ReLU", fmt(basic["bn1"])),
                ("3x3 conv, 64", fmt(basic["conv2"])),
                ("batch norm", fmt(basic["bn2"])),
            ],
            "after_add": [("ReLU", fmt(basic["output"]))],
            "skip": "identity x",
        },
        {
            "title": "bottleneck block\n(He et al. 2015, Fig. 5)",
            "input": fmt(bottleneck["input"]),
            "branch": [
                ("1x1 conv, 64", fmt(bottleneck["conv1"])),
                ("BN, ReLU", fmt(bottleneck["bn1"])),
                ("3x3 conv, 64", fmt(bottleneck["conv2"])),
                ("BN, ReLU", fmt(bottleneck["bn2"])),
                ("1x1 conv, 256", fmt(bottleneck["conv3"])),
                ("batch norm", fmt(bottleneck["bn3"])),
            ],
            "after_add": [("ReLU", fmt(bottleneck["output"]))],
            "skip": "identity x",
        },
        {  # the same convolutions as the basic block, reordered: shapes as measured there
            "title": "pre-activation block\n(He et al. 2016, Fig. 4e)",
            "input": fmt(basic["input"]),
            "branch": [
                ("batch norm", fmt(basic["input"])),
                ("ReLU", fmt(basic["input"])),
                ("3x3 conv, 64", fmt(basic["conv1"])),
                ("batch norm", fmt(basic["bn1"])),
                ("ReLU", fmt(basic["bn1"])),
                ("3x3 conv, 64", fmt(basic["conv2"])),
            ],
            "after_add": [],
            "skip": "identity x\n(clean path)",
        },
    ]


# The shapes a bottleneck's branch goes through on an 8x8 map with 256 channels.
block_shapes(Bottleneck(256, 64).eval(), torch.randn(1, 256, 8, 8))


# %% Figures
LAYER_COLOURS = {"conv": "#cfe2f3", "batch": "#fce5cd", "BN": "#fce5cd", "ReLU": "#d9ead3"}


def plot_architecture(specs: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyBboxPatch

    fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 8.5))
    for ax, spec in zip(axes, specs):
        boxes = [("input", spec["input"])] + spec["branch"]
        step, width, height = 1.0, 2.2, 0.62
        top = len(boxes) + len(spec["after_add"]) + 1.5
        ax.set_xlim(-2.2, 2.6)
        ax.set_ylim(-0.8, top + 0.8)
        ax.axis("off")
        ax.set_title(spec["title"], fontsize=11)

        def box(y, label, shape, ax=ax, width=width, height=height):
            colour = next((c for key, c in LAYER_COLOURS.items() if key in label), "#eeeeee")
            corner = (-width / 2, y - height / 2)
            ax.add_patch(FancyBboxPatch(corner, width, height, boxstyle="round,pad=0.03", fc=colour, ec="black"))
            ax.text(0, y + 0.09, label, ha="center", va="center", fontsize=9.5, weight="bold")
            ax.text(0, y - 0.16, shape, ha="center", va="center", fontsize=8, family="monospace")

        def arrow(y_from, y_to, ax=ax):
            ax.annotate("", xy=(0, y_to), xytext=(0, y_from), arrowprops={"arrowstyle": "->", "lw": 1.2})

        y = top
        for k, (label, shape) in enumerate(boxes):
            box(y, label if k else "input x", shape)
            if k:
                arrow(y + step - height / 2, y + height / 2)
            y -= step
        add_y = y + step - height / 2 - 0.45
        arrow(y + step - height / 2, add_y + 0.22)
        ax.add_patch(Circle((0, add_y), 0.22, fc="white", ec="black", lw=1.2))
        ax.text(0, add_y, "+", ha="center", va="center", fontsize=14, weight="bold")
        # the skip path: leaves the input box, runs down the side, enters the addition
        skip_x = 1.6
        ax.plot([width / 2, skip_x, skip_x], [top, top, add_y], color="#cc0000", lw=2)
        red_arrow = {"arrowstyle": "->", "lw": 2, "color": "#cc0000"}
        ax.annotate("", xy=(0.22, add_y), xytext=(skip_x, add_y), arrowprops=red_arrow)
        ax.text(skip_x + 0.08, (top + add_y) / 2, spec["skip"], color="#cc0000", fontsize=9, rotation=90, va="center")
        ax.text(-0.3, add_y, "F(x) + x", ha="right", va="center", fontsize=9)
        y = add_y - 0.45 - height / 2
        previous = add_y - 0.22
        for label, shape in spec["after_add"]:
            arrow(previous, y + height / 2)
            box(y, label, shape)
            previous, y = y - height / 2, y - step
        arrow(previous, previous - 0.4)
        ax.text(0, previous - 0.55, "output (C x H x W)", ha="center", va="top", fontsize=9)
    fig.suptitle("Residual blocks: branch F(x) in the middle, skip path in red (shapes C x H x W)", fontsize=12)
    fig.tight_layout()
    return helpers.save_figure(fig, path)


def plot_gradient_flow(runs: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    depths = sorted({run["depth"] for run in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(depths)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, batch_norm in zip(axes, (True, False)):
        for run in runs:
            if run["batch_norm"] != batch_norm:
                continue
            colour = colours[depths.index(run["depth"])]
            grads = [layer["grad_rms"] for layer in run["layers"]]
            label = f"{'plain' if run['plain'] else 'residual'}-{run['depth']}"
            ax.plot(range(1, len(grads) + 1), grads, color=colour, ls="--" if run["plain"] else "-",
                    lw=1.3 if run["plain"] else 1.8, label=label)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("weighted layer (1 = first convolution, last = classifier)")
        ax.set_title(f"{'with' if batch_norm else 'without'} batch norm")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    axes[0].set_ylabel("RMS of dL/dW (log scale)")
    fig.suptitle("Gradient per layer at initialisation: plain (dashed) vs residual (solid)")
    fig.tight_layout()
    return helpers.save_figure(fig, path)


def plot_landscapes(coords: np.ndarray, surfaces: dict[str, np.ndarray], summaries: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib import colors as mcolors

    low = min(float(s.min()) for s in surfaces.values())
    high = min(max(float(s.max()) for s in surfaces.values()), LOSS_COLOUR_CAP)
    high = max(high, low + 1e-3)
    norm = mcolors.Normalize(vmin=low, vmax=high)  # one colour scale for all four panels
    levels = np.linspace(low, high, 21)
    alpha, beta = np.meshgrid(coords, coords)
    fig = plt.figure(figsize=(12, 5.2 * len(surfaces)))
    for row, (name, surface) in enumerate(surfaces.items()):
        clipped = np.minimum(surface, high)
        summary = summaries[name]
        ax = fig.add_subplot(len(surfaces), 2, 2 * row + 1)
        filled = ax.contourf(alpha, beta, clipped, levels=levels, cmap="viridis", norm=norm, extend="max")
        ax.contour(alpha, beta, clipped, levels=levels, colors="white", linewidths=0.4)
        ax.plot(0, 0, "r+", ms=12, mew=2)
        ax.add_patch(plt.Circle((0, 0), summary["radius"], fill=False, ls=":", color="red"))
        ax.set_aspect("equal")
        ax.set_xlabel("alpha (direction d1)")
        ax.set_ylabel("beta (direction d2)")
        ax.set_title(
            f"{name}: contours; rise at r={summary['radius']:g}: {summary['rise_at_radius']:.2f}, "
            f"curving up {summary['upward_curving_share']:.0%}",
            fontsize=10,
        )
        fig.colorbar(filled, ax=ax, label="training loss")
        ax3d = fig.add_subplot(len(surfaces), 2, 2 * row + 2, projection="3d")
        ax3d.plot_surface(alpha, beta, clipped, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
        ax3d.set_zlim(low, high)
        edge = float(coords[-1])  # the grid's radius: few ticks, so that the axis names stay clear of them
        ax3d.set(xticks=[-edge, 0, edge], yticks=[-edge, 0, edge])
        ax3d.set_xlabel("alpha")
        ax3d.set_ylabel("beta")
        ax3d.set_zlabel("loss")
        ax3d.set_title(f"{name}: surface (clipped at {high:.2f})", fontsize=10)
    fig.suptitle("Loss L(theta + alpha d1 + beta d2) around the trained weights, filter-normalised directions")
    fig.tight_layout(h_pad=2.5)
    return helpers.save_figure(fig, path)


def plot_features(features: list[tuple[str, torch.Tensor]], channels: int, mean, std, path: Path) -> Path:
    import matplotlib.pyplot as plt

    stages = features[1:]
    fig, axes = plt.subplots(len(stages), channels + 1, figsize=(2.1 * (channels + 1), 2.3 * len(stages)))
    image = features[0][1][0].cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    for row, (name, x) in enumerate(stages):
        _, num_channels, height, width = x.shape
        first = axes[row, 0]
        if row == 0:
            first.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
            first.set_title("input 3ch, 32x32", fontsize=9)
        first.axis("off")
        shown = x[0].flatten(1).var(dim=1).argsort(descending=True)[:channels]  # the most varied maps
        for col, channel in enumerate(shown.tolist(), start=1):
            ax = axes[row, col]
            ax.imshow(x[0, channel].cpu().numpy(), cmap="magma")
            ax.set_title(f"{name} ch {channel}\n{num_channels}ch, {height}x{width}", fontsize=8)
            ax.axis("off")
    fig.suptitle("Feature maps of the trained residual network (most varied channels of each stage)")
    fig.tight_layout()
    return helpers.save_figure(fig, path)


# In a notebook, the block diagrams (a command-line run draws them in main).
if helpers.in_notebook():
    plot_architecture(
        architecture_specs(), helpers.output_dir(helpers.config(globals(), {}), *OUTPUT_FILES) / "architecture.png"
    )


# %% The run
@helpers.constants_as_keywords
def main(**overrides):
    """The four parts of "What you will learn", in order; saves results.json and four figures in `out`."""
    cfg = helpers.config(globals(), overrides, FULL_OVERRIDES)
    for depth in (*cfg.gradient_depths, cfg.landscape_depth):
        helpers.require((depth - 2) % 6 == 0, f"depth {depth} is not 6n+2 (use 8, 20, 32, 56, 110)")
    helpers.require(cfg.grid_points % 2 == 1, "--grid-points must be odd (the trained weights sit at the centre)")
    step = 2 * cfg.grid_radius / (cfg.grid_points - 1)
    between = f"between one grid step ({step:g}) and the radius minus one step"
    helpers.require(step <= cfg.summary_radius <= cfg.grid_radius - step, f"--summary-radius must lie {between}")
    for flag, path, plain in (("residual", cfg.residual_checkpoint, False), ("plain", cfg.plain_checkpoint, True)):
        missing = f"--{flag}-checkpoint {path} is not a file (check the path, or leave it empty to train)"
        helpers.require(not path or Path(path).is_file(), missing)
        if path:  # loaded once now, so that a file that does not fit fails before the minutes of work
            load_weights(cifar_resnet(cfg.landscape_depth, 100 if cfg.dataset == "cifar100" else 10, plain=plain), path)
    helpers.require_memory(4 * 16 * 16 * 32 * 32 * cfg.loss_images, "--loss-images")  # one batch of activations
    depth = max(*cfg.gradient_depths, cfg.landscape_depth)  # a training step keeps ~3 (B, 16, 32, 32) maps per layer
    batch = max(cfg.gradient_batch, cfg.batch_size)
    helpers.require_memory(4 * 3 * batch * 16 * 32 * 32 * depth, "--gradient-depths/--landscape-depth x batch size")
    started = time.perf_counter()
    generator = helpers.seed_everything(cfg.seed)
    device = helpers.pick_device(cfg.device)
    out = helpers.output_dir(cfg, *OUTPUT_FILES)
    helpers.use_headless_matplotlib()
    data = helpers.load_data(cfg, test_size=1).to(device)
    print(f"device {device}, dataset {data.name}: {len(data.train_x)} training images")
    results = {"dataset": data.name, "gradient_flow": gradients_across_layers(cfg, data, generator, out)}
    results["landscape"], residual = loss_landscapes(cfg, data, generator, device, out)
    results["architecture"] = block_diagrams(out)
    results["features"] = feature_maps(cfg, data, residual, out)
    helpers.save_results(out, results, cfg, device, started)
    print(f"\nfigures and results.json in {out}/ ({time.perf_counter() - started:.0f} s)")
    return results


def gradients_across_layers(cfg, data: helpers.ImageData, generator: torch.Generator, out: Path) -> dict:
    """Part 1: the gradient of every layer at initialisation, plain and residual, with and without BN."""
    index = torch.randperm(len(data.train_x), generator=generator)[: cfg.gradient_batch].to(data.train_x.device)
    images = helpers.normalize(data.train_x[index], data.mean, data.std)
    runs = gradient_flow(cfg.gradient_depths, images, data.train_y[index], cfg.seed)
    table = gradient_table(runs)
    columns = "depth:d net BN first_conv:.2e last_conv:.2e first/last:.2e min:.2e max:.2e"
    print("\n" + helpers.format_table(table, columns, "Gradient RMS per layer at initialisation (one batch)"))
    plot_gradient_flow(runs, out / "gradient_flow.png")
    return {"summary": table, "runs": runs}


def loss_landscapes(cfg, data, generator: torch.Generator, device, out: Path) -> tuple[dict, nn.Module]:
    """Part 2: Li et al.'s filter-normalised landscape of a trained plain and residual network; returns the
    numbers and the trained residual network."""
    amp_dtype = helpers.autocast_dtype(device, cfg.precision)
    loss_index = torch.randperm(len(data.train_x), generator=generator)[: cfg.loss_images].to(device)
    loss_x = helpers.normalize(data.train_x[loss_index], data.mean, data.std)
    loss_y = data.train_y[loss_index]
    loss_batches = [(loss_x[s : s + 500], loss_y[s : s + 500]) for s in range(0, len(loss_y), 500)]
    calibration = helpers.training_batches(data, cfg.bn_recalibration_batches, cfg.batch_size, device, generator)
    coords = np.linspace(-cfg.grid_radius, cfg.grid_radius, cfg.grid_points)
    surfaces, summaries, networks, models = {}, {}, {}, {}
    for plain in (True, False):
        name = f"{'plain' if plain else 'residual'}-{cfg.landscape_depth}"
        model, info = landscape_network(cfg, data, plain, device, amp_dtype)
        info["eval_loss_stored_bn"] = mean_loss(model, loss_batches)
        helpers.recalibrate_batch_norm(model, calibration)
        info["eval_loss_recalibrated_bn"] = mean_loss(model, loss_batches)
        direction_generator = torch.Generator().manual_seed(cfg.seed + 1)  # same seed for both networks
        shares = []
        for pair in range(cfg.direction_pairs):  # pair 0 is the one drawn; the others test the share's noise
            directions = [filter_normalized_direction(model, direction_generator) for _ in range(2)]
            surface = loss_surface(model, directions, coords, loss_batches)
            shares.append(upward_curving_share(coords, surface))
            if pair == 0:
                surfaces[name] = surface
        summaries[name] = summarize_surface(coords, surfaces[name], cfg.summary_radius)
        summaries[name] |= {"radius": cfg.summary_radius, "upward_curving_shares": shares}
        networks[name], models[name] = info, model
    title = "Landscape networks (loss on the landscape's training images, eval mode)"
    columns = "net source final_train_loss:.3f eval_loss_stored_bn:.3f eval_loss_recalibrated_bn:.3f"
    print("\n" + helpers.format_table([{"net": name, **info} for name, info in networks.items()], columns, title))
    title = (f"Loss landscape on a {cfg.grid_points}x{cfg.grid_points} grid over [-{cfg.grid_radius:g}, "
             f"{cfg.grid_radius:g}]^2 (rise: mean loss on the circle r={cfg.summary_radius:g} minus centre loss)")  # fmt: skip
    columns = "net centre_loss:.3f min_loss:.3f rise_at_radius:.3f max_rise:.3f upward_curving_share:.2f"
    print("\n" + helpers.format_table([{"net": name, **s} for name, s in summaries.items()], columns, title))
    plain_name, residual_name = (f"{kind}-{cfg.landscape_depth}" for kind in ("plain", "residual"))
    plain_summary, residual_summary = summaries[plain_name], summaries[residual_name]
    for key, text in (("rise_at_radius", f"rise at r={cfg.summary_radius:g}"), ("max_rise", "highest rise")):
        ratio = plain_summary[key] / residual_summary[key] if residual_summary[key] > 0 else float("inf")
        print(f"{text}: plain {plain_summary[key]:.3f}, residual {residual_summary[key]:.3f} ({ratio:.2f}x)")
    shares = {k: summaries[n]["upward_curving_shares"] for k, n in (("plain", plain_name), ("residual", residual_name))}
    comparison = compare_shares(shares["plain"], shares["residual"])
    verdict = "holds" if comparison["holds"] else "is within noise (the pairs disagree more than the nets differ)"
    print(
        "share of interior grid points where the slice curves upward in every direction, one per direction pair: "
        f"plain {', '.join(f'{v:.0%}' for v in shares['plain'])}; "
        f"residual {', '.join(f'{v:.0%}' for v in shares['residual'])}. "
        f"Residual minus plain: {comparison['mean_difference']:+.0%} on average; the difference {verdict}"
    )
    plot_landscapes(coords, surfaces, summaries, out / "loss_landscape.png")

    landscape = {"coords": coords, "networks": networks, "summaries": summaries, "surfaces": surfaces}
    landscape["training_precision"] = str(amp_dtype) if amp_dtype else "fp32"
    landscape["upward_curving_comparison"] = comparison
    return landscape, models[f"residual-{cfg.landscape_depth}"]


def block_diagrams(out: Path) -> list[dict]:
    """Part 3: the basic, bottleneck and pre-activation blocks drawn with their measured shapes."""
    specs = architecture_specs()
    for spec in specs:
        shapes = " -> ".join(shape for _, shape in spec["branch"])
        print(f"{spec['title'].splitlines()[0]}: input {spec['input']}, branch {shapes}")
    plot_architecture(specs, out / "architecture.png")
    return specs


def feature_maps(cfg, data: helpers.ImageData, residual: nn.Module, out: Path) -> dict:
    """Part 4: what the trained residual network computes, after the stem and after each stage."""
    image = helpers.normalize(data.val_x[:1], data.mean, data.std)
    features = stage_features(residual, image)
    rows = feature_table(features)
    label = data.classes[int(data.val_y[0])]
    title = f"Feature maps of one validation image (class {label}) in the trained residual network"
    print("\n" + helpers.format_table(rows, "stage channels:d size mean:.3f zero_share:.2f dead_channels:d", title))
    plot_features(features, cfg.feature_channels, data.mean, data.std, out / "feature_evolution.png")
    return {"label": label, "stages": rows}


if __name__ == "__main__":
    helpers.run_cli(main, globals())
