"""Plumbing shared by the lessons: device, seeding, tables, progress, saving files, the training loop.

Nothing here teaches residual networks; the ideas live in the numbered lessons. Two concerns have their own
module, and this one re-exports what the lessons call from them:
  lesson_config.py  the constants block -> configuration, command-line flags, notebook runs, one-line errors
  image_data.py     the datasets as uint8 tensors: download, checks, the synthetic set, the fallback rule
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_data import DATASETS, ImageData, check_data_dir, load_data, load_dataset, make_synthetic  # noqa: F401
from lesson_config import (  # noqa: F401
    Config,
    UserError,
    config,
    constants_as_keywords,
    error_summary,
    expand_path,
    in_notebook,
    require,
    require_number,
    require_positive,
    require_seed,
    run_cli,
)

REPO_DIR = Path(__file__).resolve().parent


def require_memory(num_bytes: float, what: str) -> None:
    """Refuse, before trying, a tensor that cannot fit in this machine's memory (an allocation that size
    either fails with a long allocator message or, with overcommit, gets the process killed later)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: let the allocator decide
        return
    require(
        num_bytes < total / 2,
        f"{what} needs {num_bytes / 2**30:,.1f} GiB, more than half of this machine's {total / 2**30:,.0f} GiB of memory (use smaller sizes)",
    )


