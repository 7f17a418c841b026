"""The loop around the shared step: checkpoints, exact resume, TensorBoard, progress, NaN guard, eval.

A workdir holds everything of one run:
  config.json       model name, preset, overrides and TrainConfig (a resumed run must match it), and the
                    step settings in use (``step_settings``: jit_compile, steps_per_call, how they were
                    chosen and, when auto-tuned, the steps/s of every candidate) -- reused on resume
  checkpoints/      tf.train.CheckpointManager: model, optimizer, step and input-pipeline position
  train_log.jsonl   one line per optimizer step (loss and metrics); truncated to the checkpoint on resume
  tensorboard/      scalars: train loss/metrics, learning rate, steps/s, eval loss/metrics
  metrics.json      final metrics and the step settings
Exact resume: the train stream's batch k depends only on (seed, k), and the checkpoint stores how many
batches were consumed, so a restarted run sees the same batches in the same order as an uninterrupted one.
The step settings are part of that: a resumed run uses the ones recorded in config.json (XLA and the plain
step round differently), never a new measurement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import autotune, registry, step as step_lib
from tfmstep.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("", "mixed_bfloat16")
# Auto-tuning compiles both step variants and times each candidate: runs with fewer steps left than this
# would spend a large share of their time measuring, so they take the family default without measuring
# (longer ones still fall back to it when the first timed candidate shows the rest would cost more than
# autotune.MAX_FRACTION of the run).
MIN_AUTOTUNE_STEPS = 200
DEFAULT_STEPS_PER_CALL = 10  # steps_per_call=0 when auto-tuning is skipped
# TrainConfig fields that make a recorded step setting stale when changed (then it is measured again).
_STEP_SETTING_FIELDS = ("batch_size", "mixed_precision", "distribute", "jit_compile", "steps_per_call")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch, split across replicas
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    clip_norm: float = 1.0
    jit_compile: Optional[bool] = None  # None: measured on this run (see tfmstep/autotune.py)
    steps_per_call: int = 0  # optimizer steps per compiled call (fewer Python round trips); 0: measured
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500  # 0: only at the end
    eval_batches: int = 0  # 0: the whole evaluation split
    seed: int = 0
    mixed_precision: str = ""  # "" (float32) or "mixed_bfloat16"
    distribute: str = "default"

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_call < 0:
            raise UserError(f"steps_per_call must be >= 1, or 0 to choose it by measuring; got "
                            f"{self.steps_per_call}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.distribute not in STRATEGIES:
            raise UserError(f"unknown distribute {self.distribute!r}; choose one of {', '.join(STRATEGIES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            # float16 needs dynamic loss scaling, which would sit between the step's global-norm
            # clipping and the optimizer; bfloat16 has float32's range and needs none.
            raise UserError(f"mixed_precision must be '' or 'mixed_bfloat16', got {self.mixed_precision!r}")


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint was kept."""


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":  # reads TF_CONFIG
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def _on_accelerator() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def _several_cpu_replicas(strategy: tf.distribute.Strategy) -> bool:
    try:
        local_replicas = len(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):  # the default strategy has no worker_devices
        local_replicas = 1
    return local_replicas > 1 and not _on_accelerator()


def resolve_jit_compile(config: TrainConfig, spec: registry.ModelSpec,
                        strategy: tf.distribute.Strategy) -> bool:
    """The jit_compile a run uses without measuring: the explicit setting, else the family default."""
    on_accelerator = _on_accelerator()
    if _several_cpu_replicas(strategy):
        # Several replicas on CPU devices of one host: XLA cannot place a replica's cluster on a second
        # logical CPU ("variable on a different device"), so the replicas run the plain step.
        if config.jit_compile:
            logging.warning("jit_compile is not supported with several CPU replicas; running without XLA.")
        return False
    if config.jit_compile is not None:
        return config.jit_compile
    return True if on_accelerator else spec.xla_on_cpu


def jit_compile_options(config: TrainConfig, spec: registry.ModelSpec,
                        strategy: tf.distribute.Strategy) -> tuple:
    """The jit_compile values auto-tuning may try: both, unless set explicitly or XLA is impossible."""
    if config.jit_compile is not None or _several_cpu_replicas(strategy):
        return (resolve_jit_compile(config, spec, strategy),)
    return (False, True)


