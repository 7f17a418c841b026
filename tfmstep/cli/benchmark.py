"""Benchmarks, side by side in one run: training throughput (tfmstep step vs Keras fit vs eager) and
MFU for every registered model, per-step inference time, served-path latency and multi-worker scaling.
The "tfmstep auto" row is the setting the trainer's auto-tuning picks (its measured candidates are listed
under each table).

  tfmstep-benchmark --suite=benchmarks/suite.json --out=benchmarks    # everything, as committed
  tfmstep-benchmark --suite=benchmarks/suite.json --sections=training --only=lstm_lm --merge
  tfmstep-benchmark --sections=training --models=cnn_classifier --steps=20 --repeats=2

--suite lists the configurations the training section measures (families at the shapes users train:
presets with overrides, or shipped recipes; the timing grid; the goals). --only with --merge measures some
of them and keeps the rest of --out's results.json, so a long suite runs in parts (each part holds the
shared CPU for a few minutes) and the report is still written from all of it.
"""

import json
import os
import shlex
import sys

from absl import app, flags

from tfmstep.benchmark import SECTIONS
from tfmstep.cli import exit_on_user_error, run_program

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", list(SECTIONS), "What to measure.")
flags.DEFINE_list("models", [], "Models for the training and inference sections (default: every "
                  "registered model).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 50, "Timed training steps per repeat.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed repeats per setting (median and spread reported).", lower_bound=1)
flags.DEFINE_integer("tune_for_steps", 1000, "Run length the auto-tuned row is chosen for (it sets the "
                     "tuning budget and caps steps_per_call, as in the trainer).", lower_bound=1)
flags.DEFINE_string("serving_model", "cnn_classifier", "Model whose served-path latency is measured.")
flags.DEFINE_string("served_source", "cnn_digits", "Trained model (workdir, saved model or preset) whose "
                    "accuracy and latency are measured served in float32, bfloat16 and int8.")
flags.DEFINE_string("scaling_model", "cnn_classifier", "Model trained by the multi-worker scaling run.")
flags.DEFINE_string("out", "benchmarks", "Output directory (results.json, README.md, PNGs).")
flags.DEFINE_string("suite", "", "JSON file of the training section's entries (see benchmarks/suite.json); "
                    "empty: every registered model at its default preset.")
flags.DEFINE_list("only", [], "With --suite: measure only the entries with these labels.")
flags.DEFINE_bool("merge", False, "Keep the sections and entries of --out/results.json not measured now.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with exit_on_user_error():
        from tfmstep.benchmark import report, suite  # TensorFlow: after the flags were read

        previous = None
        path = os.path.join(FLAGS.out, "results.json")
        if FLAGS.merge and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
        results = suite.run_benchmarks(
            FLAGS.sections, FLAGS.models, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
            repeats=FLAGS.repeats, tune_for_steps=FLAGS.tune_for_steps, serving_model=FLAGS.serving_model,
            scaling_model=FLAGS.scaling_model, served_source=FLAGS.served_source,
            suite_file=FLAGS.suite, only=FLAGS.only, previous=previous)
    command = shlex.join(["tfmstep-benchmark", *sys.argv[1:]])
    if FLAGS.sections:  # a run that measured something; one that only re-renders the report adds nothing
        results["commands"] = [*(results.get("commands", []) if FLAGS.merge else []), command]
    print(report.write_report(results, FLAGS.out, command))


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
