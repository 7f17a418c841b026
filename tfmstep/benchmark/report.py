"""The benchmark's report: results.json, README.md (one table per measurement) and PNG plots."""

from __future__ import annotations

import os

from tfmstep import fileio
from tfmstep.benchmark import stats


def _table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _autotune_summary(tuned: dict, batch_size: int) -> str:
    chosen = (tuned["jit_compile"], tuned["steps_per_call"], tuned.get("mixed_precision", "float32"))
    stopped = tuned["note"].removeprefix("not measured: ")
    rows = [{"precision": c.get("precision", "float32"), "jit_compile": c["jit_compile"],
             "steps_per_call": c["steps_per_call"],
             "examples_per_second": (c["steps_per_second"] * batch_size
                                     if c["steps_per_second"] is not None else "-"),
             "calls": c["calls"],
             "note": ("not timed (stopped early)" if stopped and c["skipped"] == stopped else c["skipped"])
             or ("chosen" if (c["jit_compile"], c["steps_per_call"], c.get("precision", "float32")) == chosen
                 else "")}
            for c in tuned["candidates"]]
    first_calls = ", ".join(f"{k} {v:.1f} s" for k, v in tuned["compile_seconds"].items())
    outcome = (f"measuring stopped after the first candidate ({stopped}), so the trainer keeps the family "
               f"default" if tuned["source"] == "default" else "the fastest candidate is chosen (a "
               "low-precision one only if >= 5% faster than the best float32 one and its loss check passes)")
    checks = "".join(
        f"\n- {variant}: " + (f"not kept, {c['rejected']}" if "rejected" in c else
                               f"mean loss {c['mean_loss']:.5g} vs float32 {c['float32_mean_loss']:.5g} over "
                               f"{c['steps']} steps ({100 * c['relative_difference']:.2f}% apart): trains the same")
        for variant, c in tuned.get("numerics", {}).items())
    return (f"\nAuto-tuning, as the trainer does for a {tuned['tuned_for_steps']}-step run (candidates timed "
            f"on the real input pipeline; {tuned['tuning_seconds']:.1f} s in all, first calls {first_calls}): "
            f"{outcome}.\n\n"
            + _table(rows, ["precision", "jit_compile", "steps_per_call", "examples_per_second", "calls", "note"])
            + (f"\n\nLoss check of the low-precision variants (same start, same batches as float32):{checks}\n"
               if checks else ""))


def _interval(x: dict, percent: bool = False) -> str:
    return stats.format_interval(x, percent=percent) + (f" **{x['verdict']}**" if not percent else "")


RATIO_NAMES = {
    "auto_vs_keras_defaults": "tfmstep auto vs Keras compile()+fit() defaults",
    "auto_vs_best_keras": "tfmstep auto vs the best Keras setting",
    "best_tfmstep_vs_best_keras": "best tfmstep setting vs best Keras setting",
    "auto_vs_eager": "tfmstep auto vs an eager GradientTape loop",
}


def _training_section(entry: dict) -> list:
    parts = [f"## Training throughput: {entry.get('label', entry['model'])} (batch {entry['batch_size']}, "
             f"{entry['parameters']:,} parameters)\n"]
    if "ratios" not in entry:  # an old-format entry
        parts.append(_table(entry["timings"], ["name", "examples_per_second", "spread"]))
        return parts
    overrides = ", ".join(f"{k}={v}" for k, v in entry.get("overrides", {}).items())
    parts.append(f"Preset `{entry['preset']}`{f', overrides {overrides}' if overrides else ''}; "
                 f"{entry['repeats']} interleaved repeats of {entry['steps_per_repeat']} steps per setting "
                 f"(the peaks sampled in the same rounds). Training FLOPs/example "
                 f"{entry['training_flops_per_example']:.3g}.\n")
    rows = [{"name": t["name"], "median ex/s": t["median"], "IQR": f"{t['q1']:.4g}-{t['q3']:.4g}",
             "IQR/median": t["iqr_relative"]} for t in entry["timings"]]
    parts.append(_table(rows, ["name", "median ex/s", "IQR", "IQR/median"]))
    peaks = ", ".join(f"{p} {v['median'] / 1e9:.1f} GFLOP/s (IQR/median {v['iqr_relative']:.2f})"
                      for p, v in entry["peaks"].items())
    parts.append(f"\nMatmul peaks measured in this run: {peaks}.\n")
    parts.append("| ratio (median, 95% bootstrap interval) | value |\n|---|---|")
    for key, value in entry["ratios"].items():
        parts.append(f"| {RATIO_NAMES.get(key, key.replace('_', ' '))} | {_interval(value)} |")
    for key, value in entry["mfu"].items():
        parts.append(f"| MFU of {key.replace('_', ' ')} ({entry['mfu_precision'][key]} peak) | "
                     f"{_interval(value, percent=True)} |")
    parts.append(f"\nChosen by auto-tuning: {entry['tfmstep_default_setting']}; best tfmstep: "
                 f"{entry['best_tfmstep']}; best Keras: {entry['best_keras']}.")
    if "goals" in entry:
        g = entry["goals"]
        parts.append(f"\nGoals: vs Keras defaults >= {g['vs_keras_defaults']['goal']}x: "
                     f"**{g['vs_keras_defaults']['result']}**; vs best Keras >= {g['vs_best_keras']['goal']}x: "
                     f"**{g['vs_best_keras']['result']}**; MFU >= {100 * g['mfu']['goal']:.0f}%: "
                     f"**{g['mfu']['result']}** (met = the whole interval at or above the goal, unclear = "
                     f"the interval straddles it).")
    if "autotune" in entry:
        parts.append(_autotune_summary(entry["autotune"], entry["batch_size"]))
    return parts + [""]  # a blank line: the next section's heading must not run into this table


