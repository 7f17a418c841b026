"""Benchmarks, side by side in one run: training throughput (tfmstep step vs Keras fit vs eager) and
MFU for every registered model, per-step inference time, and multi-worker scaling. The "tfmstep auto" row
is the setting the trainer's auto-tuning picks (its measured candidates are listed under each table).

  python tools/benchmark.py --out=benchmarks            # everything (~15 min on 2 cores)
  python tools/benchmark.py --sections=training --models=cnn_classifier --steps=20 --repeats=2
"""

import os
import platform
import sys

from absl import app, flags, logging

import tfmstep
from tfmstep import benchmark
from tfmstep.cli import exit_on_user_error

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["training", "inference", "serving", "scaling"], "What to measure.")
flags.DEFINE_list("models", [], "Models for the training section (default: every registered model).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 50, "Timed training steps per repeat.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed repeats per setting (median and spread reported).", lower_bound=1)
flags.DEFINE_integer("tune_for_steps", 1000, "Run length the auto-tuned row is chosen for (it sets the "
                     "tuning budget and caps steps_per_call, as in the trainer).", lower_bound=1)
flags.DEFINE_string("out", "benchmarks", "Output directory (results.json, README.md, PNGs).")


def main(argv):
    del argv
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}
    with exit_on_user_error():
        models = FLAGS.models or tfmstep.list_models()
        for name in models:
            tfmstep.get_spec(name)
    if "training" in FLAGS.sections:
        results["peak_matmul_flops"] = benchmark.matmul_peak_flops()
        results["training"] = []
        for name in models:
            logging.info("Benchmarking training of %s", name)
            results["training"].append(benchmark.benchmark_training(
                name, batch_size=FLAGS.batch_size, steps=FLAGS.steps, repeats=FLAGS.repeats,
                peak_flops=results["peak_matmul_flops"], tune_for_steps=FLAGS.tune_for_steps))
    if "inference" in FLAGS.sections:
        results["inference_steps"] = benchmark.inference_step_times()
    if "serving" in FLAGS.sections:
        results["serving"] = benchmark.served_latency_report()
    if "scaling" in FLAGS.sections:
        results["scaling"] = benchmark.scaling_report()
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:])
    print(benchmark.write_report(results, FLAGS.out, command.strip()))


if __name__ == "__main__":
    app.run(main)
