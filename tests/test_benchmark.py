"""The training benchmark: every setting timed in interleaved repeats, ratios and MFU reported."""

import json

import pytest

from tfmstep import benchmark


def test_interleaved_timing_takes_one_repeat_of_every_setting_per_round():
    calls = []

    def runner(name, rate):
        def run():
            calls.append(name)
            return rate
        return run

    timings = benchmark.time_interleaved({"a": runner("a", 10.0), "b": runner("b", 30.0)}, repeats=3)
    assert calls == ["a", "b"] * 4  # an untimed warm-up round, then 3 timed ones
    assert [(t.name, t.examples_per_second, t.spread) for t in timings] == [("a", 10.0, 0.0), ("b", 30.0, 0.0)]


def test_training_benchmark_reports_every_setting_ratios_and_mfu(tmp_path):
    entry = benchmark.benchmark_training("cnn_classifier", preset="tiny", batch_size=8, steps=2, repeats=2,
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
    markdown = benchmark.write_report({"training": [entry], "peak_matmul_flops": 1e12}, str(tmp_path), "cmd")
    assert "cnn_classifier" in markdown and "MFU" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["training"][0]["model"] == "cnn_classifier"
