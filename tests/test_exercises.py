"""Try this, answered and kept true: every exercise of every lesson is rerun as its answer says, and what the
answer quotes from that run must match what the run prints now.

An answer (`answers/0N_*.md`) shows each run as a ```text block: its first line is the command (`$ python ...`),
the other lines are copied from what that run printed. The test runs the command in an empty folder holding only
the lesson and helpers.py (an edit the exercise asks for, shown as a ```diff block, is made to that copy), then finds every
copied line in the new output: same words, same numbers to the printed precision (a number written `~12` is a
time or a speed, which depend on the machine and its load, and is not compared). A ```python block is run as it is, and the ```text block after
it (no `$` line) is checked against its output. So when a lesson changes, a stale answer fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANSWERS = REPO / "answers"
LESSONS = {int(path.name[:2]): path for path in REPO.glob("0[1-6]_*.py")}
NUMBER = re.compile(r"~?[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?")

FAST = {1: {0, 4, 5}, 2: {5}}  # about 10 s each, the edits and the Python snippet; the rest: marked slow


def sections(lesson: int) -> dict[int, str]:
    """The answer file's "## Exercise N" sections by number, and "## Check yourself" as number 0."""
    text = (ANSWERS / f"{LESSONS[lesson].stem}.md").read_text()
    parts = re.split(r"^## (?:Exercise (\d+)\b.*|Check yourself)$", text, flags=re.M)
    return {int(number or 0): body for number, body in zip(parts[1::2], parts[2::2])}


def blocks(section: str) -> list[tuple[str, str]]:
    """The section's fenced blocks, in order: (language, body)."""
    return re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.M | re.S)


def tokens(line: str) -> list[str]:
    return line.split()


def numbers_match(quoted: str, printed: str) -> bool:
    """`quoted` from the answer and `printed` from the run: the same text around the same numbers. A number
    matches to the precision the answer printed it with; one written ~N (a time or a speed) is not compared."""
    if NUMBER.sub("#", quoted).replace("~", "") != NUMBER.sub("#", printed):
        return False
    for q, p in zip(NUMBER.findall(quoted), NUMBER.findall(printed)):
        loose, q = q.startswith("~"), q.lstrip("~")
        qv, pv = (float(v.replace(",", "")) for v in (q, p))
        if loose:  # a time or a speed: the machine's, not the lesson's (a busy machine can be 10x slower)
            if (qv > 0) != (pv > 0):
                return False
        elif q != p:
            return False
    return True


def line_found(quoted: str, output: str) -> bool:
    want = tokens(quoted)
    for line in output.splitlines():
        have = tokens(line)
        if len(have) == len(want) and all(numbers_match(q, p) for q, p in zip(want, have)):
            return True
    return False


def check_excerpt(excerpt: list[str], output: str, where: str) -> None:
    missing = [line for line in excerpt if line.strip() and not line_found(line, output)]
    assert not missing, (
        f"{where}: lines of the answer that this run no longer prints:\n"
        + "\n".join(missing)
        + ("\n--- the run printed:\n" + output[-6000:])
    )


def make_folder(tmp_path: Path, lesson: int, edits: list[str]) -> Path:
    """An empty folder with helpers.py and the lesson, edited as the answer's ```diff blocks say (lines starting
    with "-" are replaced by those starting with "+", around the unchanged " " lines; found exactly once)."""
    folder = tmp_path / "lesson"
    folder.mkdir(exist_ok=True)
    shutil.copy(REPO / "helpers.py", folder)
    source = LESSONS[lesson].read_text()
    for diff in edits:
        lines = diff.splitlines()
        old = "".join(line[1:] + "\n" for line in lines if line[:1] in " -")
        new = "".join(line[1:] + "\n" for line in lines if line[:1] in " +")
        assert source.count(old) == 1, f"this edit no longer applies to {LESSONS[lesson].name}:\n{diff}"
        source = source.replace(old, new)
    (folder / LESSONS[lesson].name).write_text(source)
    return folder


def command(line: str, lesson: int) -> tuple[list[str], str | None]:
    """`$ python 03_x.py --flags  # note` -> argv for this interpreter (fp32 forced where the lesson trains, as
    the answers were measured in fp32), and the note (`Ctrl-C during epoch N` interrupts the run there)."""
    text, _, note = line.removeprefix("$ ").partition("#")
    argv = shlex.split(text)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        assert argv[0] == "python", line
        argv[0] = sys.executable
    if "PRECISION: str" in LESSONS[lesson].read_text() and "--precision" not in argv:
        argv.append("--precision=fp32")
    return argv, note.strip() or None


