"""The loop around the shared step: checkpoints, exact resume, TensorBoard, progress, NaN guard, eval.

A workdir holds everything of one run:
  config.json       model name, preset, overrides and TrainConfig (a resumed run must match it), every
                    model config field as trained (restore and resume rebuild that model even if a default
                    changed since), and the step settings in use (``step_settings``: jit_compile,
                    steps_per_call, how they were chosen and, when auto-tuned, the steps/s of every
                    candidate) -- reused on resume
  checkpoints/      tf.train.CheckpointManager: model, optimizer, step and input-pipeline position, saved
                    every ``checkpoint_every`` steps, every ``checkpoint_every_secs`` seconds, at the end,
                    and on SIGTERM/SIGINT (then the run stops: a preempted run loses at most one call)
  checkpoints/best/ the checkpoint with the lowest smoothed train loss so far, or with keep_best=eval_loss the
                    lowest validation loss, restored at the end (``best.json`` says which)
  train_log.jsonl   one line per optimizer step (loss and metrics); truncated to the checkpoint on resume
  tensorboard/      scalars: train loss/metrics, learning rate, steps/s, eval loss/metrics
  metrics.json      final metrics and the step settings
Exact resume: the train stream's batch k depends only on (seed, k), and the checkpoint stores how many
batches were consumed, so a restarted run sees the same batches in the same order as an uninterrupted one.
The step settings are part of that: a resumed run uses the ones recorded in config.json (XLA and the plain
step round differently), never a new measurement.

Nothing already saved is lost: every file the trainer rewrites is written atomically (``tfmstep.fileio``);
data, config and workdir are checked before the first write, so a rejected command leaves the workdir as it
was; a checkpoint state that cannot be read, or a newest checkpoint that cannot be restored, is an error
naming the file and the way out (``restore_from``), never a silent restart from step 0.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import autotune, fileio, registry, step as step_lib
from tfmstep.data import common as data_common
from tfmstep.errors import UserError
# TrainConfig lives in a module without TensorFlow (the tools check flags before importing it)
from tfmstep.train_config import (DEFAULT_CHECKPOINT_EVERY_SECS, MIXED_PRECISION, STRATEGIES,  # noqa: F401
                                  TrainConfig)

# The step-settings policy lives in tfmstep/autotune.py; these names are kept for callers of the trainer.
MIN_AUTOTUNE_STEPS = autotune.MIN_AUTOTUNE_STEPS
DEFAULT_STEPS_PER_CALL = autotune.DEFAULT_STEPS_PER_CALL
resolve_jit_compile = autotune.resolve_jit_compile
jit_compile_options = autotune.jit_compile_options

BEST_DIR = "best"
BEST_RECORD = "best.json"
# The best checkpoint is judged by an exponential moving average of the per-step train loss (bias
# corrected): about the last 1 / (1 - LOSS_SMOOTHING) = 50 steps.
LOSS_SMOOTHING = 0.98
_CKPT_INDEX = re.compile(r"^ckpt-(\d+)\.index$")
_clock = time.monotonic  # the checkpoint timer's clock (tests replace it)
PROGRESS_SECONDS = 10.0  # a progress line (steps/s, ETA) at least this often, whatever log_every says


class ProgressRate:
    """steps/s over about the last ``window`` seconds, and the time left at that rate. The whole run's
    average misleads once the pace changes -- a curriculum stage padded to longer problems, another job on
    the machine: registers' k <= 1 stage runs ~2.5x faster than its k <= 8 stage, and the average then said
    "ETA 10m" at step 3600 of a run with ~20 min left."""

    def __init__(self, step: int, now: float, window: float = 120.0):
        self.window = window
        self.samples = collections.deque([(now, step)])

    def update(self, step: int, now: float) -> None:
        self.samples.append((now, step))
        # Drop the oldest sample while the next one still spans the window.
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float:
        (start_time, start_step), (now, step) = self.samples[0], self.samples[-1]
        return (step - start_step) / (now - start_time) if now > start_time else 0.0

    def text(self, total_steps: int) -> str:
        rate, step = self.rate(), self.samples[-1][1]
        left = 0.0 if step >= total_steps else (total_steps - step) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 60)}m{int(left % 60):02d}s" if math.isfinite(left) else "?"
        return f"{rate:.1f} steps/s, ETA {eta}"


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last finite and the best checkpoints were kept."""


class TrainingInterrupted(UserError):
    """SIGTERM or SIGINT: a checkpoint of the current step was saved, then the run stopped."""


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


# --- what the workdir already holds ----------------------------------------------------------------------

def _run_record(model_name, preset, overrides, config: TrainConfig, model_config) -> dict:
    # model_config: every field, so a later change of a default cannot change this run
    return {"model": model_name, "preset": preset, "overrides": dict(overrides),
            "train": dataclasses.asdict(config),
            "model_config": json.loads(json.dumps(dataclasses.asdict(model_config)))}


