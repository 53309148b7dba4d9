"""Lesson 06: a complete, fast training pipeline for a CIFAR ResNet, on a CPU, a GPU or several under torchrun.

What you will learn
    * the dataset on the device as uint8, augmented a batch at a time (crop, flip, cutout);
    * SGD with Nesterov momentum, decay on weights only, warm-up then one-cycle or cosine, label smoothing;
    * mixed precision (bf16 where native, fp16 with a gradient scaler on older GPUs), channels-last, torch.compile;
    * honest evaluation: a validation split picks the best epoch, the test set is only reported (with flip TTA);
    * checkpoints that survive a kill, load with `weights_only=True` and resume exactly; DDP under `torchrun`.

Paper
    He et al. 2015, "Deep Residual Learning for Image Recognition": y = relu(F(x, {W_i}) + x) (Eq. 1). The demo
    trains the 6n+2 CIFAR net with n = 1 (ResNet-8, 75k parameters). `--full` trains the 3x3-stem ResNet-18 with
    kuangliu/pytorch-cifar's recipe (SGD, lr 0.1, momentum 0.9, decay 5e-4, cosine over 200 epochs, batch 128):
    93.02% CIFAR-10 test accuracy in its README, trained on all 50,000 images and chosen on the test set (cited,
    not measured: no GPU has run this lesson); `--full` holds 5,000 out and chooses on them.

Run
    python 06_practical_example.py                  # quick demo: ResNet-8, 3 epochs of 55,000 images, batch 64
    python 06_practical_example.py --full           # cifar_resnet18, 200 epochs (a GPU)
    python 06_practical_example.py --resume outputs/06_practical_example/checkpoints/last.pt
    torchrun --standalone --nproc_per_node 2 06_practical_example.py --device cpu   # 2 processes (gloo)
    Runtime on 2 quiet CPU cores: 112-155 s with bf16 (AVX512-BF16), 157-200 s in fp32 (an AMD EPYC with AVX2
    and no bf16). CIFAR-10 is not on either machine: the demo falls back to Fashion-MNIST.

What you should see (quick demo, seed 0, Fashion-MNIST; tests/test_06_practical_example.py reruns it)
    precision  val accuracy after epochs 1-3  test accuracy  with flip TTA  weakest class  strongest
    bf16       76.0%  86.1%  91.0%            91.0%          91.1%          shirt 73.2%    bag 98.7%
    fp32       74.5%  84.2%  90.5%            90.5%          90.7%          shirt 72.1%    bag 98.6%
    In fp32 shirts are called t-shirt 106 times, coat 88 and pullover 45 (of 1,000). The schedule ends at lr 0.

Try this (`--exercise N` runs number N; answers/06_practical_example.md answers each, with numbers)
    1. `--train-size 10000 --val-size 1000 --test-size 2000` (about a minute): how much does a fifth of the data cost?
    2. Exercise 1 with `--label-smoothing 0`, and 3. with `--schedule cosine`: larger than the spread of seeds 0-2?
    4. Exercise 1 with `--precision fp32 --no-channels-last`: how much does img/s change (against 1 in fp32)?
    5. Exercise 1 with `--model resnet20`, 3.3x ResNet-8's arithmetic per image: how much slower, how much better?
    6. Ctrl-C in epoch 2 of exercise 1, then `--resume outputs/06_practical_example/checkpoints/last.pt`: the same
       numbers at the end, as if never stopped.
    7. `torchrun --standalone --nproc_per_node 2 06_practical_example.py --exercise 7`, then with `python`:
       results.json's `first_step_losses` are close, not equal (per-process batch norm).
"""

# %%
from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import math
import os
import shlex
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED: int = 0  # random seed for weights, data order and augmentation [>= 0, < 4294967296]
DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
OUT: Path = "outputs/06_practical_example"  # folder for results.json, figures and checkpoints
FULL: bool = False  # the full recipe: all of CIFAR-10, 200 epochs (meant for a GPU)
DATASET: str = "cifar10"  # a quick run falls back if absent [cifar10 | cifar100 | fashion-mnist | synthetic]
DATA_DIR: Path = "data"  # where datasets are stored or downloaded
DOWNLOAD: bool = True  # download a missing dataset (needs the internet; checksums are verified)
MODEL: str = "resnet8"  # resnet8 ... resnet110 (6n+2), cifar_resnet18 ... cifar_resnet152 [in MODELS]
TRAIN_SIZE: int = 0  # training images used (0: all that are not held out) [>= 0]
VAL_SIZE: int = 5000  # training images held out for validation (they choose the best epoch) [> 0]
TEST_SIZE: int = 0  # test images evaluated (0: all) [>= 0]
EPOCHS: int = 3  # passes over the training images [> 0]
BATCH_SIZE: int = 64  # images per SGD step [> 0]
LR: float = 0.1  # peak learning rate (not rescaled with the batch size) [> 0]
MOMENTUM: float = 0.9  # Nesterov momentum [>= 0, < 1]
WEIGHT_DECAY: float = 5e-4  # L2 penalty on convolution and linear weights (not on BN or biases) [>= 0]
SCHEDULE: str = "onecycle"  # onecycle: linear up and down; cosine: linear up, cosine down [in SCHEDULES]
WARMUP_EPOCHS: float = 0.5  # epochs of linear learning-rate warm-up from 0 [>= 0]
LABEL_SMOOTHING: float = 0.1  # probability mass spread uniformly over all classes in the target [>= 0, < 1]
CUTOUT: int = 0  # side in pixels of a random square zeroed in each training image (0: off) [>= 0, <= 32]
PRECISION: str = "auto"  # autocast dtype (auto: bf16 where native, fp16 on old GPUs) [auto | fp32 | bf16 | fp16]
CHANNELS_LAST: bool = True  # NHWC memory layout (faster convolutions with oneDNN and tensor cores)
COMPILE: bool = False  # torch.compile the model (slow start, faster epochs on GPUs)
SYNC_BN: bool = False  # under torchrun, batch norm over the whole global batch (SyncBatchNorm; GPUs only)
TTA: bool = True  # also report test accuracy with horizontal-flip test-time augmentation
RESUME: Path = ""  # checkpoint to continue from (e.g. outputs/06_practical_example/checkpoints/last.pt)
NUM_MISTAKES: int = 16  # most confidently misclassified test images shown in the grid [>= 0]
EVAL_BATCH_SIZE: int = 500  # images per evaluation batch [> 0]
CHECK_EVERY: int = 25  # steps between loss read-outs (each waits for the GPU; NaN is checked there) [> 0]
# --- end constants -----------------------------------------------------------------------------------

