"""Where a training step's time goes: a TensorBoard profiler trace of the shared step, summarised per op.

``profile_training_step`` runs the real tfmstep step (``step.make_steps``) for a few calls under
``tf.profiler.experimental``, leaves the trace in ``logdir`` (open it with TensorBoard's Profile tab /
trace viewer: ``pip install tensorboard-plugin-profile``) and reads the same trace back to say, per op
type, how much of the wall time the TF executor spent in it. The op table is read from the XSpace proto
the profiler writes (``/host:CPU`` plane, ``tf_Compute`` threads, events named ``name:OpType``) because
TensorBoard's own converters live in the optional profile plugin.

Numbers are summed over the executor's threads, so with inter-op parallelism an op type's share can add
up to more than 100% of the wall time; ``busy_fraction`` (op time / (wall x threads)) shows how well the
threads were kept fed. Under XLA the step is one cluster op (``_XlaRun``/``XlaLaunch``) and the per-op
split of its inside is not visible here -- profile with ``jit_compile=False`` to see which ops dominate.
"""

from __future__ import annotations

import collections
import glob
import os
import time

import tensorflow as tf

from tfmstep import fileio, registry
from tfmstep.benchmark import flops, stats, training

# Op types doing the model's arithmetic (the MFU numerator); everything else is overhead to explain.
COMPUTE_OP_TYPES = ("MatMul", "BatchMatMul", "Conv2D", "Conv2DBackprop", "Einsum", "XlaRun", "XlaLaunch",
                    "_FusedMatMul", "_FusedConv2D", "_MklMatMul", "_MklNativeConv2D", "_MklFusedMatMul",
                    "_MklNativeFusedConv2D", "_MklNativeConv2DBackprop", "_MklNativeFusedMatMul",
                    "_MklEinsum", "_MklBatchMatMul")


def _is_compute(op_type: str) -> bool:
    return any(op_type.startswith(prefix) for prefix in COMPUTE_OP_TYPES)


