"""`--help` of every lesson and of the benchmark prints and exits 0 (a `%` in a comment once broke it), and
shows what `--full` changes. All of them run in one Python process, so that torch is imported once."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO, load_lesson

SCRIPTS = sorted(p.name for p in REPO.glob("0[1-6]_*.py")) + ["benchmarks/pipeline_throughput.py"]

PRINT_HELP = """
import contextlib, io, runpy, sys
sys.path.insert(0, {repo!r})
for script in {scripts!r}:
    sys.argv = [{repo!r} + "/" + script, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as done:
            assert done.code in (0, None), (script, done.code)
    print("=== " + script)
    print(text.getvalue())
"""


def test_help_of_every_lesson_and_the_benchmark():
    code = PRINT_HELP.format(repo=str(REPO), scripts=SCRIPTS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])
    assert sorted(sections) == sorted(SCRIPTS)
    for script, text in sections.items():
        assert text.startswith("usage: "), script
        if script.startswith("0") and "--full" in text:  # lessons 03-06
            assert "--full changes: " in text and "; --full: " in text, script
    assert "over this final fraction (20%)" in " ".join(sections["03_training_comparison.py"].split())  # % is safe


def test_every_main_lists_its_keywords():
    import helpers

    for number in range(1, 7):
        lesson = load_lesson(number)
        doc = lesson.main.__doc__
        for constant in helpers.read_constants(vars(lesson)):
            assert f"    {constant.key}: {constant.type} = " in doc, (number, constant.key)


def test_editing_lesson03s_lr_to_an_int_keeps_a_float_flag(tmp_path):
    """The issue's example: `LR = 0.1` edited to `LR = 1` once turned --lr into an int flag."""
    import helpers

    source = (REPO / "03_training_comparison.py").read_text()
    assert "\nLR: float = 0.05  #" in source
    edited = tmp_path / "03_training_comparison.py"
    edited.write_text(source.replace("\nLR: float = 0.05  #", "\nLR: float = 1  #"))
    namespace = {"__file__": str(edited), "__name__": "edited03"}
    exec(compile(edited.read_text(), str(edited), "exec"), namespace)
    args = vars(helpers.build_parser(namespace).parse_args(["--lr", "0.05", "--data-dir", "~/datasets"]))
    cfg = helpers.config(namespace, args)
    assert cfg.lr == 0.05 and helpers.config(namespace, {}).lr == 1.0
    assert cfg.data_dir == str(Path("~/datasets").expanduser())  # never a folder named "~"


def test_every_exercise_is_valid_flags_or_an_edit():
    """Each lesson's EXERCISES entry is either keywords that `main` accepts and that pass its checks, or the
    description of an edit; `helpers.exercise_flags` writes the flags a learner could type instead."""
    import helpers

    for number in range(1, 7):
        lesson = load_lesson(number)
        assert list(lesson.EXERCISES) == list(range(1, len(lesson.EXERCISES) + 1)), number
        for exercise in lesson.EXERCISES.values():
            if isinstance(exercise, str):
                continue
            helpers.config(vars(lesson), exercise)  # an unknown key or a failed check raises here
            flags = helpers.exercise_flags(exercise).split()
            parsed = vars(helpers.build_parser(vars(lesson)).parse_args(flags))
            assert helpers.config(vars(lesson), parsed) == helpers.config(vars(lesson), exercise), (number, flags)


def test_exercise_flag_runs_its_flags_and_the_users_win(monkeypatch, capsys):
    """`--exercise N`: the exercise's flags, then the user's on top; an edit-exercise is one `error:` line."""
    import helpers

    lesson = load_lesson(3)
    seen = {}
    monkeypatch.setattr(sys, "argv", [lesson.__file__, "--exercise", "3", "--bn-recalibration-batches", "5"])
    helpers.run_cli(lambda **flags: seen.update(flags), vars(lesson))
    assert seen == {"depths": (20,), "bn_recalibration_batches": 5}
    assert (
        capsys.readouterr().out == "exercise 3: --depths 20 --bn-recalibration-batches 1 --bn-recalibration-batches 5\n"
    )
    lesson01 = load_lesson(1)
    monkeypatch.setattr(sys, "argv", [lesson01.__file__, "--exercise", "4"])
    try:
        helpers.run_cli(lambda **flags: None, vars(lesson01))
    except SystemExit as done:
        assert done.code == 1
    assert capsys.readouterr().err.startswith("error: exercise 4 is an edit to the code: in make_stack")