def _single_process(strategy: tf.distribute.Strategy) -> bool:
    """False for multi-worker and TPU clusters: workers timing on their own could choose differently."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is None or not resolver.cluster_spec().as_dict()


def _worker_workdir(workdir: str, strategy: tf.distribute.Strategy) -> str:
    """Multi-worker runs: the chief owns the workdir; every other worker writes (the same checkpoints,
    as each must take part in saving) under workdir/workers/<id>, so nothing is written twice."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return workdir
    is_chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
    return workdir if is_chief else os.path.join(workdir, "workers", str(resolver.task_id))


def _run_record(model_name, preset, overrides, config: TrainConfig) -> dict:
    return {"model": model_name, "preset": preset, "overrides": dict(overrides),
            "train": dataclasses.asdict(config)}


def _saved_record(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _check_workdir_matches(workdir: str, record: dict) -> None:
    saved = _saved_record(workdir)
    if saved is None:
        return
    for key in ("model", "preset", "overrides"):
        # Compared as JSON stores them: a tuple override (filters=(4, 8)) comes back as a list.
        if saved.get(key) != json.loads(json.dumps(record[key])):
            raise UserError(f"workdir {workdir} holds a run with {key}={saved.get(key)!r}, not "
                            f"{record[key]!r}; use a new --workdir (nothing was changed)")


class _Run:
    """Model, optimizer and checkpoint state of one workdir."""

    def __init__(self, model_name, preset, overrides, config: TrainConfig, workdir,
                 strategy: tf.distribute.Strategy):
        self.spec = registry.get_spec(model_name)
        self.model_config = registry.get_config(model_name, preset, **overrides)
        self.strategy = strategy
        with strategy.scope():
            self.model = self.spec.build(self.model_config)
            self.optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
                learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                warmup_steps=config.warmup_steps, total_steps=config.steps, clip_norm=config.clip_norm))
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # Batches consumed from the train stream; the stream is rebuilt at this position on resume.
            self.data_position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        # Keras does not hand its layers' SeedGenerator states (dropout masks) to tf.train.Checkpoint;
        # without them a resumed run would draw different masks.
        self.rng_states = [v for v in self.model.non_trainable_variables
                           if v.name == "seed_generator_state"]
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step, data_position=self.data_position,
                                              rng_states=self.rng_states)
        self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(workdir, "checkpoints"),
                                                  max_to_keep=config.keep_checkpoints)

    def restore_latest(self) -> Optional[str]:
        path = self.manager.latest_checkpoint
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # DataLossError, shape mismatch, missing variables, truncated files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {path} is corrupt or belongs to another model "
                            f"({type(e).__name__}: {first[:200]}); it was left untouched -- move it "
                            f"away or use a new --workdir") from None
        return path


def load_trained(workdir: str):
    """(model, model_config, spec) of the run in ``workdir``, with its latest checkpoint restored."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"no trained run in {workdir} (missing config.json)")
    with open(path) as f:
        record = json.load(f)
    config = TrainConfig(**record["train"])
    run = _Run(record["model"], record["preset"], _files_found_in_workdir(record["overrides"], workdir),
               config, workdir, tf.distribute.get_strategy())
    if run.restore_latest() is None:
        raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    return run.model, run.model_config, run.spec


def _files_found_in_workdir(overrides: dict, workdir: str) -> dict:
    """Overrides naming a file by a path relative to where training ran (e.g. the LM's
    ``vocab_file=workdirs/run/vocab.spm``) that is not there from here, but whose file sits in the workdir:
    point them at the workdir's copy, so a run is usable from any directory and after being moved."""
    resolved = dict(overrides)
    for key, value in overrides.items():
        if not isinstance(value, str) or not value or os.path.isabs(value) or os.path.exists(value):
            continue
        candidate = os.path.join(workdir, os.path.basename(value))
        if os.path.isfile(candidate):
            resolved[key] = candidate
    return resolved