def _recorded_model_config(spec, record: dict, workdir: str):
    """The model config a workdir's run was trained with: its recorded fields (``model_config``; a
    field added since takes its default) or, for runs recorded before that, its preset and overrides
    under today's defaults. File overrides point at the workdir's copies (``_files_found_in_workdir``)."""
    known = {f.name for f in dataclasses.fields(spec.config_class)}
    values = {k: v for k, v in (record.get("model_config") or {}).items() if k in known}
    values.update(_files_found_in_workdir(record["overrides"], workdir))
    return spec.config(record["preset"], **values)


def _saved_record(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or "model" not in record:
            raise ValueError("no 'model' entry")
        return record
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): it is damaged. It only records the command of the run: "
                        f"remove it and rerun the same command to resume (the checkpoints are kept and "
                        f"are checked against the model when restored)") from None


def _checkpoint_numbers(directory: str) -> list:
    """Numbers N of the complete-looking ``ckpt-N`` checkpoints (an ``.index`` file) in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_CKPT_INDEX.match, names) if m)


def _listing(numbers: list) -> str:
    shown = [f"ckpt-{n}" for n in numbers[-5:]]
    return ", ".join((["..."] if len(numbers) > 5 else []) + shown) or "none"


def _log_size(workdir: str) -> int:
    try:
        return os.path.getsize(os.path.join(workdir, "train_log.jsonl"))
    except OSError:
        return 0


def _has_training(workdir: str) -> bool:
    """Whether the workdir holds any trained state (checkpoints or logged steps), as opposed to a
    config.json written by a run that stopped before its first step."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return bool(_checkpoint_numbers(ckpt_dir) or _checkpoint_numbers(os.path.join(ckpt_dir, BEST_DIR))
                or _log_size(workdir) or os.path.exists(os.path.join(workdir, "metrics.json")))


def _check_workdir_matches(workdir: str, record: dict) -> None:
    saved = _saved_record(workdir)
    if saved is None:
        return
    for key in ("model", "preset", "overrides"):
        # Compared as JSON stores them: a tuple override (filters=(4, 8)) comes back as a list.
        if saved.get(key) != json.loads(json.dumps(record[key])):
            if not _has_training(workdir):
                logging.info("%s/config.json has %s=%r but nothing was trained there yet; it is replaced.",
                             workdir, key, saved.get(key))
                return
            raise UserError(f"workdir {workdir} holds a run with {key}={saved.get(key)!r}, not "
                            f"{record[key]!r}; use a new --workdir (nothing was changed)")


def _check_checkpoint_state(workdir: str, restore_from: str, starting: bool = True) -> None:
    """Refuse to start from scratch over saved checkpoints: a state file (``checkpoints/checkpoint``)
    that cannot be read, or checkpoints without one, is an error naming the way out, unless the
    checkpoint to restore is given explicitly (then an unreadable state file is moved aside, not
    deleted, because tf.train.CheckpointManager cannot start over it)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    state_file = os.path.join(ckpt_dir, "checkpoint")
    numbers = _checkpoint_numbers(ckpt_dir)
    problem = ""
    if os.path.exists(state_file):
        try:
            state = tf.train.get_checkpoint_state(ckpt_dir)  # None (and a log line) if it does not parse
        except (ValueError, tf.errors.OpError) as e:  # e.g. an empty file: "Invalid checkpoint state"
            state, problem = None, str(e).splitlines()[0]
        if state is None or not state.model_checkpoint_path:
            problem = f"{state_file} cannot be read" + (f" ({problem})" if problem else "")
    elif numbers:
        problem = f"{ckpt_dir} has checkpoints but no 'checkpoint' state file"
    elif _checkpoint_numbers(os.path.join(ckpt_dir, BEST_DIR)):
        problem = f"{ckpt_dir} has no checkpoint but {ckpt_dir}/{BEST_DIR} has one"
    elif starting and os.path.exists(os.path.join(workdir, "metrics.json")):
        raise UserError(f"workdir {workdir} holds a finished run (metrics.json) but no checkpoints; starting "
                        f"over would overwrite it -- use a new --workdir")
    if not problem:
        return
    if not restore_from:
        newest = f"--restore_from=ckpt-{numbers[-1]}" if numbers else "--restore_from=best"
        raise UserError(f"{problem}; not starting over from step 0 (that would overwrite the saved "
                        f"checkpoints: {_listing(numbers)}). Rerun with {newest} (or an older "
                        f"--restore_from=ckpt-N) to resume from a checkpoint explicitly; nothing was changed")
    if os.path.exists(state_file) and problem.startswith(state_file):
        aside = f"{state_file}.unreadable-{int(time.time())}"
        try:
            os.replace(state_file, aside)
        except OSError as e:
            raise UserError(f"{problem}, and it cannot be moved aside: {e.strerror or e}") from None
        logging.warning("%s; moved it to %s and restoring %s as asked.", problem, aside, restore_from)


def _clean_leftovers(workdir: str) -> None:
    """Remove what a killed write leaves behind: TF's ``ckpt-N_temp/`` shard directories (a checkpoint is
    only complete once they are merged) and ``fileio``'s temporary files. Nothing complete is touched."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for directory in (ckpt_dir, os.path.join(ckpt_dir, BEST_DIR)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith("_temp") and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                logging.info("Removed %s, left by a checkpoint write that did not finish.", path)
        fileio.remove_stale_temporaries(directory)
    for path in fileio.remove_stale_temporaries(workdir):
        logging.info("Removed %s, left by a file write that did not finish.", path)


