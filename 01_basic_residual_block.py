"""Lesson 01: the residual block, y = relu(F(x) + x), and what the "+ x" does to gradients.

What you will learn
    1. How a basic residual block is built (two 3x3 convolutions with batch norm, plus a shortcut), and the shape
       after every stage, including the stride-2 block that doubles the channels.
    2. Why a shortcut must still be added when widths change (a projection W_s x), and what goes wrong when code
       adds it only "when the shapes happen to match".
    3. How the gradient reaching the first layer of a deep stack compares with the one at its last layer, for
       plain and residual stacks, with and without batch norm, at initialisation.
    4. Where the "+1" comes from: the block's Jacobian is the branch's plus the identity, and a block whose last
       batch-norm scale is zero starts as the identity (torchvision's zero_init_residual).

Paper
    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385), 3.2:
        Eq. 1   y = F(x, {W_i}) + x          (identity shortcut, shapes match)
        Eq. 2   y = F(x, {W_i}) + W_s x      (projection shortcut, shapes differ)
    with F(x) = BN(W_2 * relu(BN(W_1 * x))) and a ReLU after the addition (Fig. 2).

Run
    python 01_basic_residual_block.py            # 8-12 s on 2 CPU cores, fp32 (no training: bf16 plays no part)
    python 01_basic_residual_block.py --help     # every constant below is a flag

What you should see (seed 0; tests/test_01_basic_residual_block.py keeps these true)
    * The trace of a 64 -> 128 channel, stride-2 block on a (32, 64, 56, 56) input: (32, 128, 28, 28) after conv1,
      the same from the 1x1 projection shortcut, and the sum.
    * Fully connected net on widths [128, 64, 32, 16, 8, 1]: the "when-shapes-match" version applies 0 of its 5
      shortcuts and is the plain net; with projections the first layer's mean |gradient| is 16x the plain net's.
    * Depth sweep, |dL/dx| at the input of N blocks over |dL/dx| at their output, at initialisation:
          default init, no BN:  plain 3e-7 at N=8, 0 (underflow) from N=32; residual 0.7 to 1.4 at every N
          He init, no BN:       plain 1e-3 at N=64; residual 7e9 at N=64 (each block adds a branch as big as x)
          batch norm:           plain GROWS, about 1e8 to 1e9 at N=64; residual about 50 at N=64
      Batch norm does not give a plain stack healthy gradients at initialisation: it turns vanishing into
      explosion. With batch norm the identity keeps the residual stack within a factor of about 50. depth_sweep.png plots it.
    * Jacobian: d(F(x) + x)/dx = dF/dx + I exactly (max difference 0.0 in float64); with the branch's last BN scale
      set to zero the block returns its input exactly (max |y - x| = 0).

Try this (`--exercise N` runs number N; answers/01_basic_residual_block.md answers each, with numbers)
    1. `--trace-stride 1 --trace-out-channels 64`: which shortcut does the trace show now, Eq. 1's or Eq. 2's?
    2. `--mlp-sizes 64 64 64 64 64 1`: how many of the 5 shortcuts fire in the "when-shapes-match" version?
    3. `--sweep-depths 64 128 256 --sweep-inits he --sweep-repeats 1`: which settings overflow or underflow
       float32 (inf, nan or 0)? Which grows slowest, and how fast?
    4. In `make_stack`, zero the last BN scale of every residual block (`nn.init.zeros_(block.bn2.weight)` before
       `blocks.append(block)`, as `zero_init_check` does): why is the residual + BN ratio now near sqrt(1/2)?
    5. Delete the ReLU after the addition in `ResidualBlock.forward` (half of lesson 04's pre-activation idea):
       which residual rows of the depth sweep change? (Undo it afterwards.)
"""

