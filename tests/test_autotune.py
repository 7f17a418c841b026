"""Auto-tuning of jit_compile / steps_per_call / precision: measuring leaves the run untouched, the fastest
candidate wins (a low-precision one only if it also trains like float32), short runs skip it, and the
choice is recorded and reused on resume.

Timings are injected (``time_call``) so every choice here is deterministic; nothing asserts a real speed.
"""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import autotune, registry, step as step_lib, trainer

# BatchNorm statistics and a dropout SeedGenerator are part of the state measuring must not move.
CNN = dict(filters=(4, 8), dropout=0.5)


def _favouring(target, slowdown=3.0, per_step=0.001):
    """Fake clock: every step costs ``per_step`` seconds, ``slowdown`` times more unless the candidate
    is ``target`` (jit_compile, steps_per_call[, precision]). The call still runs, so state really
    changes."""

    def time_call(candidate, call):
        call()
        key = (candidate.jit_compile, candidate.steps_per_call, candidate.precision)
        fast = key[:len(target)] == tuple(target)
        return candidate.steps_per_call * per_step * (1.0 if fast else slowdown)

    return time_call


# Windows sized for the fake clock (a few calls each, none skipped for cost), and a budget so large that
# measuring never stops early.
FAKE_BUDGET = dict(max_fraction=1e6, seconds_per_candidate=0.1, min_window=0.0)


def _tiny_run():
    keras.utils.set_random_seed(3)
    spec = tfmstep.get_spec("cnn_classifier")
    config = tfmstep.get_config("cnn_classifier", "tiny", **CNN)
    model = spec.build(config)
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(warmup_steps=2, total_steps=100))
    optimizer.build(model.trainable_variables)
    return spec, config, model, optimizer


def _values(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


def test_measuring_leaves_model_optimizer_and_rng_state_bit_identical():
    spec, config, model, optimizer = _tiny_run()
    # A few real steps first, so slots, iteration count and BatchNorm statistics are not at their start.
    steps = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=8)
    steps.train(iter(spec.dataset(config, "train", 8, seed=0)), tf.constant(3))
    rng_states = [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]
    assert rng_states, "the test model must have a dropout SeedGenerator"
    watched = [*model.variables, *optimizer.variables, *rng_states]
    before = _values(watched)
    iterations_seen = []

    def time_call(candidate, call):
        call()
        iterations_seen.append(int(optimizer.iterations.numpy()))
        return 0.01 * candidate.steps_per_call

    settings = autotune.choose_step_settings(
        model, optimizer, spec.loss, lambda: spec.dataset(config, "train", 8, seed=0, start_batch=3),
        global_batch_size=8, run_steps=1000, jit_options=(False, True), steps_per_call_options=(1, 4),
        time_call=time_call, **FAKE_BUDGET)

    assert max(iterations_seen) > 3 + 5  # the measurement really trained
    assert all(c.steps_per_second for c in settings.candidates)
    after = _values(watched)
    for variable, a, b in zip(watched, before, after):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=variable.path)


@pytest.mark.parametrize("target", [(True, 1), (False, 4)])
def test_fastest_candidate_is_chosen_with_every_rate_reported(target):
    spec, config, model, optimizer = _tiny_run()
    settings = autotune.choose_step_settings(
        model, optimizer, spec.loss, lambda: spec.dataset(config, "train", 8, seed=0),
        global_batch_size=8, run_steps=1000, jit_options=(False, True), steps_per_call_options=(1, 4),
        time_call=_favouring(target), **FAKE_BUDGET)
    assert (settings.jit_compile, settings.steps_per_call) == target
    assert settings.source == "autotune"
    rates = {(c.jit_compile, c.steps_per_call): c.steps_per_second for c in settings.candidates}
    assert rates == pytest.approx({key: (1000.0 if key == target else 1000.0 / 3) for key in rates})
    assert all(c.calls >= autotune.MIN_CALLS for c in settings.candidates)
    assert settings.steps is not None  # the compiled step of the winner, handed to the trainer
    record = settings.as_record()
    json.dumps(record)  # what config.json and metrics.json store
    assert autotune.StepSettings.from_record(record).candidates == settings.candidates


class _NotXlaCompilable(keras.layers.Layer):
    def call(self, x):
        return x + tf.cast(tf.strings.length(tf.strings.as_string(x)), x.dtype) * 0.0  # no XLA kernel


