"""Plumbing shared by the lessons: command line, device, seeding, data, training loop, tables, plots.

Nothing here teaches residual networks; the ideas live in the numbered lessons. A lesson uses it like this:

    # --- constants ---------------------------------------------------------------
    DEPTH: int = 56  # layers in the network (6n+2) [>= 8]
    DEVICE: str = "auto"  # where to run [auto | cpu | cuda | mps]
    # --- end constants -----------------------------------------------------------

    @helpers.constants_as_keywords  # help(main) lists depth and device
    def main(**overrides):
        cfg = helpers.config(globals(), overrides)  # cfg.depth == 56 unless overridden; checked
        ...

    if __name__ == "__main__":  # also true in a notebook, where it runs main() with the cells' constants
        helpers.run_cli(main, globals())

`run_cli` turns every constant of that block into a flag (`DEPTH` -> `--depth`), with the comment as help
text, the annotation as type and the value as default, so the constants block stays the single source of
truth (see "Constants block" below for the declaration's grammar).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent
CONSTANTS_START = "# --- constants"
CONSTANTS_END = "# --- end constants"


# =====================================================================================================
# Errors a user can fix
# =====================================================================================================
class UserError(Exception):
    """A problem the user can fix; `run_cli` prints it as one `error: ...` line and exits with status 1."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds. Message style: `<what> (<how to fix>)`."""
    if not condition:
        raise UserError(message)


def require_number(
    flag: str, value: Any, low: float | None = None, high: float | None = None, *, low_open=False, high_open=False
) -> None:
    """`value` is a finite number in [low, high] (an end given as None is unbounded; `low_open`/`high_open`
    exclude it), else a UserError naming the flag. NaN is reported as "not a number": every comparison with
    NaN is false, so a check like `value >= 0` would otherwise call it negative."""
    require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{flag} must be a number, not {value!r}")
    require(not math.isnan(value), f"{flag} is nan, not a number (pass a finite value)")
    require(math.isfinite(value), f"{flag} must be finite, not {value}")
    if low is not None:
        require(
            value > low if low_open else value >= low,
            f"{flag} must be {'>' if low_open else '>='} {low:g}, not {value:g}",
        )
    if high is not None:
        require(
            value < high if high_open else value <= high,
            f"{flag} must be {'<' if high_open else '<='} {high:g}, not {value:g}",
        )


def require_positive(flag: str, value: Any) -> None:
    """A finite number > 0 (sizes, rates, time budgets)."""
    require_number(flag, value, 0, low_open=True)


SEED_LIMIT = 2**32  # NumPy's seeds are 32-bit unsigned integers


def require_seed(seed: Any) -> None:
    """0 <= seed < 2**32: the range every random number generator the lessons seed accepts."""
    require(
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT,
        f"--seed must be an integer from 0 to {SEED_LIMIT - 1}, not {seed}",
    )


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
# Constants block -> config object, command-line flags and notebook runs
# =====================================================================================================
# One line declares everything about a constant:
#
#     LR: float = 0.1  # learning rate (paper: 0.1) [> 0]
#     NAME: type = value  # help text [check]
#
# type    int | float | str | bool | Path | tuple[int, ...] | tuple[float, ...] | tuple[str, ...]. It, not the
#         value, decides the flag's type: `LR: float = 1` still gives a float flag. A Path is kept as a string
#         with `~` and $VARIABLES expanded ("" stays "": not set).
# check   optional, at the end of the comment: `[> 0]`, `[>= 0, <= 1]` (every item of a tuple must pass),
#         `[auto | cpu | cuda]` (one of these words) or `[in NAMES]` (one of the module's tuple NAMES).
# An edited constant, a keyword of `main` and a flag all go through the same conversion and the same check.
TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": bool, "Path": str}
CHECKS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


