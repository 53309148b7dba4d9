"""Hostile inputs against every lesson and the benchmark (issue 12): nothing lost, nothing silently wrong, no
tracebacks.

HOSTILE is the table: each row runs `python LESSON FLAGS` (forked from a process with torch already imported,
see hostile_runner.py) with an `--out` folder that already holds an earlier run's files, and asserts

* the exit status (1 for a bad input, 2 for an argparse usage error, 0 where nothing is wrong);
* exactly one `error:` line on stderr, matching the row's message, and no traceback;
* every file already in `--out` unchanged, byte for byte, and none removed.

Every row fails before any long work, so the table runs in seconds. Below the table: lesson 06's resume
semantics, NaN-never-best, the output-folder lock, stale files and the checkpoint schema, in-process.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import re
import shutil
from pathlib import Path

import hostile_runner
import pytest
import torch
from conftest import REPO, load_lesson

import helpers

L01, L02, L03 = "01_basic_residual_block.py", "02_resnet_implementation.py", "03_training_comparison.py"
L04, L05, L06 = "04_residual_variants.py", "05_visualization.py", "06_practical_example.py"
BENCH = "benchmarks/pipeline_throughput.py"
LESSONS = (L01, L02, L03, L04, L05, L06)
TINY06 = ["--dataset", "synthetic", "--model", "resnet20", "--train-size", "256", "--val-size", "64"]
TINY06 += ["--test-size", "64", "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--num-mistakes", "2"]
SEED_MESSAGE = r"--seed must be >= 0 \(got -1\)"


def row(script, args, status, message, case=None):
    name = case or f"{script[:2] if script != BENCH else 'bench'}:{' '.join(args)[:60]}"
    return pytest.param(script, args, status, message, id=name)


HOSTILE = [
    # --- every lesson: a seed out of range, a blocked --out, an abbreviated flag ---------------------------
    *[row(lesson, ["--seed", "-1"], 1, SEED_MESSAGE) for lesson in LESSONS],
    *[
        row(lesson, ["--seed", str(2**32)], 1, r"--seed must be < 4294967296 \(got 4294967296\)")
        for lesson in (L01, L06)
    ],
    *[
        row(lesson, ["--out", "{blocker}/out"], 1, r"cannot write to output folder .*blocker is a file, not a folder")
        for lesson in (L01, L02, L03, L05, L06)
    ],
    *[
        row(
            lesson,
            ["--out", "/sys/hostile-out"],
            1,
            r"cannot write to output folder /sys/hostile-out: Operation not permitted",
        )
        for lesson in (L01, L04, L06)
    ],  # a read-only place even for root
    row(L03, ["--depth", "20"], 2, r"unrecognized arguments: --depth", "03:abbreviated --depth"),
    row(L06, ["--epoch", "2"], 2, r"unrecognized arguments: --epoch", "06:abbreviated --epoch"),
    # --- numbers that are not numbers, or out of range ---------------------------------------------------------
    row(L02, ["--latency-seconds", "inf"], 1, r"--latency-seconds is inf, not a finite number"),
    row(L02, ["--latency-seconds", "nan"], 1, r"--latency-seconds is nan, not a finite number"),
    row(L02, ["--latency-seconds", "-1"], 1, r"--latency-seconds must be >= 0"),
    row(L03, ["--momentum", "-0.9"], 1, r"--momentum must be >= 0 \(got -0.9\)"),
    row(L03, ["--momentum", "1"], 1, r"--momentum must be < 1 \(got 1.0\)"),
    row(L03, ["--weight-decay", "-1"], 1, r"--weight-decay must be >= 0 \(got -1.0\)"),
    row(L03, ["--momentum", "nan"], 1, r"--momentum is nan, not a finite number"),
    row(L03, ["--lr", "-0.1"], 1, r"--lr must be > 0 \(got -0.1\)"),
    row(L03, ["--depths", "21"], 1, r"depth 21 is not 6n\+2"),
    row(L04, ["--lr", "nan"], 1, r"--lr is nan, not a finite number"),
    row(L04, ["--deep-depth", "1000"], 1, r"--deep-depth must be 9n\+2"),
    row(L05, ["--lr", "-0.1"], 1, r"--lr must be > 0 \(got -0.1\)"),
    row(L05, ["--grid-radius", "inf"], 1, r"--grid-radius is inf, not a finite number"),
    row(L05, ["--plain-checkpoint", "{tmp}/nope.pt"], 1, r"--plain-checkpoint .*nope.pt is not a file"),
    row(L06, ["--momentum", "nan"], 1, r"--momentum is nan, not a finite number"),
    row(L06, ["--momentum", "-0.9"], 1, r"--momentum must be >= 0"),
    row(L06, ["--lr", "-1"], 1, r"--lr must be > 0 \(got -1.0\)"),
    row(L06, ["--label-smoothing", "1"], 1, r"--label-smoothing must be < 1"),
    row(L06, ["--eval-batch-size", "0"], 1, r"--eval-batch-size must be > 0"),
    row(L06, ["--schedule", "linear"], 1, r"--schedule must be one of onecycle, cosine \(got 'linear'\)"),
    row(L06, ["--model", "resnet18"], 1, r"--model must be one of resnet8, resnet20, .* \(got 'resnet18'\)"),
    # --- shapes: too small for batch norm, too large for memory ------------------------------------------------
    row(L01, ["--sweep-batch-size", "1", "--sweep-side", "1"], 1, r"batch norm in train mode needs more than one"),
    row(L01, ["--trace-input-shape", "100000", "64", "560", "560"], 1, r"--trace-input-shape needs .* GiB"),
    row(L01, ["--jacobian-side", "1000"], 1, r"the Jacobian check needs .* GiB"),
    row(L02, ["--image-size", "200000"], 1, r"--image-size x --latency-batch-sizes needs .* GiB"),
    row(L03, ["--depths", "20", "600002"], 1, r"--depths x --batch-size needs .* GiB"),
    row(L05, ["--gradient-depths", "600002"], 1, r"--gradient-depths/--landscape-depth x batch size needs"),
    row(L04, ["--timing-batch", "100", "--imagenet-timing-size", "4096"], 1, r"--imagenet-timing-size needs"),
    # --- data: --data-dir a file, corrupt files ---------------------------------------------------------------
    *[
        row(
            lesson, ["--dataset", "fashion-mnist", "--data-dir", "{afile}"], 1, r"--data-dir .* is a file, not a folder"
        )
        for lesson in (L03, L04, L05, L06)
    ],
    *[
        row(
            lesson,
            ["--dataset", "fashion-mnist", "--data-dir", "{bad_magic}"],
            1,
            r"fashion-mnist files in .*FashionMNIST are corrupt or incomplete",
        )
        for lesson in (L03, L04, L06)
    ],
    row(L06, ["--dataset", "fashion-mnist", "--data-dir", "{short_file}"], 1, r"corrupt or incomplete: shape"),
    # --- lesson 02's --pretrained needs its image up front ----------------------------------------------------
    row(L02, ["--pretrained", "--image", "{tmp}/nope.jpg"], 1, r"--image .*nope.jpg is not a file"),
    # --- lesson 06: output folder, checkpoints ----------------------------------------------------------------
    row(L06, [*TINY06, "--out", "{out_with_checkpoints_file}"], 1, r"checkpoints is a file, not a folder"),
    row(L06, [*TINY06, "--out", "{locked_out}"], 1, r"is in use by another run \(wait for it, or pass another --out\)"),
    row(L06, [*TINY06, "--resume", "{tmp}/nope.pt"], 1, r"cannot load checkpoint .*nope.pt: No such file or directory"),
    row(L06, [*TINY06, "--resume", "{text_file}"], 1, r"cannot load checkpoint"),
    row(L06, [*TINY06, "--resume", "{crafted}"], 1, r"cannot load checkpoint"),
    row(L06, ["--resume", "{ckpt:negative_epoch}"], 1, r"is damaged: step 0 of epoch 0 does not match"),
    row(L06, ["--resume", "{ckpt:step_is_text}"], 1, r"is damaged: "),
    row(L06, ["--resume", "{ckpt:history_not_list}"], 1, r"is damaged: step 0 of epoch 2 does not match"),
    row(L06, ["--resume", "{ckpt:step_out_of_range}"], 1, r"is damaged: step 1000 of epoch 1 does not match"),
    row(L06, ["--resume", "{ckpt:schedule_edited}"], 1, r"is damaged: step 2 of epoch 1 does not match"),
    row(L06, ["--resume", "{ckpt:v1}"], 1, r"is not a checkpoint of this lesson, or is one of an earlier version"),
    row(L06, ["--resume", "{ckpt:finished}", "--epochs", "2"], 1, r"was written for epochs 1, this run has 2 \(leave"),
    row(
        L06, ["--resume", "{ckpt:finished}", "--batch-size", "32"], 1, r"was written for batch_size 64, this run has 32"
    ),
    row(L06, ["--resume", "{ckpt:finished}", "--lr", "0.05"], 1, r"was written for lr 0.1, this run has 0.05"),
    row(L06, ["--resume", "{ckpt:lr_minus_1}"], 1, r"a saved setting .* fails its check: --lr must be > 0"),
    row(L06, ["--resume", "{ckpt:momentum_minus}"], 1, r"fails its check: --momentum must be >= 0"),
    row(L06, ["--resume", "{ckpt:smoothing_5}"], 1, r"fails its check: --label-smoothing must be < 1"),
    row(L06, ["--resume", "{ckpt:short_generator}"], 1, r"is damaged: "),
    # --- issue 21: a folder of the user's own files, claimed by no lesson run, is refused and kept byte for byte
    *[
        row(lesson, ["--out", "{users_out}"], 1, r"was not written by a lesson run, or was changed since")
        for lesson in LESSONS
    ],
    row(
        L06,
        [*TINY06, "--out", "{users_out}", "--lr", "1e30"],
        1,
        r"was not written by a lesson run",
        "06:users_out lr 1e30",
    ),
    *[row(lesson, ["--out", ""], 1, r"--out is empty") for lesson in (L01, L03, L06)],
    row(
        L03,
        ["--out", "{locked_out}"],
        1,
        r"is in use by another run \(wait for it, or pass another --out\)",
        "03:folder locked by lesson 06",
    ),
    row(L06, [*TINY06, "--out", "{results_dir}"], 1, r"results.json is in the way: it is not a plain file"),
    row(L01, ["--out", "{folder_lock}"], 1, r"error: Is a directory: .*\.lock"),
    row(L01, ["--out", "{tmp}/{long}"], 1, r"cannot write to output folder .*: File name too long"),
    row(L06, ["--resume", "{tmp}/{long}.pt"], 1, r"File name too long"),
    row(L03, ["--dataset", "fashion-mnist", "--data-dir", "{tmp}/{long}"], 1, r"File name too long"),
    row(L05, ["--plain-checkpoint", "{tmp}/{long}.pt"], 1, r"File name too long"),
    row(L02, ["--pretrained", "--image", "{tmp}/{long}.jpg"], 1, r"File name too long"),
    row(L06, [*TINY06, "--resume", "{plain_pickle}"], 1, r"cannot load checkpoint"),
    row(L06, [*TINY06, "--resume", "{tmp}"], 1, r"cannot load checkpoint .*: Is a directory"),
    row(L06, [*TINY06, "--resume", "/dev/null"], 1, r"cannot load checkpoint /dev/null: EOFError"),
    row(L06, ["--cutout", "99999999999999999999"], 1, r"--cutout must be <= 32"),
    row(L04, ["--imagenet-timing-size", "32"], 1, r"--imagenet-timing-size must be >= 64"),
    row(L02, ["--pretrained", "--image", "{text_file}"], 1, r"is not an image torchvision can read"),
    row(
        L02,
        ["--pretrained", "--pretrained-model", "resnet18", "ENV:TORCH_HOME={planted_home}"],
        1,
        r"is not torchvision's resnet18 weights: its SHA-256 starts",
        "02:a pickle planted in the torch cache",
    ),  # fmt: skip
    row(L05, ["--dataset", "synthetic", "--residual-checkpoint", "{nan_weights}"], 1, r"holds NaN or infinity in"),
    row(L03, ["--dataset", "fashion-mnist", "--data-dir", "/sys/hostile-data"], 1, r"/sys/hostile-data"),
    row(
        L06,
        [*TINY06, "ENV:WORLD_SIZE=2", "ENV:RANK=0", "ENV:MASTER_ADDR=127.0.0.1", "ENV:MASTER_PORT=29555"],
        1,
        r"WORLD_SIZE=2 and RANK=0 are set, but torchrun did not start this process",
        "06:leftover torchrun variables",
    ),  # fmt: skip
    row(
        L06,
        [*TINY06, "ENV:WORLD_SIZE=2", "ENV:RANK=0"],
        1,
        r"torchrun did not start this process",
        "06:WORLD_SIZE RANK",
    ),
    row(
        L06,
        [*TINY06, "--lr", "1e30", "--out", "{finished_out}"],
        1,
        r"(became|diverged) .*no checkpoint was written",
        "06:a failing rerun in a finished run's folder",
    ),  # fmt: skip
    row(
        L06,
        ["--resume", "{ckpt:finished}", "--out", "{finished_out}"],
        1,
        r"would replace .*finished/checkpoints/last.pt \(resume it, or pass another --out\)",
        "06:resuming another checkpoint over the run's last.pt",
    ),  # fmt: skip
    # --- the benchmark --------------------------------------------------------------------------------------
    row(BENCH, ["--workers", "-1"], 1, r"--workers must be 0 or more"),
    row(BENCH, ["--peak-gflops-fp32", "nan"], 1, r"--peak-gflops-fp32 is nan, not a finite number"),
]


# --- the files the rows point at --------------------------------------------------------------------------
def idx_file(path: Path, magic: int, shape: tuple[int, ...], data: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(header + data)


def fashion_dir(root: Path, images_magic=2051, label_value=3, truncate=False) -> Path:
    """A --data-dir holding four small Fashion-MNIST files, one of them damaged as asked."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        images = bytes(10 * 28 * 28)[: 100 if truncate else None]
        idx_file(raw / f"{split}-images-idx3-ubyte", images_magic, (10, 28, 28), images)
        idx_file(raw / f"{split}-labels-idx1-ubyte", 2049, (10,), bytes([label_value] * 10))
    return root


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory):
    """A real lesson 06 checkpoint of a finished one-epoch run (TINY06), made once."""
    out = tmp_path_factory.mktemp("finished")
    status, _, stderr = hostile_runner.run(L06, [*TINY06, "--out", str(out)], out)
    assert status == 0, stderr
    return out / "checkpoints" / "last.pt"


