"""Device mistakes caught without a GPU.

No GPU has run these tests, but two kinds of GPU failure show on a CPU:
- A model left on the CPU while its inputs move to CUDA or MPS fails with "Input type (torch.cuda.FloatTensor) and
  weight type (torch.FloatTensor) should be the same". The meta device fails the same way: an operation that mixes
  meta and CPU tensors raises. So each lesson's training and measuring pieces run here with their data on the meta
  device (shapes only, no arithmetic). A meta tensor has no value, so reading one as a number (`.item()`, `float()`)
  is answered with a placeholder: what is checked is where the tensors live, not what they hold.
- MPS has no float64: every lesson's default path runs here with a dispatch mode that records any float64 tensor.
"""

import pytest
import torch
from conftest import load_lesson
from torch.utils._python_dispatch import TorchDispatchMode

import helpers

META = torch.device("meta")


@pytest.fixture
def meta_numbers(monkeypatch):
    """Read a meta tensor as the number 1, and its list of values as zeros (it holds none); every other tensor reads
    as before."""
    for name, placeholder in (("item", 1.0), ("__float__", 1.0), ("__int__", 1), ("__bool__", True)):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, original=original, placeholder=placeholder: placeholder if self.is_meta else original(self),
        )
    equal = torch.equal  # no meta kernel: equal where both are meta (the devices are what is checked)
    monkeypatch.setattr(torch, "equal", lambda a, b: (a.is_meta and b.is_meta) or equal(a, b))
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(
        torch.Tensor, "tolist", lambda self: torch.zeros(self.shape).tolist() if self.is_meta else tolist(self)
    )


@pytest.fixture(scope="module")
def data():
    return helpers.load_dataset("synthetic", val_size=32, train_size=64, test_size=32, synthetic_size=128)


def test_lesson03_trains_and_evaluates_on_the_datas_device(meta_numbers, data):
    lesson = load_lesson(3)
    on_meta = data.to(META)
    model = lesson.cifar_resnet(8)
    history = lesson.sgd_train(model, on_meta, steps=2, batch_size=16, lr=0.1, device=META, augment=True,
                               generator=torch.Generator().manual_seed(0), warmup_steps=1)  # fmt: skip
    assert len(history) == 2 and {p.device for p in model.parameters()} == {META}
    batches = helpers.training_batches(on_meta, 2, 16, META, torch.Generator().manual_seed(0))
    helpers.recalibrate_batch_norm(model, batches)
    helpers.evaluate(model, on_meta.val_x, on_meta.val_y, data.mean, data.std, META)


def test_lesson04_measures_and_trains_on_the_chosen_device(meta_numbers, data):
    lesson = load_lesson(4)
    overrides = {"train_steps": 2, "batch_size": 8, "bn_recalibration_batches": 1, "warmup_steps": 1}
    cfg = helpers.config(vars(lesson), overrides | {"precision": "fp32"})
    assert len(lesson.compare_training(cfg, data, META)["rows"]) == len(lesson.SMALL_CIFAR_VARIANTS)
    assert lesson.deep_gradient_check(20, 2, 0, META)["units"] == 9
    timing = lesson.measure(lesson.cifar_resnet(8), (1, 3, 32, 32), META, repeats=1)
    assert timing["peak_mb"] is None  # no memory figure for a device that is neither CUDA nor the CPU


def test_lesson05_builds_its_gradient_nets_on_the_images_device(meta_numbers, data):
    """Issue: `gradient_flow` built each net on the CPU while the images sat on CUDA or MPS."""
    lesson = load_lesson(5)
    images = helpers.normalize(data.train_x[:4], data.mean, data.std).to(META)
    runs = lesson.gradient_flow([8], images, data.train_y[:4].to(META), seed=0)
    assert len(runs) == 4
    cfg = helpers.config(vars(lesson), {"landscape_depth": 8, "train_steps": 2, "batch_size": 8, "warmup_steps": 1})
    model, info = lesson.landscape_network(cfg, data.to(META), plain=False, device=META, amp_dtype=None)
    assert {p.device for p in model.parameters()} == {META}


def test_lesson06_trains_an_epoch_on_the_chosen_device(meta_numbers, data):
    lesson = load_lesson(6)
    overrides = {"model": "resnet8", "epochs": 1, "batch_size": 16, "check_every": 2, "precision": "fp32"}
    cfg = helpers.config(vars(lesson), overrides)
    ddp = lesson.Distributed(0, 1, 0)
    t = lesson.build_training(cfg, data, META, None, ddp, state=None)
    stop = {"stop": False, "requested": False}
    on_meta = data.to(META)
    run = lesson.train_one_epoch(t, on_meta, cfg, META, None, stop, ddp)
    assert run["complete"] and {p.device for p in t["model"].parameters()} == {META}