# %%
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for weights and inputs [>= 0, < 4294967296]
DEVICE: str = "cpu"  # where to run (the Jacobian check always runs on the CPU in float64) [auto | cpu | cuda | mps]
OUT: Path = "outputs/01_basic_residual_block"  # folder for results.json and depth_sweep.png
TRACE: bool = True  # print the shape after every stage of one block
TRACE_INPUT_SHAPE: tuple[int, ...] = (32, 64, 56, 56)  # (B, C, H, W) of the traced input: ResNet-34's conv3_1 [> 0]
TRACE_OUT_CHANNELS: int = 128  # output channels of the traced block [> 0]
TRACE_STRIDE: int = 2  # stride of the traced block (2 halves H and W) [> 0]
MLP_SIZES: tuple[int, ...] = (128, 64, 32, 16, 8, 1)  # layer widths of the fully connected example, input first [> 0]
MLP_BATCH_SIZE: int = 64  # samples in the fully connected example's batch [> 0]
SWEEP_DEPTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # blocks N in each stack of the depth sweep [> 0]
SWEEP_CHANNELS: int = 16  # channels of every block in the depth sweep [> 0]
SWEEP_SIDE: int = 8  # height and width of the depth sweep's input, in pixels [> 0]
SWEEP_BATCH_SIZE: int = 32  # images in the depth sweep's batch [> 0]
SWEEP_INITS: tuple[str, ...] = ("pytorch", "he")  # inits: nn.Conv2d's default or He's [pytorch | he]
SWEEP_REPEATS: int = 2  # random stacks per setting; the table shows their geometric mean [> 0]
JACOBIAN_CHANNELS: int = 3  # channels of the small block whose Jacobian is computed [> 0]
JACOBIAN_SIDE: int = 4  # height and width of its input (the Jacobian is (C*side*side)^2 entries) [> 0]
# --- end constants -----------------------------------------------------------------------------------

EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: {"trace_stride": 1, "trace_out_channels": 64},
    2: {"mlp_sizes": (64, 64, 64, 64, 64, 1)},
    3: {"sweep_depths": (64, 128, 256), "sweep_inits": ("he",), "sweep_repeats": 1},
    4: "in make_stack, add `nn.init.zeros_(block.bn2.weight)` for residual BN blocks, before blocks.append(block)",
    5: "in ResidualBlock.forward, return `self.branch(x) + self.shortcut(x)` (no ReLU after the addition)",
}

helpers.config(globals(), {})  # the values main() starts from (a notebook shows them)


# %% The blocks
def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1: keeps H and W when stride is 1, halves them when stride is 2.
    No bias: the batch norm that follows has its own shift, which would make a bias redundant."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """W_s x of He et al. 2015, Eq. 2: a strided 1x1 convolution plus batch norm, used only where the
    branch changes the shape, so that F(x) and the shortcut can be added. (The paper's option B.)"""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class PlainBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and ReLU, no shortcut: y = relu(F(x))."""

    expansion = 1  # output channels per `out_channels` (a bottleneck block has 4)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)  # the stride sits here, as in torchvision
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) = BN(W2 * relu(BN(W1 * x))). (B, C_in, H, W) -> (B, C_out, H/s, W/s)"""
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.bn2(self.conv2(out))  # (B, C_out, H/s, W/s), same shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x))  # y = relu(F(x))


class ResidualBlock(PlainBlock):
    """The basic residual block of He et al. 2015 (torchvision's `BasicBlock`): y = relu(F(x) + shortcut(x)).

    The shortcut is the identity when shapes match (Eq. 1) and `make_shortcut(in, out, stride)` when they
    do not (Eq. 2; a 1x1 projection by default). The attribute is called `downsample` because torchvision
    calls it so, which lets lesson 02 load torchvision's weights into blocks built from this class."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, out_channels, stride)
        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if shape_changes else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)  # x (Eq. 1) or W_s x (Eq. 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (He et al. 2015, Eq. 1)


# A stride-2 block that doubles the channels has a projection shortcut (`downsample`); print it to see its layers.
ResidualBlock(64, 128, stride=2)


