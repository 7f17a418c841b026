"""Profile the shared training step of registered models: where each step's time goes, per op type.

  python tools/profile_step.py --models=cnn_classifier,lstm_lm,chain_transformer --out=benchmarks/profile.md

Writes a TensorBoard profiler trace per model (open with `tensorboard --logdir=<logdir>`, Profile tab)
and prints / writes a markdown table per model (benchmarks/README.md explains how to read it).
"""

import json
import os

from absl import app, flags

import tfmstep
from tfmstep import profiling
from tfmstep.cli import exit_on_user_error

FLAGS = flags.FLAGS
flags.DEFINE_list("models", [], "Models to profile (default: every registered model).")
flags.DEFINE_string("preset", "default", "Preset of every model.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("steps_per_call", 10, "Steps per tf.function call.", lower_bound=1)
flags.DEFINE_integer("calls", 5, "Profiled calls (after two warm-up calls).", lower_bound=1)
flags.DEFINE_boolean("jit_compile", False, "Profile the XLA step (one opaque cluster op) instead of the "
                     "plain one (per-op detail).")
flags.DEFINE_string("logdir", "/tmp/tfmstep-profile", "Trace directory; one subdirectory per model.")
flags.DEFINE_string("out", "", "Optional markdown output path (a .json with the raw numbers is written "
                    "beside it).")


def main(argv):
    del argv
    with exit_on_user_error():
        models = FLAGS.models or tfmstep.list_models()
        for name in models:
            tfmstep.get_spec(name)
    reports = []
    for name in models:
        report = profiling.profile_training_step(
            name, FLAGS.preset, batch_size=FLAGS.batch_size, steps_per_call=FLAGS.steps_per_call,
            calls=FLAGS.calls, jit_compile=FLAGS.jit_compile, logdir=os.path.join(FLAGS.logdir, name))
        reports.append(report)
        print(profiling.format_profile(report), "\n", flush=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write("\n\n".join(profiling.format_profile(r) for r in reports) + "\n")
        with open(os.path.splitext(FLAGS.out)[0] + ".json", "w") as f:
            json.dump(reports, f, indent=2)


if __name__ == "__main__":
    app.run(main)
