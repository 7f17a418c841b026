"""Side-by-side measurements: training throughput of the shared step vs Keras fit vs an eager loop, model
FLOPs utilisation against this machine's measured matmul peak, and per-step inference time.

The "tfmstep auto" row is what the trainer would run: the setting ``tfmstep.autotune`` picks for a run of
``tune_for_steps`` steps (its measured candidates are reported too), then timed like every other row.

Everything is measured in one process on the same batches, every setting compiled first and then timed
round-robin (repeat 1 of each setting, then repeat 2, ...), so the ratios are comparable even on a noisy
machine; absolute numbers are not. Nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import autotune, registry, step as step_lib, trainer

_CACHED_BATCHES = 8


@dataclasses.dataclass
class Timing:
    name: str
    examples_per_second: float  # median over repeats
    spread: float  # (max - min) / median over repeats
    repeats: list

    def as_dict(self):
        return dataclasses.asdict(self)


def _summarise(name: str, per_repeat_rates: list) -> Timing:
    median = statistics.median(per_repeat_rates)
    return Timing(name, median, (max(per_repeat_rates) - min(per_repeat_rates)) / median,
                  [round(r, 2) for r in per_repeat_rates])


def _fixed_batches(spec, config, batch_size: int) -> tf.data.Dataset:
    """A few real batches held in memory and repeated: the input pipeline is not what is measured."""
    return spec.dataset(config, "train", batch_size, seed=0).take(_CACHED_BATCHES).cache().repeat()


def _fresh(spec, config, seed=0):
    keras.utils.set_random_seed(seed)
    return spec.build(config)


def _optimizer(total_steps=10_000):
    return step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                            total_steps=total_steps))


# A runner is set up (built, traced, compiled, warmed up) once; each call times one repeat and returns
# examples/s. ``time_interleaved`` calls all of a model's runners in turn, repeat after repeat, so slow
# drifts of this shared machine hit every setting alike instead of whichever happened to run then.
Runner = Callable[[], float]


def tfmstep_runner(spec, config, batch_size, *, jit_compile, steps_per_call, steps) -> Runner:
    model = _fresh(spec, config)
    optimizer = _optimizer()
    optimizer.build(model.trainable_variables)
    steps_fns = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=batch_size,
                                    jit_compile=jit_compile)
    iterator = iter(_fixed_batches(spec, config, batch_size))
    calls = max(1, steps // steps_per_call)
    n = tf.constant(steps_per_call, tf.int32)
    steps_fns.train(iterator, n)["loss"].numpy()  # trace + compile

    def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = steps_fns.train(iterator, n)
        out["loss"].numpy()
        return calls * steps_per_call * batch_size / (time.perf_counter() - start)

    return run


class _SpecLossModel(keras.Model):
    """The model with the family's loss as its ``compute_loss`` (Keras' hook for custom objectives), so
    ``compile``/``fit`` trains the same objective even when outputs and labels are dicts of other keys."""

    def __init__(self, inner: keras.Model, loss_fn: Callable):
        super().__init__(name="spec_loss_model")
        self.inner = inner
        self.loss_fn = loss_fn

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = tf.reduce_mean(self.loss_fn(y, y_pred)[0])
        return loss + tf.add_n(self.losses) if self.losses else loss


class _EpochTimer(keras.callbacks.Callback):
    """Times the epoch only: fit's own set-up before the first epoch is not part of a training step."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def keras_fit_runner(spec, config, batch_size, *, jit_compile, steps_per_execution, steps,
                     default_optimizer=False) -> Runner:
    model = _SpecLossModel(_fresh(spec, config), spec.loss)
    optimizer = "adam" if default_optimizer else _optimizer()
    model.compile(optimizer=optimizer, jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    dataset = _fixed_batches(spec, config, batch_size)
    timer = _EpochTimer()

    def run() -> float:
        # One epoch of `steps` steps per repeat; fit reuses its compiled train function across calls.
        model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
        return steps * batch_size / timer.seconds[-1]

    run()  # tracing and compilation
    return run


def eager_runner(spec, config, batch_size, *, steps) -> Runner:
    """The textbook loop: GradientTape in plain Python, no tf.function."""
    model = _fresh(spec, config)
    optimizer = _optimizer()
    iterator = iter(_fixed_batches(spec, config, batch_size))

    def one_step():
        inputs, labels = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(spec.loss(labels, model(inputs, training=True))[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    one_step()
    eager_steps = max(2, steps // 4)  # eager is slow; fewer steps give the same rate

    def run() -> float:
        start = time.perf_counter()
        for _ in range(eager_steps):
            loss = one_step()
        loss.numpy()
        return eager_steps * batch_size / (time.perf_counter() - start)

    return run


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
    return [_summarise(name, per_repeat) for name, per_repeat in rates.items()]


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s (best of several), the MFU denominator."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    inner = 10

    @tf.function
    def chain(a, b):
        x = a
        for _ in range(inner):
            x = tf.matmul(x, b) * 1e-3  # keep values finite; the scale is O(n^2), negligible
        return x

    chain(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - start))
    return best


def forward_flops_per_example(model: keras.Model, inputs) -> float:
    """Forward-pass float ops per example from TF's graph profiler (counts matmuls and convolutions).

    Ops inside while loops (LSTM recurrences, looped blocks) are not seen by the profiler: families with
    loops get an analytic count from ``ANALYTIC_FORWARD_FLOPS`` instead.
    """
    specs = tf.nest.map_structure(lambda t: tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype), inputs)
    # training=True: the graph that is trained (a looped model unrolls its training iterations there).
    concrete = tf.function(lambda x: model(x, training=True)).get_concrete_function(specs)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=concrete.graph, run_meta=tf.compat.v1.RunMetadata(),
                                            cmd="op", options=options)
    return float(profile.total_float_ops)


def _lstm_forward_flops(config, inputs) -> float:
    """Per sequence: each LSTM layer does 4 gates x (input + recurrent) matmuls per token, plus the head."""
    tokens = int(inputs.shape[1])
    per_token, width = 0.0, config.embedding_dim
    for _ in range(config.layers):
        per_token += 2.0 * 4 * config.units * (width + config.units)
        width = config.units
    per_token += 2.0 * config.units * config.vocab_size
    return per_token * tokens


# name -> f(config, inputs) forward FLOPs per example, for families whose compute hides in while loops
# (TF's profiler does not look inside them).
ANALYTIC_FORWARD_FLOPS: dict[str, Callable] = {"lstm_lm": _lstm_forward_flops}


def training_flops_per_example(name: str, model, config, inputs) -> float:
    """Backward costs about twice the forward pass: training ~ 3x forward."""
    if name in ANALYTIC_FORWARD_FLOPS:
        return 3.0 * ANALYTIC_FORWARD_FLOPS[name](config, inputs)
    return 3.0 * forward_flops_per_example(model, inputs)


def autotuned_settings(name: str, spec, config, batch_size: int, run_steps: int) -> autotune.StepSettings:
    """What the trainer would choose for a default-strategy run of ``run_steps`` steps with the default
    TrainConfig intervals: the same candidates, budget and data pipeline."""
    model = _fresh(spec, config)
    optimizer = _optimizer(run_steps)
    optimizer.build(model.trainable_variables)
    defaults = trainer.TrainConfig(steps=run_steps, batch_size=batch_size)
    strategy = tf.distribute.get_strategy()
    fallback = (trainer.resolve_jit_compile(defaults, spec, strategy), trainer.DEFAULT_STEPS_PER_CALL)
    return autotune.choose_step_settings(
        model, optimizer, spec.loss, lambda: spec.dataset(config, "train", batch_size, seed=0),
        global_batch_size=batch_size, run_steps=run_steps, strategy=strategy,
        jit_options=trainer.jit_compile_options(defaults, spec, strategy),
        steps_per_call_options=autotune.steps_per_call_candidates(
            run_steps, (defaults.log_every, defaults.checkpoint_every, defaults.eval_every)),
        model_name=name, fallback=fallback)


def benchmark_training(name: str, preset: str = "default", batch_size: int = 64, steps: int = 50,
                       repeats: int = 3, peak_flops: float | None = None, tune_for_steps: int = 1000) -> dict:
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    logging.info("%s: auto-tuning as the trainer would for a %d-step run", name, tune_for_steps)
    settings = autotuned_settings(name, spec, config, batch_size, tune_for_steps)
    how = "measured" if settings.source == "autotune" else "family default, not measured"
    auto_name = f"tfmstep auto: {how} (jit={settings.jit_compile} steps_per_call={settings.steps_per_call})"
    defaults_name = "keras fit defaults (adam, jit auto, steps_per_execution 1)"
    eager_name = "eager GradientTape loop"
    logging.info("%s: setting up and compiling every setting", name)
    runners = {auto_name: tfmstep_runner(spec, config, batch_size, jit_compile=settings.jit_compile,
                                         steps_per_call=settings.steps_per_call, steps=steps)}
    for jit in (False, True):
        for per_call in (1, 10):
            runners[f"tfmstep jit={jit} steps_per_call={per_call}"] = tfmstep_runner(
                spec, config, batch_size, jit_compile=jit, steps_per_call=per_call, steps=steps)
    for jit in (False, True):
        for per_execution in (1, 10):
            runners[f"keras fit jit={jit} steps_per_execution={per_execution}"] = keras_fit_runner(
                spec, config, batch_size, jit_compile=jit, steps_per_execution=per_execution, steps=steps)
    runners[defaults_name] = keras_fit_runner(spec, config, batch_size, jit_compile="auto",
                                              steps_per_execution=1, steps=steps, default_optimizer=True)
    runners[eager_name] = eager_runner(spec, config, batch_size, steps=steps)
    logging.info("%s: timing %d settings, %d interleaved repeats", name, len(runners), repeats)
    results = time_interleaved(runners, repeats)
    by_name = {r.name: r for r in results}

    ours = [r for r in results if r.name.startswith("tfmstep")]
    keras_all = [r for r in results if r.name.startswith("keras")]
    best_ours = max(ours, key=lambda r: r.examples_per_second)
    best_keras = max(keras_all, key=lambda r: r.examples_per_second)
    keras_defaults = by_name[defaults_name]
    eager = by_name[eager_name]
    ours_default = by_name[auto_name]  # what a default (auto-tuned) training run uses

    model = _fresh(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "train", 1, seed=0)))
    train_flops = training_flops_per_example(name, model, config, inputs)
    peak = peak_flops or matmul_peak_flops()
    return {
        "model": name, "preset": preset, "batch_size": batch_size,
        "parameters": int(model.count_params()),
        "timings": [r.as_dict() for r in results],
        "best_tfmstep": best_ours.name, "tfmstep_default_setting": ours_default.name,
        "autotune": {"tuned_for_steps": tune_for_steps, **settings.as_record()},
        "ratio_default_vs_best_keras": ours_default.examples_per_second / best_keras.examples_per_second,
        "ratio_best_vs_best_keras": best_ours.examples_per_second / best_keras.examples_per_second,
        "ratio_default_vs_keras_defaults": ours_default.examples_per_second
        / keras_defaults.examples_per_second,
        "ratio_default_vs_eager": ours_default.examples_per_second / eager.examples_per_second,
        "training_flops_per_example": train_flops,
        "achieved_flops": train_flops * ours_default.examples_per_second,
        "peak_matmul_flops": peak,
        "mfu": train_flops * ours_default.examples_per_second / peak,
    }


