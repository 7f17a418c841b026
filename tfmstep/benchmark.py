"""Side-by-side measurements: training throughput of the shared step vs Keras fit vs an eager loop, model
FLOPs utilisation against this machine's measured matmul peak, and per-step inference time.

Everything is measured in one process, one setting after another on the same batches, so the ratios are
comparable even on a noisy machine; absolute numbers are not. Nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import registry, step as step_lib

_CACHED_BATCHES = 8


@dataclasses.dataclass
class Timing:
    name: str
    examples_per_second: float  # median over repeats
    spread: float  # (max - min) / median over repeats
    repeats: list

    def as_dict(self):
        return dataclasses.asdict(self)


def _summarise(name: str, per_repeat_rates: list) -> Timing:
    median = statistics.median(per_repeat_rates)
    return Timing(name, median, (max(per_repeat_rates) - min(per_repeat_rates)) / median,
                  [round(r, 2) for r in per_repeat_rates])


def _fixed_batches(spec, config, batch_size: int) -> tf.data.Dataset:
    """A few real batches held in memory and repeated: the input pipeline is not what is measured."""
    return spec.dataset(config, "train", batch_size, seed=0).take(_CACHED_BATCHES).cache().repeat()


def _fresh(spec, config, seed=0):
    keras.utils.set_random_seed(seed)
    return spec.build(config)


def _optimizer(total_steps=10_000):
    return step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                            total_steps=total_steps))


def time_tfmstep(spec, config, batch_size, *, jit_compile, steps_per_call, steps, repeats) -> Timing:
    model = _fresh(spec, config)
    optimizer = _optimizer()
    optimizer.build(model.trainable_variables)
    steps_fns = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=batch_size,
                                    jit_compile=jit_compile)
    iterator = iter(_fixed_batches(spec, config, batch_size))
    calls = max(1, steps // steps_per_call)
    n = tf.constant(steps_per_call, tf.int32)
    steps_fns.train(iterator, n)["loss"].numpy()  # trace + compile
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = steps_fns.train(iterator, n)
        out["loss"].numpy()
        rates.append(calls * steps_per_call * batch_size / (time.perf_counter() - start))
    return _summarise(f"tfmstep jit={jit_compile} steps_per_call={steps_per_call}", rates)


class _SpecLoss(keras.losses.Loss):
    """The family's per-example loss as a Keras loss, so ``compile``/``fit`` trains the same objective."""

    def __init__(self, loss_fn):
        super().__init__(name="spec_loss")
        self.loss_fn = loss_fn

    def call(self, y_true, y_pred):
        return self.loss_fn(y_true, y_pred)[0]


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def time_keras_fit(spec, config, batch_size, *, jit_compile, steps_per_execution, steps, repeats,
                   default_optimizer=False) -> Timing:
    model = _fresh(spec, config)
    optimizer = "adam" if default_optimizer else _optimizer()
    model.compile(optimizer=optimizer, loss=_SpecLoss(spec.loss), jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    timer = _EpochTimer()
    # Epoch 1 includes tracing and compilation; it is dropped.
    model.fit(_fixed_batches(spec, config, batch_size), steps_per_epoch=steps, epochs=repeats + 1,
              verbose=0, callbacks=[timer])
    rates = [steps * batch_size / s for s in timer.seconds[1:]]
    label = "keras fit defaults (adam, jit auto, steps_per_execution 1)" if default_optimizer else (
        f"keras fit jit={jit_compile} steps_per_execution={steps_per_execution}")
    return _summarise(label, rates)


def time_eager_loop(spec, config, batch_size, *, steps, repeats) -> Timing:
    """The textbook loop: GradientTape in plain Python, no tf.function."""
    model = _fresh(spec, config)
    optimizer = _optimizer()
    iterator = iter(_fixed_batches(spec, config, batch_size))

    def one_step():
        inputs, labels = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(spec.loss(labels, model(inputs, training=True))[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    one_step()
    eager_steps = max(2, steps // 4)  # eager is slow; fewer steps give the same rate
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(eager_steps):
            loss = one_step()
        loss.numpy()
        rates.append(eager_steps * batch_size / (time.perf_counter() - start))
    return _summarise("eager GradientTape loop", rates)


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s (best of several), the MFU denominator."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    inner = 10

    @tf.function
    def chain(a, b):
        x = a
        for _ in range(inner):
            x = tf.matmul(x, b) * 1e-3  # keep values finite; the scale is O(n^2), negligible
        return x

    chain(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - start))
    return best


def forward_flops_per_example(model: keras.Model, inputs) -> float:
    """Forward-pass float ops per example from TF's graph profiler (counts matmuls and convolutions).

    Ops inside while loops (LSTM recurrences, looped blocks) are not seen by the profiler: families with
    loops get an analytic count from ``ANALYTIC_FORWARD_FLOPS`` instead.
    """
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype), inputs)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(specs)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=concrete.graph, run_meta=tf.compat.v1.RunMetadata(),
                                            cmd="op", options=options)
    return float(profile.total_float_ops)


