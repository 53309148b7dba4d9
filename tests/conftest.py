"""Shared fixtures: lessons loaded by number, CPU-only determinism, outputs in a temporary folder."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_PROGRESS_BAR", "1")

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def lesson01():
    return helpers.load_lesson(1)


@pytest.fixture(scope="session")
def lesson02():
    return helpers.load_lesson(2)


@pytest.fixture(scope="session")
def lesson03():
    return helpers.load_lesson(3)


@pytest.fixture(scope="session")
def lesson04():
    return helpers.load_lesson(4)


@pytest.fixture(scope="session")
def lesson05():
    return helpers.load_lesson(5)


@pytest.fixture(scope="session")
def lesson06():
    return helpers.load_lesson(6)


def run_script(script: str, *args: str, timeout: float = 300, cwd: Path | None = None):
    """Run a lesson as a user would, `python 0N_name.py ARGS`, and return the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROGRESS_BAR": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
    )
