"""Training throughput at the shapes users train: the shared step (every jit_compile x steps_per_call x
precision, and the setting the trainer's auto-tuning picks) vs Keras compile()+fit() (its defaults, and
every jit_compile x steps_per_execution x precision policy), with MFU against the matmul peak of the
precision used.

Every setting is compiled first, then timed in many short repeats taken round-robin (repeat 1 of each
setting, then repeat 2, ...) together with the matmul peaks, so a drift of this shared machine hits all
of them alike. Each setting reports its median and inter-quartile range; each ratio (and each MFU) its
bootstrap interval (``tfmstep.benchmark.stats``), and is called a win/tie/loss only against it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from tfmstep import autotune, registry, step as step_lib, trainer
from tfmstep.benchmark import flops, stats
from tfmstep.benchmark.timing import Runner, time_interleaved

FLOAT32 = autotune.FLOAT32

_CACHED_BATCHES = 8


def fixed_batches(spec, config, batch_size: int) -> tf.data.Dataset:
    """A few real batches held in memory and repeated: the input pipeline is not what is measured."""
    return spec.dataset(config, "train", batch_size, seed=0).take(_CACHED_BATCHES).cache().repeat()


def fresh_model(spec, config, seed: int = 0) -> keras.Model:
    """The family's model, initialised from ``seed`` (every setting starts from the same weights)."""
    keras.utils.set_random_seed(seed)
    return spec.build(config)


