"""Lesson 02: the lesson's ResNets are torchvision's and the paper's, by weights, counts and structure."""

import json
import pickle
import urllib.error

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision
from conftest import run_script

import helpers

IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
CIFAR_PARAMS_OPTION_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51}
PAPER_TABLE1_V1 = {"resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}  # He et al. 2015, Table 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests check counts and equalities, not speed: one thread keeps them fast on a shared CPU,
    where two OpenMP threads competing with other jobs can run 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


def blocks(model):
    """The residual (or plain) blocks of a model, stage by stage."""
    return [block for stage in model.children() if isinstance(stage, nn.Sequential) for block in stage]


# --- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IMAGENET_PARAMS)
def test_imagenet_parameter_counts(lesson02, name):
    assert helpers.count_parameters(meta(lesson02.IMAGENET_MODELS[name])) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("depth", CIFAR_PARAMS_OPTION_A)
def test_cifar_parameter_counts(lesson02, depth):
    assert helpers.count_parameters(meta(lesson02.cifar_resnet, depth)) == CIFAR_PARAMS_OPTION_A[depth]
    if depth > 110:
        return  # building ResNet-1202 twice more adds seconds and tests nothing new
    # Option A adds nothing to the plain net; option B adds two projections with batch norm.
    assert helpers.count_parameters(meta(lesson02.cifar_resnet, depth, plain=True)) == CIFAR_PARAMS_OPTION_A[depth]
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert helpers.count_parameters(meta(lesson02.cifar_resnet, depth, shortcut="B")) == (
        CIFAR_PARAMS_OPTION_A[depth] + projections
    )


def test_cifar_resnet18_parameter_count_and_stem(lesson02):
    model = lesson02.cifar_resnet18()
    assert helpers.count_parameters(model) == 11_173_962
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"
    ]  # fmt: skip
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


CIFAR_STEM_PARAMS = {  # 10 classes; the counts of kuangliu/pytorch-cifar's ResNet18 ... ResNet152
    "cifar_resnet18": 11_173_962,
    "cifar_resnet34": 21_282_122,
    "cifar_resnet50": 23_520_842,
    "cifar_resnet101": 42_512_970,
    "cifar_resnet152": 58_156_618,
}


@pytest.mark.parametrize("name", list(CIFAR_STEM_PARAMS))
def test_cifar_stem_family_parameter_counts(lesson02, name):
    model = meta(lesson02.CIFAR_MODELS[name], 10)
    assert helpers.count_parameters(model) == CIFAR_STEM_PARAMS[name]
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)


def test_cifar_models_interface(lesson02):
    assert set(lesson02.CIFAR_MODELS) == {"resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} | set(
        CIFAR_STEM_PARAMS
    )
    for name, build in lesson02.CIFAR_MODELS.items():
        model = meta(build, 100)
        assert model.fc.out_features == 100, name
    children = [n for n, _ in lesson02.cifar_resnet(20).named_children()]
    assert children == ["conv1", "bn1", "layer1", "layer2", "layer3", "avgpool", "fc"]


