"""Generate text from a trained language model.

  python tools/generate.py --workdir=workdirs/lstm_stdlib --prompt="def " --decoder=beam --beam_width=4
"""

import sys

from absl import flags

from tfmstep import trainer
from tfmstep.cli import exit_on_user_error, run_program
from tfmstep.errors import UserError
from tfmstep.models import lstm_lm

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a trained LSTM language model run.")
flags.DEFINE_string("prompt", "def ", "Text to continue.")
flags.DEFINE_enum("decoder", "greedy", list(lstm_lm.DECODERS), "Decoding method.")
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
        model, model_config, spec = trainer.load_trained(FLAGS.workdir)
        if spec.config_class is not lstm_lm.LSTMConfig:
            raise UserError(f"{FLAGS.workdir} holds a {spec.name} run, not an LSTM language model")
        text, log_prob = lstm_lm.generate_text(
            model, FLAGS.prompt, decoder=FLAGS.decoder, max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
            beam_width=FLAGS.beam_width, length_penalty=FLAGS.length_penalty,
            tokenizer=lstm_lm.make_tokenizer(model_config))
    print(FLAGS.prompt + text)
    print(f"[{FLAGS.decoder}: log-probability {log_prob:.2f} nats]", file=sys.stderr)


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