@contextlib.contextmanager
def global_policy(precision: str):
    """Keras' own way to mixed precision (what a Keras user does): the global policy while building."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision or FLOAT32)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_optimizer(total_steps: int = 10_000):
    return step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                            total_steps=total_steps))


def compiled_train_step(spec, config, batch_size: int, *, jit_compile: bool, steps_per_call: int,
                        precision: str = FLOAT32):
    """(train function, batch iterator, steps-per-call tensor) of the shared step on a fresh model and
    in-memory batches, traced and compiled by one untimed call: ``train(iterator, n)``. The model is put
    in ``precision`` as the trainer does (``step.set_precision``)."""
    model = fresh_model(spec, config)
    step_lib.set_precision(model, precision)
    optimizer = make_optimizer()
    if step_lib.needs_loss_scaling(precision):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    steps_fns = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=batch_size,
                                    jit_compile=jit_compile)
    iterator = iter(fixed_batches(spec, config, batch_size))
    n = tf.constant(steps_per_call, tf.int32)
    steps_fns.train(iterator, n)["loss"].numpy()  # trace + compile
    return steps_fns.train, iterator, n


def tfmstep_runner(spec, config, batch_size, *, jit_compile, steps_per_call, steps,
                   precision: str = FLOAT32) -> Runner:
    train, iterator, n = compiled_train_step(spec, config, batch_size, jit_compile=jit_compile,
                                             steps_per_call=steps_per_call, precision=precision)
    calls = max(1, steps // steps_per_call)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = train(iterator, n)
        out["loss"].numpy()
        return calls * steps_per_call * batch_size / (time.perf_counter() - start)

    return run


class _SpecLossModel(keras.Model):
    """The model with the family's loss as its ``compute_loss`` (Keras' hook for custom objectives), so
    ``compile``/``fit`` trains the same objective even when outputs and labels are dicts of other keys."""

    def __init__(self, inner: keras.Model, loss_fn: Callable):
        super().__init__(name="spec_loss_model")
        self.inner = inner
        self.loss_fn = loss_fn

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = tf.reduce_mean(self.loss_fn(y, y_pred)[0])
        return loss + tf.add_n(self.losses) if self.losses else loss


class _EpochTimer(keras.callbacks.Callback):
    """Times the epoch only: fit's own set-up before the first epoch is not part of a training step."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def keras_fit_runner(spec, config, batch_size, *, jit_compile, steps_per_execution, steps,
                     default_optimizer=False, precision: str = FLOAT32) -> Runner:
    with global_policy(precision):  # compile() wraps the optimizer for float16 under this policy
        model = _SpecLossModel(fresh_model(spec, config), spec.loss)
        optimizer = "adam" if default_optimizer else make_optimizer()
        model.compile(optimizer=optimizer, jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    dataset = fixed_batches(spec, config, batch_size)
    timer = _EpochTimer()

    def run() -> float:
        # One epoch of `steps` steps per repeat; fit reuses its compiled train function across calls.
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
        return steps * batch_size / timer.seconds[-1]

    with global_policy(precision):
        run()  # tracing and compilation
    return run


def eager_runner(spec, config, batch_size, *, steps) -> Runner:
    """The textbook loop: GradientTape in plain Python, no tf.function."""
    model = fresh_model(spec, config)
    optimizer = make_optimizer()
    iterator = iter(fixed_batches(spec, config, batch_size))

    def one_step():
        inputs, labels = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(spec.loss(labels, model(inputs, training=True))[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    one_step()
    eager_steps = max(2, steps // 4)  # eager is slow; fewer steps give the same rate

    def run() -> float:
        start = time.perf_counter()
        for _ in range(eager_steps):
            loss = one_step()
        loss.numpy()
        return eager_steps * batch_size / (time.perf_counter() - start)

    return run


def autotuned_settings(spec, config, batch_size: int, run_steps: int) -> autotune.StepSettings:
    """What the trainer would choose for a default-strategy run of ``run_steps`` steps with the default
    TrainConfig (precision "auto"): the trainer's own policy (``autotune.settings_for_run``) on the same
    data."""
    model = fresh_model(spec, config)
    optimizer = make_optimizer(run_steps)
    train_config = trainer.TrainConfig(steps=run_steps, batch_size=batch_size)
    if autotune.needs_loss_scale_optimizer(train_config, spec):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return autotune.settings_for_run(
        train_config, spec, tf.distribute.get_strategy(), model=model, optimizer=optimizer,
        dataset_fn=lambda: spec.dataset(config, "train", batch_size, seed=0),
        run_steps=run_steps, model_name=spec.name)


def peak_runner(precision: str) -> Runner:
    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float16 if "float16" in precision else tf.float32
    return flops.matmul_peak_runner(dtype)


def precisions_to_compare() -> tuple:
    low = autotune.fast_low_precision()
    return (FLOAT32, low) if low else (FLOAT32,)


def benchmark_training(name, preset: str = "default", batch_size: int = 64, steps: int = 50,
                       repeats: int = 3, peak_flops: float | None = None, tune_for_steps: int = 1000,
                       overrides: dict | None = None, label: str = "", precisions=None,
                       per_call_options=(1, 10), jit_options=(False, True), include_eager: bool = True,
                       goals: dict | None = None) -> dict:
    """One family at one configuration. ``steps``: optimizer steps per timed repeat (at least one call
    of steps_per_call). ``jit_options``/``per_call_options``/``precisions``: the grid of both the shared
    step and Keras fit (precisions default: float32 and the machine's fast low precision). ``peak_flops``: fixed fp32 peak for MFU (tests); otherwise the peaks are measured in the same
    interleaved rounds. ``goals``: {"vs_keras_defaults", "vs_best_keras", "mfu"} thresholds reported as
    met / not met / unclear against the intervals."""
    spec = registry.resolve(name)  # a name or a ModelSpec
    name = spec.name
    overrides = dict(overrides or {})
    config = spec.config(preset, **overrides)
    precisions = tuple(precisions or precisions_to_compare())
    logging.info("%s: auto-tuning as the trainer would for a %d-step run", name, tune_for_steps)
    settings = autotuned_settings(spec, config, batch_size, tune_for_steps)
    how = "measured" if settings.source == "autotune" else "family default, not measured"
    auto_name = (f"tfmstep auto: {how} ({settings.mixed_precision} jit={settings.jit_compile} "
                 f"steps_per_call={settings.steps_per_call})")
    defaults_name = "keras fit defaults (adam, float32, jit auto, steps_per_execution 1)"
    eager_name = "eager GradientTape loop"
    logging.info("%s: setting up and compiling every setting", name)
    runners = {auto_name: tfmstep_runner(spec, config, batch_size, jit_compile=settings.jit_compile,
                                         steps_per_call=settings.steps_per_call, steps=steps,
                                         precision=settings.mixed_precision)}
    precision_of = {auto_name: settings.mixed_precision, defaults_name: FLOAT32, eager_name: FLOAT32}
    for precision in precisions:
        for jit in jit_options:
            for per_call in per_call_options:
                key = f"tfmstep {precision} jit={jit} steps_per_call={per_call}"
                runners[key] = tfmstep_runner(spec, config, batch_size, jit_compile=jit,
                                              steps_per_call=per_call, steps=steps, precision=precision)
                precision_of[key] = precision
    for precision in precisions:
        for jit in jit_options:
            for per_execution in per_call_options:
                key = f"keras fit {precision} jit={jit} steps_per_execution={per_execution}"
                runners[key] = keras_fit_runner(spec, config, batch_size, jit_compile=jit,
                                                steps_per_execution=per_execution, steps=steps,
                                                precision=precision)
                precision_of[key] = precision
    runners[defaults_name] = keras_fit_runner(spec, config, batch_size, jit_compile="auto",
                                              steps_per_execution=1, steps=steps, default_optimizer=True)
    if include_eager:
        runners[eager_name] = eager_runner(spec, config, batch_size, steps=steps)
    peak_names = {}
    if peak_flops is None:
        for precision in precisions:
            peak_names[precision] = f"matmul peak {precision} (FLOP/s)"
            runners[peak_names[precision]] = peak_runner(precision)
    logging.info("%s: timing %d settings, %d interleaved repeats", name, len(runners), repeats)
    results = time_interleaved(runners, repeats)
    by_name = {r.name: r for r in results}
    rates = {r.name: r.repeats for r in results}
    peaks = {p: rates[n] for p, n in peak_names.items()}
    if peak_flops is not None:
        peaks = {p: [peak_flops] for p in precisions}

    timings = [r for r in results if not r.name.startswith("matmul peak")]
    ours = [r for r in timings if r.name.startswith("tfmstep")]
    keras_all = [r for r in timings if r.name.startswith("keras")]
    best_ours = max(ours, key=lambda r: r.examples_per_second)
    best_keras = max(keras_all, key=lambda r: r.examples_per_second)
    auto = by_name[auto_name]

    model = fresh_model(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "train", 1, seed=0)))
    train_flops = flops.training_flops_per_example(spec, model, config, inputs)

    def mfu(row):
        return stats.ratio(rates[row.name], peaks[precision_of.get(row.name, FLOAT32)], scale=train_flops)

    ratios = {
        "auto_vs_keras_defaults": stats.ratio(rates[auto_name], rates[defaults_name]),
        "auto_vs_best_keras": stats.ratio(rates[auto_name], rates[best_keras.name]),
        "best_tfmstep_vs_best_keras": stats.ratio(rates[best_ours.name], rates[best_keras.name]),
    }
    if include_eager:
        ratios["auto_vs_eager"] = stats.ratio(rates[auto_name], rates[eager_name])
    if len(precisions) > 1:
        low = precisions[1]
        for family in ("tfmstep", "keras fit"):
            rows = {p: max((r for r in timings if r.name.startswith(f"{family} {p} ")),
                           key=lambda r: r.examples_per_second) for p in precisions}
            ratios[f"{family.split()[0]}_best_{low}_vs_best_float32"] = stats.ratio(
                rates[rows[low].name], rates[rows[FLOAT32].name])
    entry = {
        "model": name, "label": label or name, "preset": preset, "overrides": overrides,
        "batch_size": batch_size, "parameters": int(model.count_params()),
        "steps_per_repeat": steps, "repeats": repeats,
        "timings": [{**r.as_dict(), **stats.summary(r.repeats), "precision": precision_of.get(r.name, "")}
                    for r in timings],
        "peaks": {p: stats.summary(v) for p, v in peaks.items()},
        "best_tfmstep": best_ours.name, "best_keras": best_keras.name, "tfmstep_default_setting": auto_name,
        "autotune": {"tuned_for_steps": tune_for_steps, **settings.as_record()},
        "ratios": ratios,
        "training_flops_per_example": train_flops,
        "mfu": {"auto": mfu(auto), "best_tfmstep": mfu(best_ours), "best_keras": mfu(best_keras)},
        "mfu_precision": {"auto": precision_of[auto_name], "best_tfmstep": precision_of[best_ours.name],
                          "best_keras": precision_of[best_keras.name]},
    }
    if goals:
        entry["goals"] = {
            "vs_keras_defaults": {"goal": goals["vs_keras_defaults"],
                                  "result": stats.meets(ratios["auto_vs_keras_defaults"],
                                                        goals["vs_keras_defaults"])},
            "vs_best_keras": {"goal": goals["vs_best_keras"],
                              "result": stats.meets(ratios["auto_vs_best_keras"], goals["vs_best_keras"])},
            "mfu": {"goal": goals["mfu"], "result": stats.meets(entry["mfu"]["auto"], goals["mfu"])},
        }
    return entry
