"""Lesson 01: the residual block's shapes and shortcuts, the fully connected example, the depth-sweep facts
the lesson card states, the Jacobian "+1", zero_init_residual, results.json and the command line."""

import json

import pytest
import torch
import torch.nn as nn
from conftest import run_script

import helpers

SCRIPT = "01_basic_residual_block.py"


@pytest.fixture(autouse=True)
def one_thread(lesson01):
    """These tensors are tiny: extra threads only wait on each other (badly so on a shared 2-core machine)."""
    with lesson01.one_cpu_thread():
        yield


@pytest.fixture(scope="module")
def cfg(lesson01):
    return helpers.config(vars(lesson01), {})


# --- blocks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "in_channels, out_channels, stride", [(8, 8, 1), (8, 16, 1), (8, 16, 2), (8, 8, 2), (16, 8, 1)]
)
@pytest.mark.parametrize("side", [8, 7])
def test_block_output_shape(lesson01, in_channels, out_channels, stride, side):
    x = torch.randn(2, in_channels, side, side)
    expected = (2, out_channels, (side - 1) // stride + 1, (side - 1) // stride + 1)  # 3x3 pad 1 / 1x1 pad 0
    for block in (
        lesson01.ResidualBlock(in_channels, out_channels, stride),
        lesson01.PlainBlock(in_channels, out_channels, stride),
    ):
        assert block(x).shape == expected


@pytest.mark.parametrize("in_channels, out_channels, stride", [(8, 8, 1), (8, 16, 1), (8, 16, 2), (8, 8, 2)])
def test_projection_exactly_when_shapes_differ(lesson01, in_channels, out_channels, stride):
    block = lesson01.ResidualBlock(in_channels, out_channels, stride)
    shapes_differ = stride != 1 or in_channels != out_channels
    assert (block.downsample is not None) == shapes_differ
    if shapes_differ:
        conv, norm = block.downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride) and conv.out_channels == out_channels
        assert isinstance(norm, nn.BatchNorm2d)
    else:  # identity shortcut: forward is relu(F(x) + x) with no extra parameters
        x = torch.randn(2, in_channels, 6, 6)
        assert torch.allclose(block(x), torch.relu(block.branch(x) + x))
        assert helpers.count_parameters(block) == helpers.count_parameters(
            lesson01.PlainBlock(in_channels, in_channels)
        )


def test_torchvision_names_and_equivalence(lesson01):
    """Same attribute names and the same function as torchvision's BasicBlock (lesson 02 relies on it)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    ours = lesson01.ResidualBlock(8, 16, 2)
    theirs = BasicBlock(8, 16, 2, downsample=lesson01.projection_shortcut(8, 16, 2))
    theirs.load_state_dict(ours.state_dict())  # strict: identical names and shapes
    x = torch.randn(4, 8, 10, 10)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_trace_shapes_of_the_stride_2_block(lesson01):
    block = lesson01.ResidualBlock(64, 128, 2).eval()
    rows = lesson01.trace_block(block, torch.randn(2, 64, 16, 16))  # checks itself against block(x)
    shapes = {r["stage"]: r["shape"] for r in rows}
    assert shapes["input x"] == (2, 64, 16, 16)
    assert shapes["branch conv1"] == (2, 128, 8, 8)
    assert shapes["shortcut bn = W_s x"] == (2, 128, 8, 8)
    assert rows[-1]["shape"] == (2, 128, 8, 8)
    identity_rows = lesson01.trace_block(lesson01.ResidualBlock(8, 8).eval(), torch.randn(1, 8, 4, 4))
    assert "shortcut = x" in [r["stage"] for r in identity_rows]


# --- fully connected version ------------------------------------------------------------------------------
def test_shortcut_counts(lesson01):
    x = torch.randn(4, 128)
    counts = {}
    for mode in lesson01.SHORTCUT_MODES:
        net = lesson01.FullyConnectedNet((128, 64, 32, 16, 8, 1), mode)
        net(x)
        counts[mode] = net.shortcuts_applied
    assert counts == {"none": 0, "when-shapes-match": 0, "projection": 5}
    net = lesson01.FullyConnectedNet((16, 16, 16, 4), "when-shapes-match")  # two layers keep the width
    net(torch.randn(4, 16))
    assert net.shortcuts_applied == 2
    projected = lesson01.FullyConnectedNet((16, 16, 16, 4), "projection")
    assert [isinstance(p, nn.Linear) for p in projected.projections] == [False, False, True]


def test_when_shapes_match_is_the_plain_net(lesson01):
    x = torch.randn(4, 128)
    outputs = []
    for mode in ("none", "when-shapes-match"):
        torch.manual_seed(0)
        outputs.append(lesson01.FullyConnectedNet((128, 64, 32, 16, 8, 1), mode)(x))
    assert torch.equal(*outputs)


def test_fully_connected_gradients(lesson01, cfg):
    """Card: projections give the first layer 16x the plain net's gradient (2.9e-3 vs 1.8e-4)."""
    result = lesson01.fully_connected_gradients(cfg, torch.device("cpu"))
    first = result["rows"][0]
    assert first["when-shapes-match"] == first["none"]
    assert 10 < first["projection"] / first["none"] < 25
    assert first["projection"] == pytest.approx(2.9e-3, rel=0.1) and first["none"] == pytest.approx(1.8e-4, rel=0.1)
    assert all(row["projection"] > row["none"] for row in result["rows"][:-1])


