"""Plumbing shared by the six lessons, and nothing else: every idea lives in a numbered lesson.

A lesson's constants block (`NAME: type = value  # help [check]`, one per line) becomes the keywords of
`main(**overrides)` and its flags (`BATCH_SIZE` -> `--batch-size`), each checked against `[> 0]`, `[a | b]`, `[in NAMES]`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import platform
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- Errors a user can fix -------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem the user can fix; `run_cli` prints it as one `error: ...` line and exits with status 1."""


def require(condition: bool, message: str) -> None:  # message style: `<what> (<how to fix>)`
    if not condition:
        raise UserError(message)


def require_memory(num_bytes: float, what: str) -> None:  # before trying: with overcommit it would be killed later
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not POSIX: the allocator decides
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        gib = f"{num_bytes / 2**30:,.1f} GiB, more than half of this machine's {total / 2**30:,.0f} GiB of memory"
        require(num_bytes < total / 2, f"{what} needs {gib} (use smaller sizes)")


def error_summary(error: BaseException) -> str:
    """An exception's message on one line, without torch's C++ frames."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# --- The constants block -> config, flags, notebook runs -------------------------------------------------------------
MARKERS = ("# --- constants", "# --- end constants")
DECLARATION = re.compile(
    r"^(?P<name>[A-Z][A-Z0-9_]*): (?P<type>[\w\[\], .]+?) = [^#]*(?:#\s*(?P<help>.*?))?"
    r"(?:\s*\[(?P<check>[^\[\]]*)\])?\s*$"
)
TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": bool, "Path": str}
CHECKS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


@dataclasses.dataclass(frozen=True)
class Constant:
    name: str  # UPPER_CASE in the lesson; `key` is the keyword of main, `flag` the command-line flag
    type: str  # "int", "float", "str", "bool", "Path" or "tuple[int, ...]" etc.
    default: Any
    help: str = ""
    check: str = ""  # "> 0", ">= 0, < 1", "a | b", or "in NAMES" (a tuple the module defines)
    choices: tuple | None = None

    key = property(lambda self: self.name.lower())
    flag = property(lambda self: "--" + self.name.lower().replace("_", "-"))
    is_tuple = property(lambda self: self.type.startswith("tuple["))
    item_type = property(lambda self: self.type[6:-6] if self.is_tuple else self.type)


def read_constants(module_globals: dict) -> list[Constant]:
    """The declarations between the markers (in a notebook: of the last cell run that has them), values as now."""
    if module_globals.get("__file__"):
        text = Path(module_globals["__file__"]).read_text(encoding="utf-8")
    else:
        text = next((cell for cell in reversed(module_globals.get("_ih") or []) if MARKERS[0] in cell), "")
    block = text.split(MARKERS[0], 1)[-1].split(MARKERS[1], 1)[0] if MARKERS[1] in text else ""
    constants = []
    for match in map(DECLARATION.match, block.splitlines()):
        if match and match[0].count("(") != match[0].count(")"):
            raise RuntimeError(f"{match['name']}: keep each constant's declaration on one line")
        if match and match["name"] in module_globals:
            check = match["check"] or ""
            choices = [word.strip() for word in check.split("|")] if "|" in check else None
            choices = module_globals.get(check[3:].strip()) if check.startswith("in ") else choices
            value, helptext = module_globals[match["name"]], (match["help"] or "").strip()
            constants.append(Constant(match["name"], match["type"], value, helptext, check, choices and tuple(choices)))
            if constants[-1].item_type not in TYPES:
                raise RuntimeError(f"{match['name']}: unsupported type {match['type']!r}")
    return constants


def convert(constant: Constant, value: Any) -> Any:
    """`value` as the constant's declared type, checked against its declaration, else a UserError naming the flag."""
    flag, kind = constant.flag, constant.item_type
    if constant.is_tuple:
        values = value if isinstance(value, (list, tuple)) else [value]
        require(len(values) > 0, f"{flag} needs at least one value")
        item = dataclasses.replace(constant, type=kind)  # each value checked as the tuple's items
        return tuple(convert(item, v) for v in values)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"bool": isinstance(value, bool), "int": number and isinstance(value, int), "float": number}
    what = "a path" if kind == "Path" else kind + " values"
    require(ok.get(kind, isinstance(value, (str, Path))), f"{flag} takes {what}, not {value!r}")
    value = TYPES[kind](value)
    require(kind != "float" or math.isfinite(value), f"{flag} is {value}, not a finite number")  # NaN and infinity
    if kind == "Path" and value:  # as a shell would; "" stays "": not set
        value = os.path.expanduser(os.path.expandvars(value))
    if (choices := constant.choices) is not None:
        require(value in choices, f"{flag} must be one of {', '.join(map(str, choices))} (got {value!r})")
    elif constant.check and kind in ("int", "float"):
        for op, _, bound in (condition.strip().partition(" ") for condition in constant.check.split(",")):
            require(CHECKS[op](float(value), float(bound)), f"{flag} must be {op} {bound} (got {value})")
    return value