def forged_checkpoints(good: Path, folder: Path) -> dict[str, Path]:
    state = torch.load(good, weights_only=True)

    def forge(name, edit):
        forged = {**state, "run": dict(state["run"]), "run_config": dict(state["run_config"])}
        edit(forged)
        path = folder / f"{name}.pt"
        torch.save(forged, path)
        return path

    def unfinish(s, step, epoch=0):  # move the position back into the run, as a mid-epoch save would have it
        s["run"].update(epoch=epoch, step=step, seen=step * s["run_config"]["batch_size"], correct=0)
        s["history"], s["best"], s["best_model"] = [], {"val_accuracy": -1.0, "epoch": 0}, None

    def edited_schedule(s):
        unfinish(s, 2)
        s["scheduler"] = {
            **s["scheduler"],
            "last_epoch": 2,
            "lr_lambdas": [{"total": 400, "warmup": 2, "schedule": "onecycle"}],
        }

    forged = {
        "finished": good,
        "negative_epoch": forge("negative_epoch", lambda s: s["run"].update(epoch=-1)),
        "step_is_text": forge("step_is_text", lambda s: s["run"].update(step="3")),
        "history_not_list": forge("history_not_list", lambda s: s.update(history={})),
        "step_out_of_range": forge("step_out_of_range", lambda s: unfinish(s, 1000)),
        "schedule_edited": forge("schedule_edited", edited_schedule),
        "v1": forge("v1", lambda s: s.update(format="lesson06-checkpoint-v1")),
        "lr_minus_1": forge("lr_minus_1", lambda s: s["run_config"].update(lr=-1.0)),
        "momentum_minus": forge("momentum_minus", lambda s: s["run_config"].update(momentum=-0.5)),
        "smoothing_5": forge("smoothing_5", lambda s: s["run_config"].update(label_smoothing=5.0)),
        "short_generator": forge("short_generator", lambda s: s["rng"].update(order=torch.zeros(7, dtype=torch.uint8))),
    }
    return forged