# --- model, optimizer and checkpoints of one workdir -----------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", "") or e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


class _Run:
    """Model, optimizer and checkpoint state of one workdir."""

    def __init__(self, spec: registry.ModelSpec, model_config, config: TrainConfig, workdir,
                 strategy: tf.distribute.Strategy):
        self.spec = spec
        self.model_config = model_config
        self.strategy = strategy
        self.ckpt_dir = os.path.join(workdir, "checkpoints")
        with strategy.scope():
            self.model = self.spec.build(self.model_config)
            self.optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
                learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                warmup_steps=config.warmup_steps, total_steps=config.steps, min_lr_ratio=config.min_lr_ratio,
                cooldown_steps=config.cooldown_steps))
            if autotune.needs_loss_scale_optimizer(config, self.spec):  # float16 (the step scales its clipping too)
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # Batches consumed from the train stream; the stream is rebuilt at this position on resume.
            self.data_position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        # "model" alone misses what Keras 3 does not hand to tf.train.Checkpoint's object graph: layers
        # kept in a Python list (a model's repeated blocks; otherwise saved only as the optimizer's
        # references to what it trains, which init_from does not read) and SeedGenerator states (dropout
        # masks). model_variables, every model variable in build order, holds both. rng_states held the
        # SeedGenerator states before it and stays so that those older checkpoints still resume exactly.
        self.rng_states = [v for v in self.model.non_trainable_variables
                           if v.name == "seed_generator_state"]
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step, data_position=self.data_position,
                                              rng_states=self.rng_states,
                                              model_variables=list(self.model.variables))
        try:
            self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir,
                                                      max_to_keep=config.keep_checkpoints)
        except ValueError as e:  # "Invalid checkpoint state" (an empty state file)
            raise UserError(f"{os.path.join(self.ckpt_dir, 'checkpoint')} cannot be read ({_first_line(e)}); "
                            f"move it away to load a checkpoint with restore_from") from None
        self._best_manager = None

    @property
    def best_manager(self) -> tf.train.CheckpointManager:
        if self._best_manager is None:
            best_dir = os.path.join(self.ckpt_dir, BEST_DIR)
            try:
                self._best_manager = tf.train.CheckpointManager(self.checkpoint, best_dir, max_to_keep=1)
            except ValueError:  # an unreadable state file of the best checkpoint: start that record over
                os.replace(os.path.join(best_dir, "checkpoint"),
                           os.path.join(best_dir, f"checkpoint.unreadable-{int(time.time())}"))
                self._best_manager = tf.train.CheckpointManager(self.checkpoint, best_dir, max_to_keep=1)
        return self._best_manager

    def resolve(self, restore_from: str) -> Optional[str]:
        """The checkpoint prefix to restore: ``restore_from`` ("ckpt-N", "N", "best" or a path), else the
        latest one of the workdir (None: start from scratch)."""
        if not restore_from:
            return self.manager.latest_checkpoint
        if restore_from == "best":
            path = tf.train.latest_checkpoint(os.path.join(self.ckpt_dir, BEST_DIR))
            if path is None:
                raise UserError(f"--restore_from=best: there is no best checkpoint in "
                                f"{os.path.join(self.ckpt_dir, BEST_DIR)}")
            return path
        if os.path.isabs(restore_from) or os.sep in restore_from:
            path = restore_from
        else:
            path = os.path.join(self.ckpt_dir, f"ckpt-{restore_from}" if restore_from.isdigit()
                                else restore_from)
        if not os.path.exists(path + ".index"):
            raise UserError(f"--restore_from={restore_from}: there is no checkpoint {path} (checkpoints in "
                            f"{self.ckpt_dir}: {_listing(_checkpoint_numbers(self.ckpt_dir))})")
        return path

    def restore(self, restore_from: str = "") -> Optional[str]:
        path = self.resolve(restore_from)
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # DataLossError, shape mismatch, missing variables, truncated files
            older = [n for n in _checkpoint_numbers(self.ckpt_dir)
                     if os.path.join(self.ckpt_dir, f"ckpt-{n}") != path]
            way_out = (f"rerun with --restore_from=ckpt-{older[-1]} (or another of {_listing(older)}) to "
                       f"resume from an older checkpoint, or use a new --workdir" if older
                       else "move it away or use a new --workdir")
            raise UserError(f"checkpoint {path} is corrupt or belongs to another model "
                            f"({type(e).__name__}: {_first_line(e)}); it was left untouched -- "
                            f"{way_out}") from None
        return path

    def init_weights(self, init_from: str) -> str:
        """The model's weights from another run (``init_from``: its workdir, whose latest checkpoint is
        read, or a checkpoint prefix), dropout's RNG state among them; the optimizer, step and data
        position stay fresh. Returns the path."""
        path = init_from
        if os.path.isdir(init_from):
            path = tf.train.latest_checkpoint(os.path.join(init_from, "checkpoints")) or ""
            if not path:
                raise UserError(f"--init_from={init_from}: no checkpoint in {os.path.join(init_from, 'checkpoints')}")
        elif not os.path.exists(path + ".index"):
            raise UserError(f"--init_from={init_from}: neither a workdir nor a checkpoint (no {path}.index)")
        try:
            saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
        except Exception as e:  # unreadable index or data files
            raise UserError(f"--init_from={init_from}: {path} cannot be read ({type(e).__name__}: "
                            f"{_first_line(e)})") from None
        if "model_variables" in saved:
            checkpoint = tf.train.Checkpoint(model=self.model, model_variables=list(self.model.variables))
        else:
            # Written before model_variables: the blocks kept in lists are there only as the optimizer's
            # references to what it trains, which a throwaway optimizer over the same variables (in the
            # same order) maps back; its restored moments are dropped with it.
            with self.strategy.scope():
                reader = step_lib.make_optimizer(step_lib.OptimizerConfig())
                reader.build(self.model.trainable_variables)
            checkpoint = tf.train.Checkpoint(model=self.model, optimizer=reader)
        try:
            status = checkpoint.read(path)
            status.expect_partial()  # the other run's optimizer and counters are not wanted
            status.assert_existing_objects_matched()
        except Exception as e:  # shape mismatch, missing variables, unreadable files
            raise UserError(f"--init_from={init_from}: {path} does not hold this model's weights "
                            f"({type(e).__name__}: {_first_line(e)}); the config must build the same "
                            f"layers and shapes") from None
        return path

    def save(self, manager: tf.train.CheckpointManager, number: int) -> str:
        """``manager.save`` at ``number``; a failed write (disk full, read-only) is one UserError line,
        after the partial files of that write are removed (complete checkpoints are never touched)."""
        prefix = os.path.join(manager.directory, f"ckpt-{number}")
        existed = prefix in manager.checkpoints
        try:
            return manager.save(checkpoint_number=number)
        except (tf.errors.OpError, OSError) as e:
            if not existed:
                _remove_checkpoint_files(prefix)
            reason = _first_line(e)
            raise UserError(f"cannot write checkpoint {prefix} ({type(e).__name__}: {reason}); its partial "
                            f"files were removed and the earlier checkpoints are intact (latest: "
                            f"{self.manager.latest_checkpoint or 'none'}) -- free space or fix the "
                            f"permissions, then rerun the same command to resume") from None


