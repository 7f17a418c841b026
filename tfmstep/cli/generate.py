"""Generate text from a trained language model (any family with a ``generate`` hook).

  python tools/generate.py --workdir=workdirs/lstm_stdlib --prompt="def " --decoder=beam --beam_width=4
"""

import sys

from absl import flags

from tfmstep.cli import exit_on_user_error, run_program
from tfmstep.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a trained run, a saved model or a preset's name.")
flags.DEFINE_string("prompt", "def ", "Text to continue.")
# Validated by the family (the LSTM's: greedy, sample, beam); kept a string so no TensorFlow is imported
# before the flags are read.
flags.DEFINE_string("decoder", "greedy", "Decoding method: greedy, sample or beam.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate (bytes, or subwords).", lower_bound=1)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", lower_bound=1e-3)
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this probability.", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same text).")
flags.DEFINE_integer("beam_width", 4, "Beams for --decoder=beam.", lower_bound=1)
flags.DEFINE_float("length_penalty", 0.0, "Beam ranking: log_prob / length**length_penalty.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    with exit_on_user_error():
        from tfmstep import saving

        model, model_config, spec = saving.load_trained(FLAGS.workdir)
        if spec.generate is None:
            raise UserError(f"{FLAGS.workdir} holds a {spec.name} model, which does not generate text")
        text, log_prob = spec.generate(
            model, model_config, FLAGS.prompt, decoder=FLAGS.decoder, max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
            beam_width=FLAGS.beam_width, length_penalty=FLAGS.length_penalty)
    print(FLAGS.prompt + text)
    print(f"[{FLAGS.decoder}: log-probability {log_prob:.2f} nats]", file=sys.stderr)


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
