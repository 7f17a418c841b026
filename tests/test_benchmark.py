"""The benchmark: every training setting timed in interleaved repeats, ratios and MFU reported; the
families' inference timers, read through the registry; the report."""

import dataclasses
import json

import pytest

import tfmstep
from tfmstep import registry
from tfmstep.benchmark import inference, report, suite, timing, training


def test_interleaved_timing_takes_one_repeat_of_every_setting_per_round():
    calls = []

    def runner(name, rate):
        def run():
            calls.append(name)
            return rate
        return run

    timings = timing.time_interleaved({"a": runner("a", 10.0), "b": runner("b", 30.0)}, repeats=3)
    assert calls == ["a", "b"] * 4  # an untimed warm-up round, then 3 timed ones
    assert [(t.name, t.examples_per_second, t.spread) for t in timings] == [("a", 10.0, 0.0), ("b", 30.0, 0.0)]


def test_training_benchmark_reports_every_setting_ratios_and_mfu(tmp_path):
    entry = training.benchmark_training("cnn_classifier", preset="tiny", batch_size=8, steps=2, repeats=2,
                                         peak_flops=1e12, tune_for_steps=10)
    names = [t["name"] for t in entry["timings"]]
    assert len(names) == 11 and len(set(names)) == 11
    assert names[0].startswith("tfmstep auto: family default")  # a 10-step run is too short to tune
    assert sum(n.startswith("keras fit jit=") for n in names) == 4 and "eager GradientTape loop" in names
    assert all(len(t["repeats"]) == 2 and t["examples_per_second"] > 0 for t in entry["timings"])
    auto = entry["timings"][0]["examples_per_second"]
    eager = next(t for t in entry["timings"] if t["name"].startswith("eager"))["examples_per_second"]
    assert entry["ratio_default_vs_eager"] == pytest.approx(auto / eager)
    assert entry["mfu"] == pytest.approx(entry["training_flops_per_example"] * auto / 1e12)
    markdown = report.write_report({"training": [entry], "peak_matmul_flops": 1e12}, str(tmp_path), "cmd")
    assert "cnn_classifier" in markdown and "MFU" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["training"][0]["model"] == "cnn_classifier"


@pytest.mark.parametrize("name", [n for n in tfmstep.list_models() if tfmstep.get_spec(n).inference_timer])
def test_inference_timer_hook_times_each_step_of_a_tiny_model(name):
    spec = tfmstep.get_spec(name)
    config = tfmstep.get_config(name, "tiny")
    rows = spec.inference_timer(training.fresh_model(spec, config), config, repeats=2)
    assert rows and all(r["n"] == 2 and r["mean_ms"] > 0 and r["share"] > 0 for r in rows)


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    width: int = 3


def test_inference_section_reads_the_families_hooks(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = []

    def timer(model, config):
        seen.append((model, config))
        return [{"step": "whole", "mean_ms": 1.0, "std_ms": 0.0, "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0,
                 "share": 1.0}]

    registry.register("toy_timed", config_class=_ToyConfig, loss=None, dataset=None,
                      inference_timer=timer)(lambda config: f"model of width {config.width}")
    registry.register("toy_untimed", config_class=_ToyConfig, loss=None, dataset=None)(lambda config: None)
    times = inference.inference_step_times(["toy_timed", "toy_untimed"])
    assert list(times) == ["toy_timed"] and seen == [("model of width 3", _ToyConfig())]
    markdown = report.write_report({"inference_steps": times}, str(tmp_path), "cmd")
    assert "Per-step inference time: toy_timed" in markdown and (tmp_path / "toy_timed_steps.png").exists()


def test_unknown_section_or_model_fails_before_measuring():
    with pytest.raises(tfmstep.UserError, match="unknown benchmark sections"):
        suite.run_benchmarks(["trainning"])
    with pytest.raises(tfmstep.UserError, match="unknown model"):
        suite.run_benchmarks(["training"], ["nope"])
