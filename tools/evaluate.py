"""Length generalisation of trained chain reasoners (looped vs baseline): accuracy per chain length from
1 to 4x the longest trained, halting loops vs true hops, and accuracy with 2x the loops forced.

  python tools/evaluate.py --workdirs=workdirs/chain_lego,workdirs/chain_lego_baseline \
      --labels=looped,baseline --name=lego

Writes results/chain/<name>.json and .png and prints the table.
"""

from absl import app, flags

from tfmstep.cli import exit_on_user_error

flags.DEFINE_list("workdirs", [], "Trained chain_transformer workdirs (tools/train.py --workdir).")
flags.DEFINE_list("labels", [], "One label per workdir (default: the workdir's name).")
flags.DEFINE_string("output_dir", "results/chain", "Where <name>.json and <name>.png go.")
flags.DEFINE_string("name", "chain", "Base name of the output files.")
flags.DEFINE_integer("max_length_factor", 4, "Evaluate chain lengths 1 .. factor x longest trained.")
flags.DEFINE_integer("examples", 256, "Problems per chain length.")
flags.DEFINE_integer("batch_size", 128, "Problems per forward pass.")
flags.DEFINE_integer("seed", 1234, "Seed of the evaluation problems.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from tfmstep import evaluate_chains

    with exit_on_user_error():
        report = evaluate_chains.run(FLAGS.workdirs, FLAGS.labels or None, FLAGS.output_dir, FLAGS.name,
                                     FLAGS.max_length_factor, FLAGS.examples, FLAGS.batch_size, FLAGS.seed)
    print(evaluate_chains.format_table(report))
    print(f"wrote {FLAGS.output_dir}/{FLAGS.name}.json and .png")


if __name__ == "__main__":
    app.run(main)