@dataclass(frozen=True)
class Constant:
    name: str  # UPPER_CASE name in the lesson
    type: str  # its annotation: "int", "tuple[int, ...]", ...
    default: Any  # the value it has now (the lesson file's, or the notebook's after an edit)
    help: str = ""  # the comment beside it, without the check
    check: str = ""  # the bracketed check at the end of the comment, without the brackets

    @property
    def key(self) -> str:  # the keyword `main` accepts
        return self.name.lower()

    @property
    def flag(self) -> str:  # the command-line flag
        return "--" + self.key.replace("_", "-")

    @property
    def item_type(self) -> str:  # "int" for both `int` and `tuple[int, ...]`
        return self.type[len("tuple[") : -len(", ...]")] if self.is_tuple else self.type

    @property
    def is_tuple(self) -> bool:
        return self.type.startswith("tuple[") and self.type.endswith(", ...]")


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _source_lines(module_globals: dict) -> list[str]:
    """The text the constants block is read from: the lesson file, or in a notebook the last cell run that
    holds a constants block (IPython keeps every cell's source in `_ih`). Empty when neither exists."""
    if module_globals.get("__file__"):
        return Path(module_globals["__file__"]).read_text(encoding="utf-8").splitlines()
    for cell in reversed(module_globals.get("_ih") or []):
        if CONSTANTS_START in cell:
            return cell.splitlines()
    return []


def read_constants(module_globals: dict) -> list[Constant]:
    """The annotated constants between the `# --- constants` and `# --- end constants` lines, with their
    current values from `module_globals` (so a notebook's edited value counts, as an edited file does)."""
    lines = _source_lines(module_globals)
    starts = [i for i, line in enumerate(lines) if line.startswith(CONSTANTS_START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(CONSTANTS_END)]
    annotations = module_globals.get("__annotations__", {})
    if not starts or not ends:  # no source to read: names and types from the annotations alone
        names = [n for n in annotations if n.isupper() and n in module_globals]
        return [Constant(n, _annotation_text(annotations[n]), module_globals[n]) for n in names]
    block = "\n".join(lines[starts[-1] + 1 : ends[-1]])
    comments = {}  # line -> comment text; a statement that a formatter wrapped keeps its comment on a later line
    for token in tokenize.generate_tokens(io.StringIO(block).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    constants = []
    for node in ast.parse(block).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.isupper()):
            continue
        name = node.target.id
        comment = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments)
        annotation = _annotation_text(annotations.get(name, ast.get_source_segment(block, node.annotation)))
        check = re.search(r"\s*\[([^\[\]]*)\]\s*$", comment)
        helptext = comment[: check.start()] if check else comment
        constant = Constant(name, annotation, module_globals[name], helptext.strip(), check.group(1) if check else "")
        if constant.item_type not in TYPES:
            raise RuntimeError(f"{name}: unsupported type {annotation!r} (use {', '.join(TYPES)} or tuple[X, ...])")
        constants.append(constant)
    return constants


def _choices(constant: Constant, module_globals: dict) -> tuple[str, ...] | None:
    if "|" in constant.check:
        return tuple(word.strip() for word in constant.check.split("|"))
    if constant.check.startswith("in "):  # a name the module defines (None while it is not defined yet)
        names = module_globals.get(constant.check[3:].strip())
        return None if names is None else tuple(names)
    return None


def convert(constant: Constant, value: Any, module_globals: dict | None = None) -> Any:
    """`value` as the constant's declared type, checked against its declaration; else a UserError that names
    the flag. Used for the lesson's own value, for `main`'s keywords and for flags alike."""
    flag = constant.flag
    if constant.is_tuple:
        values = value if isinstance(value, (list, tuple)) else [value]
        require(len(values) > 0, f"{flag} needs at least one value")
        return tuple(convert(replace(constant, type=constant.item_type), v, module_globals) for v in values)
    kind = constant.type
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(kind, isinstance(value, (str, Path)))
    require(ok, f"{flag} takes {'a path' if kind == 'Path' else kind + ' values'}, not {value!r}")
    value = TYPES[kind](value)
    if kind == "float":  # no constant of any lesson means anything at nan or infinity
        require_number(flag, value)
    if kind == "Path":
        value = expand_path(value)
    choices = _choices(constant, module_globals or {})
    if choices is not None:
        require(value in choices, f"{flag} must be one of {', '.join(map(str, choices))} (got {value!r})")
    elif constant.check and kind in ("int", "float"):
        for condition in constant.check.split(","):
            op, _, bound = condition.strip().partition(" ")
            require(op in CHECKS, f"{constant.name}: cannot read the check {condition.strip()!r}")
            require(CHECKS[op](float(value), float(bound)), f"{flag} must be {op} {bound} (got {value})")
    return value


