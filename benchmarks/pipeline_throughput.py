"""Training throughput of lesson 06's pipeline against the common baseline, one change at a time, side by side.

    python benchmarks/pipeline_throughput.py                         # needs CIFAR-10 in data/
    python benchmarks/pipeline_throughput.py --generated-if-missing  # or a generated set in its file format
    python benchmarks/pipeline_throughput.py --generated-if-missing --next-factors   # what else pays

Four pipelines, each adding one change to the row above it (the ablation):
  baseline            torchvision `CIFAR10` + `DataLoader` with PIL transforms (RandomCrop(32, 4),
                      RandomHorizontalFlip, ToTensor, Normalize), fp32, NCHW: the pipeline of most CIFAR tutorials
  + bf16 autocast     the same, with the forward pass under autocast (bf16 where the device has it natively)
  + channels-last     the same, with model and batches in channels-last (NHWC) memory layout
  + device-resident   lesson 06: the whole dataset as uint8 on the device, crop/flip in batches there,
    augmentation      normalisation on the fly (no DataLoader, no PIL, no worker processes)
Same model, batch size, optimiser (SGD, Nesterov, weight decay), loss and number of timed steps.

Robust timing: every pipeline is built and warmed up once (oneDNN and cuDNN pick kernels on first use); then
`--rounds` rounds each time `--steps` steps of every pipeline, in alternating order (A B C D, D C B A, ...), so
that a slow spell of the machine hits all of them. The table gives the median over rounds and the range; the
speed-up is computed within each round (this round's pipeline over this round's baseline).

Share of peak: achieved FLOP/s = images/s x 3 x 2 x multiply-adds of one forward pass (the backward pass costs
about twice the forward), divided by the best rate this device's own kernels reach in the dtype the pipeline
computes in, measured here: the faster of a square GEMM (torch.mm) and a large 3x3 convolution. A nominal
clock x FLOP-per-cycle figure is not used: CPUs boost above their nominal clock, so against such a figure a
pipeline could seem to run above 100% of peak. Override with --peak-gflops-fp32 / --peak-gflops-bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import cifar_format  # noqa: E402

import helpers  # noqa: E402


def load_lesson06():
    """Lesson 06 as a module (its file name starts with a digit, which `import` cannot spell)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lesson06", ROOT / "06_practical_example.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lesson06"] = module
    spec.loader.exec_module(module)
    return module


L06 = sys.modules.get("lesson06") or load_lesson06()


# =====================================================================================================
# Peak: what this device's best kernels reach
# =====================================================================================================
def _rate(run, flop: float, device: torch.device, seconds: float) -> float:
    """GFLOP/s of `run()`, timed for about `seconds` after two untimed calls."""
    for _ in range(2):
        run()
    helpers.synchronize(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        calls += 1
        if calls % 4 == 0:
            helpers.synchronize(device)
    helpers.synchronize(device)
    return flop * calls / (time.perf_counter() - started) / 1e9


@torch.no_grad()
def measured_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, str]:
    """Best GFLOP/s of a square GEMM and of a large 3x3 convolution in `dtype`, and which one won."""
    big = device.type == "cuda"
    n = 8192 if big else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    gemm = _rate(lambda: a @ b, 2 * n**3, device, seconds)
    batch, channels, size = (256, 512, 16) if big else (64, 256, 16)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype, memory_format=torch.channels_last)
    convolution = _rate(lambda: conv(x), 2 * batch * channels * channels * 9 * size * size, device, seconds)
    if gemm >= convolution:
        return gemm, f"GEMM {n}x{n} (conv 3x3: {convolution:.0f})"
    return convolution, f"conv 3x3, {channels} channels (GEMM {n}x{n}: {gemm:.0f})"


# =====================================================================================================
# The pipelines
# =====================================================================================================
def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(L06.parameter_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)


