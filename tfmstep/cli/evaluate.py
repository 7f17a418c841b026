"""Evaluate trained runs with their family's own evaluation (``tfmstep-evaluate`` or
``python tools/evaluate.py``). For the chain reasoner: exact match per chain length from 1 to 4x the
longest trained (looped vs baseline), halting loops vs the true k, accuracy with 2x the loops forced.

  python tools/evaluate.py --workdirs=workdirs/chain_lego,workdirs/chain_lego_baseline \\
      --labels=looped,baseline --name=lego --output_dir=/tmp/eval
  python tools/evaluate.py --workdirs=workdirs/my_task --test_file=my_test.jsonl --name=my_task
  python tools/evaluate.py --workdirs=workdirs/chain_lego --config=halting=learned --name=lego_learned
  python tools/evaluate.py --workdirs=workdirs/chain_reassign --show_errors=5   # what the wrong ones are

Prints the table; with --output_dir, writes <name>.json, .txt and .png there.
"""

from absl import flags

from tfmstep.cli import exit_on_user_error, run_program

flags.DEFINE_list("workdirs", [], "Trained workdirs (tools/train.py --workdir), all of one model family.")
flags.DEFINE_list("labels", [], "One label per workdir (default: the workdir's name).")
flags.DEFINE_string("output_dir", "", "Where <name>.json, .txt and .png go (default: print only).")
flags.DEFINE_string("name", "eval", "Base name of the output files.")
flags.DEFINE_integer("max_length_factor", 4, "Evaluate chain lengths 1 .. factor x longest trained.", lower_bound=1)
flags.DEFINE_integer("examples", 256, "Problems per chain length.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Problems per forward pass.", lower_bound=1)
flags.DEFINE_integer("seed", 1234, "Seed of the generated evaluation problems.")
flags.DEFINE_integer("show_errors", 0, "List up to this many wrong problems per chain length (answer, "
                     "prediction, loops used, the problem's text) after the table.", lower_bound=0)
flags.DEFINE_string("test_file", "", "A JSONL test file ({\"input\", \"answer\", \"steps\"?} per line) to "
                    "evaluate on instead of generated problems (task=file runs default to their test_file).")
flags.DEFINE_multi_string("config", [], "field=value: evaluate under another value of a config field that "
                          "changes only how the trained model runs (one of its family's inference fields, "
                          "e.g. a halting rule; a wrong field's error lists them); repeatable.")
flags.DEFINE_bool("merge", False, "Add these runs to the report already in --output_dir/--name.json (a run "
                  "of the same label is replaced) instead of writing a new one; it must have been "
                  "measured on the same problems: task and generator options (or test file), "
                  "--examples, --seed and --max_length_factor.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from tfmstep import evaluation
    from tfmstep.registry import parse_overrides

    with exit_on_user_error():
        report, table = evaluation.evaluate(FLAGS.workdirs, FLAGS.labels, FLAGS.output_dir, FLAGS.name,
                                            config_overrides=parse_overrides(FLAGS.config),
                                            max_length_factor=FLAGS.max_length_factor, examples=FLAGS.examples,
                                            batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                                            test_file=FLAGS.test_file, show_errors=FLAGS.show_errors,
                                            merge=FLAGS.merge)
    print(table)
    if FLAGS.output_dir:
        print(f"wrote {FLAGS.output_dir}/{FLAGS.name}.json, .txt and .png")


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