def test_xla_is_left_out_when_its_preflight_fails():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(_NotXlaCompilable()(inputs)))
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig())
    optimizer.build(model.trainable_variables)
    loss = lambda y, out: (tf.reduce_mean(tf.square(out), -1), {})  # noqa: E731
    data = lambda: tf.data.Dataset.from_tensors((tf.ones((4, 3)), tf.zeros((4,)))).repeat()  # noqa: E731
    settings = autotune.choose_step_settings(
        model, optimizer, loss, data, global_batch_size=4, run_steps=1000, jit_options=(False, True),
        steps_per_call_options=(1, 2), time_call=_favouring((True, 2)), **FAKE_BUDGET)
    assert settings.jit_compile is False
    assert [c.skipped for c in settings.candidates if c.jit_compile] == ["XLA pre-flight failed"] * 2
    with pytest.raises(tfmstep.UserError, match="XLA cannot compile"):  # XLA asked for explicitly
        autotune.choose_step_settings(model, optimizer, loss, data, global_batch_size=4, run_steps=1000,
                                      jit_options=(True,), time_call=_favouring((True, 1)))


def test_a_call_too_long_for_the_window_is_not_timed():
    spec, config, model, optimizer = _tiny_run()
    # 1 s per step against a 0.5 s window: a 4-step call (4 s) would overrun twice the window.
    settings = autotune.choose_step_settings(
        model, optimizer, spec.loss, lambda: spec.dataset(config, "train", 8, seed=0),
        global_batch_size=8, run_steps=1000, jit_options=(False,), steps_per_call_options=(1, 4),
        time_call=_favouring((False, 4), slowdown=1.0, per_step=1.0), max_fraction=100.0,
        seconds_per_candidate=0.5, min_window=0.0)
    assert settings.steps_per_call == 1
    assert settings.candidates[0].calls == 1  # one 1 s call alone overran twice the window
    assert "over the" in settings.candidates[1].skipped


def test_measuring_stops_after_the_first_candidate_when_the_rest_would_cost_too_much():
    spec, config, model, optimizer = _tiny_run()
    # A fake 3 s run with a 0.01% budget: compiling the plain step (real seconds) alone overruns it.
    settings = autotune.choose_step_settings(
        model, optimizer, spec.loss, lambda: spec.dataset(config, "train", 8, seed=0),
        global_batch_size=8, run_steps=1000, jit_options=(False, True), steps_per_call_options=(1, 4),
        time_call=_favouring((False, 4)), fallback=(True, 10), max_fraction=1e-4, min_window=0.0)
    assert (settings.jit_compile, settings.steps_per_call, settings.source) == (True, 10, "default")
    assert "measuring the rest would take" in settings.note
    # The fallback's variant was measured first, and its compiled step is handed over.
    timed = [(c.jit_compile, c.steps_per_call) for c in settings.candidates if c.calls]
    assert timed == [(True, 1)]
    assert settings.compile_seconds.keys() == {"jit=True"} and settings.steps is not None


def test_steps_per_call_options_are_capped_by_run_length_and_trainer_boundaries():
    assert autotune.steps_per_call_candidates(1000, (100, 500, 0)) == (1, 10, 50)
    assert autotune.steps_per_call_candidates(1000, (20, 500, 0)) == (1, 10, 20)
    assert autotune.steps_per_call_candidates(7, ()) == (1, 7)


def test_negative_steps_per_call_is_refused_with_one_clear_error():
    with pytest.raises(tfmstep.UserError, match=r"steps_per_call must be >= 1, or 0 .* got -1"):
        trainer.TrainConfig(steps_per_call=-1)


# --- the trainer ---------------------------------------------------------------------------------------

STEPS = 40
# jit_compile and steps_per_call left to auto-tuning.
AUTO = trainer.TrainConfig(steps=STEPS, batch_size=8, learning_rate=3e-3, warmup_steps=5, log_every=20,
                           checkpoint_every=20, eval_every=0, eval_batches=1)
CHOSEN = (True, 10)  # what the fake clock makes the fastest: XLA, so the handed-over compiled step is used


def _log(workdir):
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _settings(workdir, name="config.json"):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)["step_settings"]


@pytest.fixture
def tune_short_runs(monkeypatch):
    """Tune runs of 40 steps, with the fake clock favouring CHOSEN, on a machine without fast low
    precision (float32 is the only precision candidate, whatever this CPU has)."""
    real = autotune.choose_step_settings
    calls = []

    def choose(*args, **kwargs):
        calls.append(kwargs["run_steps"])
        return real(*args, time_call=_favouring(CHOSEN), **FAKE_BUDGET, **kwargs)

    monkeypatch.setattr(autotune, "fast_low_precision", lambda: "")
    monkeypatch.setattr(autotune, "MIN_AUTOTUNE_STEPS", 10)
    monkeypatch.setattr(autotune, "choose_step_settings", choose)
    return calls