def dataloader(data_dir: Path, batch_size: int, workers: int, device: torch.device):
    """torchvision's CIFAR10 dataset through a DataLoader with PIL transforms: the baseline's input pipeline."""
    import torchvision
    import torchvision.transforms as T

    transform = T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ])  # fmt: skip
    dataset = torchvision.datasets.CIFAR10(str(data_dir), train=True, download=False, transform=transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def loader_batches(loader, device: torch.device):
    """(images, labels) from `loader` forever, moved to `device`."""
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def device_resident_batches(data: helpers.ImageData, batch_size: int, seed: int):
    """(uint8 images cropped and flipped on the device, labels) forever: lesson 06's input pipeline."""
    generator = torch.Generator().manual_seed(seed)
    for index in helpers.endless_batches(len(data.train_x), batch_size, generator):
        index = index.to(data.train_x.device)
        yield L06.augment(data.train_x[index], 0, generator), data.train_y[index]


@dataclasses.dataclass
class Setting:
    """One pipeline: where batches come from, the autocast dtype (None: fp32) and the memory layout."""

    label: str
    resident: bool
    amp_dtype: torch.dtype | None
    channels_last: bool
    batch_size: int
    threads: int = 0  # 0: leave torch's thread count alone
    compile: bool = False


class Pipeline:
    """A model, its optimiser and its batches, kept alive between timing rounds."""

    def __init__(self, model_name: str, setting: Setting, source: dict, device: torch.device, warmup: int):
        self.setting, self.device, self.data = setting, device, source.get("data")
        torch.manual_seed(0)
        layout = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = L06.CIFAR_MODELS[model_name](10).to(device, memory_format=layout).train()
        self.forward = torch.compile(self.model) if setting.compile else self.model
        self.optimizer = make_optimizer(self.model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.loader = None
        if setting.resident:
            self.batches = device_resident_batches(source["data"], setting.batch_size, seed=0)
        else:
            self.loader = dataloader(source["data_dir"], setting.batch_size, source["workers"], device)
        started = time.perf_counter()
        self.seconds(max(warmup - 1, 0))  # seconds() runs one more untimed step first
        self.warmup_s = time.perf_counter() - started

    def step(self) -> None:
        images, labels = next(self.batches)
        if self.setting.resident:
            x = L06.to_model_input(images, self.data, self.setting.channels_last)
        else:
            x = images.contiguous(memory_format=torch.channels_last) if self.setting.channels_last else images
        with helpers.autocast(self.device, self.setting.amp_dtype):
            logits = self.forward(x)
        loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def seconds(self, steps: int) -> float:
        """Wall-clock seconds of `steps` training steps, after one untimed step. A DataLoader's worker processes
        exist only while its pipeline runs (they start before that untimed step), so that no pipeline is timed
        beside another one's workers."""
        threads = torch.get_num_threads()
        if self.setting.threads:
            torch.set_num_threads(self.setting.threads)
        if self.loader is not None:
            self.batches = loader_batches(self.loader, self.device)
        try:
            self.step()
            helpers.synchronize(self.device)
            started = time.perf_counter()
            for _ in range(steps):
                self.step()
            helpers.synchronize(self.device)
            return time.perf_counter() - started
        finally:
            if self.loader is not None:
                self.batches.close()  # ends the loader's iterator, and with it its worker processes
            torch.set_num_threads(threads)


def alternating(items: list, round_number: int) -> list:
    """`items` in even rounds, reversed in odd ones (A B C, C B A, ...), so that a slow spell hits every item."""
    return items if round_number % 2 == 0 else items[::-1]


def side_by_side(pipelines: list[Pipeline], rounds: int, steps: int) -> list[list[float]]:
    """images/s of each pipeline in each round; the order alternates between rounds (A B C, C B A, ...)."""
    rates = [[0.0] * rounds for _ in pipelines]
    for round_number in range(rounds):
        for i, pipeline in alternating(list(enumerate(pipelines)), round_number):
            rates[i][round_number] = steps * pipeline.setting.batch_size / pipeline.seconds(steps)
    return rates


def median_and_range(values: list[float], digits: int) -> tuple[float, str]:
    """The median, and the range over rounds as text ("0.95-1.25")."""
    return statistics.median(values), f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def ablation_settings(batch_size: int, amp_dtype: torch.dtype | None) -> list[Setting]:
    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32: no native bf16"}[amp_dtype]
    return [
        Setting("baseline (DataLoader + PIL, fp32, NCHW)", False, None, False, batch_size),
        Setting(f"+ autocast ({amp_name})", False, amp_dtype, False, batch_size),
        Setting("+ channels-last", False, amp_dtype, True, batch_size),
        Setting("+ device-resident augmentation = lesson06", True, amp_dtype, True, batch_size),
    ]


def next_factor_settings(lesson06: Setting) -> list[Setting]:
    """Changes tried on top of lesson 06's pipeline, each timed against it side by side."""
    variants = [
        dataclasses.replace(lesson06, label=f"batch {2 * lesson06.batch_size}", batch_size=2 * lesson06.batch_size),
        dataclasses.replace(lesson06, label=f"batch {lesson06.batch_size // 2}", batch_size=lesson06.batch_size // 2),
        dataclasses.replace(lesson06, label="torch.compile", compile=True),
    ]
    if torch.get_num_threads() > 1:
        variants.append(dataclasses.replace(lesson06, label="1 thread instead of all", threads=1))
    return variants


def time_evaluation(model_name: str, data: helpers.ImageData, device, amp_dtype, batch_size: int, rounds: int):
    """Evaluation images/s of helpers.evaluate (lesson 06's validation and test pass, which runs under no_grad),
    as it is and wrapped in inference_mode, side by side."""
    torch.manual_seed(0)
    model = L06.CIFAR_MODELS[model_name](10).to(device, memory_format=torch.channels_last)
    images, labels = data.train_x[: 4 * batch_size], data.train_y[: 4 * batch_size]

    def images_per_s(context) -> float:
        helpers.synchronize(device)
        started = time.perf_counter()
        with context():
            helpers.evaluate(model, images, labels, data.mean, data.std, device, amp_dtype, batch_size, True)
        return len(images) / (time.perf_counter() - started)  # evaluate() reads its results: no sync needed

    contexts = {"no_grad": contextlib.nullcontext, "inference_mode": torch.inference_mode}  # evaluate: no_grad
    images_per_s(contextlib.nullcontext)  # oneDNN picks its inference kernels here
    rates = {name: [] for name in contexts}
    for round_number in range(rounds):
        for name, context in alternating(list(contexts.items()), round_number):
            rates[name].append(images_per_s(context))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18"], help="CIFAR models to time")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step, every pipeline")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per pipeline in each round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, alternating the pipelines' order")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each pipeline before the rounds")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--data-dir",
        default="data",
        type=lambda path: os.path.expanduser(os.path.expandvars(path)),
        help="folder holding cifar-10-batches-py/",
    )
    parser.add_argument(
        "--generated-if-missing", action="store_true",
        help="when CIFAR-10 is not in --data-dir, time on a generated image set written in CIFAR-10's file format",
    )  # fmt: skip
    parser.add_argument(
        "--next-factors", action="store_true",
        help="also time batch size, threads, torch.compile and inference-mode evaluation against lesson06",
    )  # fmt: skip
    parser.add_argument("--peak-gflops-fp32", type=float, default=None, help="use this fp32 peak, not a measured one")
    parser.add_argument("--peak-gflops-bf16", type=float, default=None, help="use this bf16 peak, not a measured one")
    args = parser.parse_args()
    generated = []  # folders of generated data, removed however the run ends
    try:
        run(args, generated)
    except helpers.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for folder in generated:
            shutil.rmtree(folder, ignore_errors=True)


def check_arguments(args) -> None:
    helpers.require(
        args.batch_size > 1 and args.steps > 0 and args.rounds > 0 and args.warmup >= 0,
        "--batch-size must be 2 or more, --steps and --rounds positive, --warmup 0 or more",
    )
    helpers.require(args.workers >= 0, f"--workers must be 0 or more DataLoader processes, not {args.workers}")
    for flag, value in (("--peak-gflops-fp32", args.peak_gflops_fp32), ("--peak-gflops-bf16", args.peak_gflops_bf16)):
        if value is not None:
            helpers.require(math.isfinite(value), f"{flag} is {value}, not a finite number")
            helpers.require(value > 0, f"{flag} must be > 0, not {value:g}")
    unknown = [m for m in args.models if m not in L06.CIFAR_MODELS]
    helpers.require(not unknown, f"unknown model(s) {', '.join(unknown)} (use: {', '.join(L06.CIFAR_MODELS)})")


def cifar_folder(args, generated: list) -> tuple[Path, str]:
    """The folder holding cifar-10-batches-py/, and a sentence saying whether it is the real CIFAR-10."""
    data_dir = Path(args.data_dir)
    if (data_dir / "cifar-10-batches-py" / "data_batch_1").exists():
        return data_dir, "CIFAR-10"
    helpers.require(
        args.generated_if_missing,
        f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py (copy it there, or pass --generated-if-missing)",
    )
    data_dir = Path(tempfile.mkdtemp(prefix="cifar10-format-"))
    generated.append(data_dir)  # 47 MB: removed at the end
    cifar_format.trust_files(cifar_format.write_cifar10_format(data_dir, 10000, 1000))
    return (
        data_dir,
        f"GENERATED images in CIFAR-10's file format ({data_dir}, removed at the end; real CIFAR-10 not found)",
    )


def run(args, generated: list) -> None:
    check_arguments(args)
    device = helpers.pick_device(args.device)
    amp_dtype = helpers.autocast_dtype(device)
    data_dir, source_text = cifar_folder(args, generated)
    data = helpers.load_dataset("cifar10", data_dir, val_size=1, download=False).to(device)
    source = {"data": data, "data_dir": data_dir, "workers": args.workers}
    given = {torch.float32: args.peak_gflops_fp32, amp_dtype: args.peak_gflops_bf16}
    peaks = {  # GFLOP/s and how it was obtained, for fp32 and the autocast dtype
        dtype: (given[dtype], "given") if given[dtype] else measured_peak(device, dtype)
        for dtype in (torch.float32, amp_dtype)
        if dtype is not None
    }
    print(f"data: {source_text}")
    print(f"device: {helpers.device_name(device)}; autocast dtype: {amp_dtype}")
    for dtype, (peak, how) in peaks.items():
        print(f"peak {str(dtype).removeprefix('torch.')}: {peak:.0f} GFLOP/s ({how})")
    print(
        f"batch {args.batch_size}; {args.warmup} warm-up steps, then {args.rounds} rounds of {args.steps} timed steps"
        f" per pipeline; DataLoader with {args.workers} workers"
    )
    print("timing needs a quiet machine: other processes on the same cores slow the pipelines unequally\n")

    settings = ablation_settings(args.batch_size, amp_dtype)
    ratios = {}
    for name in args.models:
        flop_per_image = 3 * 2 * helpers.count_multiply_adds(L06.CIFAR_MODELS[name](10), (1, 3, 32, 32))
        pipelines = [Pipeline(name, setting, source, device, args.warmup) for setting in settings]
        rates = side_by_side(pipelines, args.rounds, args.steps)
        rows = []
        for setting, rate in zip(settings, rates):
            images_per_s, spread = median_and_range(rate, 0)
            speed_up, speed_up_spread = median_and_range([ours / base for ours, base in zip(rate, rates[0])], 2)
            peak = peaks[setting.amp_dtype or torch.float32][0]
            rows.append({
                "pipeline": setting.label, "img/s": images_per_s, "range": spread,
                "% of peak": 100 * images_per_s * flop_per_image / 1e9 / peak,
                "speed-up": speed_up, "speed-up range": speed_up_spread,
            })  # fmt: skip
        ratios[name] = rows[-1]
        helpers.print_table(
            rows,
            [
                ("pipeline", ""),
                ("img/s", ".1f"),
                ("range", ""),
                ("% of peak", ".0f"),
                ("speed-up", ".2f"),
                ("speed-up range", ""),
            ],  # fmt: skip
            title=f"{name}: training images/s, median of {args.rounds} rounds (speed-up over the baseline)",
        )
        if device.type == "cuda":
            print(f"{name}: one epoch of 50,000 images at lesson06 speed takes {50000 / rows[-1]['img/s']:.2f} s")
        del pipelines
        if args.next_factors:
            next_factors(name, settings[-1], source, device, args)
        print()
    for name, row in ratios.items():
        print(f"{name}: lesson06 / baseline = {row['speed-up']:.2f}x (range over rounds {row['speed-up range']})")


def next_factors(name: str, lesson06: Setting, source: dict, device, args) -> None:
    """Each change on top of lesson 06's pipeline, timed side by side with it."""
    control = Pipeline(name, lesson06, source, device, args.warmup)  # lesson 06's pipeline, timed beside each change
    rows = []
    for variant in next_factor_settings(lesson06):
        try:
            changed = Pipeline(name, variant, source, device, args.warmup)
        except Exception as error:  # noqa: BLE001 - e.g. torch.compile without a working C++ compiler
            rows.append(
                {"change": variant.label, "ratio": float("nan"), "range": "", "note": helpers.error_summary(error)}
            )
            continue
        rates = side_by_side([control, changed], args.rounds, args.steps)
        ratio, spread = median_and_range([b / a for a, b in zip(*rates)], 2)
        note = f"first steps took {changed.warmup_s:.0f} s (compiling)" if variant.compile else ""
        rows.append({"change": variant.label, "ratio": ratio, "range": spread, "note": note})
    evaluation = time_evaluation(name, source["data"], device, lesson06.amp_dtype, lesson06.batch_size, args.rounds)
    ratio, spread = median_and_range([b / a for a, b in zip(evaluation["no_grad"], evaluation["inference_mode"])], 2)
    rows.append({
        "change": "evaluation: inference_mode instead of no_grad", "ratio": ratio, "range": spread,
        "note": f"{statistics.median(evaluation['no_grad']):.0f} img/s under no_grad",
    })  # fmt: skip
    helpers.print_table(
        rows,
        [("change", ""), ("ratio", ".2f"), ("range", ""), ("note", "")],
        title=f"{name}: next factors (images/s with the change / without it, median of {args.rounds} rounds)",
    )


if __name__ == "__main__":
    main()
