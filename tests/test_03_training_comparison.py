"""Lesson 03: identical training conditions, the verdict, gradient facts at depth 56, data loading and errors."""

import gzip
import hashlib
import json
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import load_lesson, run_script

import helpers

TINY = {
    "dataset": "synthetic",
    "depths": (8, 14),
    "iterations": 6,
    "batch_size": 16,
    "train_size": 256,
    "val_size": 64,
    "bn_recalibration_batches": 2,
    "grad_checkpoints": 2,
    "smoothing": 2,
}


# --------------------------------------------------------------------------------------------------
# End to end, tiny
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(lesson03, tmp_path_factory):
    out = tmp_path_factory.mktemp("l03")
    return lesson03.main(**TINY, out=str(out)), out


def test_tiny_run_writes_results_and_figures(tiny_run):
    results, out = tiny_run
    assert (out / "training_error.png").stat().st_size > 0
    assert (out / "gradient_norms.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["plain-8", "plain-14", "resnet-8", "resnet-14"]
    assert saved["dataset"] == "synthetic" and saved["fell_back_from"] is None
    for m in saved["models"]:
        assert len(m["curve"]["error"]) == TINY["iterations"] and m["curve"]["bin"] == 1
        assert 0 <= m["val_error"] <= 1 and 0 <= m["val_error_running_stats"] <= 1
        assert m["images_per_s"] > 0 and m["wall_s"] >= m["train_s"] > 0
        # init (0) plus checkpoints after 3 and 6 iterations (step indices 2 and 5), every weighted layer
        assert list(m["gradients"]["by_iteration"]) == ["0", "2", "5"]
        for grads in m["gradients"]["by_iteration"].values():
            assert len(grads["grad_norm"]) == m["depth"] == m["weighted_layers"]
            assert all(g > 0 and np.isfinite(g) for g in grads["grad_norm"])


def test_tiny_run_verdict_is_recomputed_from_saved_curves(lesson03, tiny_run):
    results, out = tiny_run
    saved = json.loads((out / "results.json").read_text())
    curves = {
        k: {m["depth"]: m["curve"]["error"] for m in saved["models"] if m["kind"] == k} for k in ("plain", "resnet")
    }
    assert saved["verdict"]["end_fraction"] == lesson03.END_FRACTION and saved["verdict"]["noise_z"] == lesson03.NOISE_Z
    again = lesson03.degradation_verdict(curves, lesson03.END_FRACTION, lesson03.NOISE_Z)
    for key in ("plain_gap", "resnet_gap", "gap_difference", "deeper_plain_is_worse", "outcome"):
        assert again[key] == pytest.approx(saved["verdict"][key])


def test_identical_conditions_same_init_and_same_batches(lesson03):
    """Two builds with the same seed are identical, and plain/residual nets of one depth hold exactly the same
    parameter tensors (option A adds none), drawn by the same initialisation."""
    a, b = lesson03.build_model(14, True, 10, 0), lesson03.build_model(14, True, 10, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    plain, residual = lesson03.build_model(14, True, 10, 0), lesson03.build_model(14, False, 10, 0)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in residual.parameters()]
    # same scheme: every conv weight's standard deviation is Kaiming's sqrt(2 / fan_out) in both nets
    for net in (plain, residual):
        for _, layer in helpers.weighted_layers(net)[:-1]:
            fan_out = layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
            assert layer.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.25)


def test_checkpoint_steps():
    lesson03 = load_lesson(3)
    assert lesson03.checkpoint_steps(200, 4) == [0, 49, 99, 149, 199]
    assert lesson03.checkpoint_steps(3, 8) == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# The verdict from known curves, both ways
# --------------------------------------------------------------------------------------------------
def curve(start: float, end: float, n: int = 100, noise: float = 0.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.linspace(start, end, n) + noise * rng.standard_normal(n))


def verdict(lesson03, plain: tuple, resnet: tuple, noise: float = 0.03) -> dict:
    """The verdict on noisy curves that end at plain = (shallow, deep) and resnet = (shallow, deep)."""
    curves = {
        "plain": {20: curve(0.9, plain[0], noise=noise, seed=0), 56: curve(0.9, plain[1], noise=noise, seed=1)},
        "resnet": {20: curve(0.9, resnet[0], noise=noise, seed=2), 56: curve(0.9, resnet[1], noise=noise, seed=3)},
    }
    return lesson03.degradation_verdict(curves, end_fraction=0.2, noise_z=2.0)