class Config(dict):
    """The constants in lower case, overrides applied: `cfg.depth` or `cfg["depth"]`; `cfg.explicit`: keys set."""

    lesson: str = ""
    explicit: frozenset = frozenset()

    def __getattr__(self, key: str) -> Any:
        if key not in self:
            raise AttributeError(key)
        return self[key]


def config(module_globals: dict, overrides: dict, full_overrides: dict | None = None) -> Config:
    """Constants, then `full_overrides` if `full`, then `overrides`, each checked; unknown keywords: TypeError."""
    constants = {c.key: c for c in read_constants(module_globals)}
    unknown = sorted(set(overrides) - set(constants))
    if unknown:
        raise TypeError(f"main() got unexpected keyword arguments: {', '.join(unknown)}")
    values = {key: c.default for key, c in constants.items()}
    if overrides.get("full", values.get("full", False)) and full_overrides:
        values.update(full_overrides)
    values.update(overrides)
    cfg = Config({key: convert(constants[key], value) for key, value in values.items()})
    cfg.lesson = Path(module_globals.get("__file__") or module_globals.get("OUT") or "notebook").stem
    cfg.explicit = frozenset(overrides)
    return cfg


def constants_as_keywords(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: list every keyword `main` accepts in its docstring, so that `help(main)` and `main?` show them."""
    lines = [f"    {c.key}: {c.type} = {c.default!r}  {c.help}".rstrip() for c in read_constants(main.__globals__)]
    main.__doc__ = (main.__doc__ or "").rstrip() + "\n\nKeywords (the constants, in lower case):\n" + "\n".join(lines)
    return main


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (an unknown flag, "abc" for an int) as one line
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(module_globals: dict, full_overrides: dict | None = None) -> argparse.ArgumentParser:
    """One flag per constant. Defaults are SUPPRESSed: the namespace holds only what the user typed."""
    doc, full = (module_globals.get("__doc__") or "").strip().splitlines(), full_overrides or {}
    epilog = "--full changes: " + ", ".join(f"{k}={v!r}" for k, v in full.items()) if full else None
    prog = f"python {Path(module_globals['__file__']).name}"
    parser = _OneLineErrors(prog=prog, description=doc[0] if doc else None, epilog=epilog, allow_abbrev=False)
    for c in read_constants(module_globals):
        metavar = "{" + ",".join(c.choices) + "}" if c.choices else c.item_type.upper()
        kwargs = {"type": TYPES[c.item_type], "metavar": metavar, "nargs": "+" if c.is_tuple else None}
        kwargs = {"action": argparse.BooleanOptionalAction} if c.type == "bool" else kwargs
        text = f"{c.help} (default: {c.default!r}" + (f"; --full: {full[c.key]!r})" if c.key in full else ")")
        text += f" [{c.check}]" if c.check and not c.choices else ""
        parser.add_argument(c.flag, dest=c.key, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kwargs)
    if module_globals.get("EXERCISES"):
        text = "run exercise N of Try this (its flags first, then yours); answers in answers/"
        parser.add_argument("--exercise", type=int, choices=list(module_globals["EXERCISES"]), default=argparse.SUPPRESS,
                            help=text)  # fmt: skip
    return parser


def exercise_flags(exercise: dict) -> str:
    """An exercise's overrides as the command-line flags that do the same: {"depths": (8, 20)} -> --depths 8 20."""
    words = []
    for key, value in exercise.items():
        name = "--" + key.replace("_", "-")
        values = [] if isinstance(value, bool) else value if isinstance(value, (tuple, list)) else [value]
        words += [name if value is not False else "--no-" + name[2:], *map(str, values)]
    return " ".join(words)


def in_notebook() -> bool:
    return hasattr(getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)(), "kernel")