def _remove_checkpoint_files(prefix: str) -> None:
    directory, base = os.path.split(prefix)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name == f"{base}.index" or name.startswith(f"{base}.data-") or name == f"{base}_temp":
            path = os.path.join(directory, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            except OSError:
                pass


def validate_data(spec: registry.ModelSpec, model_config) -> None:
    """Check the family's data against ``model_config`` before anything is written (label range vs
    classes, empty data, image shape, ids vs vocabulary): the family's ``validate_data`` hook (families
    without one are not checked)."""
    if spec.validate_data is not None:
        spec.validate_data(model_config)


def restore(workdir: str, restore_from: str = ""):
    """(model, model_config, spec) of the training run in ``workdir``, with its latest checkpoint (or
    ``restore_from``) restored. ``tfmstep.saving.load_trained`` loads saved models and presets too."""
    record = _saved_record(workdir)
    if record is None:
        raise UserError(f"{workdir} is not a training workdir (no config.json)")
    if not restore_from:  # reading only: an explicit restore_from needs no readable state file
        _check_checkpoint_state(workdir, restore_from="", starting=False)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in record["train"].items() if k in fields})
    spec = registry.get_spec(record["model"])
    model_config = _recorded_model_config(spec, record, workdir)
    run = _Run(spec, model_config, config, workdir, tf.distribute.get_strategy())
    if run.restore(restore_from) is None:
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


# --- the log and the best-so-far record ------------------------------------------------------------------

def _read_log(path: str) -> tuple:
    """(entries, the file's text); a line that does not parse (the torn last line of a killed write) is
    dropped."""
    if not os.path.exists(path):
        return [], ""
    with open(path) as f:
        text = f.read()
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            int(entry["step"])
        except (ValueError, KeyError, TypeError):
            logging.warning("%s line %d does not parse (a write cut short); dropped.", path, number)
            continue
        entries.append(entry)
    return entries, text


