"""Lesson 03: plain vs residual networks trained under identical conditions; the degradation problem measured.

What you will learn
    1. What the degradation problem is: a deeper plain network ends with a HIGHER TRAINING error than a
       shallower one (so it is not overfitting), while after the paper's full schedule the same layers with
       identity shortcuts train better the deeper they are (He et al. 2015, Fig. 1 and Fig. 6); and how
       much of that a 130-iteration run shows (the plain half, not yet the residual half).
    2. How to compare architectures fairly: the same initialisation scheme and seed, the same mini-batches in
       the same order, the same optimiser, schedule, precision and memory layout for every model.
    3. Why, with batch norm, the trouble is an optimisation difficulty and not vanishing gradients: the
       gradient of every weighted layer is measured, at initialisation and during training.
    4. A measurement pitfall: after a short run at a high learning rate, batch norm's running statistics
       lag the weights, and eval-mode error is wrong until they are re-estimated.

Paper
    K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
    (arXiv:1512.03385). Section 4.2 (CIFAR-10): 6n+2 weighted layers, option-A shortcuts (no extra
    parameters), y = F(x, {W_i}) + x (Eq. 1) for the residual nets and y = F(x, {W_i}) for the plain ones;
    SGD, momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k
    iterations, 64k iterations, 45k/5k train/held-out split, pad-4 crop and flip; the 110-layer net starts
    at 0.01 until training error is below 80% (about 400 iterations). Section 4.1 on why plain nets degrade:
    "We argue that this optimization difficulty is unlikely to be caused by vanishing gradients."

Run
    python 03_training_comparison.py                     # quick run, see runtime below
    python 03_training_comparison.py --depths 20 32 44 56 --iterations 400    # more of Fig. 6, longer
    python 03_training_comparison.py --full              # the paper's schedule on CIFAR-10 (a GPU: hours)
    python 03_training_comparison.py --help              # every constant below is a flag
    The default dataset is CIFAR-10 (downloaded into data/ by torchvision, checksums verified). If it cannot
    be had, the quick run says so loudly and falls back to Fashion-MNIST when it is on disk (Debian:
    `apt-get install dataset-fashion-mnist`, read offline), else to the synthetic set; naming a dataset with
    --dataset, or --full, turns a missing dataset into an error with instructions.
    Runtime: four models x 130 iterations of batch 128 with bf16 autocast: 160 s on 2 quiet CPU cores of
    the development machine (AVX512-BF16); about 1,000 img/s for the 20-layer nets, 300 for the 56-layer ones.

What you should see (seed 0, default constants; no CIFAR-10 on the machine, so the loud fallback to
Fashion-MNIST, 10,000 training and 1,000 held-out images; tests/test_03_training_comparison.py keeps the
verdict and the gradient facts true)
    * Training error at the end (mean over the last 20% = 26 iterations), held-out error after BN
      re-estimation, and ||dL/dW|| of the first conv over the last conv at initialisation:
          model      train err   held-out err (stale BN)   grad first/last conv at init
          plain-20     20.6%       21.6%  (48.7%)              11
          plain-56     40.9%       43.8%  (58.0%)              1,330
          resnet-20    20.2%       20.5%  (34.0%)              2.2
          resnet-56    39.6%       36.0%  (41.0%)              7.0
    * Verdict (results.json): the deeper PLAIN net is worse, plain-56 ends 20.3 points above plain-20: the
      degradation problem, in training error. The deeper RESIDUAL net is NOT yet as good after 130
      iterations: resnet-56 ends 19.4 points above resnet-20 (and level with plain-56), so
      "degradation_reproduced" is false for this short run. Its curve shows why: at learning rate 0.1 from
      the first step ResNet-56 starts badly (mean loss 4.7 over its first 20 iterations against 1.8 for
      ResNet-20; at initialisation its classifier gradient is 6.3 against 2.5), and 130 iterations are
      not enough to recover. This is the effect for which the paper warms up its 110-layer net ("0.1 is
      slightly too large to start converging"); the paper's Fig. 6 compares nets after 64k iterations, 490
      times longer than this run. Read the quick run as: plain-net degradation shows up within a hundred
      or so iterations, the residual half of the claim needs a longer run (see "Try this").
    * Gradients do not vanish in the plain net, they explode towards the input. At initialisation the
      first convolution of plain-56 gets a gradient 1,330 times that of its last convolution (403 vs
      0.30), and its smallest layer gradient (0.14) is as large as ResNet-56's smallest (0.16). Batch norm
      keeps every layer's signal alive, as the paper says, but does not make the plain net easy to
      optimise: relative to its weights the first layer's gradient is 162 (||dL/dW|| / ||W||), so the
      first steps blow that layer's weights up, and because batch norm makes a layer blind to the scale
      of its weights, the layer then barely moves: after 130 iterations its relative gradient is 2e-5,
      against 0.022 at the last convolution (in absolute terms 0.010 vs 0.25: the profile has flipped and
      now looks like vanishing, as a consequence of the blown-up weights, not a cause). The same ratio is
      0.007 vs 0.013 in ResNet-56. The difficulty is in how the updates act on the layers, not in a
      missing gradient (see gradient_norms.png).
    * The BN pitfall: with the running statistics as training left them, held-out error is up to 27
      points higher (plain-20: 48.7% vs 21.6%); after re-estimating them over 20 training batches the
      held-out error sits within 4 points of the training error for every model.
    * Speed on this CPU (AVX512-BF16, one thread, batch 128, forward+backward+step, best of 3, machine
      shared): ResNet-20 1.06 s fp32, 0.82 s fp32 channels-last, 0.57 s bf16, 0.38 s bf16 channels-last;
      ResNet-56 1.9 s fp32, 1.9 s fp32 channels-last, 1.3 s bf16, 1.45 s bf16 channels-last (noisy). bf16 autocast saves a
      third to a half; channels-last helps the 20-layer nets and not measurably the 56-layer ones, so both
      are on by default (plain nets time the same as residual ones).

Try this
    * --depths 20 32 44 56: does training error rise monotonically with depth for the plain nets, as in
      Fig. 6 (left)? Plot order and the verdict still compare the shallowest with the deepest.
    * --iterations 600 (about 8 epochs here): does ResNet-56 overtake ResNet-20, and does plain-56 catch up?
      The paper's claim is about the end of a 64k-iteration schedule; watch how the gaps move with length.
    * --depths 20 110: the 110-layer nets get the paper's warm-up (0.01 for 400 iterations, shown in the
      curves' "lr"). Rerun with --warmup-depth 1000 to train ResNet-110 at 0.1 from the start.
    * --bn-recalibration-batches 1, then 5: how many batches does the re-estimation need before the
      held-out error stops changing? (0 skips it: both held-out columns then agree.)
    * --precision fp32 --no-channels-last: same curves within noise, 1.3 to 2.8 times the wall time on a
      CPU with native bf16.
"""