# --- depth sweep ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(lesson01, cfg):
    small = helpers.Config({**cfg, "sweep_depths": (8, 16, 32), "sweep_repeats": 1})
    with lesson01.one_cpu_thread():  # a module fixture runs before the function-scoped one_thread fixture
        result = lesson01.depth_sweep(small, torch.device("cpu"))
    return {(r["init"], r["norm"], r["stack"]): r for r in result["rows"]}


def test_without_norm_plain_vanishes_residual_stays_near_one(sweep):
    plain, residual = sweep[("pytorch", "none", "plain")], sweep[("pytorch", "none", "residual")]
    assert plain["N=8"] < 1e-4 and plain["N=16"] < 1e-9  # measured 3e-7 and 5e-14
    assert all(0.3 < residual[f"N={n}"] < 3 for n in (8, 16, 32))  # measured 0.7 to 1.1


def test_with_batch_norm_plain_gradients_grow(sweep):
    for init in ("pytorch", "he"):
        plain, residual = sweep[(init, "batch norm", "plain")], sweep[(init, "batch norm", "residual")]
        assert plain["N=16"] > 30 and plain["N=32"] > 2e3  # measured 1.3e2-1.4e2 and 1.4e4-1.6e4
        assert 5 < residual["N=32"] < 100  # measured 21-22
        assert plain["N=32"] / residual["N=32"] > 100


def test_he_init_without_norm(sweep):
    assert sweep[("he", "none", "residual")]["N=16"] > 30  # measured 190: every block doubles the variance
    assert sweep[("he", "none", "residual")]["N=32"] > 1e3  # measured 2e5
    assert sweep[("he", "none", "plain")]["N=32"] < 1  # measured 0.16


# --- the "+1" and zero-init -------------------------------------------------------------------------------
def test_jacobian_is_branch_plus_identity(lesson01, cfg):
    result = lesson01.jacobian_check(cfg)
    assert result["max_abs_error_plus_identity"] < 1e-12
    assert result["max_abs_error_with_relu"] < 1e-12
    assert result["mean_diagonal_sum"] - result["mean_diagonal_branch"] == pytest.approx(1.0)


def test_jacobian_identity_independently(lesson01):
    """Finite differences, not autograd: (f(x + h e_i) - f(x - h e_i)) / 2h for the block before its ReLU."""
    torch.manual_seed(1)
    block = lesson01.ResidualBlock(2, 2).double().eval()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    h = 1e-6
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        d_sum = (block.branch(x + e) + (x + e) - block.branch(x - e) - (x - e)) / (2 * h)
        d_branch = (block.branch(x + e) - block.branch(x - e)) / (2 * h)
        assert torch.allclose(d_sum - d_branch, e / h, atol=1e-6)


