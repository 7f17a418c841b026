"""Magnitude pruning to a target sparsity with a polynomial schedule, during fine-tuning, on Keras 3.

tensorflow-model-optimization (``tfmot.sparsity.keras``) only supports Keras 2 (tf-keras), so this is a
small re-implementation of its ``PolynomialDecay`` + magnitude ``prune_low_magnitude`` for Keras 3: every
``frequency`` steps between ``begin_step`` and ``end_step`` each prunable kernel keeps its largest-magnitude
weights and zeroes the rest, the pruned fraction following

    s(t) = s_final + (s_initial - s_final) * (1 - (t - begin) / (end - begin)) ** power   (Zhu & Gupta 2017)

Pruning hands models to the exporter and never calls it: ``pruning_sweep`` returns the fine-tuned models
with their validation metrics, ``tfmstep.export.export_pruned`` writes and measures their TF-Lite files.

Fine-tuning runs through the shared step (``tfmstep.step.make_steps``): ``frequency`` optimizer steps per
compiled call, then the masks are re-applied, so a pruned weight is zero whenever the model is read
(evaluation, checkpoints, export). Masks only ever grow: a weight once pruned stays pruned.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfmstep import evaluation, registry, step as step_lib
from tfmstep.errors import UserError


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    target_sparsity: float = 0.8
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 200  # the target is reached here; fine-tuning may continue after it
    frequency: int = 10  # steps between mask updates (= optimizer steps per compiled call)
    power: float = 3.0
    # Kernels with fewer weights stay dense: a digit CNN's first conv and classifier hold ~1% of the
    # weights but lose the most accuracy when pruned (0 prunes every kernel, as tfmot does).
    min_elements: int = 0

    def __post_init__(self):
        if not 0.0 <= self.initial_sparsity <= self.target_sparsity < 1.0:
            raise UserError(f"need 0 <= initial_sparsity <= target_sparsity < 1, got "
                            f"{self.initial_sparsity}, {self.target_sparsity}")
        if self.begin_step < 0 or self.end_step <= self.begin_step:
            raise UserError(f"need 0 <= begin_step < end_step, got {self.begin_step}, {self.end_step}")
        if self.frequency < 1:
            raise UserError(f"frequency must be >= 1, got {self.frequency}")


def polynomial_sparsity(step: int, config: PruningConfig) -> float:
    """The scheduled sparsity at ``step`` (0 before begin_step, the target after end_step)."""
    if step < config.begin_step:
        return 0.0
    progress = min(1.0, (step - config.begin_step) / (config.end_step - config.begin_step))
    return config.target_sparsity + (config.initial_sparsity - config.target_sparsity) * (
        1.0 - progress) ** config.power


def prunable_weights(model: keras.Model, min_elements: int = 0) -> list:
    """Kernels of Dense/Conv/LSTM layers (rank >= 2, trainable, at least ``min_elements`` weights): where
    the parameters are. Biases, norms and embeddings are left dense."""
    return [v for v in model.trainable_variables
            if len(v.shape) >= 2 and v.path.rsplit("/", 1)[-1] in ("kernel", "recurrent_kernel")
            and int(np.prod(v.shape)) >= min_elements]


class MagnitudePruner:
    """Per-weight binary masks; ``update(sparsity)`` prunes the smallest surviving magnitudes."""

    def __init__(self, model: keras.Model, min_elements: int = 0):
        self.weights = prunable_weights(model, min_elements)
        if not self.weights:
            raise UserError(f"model {model.name} has no prunable kernels with >= {min_elements} weights")
        self.masks = [np.ones(v.shape, np.float32) for v in self.weights]

    def update(self, sparsity: float) -> None:
        for i, variable in enumerate(self.weights):
            values = np.abs(np.asarray(variable.numpy()) * self.masks[i]).reshape(-1)
            prune = int(round(sparsity * values.size))
            if prune <= int((self.masks[i] == 0).sum()):
                continue  # never un-prune
            order = np.argsort(values, kind="stable")  # pruned weights (0) come first
            mask = np.ones(values.size, np.float32)
            mask[order[:prune]] = 0.0
            self.masks[i] = mask.reshape(variable.shape)
        self.apply()

    def apply(self) -> None:
        for variable, mask in zip(self.weights, self.masks):
            variable.assign(variable.numpy() * mask)

    def sparsity(self) -> float:
        """Fraction of exactly-zero values over all prunable kernels (measured, not scheduled)."""
        zeros = sum(int((np.asarray(v.numpy()) == 0).sum()) for v in self.weights)
        return zeros / sum(int(np.prod(v.shape)) for v in self.weights)


def _spec(model):
    """The family a call is about: a ModelSpec given by the caller, or a registered name (looked up here,
    once per public call)."""
    return registry.resolve(model)


def fine_tune_with_pruning(model: keras.Model, model_name, model_config, pruning: PruningConfig, *,
                           steps: int, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
                           jit_compile: bool | None = None) -> dict:
    """Fine-tune ``model`` in place while pruning it; returns {"sparsity", "eval": {...}, "history"}.
    ``model_name``: the family's ModelSpec (or its registered name)."""
    if steps < pruning.end_step:
        raise UserError(f"steps ({steps}) must be >= the pruning end_step ({pruning.end_step})")
    spec = _spec(model_name)
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
        learning_rate=learning_rate, warmup_steps=0, total_steps=steps, weight_decay=0.0,
        min_lr_ratio=0.1))
    optimizer.build(model.trainable_variables)
    steps_fn = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=batch_size,
                                   jit_compile=spec.xla_on_cpu if jit_compile is None else jit_compile)
    iterator = iter(spec.dataset(model_config, "train", batch_size, seed=seed))
    pruner = MagnitudePruner(model, pruning.min_elements)
    history = []
    step = 0
    while step < steps:
        if pruning.begin_step <= step <= pruning.end_step:
            pruner.update(polynomial_sparsity(step, pruning))
        num = min(pruning.frequency, steps - step)
        losses = steps_fn.train(iterator, tf.constant(num, tf.int32))["loss"].numpy()
        pruner.apply()  # the optimizer moved pruned weights off zero during the call
        step += num
        history.append({"step": step, "loss": float(losses.mean()), "sparsity": pruner.sparsity()})
    pruner.update(pruning.target_sparsity)  # exactly the target at the end
    return {"sparsity": pruner.sparsity(), "eval": evaluate(model, spec, model_config, steps_fn),
            "history": history}


