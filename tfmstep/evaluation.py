"""Evaluation. The one loop that turns a family's per-example loss and metrics into means over a split is
``batch_sums`` + ``mean_metrics`` (defined beside the compiled eval step in ``tfmstep/step.py``, which the
trainer uses, so that this module can load trained runs without an import circle); here:
``evaluate_model`` / ``evaluate_outputs`` run it on a Keras model or any outputs function (pruning, the
TF-Lite comparison), and ``evaluate`` runs a family's own evaluation (the registry's ``evaluate`` hook) on
trained runs -- the library side of ``tfmstep-evaluate``."""

from __future__ import annotations

from typing import Callable, Iterable

from tfmstep.errors import UserError
from tfmstep.step import batch_sums, mean_metrics

__all__ = ["batch_sums", "mean_metrics", "evaluate_outputs", "evaluate_model", "evaluate"]


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


def evaluate(workdirs, labels=None, output_dir="", name="eval", config_overrides=None,
             **options) -> tuple[dict, str]:
    """Load each workdir's latest checkpoint and run its family's ``evaluate`` hook, which returns a
    report with a printable ``table``; -> (report, table). ``config_overrides``: {field: value} of the
    family's ``inference_fields`` (a halting rule, a loop cap) to evaluate the trained weights under."""
    from tfmstep import saving  # imported late: loading a run pulls in the trainer and the families

    if not workdirs:
        raise UserError("give at least one --workdirs entry")
    runs = [(workdir, saving.load_trained(workdir)) for workdir in workdirs]
    specs = {spec.name: spec for _, (_, _, spec) in runs}
    if len(specs) > 1:
        raise UserError(f"--workdirs mix model families ({', '.join(sorted(specs))}); evaluate one at a time")
    spec = next(iter(specs.values()))
    if spec.evaluate is None:
        raise UserError(f"model {spec.name!r} registers no evaluation (its training run's metrics.json has "
                        f"its eval metrics)")
    if config_overrides:
        runs = [(workdir, _with_inference_config(model, spec.inference_config(config, config_overrides), spec))
                for workdir, (model, config, spec) in runs]
    report = spec.evaluate(runs, labels or None, output_dir, name, **options)
    return report, report["table"]


def _with_inference_config(model, config, spec):
    """(model, config, spec) with the trained weights in a model built from ``config``."""
    rebuilt = spec.build(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt, config, spec
