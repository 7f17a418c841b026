"""Pick the step's ``jit_compile`` and ``steps_per_call`` for a run by timing them on that run.

Which setting is fastest is not a property of a model family: on CPU, XLA was several times slower for
the LSTM, slower for the CNN's convolutions and faster for the Transformer chain reasoner, and the best
number of optimizer steps per compiled call depends on how long one step takes next to the Python
round trip. So the trainer times a few candidates on the run's own model, optimizer, loss, data and
strategy and keeps the fastest (``choose_step_settings``).

This module is also the one home of the policy around that measurement (``settings_for_run``): explicit
settings, settings recorded by an earlier run in the workdir, the family default for short and
multi-process runs, or a measurement. The trainer and the benchmark both call it.

Timing a candidate trains for real. Everything the run checkpoints (model and optimizer variables,
including the optimizer's iteration count, and the layers' SeedGenerator states) is snapshotted before
and restored after, and the data is read through a fresh iterator over the run's indexed stream, so the
run then continues exactly as if nothing had been measured.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import step as step_lib
from tfmstep.errors import UserError

STEPS_PER_CALL_OPTIONS = (1, 10, 50)
# Measuring may cost this share of the expected run: timed windows share half of it (compilation and
# set-up take the rest), and when the first candidate shows that compiling the other variant and timing
# the rest would cost more, measuring stops there.
MAX_FRACTION = 0.05
# Compiling the other variant is estimated as this many times the first one's first call (measured here:
# XLA took 0.75x-3x as long as tracing the plain step).
OTHER_COMPILE_FACTOR = 2.0
SECONDS_PER_CANDIDATE = 2.0  # window cap; a candidate whose single call is longer is skipped
MIN_WINDOW = 0.25  # window floor, so that fast steps still get a meaningful median
MIN_CALLS = 3  # timed calls per candidate (median), unless they overrun twice the window


@dataclasses.dataclass
class Candidate:
    jit_compile: bool
    steps_per_call: int
    steps_per_second: Optional[float] = None  # median over the timed calls; None if not timed
    calls: int = 0
    skipped: str = ""  # why it was not timed


@dataclasses.dataclass
class StepSettings:
    """The step settings of a run and how they were decided.

    source: "autotune" (measured now), "reused" (measured by an earlier run in the same workdir),
    "explicit" (both given), or "default" (auto-tuning skipped; ``note`` says why).
    """

    jit_compile: bool
    steps_per_call: int
    source: str
    candidates: list = dataclasses.field(default_factory=list)
    tuning_seconds: float = 0.0  # wall time of the whole measurement, compilation included
    compile_seconds: dict = dataclasses.field(default_factory=dict)  # "jit=<bool>" -> first call
    expected_run_seconds: Optional[float] = None
    note: str = ""
    # The compiled step of the chosen ``jit_compile`` (already traced): the trainer reuses it.
    steps: Optional[step_lib.Steps] = dataclasses.field(default=None, compare=False, repr=False)

    def as_record(self) -> dict:
        record = dataclasses.asdict(dataclasses.replace(self, steps=None))
        del record["steps"]
        return record

    @classmethod
    def from_record(cls, record: dict) -> "StepSettings":
        fields = {f.name for f in dataclasses.fields(cls)} - {"steps"}
        values = {k: v for k, v in record.items() if k in fields}
        values["candidates"] = [Candidate(**c) for c in values.get("candidates", [])]
        return cls(**values)

    def summary(self) -> str:
        timed = [c for c in self.candidates if c.steps_per_second is not None]
        return ", ".join(f"jit={c.jit_compile}/spc={c.steps_per_call}: {c.steps_per_second:.1f}"
                         for c in timed)


def steps_per_call_candidates(run_steps: int, boundaries: Sequence[int] = (),
                           options: Sequence[int] = STEPS_PER_CALL_OPTIONS) -> tuple:
    """``options`` capped by the run length and by the trainer's log/checkpoint/eval intervals: a call
    never crosses one of those, so a larger setting would run exactly the same calls."""
    cap = min([max(1, run_steps)] + [b for b in boundaries if b > 0])
    return tuple(sorted({max(1, min(int(o), cap)) for o in options}))


def training_state_variables(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> list:
    """Every variable one training step can change, each once: the model's (weights, BatchNorm statistics
    and the layers' SeedGenerator states -- Keras lists those in ``model.variables``) and the optimizer's
    (slots and iteration count)."""
    seen, out = set(), []
    for v in [*model.variables, *optimizer.variables]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


class _Snapshot:
    """Exact copies of variable values, written back by ``restore``."""

    def __init__(self, variables: Sequence):
        self._saved = [(v, np.array(v.numpy(), copy=True)) for v in variables]

    def restore(self) -> None:
        for v, value in self._saved:
            v.assign(value)


def _wall_time(candidate: Candidate, call: Callable[[], None]) -> float:
    del candidate
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class _Budget:
    """Per-candidate timing window: half of ``max_fraction`` of the expected run (estimated from the
    first candidate's rate) shared by the candidates, within [``min_window``, ``seconds_per_candidate``]."""

    def __init__(self, run_steps, num_candidates, max_fraction, seconds_per_candidate, min_window):
        self.run_steps = run_steps
        self.num_candidates = num_candidates
        self.max_fraction = max_fraction
        self.seconds_per_candidate = seconds_per_candidate
        self.min_window = min(min_window, seconds_per_candidate)
        self.reference_rates: Optional[list] = None  # steps/s of the first timed candidate

    def expected_run_seconds(self) -> Optional[float]:
        if not self.reference_rates:
            return None
        return self.run_steps / statistics.median(self.reference_rates)

    def window(self) -> float:
        expected = self.expected_run_seconds()
        if expected is None:
            return self.seconds_per_candidate
        share = 0.5 * self.max_fraction * expected / self.num_candidates
        return min(self.seconds_per_candidate, max(self.min_window, share))


class _Measurement:
    """One auto-tuning pass: the candidates, their timing budget and what has been compiled so far."""

    def __init__(self, candidates, budget: _Budget, fallback, max_fraction, seconds_per_candidate,
                 min_calls, time_call, model_name):
        self.candidates = candidates
        self.budget = budget
        self.fallback = fallback
        self.max_fraction = max_fraction
        self.seconds_per_candidate = seconds_per_candidate
        self.min_calls = min_calls
        self.time_call = time_call
        self.model_name = model_name
        self.compiled: dict = {}  # jit_compile -> its compiled Steps
        self.compile_seconds: dict = {}
        self.stopped = ""  # why measuring stopped early (the fallback is then used)
        self.xla_failed = False

    def measure_variant(self, jit: bool, steps: step_lib.Steps, iterator, variants_left: int) -> None:
        """Compile ``steps`` (first call, untimed), then time each candidate of this ``jit_compile``."""
        group = [c for c in self.candidates if c.jit_compile == jit]

        def run_call(n):
            # Fetch every output, as the trainer does after each call.
            return {k: v.numpy() for k, v in steps.train(iterator, tf.constant(n, tf.int32)).items()}

        first = time.perf_counter()
        run_call(group[0].steps_per_call)  # tracing and compilation: not timed
        self.compile_seconds[f"jit={jit}"] = round(time.perf_counter() - first, 3)
        self.compiled[jit] = steps
        for c in group:
            if self.stopped:
                c.skipped = self.stopped
                continue
            # The largest setting timed so far is the closest to this one's per-step time.
            rate = next((g.steps_per_second for g in reversed(group) if g.steps_per_second), None)
            if rate and c.steps_per_call / rate > self.seconds_per_candidate:
                c.skipped = (f"one call would take ~{c.steps_per_call / rate:.1f} s, over the "
                             f"{self.seconds_per_candidate:.1f} s per candidate")
                logging.info("auto-tune %s jit_compile=%s steps_per_call=%d: skipped (%s)",
                             self.model_name, jit, c.steps_per_call, c.skipped)
                continue
            _time_candidate(c, lambda c=c: run_call(c.steps_per_call), self.budget, self.min_calls,
                            self.time_call)
            logging.info("auto-tune %s jit_compile=%s steps_per_call=%d: %.2f steps/s (median of %d calls)",
                         self.model_name, jit, c.steps_per_call, c.steps_per_second, c.calls)
            if self.fallback is not None and c is next(g for g in self.candidates if g.calls):
                self._stop_if_the_rest_costs_too_much(self.compile_seconds[f"jit={jit}"], variants_left)

    def _stop_if_the_rest_costs_too_much(self, compile_seconds: float, variants_left: int) -> None:
        """After the first timed candidate: compiling the other variants (estimated from this one) and
        timing the remaining candidates must fit in ``max_fraction`` of the expected run."""
        expected = self.budget.expected_run_seconds()
        rest = (variants_left * OTHER_COMPILE_FACTOR * compile_seconds
                + sum(g.calls == 0 and not g.skipped for g in self.candidates) * self.budget.window())
        if rest > self.max_fraction * expected:
            self.stopped = (f"measuring the rest would take ~{rest:.0f} s, over "
                            f"{100 * self.max_fraction:g}% of the expected {expected:.0f} s run")

    def result(self, tuning_seconds: float) -> StepSettings:
        common = dict(candidates=self.candidates, tuning_seconds=round(tuning_seconds, 3),
                      compile_seconds=self.compile_seconds,
                      expected_run_seconds=self.budget.expected_run_seconds())
        if self.stopped:
            for c in self.candidates:
                if c.steps_per_second is None and not c.skipped:
                    c.skipped = self.stopped
            jit = bool(self.fallback[0]) and not self.xla_failed
            settings = StepSettings(jit_compile=jit, steps_per_call=int(self.fallback[1]), source="default",
                                    note=f"not measured: {self.stopped}", steps=self.compiled.get(jit),
                                    **common)
            logging.info("Step settings of %s not measured (%s): jit_compile=%s, steps_per_call=%d "
                         "(defaults); the check took %.1f s", self.model_name, self.stopped,
                         settings.jit_compile, settings.steps_per_call, settings.tuning_seconds)
            return settings
        best = max((c for c in self.candidates if c.steps_per_second is not None),
                   key=lambda c: c.steps_per_second)
        settings = StepSettings(jit_compile=best.jit_compile, steps_per_call=best.steps_per_call,
                                source="autotune", steps=self.compiled[best.jit_compile], **common)
        expected = settings.expected_run_seconds
        logging.info("Auto-tuned %s: jit_compile=%s steps_per_call=%d (%.2f steps/s); tuning took %.1f s "
                     "(first calls %s)%s. Steps/s: %s", self.model_name, settings.jit_compile,
                     settings.steps_per_call, best.steps_per_second, settings.tuning_seconds,
                     ", ".join(f"{k} {v:.1f} s" for k, v in self.compile_seconds.items()),
                     f", {100 * settings.tuning_seconds / expected:.1f}% of the expected {expected:.0f} s "
                     f"run" if expected else "", settings.summary())
        return settings


def choose_step_settings(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn: Callable,
                         dataset_fn: Callable[[], tf.data.Dataset], *, global_batch_size: int,
                         run_steps: int, strategy: Optional[tf.distribute.Strategy] = None,
                         clip_norm: float = 1.0, jit_options: Sequence[bool] = (False, True),
                         steps_per_call_options: Sequence[int] = STEPS_PER_CALL_OPTIONS,
                         model_name: str = "model", fallback: Optional[tuple] = None,
                         max_fraction: float = MAX_FRACTION,
                         seconds_per_candidate: float = SECONDS_PER_CANDIDATE,
                         min_window: float = MIN_WINDOW, min_calls: int = MIN_CALLS,
                         time_call: Optional[Callable[[Candidate, Callable[[], None]], float]] = None
                         ) -> StepSettings:
    """Time every (jit_compile, steps_per_call) candidate and return the fastest, with all rates.

    ``dataset_fn()`` returns the run's train stream at its current position (a new dataset each call;
    the run's own iterator is never touched). ``run_steps``: steps the run still has to do; it caps
    ``steps_per_call`` and sets the time budget. A ``True`` in ``jit_options`` is dropped (with a
    warning) when the XLA pre-flight fails, unless it is the only option.

    Per ``jit_compile`` value, the first call (tracing, XLA compilation) is not timed; each candidate
    then runs calls until its window is used, and its rate is the median over those calls. A candidate
    whose single call would take longer than ``seconds_per_candidate`` (estimated from the same step at
    fewer steps per call) is skipped: with steps that slow, the per-call overhead it saves is noise.

    With ``fallback=(jit_compile, steps_per_call)`` (the defaults used without measuring), the fallback's
    ``jit_compile`` is measured first, and if the first candidate shows that the rest (compiling the
    other variant, estimated from the first, and the remaining windows) would cost more than
    ``max_fraction`` of the expected run, measuring stops and the fallback is returned (source "default",
    with its already compiled step, so the check costs little beyond one window).

    ``time_call(candidate, call) -> seconds`` replaces the wall clock (tests make choices deterministic).
    Every variable a step can change is restored bit for bit afterwards (``training_state_variables``).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not jit_options:
        raise ValueError("jit_options is empty")
    if run_steps < 1:
        raise ValueError(f"run_steps must be >= 1, got {run_steps}")
    jits = list(dict.fromkeys(bool(j) for j in jit_options))
    if fallback is not None:  # if measuring stops early, the compiled step is the one the run uses
        jits.sort(key=lambda j: j != bool(fallback[0]))
    per_call = steps_per_call_candidates(run_steps, (), steps_per_call_options)
    candidates = [Candidate(jit, spc) for jit in jits for spc in per_call]
    measurement = _Measurement(
        candidates, _Budget(run_steps, len(candidates), max_fraction, seconds_per_candidate, min_window),
        fallback, max_fraction, seconds_per_candidate, min_calls, time_call or _wall_time, model_name)
    snapshot = _Snapshot(training_state_variables(model, optimizer))
    started = time.perf_counter()
    try:
        for index, jit in enumerate(jits):
            if measurement.stopped:
                break
            steps = step_lib.make_steps(model, optimizer, loss_fn, global_batch_size=global_batch_size,
                                        strategy=strategy, jit_compile=jit, clip_norm=clip_norm)
            if jit and strategy.num_replicas_in_sync == 1:
                inputs, labels = next(iter(dataset_fn()))
                try:
                    step_lib.preflight_xla(steps, inputs, labels, model_name)
                except UserError as e:
                    if len(jits) == 1:
                        raise
                    logging.warning("Auto-tuning leaves XLA out: %s", e)
                    measurement.xla_failed = True
                    for c in candidates:
                        if c.jit_compile == jit:
                            c.skipped = "XLA pre-flight failed"
                    continue
            iterator = iter(strategy.experimental_distribute_dataset(dataset_fn()))
            measurement.measure_variant(jit, steps, iterator, variants_left=len(jits) - index - 1)
    finally:
        snapshot.restore()
    return measurement.result(time.perf_counter() - started)


def _time_candidate(candidate: Candidate, call: Callable[[], None], budget: _Budget, min_calls: int,
                    time_call: Callable) -> None:
    """Run timed calls until the window is used (at least ``min_calls``, but stop once the calls overrun
    twice the window: a few slow calls say enough)."""
    rates: list = []
    if budget.reference_rates is None:
        budget.reference_rates = rates  # the first candidate sets the expected run time
    elapsed = 0.0
    while True:
        seconds = max(float(time_call(candidate, call)), 1e-9)
        elapsed += seconds
        rates.append(candidate.steps_per_call / seconds)
        window = budget.window()
        if (len(rates) >= min_calls and elapsed >= window) or elapsed >= 2 * window:
            break
    candidate.steps_per_second = float(statistics.median(rates))
    candidate.calls = len(rates)


# --- the policy: which settings a training run uses -----------------------------------------------------
#
# Explicit settings are used as given; a workdir that already recorded settings for the same batch size,
# precision, strategy and flags reuses them (a resumed run must not change them: XLA and the plain step
# round differently, so exact resume depends on it); runs too short to pay for measuring, and
# multi-process runs (every worker must use the same settings), take the family default; everything else
# is measured with ``choose_step_settings``.

# Measuring compiles both step variants and times each candidate: runs with fewer steps left than this
# would spend a large share of their time measuring, so they take the family default without measuring
# (longer ones still fall back to it when the first timed candidate shows the rest would cost more than
# MAX_FRACTION of the run).
MIN_AUTOTUNE_STEPS = 200
DEFAULT_STEPS_PER_CALL = 10  # steps_per_call=0 when measuring is skipped
# Training-config fields that make a recorded step setting stale when changed (then it is measured again).
STEP_SETTING_FIELDS = ("batch_size", "mixed_precision", "distribute", "jit_compile", "steps_per_call")


def on_accelerator() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def several_cpu_replicas(strategy: tf.distribute.Strategy) -> bool:
    try:
        local_replicas = len(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):  # the default strategy has no worker_devices
        local_replicas = 1
    return local_replicas > 1 and not on_accelerator()


def single_process(strategy: tf.distribute.Strategy) -> bool:
    """False for multi-worker and TPU clusters: workers timing on their own could choose differently."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is None or not resolver.cluster_spec().as_dict()


def resolve_jit_compile(config, spec, strategy: tf.distribute.Strategy) -> bool:
    """The jit_compile a run uses without measuring: ``config.jit_compile`` if set, else the family
    default (``spec.xla_on_cpu`` on CPU, XLA on accelerators)."""
    if several_cpu_replicas(strategy):
        # Several replicas on CPU devices of one host: XLA cannot place a replica's cluster on a second
        # logical CPU ("variable on a different device"), so the replicas run the plain step.
        if config.jit_compile:
            logging.warning("jit_compile is not supported with several CPU replicas; running without XLA.")
        return False
    if config.jit_compile is not None:
        return config.jit_compile
    return True if on_accelerator() else spec.xla_on_cpu


def jit_compile_options(config, spec, strategy: tf.distribute.Strategy) -> tuple:
    """The jit_compile values measuring may try: both, unless set explicitly or XLA is impossible."""
    if config.jit_compile is not None or several_cpu_replicas(strategy):
        return (resolve_jit_compile(config, spec, strategy),)
    return (False, True)


def recorded_settings(saved_record: Optional[dict], config) -> Optional[StepSettings]:
    """The settings an earlier run in the workdir recorded (config.json), if they still apply to
    ``config``; marked "reused"."""
    if not saved_record or "step_settings" not in saved_record:
        return None
    before = saved_record.get("train", {})
    if any(before.get(name) != getattr(config, name) for name in STEP_SETTING_FIELDS):
        logging.info("The step settings in config.json were chosen for other %s; choosing again.",
                     "/".join(STEP_SETTING_FIELDS))
        return None
    settings = StepSettings.from_record(saved_record["step_settings"])
    if settings.source != "reused":
        settings.note = f"{settings.source} in an earlier run in this workdir"
        settings.source = "reused"
    logging.info("Step settings from config.json (%s): jit_compile=%s, steps_per_call=%d%s",
                 settings.note, settings.jit_compile, settings.steps_per_call,
                 f"; measured steps/s: {settings.summary()}" if settings.summary() else "")
    return settings


def settings_for_run(config, spec, strategy: tf.distribute.Strategy, *, model: keras.Model,
                     optimizer: keras.optimizers.Optimizer, dataset_fn: Callable[[], tf.data.Dataset],
                     run_steps: int, model_name: str, saved_record: Optional[dict] = None,
                     **measure_options) -> StepSettings:
    """jit_compile and steps_per_call for a training run (the whole policy; see the notes above).

    ``config``: the run's training config (``jit_compile``, ``steps_per_call``, ``batch_size``,
    ``clip_norm``, the log/checkpoint/eval intervals and ``STEP_SETTING_FIELDS``); ``run_steps``: steps
    still to run; ``saved_record``: the workdir's config.json, if any; ``dataset_fn()``: the train stream
    at the run's position. ``measure_options`` go to ``choose_step_settings`` (budget, clock).
    """
    jit_options = jit_compile_options(config, spec, strategy)
    if len(jit_options) == 1 and config.steps_per_call:
        return StepSettings(jit_options[0], config.steps_per_call, "explicit")
    recorded = recorded_settings(saved_record, config)
    if recorded is not None:
        return recorded
    fallback = (resolve_jit_compile(config, spec, strategy), config.steps_per_call or DEFAULT_STEPS_PER_CALL)
    reason = ""
    if run_steps < MIN_AUTOTUNE_STEPS:
        reason = f"{run_steps} steps to run, fewer than the {MIN_AUTOTUNE_STEPS} that pay for measuring"
    elif not single_process(strategy):
        reason = "multi-process strategy (every worker must use the same settings)"
    if reason:
        settings = StepSettings(*fallback, "default", note=f"not measured: {reason}")
        logging.info("Step settings not measured (%s): jit_compile=%s (family default), steps_per_call=%d",
                     reason, settings.jit_compile, settings.steps_per_call)
        return settings
    per_call = ((config.steps_per_call,) if config.steps_per_call else steps_per_call_candidates(
        run_steps, (config.log_every, config.checkpoint_every, config.eval_every)))
    return choose_step_settings(
        model, optimizer, spec.loss, dataset_fn, global_batch_size=config.batch_size, run_steps=run_steps,
        strategy=strategy, clip_norm=config.clip_norm, jit_options=jit_options,
        steps_per_call_options=per_call, model_name=model_name, fallback=fallback, **measure_options)