def _truncate_log(path: str, last_step: int) -> list:
    """Drop log lines past the restored step (steps after the last checkpoint are redone, not duplicated),
    rewriting the file atomically; returns the kept entries."""
    entries, text = _read_log(path)
    kept = [e for e in entries if e["step"] <= last_step]
    new_text = "".join(json.dumps(e) + "\n" for e in kept)
    if new_text != text:  # also drops a torn line, which the next append would otherwise extend
        fileio.atomic_write(path, new_text)
    if last_step and (not kept or kept[-1]["step"] != last_step):
        logging.warning("%s ends at step %d, not at the restored step %d.", path,
                        kept[-1]["step"] if kept else 0, last_step)
    return kept


class _LossTracker:
    """Bias-corrected exponential moving average of the per-step train loss, and the best checkpoint: the
    lowest smoothed train loss at a checkpoint (``keep_best="train_loss"``), or the lowest validation loss
    at an evaluation (``"eval_loss"``; ``best.json`` then also lists every evaluation, so a resumed run
    counts evaluations without improvement -- early stopping -- exactly as an uninterrupted one)."""

    def __init__(self, best_dir: str, keep_best: str = "train_loss"):
        self.best_path = os.path.join(best_dir, BEST_RECORD)
        self.keep_best = keep_best
        self.key = "smoothed_train_loss" if keep_best == "train_loss" else "eval_loss"
        self.average, self.weight = 0.0, 0.0
        self.best: Optional[dict] = None
        self.evals: list = []  # [step, validation loss] of every evaluation (keep_best="eval_loss")
        self.at_last_save: Optional[float] = None  # the smoothed loss when the latest checkpoint was saved
        if os.path.exists(self.best_path) and tf.train.latest_checkpoint(best_dir):
            try:
                with open(self.best_path) as f:
                    self.best = json.load(f)
                float(self.best[self.key])
                self.evals = [[int(step), float(loss)] for step, loss in self.best.get("evals", [])]
            except (OSError, ValueError, KeyError, TypeError):
                logging.warning("%s cannot be read (or judged another criterion); the best checkpoint is "
                                "judged afresh.", self.best_path)
                self.best, self.evals = None, []

    def describe(self, best: dict) -> str:
        return (f"smoothed train loss {best['smoothed_train_loss']:.4g}" if self.key == "smoothed_train_loss"
                else f"validation loss {best['eval_loss']:.4g}")

    def truncate_evals(self, last_step: int) -> None:
        """Forget evaluations after the restored step: the resumed run redoes them."""
        self.evals = [e for e in self.evals if e[0] <= last_step]

    def add_eval(self, step: int, loss: float) -> bool:
        """Record an evaluation; True if it is the new best (the caller saves the checkpoint, then
        ``record_best``), else the record is rewritten with the evaluation added."""
        self.evals = [e for e in self.evals if e[0] < step] + [[step, float(loss)]]
        earlier = [value for s, value in self.evals[:-1]]
        if math.isfinite(loss) and (not earlier or loss < min(earlier)):
            return True
        if self.best is not None:
            self.best["evals"] = self.evals
            fileio.atomic_write_json(self.best_path, self.best)
        return False

    @property
    def evals_since_best(self) -> int:
        if not self.evals:
            return 0
        losses = [loss for _, loss in self.evals]
        return len(losses) - 1 - int(np.argmin(losses))

    def add(self, losses) -> None:
        for loss in np.asarray(losses, np.float64).ravel():
            self.average = LOSS_SMOOTHING * self.average + (1.0 - LOSS_SMOOTHING) * float(loss)
            self.weight = LOSS_SMOOTHING * self.weight + (1.0 - LOSS_SMOOTHING)

    @property
    def smoothed(self) -> Optional[float]:
        return self.average / self.weight if self.weight else None

    def is_best(self) -> bool:
        value = self.smoothed
        return value is not None and math.isfinite(value) and (
            self.best is None or value < float(self.best["smoothed_train_loss"]))

    def record_best(self, step: int, checkpoint: str) -> None:
        if self.key == "eval_loss":
            self.best = {"step": step, "checkpoint": checkpoint, "eval_loss": self.evals[-1][1],
                         "criterion": "lowest validation loss at an evaluation", "evals": self.evals}
        else:
            self.best = {"step": step, "checkpoint": checkpoint, "smoothed_train_loss": self.smoothed,
                         "criterion": f"lowest exponential moving average ({LOSS_SMOOTHING}) of the train "
                                      f"loss at a checkpoint"}
        fileio.atomic_write_json(self.best_path, self.best)


# --- stopping on SIGTERM / SIGINT ------------------------------------------------------------------------

class _StopSignals:
    """SIGTERM and SIGINT ask the loop to save a checkpoint after the current call and stop (how
    preemptible machines end a job). A second signal acts as it would without this (SIGINT raises
    KeyboardInterrupt, SIGTERM kills). Only in the main thread of a single-process run: under a
    multi-worker strategy every worker must take part in a save, so one worker cannot save alone."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = ""
        self._previous: dict = {}

    def __enter__(self):
        if self.enabled:
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        logging.warning("%s: saving a checkpoint after the current call, then stopping (send it again to "
                        "stop at once, without saving).", self.requested)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
        return False


# --- training ---------------------------------------------------------------------------------------------

def evaluate(steps: step_lib.Steps, dataset, strategy, max_batches: int = 0) -> dict:
    """Means over the split of the compiled eval step's per-batch sums (``step.mean_metrics``)."""
    batches = strategy.experimental_distribute_dataset(dataset)
    return step_lib.mean_metrics((steps.eval(batch) for batch in batches), max_batches)