@pytest.fixture
def straight_auto_run(tmp_path, tune_short_runs):
    workdir = str(tmp_path / "straight")
    metrics = trainer.train("cnn_classifier", workdir, "tiny", CNN, config=AUTO)
    assert tune_short_runs == [STEPS]
    return workdir, metrics


def test_auto_run_records_its_choice_and_trains_like_a_run_told_that_choice(tmp_path, straight_auto_run):
    workdir, metrics = straight_auto_run
    settings = _settings(workdir)
    assert settings["source"] == "autotune"
    assert (settings["jit_compile"], settings["steps_per_call"]) == CHOSEN
    assert {(c["jit_compile"], c["steps_per_call"]) for c in settings["candidates"]} == {
        (jit, spc) for jit in (False, True) for spc in (1, 10, 20)}  # 50 is capped at log_every
    assert all(c["steps_per_second"] > 0 for c in settings["candidates"])
    assert metrics["step_settings"] == settings
    assert (metrics["jit_compile"], metrics["steps_per_call"]) == CHOSEN

    told = str(tmp_path / "told")
    explicit = dataclasses.replace(AUTO, jit_compile=CHOSEN[0], steps_per_call=CHOSEN[1])
    told_metrics = trainer.train("cnn_classifier", told, "tiny", CNN, config=explicit)
    assert _settings(told)["source"] == "explicit"
    assert _log(told) == _log(workdir)  # bit for bit (JSON keeps the float64 repr)
    assert told_metrics["eval"] == metrics["eval"]


class _Interrupted(Exception):
    pass


def _train_until_first_checkpoint(monkeypatch, workdir):
    """An auto-tuned run that dies right after writing its first checkpoint (as a SIGKILL would)."""
    real_save = tf.train.CheckpointManager.save

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(tf.train.CheckpointManager, "save", save_then_die)
        with pytest.raises(_Interrupted):
            trainer.train("cnn_classifier", workdir, "tiny", CNN, config=AUTO)


def test_interrupted_auto_run_resumes_bit_exact_with_the_recorded_choice(tmp_path, monkeypatch,
                                                                          straight_auto_run,
                                                                          tune_short_runs):
    straight, _ = straight_auto_run
    workdir = str(tmp_path / "interrupted")
    _train_until_first_checkpoint(monkeypatch, workdir)
    assert len(_log(workdir)) == 20
    recorded = _settings(workdir)
    assert recorded["source"] == "autotune"  # recorded before the first step

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(autotune, "choose_step_settings", must_not_measure)
    metrics = trainer.train("cnn_classifier", workdir, "tiny", CNN, config=AUTO)
    assert metrics["step_settings"]["source"] == "reused"
    assert (metrics["jit_compile"], metrics["steps_per_call"]) == CHOSEN
    assert _settings(workdir)["candidates"] == recorded["candidates"]
    assert _log(workdir) == _log(straight)


def test_short_run_skips_measuring_and_uses_the_family_default(tmp_path, monkeypatch):
    def must_not_measure(*args, **kwargs):
        raise AssertionError("a short run measured")

    monkeypatch.setattr(autotune, "choose_step_settings", must_not_measure)
    config = trainer.TrainConfig(steps=8, batch_size=8, eval_every=0, eval_batches=1)
    assert autotune.MIN_AUTOTUNE_STEPS > config.steps
    metrics = trainer.train("cnn_classifier", str(tmp_path / "run"), "tiny", config=config)
    settings = metrics["step_settings"]
    assert settings["source"] == "default" and "not measured" in settings["note"]
    assert metrics["jit_compile"] == tfmstep.get_spec("cnn_classifier").xla_on_cpu
    assert metrics["steps_per_call"] == autotune.DEFAULT_STEPS_PER_CALL
    assert _settings(str(tmp_path / "run")) == settings


# --- precision --------------------------------------------------------------------------------------

BF16 = "mixed_bfloat16"
PRECISIONS = ("float32", BF16)


