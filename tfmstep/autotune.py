"""Pick the step's ``jit_compile`` and ``steps_per_call`` for a run by timing them on that run.

Which setting is fastest is not a property of a model family: on CPU, XLA was several times slower for
the LSTM, slower for the CNN's convolutions and faster for the Transformer chain reasoner, and the best
number of optimizer steps per compiled call depends on how long one step takes next to the Python
round trip. So the trainer times a few candidates on the run's own model, optimizer, loss, data and
strategy and keeps the fastest (``choose_step_settings``).

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


def training_state_variables(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                             extra: Sequence = ()) -> list:
    """Every variable one training step can change: model (weights, BatchNorm statistics, SeedGenerator
    states -- Keras lists those in ``model.variables``), optimizer (slots and iteration count), ``extra``;
    each once."""
    seen, out = set(), []
    for v in [*model.variables, *optimizer.variables, *extra]:
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


def choose_step_settings(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn: Callable,
                         dataset_fn: Callable[[], tf.data.Dataset], *, global_batch_size: int,
                         run_steps: int, strategy: Optional[tf.distribute.Strategy] = None,
                         clip_norm: float = 1.0, jit_options: Sequence[bool] = (False, True),
                         steps_per_call_options: Sequence[int] = STEPS_PER_CALL_OPTIONS,
                         model_name: str = "model", state_variables: Optional[Sequence] = None,
                         fallback: Optional[tuple] = None, max_fraction: float = MAX_FRACTION,
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
    """
    strategy = strategy or tf.distribute.get_strategy()
    time_call = time_call or _wall_time
    if not jit_options:
        raise ValueError("jit_options is empty")
    if run_steps < 1:
        raise ValueError(f"run_steps must be >= 1, got {run_steps}")
    per_call = steps_per_call_candidates(run_steps, (), steps_per_call_options)
    jits = list(dict.fromkeys(bool(j) for j in jit_options))
    if fallback is not None:  # if measuring stops early, the compiled step is the one the run uses
        jits.sort(key=lambda j: j != bool(fallback[0]))
    candidates = [Candidate(jit, spc) for jit in jits for spc in per_call]
    budget = _Budget(run_steps, len(candidates), max_fraction, seconds_per_candidate, min_window)
    variables = state_variables if state_variables is not None else training_state_variables(model,
                                                                                             optimizer)
    snapshot = _Snapshot(variables)
    started = time.perf_counter()
    compiled: dict = {}
    compile_seconds: dict = {}
    too_short = ""
    xla_failed = False
    try:
        for index, jit in enumerate(jits):
            if too_short:
                break
            group = [c for c in candidates if c.jit_compile == jit]
            steps = step_lib.make_steps(model, optimizer, loss_fn, global_batch_size=global_batch_size,
                                        strategy=strategy, jit_compile=jit, clip_norm=clip_norm)
            if jit and strategy.num_replicas_in_sync == 1:
                inputs, labels = next(iter(dataset_fn()))
                try:
                    step_lib.preflight_xla(steps, inputs, labels, model_name)
                except UserError as e:
                    if len(candidates) == len(group):
                        raise
                    logging.warning("Auto-tuning leaves XLA out: %s", e)
                    xla_failed = True
                    for c in group:
                        c.skipped = "XLA pre-flight failed"
                    continue
            iterator = iter(strategy.experimental_distribute_dataset(dataset_fn()))

            def run_call(n, steps=steps, iterator=iterator):
                # Fetch every output, as the trainer does after each call.
                return {k: v.numpy() for k, v in steps.train(iterator, tf.constant(n, tf.int32)).items()}

            first = time.perf_counter()
            run_call(group[0].steps_per_call)  # tracing and compilation: not timed
            compile_seconds[f"jit={jit}"] = round(time.perf_counter() - first, 3)
            compiled[jit] = steps
            for c in group:
                if too_short:
                    c.skipped = too_short
                    continue
                # The largest setting timed so far is the closest to this one's per-step time.
                rate = next((g.steps_per_second for g in reversed(group) if g.steps_per_second), None)
                if rate and c.steps_per_call / rate > seconds_per_candidate:
                    c.skipped = (f"one call would take ~{c.steps_per_call / rate:.1f} s, over the "
                                 f"{seconds_per_candidate:.1f} s per candidate")
                    logging.info("auto-tune %s jit_compile=%s steps_per_call=%d: skipped (%s)",
                                 model_name, jit, c.steps_per_call, c.skipped)
                    continue
                _time_candidate(c, lambda c=c: run_call(c.steps_per_call), budget, min_calls, time_call)
                logging.info("auto-tune %s jit_compile=%s steps_per_call=%d: %.2f steps/s (median of %d "
                             "calls)", model_name, jit, c.steps_per_call, c.steps_per_second, c.calls)
                if fallback is not None and c is next(g for g in candidates if g.calls):
                    expected = budget.expected_run_seconds()
                    rest = ((len(jits) - index - 1) * OTHER_COMPILE_FACTOR * compile_seconds[f"jit={jit}"]
                            + sum(g.calls == 0 and not g.skipped for g in candidates) * budget.window())
                    if rest > max_fraction * expected:
                        too_short = (f"measuring the rest would take ~{rest:.0f} s, over "
                                     f"{100 * max_fraction:g}% of the expected {expected:.0f} s run")
    finally:
        snapshot.restore()
    if too_short:
        for c in candidates:
            if c.steps_per_second is None and not c.skipped:
                c.skipped = too_short
        jit = bool(fallback[0]) and not xla_failed
        settings = StepSettings(
            jit_compile=jit, steps_per_call=int(fallback[1]), source="default",
            candidates=candidates, tuning_seconds=round(time.perf_counter() - started, 3),
            compile_seconds=compile_seconds, expected_run_seconds=budget.expected_run_seconds(),
            note=f"not measured: {too_short}", steps=compiled.get(jit))
        logging.info("Step settings of %s not measured (%s): jit_compile=%s, steps_per_call=%d (defaults); "
                     "the check took %.1f s", model_name, too_short, settings.jit_compile,
                     settings.steps_per_call, settings.tuning_seconds)
        return settings
    timed = [c for c in candidates if c.steps_per_second is not None]
    best = max(timed, key=lambda c: c.steps_per_second)
    settings = StepSettings(
        jit_compile=best.jit_compile, steps_per_call=best.steps_per_call, source="autotune",
        candidates=candidates, tuning_seconds=round(time.perf_counter() - started, 3),
        compile_seconds=compile_seconds, expected_run_seconds=budget.expected_run_seconds(),
        steps=compiled[best.jit_compile])
    expected = settings.expected_run_seconds
    logging.info("Auto-tuned %s: jit_compile=%s steps_per_call=%d (%.2f steps/s); tuning took %.1f s "
                 "(first calls %s)%s. Steps/s: %s", model_name, settings.jit_compile,
                 settings.steps_per_call, best.steps_per_second, settings.tuning_seconds,
                 ", ".join(f"{k} {v:.1f} s" for k, v in compile_seconds.items()),
                 f", {100 * settings.tuning_seconds / expected:.1f}% of the expected {expected:.0f} s run"
                 if expected else "", settings.summary())
    return settings


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
