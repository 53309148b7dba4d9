"""The generic plumbing the lessons rely on: constants -> flags and config, UserError -> one line and exit 1,
atomic writes, fixed-width tables, loading a lesson by number."""

import subprocess
import sys
import textwrap

import pytest

import helpers

LESSON_TEXT = '''
"""A tiny lesson used by the tests."""
import sys
sys.path.insert(0, {repo!r})
import helpers

# --- constants ---------------------------------------------------------------------------------------
BATCH_SIZE = 32  # images per batch
LEARNING_RATE = 0.1  # step size
AUGMENT = True  # random crops and flips
DEPTHS = (20, 56)  # network depths to compare
DATASET = "cifar10"  # which dataset
# --- end constants -----------------------------------------------------------------------------------
NOT_A_CONSTANT = 1


def main(**overrides):
    cfg = helpers.config(globals(), overrides)
    helpers.require(cfg.batch_size > 0, "--batch-size must be positive (pass a number above 0)")
    print(sorted(cfg.items()), sorted(cfg.explicit))
    return cfg


if __name__ == "__main__":
    helpers.run_cli(main, globals(), choices={{"dataset": helpers.DATASETS}})
'''


@pytest.fixture
def tiny_lesson(tmp_path):
    path = tmp_path / "07_tiny.py"
    path.write_text(textwrap.dedent(LESSON_TEXT.format(repo=str(helpers.REPO_DIR))))
    module_globals = {"__file__": str(path)}
    exec(compile(path.read_text(), str(path), "exec"), module_globals)
    return path, module_globals


def test_constants_become_flags_and_config(tiny_lesson):
    _, module_globals = tiny_lesson
    constants = {c.name: c for c in helpers.read_constants(module_globals)}
    assert list(constants) == ["BATCH_SIZE", "LEARNING_RATE", "AUGMENT", "DEPTHS", "DATASET"]
    assert constants["BATCH_SIZE"].flag == "--batch-size" and constants["BATCH_SIZE"].help == "images per batch"
    parser = helpers.build_parser(module_globals, {"dataset": helpers.DATASETS})
    args = vars(parser.parse_args(["--batch-size", "8", "--no-augment", "--depths", "32", "44", "110"]))
    assert args == {"batch_size": 8, "augment": False, "depths": [32, 44, 110]}  # only what was typed
    cfg = helpers.config(module_globals, args)
    assert cfg.batch_size == 8 and cfg.learning_rate == 0.1 and cfg.depths == (32, 44, 110)
    assert cfg.explicit == {"batch_size", "augment", "depths"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "imagenet"])  # not among the choices: argparse usage error
    with pytest.raises(TypeError):
        helpers.config(module_globals, {"batch_sise": 8})  # a misspelt keyword fails like any Python call


def test_user_error_is_one_line_and_exit_1(tiny_lesson):
    path, _ = tiny_lesson
    done = subprocess.run([sys.executable, str(path), "--batch-size", "0"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == "error: --batch-size must be positive (pass a number above 0)\n"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    helpers.atomic_write(target, lambda tmp: tmp.write_text("old"))

    def crash(tmp):
        tmp.write_text("half of the new cont")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        helpers.atomic_write(target, crash)
    assert target.read_text() == "old"  # the previous version is intact
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # and no temporary file is left behind
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


def test_load_lesson_by_number():
    module = helpers.load_lesson(1)
    assert module is helpers.load_lesson("01") is sys.modules["lesson01"]
    assert hasattr(module, "ResidualBlock") and module.__file__.endswith("01_basic_residual_block.py")
    with pytest.raises(FileNotFoundError):
        helpers.load_lesson(99)