def _dense_run():
    """A one-layer model that compiles in well under a second, with its loss and data."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(warmup_steps=0))
    optimizer.build(model.trainable_variables)
    loss = lambda y, out: (tf.reduce_mean(tf.square(tf.cast(out, tf.float32) - 1.0), -1), {})  # noqa: E731
    data = lambda: tf.data.Dataset.from_tensors((tf.constant([[0.3, 0.7, 1.1]] * 4), tf.zeros((4,)))).repeat()  # noqa: E731
    return model, optimizer, loss, data


def _choose_precision(target, slowdown, small=False, **kwargs):
    if small:
        model, optimizer, loss, data = _dense_run()
    else:
        spec, config, model, optimizer = _tiny_run()
        loss, data = spec.loss, lambda: spec.dataset(config, "train", 8, seed=0)
    before = _values([*model.variables, *optimizer.variables])
    settings = autotune.choose_step_settings(
        model, optimizer, loss, data, global_batch_size=8, run_steps=1000, jit_options=(False,), steps_per_call_options=(1, 4),
        precision_options=PRECISIONS, time_call=_favouring(target, slowdown=slowdown), **FAKE_BUDGET,
        **kwargs)
    for a, b in zip(before, _values([*model.variables, *optimizer.variables])):
        np.testing.assert_array_equal(a, b)
    return settings, model


def test_faster_bfloat16_that_trains_like_float32_is_chosen_and_the_model_left_in_it():
    settings, model = _choose_precision((False, 4, BF16), slowdown=2.0)
    assert (settings.mixed_precision, settings.steps_per_call) == (BF16, 4)
    check = settings.numerics[f"{BF16} jit=False"]
    assert check["steps"] >= autotune.MIN_CHECK_STEPS and check["relative_difference"] <= autotune.LOSS_TOLERANCE
    assert "rejected" not in check
    assert {c.precision for c in settings.candidates if c.steps_per_second} == set(PRECISIONS)
    # The model computes in bfloat16 now, except the logits the family pinned to float32.
    assert model.get_layer("stage0_conv0").compute_dtype == "bfloat16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert autotune.StepSettings.from_record(settings.as_record()).mixed_precision == BF16


def test_bfloat16_whose_loss_leaves_the_tolerance_is_not_kept(monkeypatch):
    monkeypatch.setattr(autotune, "LOSS_TOLERANCE", 0.0)  # any difference from float32 is too much
    settings, model = _choose_precision((False, 4, BF16), slowdown=2.0, small=True)
    assert settings.mixed_precision == "float32"
    assert "apart" in settings.numerics[f"{BF16} jit=False"]["rejected"]
    assert all(c.skipped.startswith("not kept") for c in settings.candidates if c.precision == BF16)
    assert model.layers[-1].compute_dtype == "float32"


def test_bfloat16_within_the_margin_of_float32_is_not_kept():
    slowdown = 1 + autotune.LOW_PRECISION_MARGIN / 2  # bfloat16 faster, but by less than the margin
    settings, _ = _choose_precision((False, 4, BF16), slowdown=slowdown, small=True)
    assert settings.mixed_precision == "float32"
    assert "rejected" not in settings.numerics[f"{BF16} jit=False"]  # it was not left out for its loss


def test_precision_candidates_follow_the_hardware_and_the_config(monkeypatch):
    auto = trainer.TrainConfig()
    assert auto.mixed_precision == "auto"
    monkeypatch.setattr(autotune, "fast_low_precision", lambda: BF16)
    assert autotune.precision_options(auto) == PRECISIONS
    assert autotune.precision_options(dataclasses.replace(auto, mixed_precision="")) == ("float32",)
    monkeypatch.setattr(autotune, "fast_low_precision", lambda: "mixed_float16")
    plain = step_lib.make_optimizer(step_lib.OptimizerConfig())
    assert autotune.precision_options(auto, plain) == ("float32",)  # float16 needs loss scaling
    assert autotune.needs_loss_scale_optimizer(auto)
    scaled = keras.optimizers.LossScaleOptimizer(plain)
    assert autotune.precision_options(auto, scaled) == ("float32", "mixed_float16")


def test_a_family_that_opts_out_of_low_precision_is_kept_in_float32_by_auto(monkeypatch):
    auto = trainer.TrainConfig()
    monkeypatch.setattr(autotune, "fast_low_precision", lambda: "mixed_float16")
    opted_out = dataclasses.replace(registry.get_spec("cnn_classifier"), auto_low_precision=False)
    assert autotune.precision_options(auto, spec=opted_out) == ("float32",)
    assert not autotune.needs_loss_scale_optimizer(auto, opted_out)
    assert autotune.needs_loss_scale_optimizer(auto, dataclasses.replace(opted_out, auto_low_precision=True))
    # An explicit precision is the user's choice, opted out or not.
    assert autotune.precision_options(dataclasses.replace(auto, mixed_precision=BF16), spec=opted_out) == (BF16,)


@pytest.mark.slow  # three short trainer runs (~45 s on 2 busy cores); the float32 ones above are not slow
def test_auto_chosen_bfloat16_records_it_trains_like_a_run_told_it_and_resumes_bit_exact(
        tmp_path, monkeypatch, isolated_registry):
    # The tiny CNN stands in for a family that lets auto-tuning train it in bf16 (the CNN itself opts out).
    isolated_registry._REGISTRY["cnn_classifier"] = dataclasses.replace(
        isolated_registry.get_spec("cnn_classifier"), auto_low_precision=True)
    chosen = (True, 10, BF16)
    real = autotune.choose_step_settings

    def choose(*args, **kwargs):
        return real(*args, time_call=_favouring(chosen, slowdown=2.0), **FAKE_BUDGET, **kwargs)

    monkeypatch.setattr(autotune, "MIN_AUTOTUNE_STEPS", 10)
    monkeypatch.setattr(autotune, "fast_low_precision", lambda: BF16)
    monkeypatch.setattr(autotune, "choose_step_settings", choose)
    straight = str(tmp_path / "straight")
    metrics = trainer.train("cnn_classifier", straight, "tiny", CNN, config=AUTO)
    settings = _settings(straight)
    assert (settings["jit_compile"], settings["steps_per_call"], settings["mixed_precision"]) == chosen
    assert metrics["step_settings"]["mixed_precision"] == BF16

    told = str(tmp_path / "told")
    explicit = dataclasses.replace(AUTO, jit_compile=True, steps_per_call=10, mixed_precision=BF16)
    trainer.train("cnn_classifier", told, "tiny", CNN, config=explicit)
    assert _settings(told)["source"] == "explicit"
    assert _log(told) == _log(straight)

    interrupted = str(tmp_path / "interrupted")
    _train_until_first_checkpoint(monkeypatch, interrupted)
    monkeypatch.setattr(autotune, "choose_step_settings", lambda *a, **k: pytest.fail("measured again"))
    resumed = trainer.train("cnn_classifier", interrupted, "tiny", CNN, config=AUTO)
    assert resumed["step_settings"]["source"] == "reused"
    assert resumed["step_settings"]["mixed_precision"] == BF16
    assert _log(interrupted) == _log(straight)


def test_on_a_tight_budget_the_variants_at_the_end_are_dropped_not_the_whole_measurement(monkeypatch):
    # Compiling is estimated at 0 s and each window costs 1 s (fake clock): a budget of 2.5 windows keeps
    # the first variant's second candidate and the next variant (bfloat16, same jit), not the last one.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))  # compiles in well under a second
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig())
    optimizer.build(model.trainable_variables)
    loss = lambda y, out: (tf.reduce_mean(tf.square(tf.cast(out, tf.float32)), -1), {})  # noqa: E731
    data = lambda: tf.data.Dataset.from_tensors((tf.ones((4, 3)), tf.zeros((4,)))).repeat()  # noqa: E731
    monkeypatch.setattr(autotune, "OTHER_COMPILE_FACTOR", 0.0)
    monkeypatch.setattr(autotune, "SAME_JIT_COMPILE_FACTOR", 0.0)
    settings = autotune.choose_step_settings(
        model, optimizer, loss, data, global_batch_size=4, run_steps=1000, jit_options=(False, True), steps_per_call_options=(1,),
        precision_options=PRECISIONS, fallback=(False, 1, "float32"),
        time_call=lambda c, call: (call(), 1.0)[1], max_fraction=0.0025, min_window=1.0,
        seconds_per_candidate=1.0, min_calls=1)
    timed = [(c.precision, c.jit_compile) for c in settings.candidates if c.calls]
    assert timed == [("float32", False), (BF16, False), ("float32", True)]
    assert settings.candidates[-1].skipped.startswith("not measured: over")
    assert settings.source == "autotune"


def test_fast_low_precision_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(autotune, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert autotune.fast_low_precision() == BF16
    monkeypatch.setattr(autotune, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert autotune.fast_low_precision() == ""


def test_a_run_recorded_before_precision_was_a_setting_resumes_in_float32_without_measuring():
    old = {"train": {**dataclasses.asdict(trainer.TrainConfig(steps_per_call=0)), "mixed_precision": ""},
           "step_settings": {"jit_compile": False, "steps_per_call": 10, "source": "autotune"}}
    settings = autotune.recorded_settings(old, trainer.TrainConfig())  # today's default: "auto"
    assert (settings.source, settings.mixed_precision, settings.steps_per_call) == ("reused", "float32", 10)
