"""Lesson 05: filter-normalised directions, the landscape grid and its summary, gradient flow, figures."""

import json
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import run_script

import helpers

TINY = {
    "dataset": "synthetic",
    "download": False,
    "train_size": 256,
    "val_size": 32,
    "gradient_depths": (8, 14),
    "gradient_batch": 8,
    "landscape_depth": 8,
    "train_steps": 4,
    "batch_size": 16,
    "warmup_steps": 1,
    "bn_recalibration_batches": 2,
    "grid_points": 5,
    "loss_images": 32,
    "summary_radius": 0.5,
    "direction_pairs": 2,
    "device": "cpu",
}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_filter_normalised_direction_has_the_weights_filter_norms(lesson05):
    torch.manual_seed(0)
    model = lesson05.cifar_resnet(8)
    direction = lesson05.filter_normalized_direction(model, torch.Generator().manual_seed(1))
    checked = 0
    for weight, d in zip(model.parameters(), direction):
        assert d.shape == weight.shape
        if weight.dim() <= 1:
            continue
        torch.testing.assert_close(d.flatten(1).norm(dim=1), weight.detach().flatten(1).norm(dim=1))
        cosine = torch.nn.functional.cosine_similarity(d.flatten(), weight.detach().flatten(), dim=0)
        assert abs(cosine) < 0.2, "the direction must be random, not the weights themselves"
        checked += 1
    assert checked == len(helpers.weighted_layers(model))  # every conv and the classifier


def test_biases_and_batch_norm_parameters_get_zero_direction(lesson05):
    model = lesson05.cifar_resnet(8)
    direction = lesson05.filter_normalized_direction(model, torch.Generator().manual_seed(1))
    ignored = [(n, d) for (n, p), d in zip(model.named_parameters(), direction) if p.dim() <= 1]
    assert any(".bn" in n or n.startswith("bn") for n, _ in ignored) and any(n == "fc.bias" for n, _ in ignored)
    assert all(torch.count_nonzero(d) == 0 for _, d in ignored)


def test_grid_centre_is_the_unperturbed_loss_and_weights_are_restored(lesson05):
    torch.manual_seed(0)
    model = lesson05.cifar_resnet(8).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    before = [p.detach().clone() for p in model.parameters()]
    unperturbed = lesson05.mean_loss(model, batches)
    generator = torch.Generator().manual_seed(2)
    directions = tuple(lesson05.filter_normalized_direction(model, generator) for _ in range(2))
    coords = np.linspace(-1, 1, 3)
    surface = lesson05.loss_surface(model, directions, coords, batches)
    assert surface[1, 1] == pytest.approx(unperturbed, rel=1e-6)
    assert np.ptp(surface) > 1e-3, "moving along the directions must change the loss"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_summary_of_a_known_bowl_and_saddle(lesson05):
    coords = np.linspace(-1, 1, 21)
    beta, alpha = np.meshgrid(coords, coords, indexing="ij")  # rows beta, columns alpha
    bowl = 1.0 + 3.0 * (alpha**2 + beta**2)
    summary = lesson05.summarize_surface(coords, bowl, radius=0.5)
    assert summary["centre_loss"] == pytest.approx(1.0)
    assert summary["min_loss"] == pytest.approx(1.0)
    assert summary["rise_at_radius"] == pytest.approx(3.0 * 0.25, abs=0.02)
    assert summary["max_rise"] == pytest.approx(6.0)
    assert summary["upward_curving_share"] == 1.0
    assert lesson05.summarize_surface(coords, alpha**2 - beta**2, 0.5)["upward_curving_share"] == 0.0
    # the mixed derivative counts: x^2 + y^2 + c*xy is convex for |c| < 2 and a saddle for |c| > 2
    assert lesson05.upward_curving_share(coords, alpha**2 + beta**2 + 1.8 * alpha * beta) == 1.0
    assert lesson05.upward_curving_share(coords, alpha**2 + beta**2 + 3.0 * alpha * beta) == 0.0
    # half the grid concave: the share follows
    half = np.where(alpha < 0, -(alpha**2), alpha**2) + beta**2
    assert 0.35 < lesson05.upward_curving_share(coords, half) < 0.65