SMALL = {"train_size": 10000, "val_size": 1000, "test_size": 2000}  # exercise 1: a fifth of the training images
EXERCISES = {  # Try this, runnable as --exercise N: the flags of each, or (a string) the edit it asks for
    1: SMALL,
    2: {**SMALL, "label_smoothing": 0.0},
    3: {**SMALL, "schedule": "cosine"},
    4: {**SMALL, "precision": "fp32", "channels_last": False},
    5: {**SMALL, "model": "resnet20"},
    6: "press Ctrl-C during epoch 2 of --exercise 1, then add --resume outputs/06_practical_example/checkpoints/last.pt",
    7: {**SMALL, "device": "cpu", "precision": "fp32", "epochs": 1},
}

FULL_OVERRIDES = {"model": "cifar_resnet18", "epochs": 200, "batch_size": 128, "schedule": "cosine",
                  "warmup_epochs": 5.0}  # fmt: skip
SCHEDULES = ("onecycle", "cosine")
MODELS = (*(f"resnet{d}" for d in (8, 20, 32, 44, 56, 110)), *(f"cifar_resnet{d}" for d in (18, 34, 50, 101, 152)))
FIRST_LOSSES = 8  # losses of the run's first steps kept in results.json (to compare runs step by step)

helpers.config(globals(), {}, FULL_OVERRIDES)  # the settings a run with no flags uses


# %% The input pipeline: the dataset lives on the device as uint8 and is augmented a whole batch at a time
# A DataLoader with PIL transforms makes ~10 Python calls per image per epoch on the cores the model needs, and
# copies float32 (4x the bytes of uint8) to the device. Here a step indexes a batch, then crops, flips and cuts
# out all its images with a few tensor operations on the device. benchmarks/pipeline_throughput.py measures both.
def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random `size` x `size` square per image, possibly partly outside (DeVries and Taylor 2017)."""
    batch, _, height, width = images.shape
    centres = torch.randint(0, height, (2, batch), generator=generator).to(images.device)  # (2, B)
    in_rows = (torch.arange(height, device=images.device)[None] - centres[0, :, None]).abs() <= size // 2  # (B, H)
    in_cols = (torch.arange(width, device=images.device)[None] - centres[1, :, None]).abs() <= size // 2  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return images * keep[:, None].to(images.dtype)


def augment(images: torch.Tensor, cutout_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, then optional cutout, for a whole uint8 batch on its device."""
    images = helpers.random_crop_flip(images, pad=4, generator=generator)  # (B, C, H, W), still uint8
    return cutout(images, cutout_size, generator) if cutout_size > 0 else images


