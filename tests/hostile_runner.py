"""Run a lesson as `python LESSON ARGS` would, but forked from a process that has already imported torch.

Starting Python and importing torch costs about 3 s on 2 slow cores, and the hostile-input table has dozens of
rows that each fail within a fraction of a second after that. A multiprocessing "forkserver" imports torch,
numpy, matplotlib and the helpers once; every row then forks from it and runs the lesson file as `__main__`
with its own argv, working folder and stdout/stderr files, and exits with the status Python would give it
(SystemExit's code, 1 and a traceback for an uncaught exception). Set HOSTILE_SUBPROCESS=1 to run every row
as a real `python` subprocess instead; a test checks that both ways agree on a few rows.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "torchvision", "numpy", "matplotlib", "helpers", "hostile_runner"]
_context = None


def _child(script: str, args: list[str], cwd: str, stdout: str, stderr: str, env: dict) -> None:
    os.chdir(cwd)
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).parent)  # as `python script.py` sets it
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - report it the way the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(script: str, args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python script args` run in `cwd`, with `env` added to the environment."""
    env = {"NO_PROGRESS_BAR": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if os.environ.get("HOSTILE_SUBPROCESS"):
        return run_subprocess(script, args, cwd, timeout, env)
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    out, err = cwd / ".hostile-stdout", cwd / ".hostile-stderr"
    process = _context.Process(target=_child, args=(str(REPO / script), args, str(cwd), str(out), str(err), env))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"{script} {' '.join(args)} ran longer than {timeout} s")
    stdout, stderr = out.read_text(), err.read_text()
    out.unlink()
    err.unlink()
    return process.exitcode, stdout, stderr


def run_subprocess(script: str, args: list[str], cwd: Path, timeout: float = 120, env=None) -> tuple[int, str, str]:
    env = {**os.environ, "NO_PROGRESS_BAR": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    return result.returncode, result.stdout, result.stderr
