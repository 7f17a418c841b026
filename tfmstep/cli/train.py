"""Train a registered model: ``tfmstep-train`` or ``python tools/train.py``.

  tfmstep-train --recipe=cnn_digits                      a shipped recipe (tfmstep.list_recipes())
  tfmstep-train --recipe=cnn_digits --workdir=/tmp/run --steps=300    a recipe with flags changed
  tfmstep-train --flagfile=models/cnn_digits.flags       a recipe file (in the source tree: models/)
  tfmstep-train --model=cnn_classifier --preset=tiny --config=dropout=0.2 --workdir=/tmp/run --steps=200

Rerun the same command on the same --workdir to resume exactly where it stopped; rerunning a finished run
says so and prints its summary. The flags are checked before TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from tfmstep import train_config as train_config_lib
from tfmstep.cli import exit_on_user_error, models_help, run_program
from tfmstep.errors import UserError

_DEFAULTS = train_config_lib.TrainConfig()
FLAGS = flags.FLAGS

flags.DEFINE_string("recipe", None, "A shipped recipe by name (cnn_digits, lstm_stdlib_subword, ...; "
                    "tfmstep.list_recipes()): its flags, then any given after it.")
flags.DEFINE_string("model", "cnn_classifier", "Registered model (the list is below).")
flags.DEFINE_string("preset", "default", "Named preset of the model's config.")
flags.DEFINE_multi_string("config", [], "Model config override key=value (repeatable), e.g. dropout=0.2.")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, metrics). Reuse it to resume.")
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Total optimizer steps.", lower_bound=1)
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate (AdamW).")
flags.DEFINE_float("weight_decay", _DEFAULTS.weight_decay, "AdamW decoupled weight decay.")
flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps, "Linear warmup steps before cosine decay.",
                     lower_bound=0)
flags.DEFINE_float("min_lr_ratio", _DEFAULTS.min_lr_ratio,
                   "The cosine decays to learning_rate * this (1: constant after warmup).")
flags.DEFINE_integer("cooldown_steps", _DEFAULTS.cooldown_steps,
                     "The last this many steps fall linearly from the cosine's rate to 0 (0: none).")
flags.DEFINE_float("clip_norm", _DEFAULTS.clip_norm, "Global gradient-norm clip (0 disables).",
                   lower_bound=0.0)
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA for the step; auto times both on this run and keeps the faster (short runs use the "
                  "model family's default).")
flags.DEFINE_integer("steps_per_call", _DEFAULTS.steps_per_call,
                     "Optimizer steps per compiled call; 0 chooses it by timing a few values on this run.",
                     lower_bound=0)
flags.DEFINE_integer("log_every", _DEFAULTS.log_every, "Steps between progress lines.", lower_bound=1)
flags.DEFINE_integer("checkpoint_every", _DEFAULTS.checkpoint_every, "Steps between checkpoints.",
                     lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", _DEFAULTS.keep_checkpoints, "Checkpoints kept.", lower_bound=1)
flags.DEFINE_integer("eval_every", _DEFAULTS.eval_every, "Steps between evaluations (0: at the end).",
                     lower_bound=0)
flags.DEFINE_integer("eval_batches", _DEFAULTS.eval_batches, "Batches per evaluation (0: all).",
                     lower_bound=0)
flags.DEFINE_enum("keep_best", _DEFAULTS.keep_best, list(train_config_lib.KEEP_BEST),
                  "What checkpoints/best/ keeps: the lowest smoothed train loss, or the lowest validation loss "
                  "(eval_loss: the run ends restored to it, and says so).")
flags.DEFINE_integer("early_stop_evals", _DEFAULTS.early_stop_evals,
                     "With --keep_best=eval_loss: stop after this many evaluations without a new best "
                     "validation loss (0: never).", lower_bound=0)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for initialisation and the data stream.")
flags.DEFINE_enum("mixed_precision", _DEFAULTS.mixed_precision, list(train_config_lib.MIXED_PRECISION),
                  "Compute precision (auto: float32, or bfloat16/float16 where the hardware is fast at it "
                  "and a measurement on the run shows it faster and training the same).")
flags.DEFINE_enum("distribute", _DEFAULTS.distribute, list(train_config_lib.STRATEGIES),
                  "tf.distribute strategy.")
flags.DEFINE_string("restore_from", "", "Start from this checkpoint instead of the latest: ckpt-N, N, best "
                    "or a path (the way out when the latest checkpoint cannot be read).")
flags.DEFINE_string("init_from", _DEFAULTS.init_from,
                    "Start a new run from the model weights of another run: its workdir (latest checkpoint) "
                    "or a checkpoint path (.../checkpoints/ckpt-N). Optimizer and step start afresh; a "
                    "resumed run ignores it. The model's config must build the same weights.")
flags.DEFINE_float("checkpoint_every_secs", train_config_lib.DEFAULT_CHECKPOINT_EVERY_SECS,
                   "Also checkpoint when this many seconds passed since the last checkpoint (0: by steps only).",
                   lower_bound=0.0)
flags.DEFINE_boolean("allow_fallback", _DEFAULTS.allow_fallback,
                     "Train on the offline data (digits, the Python stdlib) when the requested TFDS dataset "
                     "is not prepared on this machine; without it that is an error. metrics.json's data "
                     "entry names what was read.")
flags.mark_flag_as_required("workdir")


def train_config_from_flags(flag_values: flags.FlagValues = FLAGS) -> train_config_lib.TrainConfig:
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(train_config_lib.TrainConfig)}
    values["jit_compile"] = {"auto": None, "true": True, "false": False}[flag_values.jit_compile]
    return train_config_lib.TrainConfig(**values)


def expand_recipe(argv: list[str]) -> list[str]:
    """``--recipe=NAME`` (or ``--recipe NAME``) replaced in place by the recipe's flags (includes expanded;
    ``tfmstep.saving.recipe_flags``), so flags after it override the recipe's, as with ``--flagfile``."""
    from tfmstep import saving  # reads files only: no TensorFlow

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--recipe=", "-recipe=")) or arg in ("--recipe", "-recipe"):
            if "=" in arg:
                name = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                name = argv[i]
            else:
                raise UserError("--recipe needs a name")
            out += saving.recipe_flags(name) + [f"--recipe={name}"]
        else:
            out.append(arg)
        i += 1
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with exit_on_user_error():
        config = train_config_from_flags()
        from tfmstep import registry, trainer  # TensorFlow from here on

        final = trainer.train(FLAGS.model, FLAGS.workdir, preset=FLAGS.preset,
                              overrides=registry.parse_overrides(FLAGS.config), config=config,
                              restore_from=FLAGS.restore_from,
                              checkpoint_every_secs=FLAGS.checkpoint_every_secs)
    print(trainer.summary(final, FLAGS.workdir))


def run() -> None:
    with exit_on_user_error():
        sys.argv[1:] = expand_recipe(sys.argv[1:])
    run_program(main, __name__, models_help)


if __name__ == "__main__":
    run()