@pytest.fixture()
def places(tmp_path, request):
    """The paths a row's flags may name, made on demand."""
    made = {"tmp": tmp_path}
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    made["blocker"] = blocker
    made["afile"] = tmp_path / "afile"
    made["afile"].write_text("not a folder")
    made["bad_magic"] = fashion_dir(tmp_path / "bad_magic", images_magic=1234)
    made["short_file"] = fashion_dir(tmp_path / "short_file", truncate=True)
    made["text_file"] = tmp_path / "notes.pt"
    made["text_file"].write_text("not a checkpoint")
    made["crafted"] = tmp_path / "crafted.pt"
    torch.save({"format": Exploit(str(tmp_path / "pwned"))}, made["crafted"])
    made["plain_pickle"] = tmp_path / "plain.pkl"
    made["plain_pickle"].write_bytes(pickle.dumps({"format": "lesson06-checkpoint-v3"}))
    planted = tmp_path / "torch" / "hub" / "checkpoints"  # where --pretrained finds torchvision's weights offline
    planted.mkdir(parents=True)
    url = __import__("torchvision").models.ResNet18_Weights.DEFAULT.url
    torch.save({"fc.weight": Exploit(str(tmp_path / "pwned"))}, planted / url.rsplit("/", 1)[1])
    made["planted_home"] = tmp_path / "torch"
    made["long"] = "x" * 300  # a path component longer than the 255 bytes a file name may have
    made["nan_weights"] = tmp_path / "nan.pt"
    diverged = {k: v.float().fill_(float("nan")) for k, v in load_lesson(2).cifar_resnet(20).state_dict().items()}
    torch.save(diverged, made["nan_weights"])
    return made