def test_verdict_reproduces_degradation_only_against_the_residual_control(lesson03):
    v = verdict(lesson03, plain=(0.18, 0.48), resnet=(0.16, 0.15))
    assert v["outcome"] == "reproduced" and v["degradation_reproduced"]
    assert v["deeper_plain_is_worse"] and v["deeper_resnet_matches_or_beats"] and v["deep_resnet_beats_deep_plain"]
    # end = mean over the last 20% of a straight line from 0.9: 0.1 x 0.42 above 0.48, 0.1 x 0.72 above 0.18
    assert v["plain_gap"] == pytest.approx(0.27, abs=0.02) and v["gap_difference"] == pytest.approx(0.28, abs=0.02)
    # the case: the plain pair shows a 20-point gap, and so does the residual control
    v = verdict(lesson03, plain=(0.206, 0.409), resnet=(0.202, 0.396))
    assert v["deeper_plain_is_worse"] and not v["deeper_resnet_matches_or_beats"]
    assert v["outcome"] == "cannot tell" and not v["degradation_reproduced"]


def test_verdict_contradicted_when_depth_costs_the_residual_nets_more(lesson03):
    v = verdict(lesson03, plain=(0.30, 0.20), resnet=(0.15, 0.25))
    assert v["outcome"] == "contradicted" and not v["degradation_reproduced"]
    assert not v["deeper_plain_is_worse"] and not v["deeper_resnet_matches_or_beats"]


def test_verdict_noise_band_comes_from_the_curves(lesson03):
    # a 6-point difference between the gaps is clear on quiet curves and within noise on very noisy ones
    quiet = verdict(lesson03, plain=(0.20, 0.26), resnet=(0.20, 0.20), noise=0.01)
    noisy = verdict(lesson03, plain=(0.20, 0.26), resnet=(0.20, 0.20), noise=0.30)
    assert quiet["outcome"] == "reproduced" and noisy["outcome"] == "cannot tell"
    assert noisy["noise_band"]["gap_difference"] > 5 * quiet["noise_band"]["gap_difference"]
    # flat, noise-free ends: the band is zero and any positive excess counts
    flat = {"plain": {20: [0.2] * 50, 56: [0.21] * 50}, "resnet": {20: [0.2] * 50, 56: [0.2] * 50}}
    v = lesson03.degradation_verdict(flat, end_fraction=0.2, noise_z=2.0)
    assert v["noise_band"]["gap_difference"] < 1e-12 and v["outcome"] == "reproduced"


def test_verdict_end_is_robust_to_one_last_batch(lesson03):
    # a single bad last mini-batch does not flip the verdict: "end" is a mean over the last 20%
    plain_deep = curve(0.9, 0.40)
    plain_deep[-1] = 0.0
    curves = {"plain": {20: curve(0.9, 0.20), 56: plain_deep}, "resnet": {20: curve(0.9, 0.20), 56: curve(0.9, 0.21)}}
    v = lesson03.degradation_verdict(curves, end_fraction=0.2, noise_z=2.0)
    assert v["deeper_plain_is_worse"] and v["outcome"] == "reproduced"
    # the shallowest and deepest common depths are compared, whatever else was trained
    curves["plain"][32] = curve(0.9, 0.9)
    assert lesson03.degradation_verdict(curves, 0.2, 2.0)["deep_depth"] == 56
    with pytest.raises(helpers.UserError):
        lesson03.degradation_verdict({"plain": {20: [0.1]}, "resnet": {20: [0.1]}}, 0.2, 2.0)


def test_depth_trend_claims_monotonic_only_when_every_step_is_above_noise(lesson03):
    se = {20: 0.005, 32: 0.005, 44: 0.005, 56: 0.005}
    assert lesson03.depth_trend({20: 0.2, 32: 0.3, 44: 0.4, 56: 0.5}, se, 2.0) == "rises monotonically with depth"
    assert lesson03.depth_trend({20: 0.5, 32: 0.4, 44: 0.3, 56: 0.2}, se, 2.0) == "falls monotonically with depth"
    mixed = lesson03.depth_trend({20: 0.2, 32: 0.3, 44: 0.301, 56: 0.5}, se, 2.0)
    assert mixed == "not monotonic: 20->32 rises, 32->44 flat, 44->56 rises"


def test_end_statistics(lesson03):
    mean, se = lesson03.end_statistics([0.0, 0.0, 1.0, 3.0], 0.5)
    assert mean == 2.0 and se == pytest.approx((2**0.5) / (2**0.5))  # std of [1, 3] is sqrt(2), over sqrt(2)
    assert lesson03.end_statistics([5.0], 0.5) == (5.0, 0.0)