class Float64Recorder(TorchDispatchMode):
    """Every operator that returns a float64 tensor, by name."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outputs):
            self.seen.add(str(func))
        return out


TINY = {
    3: {"depths": (8, 14), "iterations": 4, "batch_size": 16, "train_size": 256, "val_size": 64,
        "bn_recalibration_batches": 1, "grad_checkpoints": 2},
    4: {"train_size": 256, "val_size": 64, "test_size": 64, "train_steps": 2, "batch_size": 8, "warmup_steps": 1,
        "bn_recalibration_batches": 1, "deep_depth": 20, "measure_latency": False},
    5: {"train_size": 256, "val_size": 32, "gradient_depths": (8,), "gradient_batch": 8, "landscape_depth": 8,
        "train_steps": 3, "batch_size": 16, "warmup_steps": 1, "bn_recalibration_batches": 1, "grid_points": 5,
        "loss_images": 32, "direction_pairs": 1},
    6: {"model": "resnet8", "train_size": 256, "val_size": 64, "test_size": 64, "epochs": 1, "batch_size": 32,
        "num_mistakes": 2},
}  # fmt: skip


@pytest.mark.parametrize("number", sorted(TINY))
def test_no_float64_tensor_in_a_lessons_run(number, tmp_path):
    """MPS has no float64 ("Cannot convert a MPS Tensor to float64 dtype"): a lesson's run makes none, on any device.
    (NumPy's float64 arrays, on the host, are not tensors and do not count.)"""
    lesson = load_lesson(number)
    recorder = Float64Recorder()
    with recorder:
        lesson.main(dataset="synthetic", device="cpu", out=str(tmp_path), **TINY[number])
    assert recorder.seen == set()


def test_lesson06_resumes_in_fp16_a_run_saved_without_gradient_scaling(tmp_path):
    """A run started where bf16 or fp32 was chosen (an A100, a CPU) and resumed on a T4, where auto means fp16: the
    saved scaler state is empty, and the resumed run starts a fresh GradScaler. fp16 autocast runs on a CPU too."""
    lesson = load_lesson(6)
    lesson.main(dataset="synthetic", device="cpu", out=str(tmp_path), precision="fp32", **TINY[6])
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["scaler"] == {}
    assert set(state["rng"]) == {"torch", "order", "augment"}  # no per-GPU states: any GPU count can resume
    results = lesson.main(resume=str(last), device="cpu", out=str(tmp_path), precision="fp16")
    assert results["status"] == "finished" and results["autocast_dtype"] == torch.float16


def test_lesson06_resumes_a_checkpoint_from_a_machine_with_more_gpus(tmp_path):
    """A checkpoint written on a 2-GPU machine (simulated: one CUDA random state per visible GPU added to the saved
    state, as an older version wrote them) resumes on a machine with one GPU or none: the run's random numbers come
    from its own CPU generators, and per-GPU states are not restored."""
    lesson = load_lesson(6)
    lesson.main(dataset="synthetic", device="cpu", out=str(tmp_path / "run"), precision="fp32", **TINY[6])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    state["rng"]["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # two visible GPUs
    edited = tmp_path / "two_gpus.pt"
    torch.save(state, edited)
    results = lesson.main(resume=str(edited), device="cpu", out=str(tmp_path / "resumed"))
    assert results["status"] == "finished"


def test_lesson06_fp16_skipped_steps_keep_the_schedule_and_raise_no_warning(tmp_path, monkeypatch, recwarn):
    """With fp16, GradScaler skips the optimizer step whenever the scaled gradients overflow; the schedule still
    counts that step (so a resumed run lands on the same learning rate), and torch's warning about a scheduler step
    without an optimizer step does not reach the learner. A huge initial scale makes the first steps overflow."""
    lesson = load_lesson(6)
    scaler_class = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scaler_class(*a, init_scale=2.0**40, **k))
    results = lesson.main(dataset="synthetic", device="cpu", out=str(tmp_path), precision="fp16", **TINY[6])
    steps = results["steps_per_epoch"] * TINY[6]["epochs"]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == steps
    assert state["scaler"]["scale"] < 2.0**40  # it did skip steps
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_lesson04_recalibrates_batch_norm_in_the_runs_precision(data, monkeypatch):
    """`--precision fp32` on hardware where auto would pick bf16 (faked here): the recalibration runs in fp32 too."""
    lesson = load_lesson(4)
    monkeypatch.setattr(helpers, "cpu_has_native_bf16", lambda: True)
    seen = []
    recalibrate = helpers.recalibrate_batch_norm
    monkeypatch.setattr(
        helpers,
        "recalibrate_batch_norm",
        lambda m, b, dtype=None, *a: seen.append(dtype) or recalibrate(m, b, dtype, *a),
    )
    overrides = {"train_steps": 1, "batch_size": 8, "bn_recalibration_batches": 1, "warmup_steps": 0}
    lesson.compare_training(helpers.config(vars(lesson), overrides | {"precision": "fp32"}), data, torch.device("cpu"))
    assert seen and set(seen) == {None}


def test_lessons_01_and_02_measure_on_the_chosen_device(meta_numbers):
    """Lessons 01 and 02 train nothing, but they build blocks and nets and time them on `--device`."""
    lesson01 = load_lesson(1)
    cfg = helpers.config(vars(lesson01), {"sweep_depths": (1, 2), "sweep_repeats": 1, "sweep_inits": ("he",)})
    assert lesson01.block_shapes(cfg, META)
    assert lesson01.fully_connected_gradients(cfg, META)
    assert lesson01.depth_sweep(cfg, META)
    assert lesson01.zero_init_check(cfg, META)
    lesson02 = load_lesson(2)
    cfg = helpers.config(vars(lesson02), {"latency_batch_sizes": (1, 2), "latency_seconds": 0.01})
    row = {}
    lesson02.add_latencies([row], [lambda: lesson02.cifar_resnet(8)], 32, META, cfg)  # builds, moves, times the net
    assert row["repeats@1"] >= 1 and row["repeats@2"] >= 1
