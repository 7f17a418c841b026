"""Kneser-Ney n-gram baseline on exactly the LSTM LM's tokens and split; picks the order on validation.

  python tools/ngram_baseline.py --max_order=32 --output=results/lstm/ngram.json
"""

import json
import os
import time

from absl import flags

from tfmstep import ngram, registry
from tfmstep.cli import exit_on_user_error, run_program
from tfmstep.models import lstm_lm

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "default", "LSTM LM preset whose corpus and split are used.")
flags.DEFINE_multi_string("config", [], "LSTM LM config overrides key=value (corpus, text_file, ...).")
flags.DEFINE_integer("max_order", 32, "Highest n-gram order tried.", lower_bound=1)
flags.DEFINE_string("output", "", "Optional JSON output path.")


def main(argv):
    del argv
    with exit_on_user_error():
        spec = registry.spec_of(lstm_lm.LSTMConfig)
        config = registry.get_config(spec.name, FLAGS.preset, **registry.parse_overrides(FLAGS.config))
        corpus = lstm_lm.tokenized_corpus(config)
        start = time.time()
        result = ngram.best_order(corpus.train, corpus.validation, config.vocab_size,
                                  orders=range(1, FLAGS.max_order + 1))
        seconds = time.time() - start
    per_byte = 1.0 / corpus.bytes_per_validation_token
    print("| order | validation bits/token | perplexity | bits/byte |\n|---|---|---|---|")
    for order, bits in result["bits_per_token_by_order"].items():
        print(f"| {order} | {bits:.4f} | {2 ** bits:.3f} | {bits * per_byte:.4f} |")
    best_bits_per_byte = result["best_bits_per_token"] * per_byte
    print(f"best: order {result['best_order']}, {result['best_bits_per_token']:.4f} bits/token, "
          f"{best_bits_per_byte:.4f} bits/byte ({seconds:.0f} s for all orders)")
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({**result, "best_bits_per_byte": best_bits_per_byte,
                       "tokenizer": config.tokenizer, "train_tokens": int(len(corpus.train)),
                       "validation_tokens": int(len(corpus.validation)),
                       "validation_bytes": corpus.validation_bytes, "seconds": round(seconds, 1),
                       "method": "interpolated modified Kneser-Ney (D1, D2, D3+ per order)"}, f, indent=2)


def run():
    run_program(main, __name__)


if __name__ == "__main__":
    run()