def op_times_from_trace(logdir: str) -> dict:
    """{"op_seconds": {op_type: seconds}, "threads": n} from the newest ``*.xplane.pb`` under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no profiler trace (*.xplane.pb) under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    op_seconds: dict = collections.Counter()
    threads = 0
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            threads += 1
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Op events are "node_name:OpType"; executor bookkeeping is "Class::method".
                if ":" not in name or "::" in name:
                    continue
                op_seconds[name.rsplit(":", 1)[1]] += event.duration_ps * 1e-12
    return {"op_seconds": dict(op_seconds), "threads": max(threads, 1), "trace": paths[-1]}


def profile_training_step(name, preset: str = "default", *, batch_size: int = 64,
                          steps_per_call: int = 10, calls: int = 5, jit_compile: bool = False,
                          logdir: str = "", top: int = 12, precision: str = "float32", **overrides) -> dict:
    """Profile ``calls`` calls of ``steps_per_call`` training steps of a registered model (``name``: its
    name or ModelSpec).

    Returns wall time per step, per-op-type seconds per step and share of the wall time, the compute
    share (matmul/conv ops), the trace location and what caps the model FLOPs utilisation: the step's
    FLOP rate and the rate inside its matmul/conv ops, each against the matmul peak of ``precision``
    measured just before (median of 5), so MFU splits into (time in those ops) x (their efficiency)."""
    # The same fresh model, optimizer, in-memory batches and compiled step as the benchmark's
    # throughput rows.
    spec = registry.resolve(name)
    config = spec.config(preset, **overrides)
    train, iterator, n = training.compiled_train_step(spec, config, batch_size, jit_compile=jit_compile,
                                                      steps_per_call=steps_per_call, precision=precision)
    train(iterator, n)["loss"].numpy()  # a second untimed call, outside the profile
    logdir = logdir or os.path.join("/tmp", f"tfmstep-profile-{name}-{os.getpid()}")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    try:
        for _ in range(calls):
            out = train(iterator, n)
        out["loss"].numpy()
        wall = time.perf_counter() - start
    finally:
        tf.profiler.experimental.stop()
    trace = op_times_from_trace(logdir)
    inputs, _ = next(iter(spec.dataset(config, "train", 1, seed=0)))
    flops_per_step = batch_size * flops.training_flops_per_example(spec, training.fresh_model(spec, config),
                                                                   config, inputs)
    peak_run = training.peak_runner(precision)
    peak = stats.summary([peak_run() for _ in range(5)])["median"]
    total_steps = calls * steps_per_call
    at_peak = flops_per_step * total_steps / peak  # seconds the profiled steps' FLOPs take at the peak
    wall_per_step = wall / total_steps
    ops = sorted(trace["op_seconds"].items(), key=lambda item: -item[1])
    op_total = sum(seconds for _, seconds in ops)
    compute = sum(seconds for op, seconds in ops if _is_compute(op))
    rows = [{"op_type": op, "ms_per_step": 1e3 * seconds / total_steps,
             "share_of_wall": seconds / wall, "compute": _is_compute(op)} for op, seconds in ops[:top]]
    return {
        "model": spec.name, "preset": preset, "batch_size": batch_size, "jit_compile": jit_compile,
        "precision": precision, "overrides": {k: str(v) for k, v in overrides.items()},
        "steps_per_call": steps_per_call, "steps_profiled": total_steps,
        "wall_ms_per_step": 1e3 * wall_per_step, "threads": trace["threads"],
        "op_ms_per_step": 1e3 * op_total / total_steps,
        "busy_fraction": op_total / (wall * trace["threads"]),
        "compute_ms_per_step": 1e3 * compute / total_steps,
        "compute_share_of_op_time": compute / op_total if op_total else 0.0,
        "top_ops": rows, "logdir": logdir, "trace": trace["trace"],
        "training_flops_per_step": flops_per_step, "matmul_peak_flops": peak,
        "mfu": flops_per_step / wall_per_step / peak,
        # The matmul/conv ops' own rate, as a range: the wall time with one of them running is at most
        # their summed time (and the wall) and at least that sum spread over the executor threads.
        "compute_op_efficiency": ([at_peak / min(compute, wall), at_peak / (compute / trace["threads"])]
                                  if compute else [0.0, 0.0]),
        "wall_share_outside_compute_ops": max(0.0, 1.0 - compute / wall),  # at least this much
    }


def format_profile(report: dict) -> str:
    lines = [f"### {report['model']} (batch {report['batch_size']}, {report.get('precision', 'float32')}, "
             f"jit_compile={report['jit_compile']}, {report['steps_profiled']} steps)", "",
             f"wall {report['wall_ms_per_step']:.2f} ms/step; op time {report['op_ms_per_step']:.2f} ms/step "
             f"over {report['threads']} executor threads (busy {100 * report['busy_fraction']:.0f}%); "
             f"matmul/conv ops {100 * report['compute_share_of_op_time']:.0f}% of op time", "",
             "| op type | ms/step | share of wall | matmul/conv |", "|---|---|---|---|"]
    if "mfu" in report:
        lines[3:3] = [f"MFU {100 * report['mfu']:.1f}% of the {report.get('precision', 'float32')} matmul peak "
                      f"({report['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, {report['training_flops_per_step'] / 1e9:.1f} "
                      f"GFLOP/step); inside the matmul/conv ops it runs at "
                      f"{100 * report['compute_op_efficiency'][0]:.0f}-{100 * report['compute_op_efficiency'][1]:.0f}% "
                      f"of that peak, and at least {100 * report['wall_share_outside_compute_ops']:.0f}% of the wall "
                      f"is spent outside them", ""]
    for row in report["top_ops"]:
        lines.append(f"| {row['op_type']} | {row['ms_per_step']:.3f} | {100 * row['share_of_wall']:.1f}% | "
                     f"{'yes' if row['compute'] else ''} |")
    lines += ["", f"trace: `{report['logdir']}` (TensorBoard Profile tab)"]
    return "\n".join(lines)


def profile_models(models=None, preset: str = "default", *, logdir: str = "/tmp/tfmstep-profile",
                   out: str = "", **options) -> list:
    """Profile each of ``models`` (default: every registered model; a trace in ``logdir/<name>``), print
    its table as it is done and, with ``out``, write all tables there (and the raw numbers to a .json
    beside it). ``options`` go to ``profile_training_step``."""
    specs = [registry.get_spec(name) for name in models or registry.list_models()]  # unknown: fails first
    reports = []
    precisions = options.pop("precisions", None) or ("float32",)
    for spec in specs:
        for precision in precisions:
            report = profile_training_step(
                spec, preset, logdir=os.path.join(logdir, f"{spec.name}-{precision}"), precision=precision,
                **options)
            reports.append(report)
            print(format_profile(report), "\n", flush=True)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        fileio.atomic_write(out, "\n\n".join(format_profile(r) for r in reports) + "\n")
        fileio.atomic_write_json(os.path.splitext(out)[0] + ".json", reports)
    return reports
