"""The benchmark's report: results.json, README.md (one table per measurement) and PNG plots."""

from __future__ import annotations

import json
import os


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
        model = f": {s['model']}" if "model" in s else ""
        parts.append(f"## Multi-worker scaling{model} (MultiWorkerMirroredStrategy, 2 workers on localhost)\n")
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