def test_zero_init_residual_is_identity(lesson01, cfg):
    rows = lesson01.zero_init_check(cfg, torch.device("cpu"))
    by_key = {(r["block"], r["bn2 gamma"]): r for r in rows}
    assert by_key[("16->16, stride 1", "zero")]["max |y - that|"] == 0
    assert by_key[("16->16, stride 1", "one (default)")]["max |y - that|"] > 0.5
    assert by_key[("16->32, stride 2", "zero")]["max |y - that|"] == 0  # relu(W_s x): not the identity
    # and the real thing: torchvision's zero_init_residual zeroes the same parameter
    block = lesson01.ResidualBlock(8, 8)
    nn.init.zeros_(block.bn2.weight)
    x = torch.relu(torch.randn(3, 8, 5, 5))
    assert torch.equal(block(x), x)


# --- results.json and the command line --------------------------------------------------------------------
def test_main_writes_results(lesson01, tmp_path):
    results = lesson01.main(
        out=str(tmp_path),
        trace_input_shape=(2, 8, 8, 8),
        trace_out_channels=16,
        sweep_depths=(1, 4),
        sweep_repeats=1,
        sweep_inits=("pytorch",),
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "depth_sweep.png").stat().st_size > 1000
    for key in ("trace", "fully_connected", "depth_sweep", "jacobian", "zero_init_residual", "runtime_s", "seed"):
        assert key in saved
    assert saved["trace"]["output_shape"] == [2, 16, 4, 4] and saved["trace"]["has_projection"]
    assert saved["fully_connected"]["shortcuts_applied"] == {"none": 0, "when-shapes-match": 0, "projection": 5}
    assert saved["depth_sweep"]["depths"] == [1, 4] and len(saved["depth_sweep"]["rows"]) == 4
    assert saved["depth_sweep"]["rows"][0]["n_4"] == pytest.approx(results["depth_sweep"]["rows"][0]["N=4"])
    assert saved["config"]["sweep_inits"] == ["pytorch"]


def test_help_lists_the_constants():
    done = run_script(SCRIPT, "--help", timeout=60)
    assert done.returncode == 0
    for flag in ("--trace-input-shape", "--mlp-sizes", "--sweep-depths", "--sweep-inits", "--no-trace", "--seed"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    "args, code",
    [
        (["--sweep-repeats", "0"], 1),
        (["--mlp-sizes", "128"], 1),
        (["--sweep-inits", "xavier"], 1),  # checked against the declaration: one error line, like a range
    ],
)
def test_bad_flag_values(args, code, tmp_path):
    done = run_script(SCRIPT, "--out", str(tmp_path), *args, timeout=60)
    assert done.returncode == code
    assert "Traceback" not in done.stderr
    if code == 1:
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


@pytest.mark.slow
def test_default_run_matches_the_lesson_card(tmp_path):
    done = run_script(SCRIPT, "--out", str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["trace"]["output_shape"] == [32, 128, 28, 28]
    first = saved["fully_connected"]["rows"][0]
    assert 10 < first["projection"] / first["none"] < 25
    rows = {(r["init"], r["norm"], r["stack"]): r for r in saved["depth_sweep"]["rows"]}
    assert rows[("pytorch", "none", "plain")]["n_8"] < 1e-5 and rows[("pytorch", "none", "plain")]["n_32"] == 0
    assert all(0.3 < v < 3 for k, v in rows[("pytorch", "none", "residual")].items() if k.startswith("n_"))
    assert rows[("he", "none", "plain")]["n_64"] < 1e-2
    assert rows[("he", "none", "residual")]["n_64"] > 1e8
    for init in ("pytorch", "he"):
        assert 3e1 < rows[(init, "batch norm", "plain")]["n_16"] < 1e3
        assert 1e7 < rows[(init, "batch norm", "plain")]["n_64"] < 1e10
        assert 20 < rows[(init, "batch norm", "residual")]["n_64"] < 100
    assert saved["jacobian"]["max_abs_error_plus_identity"] < 1e-12