def earlier_run(out: Path) -> dict[Path, bytes]:
    """Fill `out` with an earlier lesson run's files (written as a lesson writes them); return them to compare."""
    helpers.atomic_write(out / "results.json", lambda tmp: tmp.write_text('{"earlier": "run"}\n'))
    helpers.atomic_write(out / "curves.png", lambda tmp: tmp.write_bytes(b"\x89PNG earlier"))
    helpers.atomic_write(out / "checkpoints" / "last.pt", lambda tmp: tmp.write_bytes(b"an earlier checkpoint"))
    return snapshot(out)


USER_FILES = ["results.json", "curves.png", "depth_sweep.png", "resnet_family.png", "training_error.png", "variants.png",
              "gradient_flow.png", "checkpoints/last.pt", "checkpoints/best.pt", ".results.json.a1b2.tmp",
              "checkpoints/.last.pt.c3d4.tmp"]  # fmt: skip


def users_folder(out: Path) -> None:
    """A folder of the user's own files, with the names lessons write (and hidden drafts like a killed save's)."""
    for name in USER_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"the user's own {name}")


def snapshot(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} if out.exists() else {}


@pytest.mark.parametrize(("script", "args", "status", "message"), HOSTILE)
def test_hostile_input(script, args, status, message, places, tmp_path, request):
    holder = None
    out = tmp_path / "out"
    if any("{ckpt:" in a for a in args):
        good = request.getfixturevalue("finished_checkpoint")
        places.update({f"ckpt:{k}": v for k, v in forged_checkpoints(good, tmp_path).items()})
        if "{ckpt:finished}" in args and status == 0:
            out = good.parent.parent  # resume a finished run in its own folder: nothing may change there
    if "{finished_out}" in args:  # a finished run's folder: its files must survive what the row does
        out = places["finished_out"] = tmp_path / "finished"
        shutil.copytree(request.getfixturevalue("finished_checkpoint").parent.parent, out)
    if "{out_with_checkpoints_file}" in args:
        out = places["out_with_checkpoints_file"] = tmp_path / "out_cf"
        out.mkdir()
        (out / "checkpoints").write_text("a file where the checkpoints folder should be")
    if "{users_out}" in args:
        out = places["users_out"] = tmp_path / "users"
        users_folder(out)
    if "{results_dir}" in args:
        out = places["results_dir"] = tmp_path / "results_dir"
        (out / "results.json").mkdir(parents=True)
    if "{folder_lock}" in args:
        out = places["folder_lock"] = tmp_path / "folder_lock"
        (out / ".lock").mkdir(parents=True)
    if "{locked_out}" in args:
        out = places["locked_out"] = tmp_path / "locked"
        out.mkdir()
        holder = (out / ".lock").open("a+")
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds this folder
        holder.write("424242")
        holder.flush()
    before = earlier_run(out) if out.name in ("out", "locked") else snapshot(out)
    args = [a.format(**{k.replace(":", "_"): v for k, v in places.items()}) for a in _colon_safe(args)]
    env = dict(a[4:].split("=", 1) for a in args if a.startswith("ENV:"))
    args = [a for a in args if not a.startswith("ENV:")]
    if script != BENCH and "--out" not in args:
        args += ["--out", str(out)]
    work = tmp_path / "work"  # the working folder: a relative `data` or `outputs` lands here, not in the repo
    work.mkdir()
    try:
        code, stdout, stderr = hostile_runner.run(script, args, work, env=env)
    finally:
        if holder is not None:
            holder.close()
    assert "Traceback" not in stderr + stdout, stderr
    assert code == status, f"exit {code}, expected {status}\nstdout: {stdout[-2000:]}\nstderr: {stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if status == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert re.search(message, lines[0]), lines[0]
    else:  # argparse: its usage lines, then one `prog: error: ...` line
        assert len([line for line in lines if "error:" in line]) == 1 and re.search(message, lines[-1]), stderr
    assert snapshot(out) == before, "files in --out were changed or removed"
    assert not (tmp_path / "pwned").exists()  # the crafted pickle's code never ran


