"""THE compiled training step, shared by every model in the zoo.

``make_steps`` builds, for any registered model, a train function that runs ``steps_per_call`` optimizer
steps in one ``tf.function`` call, and an eval function. Each single step (forward, backward, clipping and
the optimizer update) is one XLA cluster when ``jit_compile`` is on. The multi-step loop around it is a
plain ``tf.function`` ``while`` loop: measured on CPU, putting the loop itself under XLA was much slower
than looping over single jitted steps (a while-loop of several CNN steps ran 40x slower than single
steps in a probe). Under a ``tf.distribute.Strategy`` each replica runs
the step on its share of the global batch; losses are scaled by the *global* batch size so the summed
gradients equal single-device training.

Numerics are part of the step settings too: ``set_precision`` puts a built model's layers under a Keras
mixed-precision policy (variables stay float32, so checkpoints do not depend on it), and with
``mixed_float16`` the optimizer is a ``keras.optimizers.LossScaleOptimizer`` whose scale the step applies
to the loss and to the clipping threshold (see ``make_steps``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import weakref
from typing import Callable, Iterable

import keras
import tensorflow as tf

from tfmstep.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    cooldown_steps: int = 0  # the last this many steps fall linearly from the cosine's value to 0
    # No clip_norm here: clipping is part of the step (``make_steps(clip_norm=...)``), because it must see
    # the all-reduced gradient, which the optimizer never does under a distribution strategy.
    beta_1: float = 0.9
    beta_2: float = 0.999


@keras.saving.register_keras_serializable(package="tfmstep")
class Cooldown(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule`` times a linear fall to 0 over the last ``cooldown_steps`` of ``total_steps``: the
    "decay" of warmup-stable-decay schedules (Hu et al. 2024, MiniCPM), which Keras does not ship. With a
    cosine floor (min_lr_ratio) it lets late curriculum stages train at a useful rate and still ends at 0."""

    def __init__(self, schedule, total_steps, cooldown_steps):
        self.schedule, self.total_steps, self.cooldown_steps = schedule, total_steps, cooldown_steps

    def __call__(self, step):
        learning_rate = self.schedule(step)
        remaining = tf.cast(self.total_steps, learning_rate.dtype) - tf.cast(step, learning_rate.dtype)
        return learning_rate * tf.clip_by_value(remaining / self.cooldown_steps, 0.0, 1.0)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "total_steps": self.total_steps, "cooldown_steps": self.cooldown_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config, schedule=keras.optimizers.schedules.deserialize(config["schedule"]))
        return cls(**config)


def make_optimizer(config: OptimizerConfig) -> keras.optimizers.Optimizer:
    """AdamW with linear warmup then cosine decay (both from Keras), optionally ending in a linear
    cooldown to 0."""
    warmup = max(0, min(config.warmup_steps, config.total_steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(1, config.total_steps - warmup),
        alpha=config.min_lr_ratio,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    if config.cooldown_steps:
        schedule = Cooldown(schedule, config.total_steps, config.cooldown_steps)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay,
                                  beta_1=config.beta_1, beta_2=config.beta_2)


# Compute precisions of the step: Keras policy names ("float32" is also written "" in older configs).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# The layers of a model that follow its precision: those built under the global policy (not the ones a
# family pinned with an explicit dtype, such as float32 logits). Found once per model, at the first call.
_FOLLOWING_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_precision(model: keras.Model, precision: str) -> None:
    """Put ``model`` (built under the global policy, float32 by default) under the mixed-precision policy
    ``precision``, or back to float32. Only the compute dtype changes (Keras autocasts inputs and
    variables at call time), so functions traced afterwards run in that precision and those traced
    before keep theirs; the weights are untouched."""
    precision = precision or "float32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    layers = _FOLLOWING_LAYERS.get(model)
    if layers is None:
        default = keras.mixed_precision.global_policy()
        layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
                  if layer.dtype_policy is default]
        _FOLLOWING_LAYERS[model] = layers
    policy = keras.mixed_precision.DTypePolicy(precision)
    for layer in layers:
        layer.dtype_policy = policy


def model_precision(model: keras.Model) -> str:
    return model.dtype_policy.name


def needs_loss_scaling(precision: str) -> bool:
    return precision == "mixed_float16"


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


# The one evaluation loop (the compiled eval step, trainer, pruning, TF-Lite comparison, saved models).

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


@dataclasses.dataclass
class Steps:
    """The compiled functions for one model/optimizer/strategy."""

    train: Callable  # train(distributed_iterator, num_steps) -> {"loss": [n], metric: [n]}
    eval: Callable  # eval(distributed_batch) -> {"loss_sum", metric+"_sum", "count"}
    train_single: Callable  # one replica-local step (for XLA pre-flight and benchmarks)