# %%
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn

import helpers

L02 = helpers.load_lesson(2)  # cifar_resnet(depth, num_classes, shortcut, plain): the paper's CIFAR nets

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for every model's weights and for the (shared) data order
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/03_training_comparison"  # folder for results.json and figures
FULL: bool = False  # the paper's schedule: 64k iterations, lr/10 at 32k and 48k, 45k/5k split, augmentation (GPU)
DATASET: str = "cifar10"  # a quick run falls back if absent [cifar10 | cifar100 | fashion-mnist | synthetic]
DATA_DIR: Path = "data"  # where datasets are stored or downloaded
DOWNLOAD: bool = True  # download a missing dataset through torchvision (needs the internet; checksums verified)
DEPTHS: tuple[int, ...] = (20, 56)  # depths (6n+2), each plain and residual (paper: 20 32 44 56 110) [>= 8]
ITERATIONS: int = 130  # SGD iterations per model (paper: 64000) [> 0]
BATCH_SIZE: int = 128  # images per iteration (paper: 128) [> 0]
LR: float = 0.1  # learning rate (paper: 0.1) [> 0]
MOMENTUM: float = 0.9  # SGD momentum (paper: 0.9) [>= 0]
WEIGHT_DECAY: float = 0.0001  # L2 weight decay (paper: 1e-4) [>= 0]
LR_MILESTONES: tuple[int, ...] = (32000, 48000)  # iterations where the lr is divided by 10 (paper) [>= 0]
WARMUP_DEPTH: int = 110  # nets at least this deep start with the warm-up learning rate (paper: the 110-layer net)
WARMUP_LR: float = 0.01  # warm-up learning rate (paper: 0.01) [> 0]
WARMUP_ITERATIONS: int = 400  # warm-up length (paper: until training error < 80%, "about 400 iterations") [>= 0]
TRAIN_SIZE: int = 10000  # training images kept (the quick run sees each about 1.7 times) [> 0]
VAL_SIZE: int = 1000  # training images held out for the held-out error (paper: 5000 of 50000) [> 0]
AUGMENT: bool = False  # pad-4 random crop and horizontal flip (paper: yes; too few iterations here to matter)
PRECISION: str = "auto"  # autocast dtype (auto: bf16 where native, else fp32/fp16) [auto | fp32 | bf16 | fp16]
CHANNELS_LAST: bool = True  # NHWC memory layout (faster convolutions on this CPU, see the note in main)
GRAD_CHECKPOINTS: int = 4  # evenly spaced times at which every layer's gradient is recorded [> 0]
BN_RECALIBRATION_BATCHES: int = 20  # training batches that re-estimate batch-norm statistics before evaluation [>= 0]
END_FRACTION: float = 0.2  # the verdict compares mean training error over this final fraction [> 0, <= 1]
TOLERANCE: float = 0.02  # error difference (absolute) the verdict treats as a tie [>= 0]
SMOOTHING: int = 20  # iterations in the moving average of the plotted training error [> 0]
EVAL_TEST: bool = False  # also report test-set error (never used to choose anything)
# --- end constants -----------------------------------------------------------------------------------