def percentile_summary(seconds: list) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"mean_ms": float(a.mean()), "std_ms": float(a.std()), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "n": int(a.size)}


def time_in_loop(fn: Callable, inputs, repeats: int = 50, inner: int = 20) -> list:
    """Seconds per ``fn(inputs)`` call, each sample the mean of ``inner`` calls inside one tf.function
    loop, so the ~0.3 ms Python->graph dispatch is not what is measured."""

    @tf.function
    def loop(x):
        acc = tf.zeros((), tf.float32)
        for i in tf.range(inner):
            # The index feeds the input so no call can be hoisted out of the loop or merged with another.
            y = fn(tf.nest.map_structure(lambda t: t + tf.cast(i, t.dtype) * 0, x))
            acc += tf.cast(tf.reduce_sum(tf.nest.flatten(y)[0]), tf.float32) * 0.0
        return acc

    loop(inputs).numpy()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop(inputs).numpy()
        seconds.append((time.perf_counter() - start) / inner)
    return seconds


def cnn_per_layer_times(name: str = "cnn_classifier", preset: str = "default", batch_size: int = 32,
                        repeats: int = 50) -> list:
    """Inference time of each layer of a functional model, each run on its real input from the data."""
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    model = _fresh(spec, config)
    inputs, _ = next(iter(spec.dataset(config, "validation", batch_size)))
    # Each layer's real input: run the model once, capturing intermediate tensors.
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outputs = probe(inputs, training=False)
    layer_inputs = [inputs] + list(outputs[:-1])
    rows = []
    for layer, layer_input in zip(layers, layer_inputs):
        seconds = time_in_loop(lambda x, layer=layer: layer(x, training=False), layer_input, repeats)
        rows.append({"step": layer.name, **percentile_summary(seconds)})
    whole = time_in_loop(lambda x: model(x, training=False), inputs, repeats)
    total = sum(r["mean_ms"] for r in rows)
    for r in rows:
        r["share"] = r["mean_ms"] / total
    rows.append({"step": "whole model (one graph)", **percentile_summary(whole),
                 "share": float(np.mean(whole)) * 1e3 / total})
    return rows