# %% Trace: the block stage by stage
@torch.no_grad()
def trace_block(block: ResidualBlock, x: torch.Tensor) -> list[dict]:
    """Replay `block.forward` one stage at a time and record each stage's output shape. The replay uses the
    block's own layers and is checked against `block(x)`, so the trace cannot drift from the code."""
    rows = [{"stage": "input x", "shape": tuple(x.shape), "what": "B, C_in, H, W"}]

    def step(stage: str, what: str, value: torch.Tensor) -> torch.Tensor:
        rows.append({"stage": stage, "shape": tuple(value.shape), "what": what})
        return value

    out = step("branch conv1", f"3x3, stride {block.conv1.stride[0]}", block.conv1(x))
    out = step("branch bn1", "normalise per channel", block.bn1(out))
    out = step("branch relu", "", F.relu(out))
    out = step("branch conv2", "3x3, stride 1", block.conv2(out))
    branch = step("branch bn2 = F(x)", "", block.bn2(out))
    if block.downsample is None:
        shortcut = step("shortcut = x", "identity (Eq. 1)", x)
    else:
        conv, norm = block.downsample
        shortcut = step("shortcut conv", f"1x1, stride {conv.stride[0]}", conv(x))
        shortcut = step("shortcut bn = W_s x", "projection (Eq. 2)", norm(shortcut))
    total = step("add F(x) + shortcut", "elementwise", branch + shortcut)
    y = block(x)
    if torch.equal(y, F.relu(total)):
        step("relu = y", "block output", y)
    elif not torch.equal(y, total):  # equal to the sum: a forward edited to drop the last ReLU (Try this, 5)
        raise RuntimeError("trace_block no longer matches ResidualBlock.forward")
    return rows


def block_shapes(cfg: helpers.Config, device: torch.device) -> dict:
    """Part 1: build the block of TRACE_* and print the shape after every stage (when TRACE is on)."""
    batch, in_channels, height, width = cfg.trace_input_shape
    block = ResidualBlock(in_channels, cfg.trace_out_channels, cfg.trace_stride).to(device).eval()
    rows = trace_block(block, torch.randn(cfg.trace_input_shape, device=device))
    if cfg.trace:
        print(trace_table(rows, f"Trace: {block_name(block)} on a (B, C, H, W) = {tuple(cfg.trace_input_shape)} input"))
    return {"rows": rows, "has_projection": block.downsample is not None, "output_shape": list(rows[-1]["shape"])}


def block_name(block: ResidualBlock) -> str:
    return f"ResidualBlock({block.conv1.in_channels}, {block.conv2.out_channels}, stride={block.conv1.stride[0]})"


def trace_table(rows: list[dict], title: str) -> helpers.Table:
    rows = [{**r, "shape": " x ".join(map(str, r["shape"]))} for r in rows]
    return helpers.format_table(rows, [("stage", ""), ("shape", ""), ("what", "")], title)


# A small stride-2 block on one image (a notebook shows the table; a script computes it in milliseconds).
example = ResidualBlock(8, 16, stride=2).eval()
trace_table(trace_block(example, torch.randn(1, 8, 6, 6)), block_name(example))


# %% The fully connected version
# The same idea without convolutions: layer i maps width sizes[i] to sizes[i+1]. Every layer of
# [128, 64, 32, 16, 8, 1] changes the width, so x and layer(x) never have the same shape and an identity
# shortcut never fits; a learned projection W_s (Eq. 2) does.
SHORTCUT_MODES = ("none", "when-shapes-match", "projection")