FULL_OVERRIDES = {
    "depths": (20, 32, 44, 56, 110),
    "iterations": 64000,
    "train_size": 45000,
    "val_size": 5000,
    "augment": True,
    "grad_checkpoints": 8,
    "bn_recalibration_batches": 100,
    "end_fraction": 0.05,
    "smoothing": 400,
    "eval_test": True,
}


# %% The models: one family, with and without shortcuts
# He et al. 2015 (section 4.2) compare nets that differ only in the shortcuts: the same 6n+2 weighted
# layers, the same widths (16, 32, 64), option-A shortcuts that add no parameters, batch norm after every
# convolution, and the same initialisation (Kaiming normal, "Delving Deep into Rectifiers"). Lesson 02's
# `cifar_resnet(depth, plain=True)` removes every shortcut and nothing else, so any difference in training
# below comes from the "+ x" alone.
def build_model(depth: int, plain: bool, num_classes: int, seed: int) -> nn.Module:
    """Plain or residual CIFAR net, its weights drawn from the same seed as every other model's."""
    torch.manual_seed(seed)
    return L02.cifar_resnet(depth, num_classes=num_classes, plain=plain)


def model_name(depth: int, plain: bool) -> str:
    return f"{'plain' if plain else 'resnet'}-{depth}"


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


# %% Batch-norm statistics for evaluation
# Pitfall. In training mode batch norm normalises with the current batch's mean and variance; in eval mode
# with running averages updated by momentum 0.1 at every step. After a few hundred steps at learning rate
# 0.1 the weights still change fast, so the running averages describe weights from tens of steps ago and
# the eval-mode network is not the network that was trained: measured below, held-out error with the raw
# running statistics is far above the training error. Re-estimating the statistics with the final weights
# (a plain average over some training batches, no gradient, no weight change) fixes the mismatch; both
# numbers are reported. After the paper's 64k iterations, at learning rate 0.001 for the last 16k, the
# two agree closely.
# helpers.recalibrate_batch_norm does the re-estimation; train_one calls it.


