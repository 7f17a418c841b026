"""Export a trained model: a TF Serving SavedModel version and TF-Lite files, checked against Keras.

  tfmstep-export --workdir=workdirs/cnn_digits --export_base=export/artifacts \
      --formats=saved_model,tflite_fp32,tflite_dynamic_range,tflite_fp16,tflite_int8 \
      --report=results/export/cnn_digits.json

  # pruning sweep (fine-tune with magnitude pruning, then export TF-Lite): accuracy and gzip size vs sparsity
  tfmstep-export --workdir=workdirs/cnn_digits --prune_sparsities=0.5,0.75,0.9 \
      --report=results/export/cnn_digits_pruning.json

Without --workdir, --model/--preset export an untrained model (for trying the pipeline).
"""

from __future__ import annotations

import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trained run directory (tools/train.py --workdir).")
flags.DEFINE_string("model", None, "Without --workdir: a registered model to export untrained.")
flags.DEFINE_string("preset", "tiny", "Without --workdir: the preset of --model.")
flags.DEFINE_string("export_base", os.path.join("export", "artifacts"),
                    "Base directory: <base>/<model>/<version>/ (TF Serving) and <base>/tflite/.")
flags.DEFINE_list("formats", ["saved_model", "tflite_fp32", "tflite_dynamic_range", "tflite_fp16",
                              "tflite_int8"], "Artifacts to write.")
flags.DEFINE_integer("version", None, "TF Serving version number (default: the next one).", lower_bound=1)
flags.DEFINE_boolean("compare", True, "Run each TF-Lite file on the validation split against Keras.")
flags.DEFINE_integer("max_eval_batches", 0, "Validation batches for the comparison (0: all).", lower_bound=0)
flags.DEFINE_string("report", None, "Write the JSON report here (and a markdown table next to it).")
flags.DEFINE_list("prune_sparsities", [], "Pruning sweep: target sparsities, e.g. 0.5,0.75,0.9.")
flags.DEFINE_integer("prune_steps", 300, "Fine-tuning steps per sparsity (target reached at 2/3).",
                     lower_bound=1)
flags.DEFINE_float("prune_learning_rate", 1e-3, "Fine-tuning learning rate.")
flags.DEFINE_integer("prune_batch_size", 64, "Fine-tuning batch size.", lower_bound=1)
flags.DEFINE_integer("prune_min_elements", 0, "Kernels with fewer weights are left dense.", lower_bound=0)


def load_model():
    """(model, config, spec): the family is resolved here, once, and handed to export and pruning."""
    from tfmstep import registry, saving
    from tfmstep.errors import UserError

    if FLAGS.workdir:
        return saving.load_trained(FLAGS.workdir)
    if not FLAGS.model:
        raise UserError("give --workdir (a trained run) or --model (export an untrained model)")
    spec = registry.get_spec(FLAGS.model)
    config = spec.config(FLAGS.preset)
    return spec.build(config), config, spec


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from tfmstep import export, fileio, pruning
    from tfmstep.cli import exit_on_user_error

    tf.get_logger().setLevel("WARNING")  # SavedModel/converter chatter; our own progress stays

    with exit_on_user_error():
        formats = export.check_formats(FLAGS.formats)
        model, config, spec = load_model()
        if FLAGS.prune_sparsities:
            sweep = pruning.pruning_sweep(model, spec, config, [float(s) for s in FLAGS.prune_sparsities],
                                          FLAGS.prune_steps, FLAGS.prune_batch_size, FLAGS.prune_learning_rate,
                                          min_elements=FLAGS.prune_min_elements)
            report = export.export_pruned(sweep, FLAGS.export_base)
            table = pruning.pruning_table(report)
        else:
            report = export.export_all(model, spec, config, FLAGS.export_base, formats,
                                       version=FLAGS.version, compare=FLAGS.compare,
                                       max_eval_batches=FLAGS.max_eval_batches)
            table = export.export_table(report)
    print(table)
    if FLAGS.report:
        os.makedirs(os.path.dirname(FLAGS.report) or ".", exist_ok=True)
        with exit_on_user_error():  # an unwritable report path: one error line, exit 2
            fileio.atomic_write_json(FLAGS.report, report)
            fileio.atomic_write(os.path.splitext(FLAGS.report)[0] + ".md", table + "\n")
        print(f"wrote {FLAGS.report}")


def run() -> None:
    from tfmstep.cli import run_program

    run_program(main, __name__)


if __name__ == "__main__":
    run()
