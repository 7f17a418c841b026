"""Model FLOPs utilisation: training FLOPs per example over this machine's measured matmul peak."""

from __future__ import annotations

import time

import keras
import tensorflow as tf


def matmul_peak_runner(dtype=tf.float32, n: int = 1024, inner: int = 10):
    """A benchmark runner (``timing.Runner``): each call times ``inner`` chained n x n matmuls in
    ``dtype`` and returns FLOP/s, so the peak is sampled in the same interleaved rounds as the steps."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)

    @tf.function
    def chain(a, b):
        x = a
        for _ in range(inner):
            x = tf.matmul(x, b) * tf.cast(1e-3, dtype)  # keep values finite
        return x

    chain(a, b).numpy()

    def run() -> float:
        start = time.perf_counter()
        chain(a, b).numpy()
        return inner * 2 * n**3 / (time.perf_counter() - start)

    return run


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s (best of several)."""
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
    loops register an analytic count as their ``forward_flops`` hook instead.
    """
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype), inputs)
    # training=True: the graph that is trained (a looped model unrolls its training iterations there).
    concrete = tf.function(lambda x: model(x, training=True)).get_concrete_function(specs)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=concrete.graph, run_meta=tf.compat.v1.RunMetadata(),
                                            cmd="op", options=options)
    return float(profile.total_float_ops)


def training_flops_per_example(spec, model: keras.Model, config, inputs) -> float:
    """Backward costs about twice the forward pass: training ~ 3x forward (the family's ``forward_flops``
    hook when it has one, else the graph profiler's count on ``inputs``)."""
    if spec.forward_flops is not None:
        return 3.0 * spec.forward_flops(config)
    return 3.0 * forward_flops_per_example(model, inputs)
