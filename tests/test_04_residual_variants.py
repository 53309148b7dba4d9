"""Lesson 04: every variant's parameter count, equality with torchvision, the ResNeXt and SE ideas, the
pre-activation identity path, and the 1001-layer network's gradients at initialisation."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import run_script

BUILDERS = {
    "preact_resnet164": lambda m: m.preact_resnet(164),
    "wrn_16_8": lambda m: m.wide_resnet(16, 8),
    "wrn_40_4": lambda m: m.wide_resnet(40, 4),
    "wrn_28_10": lambda m: m.wide_resnet(28, 10, dropout=0.3),  # dropout adds no parameters
    "resnext29_8x64d": lambda m: m.CifarResNeXt(8, 64, 29),
    "densenet_bc_100_12": lambda m: m.densenet_bc(100, 12),
    "wide_resnet50_2": lambda m: m.wide_resnet50_2(),
    "resnext50_32x4d": lambda m: m.resnext50_32x4d(),
    "densenet121": lambda m: m.densenet121(),
    "se_resnet50": lambda m: m.se_resnet50(),
}
EXACT_COUNTS = {  # the issue's numbers; the "about" ones checked against the papers' rounding below
    "wrn_28_10": 36_479_194,
    "wrn_40_4": 8_949_210,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
    "densenet121": 7_978_856,
    "densenet_bc_100_12": 769_162,
    "se_resnet50": 28_088_024,
}
ROUNDED_COUNTS = {"preact_resnet164": 1.7e6, "wrn_16_8": 11.0e6, "resnext29_8x64d": 34.4e6}  # as the papers print them


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_parameter_counts(lesson04, name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = BUILDERS[name](lesson04)
    n = count(model)
    if name in EXACT_COUNTS:
        assert n == EXACT_COUNTS[name]
    else:
        assert round(n / 1e5) == round(ROUNDED_COUNTS[name] / 1e5)  # equal at the papers' 0.1M precision
    assert lesson04.EXPECTED_PARAMETERS[name] == n  # the table the run prints checks against these


def test_card_pins_ten_counts_and_preact_1001_differs_from_the_paper(lesson04):
    assert len(lesson04.EXPECTED_PARAMETERS) == 10  # the card: "10 equal to torchvision's or the papers'"
    with torch.device("meta"):
        assert round(count(lesson04.preact_resnet(1001)) / 1e4) == 1033  # 10.33M, where the paper says 10.2M


@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2", "densenet121"])
def test_strict_load_and_equal_outputs_against_torchvision(lesson04, name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    for module in reference.modules():  # non-trivial BN statistics, so that a misplaced BN would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    ours = getattr(lesson04, name)().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)  # small: equality does not need ImageNet-sized images
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert expected.std() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_grouped_convolution_equals_sum_of_parallel_paths(lesson04):
    result = lesson04.grouped_equals_paths(seed=0)
    assert result["cardinality"] == 8 and result["path_width"] == 128
    assert result["output_rms"] > 0.1
    assert result["max_abs_difference"] < 1e-4 * max(1.0, result["output_rms"])


def test_paths_differ_when_the_groups_are_misassigned(lesson04):
    """The equivalence is not automatic: pairing path i's 3x3 weights with another path's channels breaks it."""
    torch.manual_seed(0)
    block = lesson04.Bottleneck(64, 64, groups=4, base_width=16).eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        correct = lesson04.aggregated_paths(block, x)
        block.conv2.weight.copy_(block.conv2.weight.roll(16, dims=0))  # path i gets path i-1's filters
        assert (block.branch(x) - lesson04.aggregated_paths(block, x)).abs().max() < 1e-4
        assert (block.branch(x) - correct).abs().max() > 1e-2


def test_se_gates_lie_in_zero_one_and_change_the_output(lesson04):
    result = lesson04.se_effect(seed=0)
    assert 0.0 < result["gate_min"] < result["gate_max"] < 1.0
    assert result["output_relative_change"] > 0.01
    torch.manual_seed(0)
    block = lesson04.SEBottleneck(256, 64).eval()
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        with_se = block(x)
        block.se.fc2.bias.fill_(30.0)  # gates -> sigmoid(large) = 1: the SE module becomes the identity
        block.se.fc2.weight.zero_()
        assert not torch.allclose(with_se, block(x), atol=1e-3)
        torch.testing.assert_close(block(x), F.relu(lesson04.Bottleneck.branch(block, x) + x))


@pytest.mark.parametrize("block_name", ["PreActBlock", "PreActBottleneck"])
def test_preact_identity_path_has_no_norm_or_activation(lesson04, block_name):
    """With the branch's last convolution zeroed, a pre-activation unit returns its input exactly,
    negative values included: nothing (no BN, no ReLU) sits on the identity path or after the addition."""
    block_cls = getattr(lesson04, block_name)
    block = block_cls(64, 64 // block_cls.expansion).train()
    assert block.shortcut is None
    last_conv = block.conv3 if block_name == "PreActBottleneck" else block.conv2
    torch.nn.init.zeros_(last_conv.weight)
    x = torch.randn(4, 64, 8, 8)
    assert (x < 0).any()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    norms_and_activations = [m for m in block.children() if not isinstance(m, (torch.nn.Conv2d, torch.nn.Identity))]
    assert all(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in norms_and_activations)


def test_post_activation_block_is_not_an_identity_when_its_branch_is_zero(lesson02):
    """The contrast: lesson 02's (post-activation) block applies a ReLU after the addition."""
    block = lesson02.BasicBlock(64, 64).eval()
    torch.nn.init.zeros_(block.bn2.weight)
    x = torch.randn(4, 64, 8, 8)
    assert not torch.allclose(block(x), x)
    torch.testing.assert_close(block(x), F.relu(x))