def _truncate_log(path: str, last_step: int) -> None:
    """Drop log lines past the restored step: steps after the last checkpoint are redone, not duplicated."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


def evaluate(steps: step_lib.Steps, dataset, strategy, max_batches: int = 0) -> dict:
    totals: dict[str, float] = {}
    for i, batch in enumerate(strategy.experimental_distribute_dataset(dataset)):
        if max_batches and i >= max_batches:
            break
        for key, value in steps.eval(batch).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.pop("count", 0.0)
    if not count:
        raise UserError("the evaluation split is empty")
    return {key[:-len("_sum")]: value / count for key, value in totals.items()}


def train(model_name: str, workdir: str, preset: str = "default",
          overrides: Optional[Mapping[str, Any]] = None, config: TrainConfig = TrainConfig()) -> dict:
    """Train (or resume) ``model_name`` in ``workdir``; returns the final metrics (also in metrics.json)."""
    overrides = dict(overrides or {})
    record = _run_record(model_name, preset, overrides, config)
    registry.get_config(model_name, preset, **overrides)  # fail on bad input before touching the workdir
    _check_workdir_matches(workdir, record)
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        return _train(model_name, workdir, preset, overrides, config, record)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _reusable_settings(saved: Optional[dict], config: TrainConfig) -> Optional[dict]:
    """The step settings an earlier run in this workdir used, if they still apply to ``config``."""
    if not saved or "step_settings" not in saved:
        return None
    before = saved.get("train", {})
    if any(before.get(name) != getattr(config, name) for name in _STEP_SETTING_FIELDS):
        logging.info("The step settings in config.json were chosen for other %s; choosing again.",
                     "/".join(_STEP_SETTING_FIELDS))
        return None
    return saved["step_settings"]


def _step_settings(run: _Run, config: TrainConfig, strategy: tf.distribute.Strategy, model_name: str,
                   saved: Optional[dict]) -> autotune.StepSettings:
    """jit_compile and steps_per_call for this run: explicit, recorded by an earlier run in the workdir
    (a resumed run must not change them), the family default (short or multi-process runs), or measured."""
    jit_options = jit_compile_options(config, run.spec, strategy)
    if len(jit_options) == 1 and config.steps_per_call:
        return autotune.StepSettings(jit_options[0], config.steps_per_call, "explicit")
    recorded = _reusable_settings(saved, config)
    if recorded is not None:
        settings = autotune.StepSettings.from_record(recorded)
        if settings.source != "reused":
            settings.note = f"{settings.source} in an earlier run in this workdir"
            settings.source = "reused"
        logging.info("Step settings from config.json (%s): jit_compile=%s, steps_per_call=%d%s",
                     settings.note, settings.jit_compile, settings.steps_per_call,
                     f"; measured steps/s: {settings.summary()}" if settings.summary() else "")
        return settings
    start = int(run.data_position.numpy())
    remaining = config.steps - int(run.step.numpy())
    reason = ""
    if remaining < MIN_AUTOTUNE_STEPS:
        reason = f"{remaining} steps to run, fewer than the {MIN_AUTOTUNE_STEPS} that pay for measuring"
    elif not _single_process(strategy):
        reason = "multi-process strategy (every worker must use the same settings)"
    fallback = (resolve_jit_compile(config, run.spec, strategy),
                config.steps_per_call or DEFAULT_STEPS_PER_CALL)
    if reason:
        settings = autotune.StepSettings(*fallback, "default", note=f"not measured: {reason}")
        logging.info("Step settings not measured (%s): jit_compile=%s (family default), steps_per_call=%d",
                     reason, settings.jit_compile, settings.steps_per_call)
        return settings
    per_call = ((config.steps_per_call,) if config.steps_per_call else autotune.steps_per_call_candidates(
        remaining, (config.log_every, config.checkpoint_every, config.eval_every)))
    return autotune.choose_step_settings(
        run.model, run.optimizer, run.spec.loss,
        lambda: run.spec.dataset(run.model_config, "train", config.batch_size, config.seed, start),
        global_batch_size=config.batch_size, run_steps=remaining, strategy=strategy,
        clip_norm=config.clip_norm, jit_options=jit_options, steps_per_call_options=per_call,
        model_name=model_name, fallback=fallback)


def _train(model_name, workdir, preset, overrides, config: TrainConfig, record: dict) -> dict:
    strategy = make_strategy(config.distribute)
    workdir = _worker_workdir(workdir, strategy)
    run = _Run(model_name, preset, overrides, config, workdir, strategy)
    saved = _saved_record(workdir)
    restored = run.restore_latest()
    log_path = os.path.join(workdir, "train_log.jsonl")
    start = int(run.step.numpy())
    if restored:
        logging.info("Resumed from %s at step %d.", restored, start)

    settings = _step_settings(run, config, strategy, model_name, saved)
    jit_compile, steps_per_call = settings.jit_compile, settings.steps_per_call
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**record, "step_settings": settings.as_record()}, f, indent=2)
    _truncate_log(log_path, start)
    train_ds = run.spec.dataset(run.model_config, "train", config.batch_size, config.seed,
                                int(run.data_position.numpy()))
    eval_ds = run.spec.dataset(run.model_config, "validation", config.batch_size, config.seed)
    steps = settings.steps  # auto-tuning hands over the chosen step, already compiled and pre-flighted
    if steps is None:
        steps = step_lib.make_steps(run.model, run.optimizer, run.spec.loss,
                                    global_batch_size=config.batch_size, strategy=strategy,
                                    jit_compile=jit_compile, clip_norm=config.clip_norm)
        if jit_compile and strategy.num_replicas_in_sync == 1:
            inputs, labels = next(iter(train_ds))
            step_lib.preflight_xla(steps, inputs, labels, model_name)
    iterator = iter(strategy.experimental_distribute_dataset(train_ds))
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    logging.info("Training %s (%s preset) for %d steps, batch %d, jit_compile=%s, steps_per_call=%d (%s), "
                 "%d replica(s), in %s", model_name, preset, config.steps, config.batch_size, jit_compile,
                 steps_per_call, settings.source, strategy.num_replicas_in_sync, workdir)

    def boundary(current: int) -> int:
        """Next step at which the loop must stop to log, checkpoint or evaluate."""
        candidates = [config.steps]
        for every in (steps_per_call, config.log_every, config.checkpoint_every, config.eval_every):
            if every:
                candidates.append((current // every + 1) * every)
        return min(candidates)

    eval_metrics: dict = {}
    started = time.perf_counter()
    window_start, window_steps, window_values = time.perf_counter(), 0, {}
    current = start
    with open(log_path, "a") as log:
        while current < config.steps:
            num = boundary(current) - current
            values = {k: v.numpy() for k, v in steps.train(iterator, tf.constant(num, tf.int32)).items()}
            finite = np.isfinite(values["loss"])
            if not finite.all():
                bad = current + int(np.argmin(finite)) + 1
                log.flush()
                raise TrainingDiverged(
                    f"loss became {values['loss'][~finite][0]} at step {bad}; training stopped. The last "
                    f"good checkpoint ({run.manager.latest_checkpoint or 'none'}) was kept. Lower "
                    f"--learning_rate or --clip_norm")
            for i in range(num):
                log.write(json.dumps({"step": current + i + 1,
                                      **{k: float(v[i]) for k, v in values.items()}}) + "\n")
            current += num
            run.step.assign(current)
            run.data_position.assign(current)
            window_steps += num
            for k, v in values.items():
                window_values[k] = window_values.get(k, 0.0) + float(v.sum())
            if current % config.log_every == 0 or current == config.steps:
                elapsed = time.perf_counter() - window_start
                means = {k: v / window_steps for k, v in window_values.items()}
                lr = step_lib.current_learning_rate(run.optimizer)
                with writer.as_default(step=current):
                    for k, v in means.items():
                        tf.summary.scalar(f"train/{k}", v)
                    tf.summary.scalar("train/learning_rate", lr)
                    tf.summary.scalar("train/steps_per_second", window_steps / elapsed)
                logging.info("step %d/%d  %s  lr=%.3g  %.1f steps/s", current, config.steps,
                             "  ".join(f"{k}={v:.4f}" for k, v in means.items()), lr,
                             window_steps / elapsed)
                window_start, window_steps, window_values = time.perf_counter(), 0, {}
            if current % config.checkpoint_every == 0 or current == config.steps:
                log.flush()
                run.manager.save(checkpoint_number=current)
            if (config.eval_every and current % config.eval_every == 0) or current == config.steps:
                eval_metrics = evaluate(steps, eval_ds, strategy, config.eval_batches)
                with writer.as_default(step=current):
                    for k, v in eval_metrics.items():
                        tf.summary.scalar(f"eval/{k}", v)
                logging.info("eval at step %d: %s", current,
                             "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    writer.flush()
    if not eval_metrics:  # already finished before this call: evaluate what is there
        eval_metrics = evaluate(steps, eval_ds, strategy, config.eval_batches)
    final = {"model": model_name, "preset": preset, "step": current, "eval": eval_metrics,
             "train_seconds_this_run": round(time.perf_counter() - started, 2),
             "parameters": int(run.model.count_params()), "jit_compile": jit_compile,
             "steps_per_call": steps_per_call, "step_settings": settings.as_record()}
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(final, f, indent=2)
    logging.info("Final metrics: %s", json.dumps(final))
    return final