def run(argv: list[str], folder: Path, note: str | None, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROGRESS_BAR": "1"}
    if not note:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    stop_at = re.fullmatch(r"Ctrl-C during epoch (\d+)", note)
    assert stop_at, f"unknown note {note!r}"
    process = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, started = [], time.monotonic()
    for line in process.stdout:
        output.append(line)
        if line.strip().startswith(f"{int(stop_at[1]) - 1}/"):  # the row of epoch N-1: epoch N has begun
            time.sleep(3.0)
            process.send_signal(signal.SIGINT)
        assert time.monotonic() - started < timeout
    assert process.wait() == 130, "".join(output)[-3000:]
    return "".join(output)


def exercise_cases():
    for lesson in sorted(LESSONS):
        for number, section in sections(lesson).items():
            if number == 0 and not blocks(section):  # questions answered from the card's numbers alone
                continue
            slow = number not in FAST.get(lesson, set())
            name = f"{lesson:02d}-{number or 'check-yourself'}"
            yield pytest.param(lesson, number, id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("lesson", "number"), list(exercise_cases()))
def test_exercise_answer_matches_a_rerun(lesson, number, tmp_path):
    parts = blocks(sections(lesson)[number])
    folder = make_folder(tmp_path, lesson, [body for language, body in parts if language == "diff"])
    assert any(language == "text" for language, _ in parts), "an answer shows what its run printed"
    snippet_output = None
    for language, body in parts:
        lines = body.splitlines()
        if language == "python":
            snippet = subprocess.run([sys.executable, "-c", body], cwd=folder, capture_output=True, text=True)
            assert snippet.returncode == 0, snippet.stderr[-3000:]
            snippet_output = snippet.stdout
        elif language == "text" and lines and lines[0].startswith("$ "):
            argv, note = command(lines[0], lesson)
            check_excerpt(lines[1:], run(argv, folder, note), f"exercise {number}: {lines[0]}")
        elif language == "text":
            assert snippet_output is not None, "a text block without a command follows a python block"
            check_excerpt(lines, snippet_output, f"exercise {number}, the Python snippet")


@pytest.mark.parametrize("lesson", sorted(LESSONS))
def test_every_exercise_has_an_answer_and_check_yourself_questions(lesson):
    """Each numbered Try-this item of the card has an answer section, each EXERCISES entry matches its number,
    and the answer file ends with 3-5 check-yourself questions, each answered."""
    card = LESSONS[lesson].read_text().split('"""')[1]
    try_this = card[card.index("Try this") :]
    asked = {int(n) for n in re.findall(r"^ {4}(\d+)\. ", try_this, flags=re.M)}
    asked |= {int(n) for n in re.findall(r"\b(?:then|and) (\d+)\. ", try_this)}
    assert asked == set(sections(lesson)) - {0} == set(range(1, len(asked) + 1))
    text = (ANSWERS / f"{LESSONS[lesson].stem}.md").read_text()
    questions = re.findall(
        r"^\d+\. \*\*(.+?)\*\*\s*(.+?)(?=^\d+\. \*\*|\Z)", text.split("## Check yourself")[1], re.M | re.S
    )
    assert 3 <= len(questions) <= 5
    assert all(len(answer.split()) >= 8 for _, answer in questions), "every question has a worded answer"


def prose(text: str) -> str:
    """The answer's own words: fenced blocks and `inline code` (commands, formulas) removed."""
    text = re.sub(r"`[^`]*`", "", re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S))
    text = re.sub(r"(?i)\b(lesson|exercise|seeds?) \d+(?:(?:, | and )\d+)*", "", text)  # names, not measurements
    return re.sub(r"\b[A-Za-z]+-\d+", "", text)  # CIFAR-10, ResNet-50, plain-56


@pytest.mark.parametrize("lesson", sorted(LESSONS))
def test_answers_quote_only_numbers_a_run_printed(lesson):
    """Every measured-looking number in an answer's prose (a decimal, or an integer of two digits or more) is
    one that a quoted run printed, or one that the lesson's card states. Years and formulas in code are exempt."""
    text = (ANSWERS / f"{LESSONS[lesson].stem}.md").read_text()
    printed = "\n".join(body for _, body in blocks(text)) + LESSONS[lesson].read_text().split('"""')[1]
    printed_numbers = {n.lstrip("+-~").replace(",", "") for n in NUMBER.findall(printed)}
    quoted = re.findall(r"(?<![\w.,])[-+]?(?:\d+(?:,\d{3})+|\d+\.\d+(?:e[-+]?\d+)?|\d{2,})(?![\w.]|,\d)", prose(text))
    invented = sorted(
        {
            q
            for q in quoted
            if q.lstrip("+-").replace(",", "") not in printed_numbers and not re.fullmatch(r"(19|20)\d\d", q)
        }
    )
    assert not invented, f"numbers in {LESSONS[lesson].stem}.md that no quoted run printed: {invented}"