def test_end_value(lesson03):
    assert lesson03.end_value([1.0, 2.0, 3.0, 4.0], 0.5) == 3.5
    assert lesson03.end_value([1.0, 2.0, 3.0], 0.01) == 3.0  # at least the last value


# --------------------------------------------------------------------------------------------------
# Gradient facts at depth 56, at initialisation (thresholds: measured over seeds 0-2 on Fashion-MNIST and the
# synthetic set, with margin; see the numbers quoted in each assertion)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gradients_at_init(lesson03):
    data = helpers.load_dataset("synthetic", val_size=100, train_size=512, seed=0, synthetic_size=700)
    x = helpers.normalize(data.train_x[:128], data.mean, data.std)
    y = data.train_y[:128]
    out = {}
    for plain in (True, False):
        model = lesson03.build_model(56, plain, 10, seed=0)
        F.cross_entropy(model(x), y).backward()
        out["plain" if plain else "resnet"] = lesson03.gradient_summary(
            lesson03.layer_gradient_norms(model)["grad_norm"]
        )
    return out


def test_plain56_gradients_do_not_vanish_they_grow_towards_the_input(gradients_at_init):
    plain = gradients_at_init["plain"]
    # measured: first conv / last conv = 231 to 6980 in plain-56 (batch norm turns vanishing into explosion)
    assert plain["first_over_last_conv"] > 50
    # measured: the smallest conv gradient of plain-56 is 0.63-1.1x that of ResNet-56: nothing vanishes
    assert plain["smallest_conv"] > 0.3 * gradients_at_init["resnet"]["smallest_conv"]


def test_resnet56_gradients_stay_within_a_small_factor(gradients_at_init):
    resnet, plain = gradients_at_init["resnet"], gradients_at_init["plain"]
    assert 1 < resnet["first_over_last_conv"] < 40  # measured 2.9 to 12.5
    assert plain["first_conv"] > 20 * resnet["first_conv"]  # measured 54x to 570x