def expand_path(text: str) -> str:
    """`~` and $VARIABLES expanded, as a shell would: `DATA_DIR = "~/data"` must not create a folder named `~`."""
    return os.path.expanduser(os.path.expandvars(text)) if text else text


class Config(dict):
    """The lesson's constants in lower case, with overrides applied; read as `cfg.depth` or `cfg["depth"]`.
    `cfg.lesson` names the lesson (for results.json); `cfg.explicit` holds the keys the caller set (a flag or
    a keyword), which lesson 06 needs to tell a flag that contradicts a checkpoint from a default."""

    lesson: str = ""
    explicit: frozenset = frozenset()

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def lesson_name(module_globals: dict) -> str:
    """The lesson's file name without `.py`; in a notebook, the notebook's (Jupyter and VS Code set it) or,
    failing that, the name of the lesson's output folder (`outputs/01_basic_residual_block`)."""
    for key in ("__file__", "__vsc_ipynb_file__", "__session__"):
        if module_globals.get(key):
            return Path(module_globals[key]).stem
    return Path(str(module_globals.get("OUT", "notebook"))).name


def config(module_globals: dict, overrides: dict, full_overrides: dict | None = None) -> Config:
    """Build the config for one run: constants as defaults, then `full_overrides` when `full=True`, then
    the caller's overrides, each converted to its declared type and checked. Unknown keys are a `TypeError`,
    as for any Python function; a value that fails its check is a `UserError`, before any work is done."""
    constants = {c.key: c for c in read_constants(module_globals)}
    unknown = sorted(set(overrides) - set(constants))
    if unknown:
        raise TypeError(f"main() got unexpected keyword arguments: {', '.join(unknown)}")
    values = {key: c.default for key, c in constants.items()}
    if overrides.get("full", values.get("full", False)) and full_overrides:
        values.update(full_overrides)
    values.update(overrides)
    cfg = Config({key: convert(constants[key], value, module_globals) for key, value in values.items()})
    cfg.lesson = lesson_name(module_globals)
    cfg.explicit = frozenset(overrides)
    if "seed" in cfg:
        require_seed(cfg.seed)
    return cfg