# %% Training one model
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
    history = helpers.sgd_train(
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
        warmup_lr=cfg.warmup_lr,
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


# %% The verdict, computed from the curves
# Mini-batch training error is noisy (a batch of 128 images moves it by 0.8 points per mistake), so "the
# error a model ends with" is the mean over the last END_FRACTION of the iterations, and two models whose
# end errors differ by at most TOLERANCE count as a tie. The claim of He et al. (Fig. 1, Fig. 6) has two
# halves: the deeper plain net ends with a HIGHER training error than the shallower one (degradation; not
# overfitting, since it is the training error), and the deeper residual net ends with the same or a LOWER
# training error.
def end_value(values: list[float], fraction: float) -> float:
    """Mean of the last `fraction` of `values` (at least one value)."""
    helpers.require(len(values) > 0, "no values to average (the curve is empty)")
    count = max(1, math.ceil(len(values) * fraction))
    return sum(values[-count:]) / count


def degradation_verdict(curves: dict[str, dict[int, list[float]]], end_fraction: float, tolerance: float) -> dict:
    """`curves["plain"][depth]` and `curves["resnet"][depth]` are training-error curves (one value per
    iteration). Compares the shallowest and deepest depth trained in both families."""
    depths = sorted(set(curves["plain"]) & set(curves["resnet"]))
    helpers.require(len(depths) >= 2, "the verdict needs at least two depths in both families (pass --depths 20 56)")
    shallow, deep = depths[0], depths[-1]
    end = {kind: {d: end_value(curves[kind][d], end_fraction) for d in depths} for kind in ("plain", "resnet")}
    plain_gap = end["plain"][deep] - end["plain"][shallow]
    resnet_gap = end["resnet"][deep] - end["resnet"][shallow]
    verdict = {
        "shallow_depth": shallow,
        "deep_depth": deep,
        "end_fraction": end_fraction,
        "tolerance": tolerance,
        "end_train_error": end,
        "plain_gap": plain_gap,  # deeper minus shallower: > 0 means the deeper net trains worse
        "resnet_gap": resnet_gap,
        "deeper_plain_is_worse": plain_gap > tolerance,
        "deeper_resnet_matches_or_beats": resnet_gap <= tolerance,
        "deep_resnet_beats_deep_plain": end["plain"][deep] - end["resnet"][deep] > tolerance,
    }
    verdict["degradation_reproduced"] = verdict["deeper_plain_is_worse"] and verdict["deeper_resnet_matches_or_beats"]
    return verdict


def binned_curve(curve: dict, iterations: int, max_points: int = 2000) -> dict:
    """The curves as means over bins of consecutive iterations, so that results.json of a 64k-iteration run
    stays small; `bin` iterations per point (1 in the quick run: every iteration is kept)."""
    size = max(1, math.ceil(iterations / max_points))
    binned = {
        key: [sum(v[i : i + size]) / len(v[i : i + size]) for i in range(0, len(v), size)] for key, v in curve.items()
    }
    return {"bin": size, **binned}


# %% Figures
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


# %% Putting it together
def load_data(cfg) -> helpers.ImageData:
    """The training set with a held-out part (helpers.load_data states the rule for a missing dataset)."""
    return helpers.load_data(cfg, test_size=None if cfg.eval_test else 1)


def validate(cfg) -> None:
    for key in ("iterations", "batch_size", "train_size", "val_size", "grad_checkpoints"):
        helpers.require(cfg[key] > 0, f"--{key.replace('_', '-')} must be a positive integer")
    helpers.require(cfg.bn_recalibration_batches >= 0, "--bn-recalibration-batches must be zero or positive")
    helpers.require(len(cfg.depths) >= 1, "--depths needs at least one depth (e.g. --depths 20 56)")
    for depth in cfg.depths:
        helpers.require(
            depth >= 8 and (depth - 2) % 6 == 0, f"depth {depth} is not 6n+2 (use 8, 14, 20, 32, 44, 56, 110, ...)"
        )
    helpers.require(cfg.lr > 0 and cfg.warmup_lr > 0, "--lr and --warmup-lr must be positive")
    helpers.require(0 < cfg.end_fraction <= 1, "--end-fraction must be in (0, 1]")
    helpers.require(cfg.tolerance >= 0, "--tolerance must be zero or positive")
    helpers.require(cfg.smoothing > 0, "--smoothing must be a positive integer")


@helpers.constants_as_keywords
def main(**overrides):
    cfg = helpers.config(globals(), overrides, FULL_OVERRIDES)
    started = time.perf_counter()
    validate(cfg)
    device = helpers.pick_device(cfg.device)
    amp_dtype = helpers.autocast_dtype(device, cfg.precision)
    out_dir = helpers.output_dir(cfg)
    helpers.seed_everything(cfg.seed)
    data = load_data(cfg).to(device)
    print(
        f"{data.name}: {len(data.train_x)} training images, {len(data.val_x)} held out; {cfg.iterations} iterations "
        f"of batch {cfg.batch_size} per model on {helpers.device_name(device)}, "
        f"autocast {amp_dtype or 'off (fp32)'}, channels-last {cfg.channels_last}",
        flush=True,
    )

    models = []
    for plain in (True, False):
        for depth in sorted(cfg.depths):
            models.append(train_one(cfg, data, depth, plain, device, amp_dtype))
            m = models[-1]
            print(
                f"  {m['name']:>10}: training error {m['end_train_error']:.1%} (mean of last {cfg.end_fraction:.0%}), "
                f"held-out {m['val_error']:.1%}, {m['images_per_s']:.0f} img/s, {m['wall_s']:.0f} s",
                flush=True,
            )
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

    results = {"dataset": data.name, "fell_back_from": cfg.dataset if data.name != cfg.dataset else None}
    results["precision"] = str(amp_dtype) if amp_dtype else "fp32"
    results["models"] = [{**m, "curve": binned_curve(m["curve"], cfg.iterations)} for m in models]
    if len(cfg.depths) >= 2:
        curves = {
            kind: {m["depth"]: m["curve"]["error"] for m in models if m["kind"] == kind} for kind in ("plain", "resnet")
        }
        verdict = degradation_verdict(curves, cfg.end_fraction, cfg.tolerance)
        results["verdict"] = verdict
        s, d = verdict["shallow_depth"], verdict["deep_depth"]
        print(
            f"verdict: plain-{d} ends {verdict['plain_gap']:+.1%} vs plain-{s} "
            f"({'degradation' if verdict['deeper_plain_is_worse'] else 'no degradation'}); "
            f"resnet-{d} ends {verdict['resnet_gap']:+.1%} vs resnet-{s} "
            f"({'matches or beats it' if verdict['deeper_resnet_matches_or_beats'] else 'behind it'}) "
            f"[tie = within {cfg.tolerance:.0%}]",
            flush=True,
        )
    print(f"figure: {plot_training_error(models, cfg.smoothing, out_dir / 'training_error.png')}")
    print(f"figure: {plot_gradients(models, out_dir / 'gradient_norms.png')}")
    path = helpers.save_results(out_dir, results, cfg, device, started)
    print(f"results: {path}  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    helpers.run_cli(main, globals())