def run_cli(main: Callable[..., Any], module_globals: dict) -> Any:
    """Command line: `main(**flags)`; a notebook: `main()`, returning its results. A fault the user can fix (a
    UserError, a file-system error, memory) is one `error: ...` line and exit status 1; Ctrl-C 130, SIGTERM 143."""
    script = module_globals.get("__file__")
    command_line = bool(script) and bool(sys.argv) and Path(sys.argv[0]).resolve() == Path(script).resolve()
    if command_line:  # SIGTERM, what schedulers send before a kill, ends a run like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if not command_line:
            return main()
        flags = vars(build_parser(module_globals, module_globals.get("FULL_OVERRIDES")).parse_args())
        if "exercise" in flags:  # Try this, exercise N: a dict of flags, or the edit to make (a string)
            number = flags.pop("exercise")
            exercise = module_globals["EXERCISES"][number]
            require(isinstance(exercise, dict), f"exercise {number} is an edit to the code: {exercise}")
            if os.environ.get("RANK", "0") == "0":  # once under torchrun
                print(f"exercise {number}: {exercise_flags(exercise)} {exercise_flags(flags)}".rstrip())
            flags = {**exercise, **flags}
        results = main(**flags)
        if isinstance(results, dict) and results.get("status") == "interrupted":  # stopped, and saved where it was
            raise KeyboardInterrupt(results["signal"])
        return None
    except UserError as error:
        message = str(error)
    except OSError as error:  # a full disk, a name too long, a folder where a file should be, a read-only place
        where = f": {error.filename}" if error.filename else ""
        message = f"{error.strerror or error_summary(error)}{where} (free space or pass other paths)"
    except (MemoryError, RuntimeError) as error:  # the CPU allocator and torch.save report failures as RuntimeError
        text = str(error)
        if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "allocate" in text:
            message = f"out of memory: {error_summary(error)} (use smaller sizes)"
        elif "enforce fail" in text or "write" in text.lower():
            message = f"cannot write a file: {error_summary(error)} (free space or pass another --out)"
        else:
            raise
    except KeyboardInterrupt as error:
        print("interrupted", file=sys.stderr)
        if command_line:
            sys.exit(128 + (error.args[0] if error.args else signal.SIGINT))
        return None
    sys.stderr.write(f"error: {message}\n")  # one write: lines of several processes never run together
    if command_line:
        sys.exit(1)
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


# --- Device, precision, seeding --------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU. Asking for one that is absent is a UserError."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    require(name != "cuda" or torch.cuda.is_available(), "CUDA is not available here (use --device cpu or auto)")
    require(name != "mps" or mps, "MPS is not available here (use --device cpu or auto)")
    return torch.device(name)


