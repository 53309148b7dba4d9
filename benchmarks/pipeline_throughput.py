"""Training throughput of lesson 06's pipeline against the common baseline, side by side in one run.

    python benchmarks/pipeline_throughput.py                       # needs CIFAR-10 in data/
    python benchmarks/pipeline_throughput.py --generated-if-missing  # or a generated set in its file format

baseline  torchvision `CIFAR10` dataset + `DataLoader` with PIL transforms (RandomCrop(32, 4),
          RandomHorizontalFlip, ToTensor, Normalize), fp32, NCHW (the pipeline of most CIFAR tutorials).
lesson06  the whole dataset as uint8 on the device, crop/flip in batches there, normalisation on the fly,
          autocast (bf16 where native), channels-last.
Same model, batch size, optimiser (SGD, Nesterov, weight decay), loss and number of timed steps. Each
pipeline runs `--warmup` untimed steps first (oneDNN and cuDNN pick kernels on first use).

Share of peak: achieved FLOP/s = images/s x 3 x 2 x multiply-adds of one forward pass (the backward pass
costs about twice the forward), divided by the device's peak for the dtype it computes in. The CPU peak is
an estimate: cores x clock x FLOP per cycle per core, where AMD Zen 4 does 32 fp32 FLOP/cycle (two 256-bit
FMA pipes; AVX-512 instructions are split in two halves) and 64 bf16 FLOP/cycle (VDPBF16PS does two
multiply-adds per 32-bit lane), and Intel cores with two 512-bit FMA units do 64 and 128. The clock is the
one /proc/cpuinfo reports (virtual machines report the nominal clock; turbo would lower the shares).
Override with --peak-gflops-fp32 / --peak-gflops-bf16.
"""

from __future__ import annotations

import argparse
import math
import shutil
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

L06 = helpers.load_lesson(6)

GPU_PEAK_TFLOPS = {  # dense tensor-core peak (fp32 non-tensor-core, bf16), from the vendors' data sheets
    "H100": (67.0, 989.0),  # SXM
    "H200": (67.0, 989.0),
    "A100": (19.5, 312.0),
}


