"""The benchmark: every training setting timed in interleaved repeats, ratios and MFU reported; the
families' inference timers, read through the registry; the report."""

import dataclasses
import json

import pytest

import tfmstep
from tfmstep import registry
from tfmstep.benchmark import inference, report, stats, suite, timing, training


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


def test_training_benchmark_reports_every_setting_with_intervals_and_mfu(tmp_path):
    entry = training.benchmark_training(
        "cnn_classifier", preset="tiny", batch_size=8, steps=2, repeats=3, peak_flops=1e12, tune_for_steps=10,
        precisions=("float32", "mixed_bfloat16"), jit_options=(False,), per_call_options=(1,),
        goals={"vs_keras_defaults": 1.3, "vs_best_keras": 1.0, "mfu": 0.8})
    names = [t["name"] for t in entry["timings"]]
    assert len(names) == 7 and len(set(names)) == 7
    assert names[0].startswith("tfmstep auto: family default")  # a 10-step run is too short to tune
    assert {t["precision"] for t in entry["timings"] if t["name"].startswith("keras fit m")} == {
        "mixed_bfloat16"}
    assert all(t["n"] == 3 and t["q1"] <= t["median"] <= t["q3"] for t in entry["timings"])
    for ratio in entry["ratios"].values():
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["verdict"] in ("win", "tie", "loss")
    auto = entry["timings"][0]
    assert entry["mfu"]["auto"]["ratio"] == pytest.approx(entry["training_flops_per_example"] * auto["median"]
                                                          / 1e12)
    assert {g["result"] for g in entry["goals"].values()} <= {"met", "not met", "unclear"}
    markdown = report.write_report({"training": [entry], "machine": suite.machine()}, str(tmp_path), "cmd")
    assert "bootstrap interval" in markdown and "MFU of auto" in markdown and "CPU flags" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["training"][0]["model"] == "cnn_classifier"


def test_ratio_is_a_win_only_when_its_whole_interval_is_above_one():
    slow = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0]
    assert stats.ratio([2 * x for x in slow], slow)["verdict"] == "win"
    assert stats.ratio(slow, [2 * x for x in slow])["verdict"] == "loss"
    noisy = stats.ratio([x * 1.02 for x in slow[::-1]], [50.0, 150.0, 100.0, 60.0, 140.0, 100.0, 90.0, 110.0])
    assert noisy["verdict"] == "tie" and noisy["low"] < 1.0 < noisy["high"]
    assert stats.meets({"ratio": 1.4, "low": 1.31, "high": 1.5}, 1.3) == "met"
    assert stats.meets({"ratio": 1.4, "low": 1.2, "high": 1.5}, 1.3) == "unclear"
    summary = stats.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (summary["median"], summary["q1"], summary["q3"]) == (3.0, 2.0, 4.0)


def test_suite_entries_read_a_recipe_model_preset_config_and_batch(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"training": [{"label": "lm", "recipe": "lstm_stdlib", "repeats": 4}]}))
    [entry] = suite.load_targets(str(path))
    assert (entry["model"], entry["preset"], entry["batch_size"], entry["repeats"]) == ("lstm_lm", "default", 64, 4)
    path.write_text(json.dumps({"training": [{"model": "no_such_model"}]}))
    with pytest.raises(tfmstep.UserError):
        suite.load_targets(str(path))


@pytest.mark.parametrize("name", [n for n in tfmstep.list_models() if tfmstep.get_spec(n).inference_timer])
def test_inference_timer_hook_times_each_step_of_a_tiny_model(name):
    spec = tfmstep.get_spec(name)
    config = tfmstep.get_config(name, "tiny")
    rows = spec.inference_timer(training.fresh_model(spec, config), config, repeats=2)
    assert rows and all(r["n"] == 2 and r["mean_ms"] > 0 and r["share"] > 0 for r in rows)


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    width: int = 3


def test_inference_section_reads_the_families_hooks(isolated_registry, monkeypatch, tmp_path):
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


def test_served_precisions_score_and_time_every_artifact_of_a_preset(tmp_path):
    from tfmstep.benchmark import report, serving

    result = serving.served_precision_report("cnn_digits", repeats=3, batch_sizes=(1, 4), max_eval_batches=2)
    assert [r["artifact"] for r in result["rows"]] == list(serving.SERVED_PRECISIONS)
    accuracy = {r["artifact"]: r["metrics"]["accuracy"] for r in result["rows"]}
    # The shipped digits CNN is ~99% right in float32; bfloat16 compute and int8 serve the same weights.
    assert accuracy["SavedModel float32"] > 0.9
    assert accuracy["TF-Lite fp32"] == accuracy["SavedModel float32"]
    assert all(abs(a - accuracy["SavedModel float32"]) <= 0.05 for a in accuracy.values())
    for row in result["rows"]:
        assert set(row["latency_ms"]) == {"1", "4"} and row["latency_ms"]["4"]["median"] > 0
    assert len(result["speedups"]) == 6
    markdown = report.write_report({"served_precision": result}, str(tmp_path), "tfmstep-benchmark")
    assert "SavedModel mixed_bfloat16" in markdown and "TF-Lite int8 vs TF-Lite fp32, batch 4" in markdown
