"""Kneser-Ney n-gram baseline on exactly the LSTM LM's tokens and split; picks the order on validation.

  python tools/ngram_baseline.py --max_order=15 --output=results/lstm/ngram.json
"""

import json
import os

from absl import app, flags

from tfmstep import ngram, registry
from tfmstep.cli import exit_on_user_error
from tfmstep.models import lstm_lm

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "default", "lstm_lm preset whose corpus and split are used.")
flags.DEFINE_multi_string("config", [], "lstm_lm config overrides key=value (corpus, text_file, ...).")
flags.DEFINE_integer("max_order", 15, "Highest n-gram order tried.", lower_bound=1)
flags.DEFINE_string("output", "", "Optional JSON output path.")


def main(argv):
    del argv
    with exit_on_user_error():
        config = registry.get_config("lstm_lm", FLAGS.preset, **registry.parse_overrides(FLAGS.config))
        splits = lstm_lm.token_splits(config)
        result = ngram.best_order(splits["train"], splits["validation"], config.vocab_size,
                                  orders=range(1, FLAGS.max_order + 1))
    print("| order | validation bits/token | perplexity |\n|---|---|---|")
    for order, bits in result["bits_per_token_by_order"].items():
        print(f"| {order} | {bits:.4f} | {2 ** bits:.3f} |")
    print(f"best: order {result['best_order']}, {result['best_bits_per_token']:.4f} bits/token")
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            json.dump({**result, "train_tokens": int(len(splits["train"])),
                       "validation_tokens": int(len(splits["validation"]))}, f, indent=2)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