def cpu_peak_gflops(threads: int) -> tuple[float, float, str]:
    """(fp32, bf16) peak GFLOP/s of `threads` cores, and how it was estimated."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = next((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), 2000.0)
    amd = "AuthenticAMD" in info
    avx512 = " avx512f" in info
    if avx512 and not amd:
        fp32, bf16, kind = 64, 128, "Intel AVX-512, two FMA units"
    elif avx512 or " avx2" in info:
        fp32, bf16, kind = 32, 64, "AMD Zen 4 (AVX-512 on 256-bit pipes)" if avx512 else "AVX2, two FMA units"
    else:
        fp32, bf16, kind = 16, 16, "unknown vector unit"
    if not helpers.cpu_has_native_bf16():
        bf16 = fp32  # emulated bf16 is no faster than fp32
    ghz = mhz / 1000
    how = f"{threads} cores x {ghz:.2f} GHz x {fp32} fp32 / {bf16} bf16 FLOP per cycle ({kind})"
    return threads * ghz * fp32, threads * ghz * bf16, how


def device_peak_gflops(device: torch.device, threads: int, args) -> tuple[float | None, float | None, str]:
    if device.type == "cpu":
        fp32, bf16, how = cpu_peak_gflops(threads)
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), (None, None))
        fp32, bf16 = (None if p is None else 1000 * p for p in peak)
        how = f"{name}: data-sheet dense peak" if peak[0] else f"{name}: peak unknown (pass --peak-gflops-*)"
    else:
        fp32 = bf16 = None
        how = "peak unknown (pass --peak-gflops-*)"
    fp32 = args.peak_gflops_fp32 or fp32
    bf16 = args.peak_gflops_bf16 or bf16
    return fp32, bf16, how


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(L06.parameter_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)


def time_baseline(model_name, data_dir, batch_size, steps, warmup, workers, device) -> float:
    """Images per second of the torchvision Dataset + DataLoader + PIL pipeline, fp32, NCHW."""
    import torchvision
    import torchvision.transforms as T

    transform = T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ])  # fmt: skip
    dataset = torchvision.datasets.CIFAR10(str(data_dir), train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = L06.model_registry()[model_name](10).to(device).train()
    optimizer, criterion = make_optimizer(model), nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            helpers.synchronize(device)
            started = time.perf_counter()
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    helpers.synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def time_lesson06(model_name, data, batch_size, steps, warmup, device, amp_dtype) -> float:
    """Images per second of lesson 06's pipeline: uint8 data on the device, batched augmentation, autocast,
    channels-last."""
    torch.manual_seed(0)
    model = L06.model_registry()[model_name](10).to(device).train().to(memory_format=torch.channels_last)
    optimizer, criterion = make_optimizer(model), nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(0)
    batches = helpers.endless_batches(len(data.train_x), batch_size, generator)
    for step in range(warmup + steps):
        if step == warmup:
            helpers.synchronize(device)
            started = time.perf_counter()
        index = next(batches).to(device)
        images = L06.augment(data.train_x[index], 0, generator)
        with helpers.autocast(device, amp_dtype):
            logits = model(L06.to_model_input(images, data, channels_last=True))
        loss = criterion(logits.float(), data.train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    helpers.synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=["resnet20", "cifar_resnet18"], help="CIFAR models to time")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step, both pipelines")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per pipeline and model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--data-dir", default="data", type=helpers.expand_path, help="folder holding cifar-10-batches-py/"
    )
    parser.add_argument(
        "--generated-if-missing", action="store_true",
        help="when CIFAR-10 is not in --data-dir, time on a generated image set written in CIFAR-10's file format",
    )  # fmt: skip
    parser.add_argument("--peak-gflops-fp32", type=float, default=None, help="override the estimated fp32 peak")
    parser.add_argument("--peak-gflops-bf16", type=float, default=None, help="override the estimated bf16 peak")
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


def run(args, generated: list) -> None:
    helpers.require(
        args.batch_size > 0 and args.steps > 0 and args.warmup >= 0, "--batch-size and --steps must be positive"
    )
    helpers.require(args.workers >= 0, f"--workers must be 0 or more DataLoader processes, not {args.workers}")
    for flag, value in (("--peak-gflops-fp32", args.peak_gflops_fp32), ("--peak-gflops-bf16", args.peak_gflops_bf16)):
        if value is not None:
            helpers.require_positive(flag, value)
    unknown = [m for m in args.models if m not in L06.model_registry()]
    helpers.require(not unknown, f"unknown model(s) {', '.join(unknown)} (use: {', '.join(L06.model_registry())})")
    device = helpers.pick_device(args.device)
    amp_dtype = helpers.autocast_dtype(device)
    data_dir, source = Path(args.data_dir), "CIFAR-10"
    if not (data_dir / "cifar-10-batches-py" / "data_batch_1").exists():
        helpers.require(
            args.generated_if_missing,
            f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py (copy it there, or pass --generated-if-missing)",
        )
        data_dir = Path(tempfile.mkdtemp(prefix="cifar10-format-"))
        generated.append(data_dir)  # 47 MB: removed at the end
        cifar_format.trust_files(cifar_format.write_cifar10_format(data_dir, 10000, 1000))
        source = f"GENERATED images in CIFAR-10's file format ({data_dir}, removed at the end; real CIFAR-10 not found)"
    data = helpers.load_dataset("cifar10", data_dir, val_size=1, download=False).to(device)
    threads = torch.get_num_threads()
    peak_fp32, peak_bf16, how = device_peak_gflops(device, threads, args)
    peak_amp = peak_bf16 if amp_dtype is not None else peak_fp32
    print(f"data: {source}")
    print(f"device: {helpers.device_name(device)}; lesson06 autocast: {amp_dtype or 'off (fp32)'}")
    print(f"peak estimate: {how} = {peak_fp32 or float('nan'):.0f} fp32 / {peak_bf16 or float('nan'):.0f} bf16 GFLOP/s")
    print(
        f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, baseline with {args.workers} workers"
    )
    print("machine load matters: other processes on the same cores lower both columns, not necessarily equally\n")

    rows = []
    for name in args.models:
        macs = helpers.count_multiply_adds(L06.model_registry()[name](10), (1, 3, 32, 32))
        flop_per_image = 3 * 2 * macs  # forward + backward (about twice the forward)
        base = time_baseline(name, data_dir, args.batch_size, args.steps, args.warmup, args.workers, device)
        ours = time_lesson06(name, data, args.batch_size, args.steps, args.warmup, device, amp_dtype)
        for pipeline, rate, peak in (("baseline fp32 NCHW", base, peak_fp32), ("lesson06", ours, peak_amp)):
            achieved = rate * flop_per_image / 1e9
            rows.append({
                "model": name, "pipeline": pipeline, "img/s": rate, "GFLOP/s": achieved,
                "% of peak": None if not peak else 100 * achieved / peak,
                "speed-up": rate / base,
            })  # fmt: skip
        if device.type == "cuda":
            print(f"{name}: one epoch of 50,000 images at lesson06 speed takes {50000 / ours:.2f} s")
    helpers.print_table(
        rows,
        [
            ("model", ""),
            ("pipeline", ""),
            ("img/s", ".1f"),
            ("GFLOP/s", ".1f"),
            ("% of peak", ".1f"),
            ("speed-up", ".2f"),
        ],
        title="Training throughput (% of peak: of the dtype each pipeline computes in)",
    )
    for name in args.models:
        ratio = next(r["speed-up"] for r in rows if r["model"] == name and r["pipeline"] == "lesson06")
        print(f"{name}: lesson06 / baseline = {ratio:.2f}x" + ("" if math.isfinite(ratio) else " (?)"))


if __name__ == "__main__":
    main()