# --------------------------------------------------------------------------------------------------
# Missing data: loud fallback in the quick run, clear error otherwise
# --------------------------------------------------------------------------------------------------
def no_debian_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def test_default_quick_run_falls_back_loudly_to_synthetic(lesson03, tmp_path, monkeypatch, capsys):
    no_debian_fashion_mnist(monkeypatch, tmp_path)
    tiny = {k: v for k, v in TINY.items() if k != "dataset"}
    results = lesson03.main(**tiny, data_dir=str(tmp_path / "empty"), download=False, out=str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert "NOTICE" in err and "Falling back to the SYNTHETIC dataset" in err and "--full run never falls back" in err
    assert results["dataset"] == "synthetic" and results["fell_back_from"] == "cifar10"


def test_fallback_prefers_fashion_mnist_on_disk(lesson03, tmp_path, capsys):
    write_fashion_mnist(tmp_path / "data" / "FashionMNIST" / "raw", 300, 50)
    tiny = {k: v for k, v in TINY.items() if k != "dataset"}
    results = lesson03.main(**tiny, data_dir=str(tmp_path / "data"), download=False, out=str(tmp_path / "o"))
    assert "Falling back to the FASHION-MNIST dataset" in capsys.readouterr().err
    assert results["dataset"] == "fashion-mnist"


def test_missing_dataset_falls_back_the_same_way_from_a_flag(lesson03, tmp_path, monkeypatch, capsys):
    """The rule is "this dataset is not available", not "was it typed": a keyword (or flag) naming a missing
    dataset falls back exactly as the edited constant does."""
    no_debian_fashion_mnist(monkeypatch, tmp_path)
    asked = {"dataset": "cifar100", "data_dir": str(tmp_path / "empty"), "download": False, "val_size": 10}
    cfg = helpers.config(vars(lesson03), asked)  # as `--dataset cifar100 ...` or `main(dataset="cifar100", ...)`
    assert helpers.load_data(cfg).name == "synthetic"
    assert "Falling back to the SYNTHETIC dataset" in capsys.readouterr().err
    with pytest.raises(helpers.UserError, match="cifar100 is not in"):
        helpers.load_data(helpers.config(vars(lesson03), {**asked, "full": True}))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_missing_dataset_is_an_error_in_a_full_run(lesson03, tmp_path, dataset):
    with pytest.raises(helpers.UserError) as error:
        lesson03.main(dataset=dataset, full=True, data_dir=str(tmp_path), download=False, out=str(tmp_path / "o"))
    message = str(error.value)
    assert "could not be downloaded" in message and "cs.toronto.edu" in message
    assert "apt-get install dataset-fashion-mnist" in message  # the offline route on Debian


def test_missing_fashion_mnist_error_names_the_debian_package(lesson03, tmp_path, monkeypatch):
    no_debian_fashion_mnist(monkeypatch, tmp_path)
    with pytest.raises(helpers.UserError, match="apt-get install dataset-fashion-mnist"):
        lesson03.main(
            dataset="fashion-mnist", full=True, data_dir=str(tmp_path), download=False, out=str(tmp_path / "o")
        )


def test_cli_prints_one_error_line_and_exits_1(tmp_path):
    done = run_script(
        "03_training_comparison.py", "--full", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download",
        "--out", str(tmp_path / "o"), timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: cifar10 is not in") and "Traceback" not in done.stderr


def test_flag_values_are_validated(lesson03, tmp_path):
    for bad in ({"depths": (21,)}, {"iterations": 0}, {"end_fraction": 1.5}, {"noise_z": -0.1}):
        with pytest.raises(helpers.UserError):
            lesson03.main(**{**TINY, **bad}, out=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Dataset loaders read files in each dataset's real on-disk format
# --------------------------------------------------------------------------------------------------
def numbered_images(count: int, offset: int = 0) -> np.ndarray:
    """uint8 (N, 3, 32, 32) images whose first two pixels spell their index, the rest random."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    index = np.arange(offset, offset + count)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = index % 256, index // 256
    return images


def write_pickle(path, obj) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the archives were written by Python 2's cPickle
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root, name: str, train_count: int, test_count: int, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py (5 training batches, test_batch, batches.meta) or cifar-100-python (train, test,
    meta): pickled dicts with a (N, 3072) uint8 'data' array (R, G, B planes, row-major) and label lists."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key, classes = ("labels", 10) if name == "cifar10" else ("fine_labels", 100)
    train = numbered_images(train_count)
    test = numbered_images(test_count, offset=train_count)
    files = [f for f, _ in cls.train_list]
    chunks = np.array_split(np.arange(train_count), len(files))
    train_list = []
    for file, rows in zip(files, chunks):
        entry = {"data": train[rows].reshape(len(rows), -1), label_key: [int(i) % classes for i in rows]}
        if name == "cifar100":
            entry["coarse_labels"] = [int(i) % 20 for i in rows]
        train_list.append([file, write_pickle(folder / file, entry)])
    test_labels = [int(i) % classes for i in range(test_count)]
    test_entry = {"data": test.reshape(test_count, -1), label_key: test_labels}
    test_list = [[cls.test_list[0][0], write_pickle(folder / cls.test_list[0][0], test_entry)]]
    names = [f"class{k}" for k in range(classes)]
    meta_md5 = write_pickle(folder / cls.meta["filename"], {cls.meta["key"]: names})
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})
    return train, test


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_python_pickle_batches(name, tmp_path, monkeypatch):
    train, test = write_cifar(tmp_path, name, train_count=100, test_count=20, monkeypatch=monkeypatch)
    data = helpers.load_dataset(name, tmp_path, val_size=10, seed=0, download=False)
    assert data.train_x.shape == (90, 3, 32, 32) and data.val_x.shape == (10, 3, 32, 32)
    assert data.test_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.num_classes == (10 if name == "cifar10" else 100)
    classes = data.num_classes
    for images, labels, source in ((data.train_x, data.train_y, train), (data.val_x, data.val_y, train)):
        index = images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()
        assert torch.equal(images, torch.from_numpy(source[index.numpy()]))  # pixels and channel order kept
        assert torch.equal(labels, index % classes)
    assert torch.equal(data.test_x, torch.from_numpy(test))
    # the held-out split is disjoint from the training images
    seen = set((data.train_x[:, 0, 0, 0].long() + 256 * data.train_x[:, 0, 0, 1].long()).tolist())
    held = set((data.val_x[:, 0, 0, 0].long() + 256 * data.val_x[:, 0, 0, 1].long()).tolist())
    assert not seen & held and len(seen | held) == 100


def test_cifar_loader_rejects_a_corrupted_file(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", train_count=50, test_count=10, monkeypatch=monkeypatch)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"x")  # MD5 no longer matches
    with pytest.raises(helpers.UserError, match="cifar10 files in .*cifar-10-batches-py are corrupt or incomplete"):
        helpers.load_dataset("cifar10", tmp_path, val_size=5, download=False)  # corrupt, not "could not be downloaded"


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of (Fashion-)MNIST: magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(folder, train_count: int, test_count: int, gz: bool = False) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train_count, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(train_count) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test_count, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(test_count) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return {"arrays": arrays}


def test_fashion_mnist_loader_reads_idx_files_from_the_debian_package(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    written = write_fashion_mnist(debian, 120, 30, gz=True)
    monkeypatch.setattr(helpers, "DEBIAN_FASHION_MNIST", debian)
    data = helpers.load_dataset("fashion-mnist", tmp_path / "data", val_size=20, seed=0, download=False)
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()  # unpacked once
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (30, 3, 32, 32)
    # 28x28 grey -> zero border of 2 pixels -> three identical channels
    test = torch.from_numpy(written["arrays"]["t10k-images-idx3-ubyte"])
    assert torch.equal(data.test_x[:, 0, 2:30, 2:30], test) and data.test_x[:, :, :2].sum() == 0
    assert torch.equal(data.test_x[:, 0], data.test_x[:, 2])
    assert torch.equal(data.test_y, torch.arange(30) % 10)


def test_a_damaged_debian_file_is_one_error_naming_the_folder_to_delete(tmp_path, monkeypatch):
    """Truncated by a bad disk, the test labels no longer match the images: torchvision's reader refuses them."""
    debian = tmp_path / "debian"
    write_fashion_mnist(debian, 20, 10, gz=True)
    labels = debian / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-3]))
    monkeypatch.setattr(helpers, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(helpers.UserError, match=r"fashion-mnist files in .*FashionMNIST are corrupt or incomplete"):
        helpers.load_dataset("fashion-mnist", tmp_path / "data", val_size=5, download=False)


# --------------------------------------------------------------------------------------------------
# The lesson card's numbers (the default quick run; minutes, so marked slow)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_run_shows_what_the_lesson_card_claims(tmp_path):
    import os
    import time

    quiet = os.cpu_count() == 2 and os.getloadavg()[0] < 0.5  # the 3-minute budget is for 2 quiet cores
    started = time.perf_counter()
    done = run_script("03_training_comparison.py", "--out", str(tmp_path), timeout=3600)
    wall_s = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dataset"] == "fashion-mnist"  # cifar10 is not on this machine; the fallback is real data
    v = results["verdict"]
    end = v["end_train_error"]
    # the targets for the default run: both halves of the claim, against the control
    assert v["plain_gap"] >= 0.08  # card: +40.3 points (seed 0, fp32)
    assert v["resnet_gap"] <= 0.03  # card: +0.6 points
    assert end["plain"]["56"] - end["resnet"]["56"] >= 0.08  # card: 45.5 points
    assert v["outcome"] == "reproduced" and v["degradation_reproduced"]
    models = {m["name"]: m for m in results["models"]}
    plain56, resnet56 = models["plain-56"], models["resnet-56"]
    assert plain56["gradient_at_init"]["first_over_last_conv"] > 1000  # card: 1,910
    assert plain56["gradient_at_init"]["smallest_conv"] > 0.3 * resnet56["gradient_at_init"]["smallest_conv"]
    first_layer = plain56["gradients"]["by_iteration"]
    last = str(results["config"]["iterations"] - 1)
    assert first_layer["0"]["relative"][0] > 20 and first_layer[last]["relative"][0] < 1e-3  # run: 220, 2e-4
    assert first_layer[last]["grad_norm"][0] < 0.25 * first_layer[last]["grad_norm"][-2]  # run: 0.022 vs 0.18
    assert results["gradient_profile"]["plain-56"]["first_over_last_conv_at_end"] < 0.25  # card: 0.12, flipped
    for m in models.values():  # card: stale statistics never help much; re-estimated ones track training error
        assert m["val_error_running_stats"] >= m["val_error"] - 0.03
        assert abs(m["val_error"] - m["end_train_error"]) < 0.06
    assert max(m["val_error_running_stats"] - m["val_error"] for m in models.values()) > 0.1  # card: 16 points
    if quiet:  # the budgets of a 2-core laptop: 180 s with native bf16, 240 s in fp32
        budget = 180 if results["precision"] == "torch.bfloat16" else 240
        assert wall_s < budget, f"the default run took {wall_s:.0f} s"
