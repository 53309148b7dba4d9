"""Shared fixtures: lessons loaded by number, CPU-only determinism, outputs in a temporary folder."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_PROGRESS_BAR", "1")


def load_lesson(number: int):
    """Import a lesson file by its number (`02_...py` cannot be spelled in an import statement). It is registered
    as `lesson02` so that pickling can find its classes. Importing a lesson runs no experiment."""
    import importlib.util

    name = f"lesson{number:02d}"
    if name not in sys.modules:
        (path,) = REPO.glob(f"{number:02d}_*.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def lesson01():
    return load_lesson(1)


@pytest.fixture(scope="session")
def lesson02():
    return load_lesson(2)


@pytest.fixture(scope="session")
def lesson03():
    return load_lesson(3)


@pytest.fixture(scope="session")
def lesson04():
    return load_lesson(4)


@pytest.fixture(scope="session")
def lesson05():
    return load_lesson(5)


@pytest.fixture(scope="session")
def lesson06():
    return load_lesson(6)


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
