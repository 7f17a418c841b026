"""Length generalisation of trained chain reasoners (the family's ``evaluate`` hook): full-answer exact
match per chain length from 1 to 4x the longest trained, halting loops vs the true k, and accuracy with
2x the loops forced (no halting: twice the k + answer_lag iterations an answer is due at); or, with
``task="file"``, the same per ``steps`` of a JSONL test file. Also the family's inference timer (one loop
iteration vs the fixed cost)."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
from absl import logging
import tensorflow as tf

from tfmstep import fileio
from tfmstep.data import chains
from tfmstep.errors import UserError
from tfmstep.models.chain_transformer.model import INFERENCE_FIELDS


def _predict_fn(model):
    @tf.function(reduce_retracing=True)
    def predict(inputs, num_loops, use_halting):
        return model(inputs, training=False, num_loops=num_loops, use_halting=use_halting)

    # The loop count as a tensor: a Python int would trace the model again for every forced count.
    return lambda inputs, num_loops, use_halting: predict(inputs, tf.constant(num_loops, tf.int32), use_halting)


def _score(batches, predict, config, forced_loop_factor: int = 2, show_errors: int = 0, texts=None) -> dict:
    """Mean metrics over numpy (inputs, labels) batches of one chain length (or one group); with
    ``show_errors`` N, also the first N wrong problems under "errors" (their text from ``texts``, one list
    per batch, or decoded from the character ids)."""
    totals = {key: [] for key in ("exact_match", "token_accuracy", "steps_used", "halting_within_1",
                                  "forced_exact_match")}
    errors = []
    for index, (inputs, labels) in enumerate(batches):
        outputs = predict({"tokens": tf.constant(inputs["tokens"])}, config.max_loops, True)
        predicted = np.argmax(outputs["logits"].numpy(), -1)
        right = predicted == labels["answers"]
        totals["exact_match"].extend(right.all(1).astype(float).tolist())
        totals["token_accuracy"].extend(right.mean(1).tolist())
        steps_used = outputs["steps_used"].numpy()
        totals["steps_used"].extend(steps_used.tolist())
        for row in np.flatnonzero(~right.all(1))[:max(0, show_errors - len(errors))]:
            errors.append({"input": texts[index][row] if texts else chains.decode(inputs["tokens"][row]),
                           "answer": chains.decode(labels["answers"][row]),
                           "predicted": _decode_prediction(predicted[row]), "steps_used": int(steps_used[row])})
        if not config.looped:  # a stack runs all its blocks: "within 1 of k" would only say k is near its depth
            continue
        known = labels["steps"] >= 1
        totals["halting_within_1"].extend((np.abs(steps_used - labels["steps"]) <= 1)[known].astype(float).tolist())
        if known.all():
            # 2x the loops the answer needs: k steps plus the answer_lag iterations that bring it to its
            # slot (2 x k alone is exactly k + 1 at k = 1 for a lag-1 model, no extra loop at all).
            due = int(labels["steps"].max()) + config.answer_lag
            forced = predict({"tokens": tf.constant(inputs["tokens"])}, forced_loop_factor * due, False)
            forced_right = np.argmax(forced["logits"].numpy(), -1) == labels["answers"]
            totals["forced_exact_match"].extend(forced_right.all(1).astype(float).tolist())
    row = {"examples": len(totals["exact_match"])}
    row.update({key: float(np.mean(values)) for key, values in totals.items() if values})
    if errors:
        row["errors"] = errors
    return row


def _decode_prediction(ids) -> str:
    """A predicted answer as text; a class that is no character (PAD, an answer slot) shows as its id."""
    return "".join(chains.decode([i]) if i >= chains.FIRST_CHAR_ID else f"<{i}>" for i in ids.tolist())


def evaluate_model(model, config, lengths, examples: int = 256, batch_size: int = 128, seed: int = 1234,
                   forced_loop_factor: int = 2, show_errors: int = 0) -> list[dict]:
    """One row per chain length k of the model's generated task, with a progress line per length (and up
    to ``show_errors`` wrong problems per length)."""
    rows, predict = [], _predict_fn(model)
    # A length's cost grows about as k^2 (tokens and loops both grow with k): the ETA weighs lengths so.
    weights = np.square(np.asarray(lengths, np.float64))
    start = time.monotonic()
    for index, k in enumerate(lengths):
        batches = chains.fixed_length_batches(config.task, k, examples, batch_size, seed=seed,
                                              answer_length=config.answers, **config.generator_options)
        rows.append({"length": int(k), **_score(batches, predict, config, forced_loop_factor, show_errors)})
        elapsed = time.monotonic() - start
        done = weights[:index + 1].sum()
        logging.info("k = %d: exact match %.3f (%d/%d lengths, %.0f s, ETA %.0f s)", k, rows[-1]["exact_match"],
                     index + 1, len(lengths), elapsed, elapsed * (weights.sum() - done) / done)
    return rows


def evaluate_file(model, config, test_file: str, batch_size: int = 128, show_errors: int = 0) -> list[dict]:
    """One row per ``steps`` value of a JSONL test file (one row, length None, when it gives none), with up
    to ``show_errors`` wrong problems per row (their text as the file has it)."""
    from tfmstep.models.chain_transformer.model import chain_tokenizer

    tokenizer = chain_tokenizer(config)
    if config.train_file and os.path.isfile(config.train_file):  # test characters must be trained ones
        problems = chains.read_file_task(config.train_file, test_file, answer_length=config.answers,
                                         max_tokens=config.max_tokens, tokenizer=tokenizer)[1]
    else:
        problems = chains.read_jsonl(test_file, answer_length=config.answers, max_tokens=config.max_tokens,
                                     tokenizer=tokenizer)
    groups: dict = {}
    for problem in problems:
        groups.setdefault(problem[2] if problem[2] >= 1 else None, []).append(problem)
    rows, predict = [], _predict_fn(model)
    for steps in sorted(groups, key=lambda s: (s is None, s or 0)):
        group = groups[steps]
        chunks = [group[start:start + batch_size] for start in range(0, len(group), batch_size)]
        batches = [chains.make_batch(chunk, config.answers, tokenizer=tokenizer) for chunk in chunks]
        texts = [[text for text, _, _ in chunk] for chunk in chunks]
        rows.append({"length": steps, **_score(batches, predict, config, show_errors=show_errors, texts=texts)})
    return rows


def summarise(rows, train_max_len: int) -> dict:
    by_length = {r["length"]: r for r in rows}
    out = {}
    for factor in (1, 2, 4):
        row = by_length.get(factor * train_max_len)
        if row:
            out[f"exact_match_at_{factor}x"] = row["exact_match"]
            if "forced_exact_match" in row:
                out[f"forced_2x_loops_exact_match_at_{factor}x"] = row["forced_exact_match"]
    halting = [r["halting_within_1"] for r in rows if "halting_within_1" in r]
    if halting:
        out["halting_within_1_mean"] = float(np.mean(halting))
    out["worst_forced_drop_points"] = float(max(
        [100 * (r["exact_match"] - r["forced_exact_match"]) for r in rows if "forced_exact_match" in r],
        default=0.0))
    return out


def inference_settings(config) -> dict:
    """The stopping rule a looped run was evaluated under (tfmstep-evaluate --config may change it)."""
    return {key: getattr(config, key) for key in INFERENCE_FIELDS}


def evaluate_runs(runs, labels=None, output_dir: str = "", name: str = "chain", *, max_length_factor: int = 4,
                  examples: int = 256, batch_size: int = 128, seed: int = 1234, test_file: str = "",
                  show_errors: int = 0, merge: bool = False) -> dict:
    """Evaluate trained runs [(workdir, (model, config, spec))]; with ``output_dir``, write
    ``<name>.json``, ``.txt`` and ``.png`` there. ``show_errors`` N: list up to N wrong problems per chain
    length in the report and its table. ``merge``: add these runs to the report already at
    ``<output_dir>/<name>.json`` (a run of the same label is replaced), which must have been measured on
    the same problems. Returns the report (its printable ``table`` included)."""
    if not runs:
        raise UserError("give at least one trained workdir")
    labels = list(labels or [os.path.basename(os.path.normpath(w)) for w, _ in runs])
    if len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels for {len(runs)} workdirs")
    report = {"runs": {}, "examples_per_length": examples, "seed": seed, "max_length_factor": max_length_factor,
              "forced_loops": "2 x (k + answer_lag)"}
    base = os.path.join(output_dir, name)
    if merge and not output_dir:
        raise UserError("merge adds to the report in --output_dir; give one")
    # Read and checked before anything is evaluated, so a mismatch costs no evaluation.
    earlier_runs = _earlier_runs(base + ".json", report) if merge and os.path.exists(base + ".json") else {}
    sources = [_problem_source(test_file, config) for _, (_, config, _) in runs]
    _check_one_problem_source(earlier_runs, labels, sources,
                              f"give another --name than {base}.json" if earlier_runs else
                              "evaluate them separately, or all on one --test_file")
    for label, source, (workdir, (model, config, spec)) in zip(labels, sources, runs):
        if "test_file" in source:
            rows = evaluate_file(model, config, source["test_file"], batch_size, show_errors)
        else:
            longest = max_length_factor * config.train_max_len
            rows = evaluate_model(model, config, range(1, longest + 1), examples, batch_size, seed,
                                  show_errors=show_errors)
        train_info = {}
        metrics_path = os.path.join(workdir, "metrics.json")
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                train_info = json.load(f)
        report["runs"][label] = {
            "workdir": workdir, "task": config.task, "looped": config.looped,
            "train_lengths": [config.train_min_len, config.train_max_len],
            "parameters": int(model.count_params()), "train_steps": train_info.get("step"),
            "train_seconds": train_info.get("train_seconds_this_run"),
            "per_length": rows, "summary": summarise(rows, config.train_max_len),
            "inference": inference_settings(config) if config.looped else {},
            **source,
        }
    report["runs"] = {**earlier_runs, **report["runs"]}  # a re-evaluated label keeps its place
    report["table"] = format_table(report)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fileio.atomic_write_json(base + ".json", report)
        fileio.atomic_write(base + ".txt", report["table"] + "\n")
        plot(report, base + ".png", title=name)
    return report


# What makes two reports' rows comparable: the same generated problems, forced the same way.
MEASURED_ALIKE = ("examples_per_length", "seed", "max_length_factor", "forced_loops")


def _earlier_runs(path: str, report: dict) -> dict:
    """The runs of the report at ``path``, which ``report`` (not yet evaluated) may add to."""
    try:
        with open(path) as f:
            earlier = json.load(f)
        runs = dict(earlier["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot merge into {path}: not a readable report ({type(e).__name__}: {e})") from None
    for key in MEASURED_ALIKE:
        if earlier.get(key) != report[key]:
            raise UserError(f"cannot merge into {path}: it was measured with {key}={earlier.get(key)!r}, "
                            f"this evaluation with {report[key]!r}; use the same settings or another --name")
    return runs


def _problem_source(test_file: str, config) -> dict:
    """What a run is evaluated on: {"test_file", "test_file_sha256"} of a JSONL file, or {"generator": the task
    and its generator's options} for generated problems."""
    path = test_file or (config.test_file if config.task == chains.FILE_TASK else "")
    if not path:
        return {"generator": {"task": config.task, **config.generator_options}}
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read test file {path}: {e.strerror or e}") from None
    return {"test_file": os.path.abspath(path), "test_file_sha256": digest.hexdigest()}


def _same_problems(a: dict, b: dict) -> bool:
    """Two runs' sources (``_problem_source``) name the same problems; an older report's run records only its
    task, so generated sources are compared on the keys both have."""
    if "test_file_sha256" in a or "test_file_sha256" in b:
        return a.get("test_file_sha256") == b.get("test_file_sha256")
    shared = a["generator"].keys() & b["generator"].keys()
    return all(a["generator"][key] == b["generator"][key] for key in shared)


def _describe(source: dict) -> str:
    if "test_file" in source:
        return f"test file {source['test_file']}"
    return "generated " + ", ".join(f"{key}={value}" for key, value in source["generator"].items())


def _check_one_problem_source(earlier_runs: dict, labels: list, sources: list, remedy: str) -> None:
    """One report compares runs on the same problems: one generated task with the same generator options, or
    one test file (by content)."""
    runs = {}  # label -> its source
    for label, run in earlier_runs.items():
        if label in labels:
            continue  # replaced by this evaluation
        if "test_file_sha256" in run or "generator" in run:
            runs[label] = run
        elif run.get("task") != chains.FILE_TASK:  # an older report's generated run: its task is known
            runs[label] = {"generator": {"task": run.get("task")}}
        # (an older report's file run records no file: not compared)
    runs.update(zip(labels, sources))
    items = list(runs.items())
    if any(not _same_problems(a, b) for i, (_, a) in enumerate(items) for _, b in items[i + 1:]):
        raise UserError("runs evaluated on different problems cannot share a report (" + "; ".join(
            f"{label}: {_describe(source)}" for label, source in items) + f"); {remedy}")


def format_table(report: dict) -> str:
    lines = []
    for label, run in report["runs"].items():
        lines.append(f"{label}: task={run['task']} looped={run['looped']} params={run['parameters']} "
                     f"trained on lengths {run['train_lengths'][0]}..{run['train_lengths'][1]}"
                     + "".join(f" {key}={value}" for key, value in run.get("inference", {}).items()))
        lines.append(f"{'k':>4} {'exact':>7} {'token':>7} {'loops':>6} {'halt+-1':>7} {'2x-loops exact':>15}")
        for r in run["per_length"]:
            forced = f"{r['forced_exact_match']:.4f}" if "forced_exact_match" in r else "-"
            halting = f"{r['halting_within_1']:.3f}" if "halting_within_1" in r else "-"
            length = "all" if r["length"] is None else r["length"]
            lines.append(f"{length:>4} {r['exact_match']:>7.4f} {r['token_accuracy']:>7.4f} "
                         f"{r['steps_used']:>6.2f} {halting:>7} {forced:>15}")
        lines.append("summary: " + json.dumps(run["summary"]))
        wrong = [(r["length"], e) for r in run["per_length"] for e in r.get("errors", ())]
        if wrong:
            lines.append("wrong answers (k, loops used, answer / predicted, problem):")
            lines += [f"{'all' if k is None else k:>4} {e['steps_used']:>4}  {e['answer']} / {e['predicted']}  "
                      f"{e['input']}" for k, e in wrong]
    return "\n".join(lines)


def plot_accuracy(ax, report: dict, chance: float | None = None) -> list:
    """Exact match vs chain length on ``ax``: each run (baselines grey), a looped run's 2x-forced-loops
    curve dashed, the longest trained k dotted, and ``chance`` in red if given. Returns the looped runs'
    (label, lengths, rows, colour) for a caller's other panels."""
    looped = []
    for label, run in report["runs"].items():
        rows = [r for r in run["per_length"] if r["length"] is not None]
        lengths = [r["length"] for r in rows]
        line, = ax.plot(lengths, [r["exact_match"] for r in rows], marker="o", ms=3,
                        color=None if run["looped"] else "gray",
                        label=f"{label} ({run['parameters'] // 1000}k params)")
        if run["looped"] and rows and "forced_exact_match" in rows[0]:
            ax.plot(lengths, [r["forced_exact_match"] for r in rows], ls="--", lw=1, color=line.get_color(),
                    label=f"{label}, forced 2x loops")
            looped.append((label, lengths, rows, line.get_color()))
        ax.axvline(run["train_lengths"][1], color="gray", ls=":", lw=1)
    if chance is not None:
        ax.axhline(chance, color="red", ls=":", lw=1)
    ax.set(xlabel="chain length k (steps)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return looped


def plot(report: dict, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_halt) = plt.subplots(1, 2, figsize=(11, 4))
    for label, lengths, rows, color in plot_accuracy(ax_acc, report):
        ax_halt.plot(lengths, [r["steps_used"] for r in rows], marker="o", ms=3, color=color, label=label)
    if ax_halt.lines:
        top = max(max(line.get_xdata()) for line in ax_halt.lines)
        ax_halt.plot([1, top], [1, top], color="gray", ls=":", label="true k")
    ax_acc.set(ylabel="full-answer exact match", title=title or "accuracy vs chain length (dotted: longest trained)")
    ax_halt.set(xlabel="chain length k (steps)", ylabel="loops used (halting)", title="halting vs true k")
    ax_halt.legend(fontsize=7)
    fig.tight_layout()
    fileio.atomic_save_figure(fig, path, dpi=90)
    plt.close(fig)


def per_loop_times(model, config, *, batch_size: int = 32, repeats: int = 30, many: int = 16) -> list:
    """The family's ``inference_timer``: one core iteration vs the fixed cost (prelude + coda + head) at
    batch 32, on problems of the median trained k. Shares are of a run of k loops (a trained reasoner
    halts there: about one iteration per step; an untrained one would run all ``max_loops``).
    Per-iteration samples are (time of ``many`` forced loops - mean time of 1 loop) / (many - 1)."""
    from tfmstep.benchmark.timing import percentile_summary, time_in_loop

    k = (config.train_min_len + config.train_max_len) // 2
    inputs, _ = chains.fixed_length_batches(config.task, k, batch_size, batch_size, answer_length=config.answers,
                                            **config.generator_options)[0]
    tokens = {"tokens": tf.constant(inputs["tokens"])}
    one = time_in_loop(lambda x: model(x, training=False, num_loops=1, use_halting=False), tokens, repeats)
    full = time_in_loop(lambda x: model(x, training=False, num_loops=many, use_halting=False), tokens, repeats)
    per_loop = [(t - float(np.mean(one))) / (many - 1) for t in full]
    loop_s = float(np.mean(per_loop))
    fixed_s = float(np.mean(one)) - loop_s
    total = fixed_s + k * loop_s
    return [
        {"step": "prelude + coda + answer head (fixed)", **percentile_summary([t - loop_s for t in one]),
         "share": fixed_s / total},
        {"step": f"one core iteration (x{k} = median trained k)", **percentile_summary(per_loop),
         "share": k * loop_s / total},
    ]