def scaling_report(steps: int = 200, batch_size: int = 64) -> dict:
    """One worker vs two MultiWorkerMirroredStrategy workers (localhost) on the same global batch."""
    import tempfile

    from tfmstep import multiworker

    args = ["--model=cnn_classifier", "--preset=default", f"--steps={steps}", f"--batch_size={batch_size}",
            "--eval_every=0", f"--log_every={steps}", f"--checkpoint_every={steps}", "--jit_compile=false"]
    with tempfile.TemporaryDirectory() as tmp:
        single = multiworker.run_workers(args, os.path.join(tmp, "one"), num_workers=1)
        double = multiworker.run_workers(args, os.path.join(tmp, "two"), num_workers=2)
    one = single["metrics"]["train_seconds_this_run"]
    two = double["metrics"]["train_seconds_this_run"]
    return {"steps": steps, "global_batch": batch_size, "one_worker_train_seconds": one,
            "two_workers_train_seconds": two, "speedup": one / two,
            "one_worker_eval": single["metrics"]["eval"], "two_workers_eval": double["metrics"]["eval"]}


def _table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _autotune_summary(tuned: dict, batch_size: int) -> str:
    chosen = (tuned["jit_compile"], tuned["steps_per_call"])
    stopped = tuned["note"].removeprefix("not measured: ")
    rows = [{"jit_compile": c["jit_compile"], "steps_per_call": c["steps_per_call"],
             "examples_per_second": (c["steps_per_second"] * batch_size
                                     if c["steps_per_second"] is not None else "-"),
             "calls": c["calls"],
             "note": ("not timed (stopped early)" if stopped and c["skipped"] == stopped else c["skipped"])
             or ("chosen" if (c["jit_compile"], c["steps_per_call"]) == chosen else "")}
            for c in tuned["candidates"]]
    first_calls = ", ".join(f"{k} {v:.1f} s" for k, v in tuned["compile_seconds"].items())
    outcome = (f"measuring stopped after the first candidate ({stopped}), so the trainer keeps the family "
               f"default" if tuned["source"] == "default" else "the fastest candidate is chosen")
    return (f"\nAuto-tuning, as the trainer does for a {tuned['tuned_for_steps']}-step run (candidates timed "
            f"on the real input pipeline; {tuned['tuning_seconds']:.1f} s in all, first calls {first_calls}): "
            f"{outcome}.\n\n"
            + _table(rows, ["jit_compile", "steps_per_call", "examples_per_second", "calls", "note"]))


