"""The generic plumbing the lessons rely on: constants -> flags and config, UserError -> one line and exit 1,
atomic writes, fixed-width tables, loading a lesson by number."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

import helpers

LESSON_TEXT = """
\"\"\"A tiny lesson used by the tests: 100% made up.\"\"\"
from __future__ import annotations
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import helpers

# --- constants ---------------------------------------------------------------------------------------
BATCH_SIZE: int = 32  # images per batch [> 0]
LEARNING_RATE: float = {lr}  # step size, 10% of the usual [> 0]
AUGMENT: bool = True  # random crops and flips
DEPTHS: tuple[int, ...] = (20, 56)  # network depths to compare [>= 8]
DATASET: str = "cifar10"  # which dataset [cifar10 | cifar100 | fashion-mnist | synthetic]
INIT: str = "he"  # weight init [pytorch | he]
DATA_DIR: Path = {data_dir!r}  # where the data lives
FULL: bool = False  # the long run
# --- end constants -----------------------------------------------------------------------------------
NOT_A_CONSTANT = 1
FULL_OVERRIDES = {{"batch_size": 128, "depths": (20, 32, 44, 56, 110)}}


@helpers.constants_as_keywords
def main(**overrides):
    \"\"\"Print the config.\"\"\"
    cfg = helpers.config(globals(), overrides, FULL_OVERRIDES)
    print(repr(sorted(cfg.items())))
    return cfg


if __name__ == "__main__":
    helpers.run_cli(main, globals())
"""


def write_lesson(tmp_path, lr="0.1", data_dir="data"):
    path = tmp_path / "07_tiny.py"
    path.write_text(textwrap.dedent(LESSON_TEXT.format(repo=str(REPO), lr=lr, data_dir=data_dir)))
    module_globals = {"__file__": str(path), "__name__": "tiny"}
    exec(compile(path.read_text(), str(path), "exec"), module_globals)
    return path, module_globals


@pytest.fixture
def tiny_lesson(tmp_path):
    return write_lesson(tmp_path)


def run(path, *args, env=None):
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env)


def test_constants_become_flags_and_config(tiny_lesson):
    _, module_globals = tiny_lesson
    constants = {c.name: c for c in helpers.read_constants(module_globals)}
    assert list(constants)[:4] == ["BATCH_SIZE", "LEARNING_RATE", "AUGMENT", "DEPTHS"]
    assert constants["BATCH_SIZE"].flag == "--batch-size" and constants["BATCH_SIZE"].help == "images per batch"
    assert constants["BATCH_SIZE"].check == "> 0" and constants["DEPTHS"].type == "tuple[int, ...]"
    parser = helpers.build_parser(module_globals)
    args = vars(parser.parse_args(["--batch-size", "8", "--no-augment", "--depths", "32", "44", "110"]))
    assert args == {"batch_size": 8, "augment": False, "depths": [32, 44, 110]}  # only what was typed
    cfg = helpers.config(module_globals, args)
    assert cfg.batch_size == 8 and cfg.learning_rate == 0.1 and cfg.depths == (32, 44, 110)
    assert cfg.lesson == "07_tiny"
    with pytest.raises(TypeError):
        helpers.config(module_globals, {"batch_sise": 8})  # a misspelt keyword fails like any Python call


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be > 0 (got 0)"),
        ({"depths": (20, 4)}, "--depths must be >= 8 (got 4)"),
        ({"dataset": "imagenet"}, "--dataset must be one of cifar10, cifar100, fashion-mnist, synthetic"),
        ({"init": "xavier"}, "--init must be one of pytorch, he (got 'xavier')"),
        ({"batch_size": 2.5}, "--batch-size takes int values, not 2.5"),
        ({"augment": 1}, "--augment takes bool values, not 1"),
    ],
)
def test_values_are_checked_against_their_declaration(tiny_lesson, overrides, message):
    _, module_globals = tiny_lesson
    with pytest.raises(helpers.UserError, match="^" + re.escape(message)):
        helpers.config(module_globals, overrides)


def test_range_check_is_one_error_line_and_exit_1(tiny_lesson):
    path, _ = tiny_lesson
    done = run(path, "--batch-size", "0")
    assert done.returncode == 1
    assert done.stderr == "error: --batch-size must be > 0 (got 0)\n"
    done = run(path, "--batch-size", "many")  # argparse's own complaint, also one line
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")


def test_edited_constant_keeps_its_flag_type(tmp_path):
    """`LEARNING_RATE = 0.1` edited to `1`: the flag still takes floats, and the value is a float."""
    path, module_globals = write_lesson(tmp_path, lr="1")
    assert helpers.config(module_globals, {}).learning_rate == 1.0
    assert isinstance(helpers.config(module_globals, {}).learning_rate, float)
    done = run(path, "--learning-rate", "0.05")
    assert done.returncode == 0, done.stderr
    assert "('learning_rate', 0.05)" in done.stdout
    path, module_globals = write_lesson(tmp_path, lr="-1")  # an edited constant is checked like a flag
    done = run(path)
    assert done.returncode == 1 and done.stderr == "error: --learning-rate must be > 0 (got -1.0)\n"


def test_help_is_percent_safe_and_shows_full(tiny_lesson):
    path, _ = tiny_lesson
    done = run(path, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "100% made up" in text and "10% of the usual" in text
    assert "--full changes: batch_size=128, depths=(20, 32, 44, 56, 110)" in text
    assert "(default: 32; --full: 128)" in text and "[> 0]" in text


def test_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LESSON_DATA", str(tmp_path / "elsewhere"))
    path, module_globals = write_lesson(tmp_path, data_dir="~/data")
    assert helpers.config(module_globals, {}).data_dir == str(tmp_path / "home" / "data")
    assert helpers.config(module_globals, {"data_dir": "$LESSON_DATA/x"}).data_dir == str(tmp_path / "elsewhere/x")
    done = run(path, "--data-dir", "~/other", env={**os.environ})
    assert f"('data_dir', '{tmp_path / 'home' / 'other'}')" in done.stdout
    assert helpers.config(module_globals, {"data_dir": ""}).data_dir == ""  # empty stays empty: "not set"


def test_main_docstring_lists_its_keywords(tiny_lesson):
    _, module_globals = tiny_lesson
    doc = module_globals["main"].__doc__
    assert doc.startswith("Print the config.")
    for line in ("batch_size: int = 32  images per batch", "depths: tuple[int, ...] = (20, 56)", "full: bool = False"):
        assert line in doc


def test_notebook_namespace_needs_no_file_and_ignores_argv(tmp_path, monkeypatch):
    """In a kernel there is no `__file__`, sys.argv holds the kernel's own arguments, and the constants
    block is found in IPython's cell history `_ih`: types, checks and help still come from it."""
    source = textwrap.dedent(LESSON_TEXT.format(repo=str(REPO), lr="1", data_dir="~/d"))
    cells = source.split("# --- constants")
    cells = [cells[0], "# --- constants" + cells[1]]
    namespace = {"__name__": "__main__", "_ih": [""]}
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    for cell in cells:
        namespace["_ih"].append(cell)
        exec(compile(cell, "<cell>", "exec"), namespace)
    cfg = namespace["main"](learning_rate=2)
    assert cfg.learning_rate == 2.0 and cfg.lesson == "notebook"  # no file, no OUT constant to name it
    namespace["BATCH_SIZE"] = -3  # an edit in the notebook
    assert helpers.run_cli(namespace["main"], namespace) is None  # one error line on stderr, no exit


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    helpers.atomic_write(target, lambda tmp: tmp.write_text("old"))

    def crash(tmp):
        tmp.write_text("half of the new cont")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        helpers.atomic_write(target, crash)
    assert target.read_text() == "old"  # the previous version is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [helpers.MANIFEST, "results.json"]  # no temporary file left
    with pytest.raises(RuntimeError):
        helpers.atomic_write(tmp_path / "new.json", crash)
    assert not (tmp_path / "new.json").exists()


