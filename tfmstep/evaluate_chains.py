"""Length generalisation of trained chain reasoners: accuracy per chain length, halting vs true hops,
and accuracy when forced to run twice the loops. Used by ``tools/evaluate.py``."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from tfmstep.data import chains
from tfmstep.errors import UserError


def _predict_fn(model):
    @tf.function(reduce_retracing=True)
    def predict(inputs, num_loops, use_halting):
        return model(inputs, training=False, num_loops=num_loops, use_halting=use_halting)
    return predict


def evaluate_model(model, config, lengths, examples: int = 256, batch_size: int = 128, seed: int = 1234,
                   forced_loop_factor: int = 2) -> list[dict]:
    """One row per chain length: full-chain exact match and per-step (token) accuracy with halting, the
    loops used vs the true hops, and (looped models) the same accuracies with exactly
    ``forced_loop_factor`` x hops loops and no halting."""
    predict = _predict_fn(model)
    rows = []
    for length in lengths:
        batches = chains.fixed_length_batches(config.task, length, examples, batch_size, seed=seed,
                                              modulus=config.modulus, num_names=config.num_names)
        totals = {"exact_match": [], "token_accuracy": [], "steps_used": [], "halting_within_1": [],
                  "forced_exact_match": [], "forced_token_accuracy": []}
        for inputs, labels in batches:
            outputs = predict(inputs, config.max_loops, True)
            _accumulate(totals, "", labels, outputs)
            steps = outputs["steps_used"].numpy()
            totals["steps_used"].extend(steps.tolist())
            totals["halting_within_1"].extend((np.abs(steps - length) <= 1).astype(float).tolist())
            if config.looped:
                forced = predict(inputs, forced_loop_factor * length, False)
                _accumulate(totals, "forced_", labels, forced)
        row = {"length": length, "examples": len(totals["exact_match"])}
        for key, values in totals.items():
            if values:
                row[key] = float(np.mean(values))
        rows.append(row)
    return rows


def _accumulate(totals, prefix, labels, outputs):
    predicted = np.argmax(outputs["logits"].numpy(), -1)
    valid = labels["depth"] >= 0
    correct = (predicted == labels["target"]) | ~valid
    totals[prefix + "exact_match"].extend(correct.all(axis=1).astype(float).tolist())
    totals[prefix + "token_accuracy"].extend(
        (((predicted == labels["target"]) & valid).sum(1) / valid.sum(1)).tolist())


def evaluate_workdirs(workdirs, labels=None, max_length_factor: int = 4, examples: int = 256,
                      batch_size: int = 128, seed: int = 1234) -> dict:
    """Evaluate each trained run (its latest checkpoint) on lengths 1..factor x its longest trained."""
    from tfmstep import trainer  # imported late: the trainer pulls in the whole package

    labels = list(labels or [os.path.basename(os.path.normpath(w)) for w in workdirs])
    if len(labels) != len(workdirs):
        raise UserError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    report = {"runs": {}}
    for label, workdir in zip(labels, workdirs):
        model, config, spec = trainer.load_trained(workdir)
        if spec.name != "chain_transformer":
            raise UserError(f"{workdir} holds a {spec.name!r} run, not chain_transformer")
        longest = factor_lengths = max_length_factor * config.train_max_len
        del factor_lengths
        if config.task != "running_sum" and config.num_names < chains.tokens_for_length(config.task, longest):
            raise UserError(f"{workdir}: num_names={config.num_names} cannot name the tokens of a chain of "
                            f"length {longest}; lower --max_length_factor")
        rows = evaluate_model(model, config, range(1, longest + 1), examples, batch_size, seed)
        metrics_path = os.path.join(workdir, "metrics.json")
        train_info = {}
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                train_info = json.load(f)
        report["runs"][label] = {
            "workdir": workdir, "task": config.task, "looped": config.looped,
            "train_lengths": [config.train_min_len, config.train_max_len],
            "parameters": int(model.count_params()),
            "train_steps": train_info.get("step"),
            "train_seconds": train_info.get("train_seconds_this_run"),
            "per_length": rows,
            "summary": summarise(rows, config.train_max_len),
        }
    return report


def summarise(rows, train_max_len: int) -> dict:
    by_length = {r["length"]: r for r in rows}
    out = {}
    for factor in (1, 2, 4):
        row = by_length.get(factor * train_max_len)
        if row:
            out[f"exact_match_at_{factor}x"] = row["exact_match"]
            if "forced_exact_match" in row:
                out[f"forced_2x_loops_exact_match_at_{factor}x"] = row["forced_exact_match"]
    out["halting_within_1_mean"] = float(np.mean([r["halting_within_1"] for r in rows]))
    out["worst_forced_drop_points"] = float(max(
        [100 * (r["exact_match"] - r["forced_exact_match"]) for r in rows if "forced_exact_match" in r],
        default=0.0))
    return out


def format_table(report: dict) -> str:
    lines = []
    for label, run in report["runs"].items():
        lines.append(f"{label}: task={run['task']} looped={run['looped']} params={run['parameters']} "
                     f"trained on lengths {run['train_lengths'][0]}..{run['train_lengths'][1]}")
        lines.append(f"{'len':>4} {'exact':>7} {'token':>7} {'loops':>6} {'halt+-1':>7} {'2x-loops exact':>15}")
        for r in run["per_length"]:
            forced = f"{r['forced_exact_match']:.4f}" if "forced_exact_match" in r else "-"
            lines.append(f"{r['length']:>4} {r['exact_match']:>7.4f} {r['token_accuracy']:>7.4f} "
                         f"{r['steps_used']:>6.2f} {r['halting_within_1']:>7.3f} {forced:>15}")
        lines.append("summary: " + json.dumps(run["summary"]))
    return "\n".join(lines)


def plot(report: dict, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_halt) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in report["runs"].items():
        lengths = [r["length"] for r in run["per_length"]]
        line, = ax_acc.plot(lengths, [r["exact_match"] for r in run["per_length"]], marker="o", ms=3,
                            label=f"{label} ({run['parameters'] // 1000}k params)")
        if run["looped"]:
            ax_acc.plot(lengths, [r["forced_exact_match"] for r in run["per_length"]], ls="--",
                        color=line.get_color(), label=f"{label}, forced 2x loops")
            ax_halt.plot(lengths, [r["steps_used"] for r in run["per_length"]], marker="o", ms=3,
                         color=line.get_color(), label=label)
        ax_acc.axvline(run["train_lengths"][1], color="gray", ls=":", lw=1)
    if ax_halt.lines:
        top = max(max(line.get_xdata()) for line in ax_halt.lines)
        ax_halt.plot([1, top], [1, top], color="gray", ls=":", label="true hops")
    ax_acc.set(xlabel="chain length (hops)", ylabel="full-chain exact match", ylim=(-0.02, 1.02),
               title=title or "accuracy vs chain length (dotted: longest trained)")
    ax_halt.set(xlabel="chain length (hops)", ylabel="loops used (halting)", title="halting vs true hops")
    ax_acc.legend(fontsize=7)
    ax_halt.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(workdirs, labels=None, output_dir: str = "results/chain", name: str = "chain",
        max_length_factor: int = 4, examples: int = 256, batch_size: int = 128, seed: int = 1234) -> dict:
    """Evaluate, write ``<output_dir>/<name>.json`` and ``.png``, and return the report."""
    if not workdirs:
        raise UserError("give at least one --workdirs entry")
    report = evaluate_workdirs(workdirs, labels, max_length_factor, examples, batch_size, seed)
    report.update({"examples_per_length": examples, "seed": seed, "max_length_factor": max_length_factor})
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, name + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(output_dir, name + ".png"), title=name)
    return report