def _colon_safe(args):
    return [re.sub(r"\{ckpt:(\w+)\}", r"{ckpt_\1}", a) for a in args]


def test_table_covers_every_lesson_and_the_issue_cases():
    scripts = {p.values[0] for p in HOSTILE}
    assert scripts == {*LESSONS, BENCH}
    assert len(HOSTILE) >= 90


@pytest.mark.parametrize(
    ("script", "args"),
    [(L06, ["--momentum", "nan"]), (L02, ["--latency-seconds", "inf"])],
    ids=["06-momentum-nan", "02-latency-inf"],
)
def test_forked_runner_agrees_with_a_real_python_process(script, args, tmp_path):
    """The table forks from a process with torch imported; a real `python` process must give the same."""
    forked = hostile_runner.run(script, [*args, "--out", str(tmp_path / "a")], tmp_path)
    real = hostile_runner.run_subprocess(script, [*args, "--out", str(tmp_path / "a")], tmp_path)
    assert forked[0] == real[0] == 1
    assert forked[2] == real[2] and forked[2].startswith("error: ")


@pytest.mark.slow
def test_benchmark_removes_the_data_it_generates(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    args = ["--generated-if-missing", "--data-dir", str(tmp_path / "none"), "--models", "resnet20"]
    args += ["--steps", "1", "--warmup", "0", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    try:
        status, stdout, stderr = hostile_runner.run_subprocess(BENCH, args, REPO, timeout=300)
    finally:
        tempfile.tempdir = None
    assert status == 0, stderr
    assert "removed at the end" in stdout
    assert not list(tmp_path.glob("cifar10-format-*"))


def test_data_dir_checks_need_no_network_and_name_the_file(tmp_path):
    folder = fashion_dir(tmp_path / "d", images_magic=7)
    with pytest.raises(helpers.UserError, match=r"FashionMNIST are corrupt or incomplete: .* \(delete .*FashionMNIST"):
        helpers.load_dataset("fashion-mnist", folder, download=False)
    with pytest.raises(helpers.UserError, match=r"--data-dir .* is a file"):
        helpers.load_dataset("cifar10", folder / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", download=False)


def test_output_dir_deletes_nothing_not_even_old_hidden_temporaries(tmp_path):
    old, fresh = tmp_path / ".results.json.a1b2c3.tmp", tmp_path / ".curves.png.d4e5f6.tmp"
    for path in (old, fresh):
        path.write_text("a hidden draft, or half a file of a killed save: either way not ours to delete")
    os.utime(old, (0, 0))
    helpers.output_dir(helpers.Config(out=str(tmp_path)), "results.json")
    assert old.exists() and fresh.exists()


def test_writable_dir_names_the_file_in_the_way(tmp_path):
    (tmp_path / "checkpoints").write_text("in the way")
    with pytest.raises(helpers.UserError, match=r"checkpoints is a file, not a folder \(pass --out"):
        helpers.writable_dir(tmp_path / "checkpoints" / "deeper")


def test_a_float_constant_names_nan_and_infinity():  # every comparison with NaN is false: it needs its own check
    momentum = helpers.Constant("MOMENTUM", "float", 0.9, check=">= 0, < 1")
    with pytest.raises(helpers.UserError, match=r"--momentum is nan, not a finite number"):
        helpers.convert(momentum, float("nan"))
    with pytest.raises(helpers.UserError, match=r"--lr is -inf, not a finite number"):
        helpers.convert(helpers.Constant("LR", "float", 0.1), float("-inf"))


def test_seed_range_is_numpys_and_a_bool_is_no_seed():
    """The successor of require_seed's test: every lesson's SEED declaration takes 0 .. 2**32 - 1 and no bool."""
    for number in range(1, 7):
        lesson = load_lesson(number)
        assert helpers.config(vars(lesson), {"seed": 2**32 - 1}).seed == 2**32 - 1
        with pytest.raises(helpers.UserError, match=r"^--seed takes int values, not True"):
            helpers.config(vars(lesson), {"seed": True})
