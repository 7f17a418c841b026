"""Timing primitives of the benchmark: interleaved repeats of set-up runners, timing inside one graph
loop, and percentile summaries. Families' ``inference_timer`` hooks use ``time_in_loop`` and
``percentile_summary``."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Timing:
    name: str
    examples_per_second: float  # median over repeats
    spread: float  # (max - min) / median over repeats
    repeats: list

    def as_dict(self):
        return dataclasses.asdict(self)


def summarise(name: str, per_repeat_rates: list) -> Timing:
    median = statistics.median(per_repeat_rates)
    return Timing(name, median, (max(per_repeat_rates) - min(per_repeat_rates)) / median,
                  [round(r, 2) for r in per_repeat_rates])


# A runner is set up (built, traced, compiled, warmed up) once; each call times one repeat and returns
# examples/s. ``time_interleaved`` calls all of a model's runners in turn, repeat after repeat, so slow
# drifts of this shared machine hit every setting alike instead of whichever happened to run then.
Runner = Callable[[], float]


def time_interleaved(runners: dict, repeats: int) -> list:
    """``{name: runner}`` -> one Timing per runner, repeats taken round-robin across the runners after one
    untimed round."""
    rates = {name: [] for name in runners}
    # One untimed round first: a setting's first call after the others were compiled ran 3-7x slower
    # (measured: the round-1 outliers in benchmarks/results.json of the 2026-11-23 run).
    for run in runners.values():
        run()
    for _ in range(repeats):
        for name, run in runners.items():
            rates[name].append(run())
    return [summarise(name, per_repeat) for name, per_repeat in rates.items()]


def percentile_summary(seconds: list) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"mean_ms": float(a.mean()), "std_ms": float(a.std()), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def time_in_loop(fn: Callable, inputs, repeats: int = 50, inner: int = 20) -> list:
    """Seconds per ``fn(inputs)`` call, each sample the mean of ``inner`` calls inside one tf.function
    loop, so the ~0.3 ms Python->graph dispatch is not what is measured. ``inputs`` may be any nest of
    tensors."""

    def perturbed(t, i):  # the loop index feeds every numeric input, so no call can be hoisted or merged
        return t + tf.cast(i, t.dtype) * 0 if t.dtype.is_floating or t.dtype.is_integer else t

    @tf.function
    def loop(x):
        acc = tf.zeros((), tf.float32)
        for i in tf.range(inner):
            y = fn(tf.nest.map_structure(lambda t: perturbed(t, i), x))
            acc += tf.cast(tf.reduce_sum(tf.nest.flatten(y)[0]), tf.float32) * 0.0
        return acc

    loop(inputs).numpy()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop(inputs).numpy()
        seconds.append((time.perf_counter() - start) / inner)
    return seconds


def latencies(call: Callable, repeats: int) -> dict:
    """Percentiles of the wall time of ``call()`` from Python (after one warm-up call)."""
    call()  # warm-up (tracing, allocation)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return percentile_summary(seconds)