def make_steps(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn: Callable,
               *, global_batch_size: int, strategy: tf.distribute.Strategy | None = None,
               jit_compile: bool = False, clip_norm: float = 1.0) -> Steps:
    """Build the train and eval functions for ``model``.

    ``loss_fn(labels, outputs) -> (per_example_loss, {name: per_example_metric})``.
    Create ``model`` and ``optimizer`` (and call ``optimizer.build``) under ``strategy.scope()``.
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_replicas = strategy.num_replicas_in_sync
    variables = model.trainable_variables
    # float16 needs loss scaling. The gradients reach the clipping still multiplied by the scale (the
    # LossScaleOptimizer divides it out in ``apply`` and skips the step when they are not finite), so the
    # clipping threshold is scaled too: clip(s*g, s*c) = s*clip(g, c). Non-finite gradients give a
    # non-finite norm, which clipping turns into NaNs, which the optimizer then skips.
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(inputs, labels):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            per_example_loss, metrics = loss_fn(labels, outputs)
            loss = tf.nn.compute_average_loss(tf.cast(per_example_loss, tf.float32),
                                              global_batch_size=global_batch_size)
            if model.losses:  # weight regularisers, halting costs: counted once across replicas
                loss += tf.nn.scale_regularization_loss(tf.add_n([tf.cast(x, tf.float32)
                                                                  for x in model.losses]))
            objective = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(objective, variables)
        if num_replicas > 1:
            # Keras clips each replica's partial gradient *before* its all-reduce; global-norm clipping
            # must see the summed gradient, so reduce here, clip, and hand Keras 1/n of it to re-sum.
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm > 0:
            limit = clip_norm * tf.cast(optimizer.dynamic_scale, tf.float32) if scaled else clip_norm
            grads, _ = tf.clip_by_global_norm(grads, limit)
        if num_replicas > 1:
            grads = [None if g is None else g / num_replicas for g in grads]
        optimizer.apply(grads, variables)
        out = {"loss": loss}
        for name, value in metrics.items():
            out[name] = tf.nn.compute_average_loss(tf.cast(value, tf.float32),
                                                   global_batch_size=global_batch_size)
        return out

    compiled_step = tf.function(replica_step, jit_compile=jit_compile, reduce_retracing=True)

    def next_step(iterator):
        inputs, labels = next(iterator)
        per_replica = strategy.run(compiled_step, args=(inputs, labels))
        return {k: tf.cast(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), tf.float32)
                for k, v in per_replica.items()}

    @tf.function
    def train(iterator, num_steps):
        """Run ``num_steps`` (>= 1, a tensor so changing it does not retrace) steps; per-step values."""
        first = next_step(iterator)  # outside the loop: it fixes the metric names for the TensorArrays
        history = {k: tf.TensorArray(tf.float32, size=num_steps).write(0, v) for k, v in first.items()}
        for i in tf.range(1, num_steps):
            values = next_step(iterator)
            history = {k: history[k].write(i, values[k]) for k in history}
        return {k: v.stack() for k, v in history.items()}

    def replica_eval(inputs, labels):
        return batch_sums(loss_fn, labels, model(inputs, training=False))

    compiled_eval = tf.function(replica_eval, jit_compile=jit_compile, reduce_retracing=True)

    @tf.function
    def evaluate(batch):
        inputs, labels = batch
        per_replica = strategy.run(compiled_eval, args=(inputs, labels))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    return Steps(train=train, eval=evaluate, train_single=compiled_step)


def preflight_xla(steps: Steps, inputs, labels, model_name: str) -> None:
    """Compile the jitted step once, before training, and turn an XLA failure into one clear line.

    Only lowers to HLO (nothing runs, no variable changes). Without this, an op XLA cannot compile
    shows up as a long stack trace after the first data has been read. Single-replica only: the
    replica step needs a replica context to all-reduce, which only ``strategy.run`` gives.
    """
    try:
        steps.train_single.experimental_get_compiler_ir(inputs, labels)(stage="hlo")
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError) as e:
        message = str(e)
        ops = sorted(set(re.findall(r"\b([A-Z][A-Za-z0-9]+) \(No registered", message)))
        ops += sorted(set(re.findall(r"unsupported operations[^\n]*\n?[^\n]*?([A-Z]\w+)", message)))
        first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        what = f"ops {', '.join(ops)}" if ops else first
        raise UserError(f"XLA cannot compile the train step of {model_name!r} ({what}); "
                        f"run with --nojit_compile to train without XLA") from e
