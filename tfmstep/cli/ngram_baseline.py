"""Kneser-Ney n-gram baseline on exactly a language model's tokens and split; picks the order on
validation (``tfmstep.ngram.baseline`` over the family's ``token_corpus`` hook).

  python tools/ngram_baseline.py --max_order=32 --output=results/lstm/ngram.json
"""

import os

from absl import flags

from tfmstep.cli import exit_on_user_error, run_program

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "lstm_lm", "Registered model whose token corpus and split are used.")
flags.DEFINE_string("preset", "default", "Preset of --model.")
flags.DEFINE_multi_string("config", [], "Config overrides key=value (corpus, text_file, ...).")
flags.DEFINE_integer("max_order", 32, "Highest n-gram order tried.", lower_bound=1)
flags.DEFINE_string("output", "", "Optional JSON output path.")


def main(argv):
    del argv
    from tfmstep import fileio, ngram, registry

    with exit_on_user_error():
        spec = registry.get_spec(FLAGS.model)
        config = spec.config(FLAGS.preset, **registry.parse_overrides(FLAGS.config))
        report = ngram.baseline(spec, config, FLAGS.max_order)
        print(ngram.baseline_table(report))
        if FLAGS.output:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
            fileio.atomic_write_json(FLAGS.output, report)


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
