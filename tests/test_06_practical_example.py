"""Lesson 06: the pipeline end to end on data in CIFAR-10's real file format, its augmentation, weight-decay
grouping, atomic and safe checkpoints, exact resume, Ctrl-C and NaN handling, and every bad input."""

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script

import helpers

sys.path.insert(0, str(REPO / "benchmarks"))
import cifar_format  # noqa: E402

TINY = {
    "model": "resnet20",
    "train_size": 96,
    "val_size": 48,
    "test_size": 64,
    "epochs": 2,
    "batch_size": 32,
    "eval_batch_size": 64,
    "num_mistakes": 4,
    "check_every": 2,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, cifar_format.write_cifar10_format(root, num_train=300, num_test=100, seed=3)


@pytest.fixture()
def tiny(cifar_dir, monkeypatch, tmp_path):
    """Keyword arguments for a tiny CIFAR-10-format run, with torchvision told to trust the generated files."""
    root, md5s = cifar_dir
    cifar_format.trust_files(md5s, monkeypatch.setattr)
    return {**TINY, "dataset": "cifar10", "data_dir": str(root), "download": False, "out": str(tmp_path / "out")}


@pytest.fixture(scope="module")
def finished_run(lesson06, cifar_dir, tmp_path_factory):
    """One finished tiny run, shared by the end-to-end and checkpoint tests."""
    root, md5s = cifar_dir
    with pytest.MonkeyPatch.context() as mp:
        cifar_format.trust_files(md5s, mp.setattr)
        out = tmp_path_factory.mktemp("run")
        results = lesson06.main(**TINY, dataset="cifar10", data_dir=str(root), download=False, out=str(out))
    return out, results


# --- end to end ---------------------------------------------------------------------------------------
def test_end_to_end_on_cifar10_file_format(finished_run):
    out, results = finished_run
    assert results["status"] == "finished" and results["dataset"] == "cifar10"
    assert (results["num_train"], results["num_val"], results["num_test"]) == (96, 48, 64)
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    matrix = torch.as_tensor(results["confusion_matrix"])
    assert matrix.sum() == 64
    assert results["test_accuracy"] == pytest.approx(matrix.trace().item() / 64)
    assert 0 <= results["test_accuracy_flip_tta"] <= 1
    for name in ("results.json", "curves.png", "confusion_matrix.png", "mistakes.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert saved["best_epoch"] == max(results["history"], key=lambda h: h["val_accuracy"])["epoch"]
    assert len(saved["most_confident_mistakes"]) == min(4, 64 - matrix.trace().item())


def test_best_checkpoint_is_chosen_by_validation(lesson06, finished_run):
    out, results = finished_run
    best = lesson06.load_checkpoint(out / "checkpoints" / "best.pt")
    last = lesson06.load_checkpoint(out / "checkpoints" / "last.pt")
    assert best["best"]["epoch"] == results["best_epoch"]
    assert last["run"]["epoch"] == 2 and last["run"]["step"] == 0


# --- augmentation -------------------------------------------------------------------------------------
def identity_images(n):
    """Images whose pixels tell which image, row and column they came from (all values > 0)."""
    rows = torch.arange(32).view(1, 1, 32, 1).expand(n, 1, 32, 32)
    cols = torch.arange(32).view(1, 1, 1, 32).expand(n, 1, 32, 32)
    ids = torch.arange(n).view(n, 1, 1, 1).expand(n, 1, 32, 32)
    return torch.cat([rows + 1, cols + 1, ids % 250 + 1], dim=1).to(torch.uint8)  # (N, 3, 32, 32)


def test_crops_stay_in_padded_image_flips_half_and_images_keep_their_place(lesson06):
    n = 2000
    images = identity_images(n)
    out = lesson06.augment(images, 0, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    visible = out[:, 0] > 0  # (N, H, W): pixels that come from the image, not the zero padding
    flips = 0
    for i in range(n):
        rows = out[i, 0][visible[i]].long() - 1
        cols = out[i, 1][visible[i]].long() - 1
        # image i stays at position i (labels are indexed with the same rows, so they follow it)
        assert (out[i, 2][visible[i]] == i % 250 + 1).all()
        dr = rows.view(-1)[0] - torch.nonzero(visible[i])[0, 0]
        grid_rows = torch.nonzero(visible[i])[:, 0]
        assert (rows == grid_rows + dr).all()  # a shifted window, not a rescaled one
        assert -4 <= dr <= 4  # shift within the padding of 4 pixels
        grid_cols = torch.nonzero(visible[i])[:, 1]
        dc = cols - grid_cols
        flipped = not (dc == dc[0]).all()
        if flipped:
            assert ((cols + grid_cols) == (cols + grid_cols)[0]).all()  # columns read backwards
            flips += 1
        assert visible[i].sum() >= 28 * 28  # at most 4 rows and 4 columns fall off
    assert abs(flips / n - 0.5) < 0.04  # binomial: 4 standard deviations is 0.045


def test_cutout_zeroes_one_square_at_most(lesson06):
    images = torch.full((500, 3, 32, 32), 7, dtype=torch.uint8)
    out = lesson06.cutout(images, 8, torch.Generator().manual_seed(1))
    zeroed = (out == 0).all(1)  # (N, H, W)
    counts = zeroed.flatten(1).sum(1)
    assert counts.max() <= 9 * 9 and counts.float().mean() > 30  # a square of side 2 * (8 // 2) + 1, clipped
    assert ((out == 0) | (out == 7)).all()


# --- optimiser -----------------------------------------------------------------------------------------
def test_weight_decay_only_on_conv_and_linear_weights(lesson06):
    model = lesson06.CIFAR_MODELS["cifar_resnet18"](10)
    decay, no_decay = lesson06.parameter_groups(model, 5e-4)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert {id(p) for p in decay["params"]} == weights
    norm_and_bias = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in (m.weight, m.bias)]
    norm_and_bias.append(model.fc.bias)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in norm_and_bias}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    # with zero gradients, one SGD step shrinks the weights and leaves BN and biases alone
    optimizer = torch.optim.SGD([decay, no_decay], lr=1.0, momentum=0.9, nesterov=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before_bn, before_conv = model.bn1.weight.clone(), model.conv1.weight.clone()
    optimizer.step()
    assert torch.equal(model.bn1.weight, before_bn)
    assert torch.allclose(model.conv1.weight, before_conv * (1 - 5e-4 * (1 + 0.9)))  # Nesterov: decay twice


def test_schedule_warms_up_and_ends_at_zero(lesson06):
    for schedule in ("onecycle", "cosine"):
        shape = lesson06.LearningRateShape(100, 10, schedule)
        values = [shape(t) for t in range(100)]
        assert values[:10] == sorted(values[:10]) and max(values) == pytest.approx(1.0)
        assert values[10:] == sorted(values[10:], reverse=True) and values[-1] < 0.05


# --- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_write_is_atomic(lesson06, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    lesson06.save_checkpoint(path, {"format": "x", "weights": torch.ones(3)})
    good = path.read_bytes()

    def crash_midway(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        lesson06.save_checkpoint(path, {"format": "x", "weights": torch.zeros(3)})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [helpers.MANIFEST, "last.pt"]  # no temporary file left


def interrupt_at_call(lesson06, monkeypatch, call_number):
    """Make lesson06.augment send Ctrl-C (SIGINT) to this process on its `call_number`-th call."""
    original, calls = lesson06.augment, {"n": 0}

    def augment(*args):
        calls["n"] += 1
        if calls["n"] == call_number:
            signal.raise_signal(signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(lesson06, "augment", augment)
    return original


def test_ctrl_c_saves_and_resume_equals_uninterrupted_run(lesson06, finished_run, tiny, monkeypatch):
    straight_out, straight = finished_run  # the same flags, run without interruption
    original = interrupt_at_call(lesson06, monkeypatch, 5)  # 3 steps per epoch: Ctrl-C in the middle of epoch 2
    stopped = lesson06.main(**tiny)
    assert stopped["status"] == "interrupted" and len(stopped["history"]) == 1
    last = Path(tiny["out"]) / "checkpoints" / "last.pt"
    state = lesson06.load_checkpoint(last)
    assert (state["run"]["epoch"], state["run"]["step"]) == (1, 2)
    elsewhere = Path(tiny["out"]).parent / "elsewhere"
    shutil.copytree(Path(tiny["out"]) / "checkpoints", elsewhere)  # the interrupted run's last.pt and best.pt
    monkeypatch.setattr(lesson06, "augment", original)
    resumed = lesson06.main(**{**tiny, "resume": str(last)})
    for key in ("test_accuracy", "test_loss", "test_accuracy_flip_tta", "best_epoch"):
        assert resumed[key] == straight[key], key
    for a, b in zip(resumed["history"], straight["history"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == b[key], key
    final_a = lesson06.load_checkpoint(last)["model"]
    final_b = lesson06.load_checkpoint(straight_out / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    # Resumed into a new --out, with no settings given: the checkpoint brings them, and the best epoch's weights.
    new_out = Path(tiny["out"]).parent / "new out"
    where = {key: tiny[key] for key in ("data_dir", "download", "device")}  # not settings of the run
    again = lesson06.main(resume=str(elsewhere / "last.pt"), out=str(new_out), **where)
    assert again["status"] == "finished" and again["model"] == "resnet20" and again["num_train"] == 96
    assert again["test_accuracy"] == straight["test_accuracy"]
    assert (new_out / "results.json").exists() and (new_out / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_ctrl_c_from_the_command_line_exits_cleanly(tmp_path):
    import subprocess
    import time

    out = tmp_path / "cli"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "06_practical_example.py"), "--dataset", "synthetic", "--model", "resnet20",
         "--train-size", "4000", "--val-size", "64", "--test-size", "64", "--batch-size", "16", "--epochs", "1",
         "--device", "cpu", "--out", str(out), "--check-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "NO_PROGRESS_BAR": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line or line.startswith("    epoch"):  # the table header: training starts now
            break
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr  # the shell's status for Ctrl-C, after a clean save
    assert "Traceback" not in stderr
    assert "interrupted" in stdout
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["run"]["epoch"] == 0 and 0 < state["run"]["step"] < 250


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(lesson06, tiny, monkeypatch):
    original, calls = lesson06.to_model_input, {"n": 0}

    def poisoned(*args):  # from the second epoch on, the inputs are NaN
        calls["n"] += 1
        x = original(*args)
        return x * float("nan") if calls["n"] > 3 else x

    monkeypatch.setattr(lesson06, "to_model_input", poisoned)
    with pytest.raises(helpers.UserError, match="loss became nan in epoch 2"):
        lesson06.main(**tiny)
    state = lesson06.load_checkpoint(Path(tiny["out"]) / "checkpoints" / "last.pt")
    assert state["run"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (Path(tiny["out"]) / "results.json").exists()


# --- bad input ---------------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this runs `open(path, "w")`: a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


BAD_FLAGS = [
    ({"model": "resnet7"}, "--model must be one of resnet8, resnet20"),
    ({"dataset": "imagenet"}, "--dataset must be one of cifar10"),
    ({"epochs": 0}, "--epochs must be > 0"),
    ({"epochs": -2}, "--epochs must be > 0"),
    ({"batch_size": 0}, "--batch-size must be > 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"lr": -0.1}, "--lr must be > 0"),
    ({"lr": float("nan")}, "--lr is nan, not a finite number"),
    ({"lr": float("inf")}, "--lr is inf, not a finite number"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_are_user_errors(lesson06, tmp_path, flags, message):
    with pytest.raises(helpers.UserError, match=message):
        lesson06.main(**{**TINY, "dataset": "synthetic", "out": str(tmp_path), **flags})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda(lesson06, tmp_path):
    with pytest.raises(helpers.UserError, match="CUDA is not available"):
        lesson06.main(**{**TINY, "dataset": "synthetic", "device": "cuda", "out": str(tmp_path)})


def bad_checkpoints(good: Path, folder: Path) -> dict:
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = folder / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    text = folder / "notes.pt"
    text.write_text("not a checkpoint")
    crafted = folder / "crafted.pt"
    torch.save({"format": Exploit(str(folder / "pwned"))}, crafted)  # a real torch file, a hostile pickle
    return {
        "missing": (folder / "nope.pt", "cannot load checkpoint .*nope.pt: No such file or directory"),
        "truncated": (truncated, "cannot load checkpoint"),
        "foreign": (foreign, "not a checkpoint of this lesson"),
        "text": (text, "cannot load checkpoint"),
        "crafted": (crafted, "cannot load checkpoint"),
    }


def test_bad_checkpoints_are_refused_and_nothing_is_overwritten(lesson06, finished_run, tiny, tmp_path):
    out, _ = finished_run
    good = out / "checkpoints" / "last.pt"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = bad_checkpoints(good, tmp_path)
    cases["other model"] = (good, "written for model 'resnet20', this run has 'resnet32'")
    cases["other dataset"] = (good, "written for dataset 'cifar10', this run has 'synthetic'")
    for case, (path, message) in cases.items():
        flags = {**tiny, "out": str(out), "resume": str(path)}
        if case == "other model":
            flags["model"] = "resnet32"
        if case == "other dataset":
            flags.update(dataset="synthetic")
        with pytest.raises(helpers.UserError, match=message):
            lesson06.main(**flags)
    assert not (tmp_path / "pwned").exists()  # the crafted pickle's code never ran
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_crafted_pickle_would_run_code_without_weights_only(tmp_path):
    """The control for the test above: the crafted file really does run code when loaded unsafely."""
    path = tmp_path / "crafted.pt"
    torch.save({"format": Exploit(str(tmp_path / "pwned"))}, path)
    assert not (tmp_path / "pwned").exists()
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_command_line_errors_are_one_line(tmp_path):
    sentinel = tmp_path / "results.json"
    sentinel.write_text("keep")
    result = run_script("06_practical_example.py", "--dataset", "synthetic", "--out", str(tmp_path), "--lr", "nan")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith(
        "error: --lr is nan, not a finite number"
    )
    assert sentinel.read_text() == "keep"


@pytest.mark.slow
def test_more_command_line_errors(tmp_path):
    result = run_script("06_practical_example.py", "--resume", str(tmp_path / "none.pt"))
    assert (
        result.returncode == 1
        and result.stderr.strip()
        == f"error: cannot load checkpoint {tmp_path / 'none.pt'}: No such file or directory (check the --resume path)"
    )
    result = run_script("06_practical_example.py", "--dataset", "imagenet")
    assert result.returncode == 1 and result.stderr == (
        "error: --dataset must be one of cifar10, cifar100, fashion-mnist, synthetic (got 'imagenet')\n"
    )  # the declaration's check: one line, the same for an edited constant, a keyword and a flag


@pytest.mark.slow
def test_quick_demo_shows_what_the_lesson_card_claims(tmp_path):
    """The default run (Fashion-MNIST fallback here): >= 90% on the full 10,000-image test set within 3 minutes
    end to end on 2 CPU cores with bf16, 4 minutes in fp32 (the card: 91.0% with bf16 in 112-155 s, 90.5% in fp32 in
    about 200 s on a CPU without bf16)."""
    import time

    quiet = os.cpu_count() == 2 and os.getloadavg()[0] < 0.5  # the budget is for a quiet 2-core machine
    started = time.perf_counter()
    result = run_script("06_practical_example.py", "--out", str(tmp_path), timeout=1200)
    wall_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    if saved["dataset"] != "fashion-mnist":
        pytest.skip(f"the card's numbers are for the Fashion-MNIST fallback, this machine gave {saved['dataset']}")
    assert saved["model"] == "resnet8" and saved["num_test"] == 10_000 and len(saved["history"]) == 3
    val = [h["val_accuracy"] for h in saved["history"]]
    assert val[0] < val[1] < val[2]  # card: 76.0, 86.1, 91.0%
    assert saved["test_accuracy"] >= 0.90
    assert abs(saved["test_accuracy_flip_tta"] - saved["test_accuracy"]) < 0.01  # flips keep Fashion-MNIST's labels
    weakest = saved["weakest_class"]  # card: shirt, mostly called t-shirt, coat or pullover
    assert weakest["class"] == "shirt" and set(weakest["called"]) <= {"t-shirt", "coat", "pullover", "dress"}
    assert next(iter(weakest["called"])) == "t-shirt"  # card (fp32): t-shirt 106, coat 88, pullover 45
    assert "weakest class shirt: of its 1000 test images, called" in result.stdout
    if quiet:
        budget = 180 if saved["autocast_dtype"] == "torch.bfloat16" else 240
        assert wall_s < budget, f"the quick demo took {wall_s:.0f} s ({saved['autocast_dtype']})"


# --- evaluation ----------------------------------------------------------------------------------------------
def test_confusion_matrix_on_known_predictions(lesson06):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1])
    matrix = lesson06.confusion_matrix(predictions, labels, 4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(matrix, expected)
    per_class = lesson06.per_class_accuracy(matrix)
    assert per_class[:3] == pytest.approx([2 / 3, 1.0, 0.5]) and math.isnan(per_class[3])


# --- hostile runs (issue 12): resume semantics, diverged weights, the output folder ----------------------------
def test_resume_refuses_a_changed_schedule_and_a_finished_run_gives_its_results(lesson06, finished_run, tiny, tmp_path):
    out, straight = finished_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    last = str(out / "checkpoints" / "last.pt")
    for key, value in (("epochs", 3), ("batch_size", 16), ("lr", 0.05), ("schedule", "cosine")):
        with pytest.raises(helpers.UserError, match=rf"was written for {key} .*, this run has {value!r} \(leave"):
            lesson06.main(**{**tiny, "out": str(out), "resume": last, key: value})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # A finished run (say one killed during its test evaluation, before results.json): resuming trains nothing
    # and writes the results the uninterrupted run wrote.
    result = lesson06.main(**{**tiny, "out": str(tmp_path / "again"), "resume": last})
    assert result["status"] == "finished" and result["history"] == straight["history"]
    assert result["test_accuracy"] == straight["test_accuracy"] and (tmp_path / "again" / "results.json").exists()
    assert not (tmp_path / "again" / "checkpoints" / "last.pt").exists()  # nothing trained, nothing saved


def poison_batch_norm_after_epoch(lesson06, monkeypatch, epoch: int):
    """After training epoch `epoch` (0-based), set one batch-norm running variance to infinity."""
    original = lesson06.train_one_epoch

    def poisoned(t, *args):
        run = original(t, *args)
        if run["epoch"] == epoch:
            next(m for m in t["model"].modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(math.inf)
        return run

    monkeypatch.setattr(lesson06, "train_one_epoch", poisoned)


def test_diverged_weights_are_never_saved_nor_best(lesson06, tiny, monkeypatch):
    poison_batch_norm_after_epoch(lesson06, monkeypatch, 1)
    with pytest.raises(lesson06.StopTraining, match=r"diverged in epoch 2: .*non-finite values in 1 weight tensors.*"
                       r"last.pt \(end of epoch 1\) is kept"):  # fmt: skip
        lesson06.main(**tiny)
    checkpoints = Path(tiny["out"]) / "checkpoints"
    for name in ("last.pt", "best.pt"):
        state = lesson06.load_checkpoint(checkpoints / name)
        assert state["run"]["epoch"] == 1 and state["best"]["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_divergence_in_the_first_epoch_writes_no_checkpoint(lesson06, tiny, monkeypatch):
    poison_batch_norm_after_epoch(lesson06, monkeypatch, 0)
    with pytest.raises(lesson06.StopTraining, match="no checkpoint was written"):
        lesson06.main(**{**tiny, "epochs": 1})
    assert list((Path(tiny["out"]) / "checkpoints").iterdir()) == []


def test_a_locked_output_folder_is_refused_before_any_work(lesson06, tiny):
    import fcntl

    out = Path(tiny["out"])
    out.mkdir()
    with (out / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another run holds it
        with pytest.raises(helpers.UserError, match=r"is in use by another run"):
            lesson06.main(**tiny)
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_new_run_replaces_only_its_own_files_and_deletes_nothing(lesson06, finished_run, tiny):
    earlier, _ = finished_run
    out = Path(tiny["out"])
    shutil.copytree(earlier, out)
    draft = out / "checkpoints" / ".last.pt.x1y2.tmp"
    draft.write_bytes(b"a hidden file of the user's that looks like a killed save")
    notes = out / "notes.txt"
    notes.write_text("mine")
    lesson06.main(**{**tiny, "epochs": 1})  # another schedule: a run of its own, in the earlier run's folder
    assert draft.read_bytes().startswith(b"a hidden file") and notes.read_text() == "mine"
    assert lesson06.load_checkpoint(out / "checkpoints" / "last.pt")["run_config"]["epochs"] == 1
    assert len(json.loads((out / "results.json").read_text())["history"]) == 1


def test_a_users_file_in_the_way_is_refused_and_kept(lesson06, tiny):
    out = Path(tiny["out"])
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')
    with pytest.raises(helpers.UserError, match=r"results.json was not written by a lesson run, or was changed since"):
        lesson06.main(**tiny)
    assert (out / "results.json").read_text() == '{"mine": true}'
    (out / "results.json").unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.pt").mkdir()  # a folder where a checkpoint should be
    with pytest.raises(helpers.UserError, match=r"last.pt is in the way: it is not a plain file"):
        lesson06.main(**tiny)


def test_the_resume_hint_survives_a_path_with_spaces(lesson06):
    import shlex

    cfg = helpers.Config(out="my runs/a b", data_dir="data", device="cpu", precision="auto")
    cfg.explicit = frozenset({"out", "device"})
    command = lesson06.resume_command(cfg, Path("my runs/a b/checkpoints/last.pt"), lesson06.Distributed(0, 1, 0))
    assert shlex.split(command) == [
        "python", "06_practical_example.py", "--resume", "my runs/a b/checkpoints/last.pt",
        "--out", "my runs/a b", "--device", "cpu",
    ]  # fmt: skip


DAMAGE = {  # a hand-edited or damaged checkpoint: one line, before any training
    "no model": (lambda s: s.pop("model"), r"is damaged: 'model'"),
    "optimizer a list": (lambda s: s.update(optimizer=[]), r"is damaged"),
    "run_config without lr": (lambda s: s["run_config"].pop("lr"), r"is damaged: a saved setting is missing"),
    "epochs a string": (lambda s: s["run_config"].update(epochs="2"), r"--epochs takes int values, not '2'"),
    "lr of -1": (lambda s: s["run_config"].update(lr=-1.0), r"--lr must be > 0 \(got -1.0\)"),
    "momentum of -0.5": (lambda s: s["run_config"].update(momentum=-0.5), r"--momentum must be >= 0"),
    "label smoothing of 5": (lambda s: s["run_config"].update(label_smoothing=5.0), r"--label-smoothing must be < 1"),
    "epoch past the end": (lambda s: s["run"].update(epoch=9), r"is damaged: step 0 of epoch 10 does not match"),
    "negative step": (lambda s: s["run"].update(step=-1), r"is damaged: step -1 of epoch 3 does not match"),
    "nan loss sum": (lambda s: s["run"].update(loss_sum=math.nan), r"is damaged"),
    "short history": (lambda s: s["history"].pop(), r"is damaged"),
    "7-byte generator state": (lambda s: s["rng"].update(order=torch.zeros(7, dtype=torch.uint8)), r"is damaged"),
    "weights not tensors": (lambda s: s["model"].update({"conv1.weight": [1.0]}), r"is damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line(lesson06, finished_run, tiny, tmp_path, case):
    import copy

    out, _ = finished_run
    state = copy.deepcopy(torch.load(out / "checkpoints" / "last.pt", weights_only=True))
    damage, message = DAMAGE[case]
    damage(state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(helpers.UserError, match=rf"checkpoint .*damaged.pt .*{message}"):
        lesson06.main(**{**tiny, "resume": str(path)})
    assert not (Path(tiny["out"]) / "checkpoints" / "last.pt").exists()


# --- issue 21: SIGTERM like Ctrl-C, SIGKILL at any instant, a kill inside a save -----------------------------------
KILL_FLAGS = ["--dataset", "synthetic", "--model", "resnet8", "--train-size", "1024", "--val-size", "64",
              "--test-size", "64", "--batch-size", "32", "--epochs", "3", "--device", "cpu", "--precision", "fp32",
              "--check-every", "1", "--num-mistakes", "2"]  # fmt: skip


def start_run(out, *extra):
    import subprocess

    env = {**os.environ, "NO_PROGRESS_BAR": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "06_practical_example.py"), *KILL_FLAGS, "--out", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_training(process):
    """Read stdout until the epoch table's header: training starts now."""
    lines = []
    while (line := process.stdout.readline()) and not line.startswith("    epoch"):
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    process = start_run(out)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads((out / "results.json").read_text())


def finish(out) -> dict:
    """Resume from the newest complete checkpoint (or start again if none was written) and run to the end."""
    last = out / "checkpoints" / "last.pt"
    process = start_run(out, *(["--resume", str(last)] if last.exists() else []))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return json.loads((out / "results.json").read_text())


def test_sigterm_saves_says_how_to_continue_exits_143_and_resumes_exactly(uninterrupted, tmp_path):
    import time

    out = tmp_path / "term"
    process = start_run(out)
    wait_for_training(process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "SIGTERM: stopping" in stdout and "continue with: python 06_practical_example.py --resume" in stdout
    assert "Traceback" not in stderr and not list(out.rglob("*.tmp"))
    resumed = finish(out)
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in uninterrupted["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [0.0, 0.7, 1.5, 2.5, 4.0])
def test_sigkill_at_any_instant_resumes_to_the_same_numbers(uninterrupted, tmp_path, seconds):
    import time

    out = tmp_path / "kill"
    process = start_run(out)
    wait_for_training(process)
    time.sleep(seconds)
    process.kill()
    process.communicate(timeout=60)
    resumed = finish(out)
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in uninterrupted["history"]]


def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_whole(lesson06, tmp_path):
    import time

    path = tmp_path / "checkpoints" / "last.pt"
    lesson06.save_checkpoint(path, {"format": "x", "weights": torch.ones(1000)})
    good = path.read_bytes()
    child = os.fork()
    if child == 0:  # the child dies in the middle of writing the next checkpoint

        def slow_write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"PK\x03\x04 the first half of a checkpoint")
                f.flush()
                time.sleep(60)

        try:
            helpers.atomic_write(path, slow_write)
        finally:
            os._exit(0)
    time.sleep(1.0)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    assert path.read_bytes() == good  # the complete previous checkpoint, untouched
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(1000))


def test_a_finished_run_survives_a_failing_rerun_in_the_same_place(lesson06, finished_run, tiny):
    out = Path(tiny["out"])
    shutil.copytree(finished_run[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(lesson06.StopTraining, match="no checkpoint was written"):
        lesson06.main(**{**tiny, "lr": 1e30})  # diverges in its first epoch
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_resuming_an_earlier_checkpoint_never_overwrites_the_runs_later_one(lesson06, finished_run, tiny):
    out = Path(tiny["out"])
    shutil.copytree(finished_run[0], out)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(helpers.UserError, match=r"would replace .*last.pt \(resume it, or pass another --out\)"):
        lesson06.main(**{**tiny, "resume": str(out / "checkpoints" / "best.pt")})  # the run's own, earlier point
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