def train(model_name: str, workdir: str, preset: str = "default",
          overrides: Optional[Mapping[str, Any]] = None, config: TrainConfig = TrainConfig(), *,
          restore_from: str = "", checkpoint_every_secs: float = DEFAULT_CHECKPOINT_EVERY_SECS) -> dict:
    """Train (or resume) ``model_name`` in ``workdir``; returns the final metrics (also in metrics.json).

    ``restore_from``: start from this checkpoint instead of the latest ("ckpt-N", "N", "best" or a path)
    -- the way out when the latest cannot be read. ``checkpoint_every_secs``: also save a checkpoint when
    this much time passed since the last one (0: only by steps). SIGTERM/SIGINT save and stop the run
    (``TrainingInterrupted``); rerunning the same command resumes it.
    """
    if checkpoint_every_secs < 0 or not math.isfinite(checkpoint_every_secs):
        raise UserError(f"checkpoint_every_secs must be >= 0 (0: only by steps), got {checkpoint_every_secs}")
    overrides = dict(overrides or {})
    spec = registry.get_spec(model_name)
    model_config = spec.config(preset, **overrides)  # bad input fails first
    record = _run_record(model_name, preset, overrides, config, model_config)
    _check_workdir_matches(workdir, record)
    saved = _saved_record(workdir)
    if saved and saved.get("model_config") and _has_training(workdir):
        # A resumed run keeps the config its weights were trained with, even if a default changed since.
        trained_with = _recorded_model_config(spec, saved, workdir)
        changed = sorted(k for k, v in dataclasses.asdict(trained_with).items()
                         if v != getattr(model_config, k))
        if changed:
            logging.info("Resuming with the config the run was trained with (config.json); today's defaults "
                         "differ in: %s", ", ".join(changed))
        model_config = trained_with
        record["model_config"] = saved["model_config"]
    with data_common.data_policy(config.allow_fallback):  # metrics.json records the data actually read
        validate_data(spec, model_config)  # the data against the config, before anything is written
        keras.utils.set_random_seed(config.seed)
        # The model is built in float32 and put in the run's precision with the other step settings
        # (autotune.settings_for_run), so a precision given and the same one auto-chosen train alike.
        return _train(spec, model_config, workdir, preset, config, record, restore_from,
                      checkpoint_every_secs)


def _train(spec, model_config, workdir, preset, config: TrainConfig, record: dict, restore_from: str,
           checkpoint_every_secs: float) -> dict:
    model_name = spec.name
    strategy = make_strategy(config.distribute)
    workdir = _worker_workdir(workdir, strategy)
    _check_checkpoint_state(workdir, restore_from)
    fileio.check_writable(workdir)  # a read-only workdir fails here, before any work or write
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        fileio.check_writable(os.path.join(workdir, "checkpoints"))
    run = _Run(spec, model_config, config, workdir, strategy)
    saved = _saved_record(workdir)
    restored = run.restore(restore_from)
    start = int(run.step.numpy())
    finished = _finished_metrics(workdir, start, config.steps) if not restore_from else None
    if finished is not None:  # a rerun of a finished run trains nothing and rewrites nothing
        logging.info("%s is complete (step %d of %d): nothing to train.", workdir, start, config.steps)
        return {**finished, "already_complete": True}
    if restored:
        logging.info("Resumed from %s at step %d.", restored, start)
    elif config.init_from:
        logging.info("Starting from the model weights of %s.", run.init_weights(config.init_from))

    with _StopSignals(enabled=autotune.single_process(strategy)) as stop:
        settings = autotune.settings_for_run(
            config, spec, strategy, model=run.model, optimizer=run.optimizer,
            dataset_fn=lambda: spec.dataset(model_config, "train", config.batch_size, config.seed,
                                            int(run.data_position.numpy())),
            run_steps=config.steps - start, model_name=model_name, saved_record=saved)
        # Every read that can fail (data, step compilation) happens before the first write.
        train_ds = spec.dataset(model_config, "train", config.batch_size, config.seed,
                                int(run.data_position.numpy()))
        eval_ds = spec.dataset(model_config, "validation", config.batch_size, config.seed)
        steps = settings.steps  # auto-tuning hands over the chosen step, already compiled and pre-flighted
        if steps is None:
            steps = step_lib.make_steps(run.model, run.optimizer, spec.loss,
                                        global_batch_size=config.batch_size, strategy=strategy,
                                        jit_compile=settings.jit_compile, clip_norm=config.clip_norm)
            if settings.jit_compile and strategy.num_replicas_in_sync == 1:
                inputs, labels = next(iter(train_ds))
                step_lib.preflight_xla(steps, inputs, labels, model_name)

        _clean_leftovers(workdir)
        fileio.atomic_write_json(os.path.join(workdir, "config.json"),
                                 {**record, "step_settings": settings.as_record()})
        log_path = os.path.join(workdir, "train_log.jsonl")
        tracker = _LossTracker(os.path.join(run.ckpt_dir, BEST_DIR), config.keep_best)
        tracker.add([e["loss"] for e in _truncate_log(log_path, start) if "loss" in e])
        tracker.truncate_evals(start)
        tracker.at_last_save = tracker.smoothed if restored else None
        return _loop(run, steps, settings, config, train_ds, eval_ds, strategy, workdir, preset, start,
                     tracker, stop, checkpoint_every_secs)