def test_format_table_is_fixed_width():
    rows = [{"model": "resnet20", "depth": 20, "error": 0.0875}, {"model": "plain110", "depth": 110, "error": 0.1234}]
    table = helpers.format_table(rows, [("model", ""), ("depth", "d"), ("error", ".2%")], title="Results")
    assert table.splitlines() == [
        "Results",
        "model     depth   error",
        "--------  -----  ------",
        "resnet20     20   8.75%",
        "plain110    110  12.34%",
    ]
    assert len({len(line) for line in table.splitlines()[1:]}) == 1  # every line of the body equally wide
    assert helpers.format_table([{"a": None}]).splitlines()[-1] == "-"  # a missing value prints as "-"


def test_a_wrapped_declaration_is_refused_not_silently_dropped():
    """One line per constant: a declaration split over lines would lose its help and check, so it is an error."""
    cell = (
        "# --- constants\nSIZES: tuple[int, ...] = (\n    128,\n    64,\n)  # layer widths [> 0]\n# --- end constants\n"
    )
    namespace = {"_ih": ["", cell]}
    exec(cell, namespace)
    with pytest.raises(RuntimeError, match="SIZES: keep each constant's declaration on one line"):
        helpers.read_constants(namespace)
    cell = "# --- constants\nSIZES: tuple[int, ...] = (128, 64)  # layer widths [> 0]\nNAME: str = 'a'  # which one [a | b]\n# --- end constants\n"
    namespace = {"_ih": ["", cell]}
    exec(cell, namespace)
    sizes, name = helpers.read_constants(namespace)
    assert (sizes.help, sizes.check, sizes.type) == ("layer widths", "> 0", "tuple[int, ...]")
    assert (name.help, name.check) == ("which one", "a | b")
    with pytest.raises(helpers.UserError, match="--sizes must be > 0"):
        helpers.config(namespace, {"sizes": (3, 0)})