class FullyConnectedNet(nn.Module):
    """Linear layers with GELU between them (none after the output layer), and an optional shortcut around
    each layer:
        "none"               x <- layer(x)
        "when-shapes-match"  x <- layer(x) + x only if the shapes are equal, else layer(x)  (the common mistake)
        "projection"         x <- layer(x) + x, or layer(x) + W_s x where the width changes  (Eq. 1 / Eq. 2)
    `shortcuts_applied` counts the additions the last forward pass actually made."""

    def __init__(self, sizes: tuple[int, ...], shortcut: str = "none"):
        super().__init__()
        if shortcut not in SHORTCUT_MODES:
            raise ValueError(f"shortcut must be one of {SHORTCUT_MODES}, not {shortcut!r}")
        self.shortcut_mode = shortcut
        pairs = list(zip(sizes[:-1], sizes[1:]))
        # The main layers are created first, so that under the same seed all three versions start from the
        # same main weights and differ only in their shortcuts.
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in pairs)
        self.projections = nn.ModuleList(
            nn.Linear(n_in, n_out, bias=False) if shortcut == "projection" and n_in != n_out else nn.Identity()
            for n_in, n_out in pairs
        )
        self.shortcuts_applied = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shortcuts_applied = 0
        last = len(self.layers) - 1
        for i, (layer, projection) in enumerate(zip(self.layers, self.projections)):
            out = layer(x)  # (B, sizes[i]) -> (B, sizes[i+1])
            if i < last:
                out = F.gelu(out)
            if self.shortcut_mode == "projection" or (
                self.shortcut_mode == "when-shapes-match" and out.shape == x.shape
            ):
                out = out + projection(x)  # layer(x) + x (Eq. 1), or + W_s x (Eq. 2) where the width changes
                self.shortcuts_applied += 1
            x = out
        return x


def fully_connected_gradients(cfg: helpers.Config, device: torch.device) -> dict:
    """Mean |dL/dW| of every main layer for the three shortcut modes, on one batch, MSE loss."""
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.mlp_batch_size, cfg.mlp_sizes[0], generator=generator).to(device)
    target = torch.randn(cfg.mlp_batch_size, cfg.mlp_sizes[-1], generator=generator).to(device)
    grads, applied = {}, {}
    for mode in SHORTCUT_MODES:
        torch.manual_seed(cfg.seed)  # same main weights in every version
        net = FullyConnectedNet(cfg.mlp_sizes, mode).to(device)
        F.mse_loss(net(x), target).backward()
        grads[mode] = [layer.weight.grad.abs().mean().item() for layer in net.layers]
        applied[mode] = net.shortcuts_applied
    rows = []
    for i, (n_in, n_out) in enumerate(zip(cfg.mlp_sizes[:-1], cfg.mlp_sizes[1:])):
        row = {"layer": f"{i + 1}: {n_in}->{n_out}"}
        row.update({mode: grads[mode][i] for mode in SHORTCUT_MODES})
        rows.append(row)
    helpers.print_table(
        rows,
        [("layer", "")] + [(mode, ".2e") for mode in SHORTCUT_MODES],
        "Fully connected net: mean |dL/dW| of each layer's weight, same main weights in every column",
    )
    helpers.print_table(
        [{"version": m, "shortcuts applied": applied[m], "of layers": len(cfg.mlp_sizes) - 1} for m in SHORTCUT_MODES],
        title="Shortcuts each version actually adds in one forward pass",
    )
    first = {m: grads[m][0] for m in SHORTCUT_MODES}
    print(
        f"First layer: the projection version's gradient is {first['projection'] / first['none']:.1f}x the plain "
        f"net's; 'when-shapes-match' applies {applied['when-shapes-match']} of its {len(cfg.mlp_sizes) - 1} "
        f"shortcuts and gets {first['when-shapes-match'] / first['none']:.2f}x.\n"
    )
    return {"rows": rows, "shortcuts_applied": applied, "layers": len(cfg.mlp_sizes) - 1}


# The three versions of a net whose every layer changes the width: only "projection" can add its shortcuts.
FullyConnectedNet(MLP_SIZES, "projection")