def test_preact_projection_reads_the_preactivated_input(lesson04):
    block = lesson04.PreActBlock(16, 32, stride=2)
    assert block.shortcut is not None and block.shortcut.stride == (2, 2)
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)


def test_wide_resnet_dropout_sits_between_the_convolutions(lesson04):
    model = lesson04.wide_resnet(16, 2, dropout=0.3)
    unit = model.layer1[0]
    assert isinstance(unit.dropout, torch.nn.Dropout) and unit.dropout.p == 0.3
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: dropout off
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # train: dropout on


def test_densenet_concatenates_growth_rate_channels_per_layer(lesson04):
    block = lesson04.DenseBlock(num_layers=3, in_channels=24, growth_rate=12)
    x = torch.randn(2, 24, 8, 8)
    out = block(x)
    assert out.shape == (2, 24 + 3 * 12, 8, 8)
    torch.testing.assert_close(out[:, :24], x)  # the block's input is passed on unchanged


def test_invalid_depths_are_user_errors(lesson04):
    helpers = lesson04.helpers
    with pytest.raises(helpers.UserError):
        lesson04.wide_resnet(27, 10)
    with pytest.raises(helpers.UserError):
        lesson04.preact_resnet(165)
    with pytest.raises(helpers.UserError):
        lesson04.densenet_bc(101)


def test_preact_gradients_at_initialisation_do_not_vanish(lesson04):
    """The 164-layer version of the 1001-layer check (which is slow-marked below)."""
    result = lesson04.deep_gradient_check(164, batch=2, seed=0, device=torch.device("cpu"))
    assert result["units"] == 54 and result["weighted_layers"] == 164 + 3  # + 3 projection shortcuts
    assert result["all_finite"]
    assert result["grad_rms_min"] > 0
    assert result["grad_rms_first_unit"] > result["grad_rms_last_unit"]  # it grows on the way back


@pytest.mark.slow
def test_1001_layer_preact_forward_backward(lesson04):
    result = lesson04.deep_gradient_check(1001, batch=2, seed=0, device=torch.device("cpu"))
    assert result["units"] == 333 and result["weighted_layers"] == 1004
    assert result["all_finite"] and math.isfinite(result["loss"])
    assert result["grad_rms_first_unit"] > result["grad_rms_last_unit"] > 0


def test_bad_flag_is_a_one_line_error(tmp_path):
    result = run_script("04_residual_variants.py", "--train-steps", "0", "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == "error: --train-steps must be > 0 (got 0)\n"


@pytest.mark.slow
def test_default_run_matches_the_lesson_card(tmp_path):
    """The default run, as the card describes it; timing claims are checked as ratios with margins."""
    result = run_script("04_residual_variants.py", "--out", str(tmp_path), timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["parameter_mismatches"] == []
    assert results["grouped_conv_equivalence"]["max_abs_difference"] < 1e-5
    se = results["squeeze_excitation"]
    assert 0.40 < se["gate_min"] < se["gate_max"] < 0.60 and 0.02 < se["output_relative_change"] < 0.10
    deep = results["deep_preact"]
    assert deep["units"] == 333 and deep["all_finite"] and abs(deep["loss"] - 2.50) < 0.1
    assert deep["grad_ratio_first_to_last"] > 1e4  # grows on the way back: nothing vanishes
    g = deep["grad_rms_per_unit"]
    assert 10 < g[0] / g[10] < 100 and 2 < g[50] / g[110] < 5  # steep at the start of stage 1, flat later
    rows = {r["model"]: r for r in results["variants"]}
    assert rows["preact_resnet164"]["activation_mb"] > 2.5 * rows["resnet110"]["activation_mb"]
    assert rows["densenet_bc_100_12"]["activation_mb"] > 1.2 * rows["preact_resnet164"]["activation_mb"]
    mac_ratio = rows["wrn_16_8"]["gmacs"] / rows["preact_resnet164"]["gmacs"]
    assert rows["wrn_16_8"]["train_step_ms"] / rows["preact_resnet164"]["train_step_ms"] < mac_ratio / 2
    assert rows["resnext50_32x4d"]["train_step_ms"] > rows["resnet50"]["train_step_ms"]
    # README: SE's step is slower than ResNet-50's (6-21% in three runs; medians of 5 at batch 1)
    assert rows["se_resnet50"]["train_step_ms"] > rows["resnet50"]["train_step_ms"]
    for r in rows.values():  # the table agrees with itself: a forward pass is faster than a training step
        assert r.get("forward_ms") is None or r["forward_ms"] < r["train_step_ms"]
    assert abs(rows["se_resnet50"]["gmacs"] / rows["resnet50"]["gmacs"] - 1) < 0.002
    training = {r["model"]: r for r in results["training"]["rows"]}
    assert set(training) == {
        "resnet20",
        "preact_resnet20",
        "se_resnet20",
        "wrn_16_2",
        "densenet_bc_40_12",
    }
    assert all(r["test_err"] < 0.75 for r in training.values())  # every model learned something (chance: 90%)


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_same_seed_same_model_as_torchvision(lesson04, name):
    """torchvision's own protocol: seed, build, compare. The grouped bottleneck is built with its final
    shapes (torchvision's arguments), so the random initialisation draws the same numbers in the same order."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    torch.manual_seed(0)
    ours = (lesson04.resnet50 if name == "resnet50" else getattr(lesson04, name))().eval()
    for (key, expected), (_, actual) in zip(reference.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(actual, expected), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
