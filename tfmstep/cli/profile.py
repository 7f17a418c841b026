"""Profile the shared training step of registered models: where each step's time goes, per op type.

  tfmstep-profile --models=cnn_classifier,lstm_lm,chain_transformer --out=benchmarks/profile.md
  tfmstep-profile --models=cnn_classifier --preset=cifar10 --config=dataset=digits \
      --config=image_shape=32,32,3 --config=num_classes=10 --batch_size=128 \
      --precisions=float32,mixed_bfloat16 --out=benchmarks/profile_cifar10.md

Writes a TensorBoard profiler trace per model (open with `tensorboard --logdir=<logdir>`, Profile tab)
and prints / writes a markdown table per model (benchmarks/README.md explains how to read it).
"""

from absl import app, flags

from tfmstep.cli import exit_on_user_error, run_program

FLAGS = flags.FLAGS
flags.DEFINE_list("models", [], "Models to profile (default: every registered model).")
flags.DEFINE_string("preset", "default", "Preset of every model.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.", lower_bound=1)
flags.DEFINE_integer("steps_per_call", 10, "Steps per tf.function call.", lower_bound=1)
flags.DEFINE_integer("calls", 5, "Profiled calls (after two warm-up calls).", lower_bound=1)
flags.DEFINE_boolean("jit_compile", False, "Profile the XLA step (one opaque cluster op) instead of the "
                     "plain one (per-op detail).")
flags.DEFINE_list("precisions", ["float32"], "Compute precisions to profile (each a trace and a table).")
flags.DEFINE_multi_string("config", [], "Model config overrides key=value (e.g. image_shape=32,32,3).")
flags.DEFINE_string("logdir", "/tmp/tfmstep-profile", "Trace directory; one subdirectory per model.")
flags.DEFINE_string("out", "", "Optional markdown output path (a .json with the raw numbers is written "
                    "beside it).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with exit_on_user_error():
        from tfmstep import profiling, registry  # TensorFlow: after the flags were read

        profiling.profile_models(FLAGS.models, FLAGS.preset, batch_size=FLAGS.batch_size,
                                 steps_per_call=FLAGS.steps_per_call, calls=FLAGS.calls,
                                 jit_compile=FLAGS.jit_compile, logdir=FLAGS.logdir, out=FLAGS.out,
                                 precisions=FLAGS.precisions, **registry.parse_overrides(FLAGS.config))


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