def _loop(run: _Run, steps, settings, config: TrainConfig, train_ds, eval_ds, strategy, workdir, preset,
          start: int, tracker: _LossTracker, stop: _StopSignals, checkpoint_every_secs: float) -> dict:
    model_name = run.spec.name
    jit_compile, steps_per_call = settings.jit_compile, settings.steps_per_call
    log_path = os.path.join(workdir, "train_log.jsonl")
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
    current = saved_at = start
    last_save = _clock()
    last_progress = time.perf_counter()
    pace = None  # started once the first call returns: compiling it is not the training pace

    def progress() -> str:
        """steps/s over the last couple of minutes and the time to finish at that rate."""
        pace.update(current, time.perf_counter())
        return pace.text(config.steps)

    def save(log) -> None:
        nonlocal saved_at, last_save
        log.flush()
        os.fsync(log.fileno())  # the log reaches the disk no later than the checkpoint it is cut to
        path = run.save(run.manager, current)
        tracker.at_last_save = tracker.smoothed
        if tracker.key == "smoothed_train_loss" and tracker.is_best():
            run.save(run.best_manager, current)
            tracker.record_best(current, path)
        saved_at, last_save = current, _clock()

    def stop_if_asked(log) -> None:
        if not stop.requested:
            return
        if current > saved_at:
            save(log)
        latest = run.manager.latest_checkpoint
        raise TrainingInterrupted(
            f"stopped by {stop.requested} at step {current} of {config.steps}; "
            + (f"checkpoint {latest} holds it" if latest and saved_at == current else
               f"no step was trained yet (latest checkpoint: {latest or 'none'})")
            + " -- rerun the same command to resume")

    stopped_early = bool(config.early_stop_evals) and tracker.evals_since_best >= config.early_stop_evals
    try:
        with open(log_path, "a") as log:
            while current < config.steps and not stopped_early:
                stop_if_asked(log)
                num = boundary(current) - current
                values = {k: v.numpy() for k, v in steps.train(iterator, tf.constant(num, tf.int32)).items()}
                finite = np.isfinite(values["loss"])
                if not finite.all():
                    bad = current + int(np.argmin(finite)) + 1
                    log.flush()
                    raise TrainingDiverged(
                        f"loss became {values['loss'][~finite][0]} at step {bad}; training stopped. "
                        f"{_kept_checkpoints(run, tracker)}. Lower --learning_rate or --clip_norm")
                for i in range(num):
                    log.write(json.dumps({"step": current + i + 1,
                                          **{k: float(v[i]) for k, v in values.items()}}) + "\n")
                tracker.add(values["loss"])
                current += num
                if pace is None:
                    pace = ProgressRate(current, time.perf_counter())
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
                    logging.info("step %d/%d  %s  lr=%.3g  %.1f steps/s  (%s)", current, config.steps,
                                 "  ".join(f"{k}={v:.4f}" for k, v in means.items()), lr,
                                 window_steps / elapsed, progress())
                    window_start, window_steps, window_values = time.perf_counter(), 0, {}
                    last_progress = time.perf_counter()
                elif time.perf_counter() - last_progress >= PROGRESS_SECONDS:
                    logging.info("step %d/%d  loss=%.4f  (%s)", current, config.steps,
                                 float(values["loss"][-1]), progress())
                    last_progress = time.perf_counter()
                if (current % config.checkpoint_every == 0 or current == config.steps
                        or (checkpoint_every_secs and _clock() - last_save >= checkpoint_every_secs)):
                    save(log)
                stop_if_asked(log)
                if (config.eval_every and current % config.eval_every == 0) or current == config.steps:
                    eval_metrics = evaluate(steps, eval_ds, strategy, config.eval_batches)
                    with writer.as_default(step=current):
                        for k, v in eval_metrics.items():
                            tf.summary.scalar(f"eval/{k}", v)
                    logging.info("eval at step %d: %s", current,
                                 "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                    if tracker.key == "eval_loss" and tracker.add_eval(current, eval_metrics["loss"]):
                        tracker.record_best(current, run.save(run.best_manager, current))
                    if config.early_stop_evals and tracker.evals_since_best >= config.early_stop_evals:
                        if current > saved_at:
                            save(log)
                        logging.info("Early stop at step %d of %d: %d evaluations without a lower "
                                     "validation loss than step %d's.", current, config.steps,
                                     tracker.evals_since_best, tracker.best["step"])
                        stopped_early = True
    except OSError as e:  # the log or the summaries: disk full, file system gone read-only
        raise UserError(f"cannot write to {workdir} ({e.strerror or e}); the checkpoints are intact (latest: "
                        f"{run.manager.latest_checkpoint or 'none'}) -- free space and rerun the same "
                        f"command to resume") from None
    writer.flush()
    if not eval_metrics:  # already finished before this call: evaluate what is there
        eval_metrics = evaluate(steps, eval_ds, strategy, config.eval_batches)
    restored_best = None
    if tracker.key == "eval_loss" and tracker.best and tracker.best["step"] != current:
        restored_best = _restore_best(run, tracker, current, eval_metrics)
        eval_metrics = evaluate(steps, eval_ds, strategy, config.eval_batches)
    final = {"model": model_name, "preset": preset, "step": current, "eval": eval_metrics,
             "stopped_early": stopped_early, "restored_best": restored_best,
             "train_seconds_this_run": round(time.perf_counter() - started, 2),
             "parameters": int(run.model.count_params()), "jit_compile": jit_compile,
             "steps_per_call": steps_per_call, "step_settings": settings.as_record(),
             "best_checkpoint": tracker.best,
             "headline": run.spec.headline_numbers(run.model_config, eval_metrics),
             "data": data_common.data_read()}
    fileio.atomic_write_json(os.path.join(workdir, "metrics.json"), final)
    logging.info("Final metrics: %s", json.dumps(final))
    return final


def _finished_metrics(workdir: str, step: int, steps: int) -> Optional[dict]:
    """metrics.json of a run whose checkpoint is at its last step, or where it stopped early (None: not
    finished, or no readable metrics.json, which the run then writes again)."""
    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(final, dict) or final.get("step") != step:
        return None
    return final if step >= steps or final.get("stopped_early") else None


def _restore_best(run: _Run, tracker: _LossTracker, current: int, last_eval: dict) -> dict:
    """keep_best=eval_loss: load the best checkpoint's state and save it as the checkpoint at ``current``,
    so the run ends on the model with the lowest validation loss (and export, generation and a rerun see
    that one)."""
    path = tf.train.latest_checkpoint(os.path.join(run.ckpt_dir, BEST_DIR))
    run.checkpoint.restore(path).assert_existing_objects_matched()
    run.step.assign(current)
    run.data_position.assign(current)
    run.save(run.manager, current)
    best = tracker.best
    logging.info("Restored the best checkpoint by validation loss: step %d (validation loss %.4f; the last "
                 "evaluated step %d had %.4f); it is the checkpoint at step %d now.", best["step"],
                 best["eval_loss"], current, last_eval.get("loss", float("nan")), current)
    return {"step": best["step"], "eval_loss": best["eval_loss"], "last_step_eval_loss": last_eval.get("loss")}


def summary(final: dict, workdir: str) -> str:
    """A few lines for a person: the run's headline metric and where its artifacts are."""
    head = final.get("headline") or final.get("eval") or {}
    numbers = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in head.items())
    seconds = final.get("train_seconds_this_run")
    state = ("was already complete" if final.get("already_complete")
             else "stopped early" if final.get("stopped_early") else "finished")
    lines = [f"{final.get('model')} ({final.get('preset')} preset) {state} at step {final.get('step')}"
             + (f" ({seconds:.0f} s of training in the last run)" if seconds and not final.get("already_complete")
                else "") + ".",
             f"  evaluation: {numbers or 'no metrics'}"
             + (f" (the best checkpoint by validation loss, step {final['restored_best']['step']}, restored)"
                if final.get("restored_best") else ""),
             f"  artifacts: {workdir}/ -- metrics.json, config.json, checkpoints/, train_log.jsonl, tensorboard/",
             f"  load it: tfmstep.load({workdir!r}); ship it: tfmstep.save({workdir!r}, <dir>)"]
    return "\n".join(lines)


def _kept_checkpoints(run: _Run, tracker: _LossTracker) -> str:
    """What the NaN guard kept, and which one a rerun restores."""
    latest = run.manager.latest_checkpoint
    if latest is None:
        return "No checkpoint was saved before it"
    smoothed = (f", smoothed train loss {tracker.at_last_save:.4g}" if tracker.at_last_save is not None
                else "")
    text = f"The last good checkpoint ({latest}{smoothed}) was kept; rerunning the same command restores it"
    best = tracker.best
    if best and best.get("checkpoint") != latest:
        best_path = tf.train.latest_checkpoint(os.path.join(run.ckpt_dir, BEST_DIR))
        text += (f". The best one so far ({best_path}, step {best['step']}, {tracker.describe(best)}) was "
                 f"kept too: --restore_from=best continues from it")
    elif best:
        text += f" (it is also the best so far: {tracker.describe(best)})"
    return text
