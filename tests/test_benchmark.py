"""benchmarks/pipeline_throughput.py: the ablation's rows, the alternating rounds and the measured peak."""

import dataclasses
import sys

import hostile_runner
import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import pipeline_throughput  # noqa: E402


@dataclasses.dataclass
class FakePipeline:
    """Stands in for a Pipeline: records when it ran and takes `cost` seconds per step."""

    name: str
    cost: float
    calls: list
    setting: object = None

    def __post_init__(self):
        self.setting = pipeline_throughput.Setting(self.name, True, None, False, batch_size=10)

    def seconds(self, steps: int) -> float:
        self.calls.append(self.name)
        return steps * self.cost


def test_rounds_alternate_the_order_and_give_one_rate_per_round():
    calls = []
    pipelines = [FakePipeline(name, cost, calls) for name, cost in (("a", 1.0), ("b", 0.5), ("c", 0.25))]
    rates = pipeline_throughput.side_by_side(pipelines, rounds=3, steps=2)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]  # a slow spell hits every pipeline
    assert rates == [[10.0] * 3, [20.0] * 3, [40.0] * 3]  # images/s = steps x batch / seconds


def test_ablation_adds_one_change_per_row():
    rows = pipeline_throughput.ablation_settings(128, torch.bfloat16)
    assert [(s.resident, s.amp_dtype, s.channels_last) for s in rows] == [
        (False, None, False),
        (False, torch.bfloat16, False),
        (False, torch.bfloat16, True),
        (True, torch.bfloat16, True),
    ]
    assert "no native bf16" in pipeline_throughput.ablation_settings(128, None)[1].label


def test_measured_peak_is_the_faster_of_a_gemm_and_a_convolution():
    peak, how = pipeline_throughput.measured_peak(torch.device("cpu"), torch.float32, seconds=0.05)
    assert peak > 0 and ("GEMM" in how and "conv 3x3" in how)


@pytest.mark.slow  # about 30 s: it writes a generated CIFAR-10 and builds four pipelines
def test_a_tiny_run_prints_the_ablation_and_the_ratio(tmp_path):
    args = ["--generated-if-missing", "--data-dir", str(tmp_path / "none"), "--models", "resnet8", "--steps", "1"]
    args += ["--rounds", "2", "--warmup", "0", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    args += ["--peak-gflops-fp32", "100", "--peak-gflops-bf16", "200"]  # skip the peak measurement
    status, stdout, stderr = hostile_runner.run_subprocess("benchmarks/pipeline_throughput.py", args, tmp_path, 300)
    assert status == 0, stderr
    for label in ("baseline (DataLoader + PIL", "+ autocast", "+ channels-last", "= lesson06"):
        assert label in stdout
    assert "peak float32: 100 GFLOP/s (given)" in stdout
    assert "resnet8: lesson06 / baseline = " in stdout and "median of 2 rounds" in stdout


def test_evaluation_is_timed_through_lesson_06s_own_evaluate(monkeypatch, tmp_path):
    calls = []
    real_evaluate = pipeline_throughput.helpers.evaluate

    def recording_evaluate(*args, **kwargs):
        calls.append(torch.is_inference_mode_enabled())
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pipeline_throughput.helpers, "evaluate", recording_evaluate)
    data = pipeline_throughput.helpers.load_dataset("synthetic", tmp_path, val_size=4, train_size=16, test_size=4)
    rates = pipeline_throughput.time_evaluation("resnet8", data, torch.device("cpu"), None, batch_size=4, rounds=3)
    assert calls == [False, False, True, True, False, False, True]  # a warm-up, then rounds in alternating order
    assert [len(rates["no_grad"]), len(rates["inference_mode"])] == [3, 3]
    assert all(rate > 0 for rate in rates["no_grad"] + rates["inference_mode"])