def write_report(results: dict, out_dir: str, command: str) -> str:
    """results.json, README.md (tables) and PNG plots under ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    parts = [f"# Benchmarks\n\nCommand: `{command}`\n\nMachine: {results.get('machine', '')}\n"]
    if "peak_matmul_flops" in results:
        parts.append(f"Measured fp32 matmul peak: {results['peak_matmul_flops'] / 1e9:.1f} GFLOP/s\n")
    for entry in results.get("training", []):
        parts.append(f"## Training throughput: {entry['model']} (batch {entry['batch_size']}, "
                     f"{entry['parameters']:,} parameters)\n")
        parts.append(_table(entry["timings"], ["name", "examples_per_second", "spread"]))
        if "autotune" in entry:
            parts.append(_autotune_summary(entry["autotune"], entry["batch_size"]))
        parts.append(
            f"\ntfmstep default ({entry['tfmstep_default_setting']}) vs best Keras setting: "
            f"**{entry['ratio_default_vs_best_keras']:.2f}x**; vs Keras compile+fit defaults: "
            f"**{entry['ratio_default_vs_keras_defaults']:.2f}x**; vs eager loop: "
            f"**{entry['ratio_default_vs_eager']:.1f}x**. Training FLOPs/example "
            f"{entry['training_flops_per_example']:.3g}; MFU **{100 * entry['mfu']:.1f}%**.\n")
    for name, rows in results.get("inference_steps", {}).items():
        parts.append(f"## Per-step inference time: {name}\n")
        parts.append(_table(rows, ["step", "mean_ms", "std_ms", "p50_ms", "p95_ms", "p99_ms", "share"]))
        parts.append("")
        _plot_steps(name, rows, os.path.join(out_dir, f"{name}_steps.png"))
        parts.append(f"![{name}]({name}_steps.png)\n")
    if "serving" in results:
        entry = results["serving"]
        parts.append(f"## Served-path latency: {entry['model']} (one request, ms)\n")
        parts.append(_table(entry["rows"], ["path", "batch", "p50_ms", "p99_ms", "mean_ms", "std_ms"]))
        parts.append("\n" + ", ".join(f"{k} = **{v:.2f}x**" for k, v in entry["ratios"].items()) + "\n")
    if "scaling" in results:
        s = results["scaling"]
        parts.append("## Multi-worker scaling (MultiWorkerMirroredStrategy, 2 workers on localhost)\n")
        parts.append(f"{s['steps']} steps, global batch {s['global_batch']}: one worker "
                     f"{s['one_worker_train_seconds']:.1f} s, two workers {s['two_workers_train_seconds']:.1f} s "
                     f"(speedup {s['speedup']:.2f}x). Eval loss one/two workers: "
                     f"{s['one_worker_eval']['loss']:.4f} / {s['two_workers_eval']['loss']:.4f}.\n")
    markdown = "\n".join(parts)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(markdown)
    return markdown


def _plot_steps(name: str, rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    labels = [r["step"] for r in rows]
    ax.barh(labels, [r["mean_ms"] for r in rows], xerr=[r["std_ms"] for r in rows], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("ms per call (mean, error bar = std)")
    ax.set_title(f"{name}: time per step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def lstm_per_token_times(name: str = "lstm_lm", preset: str = "default", prompt_tokens: int = 64,
                         new_tokens: int = 64, beam_width: int = 4, repeats: int = 50) -> list:
    """Time per token of generation (batch 1): reading the prompt, a greedy step, a beam-search step.

    Share = that phase's part of one generation of ``new_tokens`` after a ``prompt_tokens`` prompt.
    """
    from tfmstep.models import lstm_lm

    model = _fresh(registry.get_spec(name), registry.get_config(name, preset))
    step = lstm_lm.make_step_fn(model)
    vocab = model.output_shape[-1]

    def prefill_token(args):
        tokens, state = args
        return step(tokens, state)[1]

    def greedy_token(args):
        tokens, state = args
        logits, state = step(tokens, state)
        return tf.argmax(logits, -1, output_type=tf.int32), state

    def beam_token(args):
        tokens, state = args  # k beams of one prompt
        logits, state = step(tokens, state)
        scores = tf.reshape(tf.nn.log_softmax(logits), [1, beam_width * vocab])
        _, chosen = tf.math.top_k(scores, k=beam_width)
        parent = chosen[0] // vocab
        return chosen[0] % vocab, tf.gather(state, parent)

    one = (tf.zeros([1], tf.int32), lstm_lm.initial_state(model, 1))
    beams = (tf.zeros([beam_width], tf.int32), lstm_lm.initial_state(model, beam_width))
    rows = [
        {"step": "prompt token (prefill)", **percentile_summary(time_in_loop(prefill_token, one, repeats)),
         "tokens": prompt_tokens},
        {"step": "greedy token", **percentile_summary(time_in_loop(greedy_token, one, repeats)),
         "tokens": new_tokens},
        {"step": f"beam token (width {beam_width})",
         **percentile_summary(time_in_loop(beam_token, beams, repeats)), "tokens": new_tokens},
    ]
    greedy_total = rows[0]["mean_ms"] * prompt_tokens + rows[1]["mean_ms"] * new_tokens
    beam_total = rows[0]["mean_ms"] * prompt_tokens + rows[2]["mean_ms"] * new_tokens
    rows[0]["share"] = rows[0]["mean_ms"] * prompt_tokens / greedy_total  # of a greedy generation
    rows[1]["share"] = rows[1]["mean_ms"] * new_tokens / greedy_total
    rows[2]["share"] = rows[2]["mean_ms"] * new_tokens / beam_total  # of a beam generation
    return rows


def chain_per_loop_times(name: str = "chain_transformer", preset: str = "default", batch_size: int = 32,
                         repeats: int = 30, many: int = 16) -> list:
    """Time of one reasoning-loop iteration vs the fixed cost (embeddings + answer head), batch 32, for a
    looped preset.

    Per-iteration samples are (time of ``many`` forced loops - mean time of 1 loop) / (many - 1). Shares
    are of a run of as many loops as the median validation problem has hops: a trained reasoner halts
    there (one hop per iteration). The untimed, untrained model here never halts and would run all
    ``max_loops``, so its own ``steps_used`` is not a typical count.
    """
    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    model = _fresh(spec, config)
    inputs, labels = next(iter(spec.dataset(config, "validation", batch_size)))
    one = time_in_loop(lambda x: model(x, training=False, num_loops=1, use_halting=False), inputs, repeats)
    full = time_in_loop(lambda x: model(x, training=False, num_loops=many, use_halting=False), inputs,
                        repeats)
    per_loop = [(t - float(np.mean(one))) / (many - 1) for t in full]
    hops = np.max(labels["depth"].numpy(), axis=1)  # a problem's chain length is its largest depth
    loops = float(np.median(hops))
    fixed_ms = (float(np.mean(one)) - float(np.mean(per_loop))) * 1e3
    loop_ms = float(np.mean(per_loop)) * 1e3
    total = fixed_ms + loops * loop_ms
    return [
        {"step": "embeddings + answer head (fixed)", **percentile_summary(
            [t - float(np.mean(per_loop)) for t in one]), "share": fixed_ms / total},
        {"step": f"one loop iteration (x{loops:g} = median hops)", **percentile_summary(per_loop),
         "share": loops * loop_ms / total},
    ]


# name -> () -> rows of per-step timings; families register how their "steps" are timed.
INFERENCE_STEP_TIMERS: dict[str, Callable] = {"cnn_classifier": cnn_per_layer_times,
                                              "lstm_lm": lstm_per_token_times,
                                              "chain_transformer": chain_per_loop_times}


def inference_step_times() -> dict:
    return {name: timer() for name, timer in INFERENCE_STEP_TIMERS.items()
            if name in registry.list_models()}


def _latencies(call: Callable, repeats: int) -> dict:
    call()  # warm-up (tracing, allocation)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return percentile_summary(seconds)


def served_path_latency(model: keras.Model, saved_model_dir: str, signature: str, input_name: str,
                        tflite_paths: dict, batch, repeats: int = 200) -> list:
    """p50/p99 of one request through: the Keras call, the SavedModel signature, each .tflite file.

    ``batch`` is a numpy array of inputs; every path gets the same values at batch sizes 1 and 32.
    """
    from ai_edge_litert.interpreter import Interpreter

    loaded = tf.saved_model.load(saved_model_dir)
    serving_fn = loaded.signatures[signature]
    keras_fn = tf.function(lambda x: model(x, training=False))
    rows = []
    for batch_size in (1, 32):
        x = np.asarray(batch[:batch_size])
        x_t = tf.constant(x)
        rows.append({"path": "keras call (tf.function)", "batch": batch_size,
                     **_latencies(lambda: keras_fn(x_t), repeats)})
        rows.append({"path": f"SavedModel '{signature}'", "batch": batch_size,
                     **_latencies(lambda: serving_fn(**{input_name: x_t}), repeats)})
        for label, path in tflite_paths.items():
            interpreter = Interpreter(model_path=path, num_threads=os.cpu_count())
            detail = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(detail["index"], (batch_size,) + tuple(detail["shape"][1:]))
            interpreter.allocate_tensors()
            detail = interpreter.get_input_details()[0]
            if detail["dtype"] in (np.int8, np.uint8):
                scale, zero = detail["quantization"]
                feed = np.clip(np.round(x / scale + zero), np.iinfo(detail["dtype"]).min,
                               np.iinfo(detail["dtype"]).max).astype(detail["dtype"])
            else:
                feed = x.astype(detail["dtype"])

            def invoke(interpreter=interpreter, index=detail["index"], feed=feed):
                interpreter.set_tensor(index, feed)
                interpreter.invoke()

            rows.append({"path": f"TF-Lite {label}", "batch": batch_size, **_latencies(invoke, repeats)})
    return rows


def served_latency_report(name: str = "cnn_classifier", preset: str = "default", repeats: int = 200) -> dict:
    """Export ``name`` (SavedModel + the four TF-Lite formats) to a temporary directory and time one
    request through each path next to the Keras call."""
    import tempfile

    from tfmstep import export

    spec = registry.get_spec(name)
    config = registry.get_config(name, preset)
    model = _fresh(spec, config)
    serving = export.servable(name, model, config)
    signature = serving.signatures["serving_default"]
    input_name = next(iter(signature.input_signature))
    batches = [x for x, _ in spec.dataset(config, "validation", 32).take(1)]
    with tempfile.TemporaryDirectory() as tmp:
        report = export.export_all(model, name, config, tmp, compare=False)
        tflite_paths = {fmt[len("tflite_"):]: entry["path"] for fmt, entry in report["artifacts"].items()
                        if fmt.startswith("tflite_")}
        rows = served_path_latency(model, report["artifacts"]["saved_model"]["path"], "serving_default",
                                   input_name, tflite_paths, batches[0].numpy(), repeats)
    by = {(r["path"], r["batch"]): r["p50_ms"] for r in rows}
    ratios = {}
    for batch in (1, 32):
        keras_p50 = by[("keras call (tf.function)", batch)]
        ratios[f"saved_model_vs_keras_p50_batch{batch}"] = by[("SavedModel 'serving_default'", batch)] / keras_p50
        if ("TF-Lite int8", batch) in by and ("TF-Lite fp32", batch) in by:
            ratios[f"int8_vs_fp32_p50_batch{batch}"] = by[("TF-Lite int8", batch)] / by[("TF-Lite fp32", batch)]
    return {"model": name, "rows": rows, "ratios": ratios}