# name -> f(config, inputs) forward FLOPs per example, for families whose compute hides in while loops.
ANALYTIC_FORWARD_FLOPS: dict[str, Callable] = {}


def training_flops_per_example(name: str, model, config, inputs) -> float:
    """Backward costs about twice the forward pass: training ~ 3x forward."""
    if name in ANALYTIC_FORWARD_FLOPS:
        return 3.0 * ANALYTIC_FORWARD_FLOPS[name](config, inputs)
    return 3.0 * forward_flops_per_example(model, inputs)


def benchmark_training(name: str, preset: str = "default", batch_size: int = 64, steps: int = 50,
                       repeats: int = 3, peak_flops: float | None = None) -> dict:
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    results: list[Timing] = []
    for jit in (False, True):
        for per_call in (1, 10):
            logging.info("%s: tfmstep jit=%s steps_per_call=%d", name, jit, per_call)
            results.append(time_tfmstep(spec, config, batch_size, jit_compile=jit, steps_per_call=per_call,
                                        steps=steps, repeats=repeats))
    for jit in (False, True):
        for per_execution in (1, 10):
            logging.info("%s: keras fit jit=%s steps_per_execution=%d", name, jit, per_execution)
            results.append(time_keras_fit(spec, config, batch_size, jit_compile=jit,
                                          steps_per_execution=per_execution, steps=steps, repeats=repeats))
    results.append(time_keras_fit(spec, config, batch_size, jit_compile="auto", steps_per_execution=1,
                                  steps=steps, repeats=repeats, default_optimizer=True))
    logging.info("%s: eager loop", name)
    results.append(time_eager_loop(spec, config, batch_size, steps=steps, repeats=repeats))

    ours = [r for r in results if r.name.startswith("tfmstep")]
    keras_all = [r for r in results if r.name.startswith("keras")]
    best_ours = max(ours, key=lambda r: r.examples_per_second)
    best_keras = max(keras_all, key=lambda r: r.examples_per_second)
    keras_defaults = next(r for r in results if "defaults" in r.name)
    eager = results[-1]
    default_jit = spec.xla_on_cpu
    ours_default = max((r for r in ours if r.name.startswith(f"tfmstep jit={default_jit} ")),
                       key=lambda r: r.examples_per_second)

    model = _fresh(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "train", 1, seed=0)))
    train_flops = training_flops_per_example(name, model, config, inputs)
    peak = peak_flops or matmul_peak_flops()
    return {
        "model": name, "preset": preset, "batch_size": batch_size,
        "parameters": int(model.count_params()),
        "timings": [r.as_dict() for r in results],
        "best_tfmstep": best_ours.name, "tfmstep_default_setting": ours_default.name,
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


def percentile_summary(seconds: list) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"mean_ms": float(a.mean()), "std_ms": float(a.std()), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def cnn_per_layer_times(name: str = "cnn_classifier", preset: str = "default", batch_size: int = 32,
                        repeats: int = 200) -> list:
    """Inference time of each layer of a functional model, each run on its real input from the data."""
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    model = _fresh(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "validation", batch_size)))
    # Each layer's real input: run the model once, capturing intermediate tensors.
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe(inputs, training=False)
    layer_inputs = [inputs] + list(outputs[:-1])
    rows = []
    for layer, layer_input in zip(layers, layer_inputs):
        fn = tf.function(lambda x, layer=layer: layer(x, training=False))
        fn(layer_input).numpy()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(layer_input).numpy()
            seconds.append(time.perf_counter() - start)
        rows.append({"step": layer.name, **percentile_summary(seconds)})
    total = sum(r["mean_ms"] for r in rows)
    for r in rows:
        r["share"] = r["mean_ms"] / total
    return rows
