"""Evaluation: the one loop that turns a family's per-example loss and metrics into means over a split
(used by the trainer's compiled eval step, pruning and the TF-Lite comparison), and ``evaluate``, which
runs a family's own evaluation (the registry's ``evaluate`` hook) on trained runs -- the library side of
``tfmstep-evaluate``."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import tensorflow as tf

from tfmstep.errors import UserError


def batch_sums(loss_fn: Callable, labels, outputs) -> dict:
    """``{"loss_sum", "<metric>_sum", "count"}`` of one batch, from a family loss ``loss_fn(labels,
    outputs) -> (per_example_loss, {metric: per_example_value})``. Graph-safe (the compiled eval step
    calls it inside its tf.function)."""
    per_example_loss, metrics = loss_fn(labels, outputs)
    sums = {"loss_sum": tf.reduce_sum(tf.cast(per_example_loss, tf.float32)),
            "count": tf.cast(tf.shape(per_example_loss)[0], tf.float32)}
    for name, value in metrics.items():
        sums[name + "_sum"] = tf.reduce_sum(tf.cast(value, tf.float32))
    return sums


def mean_metrics(sums: Iterable[dict], max_batches: int = 0,
                 empty_message: str = "the evaluation split is empty") -> dict:
    """Add up per-batch ``batch_sums`` (at most ``max_batches``; 0: all) -> ``{"loss": mean, metric:
    mean}`` per example. An empty split is a UserError."""
    totals: dict[str, float] = {}
    for batch in itertools.islice(sums, max_batches or None):
        for key, value in batch.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.pop("count", 0.0)
    if not count:
        raise UserError(empty_message)
    return {key[:-len("_sum")]: value / count for key, value in totals.items()}


def evaluate_outputs(loss_fn: Callable, batches: Iterable, outputs_fn: Callable, max_batches: int = 0,
                     empty_message: str = "the evaluation split is empty") -> dict:
    """Means over ``(inputs, labels)`` batches of ``outputs_fn(inputs)`` (a Keras model in inference mode,
    a TF-Lite interpreter, ...) scored by ``loss_fn``."""
    return mean_metrics((batch_sums(loss_fn, labels, outputs_fn(inputs)) for inputs, labels in batches),
                        max_batches, empty_message)


def evaluate_model(model, loss_fn: Callable, batches: Iterable, max_batches: int = 0,
                   empty_message: str = "the evaluation split is empty") -> dict:
    """Means of a Keras model's loss and metrics (``training=False``) over ``(inputs, labels)`` batches."""
    return evaluate_outputs(loss_fn, batches, lambda inputs: model(inputs, training=False), max_batches,
                            empty_message)


def evaluate(workdirs, labels=None, output_dir="", name="eval", **options) -> tuple[dict, str]:
    """Load each workdir's latest checkpoint and run its family's ``evaluate`` hook, which returns a
    report with a printable ``table``; -> (report, table)."""
    from tfmstep import trainer  # imported late: the trainer pulls in the whole package

    if not workdirs:
        raise UserError("give at least one --workdirs entry")
    runs = [(workdir, trainer.load_trained(workdir)) for workdir in workdirs]
    specs = {spec.name: spec for _, (_, _, spec) in runs}
    if len(specs) > 1:
        raise UserError(f"--workdirs mix model families ({', '.join(sorted(specs))}); evaluate one at a time")
    spec = next(iter(specs.values()))
    if spec.evaluate is None:
        raise UserError(f"model {spec.name!r} registers no evaluation (its training run's metrics.json has "
                        f"its eval metrics)")
    report = spec.evaluate(runs, labels or None, output_dir, name, **options)
    return report, report["table"]