# =====================================================================================================
# Loading a numbered lesson as a module
# =====================================================================================================
def load_lesson(number: str | int):
    """Import a lesson file by its number: `load_lesson(2)` returns `02_resnet_implementation.py` as a
    module. File names start with digits, which `import` cannot spell. The module is registered as
    `lesson02` so that pickling and `torch.save` can find its classes again."""
    prefix = f"{int(str(number)[:2]):02d}_"
    matches = sorted(REPO_DIR.glob(prefix + "*.py"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one lesson file named {prefix}*.py in {REPO_DIR}")
    name = "lesson" + prefix[:2]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, matches[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# =====================================================================================================
# Device, precision, seeding
# =====================================================================================================
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what autocast_dtype accepts


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU. Asking for one that is absent is a UserError."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    require(name in ("cpu", "cuda", "mps"), f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    require(name != "cuda" or torch.cuda.is_available(), "CUDA is not available here (use --device cpu or auto)")
    require(name != "mps" or mps_available, "MPS is not available here (use --device cpu or auto)")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX on x86, BF16 on Arm).

    Without them, bf16 autocast on the CPU is emulated and slower than fp32, so it must be detected."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2", "DEFAULT"
    except AttributeError:
        capability = ""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    if platform.machine() in ("arm64", "aarch64"):
        return "bf16" in flags or sys.platform == "darwin"
    return "AVX512" in capability and ("avx512_bf16" in flags or "amx_bf16" in flags)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32.

    `auto`: bf16 where the hardware does it natively (CUDA compute capability >= 8.0, CPUs with
    AVX512-BF16/AMX), fp16 on older CUDA GPUs (then a GradScaler is needed), fp32 elsewhere (MPS included)."""
    require(precision in PRECISIONS, f"unknown precision {precision!r} (use auto, fp32, bf16 or fp16)")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context for the forward pass; a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data order, so that the data order does
    not depend on how many random numbers the model's initialisation drew."""
    require_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# =====================================================================================================
# Output: tables, progress, results.json, figures, atomic writes
# =====================================================================================================
class Table(str):
    """A formatted table: it prints as itself, and a notebook cell that ends in one shows it as text."""

    def __repr__(self) -> str:
        return str(self)


def format_table(rows: list[dict], columns: list[tuple[str, str]] | None = None, title: str | None = None) -> Table:
    """A fixed-width text table. `columns` is a list of (key, format), e.g. [("depth", "d"), ("ratio", ".2e")];
    headers are the keys. Numbers are right-aligned, text left-aligned."""
    if not rows:
        return Table(title or "")
    columns = columns or [(key, "") for key in rows[0]]
    cells = [[format(row[key], spec) if row.get(key) is not None else "-" for key, spec in columns] for row in rows]
    widths = [max(len(key), *(len(r[i]) for r in cells)) for i, (key, _) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), (int, float)) for row in rows) for key, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line([key for key, _ in columns]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return Table("\n".join(out))


def print_table(rows, columns=None, title=None) -> None:
    print(format_table(rows, columns, title), end="\n\n", flush=True)


class Progress:
    """A progress bar (tqdm) with throughput on a terminal, plain periodic lines when output is a file or a
    pipe, so that logs stay readable. Use as `for step in Progress(range(n), "train", unit="img", scale=B)`.
    `scale` converts one step into units (e.g. images per batch) for the throughput figure."""

    def __init__(
        self, iterable, desc: str, total: int | None = None, unit: str = "it", scale: int = 1, every_s: float = 10.0
    ):
        self.iterable, self.desc, self.unit, self.scale, self.every_s = iterable, desc, unit, scale, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if getattr(self, "_bar", None) is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def __iter__(self):
        if sys.stdout.isatty() and not os.environ.get("NO_PROGRESS_BAR"):
            from tqdm import tqdm

            self._bar = tqdm(
                total=None if self.total is None else self.total * self.scale,
                desc=self.desc,
                unit=self.unit,
                unit_scale=True,
                leave=False,
                dynamic_ncols=True,
            )
            with self._bar:
                for item in self.iterable:
                    yield item
                    self._bar.update(self.scale)
            self._bar = None
            return
        start = last = time.perf_counter()
        for done, item in enumerate(self.iterable, start=1):
            yield item
            now = time.perf_counter()
            if now - last >= self.every_s:
                last = now
                of = f"/{self.total}" if self.total else ""
                rate = done * self.scale / (now - start)
                print(f"  {self.desc}: {done}{of} ({rate:,.0f} {self.unit}/s) {self.postfix}".rstrip(), flush=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file so that a crash never leaves it half-written: `write(tmp)` fills a temporary file in
    the same folder, which then replaces `path` in one `os.replace` (atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it what the user's umask allows
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def snake_case(key: str) -> str:
    """results.json's key style: `max |F(x)|` -> `max_f_x`, `N=8` -> `n_8`, `ms@32` -> `ms_at_32`. Hyphens
    stay: they belong to names used as keys (`resnet-20`, `fashion-mnist`, `when-shapes-match`)."""
    key = key.replace("@", " at ").replace("/", " over ").replace(" - ", " minus ")
    return re.sub(r"[^0-9a-z-]+", "_", key.lower()).strip("_")


def _jsonable(value: Any) -> Any:
    """JSON-ready copy of `value`. Keys become snake_case, and a rate is always a fraction: a table column
    in percent (`test_err_%`: 8.75) is saved as `test_err`: 0.0875."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = str(k)
            if k.endswith("%") and isinstance(v, (int, float)) and not isinstance(v, bool):
                k, v = k[:-1], v / 100
            out[snake_case(k)] = _jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return value


def save_results(out_dir: str | Path, results: dict, cfg: Config, device: torch.device, started: float) -> Path:
    """Write `results.json`: the lesson's numbers plus the run's context (device, seed, versions, runtime)."""
    record = {
        "lesson": cfg.lesson or "notebook",
        "device": str(device),
        "device_name": device_name(device),
        "seed": cfg.get("seed"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "runtime_s": round(time.perf_counter() - started, 3),
        "config": dict(cfg),
        **results,
    }
    text = json.dumps(_jsonable(record), indent=2)
    return atomic_write(Path(out_dir) / "results.json", lambda tmp: tmp.write_text(text + "\n"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return device.type


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically, show it when running in a notebook, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if in_notebook():
        from IPython.display import display

        display(fig)
    plt.close(fig)
    return path


def use_headless_matplotlib() -> None:
    """Select the file-only backend for command-line runs; a notebook keeps its inline backend."""
    import matplotlib

    if not in_notebook() and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")


def output_dir(cfg: Config) -> Path:
    """Create `cfg.out` and check that files can be written in it, before any long work; remove the temporary
    files of saves that a killed run left there."""
    out = writable_dir(cfg.out)
    remove_orphan_temporaries(out)
    return out


def remove_orphan_temporaries(folder: Path, min_age_s: float = 600) -> list[Path]:
    """Delete `atomic_write`'s temporary files (`.NAME.XXXXXXXX.tmp`) untouched for `min_age_s` seconds: a save
    rewrites its file continuously until it is renamed, so an old one belongs to a process that was killed
    mid-save (the age keeps a concurrent run's save in progress safe)."""
    removed = []
    now = time.time()
    for path in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if path.is_file() and now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed.append(path)
    return removed


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the folder `path` if needed and prove it writable by creating and removing a file in it, so that
    a read-only or blocked path (a file where the folder should be) fails now, not after an hour of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
        raise UserError(
            f"cannot write to output folder {path}: {reason} (pass {flag} with a writable folder)"
        ) from None
    return path


# =====================================================================================================
# Model inspection
# =====================================================================================================
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and linear layers, in registration order: the layers a ResNet's name counts."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Multiply-adds of one forward pass, from torch's own FLOP counter (which counts 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


# =====================================================================================================
# Training plumbing: batches on the device, augmentation in batches, an SGD loop, evaluation
# =====================================================================================================
def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float (B, C, H, W) with zero mean and unit variance per channel."""
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def random_crop_flip(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding by `pad` pixels, and a horizontal flip with probability 1/2,
    done for the whole batch at once on the batch's own device. (B, C, H, W) -> (B, C, H, W), dtype kept.
    (An idea of lesson 06, kept here because lesson 03's `sgd_train(augment=True)`, which lesson 04 uses too,
    needs it, and lesson 03 cannot import a later lesson.)"""
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator).to(images.device)  # (2, B)
    flips = (torch.rand(batch, generator=generator) < 0.5).to(images.device)  # (B,)
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # reading columns backwards flips the image
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_batches(
    num_items: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Shuffled index batches for one pass over the data (CPU indices; index device tensors with `.to`)."""
    order = torch.randperm(num_items, generator=generator)
    stop = num_items - num_items % batch_size if drop_last else num_items
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def endless_batches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches forever, reshuffling after every epoch (used by iteration-based schedules)."""
    require(
        batch_size <= num_items,
        f"batch size {batch_size} is larger than the {num_items} training images (lower --batch-size)",
    )
    while True:
        yield from epoch_batches(num_items, batch_size, generator)


def training_batches(
    data: ImageData, count: int, batch_size: int, device: torch.device, generator: torch.Generator
) -> list[torch.Tensor]:
    """`count` shuffled batches of normalised training images on `device`, without augmentation."""
    batches = endless_batches(len(data.train_x), batch_size, generator)
    return [
        normalize(data.train_x[index.to(data.train_x.device)].to(device), data.mean, data.std)
        for _, index in zip(range(count), batches)
    ]


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module, batches: list[torch.Tensor], amp_dtype: torch.dtype | None = None, channels_last: bool = False
) -> nn.Module:
    """Replace every batch-norm layer's running mean and variance by their plain average over `batches`
    (train-mode forward passes with the final weights; no gradient, no weight change). No batches: no change.

    It is here, not in a lesson, because lessons 03, 04 and 05 all evaluate networks after a few hundred
    steps at a high learning rate, when the running averages still describe much earlier weights; lesson 03
    explains the pitfall and measures it."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batches or not norms:
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: cumulative average, i.e. the plain mean over the batches seen
    was_training = model.training
    model.train()
    device = batches[0].device
    for x in batches:
        with autocast(device, amp_dtype):
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean,
    std,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 500,
    channels_last: bool = False,
) -> dict:
    """Loss, accuracy and logits of `model` in eval mode on a uint8 image tensor (kept on any device)."""
    was_training = model.training
    model.eval()
    logits = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits.append(model(x).float())
    model.train(was_training)
    logits = torch.cat(logits) if logits else torch.zeros(0, 1, device=device)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    accuracy = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return {"loss": loss, "accuracy": accuracy, "error": 1 - accuracy, "logits": logits}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (mini-batch curves are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