CPU_FLAGS = Path("/proc/cpuinfo")  # Linux's list of the CPU's features


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86, BF16 on Arm, from Linux's /proc/cpuinfo; elsewhere (macOS, Windows) False. Without
    them bf16 autocast is emulated and slower than fp32 (the M1 has none): detect, never assume."""
    flags = CPU_FLAGS.read_text().split() if CPU_FLAGS.is_file() else []
    if platform.machine() in ("arm64", "aarch64"):
        return "bf16" in flags
    capability = getattr(torch.backends.cpu, "get_cpu_capability", str)()  # e.g. "AVX512", "AVX2", "DEFAULT"
    return "AVX512" in capability and ("avx512_bf16" in flags or "amx_bf16" in flags)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype, None for fp32. `auto`: bf16 where native (CUDA capability >= 8.0, a CPU with bf16); fp16
    with a GradScaler on older GPUs (a T4 or V100 would only emulate bf16); fp32 elsewhere, MPS included."""
    if precision != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):  # for the forward pass; a no-op when dtype is None
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for the data order, independent of the model's init."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def synchronize(device: torch.device) -> None:  # wait for queued GPU work: time the work, not its launch
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


def median_time(run: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `run()` over `repeats` synchronised calls, after one untimed call (the warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# --- Output: tables, progress, the output folder, results.json, figures ----------------------------------------------
class Table(str):  # prints as itself, and a notebook cell that ends in one shows it as text
    __repr__ = str.__str__


def format_table(rows: list[dict], columns: str | list[tuple[str, str]] | None = None, title=None) -> Table:
    """A fixed-width table. `columns`: "depth:d ratio:.2e model", or (key, format) pairs; default: all, as is."""
    if not rows:
        return Table(title or "")
    if isinstance(columns, str):
        columns = [tuple(f"{spec}:".split(":")[:2]) for spec in columns.split()]
    columns = columns or [(key, "") for key in rows[0]]
    cells = [[format(row[key], spec) if row.get(key) is not None else "-" for key, spec in columns] for row in rows]
    widths = [max(len(key), *(len(r[i]) for r in cells)) for i, (key, _) in enumerate(columns)]
    numeric = [all(isinstance(row.get(key), (int, float, type(None))) for row in rows) for key, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = ([title] if title else []) + [line([key for key, _ in columns]), "  ".join("-" * w for w in widths)]
    return Table("\n".join(out + [line(r) for r in cells]))


def print_table(rows, columns=None, title=None) -> None:
    print(format_table(rows, columns, title), end="\n\n", flush=True)


def Progress(iterable, desc: str, total=None, unit: str = "it", scale: int = 1):  # noqa: N802 - used like a class
    """A tqdm bar on a terminal, silent in a pipe or with NO_PROGRESS_BAR=1; `scale`: units (images) per step."""
    from tqdm import tqdm

    quiet = not sys.stdout.isatty() or bool(os.environ.get("NO_PROGRESS_BAR"))
    return tqdm(iterable, desc, total, leave=False, unit=unit, unit_scale=scale, dynamic_ncols=True, disable=quiet)


# The output folder. A run never deletes a file, and it replaces only files that a lesson run wrote there and that
# nobody changed since: each folder a lesson writes into lists them (MANIFEST, name -> SHA-256 of the bytes
# written). A file of the user's with the same name, or a folder or a link in its place, stops the run before any
# work. `.lock` makes one run per folder, whichever lesson; the system drops the lock when the process ends.
MANIFEST, LOCK = ".lesson-files.json", ".lock"
_held_locks: dict[Path, Any] = {}  # folder -> open lock file, held until the process ends


def output_dir(cfg: Config, *names: str, flag: str = "--out") -> Path:
    """Create `cfg.out`, take its lock (an advisory lock on `.lock`; Windows has none) and check that each file in
    `names` is absent or ours to replace."""
    require(str(cfg.out).strip() != "", f"{flag} is empty (pass a folder, e.g. {flag} outputs/run1)")
    out, lock = writable_dir(cfg.out, flag), Path(cfg.out) / LOCK
    if out.resolve() not in _held_locks and os.name == "posix":
        import fcntl

        handle = lock.open("a+")  # read-write: opening a fifo there does not wait for a reader
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{out} is in use by another run (wait for it, or pass another --out)") from None
        _held_locks[out.resolve()] = handle
    for name in names:
        may_replace(out / name)
    return out


def writable_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create `path` if needed and check it is writable, so a blocked path fails now, not after an hour of training."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(path, os.W_OK) else "it is not writable"
    except OSError as error:
        blocker = next((p for p in [path, *path.parents] if os.path.exists(p) and not os.path.isdir(p)), None)
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror or type(error).__name__
    require(reason is None, f"cannot write to output folder {path}: {reason} (pass {flag} with a writable folder)")
    return path


def _manifest(folder: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / MANIFEST).read_text())
    return {}


def _sha256(path: Path) -> str:  # read whole: a checkpoint of ResNet-152 is under 1 GB
    return hashlib.sha256(path.read_bytes()).hexdigest()


def may_replace(path: Path) -> None:
    """Refuse to replace `path` unless it is absent, or a plain file a lesson wrote there and nobody changed since."""
    if not (path.exists() or path.is_symlink()):
        return
    hint = "(move it away, or pass another --out)"
    require(path.is_file() and not path.is_symlink(), f"{path} is in the way: it is not a plain file {hint}")
    ours = _manifest(path.parent).get(path.name) == _sha256(path)
    require(ours, f"{path} was not written by a lesson run, or was changed since {hint}")


def atomic_write(path: str | Path, write: Callable[[Path], None], checked: bool = True) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which one `os.replace` then turns into `path`: no kill
    leaves half a file. `checked`: `path` must be ours to replace, and the manifest records what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if checked:
        may_replace(path)
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"  # `write` creates it, as the user's umask allows
    try:
        write(tmp)
        if checked:  # record before the rename: a kill in between leaves a listed name, never an unlisted file of ours
            text = json.dumps(_manifest(path.parent) | {path.name: _sha256(tmp)}, indent=1)
            atomic_write(path.parent / MANIFEST, lambda m: m.write_text(text), checked=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _jsonable(value: Any) -> Any:
    """A JSON-ready copy: keys in snake_case (`ms@32` -> `ms_at_32`), percent columns (`err_%`: 8.75) as fractions
    (`err`: 0.0875), and non-finite floats as strings (JSON has no NaN)."""
    if isinstance(value, dict):
        out = {}
        for key, v in ((str(k), v) for k, v in value.items()):
            if key.endswith("%") and isinstance(v, (int, float)) and not isinstance(v, bool):
                key, v = key[:-1], v / 100
            key = key.replace("@", " at ").replace("/", " over ").replace(" - ", " minus ")
            out[re.sub(r"[^0-9a-z-]+", "_", key.lower()).strip("_")] = _jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return str(value) if isinstance(value, (Path, torch.device, torch.dtype)) else value


def device_name(device: torch.device) -> str:
    cpu = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu if device.type == "cpu" else device.type


def save_results(out_dir: str | Path, results: dict, cfg: Config, device: torch.device, started: float) -> Path:
    """Write `results.json`: the lesson's numbers plus the run's context (device, seed, versions, runtime)."""
    record = {"lesson": cfg.lesson or "notebook", "device": str(device), "device_name": device_name(device),
              "seed": cfg.get("seed"), "torch_version": torch.__version__, "python_version": platform.python_version(),
              "runtime_s": round(time.perf_counter() - started, 3), "config": dict(cfg), **results}  # fmt: skip
    text = json.dumps(_jsonable(record), indent=2) + "\n"
    return atomic_write(Path(out_dir) / "results.json", lambda tmp: tmp.write_text(text))


def use_headless_matplotlib() -> None:
    """The file-only backend for command-line runs; a notebook keeps its inline backend."""
    import matplotlib

    if not in_notebook() and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically, show it in a notebook, and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    if in_notebook():
        from IPython.display import display

        display(fig)
    plt.close(fig)
    return Path(path)


# --- Model inspection ------------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and linear layers in registration order: the layers a ResNet's name counts."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Multiply-adds of one forward pass, from torch's FLOP counter (which counts 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


# --- Datasets as uint8 tensors (N, 3, 32, 32) ------------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's package dataset-fashion-mnist
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FASHION_MNIST_FILES = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


class DataUnavailableError(UserError):
    """The dataset is neither on disk nor downloadable."""


class ImageData(collections.namedtuple("ImageData", "name classes train_x train_y val_x val_y test_x test_y mean std")):
    """uint8 images (N, 3, 32, 32) and int64 labels; `val` is held out of training and chooses, `test` is only
    reported. Fashion-MNIST is padded to 32x32 and repeated over 3 channels. `mean`, `std`: of the training images."""

    num_classes = property(lambda self: len(self.classes))

    def to(self, device: torch.device) -> ImageData:
        return self._replace(**{k: v.to(device) for k, v in self._asdict().items() if isinstance(v, torch.Tensor)})


def _torchvision_dataset(name: str, data_dir: Path, download: bool):
    """(train_x, train_y, test_x, test_y, classes) through torchvision, which verifies every download's MD5."""
    import torchvision

    sets = torchvision.datasets
    cls = {"cifar10": sets.CIFAR10, "cifar100": sets.CIFAR100, "fashion-mnist": sets.FashionMNIST}[name]
    what = "a file, not a folder (pass the folder that holds or will hold the datasets)"
    require(not data_dir.exists() or data_dir.is_dir(), f"--data-dir {data_dir} is {what}")
    folder, debian = data_dir / getattr(cls, "base_folder", "FashionMNIST"), DEBIAN_FASHION_MNIST
    again, splits = f"(delete {folder} and its archive to unpack or download them again)", []
    try:  # Debian's copy of Fashion-MNIST saves a download
        unpack = name == "fashion-mnist" and (debian / "t10k-labels-idx1-ubyte.gz").exists()
        for n in FASHION_MNIST_FILES if unpack and not any(folder.glob("raw/*-ubyte")) else ():
            data = gzip.decompress((debian / f"{n}.gz").read_bytes())  # torchvision checks each header and length
            atomic_write(folder / "raw" / n, lambda tmp, data=data: tmp.write_bytes(data), checked=False)
        for train in (True, False):
            with contextlib.redirect_stdout(sys.stderr):  # torchvision prints "Files already downloaded"
                ds = cls(root=str(data_dir), train=train, download=download)
            if name == "fashion-mnist":  # (N, 28, 28) -> (N, 3, 32, 32)
                x = F.pad(ds.data, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
            else:  # (N, H, W, C) -> (N, C, H, W)
                x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            splits += [x, torch.as_tensor(ds.targets, dtype=torch.int64)]
    except PermissionError as error:  # a read-only --data-dir: falling back would hide the cause
        why = f"cannot write {name} into --data-dir {data_dir}: {error.strerror}"
        raise UserError(f"{why} (pass a writable one)") from None
    except (RuntimeError, OSError, ValueError, AssertionError) as error:  # not found, corrupt, or no network
        present = folder.exists() and (name != "fashion-mnist" or any(folder.glob("raw/*-ubyte")))
        require(not present, f"{name} files in {folder} are corrupt or incomplete: {error_summary(error)} {again}")
        archive = f"copy cifar-{name[5:]}-python.tar.gz from https://www.cs.toronto.edu/~kriz/ into {data_dir}/, "
        how = (archive if name.startswith("cifar") else "") + "on Debian `apt-get install dataset-fashion-mnist` for "
        how += "--dataset fashion-mnist, or use --dataset synthetic"
        why = f"{name} is not in {data_dir} and could not be downloaded: {error_summary(error)}"
        raise DataUnavailableError(f"{why} (connect to the internet once, {how})") from None
    return *splits, FASHION_CLASSES if name == "fashion-mnist" else tuple(ds.classes)


# The synthetic set: sinusoidal gratings whose class is their tilt from the vertical (5 steps of 22.5 degrees) and
# stripe frequency (coarse or fine). Phase, colour, contrast, an occluding disc and pixel noise vary freely. A class
# holds a tilt and its mirror image, so crops, cutout and horizontal flips all keep the label's meaning.
SYNTHETIC_TILTS = 5
SYNTHETIC_BANDS = ((0.25, 0.40), (0.55, 0.80))  # spatial frequency in radians per pixel: coarse, fine
SYNTHETIC_CLASSES = tuple(f"{band}-{t * 22.5:g}deg" for band in ("coarse", "fine") for t in range(SYNTHETIC_TILTS))


def synthetic_parameters(n: int, g: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Labels (band * 5 + tilt class), tilts jittered by under a third of a step and mirrored at random, and the rest."""
    gap = (math.pi / 2) / (SYNTHETIC_TILTS - 1)
    tilt_class = torch.randint(0, SYNTHETIC_TILTS, (n,), generator=g)
    band = torch.randint(0, len(SYNTHETIC_BANDS), (n,), generator=g)
    tilt = (tilt_class.float() * gap + (torch.rand(n, generator=g) - 0.5) * (2 / 3) * gap).abs()
    tilt = torch.minimum(tilt, math.pi - tilt)
    theta = torch.where(torch.rand(n, generator=g) < 0.5, math.pi - tilt, tilt)  # a tilt or its mirror image
    low, high = (torch.tensor([b[i] for b in SYNTHETIC_BANDS])[band] for i in (0, 1))
    uniform = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    return {"label": band * SYNTHETIC_TILTS + tilt_class, "theta": theta, "freq": low + (high - low) * uniform(n),
            "phase": 2 * math.pi * uniform(n), "contrast": 0.3 + 0.7 * uniform(n), "colour": 0.3 + 0.7 * uniform(n, 3),
            "blob_centre": (uniform(n, 2) - 0.5) * size, "blob_radius": 3 + 6 * uniform(n)}  # fmt: skip


def render_gratings(p: dict[str, torch.Tensor], size: int = 32) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] from grating parameters, before pixel noise."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2  # symmetric: x -> -x is a mirror
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each
    theta = p["theta"][:, None, None]
    along = xx * torch.cos(theta) + yy * torch.sin(theta)  # (N, H, W): position along the normal
    grating = torch.sin(along * p["freq"][:, None, None] + p["phase"][:, None, None])  # (N, H, W) in [-1, 1]
    image = 0.5 + 0.5 * (p["contrast"][:, None] * p["colour"])[:, :, None, None] * grating[:, None]  # (N, 3, H, W)
    centre = p["blob_centre"]
    dist = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    return image * (dist >= p["blob_radius"][:, None, None] ** 2)[:, None]


def make_synthetic(num_images: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` uint8 grating images (N, 3, size, size) and their labels; no download needed."""
    g = torch.Generator().manual_seed(seed)
    params = synthetic_parameters(num_images, g, size)
    image = render_gratings(params, size) + 0.15 * torch.randn(num_images, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), params["label"]


def load_dataset(name, data_dir="data", val_size=5000, train_size=None, test_size=None, seed=0, download=True,
                 fallback=False, synthetic_size=12000) -> ImageData:  # fmt: skip
    """`name` with `val_size` training images held out, and seeded subsets of `train_size`/`test_size`. `fallback`:
    a dataset that cannot be had is replaced, with a loud notice, by Fashion-MNIST if on disk, else synthetic."""
    data_dir = Path(data_dir)
    try:
        if name == "synthetic":
            x, y = make_synthetic(synthetic_size + max(synthetic_size // 6, 1000), seed=12345)
            train_x, test_x = x[:synthetic_size], x[synthetic_size:]
            train_y, test_y = y[:synthetic_size], y[synthetic_size:]
            classes = SYNTHETIC_CLASSES
        else:
            train_x, train_y, test_x, test_y, classes = _torchvision_dataset(name, data_dir, download)
    except DataUnavailableError as error:
        if not fallback:
            raise
        substitute = "synthetic"  # real data beats generated data: Fashion-MNIST when it is on this machine
        if name != "fashion-mnist":
            with contextlib.suppress(UserError):
                _torchvision_dataset("fashion-mnist", data_dir, download=False)
                substitute = "fashion-mnist"
        bar, why = "!" * 100, "so that this quick run still works: its numbers are\nnot"
        notice = f"NOTICE: {error}\nFalling back to the {substitute.upper()} dataset {why} {name} numbers."
        print(f"\n{bar}\n{notice} A --full run never falls back: it stops with the error above.\n{bar}\n", file=sys.stderr, flush=True)  # fmt: skip
        return load_dataset(substitute, data_dir, val_size, train_size, test_size, seed, download=False)
    require(0 < val_size < len(train_x), f"--val-size must be between 1 and {len(train_x) - 1} for {name}")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:][:train_size]  # train_size None: all the rest
    if test_size is not None:
        test_idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed + 1))[:test_size]
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[train_idx], train_y[train_idx]
    scaled = train_x.float().div_(255)
    mean, std = tuple(scaled.mean(dim=(0, 2, 3)).tolist()), tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData(name, classes, train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


def load_data(cfg: Config, test_size: int | None = None, fallback: bool = True) -> ImageData:
    """A lesson's data, with the one fallback rule: a quick run falls back; `--full` or `fallback=False` stops."""
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.get("train_size") or None, test_size, cfg.seed,
                        cfg.download, fallback and not cfg.get("full", False))  # fmt: skip


# --- Batches, augmentation, evaluation -------------------------------------------------------------------------------
def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float (B, C, H, W) with zero mean and unit variance per channel."""
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def random_crop_flip(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, a random crop after zero padding by `pad` and a flip with probability 1/2, on the batch's device."""
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator).to(images.device)  # (2, B)
    flips = (torch.rand(batch, generator=generator) < 0.5).to(images.device)  # (B,)
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # reading columns backwards flips the image
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_batches(num_items: int, batch_size: int, generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches (CPU) for one pass over the data, the last partial batch dropped."""
    yield from torch.randperm(num_items, generator=generator)[: num_items - num_items % batch_size].split(batch_size)


def endless_batches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches forever, reshuffled every epoch (for iteration-based schedules)."""
    too_large = f"batch size {batch_size} is larger than the {num_items} training images (lower --batch-size)"
    require(batch_size <= num_items, too_large)
    while True:
        yield from epoch_batches(num_items, batch_size, generator)


def training_batches(data: ImageData, count: int, batch_size: int, device, generator) -> list[torch.Tensor]:
    """`count` shuffled batches of normalised training images on `device`, not augmented."""
    batches = zip(range(count), endless_batches(len(data.train_x), batch_size, generator))
    return [normalize(data.train_x[i.to(data.train_x.device)].to(device), data.mean, data.std) for _, i in batches]


def recalibrate_batch_norm(model: nn.Module, batches: list[torch.Tensor], amp_dtype=None, channels_last=False):
    """Replace every batch norm's running statistics by their plain average over `batches`, weights unchanged (torch's
    `update_bn`: momentum None, a cumulative average). Lesson 03 shows why: after a few hundred steps at a high rate,
    the running averages describe much earlier weights."""
    if batches:
        with autocast(batches[0].device, amp_dtype):
            inputs = (x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in batches)
            torch.optim.swa_utils.update_bn(inputs, model)
    return model


@torch.no_grad()
def evaluate(model, images, labels, mean, std, device, amp_dtype=None, batch_size=500, channels_last=False) -> dict:
    """Loss, accuracy and logits of `model` in eval mode on a uint8 image tensor (kept on any device)."""
    was_training = model.training
    model.eval()
    logits = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        with autocast(device, amp_dtype):
            logits.append(model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float())
    model.train(was_training)
    logits = torch.cat(logits) if logits else torch.zeros(0, 1, device=device)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    accuracy = (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return {"loss": loss, "accuracy": accuracy, "error": 1 - accuracy, "logits": logits}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (mini-batch curves are noisy)."""
    total = np.cumsum([0.0, *values])
    return [(total[i + 1] - total[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]