def test_without_batch_norm_removes_every_norm(lesson05):
    model = lesson05.without_batch_norm(lesson05.cifar_resnet(8, plain=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(helpers.weighted_layers(model)) == 8


def test_plain_deep_net_with_bn_has_a_much_steeper_gradient_profile(lesson05):
    """Measured at depth 56 (seed 0, 32 images): plain first/last conv ratio ~2e4, residual ~1e2."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    runs = lesson05.gradient_flow([56], x, y, seed=0)
    table = {(r["net"], r["BN"]): r for r in lesson05.gradient_table(runs)}
    assert table[("plain", "yes")]["first/last"] > 20 * table[("residual", "yes")]["first/last"]
    # without BN, the residual net's activations (and gradients) grow block by block
    assert table[("residual", "no")]["last_conv"] > 100 * table[("plain", "no")]["last_conv"]


def test_tiny_run_writes_figures_and_results_in_seconds(lesson05, tmp_path):
    started = time.perf_counter()
    results = lesson05.main(**TINY, out=str(tmp_path))
    assert time.perf_counter() - started < 60
    expected = {  # figure size (inches) x 110 dpi, before the tight bounding box trims or grows it
        "gradient_flow.png": (13 * 110, 4.8 * 110),
        "loss_landscape.png": (12 * 110, 10.4 * 110),
        "architecture.png": (12.6 * 110, 8.5 * 110),
        "feature_evolution.png": (10.5 * 110, 9.2 * 110),
    }
    for name, (width, height) in expected.items():
        w, h = png_size(tmp_path / name)
        assert 0.75 * width < w < 1.25 * width and 0.75 * height < h < 1.25 * height, (name, w, h)
    saved = json.loads((tmp_path / "results.json").read_text())
    landscape = saved["landscape"]
    coords = np.array(landscape["coords"])
    for name, surface in landscape["surfaces"].items():
        recomputed = lesson05.summarize_surface(coords, np.array(surface), TINY["summary_radius"])
        for key, value in recomputed.items():
            assert landscape["summaries"][name][key] == pytest.approx(value)
    assert set(landscape["surfaces"]) == {"plain-8", "residual-8"}
    assert [row["stage"] for row in results["features"]["stages"]] == ["stem", "layer1", "layer2", "layer3"]
    assert [row["channels"] for row in results["features"]["stages"]] == [16, 16, 32, 64]


def test_checkpoint_is_used_instead_of_training_and_a_wrong_one_is_a_user_error(lesson05, tmp_path):
    torch.manual_seed(3)
    net = lesson05.cifar_resnet(8)
    torch.save({"model": net.state_dict()}, tmp_path / "residual.pt")
    torch.save(lesson05.cifar_resnet(14).state_dict(), tmp_path / "wrong.pt")
    config = {**TINY, "gradient_depths": (8,), "out": str(tmp_path / "out")}
    with pytest.raises(helpers.UserError, match="does not hold weights"):
        lesson05.main(**config, plain_checkpoint=str(tmp_path / "wrong.pt"))
    results = lesson05.main(**config, residual_checkpoint=str(tmp_path / "residual.pt"))
    assert results["landscape"]["networks"]["residual-8"]["source"].endswith("residual.pt")


def test_command_line_rejects_an_even_grid():
    result = run_script("05_visualization.py", "--grid-points", "4", "--dataset", "synthetic", timeout=120)
    assert result.returncode == 1 and "error: --grid-points must be odd" in result.stderr


@pytest.mark.slow
def test_default_run_matches_the_lesson_card(tmp_path):
    result = run_script("05_visualization.py", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    summaries = saved["landscape"]["summaries"]
    assert set(summaries) == {"plain-20", "residual-20"}
    plain, residual = summaries["plain-20"], summaries["residual-20"]
    # the card's table, at the precision the nets were trained in: centre loss, rise at r=0.5, highest rise
    fp32 = saved["landscape"]["training_precision"] == "fp32"
    card = {"plain-20": (0.90, 1.67, 549), "residual-20": (0.96, 0.52, 51)} if fp32 else {
        "plain-20": (0.93, 1.18, 695), "residual-20": (0.96, 1.10, 69)}  # fmt: skip
    for name, (centre, rise, highest) in card.items():
        assert summaries[name]["centre_loss"] == pytest.approx(centre, abs=0.02)
        assert summaries[name]["rise_at_radius"] == pytest.approx(rise, rel=0.1)
        assert summaries[name]["max_rise"] == pytest.approx(highest, rel=0.1)
    assert plain["max_rise"] > 3 * residual["max_rise"]  # the plain net climbs far higher at the edge, in both
    assert 0.25 < plain["upward_curving_share"] < 0.75 and 0.25 < residual["upward_curving_share"] < 0.75
    for net in saved["landscape"]["networks"].values():  # stored BN statistics had caught up (< 3%)
        assert abs(net["eval_loss_stored_bn"] / net["eval_loss_recalibrated_bn"] - 1) < 0.03
    rows = {(r["depth"], r["net"], r["bn"]): r for r in saved["gradient_flow"]["summary"]}
    # the card's gradient table (measured: plain+BN 1.3e2, 2.0e4, 3.4e7-4.1e7; residual+BN 32, 1.0e2, 1.6e2)
    assert rows[(56, "plain", "yes")]["first_over_last"] > 20 * rows[(56, "residual", "yes")]["first_over_last"]
    assert rows[(110, "plain", "yes")]["first_over_last"] > 1e5
    for depth in (20, 56, 110):
        residual = rows[(depth, "residual", "yes")]
        assert residual["max"] / residual["min"] < 300  # card: "less than 300x at every depth" (measured 90-278)
        assert rows[(depth, "plain", "no")]["first_over_last"] < 20  # He init keeps a plain net without BN level
    assert rows[(110, "residual", "no")]["last_conv"] > 1e5 * rows[(20, "residual", "no")]["last_conv"]


def test_share_comparison_holds_only_when_every_pair_agrees_beyond_their_spread(lesson05):
    assert lesson05.compare_shares([0.40, 0.42, 0.41], [0.60, 0.61, 0.62])["holds"]
    assert not lesson05.compare_shares([0.41, 0.50, 0.45], [0.49, 0.44, 0.47])["holds"]  # signs disagree
    assert not lesson05.compare_shares([0.40, 0.45, 0.41], [0.41, 0.60, 0.43])["holds"]  # spread exceeds the mean
    assert not lesson05.compare_shares([0.40], [0.60])["holds"]  # one pair cannot show a spread