def evaluate(model: keras.Model, model_name, model_config, steps_fn=None, batch_size: int = 64) -> dict:
    """Mean loss and metrics on the validation split, through the trainer's loop
    (``evaluation.mean_metrics``); with ``steps_fn`` (a ``step.Steps`` of ``model``) its compiled eval
    step computes each batch, as in training. ``model_name``: a ModelSpec or a registered name."""
    spec = _spec(model_name)
    batches = spec.dataset(model_config, "validation", batch_size)
    empty = f"the validation split of {spec.name} is empty"
    if steps_fn is not None:
        return evaluation.mean_metrics((steps_fn.eval(batch) for batch in batches), empty_message=empty)
    return evaluation.evaluate_model(model, spec.loss, batches, empty_message=empty)


@dataclasses.dataclass
class PruningSweep:
    """What ``pruning_sweep`` hands to the exporter: the report (one row per model, metrics on
    validation) and the models themselves, by the row's ``tag``. ``tfmstep.export.export_pruned`` writes
    each model's TF-Lite files and adds their sizes to its row."""

    model_name: str
    config: object
    report: dict
    models: dict  # {tag: keras.Model}
    spec: registry.ModelSpec | None = None  # the family, resolved once by the sweep


def pruning_sweep(model: keras.Model, model_name, model_config, sparsities: list, steps: int,
                  batch_size: int = 64, learning_rate: float = 1e-3, min_elements: int = 0) -> PruningSweep:
    """For each target sparsity (0 = the same fine-tuning without pruning): fine-tune a copy of ``model``
    while pruning and measure it on the validation split. ``model`` itself is the first row ("trained").
    Nothing is exported here: export the returned models (``tfmstep.export.export_pruned``).
    ``model_name``: the family's ModelSpec (e.g. from ``tfmstep.saving.load_trained``) or its registered name."""
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise UserError(f"sparsities must be in [0, 1), got {sparsities}")
    spec = _spec(model_name)
    rows = [{"tag": "trained", "sparsity_target": None, "label": "trained (no fine-tuning)",
             "eval": evaluate(model, spec, model_config)}]
    models = {"trained": model}
    for target in sorted(set([0.0] + list(sparsities))):
        copy = spec.build(model_config)
        copy.set_weights(model.get_weights())
        schedule = PruningConfig(target_sparsity=target, end_step=max(1, (2 * steps) // 3),
                                 frequency=min(10, max(1, steps // 10)), min_elements=min_elements)
        result = fine_tune_with_pruning(copy, spec, model_config, schedule, steps=steps,
                                        batch_size=batch_size, learning_rate=learning_rate)
        tag = f"s{target:g}"
        rows.append({"tag": tag, "sparsity_target": target, "label": f"fine-tuned, sparsity {target:g}",
                     "sparsity_measured": round(result["sparsity"], 4), "eval": result["eval"]})
        models[tag] = copy
    pruned = prunable_weights(model, min_elements)
    kernels = prunable_weights(model)
    report = {"model": spec.name, "steps": steps, "learning_rate": learning_rate,
              "min_elements": min_elements, "pruned_kernels": [v.path for v in pruned],
              "pruned_fraction_of_kernel_weights": sum(int(np.prod(v.shape)) for v in pruned)
              / sum(int(np.prod(v.shape)) for v in kernels), "rows": rows}
    return PruningSweep(spec.name, model_config, report, models, spec)


def pruning_table(report: dict) -> str:
    """Markdown: validation metrics and TF-Lite sizes (raw / gzip) per sparsity."""
    rows = report["rows"]
    formats = [k for k in rows[0] if k.startswith("tflite_")]
    metric_names = list(rows[0]["eval"])
    header = (["model", "sparsity (measured)"] + [f"Keras {m}" for m in metric_names]
              + [f"{f} {m}" for f in formats for m in ("accuracy", "bytes", "gzip bytes")])
    lines = [f"{report['model']}: {report['steps']} fine-tuning steps per row (lr {report['learning_rate']:g}); "
             f"sparsity measured over the pruned kernels ({', '.join(report.get('pruned_kernels', []))}: "
             f"{100 * report.get('pruned_fraction_of_kernel_weights', 1.0):.1f}% of all kernel weights); "
             f"accuracy on the validation split.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], "-" if row.get("sparsity_measured") is None else f"{row['sparsity_measured']:.3f}"]
        cells += [f"{row['eval'][m]:.4f}" for m in metric_names]
        for fmt in formats:
            entry = row[fmt]
            accuracy = entry["metrics"].get("accuracy", entry["metrics"].get("token_accuracy", float("nan")))
            cells += [f"{accuracy:.4f}", str(entry["bytes"]), str(entry["gzip_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
