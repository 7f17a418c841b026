"""Pick the step's ``jit_compile``, ``steps_per_call`` and precision for a run by timing them on that run.

Which setting is fastest is not a property of a model family: on CPU, XLA was several times slower for
the LSTM, slower for the CNN's convolutions and faster for the Transformer chain reasoner, and the best
number of optimizer steps per compiled call depends on how long one step takes next to the Python
round trip. So the trainer times a few candidates on the run's own model, optimizer, loss, data and
strategy and keeps the fastest (``choose_step_settings``).

Precision is a candidate too where the hardware has fast low-precision math (``fast_low_precision``:
bfloat16 on CPUs with AVX512_BF16/AMX and on TPUs, float16 with loss scaling on GPUs with tensor cores).
A low-precision step is kept only if it is faster than the fastest float32 one by LOW_PRECISION_MARGIN
AND trains the same: every variant starts from the same weights on the same batches, so step i of the
low-precision variant is compared with step i of float32; its mean loss over the steps both ran must be
within LOSS_TOLERANCE (relative) of float32's, with no NaN or inf.

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
import functools
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
# ... and a variant of the same jit_compile in another precision as this many times the first one's
# tracing (its first call less the steps it ran: 7.6 s of 10.8 s for the cifar10 model at 10 steps/call).
SAME_JIT_COMPILE_FACTOR = 1.0
SECONDS_PER_CANDIDATE = 2.0  # window cap; a candidate whose single call is longer is skipped
MIN_WINDOW = 0.25  # window floor, so that fast steps still get a meaningful median
MIN_CALLS = 3  # timed calls per candidate (median), unless they overrun twice the window
FLOAT32 = "float32"
# A low-precision step must beat the fastest float32 one by this much to be kept: a smaller gain is within
# the tuning window's noise, and float32 is the safer numerics.
LOW_PRECISION_MARGIN = 0.05
# ... and its mean train loss over the steps both ran (same start, same batches) must be within this
# relative distance of float32's (bfloat16 keeps 8 bits of mantissa: ~0.4% per value; dropout masks
# drawn in another dtype differ too). Measured on cifar10 32x32x3: see benchmarks/README.md.
LOSS_TOLERANCE = 0.02
# ... over at least this many steps: a variant whose timed calls ran fewer is run on, untimed, to this many
# as far as one more timing window allows (the cifar10 model's float32 variant timed only 5 steps).
MIN_CHECK_STEPS = 20


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_low_precision() -> str:
    """The mixed-precision policy this machine's matrix units run faster than float32, or "": bfloat16
    on TPUs and on CPUs with AVX512_BF16 or AMX (oneDNN's bf16 kernels), float16 on GPUs of compute
    capability 7.0 or more (tensor cores; float16 then needs loss scaling)."""
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return "mixed_float16" if capability and tuple(capability) >= (7, 0) else ""
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return "mixed_bfloat16"
    return ""


def _label(precision: str, jit: bool) -> str:
    return f"jit={jit}" if precision == FLOAT32 else f"{precision} jit={jit}"


@dataclasses.dataclass
class Candidate:
    jit_compile: bool
    steps_per_call: int
    precision: str = FLOAT32
    steps_per_second: Optional[float] = None  # median over the timed calls; None if not timed
    calls: int = 0
    skipped: str = ""  # why it was not timed


@dataclasses.dataclass
class StepSettings:
    """The step settings of a run and how they were decided.

    source: "autotune" (measured now), "reused" (measured by an earlier run in the same workdir),
    "explicit" (all given), or "default" (auto-tuning skipped; ``note`` says why).
    ``numerics``: per low-precision variant measured, its loss check against float32.
    """

    jit_compile: bool
    steps_per_call: int
    source: str
    mixed_precision: str = FLOAT32
    candidates: list = dataclasses.field(default_factory=list)
    tuning_seconds: float = 0.0  # wall time of the whole measurement, compilation included
    compile_seconds: dict = dataclasses.field(default_factory=dict)  # "jit=<bool>" -> first call
    expected_run_seconds: Optional[float] = None
    note: str = ""
    numerics: dict = dataclasses.field(default_factory=dict)
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
        return ", ".join(f"{'' if c.precision == FLOAT32 else c.precision + '/'}jit={c.jit_compile}/"
                         f"spc={c.steps_per_call}: {c.steps_per_second:.1f}" for c in timed)


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
        self.compiled: dict = {}  # (precision, jit_compile) -> its compiled Steps
        self.compile_seconds: dict = {}
        self.losses: dict = {}  # (precision, jit_compile) -> per-step train losses, from the snapshot on
        self.stopped = ""  # why measuring stopped early (the fallback is then used)
        self.dropped: dict = {}  # (precision, jit_compile) -> why this variant is not measured (budget)
        self.check_steps = 0  # steps every variant runs at least, for the loss check (0: no check)
        self.xla_failed = False

    def measure_variant(self, precision: str, jit: bool, steps: step_lib.Steps, iterator,
                        variants_left: list) -> None:
        """Compile ``steps`` (first call, untimed), then time each candidate of this variant."""
        group = [c for c in self.candidates if (c.precision, c.jit_compile) == (precision, jit)]
        losses = self.losses.setdefault((precision, jit), [])

        def run_call(n):
            # Fetch every output, as the trainer does after each call.
            out = {k: v.numpy() for k, v in steps.train(iterator, tf.constant(n, tf.int32)).items()}
            losses.extend(float(x) for x in out["loss"])
            return out

        first = time.perf_counter()
        run_call(group[0].steps_per_call)  # tracing and compilation: not timed
        self.compile_seconds[_label(precision, jit)] = round(time.perf_counter() - first, 3)
        self.compiled[(precision, jit)] = steps
        for c in group:
            if self.stopped:
                c.skipped = self.stopped
                continue
            # The largest setting timed so far is the closest to this one's per-step time.
            rate = next((g.steps_per_second for g in reversed(group) if g.steps_per_second), None)
            if rate and c.steps_per_call / rate > self.seconds_per_candidate:
                c.skipped = (f"one call would take ~{c.steps_per_call / rate:.1f} s, over the "
                             f"{self.seconds_per_candidate:.1f} s per candidate")
                logging.info("auto-tune %s %s steps_per_call=%d: skipped (%s)",
                             self.model_name, _label(precision, jit), c.steps_per_call, c.skipped)
                continue
            _time_candidate(c, lambda c=c: run_call(c.steps_per_call), self.budget, self.min_calls,
                            self.time_call)
            logging.info("auto-tune %s %s steps_per_call=%d: %.2f steps/s (median of %d calls)",
                         self.model_name, _label(precision, jit), c.steps_per_call, c.steps_per_second,
                         c.calls)
            if self.fallback is not None and c is next(g for g in self.candidates if g.calls):
                self._stop_if_the_rest_costs_too_much(self.compile_seconds[_label(precision, jit)],
                                                      variants_left)
        # Untimed steps for the loss check, as many as one more window holds (a slow step, such as the
        # LSTM's under XLA at 0.35 steps/s, is checked on fewer steps rather than blowing the budget).
        rate = max((g.steps_per_second or 0.0) for g in group)
        extra = min(self.check_steps - len(losses), int(self.budget.window() * rate))
        if not self.stopped and extra > 0:
            run_call(extra)

    def _stop_if_the_rest_costs_too_much(self, compile_seconds: float, variants_left: list) -> None:
        """After the first timed candidate: compiling the other variants (estimated from this one) and
        timing the remaining candidates must fit in ``max_fraction`` of the expected run. Variants are
        kept in their order (the fallback's jit_compile in low precision comes right after float32) while
        they fit; the rest are dropped. If no other variant fits, measuring stops (the fallback is
        used)."""
        expected = self.budget.expected_run_seconds()
        allowed = self.max_fraction * expected
        window = self.budget.window()
        current = sum(g.calls == 0 and not g.skipped for g in self.candidates
                      if (g.precision, g.jit_compile) not in variants_left)
        cost = current * window
        # The first call also ran its steps; what is left is tracing/compiling. A variant of the other
        # jit_compile costs OTHER_COMPILE_FACTOR times that, one of the same jit_compile (another
        # precision) about as much.
        measured = next(g for g in self.candidates if g.calls)
        tracing = max(0.0, compile_seconds - measured.steps_per_call / measured.steps_per_second)

        def variant_cost(v):
            factor = SAME_JIT_COMPILE_FACTOR if v[1] == measured.jit_compile else OTHER_COMPILE_FACTOR
            return factor * tracing + window * sum((g.precision, g.jit_compile) == v for g in self.candidates)

        rest = cost + sum(variant_cost(v) for v in variants_left)
        if rest <= allowed:
            return
        if cost > allowed:
            self.stopped = (f"measuring the rest would take ~{rest:.0f} s, over "
                            f"{100 * self.max_fraction:g}% of the expected {expected:.0f} s run")
            return
        for v in variants_left:
            cost += variant_cost(v)
            if cost > allowed:
                self.dropped[v] = (f"not measured: over {100 * self.max_fraction:g}% of the expected "
                                   f"{expected:.0f} s run with the variants before it")
        if len(self.dropped) == len(variants_left):  # no other variant fits: keep the fallback
            self.dropped.clear()
            self.stopped = (f"measuring the rest would take ~{rest:.0f} s, over "
                            f"{100 * self.max_fraction:g}% of the expected {expected:.0f} s run")

    def check_numerics(self) -> dict:
        """Each low-precision variant's losses against float32's over the steps both ran (same start,
        same batches); a variant that fails is left out of the choice (its candidates say why)."""
        report = {}
        for (precision, jit), losses in self.losses.items():
            if precision == FLOAT32:
                continue
            reference = self.losses.get((FLOAT32, jit)) or next(
                (v for (p, _), v in self.losses.items() if p == FLOAT32 and v), None)
            n = min(len(losses), len(reference or []))
            entry = {"steps": n}
            if not all(np.isfinite(losses)):
                entry["rejected"] = "a non-finite loss"
            elif not n:
                entry["rejected"] = "no float32 losses to compare with"
            else:
                mean, ref = float(np.mean(losses[:n])), float(np.mean(reference[:n]))
                difference = abs(mean - ref) / max(abs(ref), 1e-12)
                entry.update(mean_loss=mean, float32_mean_loss=ref, relative_difference=difference)
                if difference > LOSS_TOLERANCE:
                    entry["rejected"] = (f"mean loss {mean:.5g} vs float32 {ref:.5g} over {n} steps: "
                                         f"{100 * difference:.2f}% apart, over {100 * LOSS_TOLERANCE:g}%")
            report[_label(precision, jit)] = entry
            if "rejected" in entry:
                logging.info("auto-tune %s %s does not train like float32 (%s): left out", self.model_name,
                             _label(precision, jit), entry["rejected"])
                for c in self.candidates:
                    if (c.precision, c.jit_compile) == (precision, jit):
                        c.skipped = c.skipped or f"not kept: {entry['rejected']}"
        return report

    def best(self) -> Candidate:
        """The fastest float32 candidate, unless a low-precision one that passed the numerics check is
        LOW_PRECISION_MARGIN faster."""
        timed = [c for c in self.candidates if c.steps_per_second is not None
                 and not c.skipped.startswith("not kept")]
        best32 = max((c for c in timed if c.precision == FLOAT32), key=lambda c: c.steps_per_second,
                     default=None)
        low = max((c for c in timed if c.precision != FLOAT32), key=lambda c: c.steps_per_second,
                  default=None)
        if best32 is None or (low is not None and low.steps_per_second
                              >= (1 + LOW_PRECISION_MARGIN) * best32.steps_per_second):
            return low
        return best32

    def result(self, tuning_seconds: float) -> StepSettings:
        common = dict(candidates=self.candidates, tuning_seconds=round(tuning_seconds, 3),
                      compile_seconds=self.compile_seconds,
                      expected_run_seconds=self.budget.expected_run_seconds(),
                      numerics=self.check_numerics())
        if self.stopped:
            for c in self.candidates:
                if c.steps_per_second is None and not c.skipped:
                    c.skipped = self.stopped
            jit = bool(self.fallback[0]) and not self.xla_failed
            precision = self.fallback[2] if len(self.fallback) > 2 else FLOAT32
            settings = StepSettings(jit_compile=jit, steps_per_call=int(self.fallback[1]), source="default",
                                    mixed_precision=precision, note=f"not measured: {self.stopped}",
                                    steps=self.compiled.get((precision, jit)), **common)
            logging.info("Step settings of %s not measured (%s): jit_compile=%s, steps_per_call=%d "
                         "(defaults); the check took %.1f s", self.model_name, self.stopped,
                         settings.jit_compile, settings.steps_per_call, settings.tuning_seconds)
            return settings
        best = self.best()
        settings = StepSettings(jit_compile=best.jit_compile, steps_per_call=best.steps_per_call,
                                source="autotune", mixed_precision=best.precision,
                                steps=self.compiled[(best.precision, best.jit_compile)], **common)
        expected = settings.expected_run_seconds
        logging.info("Auto-tuned %s: %s jit_compile=%s steps_per_call=%d (%.2f steps/s); tuning took %.1f s "
                     "(first calls %s)%s. Steps/s: %s", self.model_name, settings.mixed_precision,
                     settings.jit_compile, settings.steps_per_call, best.steps_per_second,
                     settings.tuning_seconds,
                     ", ".join(f"{k} {v:.1f} s" for k, v in self.compile_seconds.items()),
                     f", {100 * settings.tuning_seconds / expected:.1f}% of the expected {expected:.0f} s "
                     f"run" if expected else "", settings.summary())
        return settings


def choose_step_settings(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn: Callable,
                         dataset_fn: Callable[[], tf.data.Dataset], *, global_batch_size: int,
                         run_steps: int, strategy: Optional[tf.distribute.Strategy] = None,
                         clip_norm: float = 1.0, jit_options: Sequence[bool] = (False, True),
                         steps_per_call_options: Sequence[int] = STEPS_PER_CALL_OPTIONS,
                         precision_options: Sequence[str] = (FLOAT32,),
                         model_name: str = "model", fallback: Optional[tuple] = None,
                         max_fraction: float = MAX_FRACTION,
                         seconds_per_candidate: float = SECONDS_PER_CANDIDATE,
                         min_window: float = MIN_WINDOW, min_calls: int = MIN_CALLS,
                         check_steps: int = MIN_CHECK_STEPS,
                         time_call: Optional[Callable[[Candidate, Callable[[], None]], float]] = None
                         ) -> StepSettings:
    """Time every (precision, jit_compile, steps_per_call) candidate and return the fastest, with all
    rates.

    ``dataset_fn()`` returns the run's train stream at its current position (a new dataset each call;
    the run's own iterator is never touched). ``run_steps``: steps the run still has to do; it caps
    ``steps_per_call`` and sets the time budget. A ``True`` in ``jit_options`` is dropped (with a
    warning) when the XLA pre-flight fails, unless it is the only option. ``precision_options``: Keras
    policy names, the first the reference (float32); a low-precision one is kept only if it passes the
    numerics check (module docstring) and is LOW_PRECISION_MARGIN faster than the best float32
    candidate; one that cannot be traced (a layer that breaks in that dtype) is left out with a warning.

    Per (precision, ``jit_compile``) variant, the model starts from the same snapshot and reads the
    stream from the same position; the first call (tracing, XLA compilation) is not timed; each
    candidate then runs calls until its window is used, and its rate is the median over those calls. A
    candidate whose single call would take longer than ``seconds_per_candidate`` (estimated from the
    same step at fewer steps per call) is skipped: with steps that slow, the per-call overhead it saves
    is noise.

    With ``fallback=(jit_compile, steps_per_call[, precision])`` (the defaults used without measuring),
    the fallback's variant is measured first, and if the first candidate shows that the rest (compiling
    the other variants, estimated from the first, and the remaining windows) would cost more than
    ``max_fraction`` of the expected run, measuring stops and the fallback is returned (source "default",
    with its already compiled step, so the check costs little beyond one window).

    ``time_call(candidate, call) -> seconds`` replaces the wall clock (tests make choices deterministic).
    Every variable a step can change is restored bit for bit afterwards (``training_state_variables``),
    and the model is left in the chosen precision.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not jit_options:
        raise ValueError("jit_options is empty")
    if run_steps < 1:
        raise ValueError(f"run_steps must be >= 1, got {run_steps}")
    jits = list(dict.fromkeys(bool(j) for j in jit_options))
    precisions = list(dict.fromkeys(p or FLOAT32 for p in precision_options)) or [FLOAT32]
    if fallback is not None:  # if measuring stops early, the compiled step is the one the run uses
        jits.sort(key=lambda j: j != bool(fallback[0]))
        if len(fallback) > 2:
            precisions.sort(key=lambda p: p != fallback[2])
    per_call = steps_per_call_candidates(run_steps, (), steps_per_call_options)
    # Low precision at the fallback's jit_compile right after float32's: on a tight budget the variants
    # at the end are the ones dropped.
    variants = [(p, jit) for p in precisions for jit in jits]
    variants.sort(key=lambda v: (jits.index(v[1]) > 0, precisions.index(v[0])))
    candidates = [Candidate(jit, spc, p) for p, jit in variants for spc in per_call]
    measurement = _Measurement(
        candidates, _Budget(run_steps, len(candidates), max_fraction, seconds_per_candidate, min_window),
        fallback, max_fraction, seconds_per_candidate, min_calls, time_call or _wall_time, model_name)
    measurement.check_steps = check_steps if len(precisions) > 1 else 0
    snapshot = _Snapshot(training_state_variables(model, optimizer))
    started = time.perf_counter()
    settings = None
    try:
        for index, (precision, jit) in enumerate(variants):
            if measurement.stopped:
                break
            if (precision, jit) in measurement.dropped:
                for c in candidates:
                    if (c.precision, c.jit_compile) == (precision, jit):
                        c.skipped = measurement.dropped[(precision, jit)]
                continue
            snapshot.restore()  # every variant starts from the same state: their losses are comparable
            step_lib.set_precision(model, precision)

            def leave_out(why):
                for c in candidates:
                    if (c.precision, c.jit_compile) == (precision, jit):
                        c.skipped = why

            steps = step_lib.make_steps(model, optimizer, loss_fn, global_batch_size=global_batch_size,
                                        strategy=strategy, jit_compile=jit, clip_norm=clip_norm)
            if jit and strategy.num_replicas_in_sync == 1:
                inputs, labels = next(iter(dataset_fn()))
                try:
                    step_lib.preflight_xla(steps, inputs, labels, model_name)
                except UserError as e:
                    if len(jits) == 1 and len(precisions) == 1:
                        raise
                    logging.warning("Auto-tuning leaves %s out: %s", _label(precision, jit), e)
                    measurement.xla_failed = measurement.xla_failed or precision == FLOAT32
                    leave_out("XLA pre-flight failed")
                    continue
            iterator = iter(strategy.experimental_distribute_dataset(dataset_fn()))
            try:
                measurement.measure_variant(precision, jit, steps, iterator,
                                            variants_left=variants[index + 1:])
            except (TypeError, ValueError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
                if precision == FLOAT32:
                    raise
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                logging.warning("Auto-tuning leaves %s out: the step does not run in it (%s)",
                                _label(precision, jit), first)
                leave_out(f"does not run in {precision}: {first}")
        settings = measurement.result(time.perf_counter() - started)
    finally:
        snapshot.restore()
        step_lib.set_precision(model, settings.mixed_precision if settings else FLOAT32)
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


# --- the policy: which settings a training run uses -----------------------------------------------------
#
# Explicit settings are used as given (precision "auto" means float32 plus the machine's fast low
# precision, if it has one); a workdir that already recorded settings for the same batch size,
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


AUTO = "auto"


def _auto_low_precision(spec) -> str:
    """The low precision "auto" may try: this machine's fast one, unless the family opts out ("": none)."""
    return fast_low_precision() if spec is None or spec.auto_low_precision else ""


def precision_options(config, optimizer: Optional[keras.optimizers.Optimizer] = None, spec=None) -> tuple:
    """The precisions a run may use: the one set in ``config.mixed_precision``, or for "auto" float32 and
    this machine's fast low precision (``fast_low_precision``) unless the family (``spec``) opts out
    (``auto_low_precision``). float16 needs the trainer's LossScaleOptimizer
    (``needs_loss_scale_optimizer``); without one it is not a candidate."""
    if config.mixed_precision != AUTO:
        return (config.mixed_precision or FLOAT32,)
    low = _auto_low_precision(spec)
    if step_lib.needs_loss_scaling(low) and optimizer is not None and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        low = ""
    return (FLOAT32, low) if low else (FLOAT32,)


def needs_loss_scale_optimizer(config, spec=None) -> bool:
    """Whether the run's optimizer must be a LossScaleOptimizer (float16 set, or a candidate here)."""
    choice = _auto_low_precision(spec) if config.mixed_precision == AUTO else config.mixed_precision
    return step_lib.needs_loss_scaling(choice)


def recorded_settings(saved_record: Optional[dict], config) -> Optional[StepSettings]:
    """The settings an earlier run in the workdir recorded (config.json), if they still apply to
    ``config``; marked "reused"."""
    if not saved_record or "step_settings" not in saved_record:
        return None
    before = dict(saved_record.get("train", {}))
    if before.get("mixed_precision", "") == "" and "mixed_precision" not in saved_record["step_settings"]:
        # Recorded before precision was a step setting: its "" default was float32, which is what an
        # "auto" resume must keep (it reuses the record instead of measuring again).
        before["mixed_precision"] = config.mixed_precision if config.mixed_precision == AUTO else ""
    if any(before.get(name) != getattr(config, name) for name in STEP_SETTING_FIELDS):
        logging.info("The step settings in config.json were chosen for other %s; choosing again.",
                     "/".join(STEP_SETTING_FIELDS))
        return None
    settings = StepSettings.from_record(saved_record["step_settings"])
    if "mixed_precision" not in saved_record["step_settings"]:  # recorded before precision was a setting
        settings.mixed_precision = saved_record.get("train", {}).get("mixed_precision") or FLOAT32
    if settings.source != "reused":
        settings.note = f"{settings.source} in an earlier run in this workdir"
        settings.source = "reused"
    logging.info("Step settings from config.json (%s): %s, jit_compile=%s, steps_per_call=%d%s",
                 settings.note, settings.mixed_precision, settings.jit_compile, settings.steps_per_call,
                 f"; measured steps/s: {settings.summary()}" if settings.summary() else "")
    return settings


def settings_for_run(config, spec, strategy: tf.distribute.Strategy, *, model: keras.Model,
                     optimizer: keras.optimizers.Optimizer, dataset_fn: Callable[[], tf.data.Dataset],
                     run_steps: int, model_name: str, saved_record: Optional[dict] = None,
                     **measure_options) -> StepSettings:
    """Precision, jit_compile and steps_per_call for a training run (the whole policy; see the notes
    above); ``model`` is left in the chosen precision (``step.set_precision``).

    ``config``: the run's training config (``jit_compile``, ``steps_per_call``, ``mixed_precision``,
    ``batch_size``, ``clip_norm``, the log/checkpoint/eval intervals and ``STEP_SETTING_FIELDS``);
    ``run_steps``: steps still to run; ``saved_record``: the workdir's config.json, if any;
    ``dataset_fn()``: the train stream at the run's position. ``measure_options`` go to
    ``choose_step_settings`` (budget, clock).
    """
    settings = _settings_for_run(config, spec, strategy, model=model, optimizer=optimizer,
                                 dataset_fn=dataset_fn, run_steps=run_steps, model_name=model_name,
                                 saved_record=saved_record, **measure_options)
    step_lib.set_precision(model, settings.mixed_precision)
    return settings


def _settings_for_run(config, spec, strategy, *, model, optimizer, dataset_fn, run_steps, model_name,
                      saved_record, **measure_options) -> StepSettings:
    jit_options = jit_compile_options(config, spec, strategy)
    precisions = precision_options(config, optimizer, spec)
    if len(jit_options) == 1 and config.steps_per_call and len(precisions) == 1:
        return StepSettings(jit_options[0], config.steps_per_call, "explicit", mixed_precision=precisions[0])
    recorded = recorded_settings(saved_record, config)
    if recorded is not None:
        return recorded
    fallback = (resolve_jit_compile(config, spec, strategy), config.steps_per_call or DEFAULT_STEPS_PER_CALL,
                precisions[0])
    reason = ""
    if run_steps < MIN_AUTOTUNE_STEPS:
        reason = f"{run_steps} steps to run, fewer than the {MIN_AUTOTUNE_STEPS} that pay for measuring"
    elif not single_process(strategy):
        reason = "multi-process strategy (every worker must use the same settings)"
    if reason:
        settings = StepSettings(*fallback[:2], "default", mixed_precision=fallback[2],
                                note=f"not measured: {reason}")
        logging.info("Step settings not measured (%s): %s, jit_compile=%s (family default), "
                     "steps_per_call=%d", reason, settings.mixed_precision, settings.jit_compile,
                     settings.steps_per_call)
        return settings
    per_call = ((config.steps_per_call,) if config.steps_per_call else steps_per_call_candidates(
        run_steps, (config.log_every, config.checkpoint_every, config.eval_every)))
    return choose_step_settings(
        model, optimizer, spec.loss, dataset_fn, global_batch_size=config.batch_size, run_steps=run_steps,
        strategy=strategy, clip_norm=config.clip_norm, jit_options=jit_options,
        steps_per_call_options=per_call, precision_options=precisions, model_name=model_name,
        fallback=fallback, **measure_options)