def test_atomic_write_gives_the_permissions_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        path = helpers.atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.umask(0o077)
        path = helpers.atomic_write(tmp_path / "b.json", lambda tmp: tmp.write_text("{}"))
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_results_json_keys_are_snake_case_and_rates_fractions():
    saved = helpers._jsonable({"max |F(x)|": 1, "N=8": 2, "ms@32": 3, "first/last": 4, "test_err_%": 8.75, "GMACs": 5})
    assert saved == {"max_f_x": 1, "n_8": 2, "ms_at_32": 3, "first_over_last": 4, "test_err": 0.0875, "gmacs": 5}
    assert helpers._jsonable({"resnet-20": {"v1.5 - v1": 0.2}}) == {"resnet-20": {"v1_5_minus_v1": 0.2}}


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(28, "No space left on device", "/data/out/results.json"), "No space left on device: /data/out/results.json"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file "
                      "write failed"), "cannot write a file: [enforce fail at inline_container.cc:672]"),
        (OSError(36, "File name too long", "x" * 300), "File name too long: xxx"),
    ],
    ids=["disk full", "torch.save on a full disk", "name too long"],
)  # fmt: skip
def test_a_full_disk_or_a_bad_path_is_one_line_and_exit_1(error, line, monkeypatch, capsys):
    """Whatever the lesson was writing when the disk filled: one `error:` line, status 1, no traceback."""

    def main():
        raise error

    import argparse
    import signal

    module_globals = {"__file__": "/lessons/07_tiny.py"}
    monkeypatch.setattr(sys, "argv", ["/lessons/07_tiny.py"])  # as `python /lessons/07_tiny.py` would have it
    parser = type("Parser", (), {"parse_args": lambda self: argparse.Namespace()})
    monkeypatch.setattr(helpers, "build_parser", lambda *args: parser())
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            helpers.run_cli(lambda **flags: main(), module_globals)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {line}")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_precision_on_cuda_follows_compute_capability(capability, expected, monkeypatch):
    """A T4 (7.5) or V100 (7.0) only emulates bf16, although `torch.cuda.is_bf16_supported()` says True there: auto
    must pick fp16 with gradient scaling below 8.0, and bf16 from the A100 (8.0) on. The GPU is faked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert helpers.autocast_dtype(torch.device("cuda"), "auto") == expected
    assert helpers.autocast_dtype(torch.device("cuda"), "fp32") is None  # an explicit choice is kept
    assert helpers.autocast_dtype(torch.device("mps"), "auto") is None


@pytest.mark.parametrize(
    ("machine", "capability", "cpuinfo", "expected"),
    [
        ("x86_64", "AVX512", "flags : fpu avx512f avx512_bf16 sse", True),
        ("x86_64", "AVX512", "flags : fpu avx512f amx_bf16", True),
        ("x86_64", "AVX512", "flags : fpu avx512f avx512_vnni", False),  # a Xeon with AVX-512 but no BF16
        ("x86_64", "AVX2", "flags : fpu avx2 avx512_bf16", False),  # torch told to stay below AVX-512
        ("aarch64", "DEFAULT", "Features : fp asimd bf16 sve", True),
        ("aarch64", "DEFAULT", "Features : fp asimd", False),
        ("arm64", "DEFAULT", None, False),  # macOS: no /proc/cpuinfo, so never assumed (the M1 has no BF16)
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(machine, capability, cpuinfo, expected, monkeypatch, tmp_path):
    cpuinfo_path = tmp_path / "cpuinfo"  # absent for macOS
    if cpuinfo is not None:
        cpuinfo_path.write_text(cpuinfo + "\n")
    monkeypatch.setattr(helpers, "CPU_FLAGS", cpuinfo_path)
    monkeypatch.setattr(helpers.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert helpers.cpu_has_native_bf16() is expected
    assert (helpers.autocast_dtype(torch.device("cpu"), "auto") == torch.bfloat16) is expected


def test_x86_without_avx512_bf16_runs_fp32(monkeypatch):
    monkeypatch.setattr(helpers.sys, "platform", "linux")
    monkeypatch.setattr(helpers.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert helpers.autocast_dtype(torch.device("cpu"), "auto") is None


def test_batch_norm_recalibration_is_the_plain_mean_over_the_batches():
    """The running statistics become the average of the batches' statistics (momentum None), weights and the
    module's mode and momentum unchanged; no batches leave the statistics alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3)).eval()
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) for i in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    helpers.recalibrate_batch_norm(model, [])
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    helpers.recalibrate_batch_norm(model, batches, channels_last=True)
    with torch.no_grad():
        outputs = [model[0](x) for x in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outputs]).mean(0)  # unbiased, as BN keeps
    assert torch.allclose(model[1].running_mean, means, atol=1e-5)
    assert torch.allclose(model[1].running_var, variances, rtol=1e-4)
    assert not model.training and model[1].momentum == 0.3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