def to_model_input(images: torch.Tensor, data: helpers.ImageData, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float, in the memory layout the model was converted to."""
    x = helpers.normalize(images, data.mean, data.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


example = helpers.make_synthetic(4, seed=0)[0]  # uint8 (4, 3, 32, 32), as the dataset is held
augmented = augment(example, cutout_size=8, generator=torch.Generator().manual_seed(0))
changed = (augmented != example).float().mean()
f"{tuple(example.shape)} {example.dtype} -> {tuple(augmented.shape)} {augmented.dtype}, {changed:.0%} of pixels changed"


# %% Optimiser and schedule
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on convolution and linear weights only: before batch norm a weight's scale does not change the function,
    so decay raises the effective learning rate (about lr / ||W||^2, van Laarhoven 2017); on BN's gamma it would pull
    every residual branch towards zero. A common practice; not measured here."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "name": "weights"},
            {"params": no_decay, "weight_decay": 0.0, "name": "bn_and_bias"}]  # fmt: skip


class LearningRateShape:  # a class, not a lambda, so that the scheduler's state pickles
    """The peak learning rate's multiplier at step t: linear warm-up from 0, then down to 0 at the last step, linearly
    (one-cycle, Smith and Topin 2017, without cycling momentum) or along a half cosine (Loshchilov and Hutter 2017)."""

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str):
        self.total, self.warmup, self.schedule = total_steps, min(warmup_steps, total_steps - 1), schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)  # 0 -> 1 over the decay
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress


example_shape = LearningRateShape(total_steps=100, warmup_steps=10, schedule=SCHEDULE)
rows = [{"step": t, "lr": LR * example_shape(t)} for t in (0, 5, 9, 10, 30, 55, 80, 99)]
helpers.format_table(rows, [("step", "d"), ("lr", ".4f")], f"{SCHEDULE}: peak lr {LR}, 100 steps, 10 of warm-up")


# %% One epoch of training
class StopTraining(helpers.UserError):
    """Training diverged (NaN or infinity in a loss or in the weights); nothing diverged is ever saved."""

    advice = "(lower --lr, or use --precision fp32); nothing of it was saved"


def train_one_epoch(t: dict, data, cfg, device, amp_dtype, stop: dict, ddp) -> dict:
    """Train from `run["step"]` to the end of epoch `run["epoch"]`, or until a stop request reaches every process.
    The order generator restarts from its state at the epoch's start, so a run stopped at step k rebuilds the same
    order and skips k batches. Loss sums stay on the device between read-outs (a read-out waits for the GPU)."""
    model, optimizer, scheduler, scaler, run = t["trained_model"], t["optimizer"], t["scheduler"], t["scaler"], t["run"]
    order_generator, augment_generator = t["generators"]
    order_generator.set_state(run["order_state"])
    batches = list(helpers.epoch_batches(len(data.train_x), cfg.batch_size, order_generator))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    sums = torch.zeros(2, device=device)  # loss and correct answers since the last read-out (MPS has no float64)
    first_losses = run.setdefault("first_losses", [])
    steps = range(run["step"], len(batches))
    progress = helpers.Progress(steps, f"epoch {run['epoch'] + 1}", unit="img", scale=cfg.batch_size)
    model.train()
    for step in progress:
        index = batches[step].to(device)
        images = augment(data.train_x[index], cfg.cutout, augment_generator)  # uint8 (B, C, H, W), the global batch
        images, labels = rank_slice(images, ddp), rank_slice(data.train_y[index], ddp)  # this process's B / world
        with helpers.autocast(device, amp_dtype):
            logits = model(to_model_input(images, data, cfg.channels_last))  # (B, 3, 32, 32) -> (B, K)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # scaled only for fp16, whose small gradients would underflow
        scaler.step(optimizer)  # fp16: skipped when the gradients overflowed, and the scale is lowered
        scaler.update()
        scheduler.step()  # every step counts, even one the scaler skipped
        sums += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum()]).to(sums.dtype)
        run["step"], run["seen"] = step + 1, run["seen"] + cfg.batch_size  # seen: images of all processes
        if run["epoch"] == 0 and len(first_losses) < FIRST_LOSSES and run["step"] == len(first_losses) + 1:
            first_losses.append(all_reduce(ddp, loss.detach().reshape(1)).item() / ddp.world)
        if run["step"] % cfg.check_every == 0 or run["step"] == len(batches) or (stop["requested"] and ddp.world == 1):
            totals = all_reduce(ddp, torch.cat([sums, sums.new_tensor([float(stop["requested"])])])).tolist()
            sums.zero_()
            run["loss_sum"], run["correct"] = run["loss_sum"] + totals[0], run["correct"] + int(totals[1])
            mean_loss = run["loss_sum"] / run["seen"]  # NaN and infinity are sticky in a sum
            if not math.isfinite(mean_loss):
                where = f"in epoch {run['epoch'] + 1}, step {run['step']}"
                raise StopTraining(f"the training loss became {mean_loss} {where} {StopTraining.advice}, {t['kept']}")
            progress.set_postfix_str(f"loss {mean_loss:.3f} lr {scheduler.get_last_lr()[0]:.4f}")
            if totals[2] > 0:  # a stop request reached some process: all stop at this same step
                stop["stop"] = True
                break
    run["complete"] = run["step"] == len(batches)
    if run["complete"]:  # the next epoch's order continues from the generator's state after this randperm
        run["order_state"] = order_generator.get_state()
    return run


label, sure = torch.tensor([0]), torch.tensor([[12.0, 0.0, 0.0]])  # a confident, correct prediction of class 0
smoothed = F.cross_entropy(sure, label, label_smoothing=LABEL_SMOOTHING)
f"loss of a sure, right answer: {F.cross_entropy(sure, label):.4f} plain, {smoothed:.4f} smoothed by {LABEL_SMOOTHING}"


# %% Evaluation: the test set once, with the weights the validation set chose
def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float]:
    return (matrix.diagonal() / matrix.sum(1)).tolist()  # float32 (MPS has no float64); nan for an absent class


def evaluate_on_test_set(model, cfg, data, device, amp_dtype, best_epoch: int) -> tuple[dict, dict]:
    """Test accuracy, with flip TTA (the mean logits of each image and its mirror), per class, the confusion matrix
    and the most confident mistakes."""
    args = (data.mean, data.std, device, amp_dtype, cfg.eval_batch_size, cfg.channels_last)
    test = helpers.evaluate(model, data.test_x, data.test_y, *args)
    predictions, confidence = test["logits"].argmax(1), test["logits"].softmax(1).max(1).values
    matrix = confusion_matrix(predictions, data.test_y, data.num_classes)
    per_class, counts = per_class_accuracy(matrix), matrix.sum(1).tolist()
    results = {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
    if cfg.tta:
        mirrored = helpers.evaluate(model, data.test_x.flip(3), data.test_y, *args)["logits"]  # flip along W
        results["test_accuracy_flip_tta"] = ((test["logits"] + mirrored).argmax(1) == data.test_y).float().mean().item()
    wrong = (predictions != data.test_y).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][: cfg.num_mistakes]
    results |= {"per_class_accuracy": dict(zip(data.classes, per_class)), "confusion_matrix": matrix}
    results["most_confident_mistakes"] = [
        {"index": int(i), "true": data.classes[int(data.test_y[i])], "predicted": data.classes[int(predictions[i])],
         "confidence": float(confidence[i])} for i in worst]  # fmt: skip
    rows = [{"class": c, "test_accuracy_%": 100 * a, "images": n} for c, a, n in zip(data.classes, per_class, counts)]
    helpers.print_table(rows, "class test_accuracy_%:.1f images:d", f"\nPer-class accuracy, best epoch {best_epoch}")
    weakest = min(range(data.num_classes), key=lambda k: per_class[k] if counts[k] else 2.0)
    confused = sorted(((int(n), data.classes[k]) for k, n in enumerate(matrix[weakest]) if k != weakest), reverse=True)
    results["weakest_class"] = {"class": data.classes[weakest], "called": {name: n for n, name in confused[:3]}}
    called = ", ".join(f"{name} {n}" for n, name in confused[:3])
    print(f"weakest class {data.classes[weakest]}: of its {counts[weakest]} test images, called {called}\n")
    return results, {"predictions": predictions, "confidence": confidence, "worst": worst}


def draw_figures(t: dict, cfg, data, matrix: torch.Tensor, mistakes: dict, out: Path) -> list[Path]:
    """Training curves with the learning rate, the confusion matrix, and the most confident mistakes."""
    helpers.use_headless_matplotlib()
    import matplotlib.pyplot as plt
    import seaborn as sns

    history, steps = t["history"], t["steps_per_epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split in ("train", "val"):
        axes[0].plot([h["epoch"] for h in history], [h[f"{split}_loss"] for h in history], "o-", label=split)
        axes[1].plot([h["epoch"] for h in history], [100 * h[f"{split}_accuracy"] for h in history], "o-", label=split)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss (train: smoothed targets, augmented; val: plain)")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    lr_curve = [cfg.lr * t["shape"](step) for step in range(cfg.epochs * steps)]
    axes[2].plot([(s + 1) / steps for s in range(len(lr_curve))], lr_curve)
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning-rate schedule")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend()
    paths = [helpers.save_figure(fig, out / "curves.png")]
    fig, ax = plt.subplots(figsize=(8, 6.5))
    sns.heatmap(matrix.cpu().numpy(), annot=True, fmt="d", cmap="Blues", ax=ax, xticklabels=data.classes,
                yticklabels=data.classes)  # fmt: skip
    ax.set(xlabel="predicted class", ylabel="true class", title="test confusion matrix (best epoch)")
    paths.append(helpers.save_figure(fig, out / "confusion_matrix.png"))
    worst, rows = mistakes["worst"], max(1, math.ceil(len(mistakes["worst"]) / 8))
    fig, axes = plt.subplots(rows, 8, figsize=(16, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst.tolist()):
        ax.imshow(data.test_x[i].permute(1, 2, 0).cpu().numpy())  # (C, H, W) -> (H, W, C)
        said, p = data.classes[int(mistakes["predictions"][i])], float(mistakes["confidence"][i])
        ax.set_title(f"true {data.classes[int(data.test_y[i])]}\nsaid {said} {p:.0%}", fontsize=8)
    fig.suptitle("most confidently misclassified test images")
    return [*paths, helpers.save_figure(fig, out / "mistakes.png")]


confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)  # rows: true class; columns: predicted


# %% The run
@helpers.constants_as_keywords
def main(**overrides):
    """Train, evaluate and report; `overrides` are the constants in lower case (tests pass tiny values)."""
    cfg, started, ddp = helpers.config(globals(), overrides, FULL_OVERRIDES), time.perf_counter(), distributed_context()
    state = load_checkpoint(cfg.resume) if cfg.resume else None
    cfg = resume_config(cfg, state, ddp) if state else cfg  # the checkpoint owns the run's settings
    out = Path(cfg.out)
    if ddp.rank == 0:  # process 0 alone writes: it claims --out (one run per folder, nothing of the user's replaced)
        out = helpers.output_dir(cfg, *OUTPUT_FILES)
        helpers.writable_dir(out / "checkpoints")
    with contextlib.ExitStack() as held:
        if ddp.rank != 0:  # process 0 prints for the run; errors (stderr) still come from every process
            held.enter_context(contextlib.redirect_stdout(held.enter_context(open(os.devnull, "w"))))  # noqa: SIM115
        device = held.enter_context(process_group(ddp, helpers.pick_device(cfg.device), cfg))
        amp_dtype = helpers.autocast_dtype(device, cfg.precision)
        held.enter_context(warnings.catch_warnings())  # for this run only: a step the fp16 scaler skips
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # makes torch warn about the schedule
        if ddp.rank > 0:  # under torchrun process 0 downloads a missing dataset first; the others then read its files
            torch.distributed.barrier()
        data = helpers.load_data(cfg, test_size=cfg.test_size or None, fallback=state is None)  # resumed: no fallback
        if ddp.world > 1 and ddp.rank == 0:
            torch.distributed.barrier()
        too_large = f"--batch-size {cfg.batch_size} is larger than the {len(data.train_x)} training images (lower it)"
        helpers.require(cfg.batch_size <= len(data.train_x), too_large)
        t = build_training(cfg, data, device, amp_dtype, ddp, state)
        last = out / "checkpoints" / "last.pt"  # a resumed run replaces it: only when it is what was resumed
        rewinds = state is not None and last.is_file() and last.resolve() != Path(cfg.resume).resolve()
        helpers.require(not rewinds, f"resuming {cfg.resume} would replace {last} (resume it, or pass another --out)")
        data = data.to(device)  # the whole dataset on the training device, as uint8
        sizes = f"{len(data.train_x)} train / {len(data.val_x)} val / {len(data.test_x)} test images"
        how = f"autocast {amp_dtype or 'off (fp32)'}, channels-last {cfg.channels_last}, compile {cfg.compile}"
        how += f", {ddp.world} processes" if ddp.world > 1 else ""
        print(f"{cfg.model} ({helpers.count_parameters(t['model']) / 1e6:.2f}M parameters) on {data.name}: {sizes}, "
              f"{device}, {how}")  # fmt: skip
        if state is not None:
            print(f"resumed from {cfg.resume} at epoch {t['run']['epoch'] + 1}, step {t['run']['step']}")
        print(EPOCH_HEADER + "\n" + "-" * len(EPOCH_HEADER), flush=True)
        stop = {"stop": False, "requested": False, "signal": signal.SIGINT}
        with stop_requests(stop):
            while t["run"]["epoch"] < cfg.epochs and not stop["stop"]:
                train_and_validate_one_epoch(t, cfg, data, device, amp_dtype, ddp, out, stop)
        run, best = t["run"], t["best"]
        sizes = {"num_train": len(data.train_x), "num_val": len(data.val_x), "num_test": len(data.test_x)}
        results = {"status": "interrupted" if run["epoch"] < cfg.epochs else "finished", "dataset": data.name,
                   "model": cfg.model, "parameters": helpers.count_parameters(t["model"]), "autocast_dtype": amp_dtype,
                   **sizes, "steps_per_epoch": t["steps_per_epoch"], "history": t["history"],
                   "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"], "world_size": ddp.world,
                   "first_step_losses": run.get("first_losses", [])}  # fmt: skip
        if results["status"] == "interrupted":
            at = f"in epoch {run['epoch'] + 1} at step {run['step']}" if run["step"] else f"after epoch {run['epoch']}"
            print(f"interrupted {at}: saved {last}\ncontinue with: {resume_command(cfg, last, ddp)}")
            results["signal"] = int(stop["signal"])
        elif ddp.rank == 0:
            t["model"].load_state_dict(t["best_model"])  # the weights the validation set chose
            test_results, mistakes = evaluate_on_test_set(t["model"], cfg, data, device, amp_dtype, best["epoch"])
            results |= test_results | {"mean_images_per_s": float(np.mean([h["images_per_s"] for h in t["history"]]))}
            summary = {"best validation accuracy %": best["val_accuracy"], "test accuracy %": results["test_accuracy"]}
            summary |= {"test accuracy with flip TTA %": results["test_accuracy_flip_tta"]} if cfg.tta else {}
            rows = [{"measure": k, "value": 100 * v} for k, v in summary.items()]
            rows.append({"measure": "mean training img/s", "value": results["mean_images_per_s"]})
            helpers.print_table(rows, "measure value:.2f", f"{cfg.model} on {data.name}")
            print("losses of the first steps:", " ".join(f"{loss:.4f}" for loss in results["first_step_losses"]))
            results["figures"] = draw_figures(t, cfg, data, results["confusion_matrix"], mistakes, out)
        if ddp.rank == 0:
            helpers.save_results(out, results, cfg, device, started)
            print(f"{'figures, results.json and checkpoints' if 'figures' in results else 'results.json'} in {out}")
        return results


EPOCH_HEADER = "    epoch       lr  train loss  train acc  val loss  val acc    img/s  time s"


def train_and_validate_one_epoch(t: dict, cfg, data, device, amp_dtype, ddp, out: Path, stop: dict) -> None:
    """One epoch, then validation and the epoch's checkpoints; a stop request mid-epoch saves where the run is.
    Nothing diverged is saved or marked best: the losses and weights are checked first."""
    run, checkpoints, started, seen_before = t["run"], out / "checkpoints", time.perf_counter(), t["run"]["seen"]
    train_one_epoch(t, data, cfg, device, amp_dtype, stop, ddp)
    share_buffers_of_rank0(t["model"], ddp)  # every process now holds the model process 0 saves
    helpers.synchronize(device)
    seconds = time.perf_counter() - started
    if not run["complete"]:  # stopped mid-epoch: save exactly where the run is
        require_finite(t, {"training loss": run["loss_sum"]}, f"in epoch {run['epoch'] + 1}")
        save_checkpoints(t, ddp, checkpoints, best=False)
        return
    val = helpers.evaluate(t["model"], data.val_x, data.val_y, data.mean, data.std, device, amp_dtype,
                           cfg.eval_batch_size, cfg.channels_last)  # fmt: skip
    record = {"epoch": run["epoch"] + 1, "lr": t["scheduler"].get_last_lr()[0]}
    record |= {"train_loss": run["loss_sum"] / run["seen"], "train_accuracy": run["correct"] / run["seen"]}
    record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    record |= {"images_per_s": (run["seen"] - seen_before) / seconds, "seconds": seconds}
    require_finite(t, {"training loss": record["train_loss"], "validation loss": record["val_loss"]},
                   f"in epoch {record['epoch']}")  # fmt: skip
    t["history"].append(record)
    is_best = val["accuracy"] > t["best"]["val_accuracy"]
    if is_best:  # kept in memory and in every checkpoint, so that last.pt alone can finish the run
        t["best"] = {"val_accuracy": val["accuracy"], "epoch": record["epoch"]}
        t["best_model"] = {k: v.detach().clone() for k, v in t["model"].state_dict().items()}
    run.update(epoch=run["epoch"] + 1, step=0, loss_sum=0.0, correct=0, seen=0)
    save_checkpoints(t, ddp, checkpoints, best=is_best)
    t["kept"] = f"{checkpoints / 'last.pt'} (end of epoch {record['epoch']}) is kept"
    print(f"{record['epoch']:>4}/{cfg.epochs:<4}  {record['lr']:7.4f}  {record['train_loss']:10.4f}  "
          f"{record['train_accuracy']:9.2%}  {record['val_loss']:8.4f}  {record['val_accuracy']:7.2%}  "
          f"{record['images_per_s']:7.0f}  {seconds:6.1f}{'  best' if is_best else ''}", flush=True)  # fmt: skip
    vote = torch.tensor([float(stop["requested"])], device=device)
    stop["stop"] = all_reduce(ddp, vote).item() > 0  # a request that reached any process stops all, or none


def require_finite(t: dict, losses: dict, where: str) -> None:
    problems = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
    bad = [n for n, x in t["model"].state_dict().items() if x.is_floating_point() and not torch.isfinite(x).all()]
    problems += [f"non-finite values in {len(bad)} weight tensors, e.g. {', '.join(bad[:3])}"] if bad else []
    if problems:
        raise StopTraining(f"training diverged {where}: {'; '.join(problems)} {StopTraining.advice}, {t['kept']}")


# main's keywords are the constants, in lower case, and so are its flags.
[c.flag for c in helpers.read_constants(globals())]


# %% Checkpoints, resuming and building the run: atomic, weights_only=True, complete enough to continue exactly
# A checkpoint holds the run's settings, and `--resume` continues with them: the schedule was planned from epochs,
# batch size, lr and warm-up, so a flag that contradicts one is refused (to train longer, start a new run). last.pt
# is written first and holds the best epoch's weights too, so that a kill at any instant leaves a file that finishes
# the run; best.pt is the same state at the best epoch.
CHECKPOINT_FORMAT = "lesson06-checkpoint-v3"
OUTPUT_FILES = ("results.json", "curves.png", "confusion_matrix.png", "mistakes.png", "checkpoints/last.pt",
                "checkpoints/best.pt")  # fmt: skip
RESUME_KEYS = ("model", "dataset", "train_size", "val_size", "test_size", "seed", "epochs", "batch_size", "lr",
               "momentum", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "cutout",
               "sync_bn")  # fmt: skip


def save_checkpoint(path: Path, state: dict) -> Path:
    """torch.save into a temporary file, then an atomic rename: no crash or kill leaves half a checkpoint."""
    return helpers.atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_checkpoints(t: dict, ddp, checkpoints: Path, best: bool) -> None:
    if ddp.rank != 0:  # process 0 writes for all
        return
    order, augment = (generator.get_state() for generator in t["generators"])
    state = {"format": CHECKPOINT_FORMAT, "run_config": t["run_config"], "run": dict(t["run"]), "history": t["history"],
             "best": t["best"], "model": t["model"].state_dict(), "best_model": t["best_model"],
             "optimizer": t["optimizer"].state_dict(), "scheduler": t["scheduler"].state_dict(),
             "scaler": t["scaler"].state_dict(),
             "rng": {"torch": torch.get_rng_state(), "order": order, "augment": augment}}  # fmt: skip
    for name in ("last.pt", "best.pt")[: 1 + best]:  # last.pt first: a kill between the saves loses nothing
        save_checkpoint(checkpoints / name, state)


def load_checkpoint(path: str | Path) -> dict:
    """`weights_only=True`: the unpickler builds only tensors and plain containers, so a file crafted to run code
    when unpickled is refused instead of executed. Every failure to load is one error line."""
    try:
        with warnings.catch_warnings():  # a plain pickle makes torch warn before it refuses: the refusal is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, a folder, truncated, not a torch file, or a forbidden global in the pickle
        refused = "Weights only load failed" in str(error)
        reason = "a weights-only load refuses what it holds" if refused else getattr(error, "strerror", None)
        reason = reason or helpers.error_summary(error)
        raise helpers.UserError(f"cannot load checkpoint {path}: {reason} (check the --resume path)") from None
    ours = isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
    hint = f"(pass a file from {OUT}/checkpoints)"
    helpers.require(ours, f"{path} is not a checkpoint of this lesson, or is one of an earlier version {hint}")
    return state


def resume_config(cfg, state: dict, ddp) -> helpers.Config:
    """The checkpoint's settings, checked with the same declarations as the flags; a flag that contradicts one is
    refused with one line naming the saved value. Device, precision, out and the like stay free."""
    path, saved = cfg.resume, state.get("run_config")
    try:
        checked, world = helpers.config(globals(), {key: saved[key] for key in RESUME_KEYS}), saved["world_size"]
    except (KeyError, TypeError, helpers.UserError) as error:
        why = f"a saved setting is missing or fails its check: {error}"
        raise helpers.UserError(f"checkpoint {path} is damaged: {why} (pass a checkpoint of this lesson)") from None
    for key in RESUME_KEYS:
        keep = f"leave --{key.replace('_', '-')} out to continue with {checked[key]}"
        written = f"checkpoint {path} was written for {key} {checked[key]!r}, this run has {cfg[key]!r}"
        helpers.require(key not in cfg.explicit or cfg[key] == checked[key], f"{written} ({keep})")
    launch = "python 06_practical_example.py" if world == 1 else f"torchrun with {world} processes in all"
    written = f"checkpoint {path} was written with world_size {world}, this run's world_size is {ddp.world}"
    helpers.require(world == ddp.world, f"{written} (resume it with {launch})")
    merged = helpers.Config({**cfg, **{key: checked[key] for key in RESUME_KEYS}})
    merged.lesson, merged.explicit = cfg.lesson, cfg.explicit | {"dataset"}  # the saved dataset, never a fallback
    return merged


def restore(t: dict, state: dict, cfg) -> None:
    """Weights, optimiser, schedule, scaler, random states and progress; any damage is one error line."""
    spe, planned = t["steps_per_epoch"], dict(vars(t["shape"]))  # the plan: the scheduler's state holds the saved one
    try:
        for key in ("model", "optimizer", "scheduler"):
            t[key].load_state_dict(state[key])
        if state["scaler"] and t["scaler"].is_enabled():  # resumed in fp16 after bf16 or fp32: a fresh scaler
            t["scaler"].load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        t["generators"][0].set_state(state["rng"]["order"])
        t["generators"][1].set_state(state["rng"]["augment"])
        run, history, best = dict(state["run"]), list(state["history"]), dict(state["best"])
        consistent = 0 <= run["epoch"] <= cfg.epochs and 0 <= run["step"] < spe and math.isfinite(run["loss_sum"])
        consistent &= t["scheduler"].last_epoch == run["epoch"] * spe + run["step"] and vars(t["shape"]) == planned
        consistent &= len(history) == run["epoch"] and (best["epoch"] > 0) == (state["best_model"] is not None)
        if not consistent:
            raise ValueError(f"step {run['step']} of epoch {run['epoch'] + 1} does not match its schedule and history")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as error:
        why = f"{helpers.error_summary(error)} (pass a checkpoint of this lesson)"
        raise helpers.UserError(f"checkpoint {cfg.resume} is damaged: {why}") from None
    kept = f"{cfg.resume} (epoch {run['epoch']}, step {run['step']}) is kept"
    t.update(run=run, history=history, best=best, best_model=state["best_model"], kept=kept)


def resume_command(cfg, path: Path, ddp) -> str:
    """The command that continues this run, quoted for a POSIX shell (paths may hold spaces)."""
    launcher = ["python"] if ddp.world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={ddp.world}"]
    words = [*launcher, "06_practical_example.py", "--resume", str(path)]
    for key in ("out", "data_dir", "device", "precision"):
        words += ["--" + key.replace("_", "-"), str(cfg[key])] if key in cfg.explicit else []
    return " ".join(shlex.quote(word) for word in words)


@contextlib.contextmanager
def stop_requests(stop: dict):
    """The first Ctrl-C or SIGTERM (what schedulers send before a kill) asks the loop to stop after the current step
    and save; a second one interrupts at once. Outside the main thread (no signals there) nothing changes."""

    def handler(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt(signum)
        stop.update(requested=True, signal=signum)  # the processes then agree on where to stop, and stop together
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step and saving a checkpoint (again to abort)", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def build_training(cfg, data, device, amp_dtype, ddp, state: dict | None) -> dict:
    """Model (channels-last, DDP, torch.compile), SGD, the schedule and the fp16 scaler; restored when resuming."""
    steps_per_epoch = len(data.train_x) // cfg.batch_size
    generator = helpers.seed_everything(cfg.seed)  # the weights, then the data order, come from the seed
    model = CIFAR_MODELS[cfg.model](data.num_classes)
    if cfg.sync_bn and ddp.world > 1:  # statistics all-reduced over the processes
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    cuda = [device.index] if device.type == "cuda" else None  # DDP averages the gradients over the processes
    trained = nn.parallel.DistributedDataParallel(model, device_ids=cuda) if ddp.world > 1 else model
    trained = torch.compile(trained) if cfg.compile else trained  # shares its parameters with `model`
    optimizer = torch.optim.SGD(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.momentum > 0)  # fmt: skip
    shape = LearningRateShape(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.schedule)
    saved = {key: cfg[key] for key in RESUME_KEYS} | {"dataset": data.name, "num_train": len(data.train_x)}
    t = {
        "model": model, "trained_model": trained, "optimizer": optimizer, "shape": shape,
        "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, shape),
        "scaler": torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),  # fp16 would underflow
        "generators": (generator, torch.Generator().manual_seed(cfg.seed + 1)),  # data order, augmentation
        "steps_per_epoch": steps_per_epoch, "run_config": saved | {"world_size": ddp.world},
        "run": {"epoch": 0, "step": 0, "order_state": generator.get_state(), "loss_sum": 0.0, "correct": 0, "seen": 0},
        "history": [], "best": {"val_accuracy": -1.0, "epoch": 0}, "best_model": None,
        "kept": "no checkpoint was written",
    }  # fmt: skip
    if state is not None:
        restore(t, state, cfg)
    return t


sorted(RESUME_KEYS)  # the settings a checkpoint owns: --resume refuses a flag that contradicts one


# %% Distributed data parallel under torchrun
# `torchrun --nproc_per_node N 06_practical_example.py` starts N copies of this script and tells each its place:
# WORLD_SIZE processes in all, RANK its number, LOCAL_RANK its GPU. Every process draws the same global batch of B
# indices and augments all B images with the shared generators (so the random numbers stay in step), then trains
# on its slice batch[rank::world]. DDP averages the gradients, so every process takes one process's step. Batch
# norm is the exception: each process normalises over its own B / world images unless --sync-bn (GPUs only).
Distributed = collections.namedtuple("Distributed", "rank world local_rank")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # the same, as torchrun names them


def distributed_context() -> Distributed:  # a plain `python` run is rank 0 of 1
    return Distributed(*(int(os.environ.get(key, "1" if key == "WORLD_SIZE" else "0")) for key in TORCHRUN_VARIABLES))


def rank_slice(batch: torch.Tensor, ddp) -> torch.Tensor:  # rows rank, rank + world, ...: (B, ...) -> (B / world, ...)
    return batch[ddp.rank :: ddp.world] if ddp.world > 1 else batch


def all_reduce(ddp, tensor: torch.Tensor) -> torch.Tensor:  # the sum over all processes, in place
    if ddp.world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def share_buffers_of_rank0(model: nn.Module, ddp) -> None:  # every process then evaluates what process 0 saves
    for buffer in model.buffers() if ddp.world > 1 else ():
        torch.distributed.broadcast(buffer, src=0)


@contextlib.contextmanager
def process_group(ddp, device: torch.device, cfg):
    """Under torchrun: join the other processes (NCCL between GPUs, gloo between CPU processes), on the CPU or the
    GPU numbered LOCAL_RANK, and leave however the run ends. Yields this process's device."""
    if ddp.world == 1:
        yield device
        return
    leftover = f"WORLD_SIZE={ddp.world} and RANK={ddp.rank} are set, but torchrun did not start this process"
    helpers.require("TORCHELASTIC_RUN_ID" in os.environ, f"{leftover} (unset them, or launch with torchrun)")
    where = f"torchrun runs on CUDA or the CPU, not {device.type} (pass --device cuda or cpu)"
    helpers.require(device.type in ("cpu", "cuda"), where)
    uneven = f"--batch-size {cfg.batch_size} does not split evenly over {ddp.world} processes"
    helpers.require(cfg.batch_size % ddp.world == 0, uneven)
    helpers.require(not cfg.sync_bn or device.type == "cuda", "--sync-bn needs CUDA (SyncBatchNorm runs on GPUs only)")
    if device.type == "cuda":
        no_gpu = f"LOCAL_RANK {ddp.local_rank} has no GPU here (lower --nproc_per_node)"
        helpers.require(ddp.local_rank < torch.cuda.device_count(), no_gpu)
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(minutes=5))  # fmt: skip
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