# %% Depth sweep: how much gradient reaches the first layer
# Quantity: |dL/dx_0| / |dL/dx_N|, the gradient at the input of a stack of N identical blocks relative to the
# gradient at its output, which is what backpropagation must carry through 2N convolutions. (Weight gradients
# would hide part of this without normalisation: dL/dW pairs the backward gradient with the forward activation,
# and activations that shrink going forward make up for gradients that shrink going backward.)
#
# Why each row does what it does. Without normalisation a plain stack multiplies the gradient by one layer Jacobian
# after another: nn.Conv2d's default init scales each layer's output down, so the product vanishes; He init keeps it
# at about one on average, but the product of many random matrices still drifts (here down to 1e-3 at N=64). A
# residual block multiplies by (I + dF/dx) instead (Eq. 1): near I when F starts small, as with the default init;
# but with He init F is as large as its input, every block doubles the activations' variance, and the product
# explodes. With batch norm the plain stack's gradient explodes at initialisation: every BN rescales its input to
# unit variance, and the backward pass through a deep stack of them grows geometrically (Yang et al. 2019, "A Mean
# Field Theory of Batch Normalization", show with mean-field theory that deep BN nets without shortcuts have
# exploding gradients at initialisation, whatever the init). In the residual stack each branch adds about one unit
# of variance, so x_l's variance grows like l and a BN branch's Jacobian shrinks like 1/sqrt(l) (De & Smith 2020,
# "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks"): the product of the
# (I + dF/dx) grows only polynomially with depth (roughly in proportion to N in the table).
def make_stack(depth: int, channels: int, residual: bool, batch_norm: bool, init: str) -> nn.Sequential:
    """`depth` identical blocks of `channels` channels (no stride, so every shortcut is the identity)."""
    blocks = []
    for _ in range(depth):
        block = ResidualBlock(channels, channels) if residual else PlainBlock(channels, channels)
        if not batch_norm:
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()  # the same block without normalisation
        if init == "he":  # He et al. 2015 ("Delving deep"), the init torchvision's ResNet uses
            for conv in (block.conv1, block.conv2):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        blocks.append(block)  # init == "pytorch": nn.Conv2d's default, kaiming_uniform_ with a=sqrt(5)
    return nn.Sequential(*blocks)