def write_report(results: dict, out_dir: str, command: str) -> str:
    """results.json, README.md (tables) and PNG plots under ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    fileio.atomic_write_json(os.path.join(out_dir, "results.json"), results)
    commands = results.get("commands") or [command]
    parts = ["# Benchmarks\n\n" + ("Command: " if len(commands) == 1 else
                                     "Commands (the suite in parts, each merged into results.json): ")
             + ", ".join(f"`{c}`" for c in commands) + "\n"]
    m = results.get("machine", "")
    if isinstance(m, dict):
        parts.append(f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; CPU flags: "
                     f"{', '.join(m['cpu_flags']) or 'none'}; fast low precision: {m['fast_low_precision']}.\n")
    else:
        parts.append(f"Machine: {m}\n")
    parts += [f"{note}\n" for note in results.get("notes", [])]
    peaks = {p: v["median"] for e in results.get("training", []) for p, v in e.get("peaks", {}).items()}
    if peaks:
        parts.append("Matmul peaks (1024x1024, median over the runs' rounds): " + ", ".join(
            f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items()) + ".\n")
    elif "peak_matmul_flops" in results:
        parts.append(f"Measured fp32 matmul peak: {results['peak_matmul_flops'] / 1e9:.1f} GFLOP/s\n")
    for entry in results.get("training", []):
        parts.extend(_training_section(entry))
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
    if "served_precision" in results:
        parts.extend(_served_precision_section(results["served_precision"]))
    if "scaling" in results:
        s = results["scaling"]
        model = f": {s['model']}" if "model" in s else ""
        parts.append(f"## Multi-worker scaling{model} (MultiWorkerMirroredStrategy, 2 workers on localhost)\n")
        parts.append(f"{s['steps']} steps, global batch {s['global_batch']}: one worker "
                     f"{s['one_worker_train_seconds']:.1f} s, two workers {s['two_workers_train_seconds']:.1f} s "
                     f"(speedup {s['speedup']:.2f}x). Eval loss one/two workers: "
                     f"{s['one_worker_eval']['loss']:.4f} / {s['two_workers_eval']['loss']:.4f}.\n")
    markdown = "\n".join(parts)
    fileio.atomic_write(os.path.join(out_dir, "README.md"), markdown)
    return markdown


def _served_precision_section(entry: dict) -> list:
    batches = list(entry["rows"][0]["latency_ms"])
    metric_names = [k for k in entry["rows"][0]["metrics"] if k != "loss"][:2] + ["loss"]
    rows = [{"artifact": r["artifact"], **{m: f"{r['metrics'][m]:.4f}" for m in metric_names},
             **{f"p50 ms, batch {b}": f"{r['latency_ms'][b]['median']:.2f} "
                f"(IQR {r['latency_ms'][b]['q1']:.2f}-{r['latency_ms'][b]['q3']:.2f})" for b in batches}}
            for r in entry["rows"]]
    lines = [f"## Served precisions: {entry['source']} ({entry['model']}, {entry['examples']} validation "
             f"examples, {entry['repeats']} interleaved requests per artifact and batch size)\n",
             _table(rows, list(rows[0])), "",
             "| speedup (latency ratio, median and 95% bootstrap interval) | value |", "|---|---|"]
    lines += [f"| {name} | {stats.format_interval(r)} **{r['verdict']}** |" for name, r in entry["speedups"].items()]
    return lines + [""]


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
    fileio.atomic_save_figure(fig, path, dpi=90)
    plt.close(fig)