{key: os.environ.get(key) for key in TORCHRUN_VARIABLES}  # torchrun sets them; `python` none


# %% Lesson 02's CIFAR ResNets, assembled here from torchvision's BasicBlock and Bottleneck (lesson 02 proves its own
# blocks equal to them) so that this lesson stands alone; tests/test_standalone.py proves each model equal to lesson
# 02's, down to the weights drawn from the same seed. Every block computes y = relu(F(x, {W_i}) + x)  (Eq. 1).
class ShortcutA(nn.Module):  # option A: subsample, then zero-pad the new channels; no parameters
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.new_channels, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.new_channels))


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:  # option B: W_s x (Eq. 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class CifarStemResNet(nn.Module):
    """A 3x3 stride-1 stem, then stages of blocks that halve the side and double the width, global average pooling
    and a linear classifier: He et al.'s CIFAR nets (widths 16-64, option A) and ImageNet's ResNets (64-512)."""

    def __init__(self, block, blocks_per_stage, widths, num_classes: int, make_shortcut=projection):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks_per_stage), start=1):
            blocks = []
            for b in range(count):
                stride = 2 if b == 0 and index > 1 else 1
                blocks.append(block(channels, width, stride))  # F(x) and the addition; the shortcut is x ...
                if stride != 1 or channels != width * block.expansion:  # ... unless the shape changes
                    blocks[-1].downsample = make_shortcut(channels, width * block.expansion, stride)
                channels = width * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.num_stages, self.avgpool, self.fc = len(widths), nn.AdaptiveAvgPool2d(1), nn.Linear(channels, num_classes)
        for module in self.modules():  # He et al.'s init, as torchvision applies it
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 3, 32, 32) -> (B, C, 32, 32)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)  # each stage after the first halves H and W
        return self.fc(self.avgpool(x).flatten(1))  # (B, C', H', W') -> (B, C') -> (B, K)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarStemResNet:  # 6n + 2 layers, option A shortcuts
    return CifarStemResNet(BasicBlock, [(depth - 2) // 6] * 3, (16, 32, 64), num_classes, ShortcutA)


IMAGENET_BLOCKS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
                   "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3]),
                   "resnet152": (Bottleneck, [3, 8, 36, 3])}  # fmt: skip
CIFAR_MODELS = {f"resnet{depth}": functools.partial(cifar_resnet, depth) for depth in (8, 20, 32, 44, 56, 110)}
for name, (block, blocks_per_stage) in IMAGENET_BLOCKS.items():  # the 3x3-stem ImageNet ResNets
    CIFAR_MODELS[f"cifar_{name}"] = functools.partial(CifarStemResNet, block, blocks_per_stage, (64, 128, 256, 512))


# The quick demo's model and --full's: parameters and multiply-adds per 32x32 image.
helpers.format_table([{"model": m, "parameters": helpers.count_parameters(CIFAR_MODELS[m](10)), "G multiply-adds":
    helpers.count_multiply_adds(CIFAR_MODELS[m](10), (1, 3, 32, 32)) / 1e9} for m in (MODEL, FULL_OVERRIDES["model"])],
    [("model", ""), ("parameters", ",d"), ("G multiply-adds", ".3f")])  # fmt: skip


# %% Run the lesson (in a notebook: with the constants as the cells above left them)
if __name__ == "__main__":
    helpers.run_cli(main, globals())
