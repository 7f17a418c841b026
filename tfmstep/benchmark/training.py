"""Training throughput: the shared step vs Keras fit vs an eager loop, every setting compiled first and
then timed round-robin (repeat 1 of each setting, then repeat 2, ...), with ratios and MFU.

The "tfmstep auto" row is what the trainer would run: the setting ``tfmstep.autotune`` picks for a run of
``tune_for_steps`` steps (its measured candidates are reported too), then timed like every other row.
"""

from __future__ import annotations

import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from tfmstep import autotune, registry, step as step_lib, trainer
from tfmstep.benchmark import flops
from tfmstep.benchmark.timing import Runner, time_interleaved

_CACHED_BATCHES = 8


def fixed_batches(spec, config, batch_size: int) -> tf.data.Dataset:
    """A few real batches held in memory and repeated: the input pipeline is not what is measured."""
    return spec.dataset(config, "train", batch_size, seed=0).take(_CACHED_BATCHES).cache().repeat()


def fresh_model(spec, config, seed: int = 0) -> keras.Model:
    """The family's model, initialised from ``seed`` (every setting starts from the same weights)."""
    keras.utils.set_random_seed(seed)
    return spec.build(config)


def make_optimizer(total_steps: int = 10_000):
    return step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                            total_steps=total_steps))


def compiled_train_step(spec, config, batch_size: int, *, jit_compile: bool, steps_per_call: int):
    """(train function, batch iterator, steps-per-call tensor) of the shared step on a fresh model and
    in-memory batches, traced and compiled by one untimed call: ``train(iterator, n)``."""
    model = fresh_model(spec, config)
    optimizer = make_optimizer()
    optimizer.build(model.trainable_variables)
    steps_fns = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=batch_size,
                                    jit_compile=jit_compile)
    iterator = iter(fixed_batches(spec, config, batch_size))
    n = tf.constant(steps_per_call, tf.int32)
    steps_fns.train(iterator, n)["loss"].numpy()  # trace + compile
    return steps_fns.train, iterator, n


def tfmstep_runner(spec, config, batch_size, *, jit_compile, steps_per_call, steps) -> Runner:
    train, iterator, n = compiled_train_step(spec, config, batch_size, jit_compile=jit_compile,
                                             steps_per_call=steps_per_call)
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
                     default_optimizer=False) -> Runner:
    model = _SpecLossModel(fresh_model(spec, config), spec.loss)
    optimizer = "adam" if default_optimizer else make_optimizer()
    model.compile(optimizer=optimizer, jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    dataset = fixed_batches(spec, config, batch_size)
    timer = _EpochTimer()

    def run() -> float:
        # One epoch of `steps` steps per repeat; fit reuses its compiled train function across calls.
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
        return steps * batch_size / timer.seconds[-1]

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
    TrainConfig intervals: the trainer's own policy (``autotune.settings_for_run``) on the same data."""
    model = fresh_model(spec, config)
    optimizer = make_optimizer(run_steps)
    optimizer.build(model.trainable_variables)
    return autotune.settings_for_run(
        trainer.TrainConfig(steps=run_steps, batch_size=batch_size), spec, tf.distribute.get_strategy(),
        model=model, optimizer=optimizer, dataset_fn=lambda: spec.dataset(config, "train", batch_size, seed=0),
        run_steps=run_steps, model_name=spec.name)


def benchmark_training(name: str, preset: str = "default", batch_size: int = 64, steps: int = 50,
                       repeats: int = 3, peak_flops: float | None = None, tune_for_steps: int = 1000) -> dict:
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    logging.info("%s: auto-tuning as the trainer would for a %d-step run", name, tune_for_steps)
    settings = autotuned_settings(spec, config, batch_size, tune_for_steps)
    how = "measured" if settings.source == "autotune" else "family default, not measured"
    auto_name = f"tfmstep auto: {how} (jit={settings.jit_compile} steps_per_call={settings.steps_per_call})"
    defaults_name = "keras fit defaults (adam, jit auto, steps_per_execution 1)"
    eager_name = "eager GradientTape loop"
    logging.info("%s: setting up and compiling every setting", name)
    runners = {auto_name: tfmstep_runner(spec, config, batch_size, jit_compile=settings.jit_compile,
                                         steps_per_call=settings.steps_per_call, steps=steps)}
    for jit in (False, True):
        for per_call in (1, 10):
            runners[f"tfmstep jit={jit} steps_per_call={per_call}"] = tfmstep_runner(
                spec, config, batch_size, jit_compile=jit, steps_per_call=per_call, steps=steps)
    for jit in (False, True):
        for per_execution in (1, 10):
            runners[f"keras fit jit={jit} steps_per_execution={per_execution}"] = keras_fit_runner(
                spec, config, batch_size, jit_compile=jit, steps_per_execution=per_execution, steps=steps)
    runners[defaults_name] = keras_fit_runner(spec, config, batch_size, jit_compile="auto",
                                              steps_per_execution=1, steps=steps, default_optimizer=True)
    runners[eager_name] = eager_runner(spec, config, batch_size, steps=steps)
    logging.info("%s: timing %d settings, %d interleaved repeats", name, len(runners), repeats)
    results = time_interleaved(runners, repeats)
    by_name = {r.name: r for r in results}

    ours = [r for r in results if r.name.startswith("tfmstep")]
    keras_all = [r for r in results if r.name.startswith("keras")]
    best_ours = max(ours, key=lambda r: r.examples_per_second)
    best_keras = max(keras_all, key=lambda r: r.examples_per_second)
    keras_defaults = by_name[defaults_name]
    eager = by_name[eager_name]
    ours_default = by_name[auto_name]  # what a default (auto-tuned) training run uses

    model = fresh_model(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "train", 1, seed=0)))
    train_flops = flops.training_flops_per_example(spec, model, config, inputs)
    peak = peak_flops or flops.matmul_peak_flops()
    return {
        "model": name, "preset": preset, "batch_size": batch_size,
        "parameters": int(model.count_params()),
        "timings": [r.as_dict() for r in results],
        "best_tfmstep": best_ours.name, "tfmstep_default_setting": ours_default.name,
        "autotune": {"tuned_for_steps": tune_for_steps, **settings.as_record()},
        "ratio_default_vs_best_keras": ours_default.examples_per_second / best_keras.examples_per_second,
        "ratio_best_vs_best_keras": best_ours.examples_per_second / best_keras.examples_per_second,
        "ratio_default_vs_keras_defaults": ours_default.examples_per_second
        / keras_defaults.examples_per_second,
        "ratio_default_vs_eager": ours_default.examples_per_second / eager.examples_per_second,
        "training_flops_per_example": train_flops,
        "achieved_flops": train_flops * ours_default.examples_per_second,
        "peak_matmul_flops": peak,
        "mfu": train_flops * ours_default.examples_per_second / peak,
    }