# --- torchvision equivalence --------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> None:
    """Give every parameter and batch-norm buffer distinct random values, so that a layer loaded into the
    wrong place (two batch norms swapped, say) changes the output; at initialisation all BNs are equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.75, 1.25, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.75, 1.25, generator=g)


@pytest.mark.parametrize("name", IMAGENET_PARAMS)
def test_torchvision_state_dict_loads_strictly_and_outputs_match(lesson02, name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()  # random initialisation, no download
    randomise(reference, seed=1)
    ours = lesson02.IMAGENET_MODELS[name]().eval()
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.std() > 0.01  # a real signal, not a collapsed output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # And the other way round: our state_dict is torchvision's, name for name and shape for shape.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_v1_bottleneck_does_not_match_torchvision(lesson02):
    """The equivalence test can fail: moving the stride to the first 1x1 keeps every shape, changes outputs."""
    reference = torchvision.models.resnet50(weights=None).eval()
    randomise(reference, seed=1)
    v1 = lesson02.resnet50(bottleneck_stride="1x1").eval()
    v1.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (v1(x) - reference(x)).abs().max() > 1e-3


# --- counts the names and the papers promise ------------------------------------------------------------
@pytest.mark.parametrize(
    "name, depth",
    [(n, int(n[6:])) for n in IMAGENET_PARAMS] + [(f"cifar-resnet{d}", d) for d in CIFAR_PARAMS_OPTION_A]
    + [("cifar-resnet18", 18)],
)  # fmt: skip
def test_weighted_layer_count_equals_the_name(lesson02, name, depth):
    build, _ = lesson02.MEASURED_MODELS[name]
    model = meta(build)
    assert lesson02.layers_on_main_path(model) == depth
    projections = sum(1 for n, _ in helpers.weighted_layers(model) if "downsample" in n)
    assert len(helpers.weighted_layers(model)) == depth + projections  # only projections are left out


@pytest.mark.parametrize("name", PUBLISHED_GMACS)
def test_multiply_adds_match_torchvision_published(lesson02, name):
    gmacs = lesson02.multiply_adds(meta(lesson02.IMAGENET_MODELS[name]), (1, 3, 224, 224)) / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


def test_meta_count_equals_real_count(lesson02):
    """Counting on the meta device (no storage, no arithmetic) gives the same number as a real pass."""
    real = helpers.count_multiply_adds(lesson02.resnet18(), (1, 3, 64, 64))
    assert lesson02.multiply_adds(meta(lesson02.resnet18), (1, 3, 64, 64)) == real


@pytest.mark.parametrize("name", PAPER_TABLE1_V1)
def test_stride_placement(lesson02, name):
    v1 = meta(lesson02.IMAGENET_MODELS[name], bottleneck_stride="1x1")
    v15 = meta(lesson02.IMAGENET_MODELS[name])
    for stage in ("layer2", "layer3", "layer4"):
        first_v1, first_v15 = getattr(v1, stage)[0], getattr(v15, stage)[0]
        assert (first_v1.conv1.stride, first_v1.conv2.stride) == ((2, 2), (1, 1))
        assert (first_v15.conv1.stride, first_v15.conv2.stride) == ((1, 1), (2, 2))
    gmacs_v1 = lesson02.multiply_adds(v1, (1, 3, 224, 224)) / 1e9
    gmacs_v15 = lesson02.multiply_adds(v15, (1, 3, 224, 224)) / 1e9
    assert gmacs_v1 == pytest.approx(PAPER_TABLE1_V1[name], rel=0.02)  # the paper counted v1
    predicted = (256 * 128 * 56 * 56 + 512 * 256 * 28 * 28 + 1024 * 512 * 14 * 14) * 3 / 4 / 1e9
    assert gmacs_v15 - gmacs_v1 == pytest.approx(predicted, rel=1e-6)


# --- shortcuts ----------------------------------------------------------------------------------------
def test_option_a_is_parameter_free_and_zero_pads(lesson02):
    model = lesson02.cifar_resnet(20, shortcut="A")
    shortcuts = [m for m in model.modules() if isinstance(m, lesson02.ShortcutA)]
    assert len(shortcuts) == 2  # the first block of stages 2 and 3
    assert all(helpers.count_parameters(s) == 0 and not list(s.buffers()) for s in shortcuts)
    assert [b.downsample for b in blocks(model) if b.downsample is not None] == shortcuts
    x = torch.randn(2, 16, 32, 32)
    y = lesson02.ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 16:]) == 0
    pickle.loads(pickle.dumps(model))  # a named module, not a lambda: the model pickles


def test_option_b_projects(lesson02):
    model = lesson02.cifar_resnet(20, shortcut="B")
    projections = [b.downsample for b in blocks(model) if b.downsample is not None]
    assert len(projections) == 2
    assert all(isinstance(p[0], nn.Conv2d) and p[0].kernel_size == (1, 1) for p in projections)


def count_additions(model: nn.Module) -> int:
    """Tensor additions in the traced forward graph of `model` (torch.fx records every `a + b`)."""
    graph = torch.fx.symbolic_trace(model).graph
    adds = {"add", "add_", "__add__", "__iadd__"}
    return sum(
        1
        for node in graph.nodes
        if (node.op == "call_function" and getattr(node.target, "__name__", "") in adds)
        or (node.op == "call_method" and node.target in adds)
    )


@pytest.mark.parametrize("depth", [20, 56])
def test_plain_network_has_no_shortcut_additions(lesson02, depth):
    n = (depth - 2) // 6
    assert count_additions(lesson02.cifar_resnet(depth)) == 3 * n  # one per residual block
    assert count_additions(lesson02.cifar_resnet(depth, shortcut="B")) == 3 * n
    plain = lesson02.cifar_resnet(depth, plain=True)
    assert count_additions(plain) == 0
    assert all(getattr(b, "downsample", None) is None for b in blocks(plain))
    # Same layers, same shapes, same parameter count: only the shortcuts are gone.
    residual = lesson02.cifar_resnet(depth)
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in residual.named_parameters()]


def test_plain_network_output_is_not_the_residual_one(lesson02):
    """With identical weights, removing the shortcuts changes the function (so `plain` is not a no-op)."""
    torch.manual_seed(0)
    residual = lesson02.cifar_resnet(20).eval()
    plain = lesson02.cifar_resnet(20, plain=True).eval()
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (plain(x) - residual(x)).abs().max() > 1e-3


# --- every block has its batch norms -------------------------------------------------------------------
@pytest.mark.parametrize("name", [*IMAGENET_PARAMS, "cifar-resnet20", "cifar-resnet18"])
def test_every_convolution_is_followed_by_its_batch_norm(lesson02, name):
    model = meta(lesson02.MEASURED_MODELS[name][0])
    all_blocks = blocks(model)
    assert len(all_blocks) == sum(int(k) for k in lesson02.blocks_per_stage(model).split("/"))
    for block in all_blocks:
        pairs = [("conv1", "bn1"), ("conv2", "bn2")] + ([("conv3", "bn3")] if hasattr(block, "conv3") else [])
        for conv_name, bn_name in pairs:
            conv, bn = getattr(block, conv_name), getattr(block, bn_name)
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
        if isinstance(block.downsample, nn.Sequential):  # projection: conv then its batch norm
            conv, bn = block.downsample
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        assert conv.bias is None  # the batch norm's shift makes a bias redundant


# --- initialisation ------------------------------------------------------------------------------------
def test_initialisation_matches_torchvision_scheme(lesson02):
    torch.manual_seed(0)
    model = lesson02.resnet50()
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)  # Kaiming, fan_out, ReLU
    assert all(
        torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    plain = lesson02.cifar_resnet(20, plain=True)
    assert plain.layer2[0].conv1.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("build", ["resnet18", "resnet50", "cifar20"])
def test_zero_init_residual_makes_identity_blocks_exact_identities(lesson02, build):
    builders = {"resnet18": lesson02.resnet18, "resnet50": lesson02.resnet50}
    make = builders.get(build, lambda **kw: lesson02.cifar_resnet(20, **kw))
    x = torch.randn(2, 3, 32, 32) if build == "cifar20" else torch.randn(2, 3, 64, 64)
    for zero_init in (False, True):
        model = make(zero_init_residual=zero_init).train()
        moved = []
        for block in blocks(model):
            if block.downsample is None:
                block.register_forward_hook(
                    lambda _b, args, out, moved=moved: moved.append(not torch.equal(out, args[0]))
                )
        with torch.no_grad():
            model(x)
        assert len(moved) > 0 and moved == [not zero_init] * len(moved)
        if zero_init:
            assert all(torch.all(b.last_bn.weight == 0) for b in blocks(model))


def test_zero_init_table_counts(lesson02):
    cfg = helpers.config(vars(lesson02), {})
    rows = lesson02.zero_init_table(cfg)
    assert [(r["blocks"], r["exact identities"]) for r in rows] == [(12, 0), (12, 12)]
    assert rows[0]["mean |y-x|/|x|"] > 0.3 and rows[1]["mean |y-x|/|x|"] == 0


# --- the 32x32 stem ----------------------------------------------------------------------------------
def test_imagenet_stem_on_32x32_leaves_1x1_maps(lesson02):
    rows = {r["stem"].split(":")[0]: r for r in lesson02.stem_table()}
    imagenet, cifar = rows["ImageNet stem"], rows["CIFAR stem"]
    assert (imagenet["layer1 map"], imagenet["layer4 map"]) == ("8x8", "1x1")
    assert (cifar["layer1 map"], cifar["layer4 map"]) == ("32x32", "4x4")
    assert imagenet["layer4 taps on data"] == pytest.approx(1 / 9)
    assert cifar["MMACs"] / imagenet["MMACs"] == pytest.approx(15, rel=0.05)


# --- the run as a user runs it ---------------------------------------------------------------------------
def test_measure_latency_repeats_within_budget(lesson02):
    models = [lesson02.cifar_resnet(20), lesson02.cifar_resnet(8)]
    timings = lesson02.measure_latency(models, (2, 3, 32, 32), torch.device("cpu"), seconds=0.05)
    assert all(t["ms"] > 0 and t["repeats"] >= 3 for t in timings)  # at least 3 passes each, in turns
    assert [t["repeats"] for t in lesson02.measure_latency(models, (2, 3, 32, 32), torch.device("cpu"), 0)] == [1, 1]


def test_bad_flags_are_user_errors(lesson02, tmp_path):
    with pytest.raises(helpers.UserError, match="latency-seconds"):
        lesson02.main(latency_seconds=-1, out=str(tmp_path))
    with pytest.raises(helpers.UserError, match="--image"):
        lesson02.main(pretrained=True, image=str(tmp_path / "missing.jpg"), out=str(tmp_path))
    result = run_script("02_resnet_implementation.py", "--shape-model", "resnet9", "--out", str(tmp_path))
    assert result.returncode == 1 and result.stderr.startswith("error: --shape-model must be one of resnet18, ")


def test_pretrained_without_network_prints_one_notice(lesson02, monkeypatch, tmp_path, capsys):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # the network call inside torch.hub
    result = lesson02.classify_with_pretrained("resnet18", lesson02.default_sample_image())
    out = capsys.readouterr()
    assert result["loaded"] is False and "Name or service not known" in result["reason"]
    assert out.out.count("NOTICE") == 1 and len(out.out.strip().splitlines()) == 1 and not out.err


def cached_weights(tmp_path, monkeypatch, write):
    """torchvision's resnet18 weights entry, pointed at a file in a private torch hub cache named as torch.hub names
    it (the start of the file's SHA-256 in its name), holding what `write(path)` put there."""
    import dataclasses
    import hashlib

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    draft = checkpoints / "draft"
    write(draft)
    prefix = hashlib.sha256(draft.read_bytes()).hexdigest()[:8]
    draft.rename(checkpoints / f"resnet18-{prefix}.pth")
    real = torchvision.models.ResNet18_Weights.DEFAULT
    fake = dataclasses.replace(real.value, url=f"https://download.invalid/models/resnet18-{prefix}.pth")

    class Weights:
        DEFAULT = type(
            "Entry", (), {"url": fake.url, "name": real.name, "meta": real.meta, "transforms": real.transforms}
        )

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: Weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return checkpoints / f"resnet18-{prefix}.pth"


def test_cached_weights_load_strictly_with_their_hash_checked(lesson02, tmp_path, monkeypatch):
    """--pretrained without a network: the cached file's hash is checked like a download's, then it is loaded with
    weights_only=True into the lesson's model, strictly, and classifies like torchvision's own model."""
    cached_weights(
        tmp_path, monkeypatch, lambda p: torch.save(torchvision.models.resnet18(weights=None).state_dict(), p)
    )
    result = lesson02.classify_with_pretrained("resnet18", lesson02.default_sample_image())
    assert result["loaded"] is True and result["max_prob_difference_vs_torchvision"] < 1e-5


def test_a_planted_or_damaged_cached_file_is_one_line_and_never_unpickled(lesson02, tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    cached = cached_weights(tmp_path, monkeypatch, lambda p: torch.save({"fc.weight": Exploit()}, p))
    with pytest.raises(
        helpers.UserError, match=r"cannot load .*resnet18-.*\.pth: .*\(delete it to download it again\)"
    ):
        lesson02.classify_with_pretrained("resnet18", lesson02.default_sample_image())
    assert not (tmp_path / "pwned").exists()
    cached.write_bytes(cached.read_bytes() + b"tampered")  # its hash no longer matches its name
    with pytest.raises(helpers.UserError, match=r"is not torchvision's resnet18 weights: its SHA-256 starts"):
        lesson02.classify_with_pretrained("resnet18", lesson02.default_sample_image())


def test_default_run_shows_what_the_card_states(tmp_path, monkeypatch):
    """The whole lesson as a user runs it (latency skipped to save time): results.json holds the card's numbers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # counts do not depend on threads; a shared CPU runs this faster
    result = run_script("02_resnet_implementation.py", "--no-measure-latency", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "resnet_family.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "out" / "results.json").read_text())

    # The facts the lesson card states.
    imagenet = {r["model"]: r for r in results["imagenet_models"]}
    for name, params in IMAGENET_PARAMS.items():
        assert imagenet[name]["params"] == params
        assert imagenet[name]["layers"] == int(name[6:])
        assert abs(imagenet[name]["off"]) < 0.0005  # "off %" in the table: saved as a fraction
    cifar = {r["model"]: r for r in results["cifar_models"]}
    assert [cifar[f"cifar-resnet{d}"]["params"] for d in CIFAR_PARAMS_OPTION_A] == list(CIFAR_PARAMS_OPTION_A.values())
    assert cifar["cifar-resnet18"]["params"] == 11_173_962
    stride = {r["model"]: r for r in results["stride_placement"]["rows"]}
    assert round(stride["resnet50"]["v1"], 3) == 3.858 and round(stride["resnet50"]["v1_5"], 3) == 4.089
    assert all(round(r["v1_5_minus_v1"], 3) == 0.231 for r in stride.values())
    stages = {r["module"]: r for r in results["stage_shapes"]["rows"]}
    assert stages["layer3"]["output_shape"] == "1x1024x14x14" and stages["layer4"]["output_shape"] == "1x2048x7x7"
    assert max(stages.values(), key=lambda r: r["mmacs"])["module"] == "layer3"
    assert max(stages.values(), key=lambda r: r["params"])["module"] == "layer4"
    assert round(stages["layer3"]["mmacs"]) == 1464 and round(stages["layer4"]["params"] / 1e6, 1) == 15.0
    assert [r["params"] for r in results["block_comparison"]] == [73_984, 70_400, 1_180_672]
    assert [round(r["mmacs"]) for r in results["block_comparison"]] == [231, 218, 3699]
    assert [r["exact_identities"] for r in results["zero_init_residual"]] == [0, 12]
    assert results["zero_init_residual"][0]["mean_y-x_over_x"] == pytest.approx(0.64, abs=0.01)
    assert [r["layer4_map"] for r in results["stem_on_32x32"]] == ["1x1", "4x4"]
    assert [round(r["mmacs"], 1) for r in results["stem_on_32x32"]] == [37.0, 555.4]


@pytest.mark.slow
def test_latency_tables_agree_with_themselves(tmp_path):
    """The default run's timings (the fastest of repeated passes): within each family the deeper net is slower, at
    every batch size. Two default runs on the 2-core AMD EPYC gave the same order."""
    result = run_script("02_resnet_implementation.py", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    for family, names in (("imagenet_models", list(IMAGENET_PARAMS)),
                          ("cifar_models", [f"cifar-resnet{d}" for d in (20, 32, 44, 56, 110)])):  # fmt: skip
        rows = {r["model"]: r for r in results[family]}
        for batch in results["config"]["latency_batch_sizes"]:
            times = [rows[name][f"ms_at_{batch}"] for name in names]
            assert times == sorted(times), (family, batch, times)