def constants_as_keywords(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: append every keyword `main` accepts (the constants, lower case) to its docstring, with
    type, default and help, so that `help(main)` and a notebook's `main?` list them."""
    lines = [f"    {c.key}: {c.type} = {c.default!r}  {c.help}".rstrip() for c in read_constants(main.__globals__)]
    intro = (main.__doc__.rstrip() + "\n\n") if main.__doc__ else ""
    main.__doc__ = intro + "Keywords (the constants block, in lower case):\n" + "\n".join(lines)
    return main


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors (an unknown flag, "abc" for an int) as one line
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(module_globals: dict, full_overrides: dict | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per constant. Defaults are SUPPRESSed so that the parsed namespace
    holds only what the user typed; `config` fills in the rest and checks everything."""
    doc = (module_globals.get("__doc__") or "").strip().splitlines()
    full_overrides = full_overrides or {}
    epilog = "--full changes: " + ", ".join(f"{k}={v!r}" for k, v in full_overrides.items()) if full_overrides else None
    parser = _OneLineErrors(
        prog=f"python {Path(module_globals['__file__']).name}",
        description=doc[0] if doc else None,  # argparse %-formats help texts only, not these two
        epilog=epilog,
        allow_abbrev=False,  # `--epoch 5` is an error, not a silent `--epochs 5`
    )
    for c in read_constants(module_globals):
        choices = _choices(c, module_globals)
        item = TYPES[c.item_type]
        if c.item_type == "bool" and not c.is_tuple:
            kwargs = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": item, "metavar": "{" + ",".join(choices) + "}" if choices else c.item_type.upper()}
            kwargs["nargs"] = "+" if c.is_tuple else None
        text = f"{c.help} (default: {c.default!r}"
        text += f"; --full: {full_overrides[c.key]!r})" if c.key in full_overrides else ")"
        text += f" [{c.check}]" if c.check and not choices else ""
        parser.add_argument(c.flag, dest=c.key, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kwargs)
    return parser


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Jupyter, JupyterLab, VS Code's notebooks and interactive window)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and hasattr(shell, "kernel")


def run_cli(main: Callable[..., Any], module_globals: dict) -> Any:
    """Run the lesson: from the command line, parse flags and call `main(**flags)`; in a notebook (no lesson
    file on the command line) call `main()` with the constants as they are now and return its results.
    A `UserError` becomes one `error: ...` line (and exit status 1 on the command line)."""
    script = module_globals.get("__file__")
    command_line = bool(script) and bool(sys.argv) and Path(sys.argv[0]).resolve() == Path(script).resolve()
    try:
        if not command_line:
            return main()
        args = build_parser(module_globals, module_globals.get("FULL_OVERRIDES")).parse_args()
        main(**vars(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if command_line:
            sys.exit(1)
    except (MemoryError, RuntimeError) as error:  # the CPU allocator reports failure as a plain RuntimeError
        if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(error):
            raise
        print(f"error: out of memory: {error_summary(error)} (use smaller sizes)", file=sys.stderr)
        if command_line:
            sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        if command_line:
            sys.exit(130)
    return None


def error_summary(error: BaseException) -> str:
    """An exception's message on one line, whole (not cut mid-sentence), without torch's C++ frames."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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
# Data: CIFAR-10/100, Fashion-MNIST and a synthetic set, as uint8 tensors (N, 3, 32, 32)
# =====================================================================================================
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


class DataUnavailableError(UserError):
    """The dataset is neither on disk nor downloadable."""


@dataclass
class ImageData:
    """A dataset held as uint8 image tensors of shape (N, 3, 32, 32) and int64 labels.

    `val` is held out of the training set (it chooses things: checkpoints, settings); `test` is the official
    test set, only ever reported. Fashion-MNIST's 28x28 grey images are zero-padded to 32x32 and repeated over
    three channels so that every CIFAR model runs on them unchanged."""

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]  # per-channel mean of the training images, in [0, 1]
    std: tuple[float, float, float]  # per-channel standard deviation of the training images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device) -> ImageData:
        """Move every tensor to `device` (the whole dataset: CIFAR-10 is 150 MB as uint8)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return ImageData(**moved)


def _download_hint(name: str, data_dir: Path) -> str:
    if name == "fashion-mnist":
        return (
            f"connect to the internet once, or on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` "
            f"(the lessons then read {DEBIAN_FASHION_MNIST} offline), or use --dataset synthetic"
        )
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
    return (
        f"connect to the internet once, or copy {archive} from https://www.cs.toronto.edu/~kriz/ into {data_dir}/, "
        f"or use --dataset fashion-mnist (offline on Debian: apt-get install dataset-fashion-mnist) or --dataset synthetic"
    )


def _torchvision_cifar(name: str, data_dir: Path, download: bool):
    """(train_x, train_y, test_x, test_y, classes) through torchvision, which verifies the MD5 of every file."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    sets = []
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torchvision prints "Files already downloaded"
                ds = cls(root=str(data_dir), train=train, download=download)
        except (RuntimeError, OSError, ValueError) as error:  # not found / corrupted / no network
            folder = data_dir / cls.base_folder
            require(
                not folder.exists(),
                f"{name} files in {folder} are corrupt or incomplete: torchvision says {error_summary(error)!r} "
                f"(delete {folder} and its archive to unpack or download them again)",
            )
            raise DataUnavailableError(
                f"{name} is not in {data_dir} and could not be downloaded: {error_summary(error)} ({_download_hint(name, data_dir)})"
            ) from None
        x = (
            torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        )  # (N, H, W, C) -> (N, C, H, W)
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        require(
            x.shape[1:] == (3, 32, 32) and len(x) == len(y) and len(y) > 0,
            f"{name} files in {data_dir / cls.base_folder} are corrupt: images of shape {tuple(x.shape)} for "
            f"{len(y)} labels (delete the folder and its archive to download them again)",
        )
        require(
            int(y.min()) >= 0 and int(y.max()) < len(ds.classes),
            f"{name} files in {data_dir / cls.base_folder} are corrupt: labels outside 0..{len(ds.classes) - 1} "
            f"(delete the folder and its archive to download them again)",
        )
        sets += [x, y]
    return (*sets, tuple(ds.classes))


# MD5 of the four uncompressed Fashion-MNIST files. Debian recompresses the .gz archives (so their MD5s differ
# from the ones torchvision checks), but the uncompressed bytes are Zalando's originals.
FASHION_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


IDX_MAGIC = {1: 2049, 3: 2051}  # the IDX format's magic number: 0x0000 0x08 (unsigned bytes) 0x0D (dimensions)


def _idx_shape(path: Path, dims: int) -> tuple[int, ...]:
    """The shape an (uncompressed, unsigned-byte) IDX file declares, after checking its magic number and size."""
    with path.open("rb") as f:
        header = f.read(4 + 4 * dims)
    corrupt = f"{path} is corrupt"
    hint = f"(delete {path.parent} to unpack or download the files again)"
    require(len(header) == 4 + 4 * dims, f"{corrupt}: it is only {len(header)} bytes long {hint}")
    magic = int.from_bytes(header[:4], "big")
    require(magic == IDX_MAGIC[dims], f"{corrupt}: wrong magic number {magic} (expected {IDX_MAGIC[dims]}) {hint}")
    shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    size = path.stat().st_size - len(header)
    require(size == math.prod(shape), f"{corrupt}: it declares {shape} bytes of data but holds {size} {hint}")
    return shape


def verify_idx_files(raw_dir: Path, num_classes: int) -> None:
    """Check the four MNIST-style files in `raw_dir` before torchvision reads them: magic numbers, sizes, one
    label per image and every label a class index (torchvision checks none of this for local files)."""
    if not all((raw_dir / name).is_file() for name in FASHION_MNIST_RAW_MD5):
        return  # absent: torchvision downloads them, or reports them missing
    for split in ("train", "t10k"):
        images, labels = raw_dir / f"{split}-images-idx3-ubyte", raw_dir / f"{split}-labels-idx1-ubyte"
        count, height, width = _idx_shape(images, 3)
        require((height, width) == (28, 28), f"{images} is corrupt: images of {height}x{width} pixels, not 28x28")
        (num_labels,) = _idx_shape(labels, 1)
        require(num_labels == count, f"{labels} is corrupt: {num_labels} labels for {count} images in {images.name}")
        values = np.frombuffer(labels.read_bytes()[8:], dtype=np.uint8)
        require(
            values.size == 0 or int(values.max()) < num_classes,
            f"{labels} is corrupt: label {int(values.max()) if values.size else 0} is outside 0..{num_classes - 1} "
            f"(delete {raw_dir} to unpack or download the files again)",
        )


def _install_debian_fashion_mnist(raw_dir: Path, source: Path) -> bool:
    """Unpack the Fashion-MNIST files that Debian's `dataset-fashion-mnist` ships into torchvision's raw
    folder, checking each against its known MD5. Returns False when the package is not installed."""
    if not all((source / f"{name}.gz").exists() for name in FASHION_MNIST_RAW_MD5):
        return False
    for name, md5 in FASHION_MNIST_RAW_MD5.items():
        data = gzip.decompress((source / f"{name}.gz").read_bytes())
        require(
            hashlib.md5(data).hexdigest() == md5,
            f"{source / name}.gz does not match its known MD5 checksum (reinstall dataset-fashion-mnist)",
        )
        atomic_write(raw_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
    return True


def _torchvision_fashion_mnist(data_dir: Path, download: bool, debian_dir: Path = DEBIAN_FASHION_MNIST):
    import torchvision

    cls = torchvision.datasets.FashionMNIST
    raw_dir = data_dir / cls.__name__ / "raw"
    if not all((raw_dir / name).exists() for name in FASHION_MNIST_RAW_MD5):
        _install_debian_fashion_mnist(raw_dir, debian_dir)
    verify_idx_files(raw_dir, len(FASHION_CLASSES))
    sets = []
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                ds = cls(root=str(data_dir), train=train, download=download)
        except (RuntimeError, OSError, ValueError) as error:
            raise DataUnavailableError(
                f"fashion-mnist is not in {data_dir} and could not be downloaded: {error_summary(error)} ({_download_hint('fashion-mnist', data_dir)})"
            ) from None
        x = F.pad(ds.data, (2, 2, 2, 2))  # (N, 28, 28) -> (N, 32, 32), zero border like LeNet's input
        x = x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 32, 32) -> (N, 3, 32, 32)
        sets += [x, ds.targets.to(torch.int64)]
    return (*sets, FASHION_CLASSES)


SYNTHETIC_TILTS = 5  # tilt classes: 0, 22.5, 45, 67.5 and 90 degrees between the stripes and the vertical
SYNTHETIC_BANDS = ((0.25, 0.40), (0.55, 0.80))  # spatial-frequency bands in radians per pixel: coarse, fine
SYNTHETIC_CLASSES = tuple(
    f"{band}-{tilt * 90 / (SYNTHETIC_TILTS - 1):g}deg" for band in ("coarse", "fine") for tilt in range(SYNTHETIC_TILTS)
)


def synthetic_label(theta: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """The class of a grating with normal at angle `theta` (radians) and frequency `freq` (radians/pixel).

    The class reads the tilt, min(theta, pi - theta) after folding theta into [0, pi), not the orientation
    itself: mirroring an image left-right turns theta into pi - theta, so a class must contain both, or a
    horizontal flip (augmentation, flip TTA) would change what the label means."""
    folded = torch.remainder(theta, math.pi)
    tilt = torch.minimum(folded, math.pi - folded)  # in [0, pi/2], the same for an image and its mirror
    tilt_class = torch.round(tilt / (math.pi / 2) * (SYNTHETIC_TILTS - 1)).long()
    band = (freq > (SYNTHETIC_BANDS[0][1] + SYNTHETIC_BANDS[1][0]) / 2).long()
    return band * SYNTHETIC_TILTS + tilt_class


def render_gratings(params: dict[str, torch.Tensor], size: int = 32) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] from grating parameters (see `make_synthetic`), before pixel noise."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2  # symmetric: x -> -x is a mirror
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each
    theta, freq = params["theta"][:, None, None], params["freq"][:, None, None]
    along = xx[None] * torch.cos(theta) + yy[None] * torch.sin(theta)  # (N, H, W): position along the normal
    grating = torch.sin(along * freq + params["phase"][:, None, None])  # (N, H, W) in [-1, 1]
    shade = params["contrast"][:, None, None, None] * params["colour"][:, :, None, None]  # (N, 3, 1, 1)
    image = 0.5 + 0.5 * shade * grating[:, None]  # (N, 3, H, W)
    centre = params["blob_centre"]  # (N, 2): x, y of a dark occluding disc
    dist = (xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2
    return image * (dist >= params["blob_radius"][:, None, None] ** 2)[:, None]


def synthetic_parameters(num_images: int, generator: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Random grating parameters: a tilt class and a frequency band (together the label), each jittered,
    the tilt's sign drawn at random (so both an orientation and its mirror image occur in every class),
    and a random phase, contrast, colour and occluding blob."""
    g = generator
    tilt_class = torch.randint(0, SYNTHETIC_TILTS, (num_images,), generator=g)
    band = torch.randint(0, len(SYNTHETIC_BANDS), (num_images,), generator=g)
    gap = (math.pi / 2) / (SYNTHETIC_TILTS - 1)
    jitter = (torch.rand(num_images, generator=g) - 0.5) * (2 / 3) * gap  # up to a third of the gap
    tilt = (tilt_class.float() * gap + jitter).abs()  # |.|: a jittered 0-degree tilt stays near 0
    tilt = torch.minimum(tilt, math.pi - tilt)
    mirrored = torch.rand(num_images, generator=g) < 0.5
    low = torch.tensor([b[0] for b in SYNTHETIC_BANDS])[band]
    high = torch.tensor([b[1] for b in SYNTHETIC_BANDS])[band]
    return {
        "theta": torch.where(mirrored, math.pi - tilt, tilt),
        "freq": low + (high - low) * torch.rand(num_images, generator=g),
        "phase": 2 * math.pi * torch.rand(num_images, generator=g),
        "contrast": 0.3 + 0.7 * torch.rand(num_images, generator=g),
        "colour": 0.3 + 0.7 * torch.rand(num_images, 3, generator=g),
        "blob_centre": (torch.rand(num_images, 2, generator=g) - 0.5) * size,
        "blob_radius": 3 + 6 * torch.rand(num_images, generator=g),
    }


def make_synthetic(num_images: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A procedurally generated image set that needs no download: learnable, but not trivially.

    Each image is a sinusoidal grating; its class (10 of them, `SYNTHETIC_CLASSES`) is its tilt from the
    vertical (5 steps of 22.5 degrees, jittered by up to 7.5) and its stripe frequency (coarse or fine).
    Phase, colour, contrast, a dark occluding blob and pixel noise vary freely. Every augmentation the
    lessons apply keeps the class: crops and cutout move or hide stripes without turning them, and a
    horizontal flip maps a tilt onto itself (see `synthetic_label`)."""
    g = torch.Generator().manual_seed(seed)
    params = synthetic_parameters(num_images, g, size)
    image = render_gratings(params, size) + 0.15 * torch.randn(num_images, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), synthetic_label(params["theta"], params["freq"])


def check_data_dir(data_dir: str | Path) -> None:
    """Cheap checks of `--data-dir` that a lesson can run before any long work: it is a folder (or absent), and
    the Fashion-MNIST files in it, if any, are intact. (CIFAR's files are checked by MD5 when loaded.)"""
    data_dir = Path(data_dir)
    require(
        not data_dir.exists() or data_dir.is_dir(),
        f"--data-dir {data_dir} is a file, not a folder (pass the folder that holds or will hold the datasets)",
    )
    verify_idx_files(data_dir / "FashionMNIST" / "raw", len(FASHION_CLASSES))


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    val_size: int = 5000,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    fallback: bool = False,
    synthetic_size: int = 12000,
) -> ImageData:
    """Load a dataset as `ImageData`, holding `val_size` training images out for validation.

    `train_size` / `test_size` keep a seeded random subset (None keeps all). With `fallback=True` a dataset
    that cannot be had is replaced by Fashion-MNIST (when on disk) or the synthetic set, with a loud notice
    on stderr. Lessons call `load_data`, which decides `fallback` by the one rule."""
    require(name in DATASETS, f"unknown dataset {name!r} (use one of: {', '.join(DATASETS)})")
    data_dir = Path(data_dir)
    if name != "synthetic":
        check_data_dir(data_dir)
    try:
        if name == "synthetic":
            x, y = make_synthetic(synthetic_size + max(synthetic_size // 6, 1000), seed=12345)
            split = synthetic_size
            train_x, train_y, test_x, test_y = x[:split], y[:split], x[split:], y[split:]
            classes = SYNTHETIC_CLASSES
        elif name == "fashion-mnist":
            train_x, train_y, test_x, test_y, classes = _torchvision_fashion_mnist(data_dir, download)
        else:
            train_x, train_y, test_x, test_y, classes = _torchvision_cifar(name, data_dir, download)
    except DataUnavailableError as error:
        if not fallback:
            raise
        # Real data beats generated data: prefer Fashion-MNIST when it is already on this machine.
        substitute = "synthetic"
        if name != "fashion-mnist":
            with contextlib.suppress(DataUnavailableError):
                _torchvision_fashion_mnist(data_dir, download=False)
                substitute = "fashion-mnist"
        banner = "!" * 100
        print(
            f"\n{banner}\nNOTICE: {error}\nFalling back to the {substitute.upper()} dataset so that this quick run still works: "
            f"its numbers are\nnot {name} numbers. A --full run never falls back: it stops with the error above.\n{banner}\n",
            file=sys.stderr,
            flush=True,
        )
        return load_dataset(substitute, data_dir, val_size, train_size, test_size, seed, download=False)

    require(0 < val_size < len(train_x), f"--val-size must be between 1 and {len(train_x) - 1} for {name}")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_size is not None:
        require(train_size > 0, "--train-size must be positive")
        train_idx = train_idx[:train_size]
    if test_size is not None:
        test_idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed + 1))[:test_size]
        test_x, test_y = test_x[test_idx], test_y[test_idx]
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    scaled = train_x.float().div_(255)
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return ImageData(name, classes, train_x, train_y, val_x, val_y, test_x, test_y, mean, std)


def load_data(cfg: Config, test_size: int | None = None, fallback: bool = True) -> ImageData:
    """The one way a lesson gets its data: `cfg.dataset` with the lesson's data_dir, val_size, train_size
    (0 or absent: all), seed and download, keeping `test_size` test images (None: all).

    The fallback rule, the only one: when the dataset is not available (not on disk, no download), a quick
    run substitutes another one with a loud notice, whether the name came from the constants block, a
    keyword or a flag; a `--full` run (or a caller passing `fallback=False`, such as a resumed run) stops with
    an error that says how to get the data."""
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        val_size=cfg.val_size,
        train_size=cfg.get("train_size") or None,
        test_size=test_size,
        seed=cfg.seed,
        download=cfg.download,
        fallback=fallback and not cfg.get("full", False),
    )


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
    (An idea of lesson 06, kept here because `sgd_train(augment=True)` of lessons 03 and 04 uses it too.)"""
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


# He et al.'s CIFAR schedule (lesson 03's subject) lives here because lessons 03, 04 and 05 all train with it.
def sgd_train(
    model: nn.Module,
    data: ImageData,
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
    require(steps > 0, "the number of training steps must be positive (raise --iterations or --epochs)")
    require(batch_size > 0, "the batch size must be positive (raise --batch-size)")
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    milestones = sorted(lr_milestones)
    batches = endless_batches(len(data.train_x), batch_size, generator)
    history, started = [], time.perf_counter()
    progress = Progress(range(steps), desc, unit="img", scale=batch_size)
    for step in progress:
        rate = lr * 0.1 ** sum(step >= m for m in milestones)
        if step < warmup_steps:
            rate = warmup_lr if warmup_lr is not None else lr * (step + 1) / warmup_steps
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = next(batches).to(data.train_x.device)
        images, labels = (
            data.train_x[index].to(device, non_blocking=True),
            data.train_y[index].to(device, non_blocking=True),
        )
        if augment:
            images = random_crop_flip(images, generator=generator)
        x = normalize(images, data.mean, data.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        require(torch.isfinite(loss).item(), f"the training loss became {loss.item()} at step {step} (lower --lr)")
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
        progress.set_postfix(f"loss {loss.item():.3f} err {error:.1%}")
    synchronize(device)
    return history


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (mini-batch curves are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
