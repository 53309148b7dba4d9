"""How a lesson's constants block becomes its configuration, its command-line flags and its notebook run.

Plumbing, not a lesson: `helpers` re-exports what the lessons call (`config`, `run_cli`,
`constants_as_keywords`, `UserError`, `require`). A lesson uses it like this:

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
import io
import math
import os
import re
import sys
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

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