def gradient_ratio(stack: nn.Sequential, x: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> float:
    """|dL/dx_0| / |dL/dx_N| for one batch, with a global-average-pool + linear classifier and cross-entropy."""
    x = x.clone().requires_grad_(True)
    out = stack(x)  # (B, C, H, W) -> (B, C, H, W)
    out.retain_grad()
    F.cross_entropy(head(out.mean(dim=(2, 3))), labels).backward()  # (B, C) -> (B, classes)
    return (x.grad.norm() / out.grad.norm()).item()


def depth_sweep(cfg: helpers.Config, device: torch.device) -> dict:
    settings = [(init, bn, res) for init in cfg.sweep_inits for bn in (False, True) for res in (False, True)]
    runs = [(s, d, r) for s in settings for d in cfg.sweep_depths for r in range(cfg.sweep_repeats)]
    ratios: dict[tuple, list[float]] = {}
    for (init, batch_norm, residual), depth, repeat in helpers.Progress(runs, "depth sweep", unit="stack"):
        seed = cfg.seed + 1000 * repeat + depth  # the same inputs and labels for plain and residual
        generator = torch.Generator().manual_seed(seed)
        shape = (cfg.sweep_batch_size, cfg.sweep_channels, cfg.sweep_side, cfg.sweep_side)
        x = torch.randn(shape, generator=generator)
        labels = torch.randint(0, 10, (cfg.sweep_batch_size,), generator=generator)
        torch.manual_seed(seed)
        stack = make_stack(depth, cfg.sweep_channels, residual, batch_norm, init).to(device)
        head = nn.Linear(cfg.sweep_channels, 10).to(device)
        ratios.setdefault((init, batch_norm, residual, depth), []).append(
            gradient_ratio(stack, x.to(device), labels.to(device), head)
        )

    def geometric_mean(values: list[float]) -> float:
        if any(v == 0 or not math.isfinite(v) for v in values):
            return 0.0 if all(v == 0 for v in values) else float("nan")
        return math.exp(sum(math.log(v) for v in values) / len(values))

    rows = []
    for init, batch_norm, residual in settings:
        row = {
            "init": init,
            "norm": "batch norm" if batch_norm else "none",
            "stack": "residual" if residual else "plain",
        }
        row.update({f"N={d}": geometric_mean(ratios[(init, batch_norm, residual, d)]) for d in cfg.sweep_depths})
        rows.append(row)
    helpers.print_table(
        rows,
        [("init", ""), ("norm", ""), ("stack", "")] + [(f"N={d}", ".1e") for d in cfg.sweep_depths],
        f"Depth sweep: |dL/dx| at the input of N blocks / at their output ({2 * max(cfg.sweep_depths)} conv layers "
        f"at N={max(cfg.sweep_depths)}; geometric mean of {cfg.sweep_repeats} stack(s); 0 means float32 underflow)",
    )
    return {
        "quantity": "|dL/dx_0| / |dL/dx_N|",
        "depths": list(cfg.sweep_depths),
        "rows": rows,
        "all_ratios": [
            {"init": k[0], "batch_norm": k[1], "residual": k[2], "depth": k[3], "ratios": v} for k, v in ratios.items()
        ],
    }


def plot_depth_sweep(sweep: dict, path) -> str:
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt

    inits = list(dict.fromkeys(row["init"] for row in sweep["rows"]))
    fig, axes = plt.subplots(1, len(inits), figsize=(5.5 * len(inits), 4.2), squeeze=False, sharey=True)
    styles = {("plain", "none"): ("tab:red", "--"), ("residual", "none"): ("tab:blue", "--")}
    styles |= {("plain", "batch norm"): ("tab:red", "-"), ("residual", "batch norm"): ("tab:blue", "-")}
    depths = sweep["depths"]
    for ax, init in zip(axes[0], inits):
        for row in (r for r in sweep["rows"] if r["init"] == init):
            values = [row[f"N={d}"] for d in depths]
            kept = [(d, v) for d, v in zip(depths, values) if v > 0 and math.isfinite(v)]  # log axis: drop underflow
            color, line = styles[(row["stack"], row["norm"])]
            ax.plot(*zip(*kept), line, color=color, marker="o", label=f"{row['stack']}, {row['norm']}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_yscale("log")
        ax.set_xlabel("blocks N (2 conv layers each)")
        ax.set_title(f"{init} init")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("|dL/dx| at input / at output")
    fig.suptitle("Gradient reaching the first layer, relative to the last (missing points: underflow to 0)")
    fig.tight_layout()
    return str(helpers.save_figure(fig, path))


def gradients_through_depth(cfg: helpers.Config, device: torch.device, out_dir: Path) -> dict:
    """Part 3: the depth sweep's table, and its figure depth_sweep.png."""
    sweep = depth_sweep(cfg, device)
    print(f"figure: {plot_depth_sweep(sweep, out_dir / 'depth_sweep.png')}")
    return sweep


# One stack of 8 blocks each way (batch norm, He init), one batch of 4 images: the ratio for plain and residual.
torch.manual_seed(0)
{
    stack: gradient_ratio(
        make_stack(8, 16, stack == "residual", batch_norm=True, init="he"),
        torch.randn(4, 16, 8, 8),
        torch.zeros(4, dtype=torch.long),
        nn.Linear(16, 10),
    )
    for stack in ("plain", "residual")
}


# %% The "+1": Jacobian of a residual block, and zero_init_residual
def jacobian_check(cfg: helpers.Config) -> dict:
    """d(F(x) + x)/dx == dF/dx + I, computed with autograd on a small block (float64, CPU, eval mode so that
    batch norm uses fixed statistics and the map is a function of this one input)."""
    torch.manual_seed(cfg.seed)
    c, side = cfg.jacobian_channels, cfg.jacobian_side
    block = ResidualBlock(c, c).double().eval()
    x = torch.randn(1, c, side, side, dtype=torch.float64)
    size = x.numel()

    def flat(fn):  # the Jacobian of a map from R^size to R^size
        return lambda v: fn(v.view_as(x)).reshape(-1)

    def jacobian(fn):  # (size, size), one backward pass per row
        return torch.autograd.functional.jacobian(fn, x.reshape(-1))

    j_branch = jacobian(flat(block.branch))  # (size, size)
    j_sum = jacobian(flat(lambda v: block.branch(v) + block.shortcut(v)))
    j_block = jacobian(flat(block))
    eye = torch.eye(size, dtype=torch.float64)
    relu_slope = (block.branch(x) + block.shortcut(x) > 0).double().reshape(-1)  # relu'(F(x) + x)
    result = {
        "input_shape": list(x.shape),
        "jacobian_shape": list(j_sum.shape),
        "max_abs_error_plus_identity": (j_sum - (j_branch + eye)).abs().max().item(),
        "max_abs_error_with_relu": (j_block - relu_slope[:, None] * (j_branch + eye)).abs().max().item(),
        "mean_diagonal_branch": j_branch.diagonal().mean().item(),
        "mean_diagonal_sum": j_sum.diagonal().mean().item(),
    }
    print(
        f"Jacobian of a {c}-channel block on a {side}x{side} input ({size}x{size}, float64):\n"
        f"  max |d(F(x)+x)/dx - (dF/dx + I)|            = {result['max_abs_error_plus_identity']:.1e}\n"
        f"  max |dy/dx - diag(relu'(F(x)+x)) (dF/dx + I)| = {result['max_abs_error_with_relu']:.1e}\n"
        f"  mean diagonal entry: dF/dx {result['mean_diagonal_branch']:+.3f}, "
        f"dF/dx + I {result['mean_diagonal_sum']:+.3f}  (the shortcut adds exactly 1)\n"
    )
    return result


# Why zero-init. Goyal et al. 2017 ("Accurate, Large Minibatch SGD", section 5.1) set the scale gamma of the
# last batch norm of every residual branch to 0, so F(x) = 0 and each block starts as y = relu(0 + x) = x
# for the non-negative x that the previous block's ReLU produces; torchvision's `zero_init_residual=True`.
# A block with a projection shortcut cannot start as the identity (the shapes differ); it starts as relu(W_s x).
@torch.no_grad()
def zero_init_check(cfg: helpers.Config, device: torch.device) -> list[dict]:
    torch.manual_seed(cfg.seed)
    x = F.relu(torch.randn(8, 16, 8, 8, device=device))  # non-negative, like the output of a previous block
    rows = []
    for stride, out_channels in ((1, 16), (2, 32)):
        for zero_init in (False, True):
            block = ResidualBlock(16, out_channels, stride).to(device)
            if zero_init:
                nn.init.zeros_(block.bn2.weight)  # gamma of the branch's last BN: F(x) = 0 * x_hat + 0
            y = block(x)
            reference = x if block.downsample is None else F.relu(block.shortcut(x))
            rows.append(
                {
                    "block": f"16->{out_channels}, stride {stride}",
                    "bn2 gamma": "zero" if zero_init else "one (default)",
                    "compared with": "x" if block.downsample is None else "relu(W_s x)",
                    "max |F(x)|": block.branch(x).abs().max().item(),
                    "max |y - that|": (y - reference).abs().max().item(),
                }
            )
    helpers.print_table(
        rows,
        [("block", ""), ("bn2 gamma", ""), ("compared with", ""), ("max |F(x)|", ".3g"), ("max |y - that|", ".3g")],
        "zero_init_residual: a zeroed last BN scale turns the block into its shortcut at initialisation",
    )
    return rows


def the_plus_one(cfg: helpers.Config, device: torch.device) -> dict:
    """Part 4: the Jacobian's "+1", and a zeroed last batch-norm scale that makes the block its shortcut."""
    return {"jacobian": jacobian_check(cfg), "zero_init_residual": zero_init_check(cfg, device)}


def difference_of_jacobians(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """d(F(x) + x)/dx - dF/dx, as a (size, size) matrix: the identity, whatever the block's weights."""

    def with_shortcut(v):
        return (block.branch(v.view_as(x)) + v.view_as(x)).reshape(-1)

    def branch_only(v):
        return block.branch(v.view_as(x)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian
    return jacobian(with_shortcut, x.reshape(-1)) - jacobian(branch_only, x.reshape(-1))


# A 1-channel block on a 2x2 input: the difference is the 4x4 identity matrix.
difference_of_jacobians(ResidualBlock(1, 1).double().eval(), torch.randn(1, 1, 2, 2, dtype=torch.float64))


# %% Run everything
@contextlib.contextmanager
def one_cpu_thread():
    """Run tiny-tensor work on one CPU thread. Its time is per-operation overhead, which extra threads only
    add to by waiting on each other: on a busy 2-core machine this lesson's Jacobian took 0.01 s of CPU time
    with one thread and 3.2 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_sizes(cfg: helpers.Config) -> None:
    """Sizes that are valid numbers but cannot run: batch norm in train mode needs two values per channel, and
    no tensor may outgrow the machine's memory (estimates, generous by a small factor)."""
    helpers.require(
        cfg.sweep_batch_size * cfg.sweep_side**2 >= 2,
        "--sweep-batch-size x --sweep-side^2 must be at least 2: batch norm in train mode needs more than one value per channel",
    )
    batch, in_channels, height, width = cfg.trace_input_shape
    helpers.require_memory(
        4 * 8 * batch * height * width * (in_channels + cfg.trace_out_channels), "--trace-input-shape"
    )
    sizes = cfg.mlp_sizes
    helpers.require_memory(
        4 * 16 * (sum(a * b for a, b in zip(sizes, sizes[1:])) + cfg.mlp_batch_size * sum(sizes)), "--mlp-sizes"
    )
    depth = max(cfg.sweep_depths)
    helpers.require_memory(
        4 * 16 * depth * cfg.sweep_batch_size * cfg.sweep_channels * cfg.sweep_side**2, "the depth sweep"
    )
    helpers.require_memory(8 * 4 * (cfg.jacobian_channels * cfg.jacobian_side**2) ** 2, "the Jacobian check")


@helpers.constants_as_keywords
def main(**overrides):
    """The four parts of "What you will learn", in order; saves results.json and depth_sweep.png in `out`."""
    cfg = helpers.config(globals(), overrides)
    helpers.require(len(cfg.trace_input_shape) == 4, "--trace-input-shape needs four integers: B C H W")
    helpers.require(len(cfg.mlp_sizes) >= 2, "--mlp-sizes needs at least two widths, input first (e.g. 128 64 1)")
    started = time.perf_counter()
    check_sizes(cfg)
    device = helpers.pick_device(cfg.device)
    out_dir = helpers.output_dir(cfg, "results.json", "depth_sweep.png")
    helpers.seed_everything(cfg.seed)
    results = {"trace": block_shapes(cfg, device)}  # 1. the block, stage by stage
    with one_cpu_thread():  # everything below works on tiny tensors
        results["fully_connected"] = fully_connected_gradients(cfg, device)  # 2. shortcuts where widths change
        results["depth_sweep"] = gradients_through_depth(cfg, device, out_dir)  # 3. gradients, plain vs residual
        results |= the_plus_one(cfg, device)  # 4. the Jacobian's "+1" and zero_init_residual
    path = helpers.save_results(out_dir, results, cfg, device, started)
    print(f"results: {path}  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    helpers.run_cli(main, globals())
