"""The trainer's settings (``TrainConfig``) without TensorFlow: the command-line tools check their flags
against it before TensorFlow is imported. ``tfmstep.trainer`` re-exports these names."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from tfmstep.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# "auto": float32, or the machine's fast low precision if it trains the same and is faster (measured by
# tfmstep/autotune.py); "" is float32 (older configs). mixed_float16 runs with loss scaling.
MIXED_PRECISION = ("auto", "", "float32", "mixed_bfloat16", "mixed_float16")
# What checkpoints/best/ keeps: the lowest smoothed train loss at a checkpoint (the NaN guard's), or the
# lowest validation loss at an evaluation -- then the run ends on that checkpoint (restored, and said so).
KEEP_BEST = ("train_loss", "eval_loss")
# A checkpoint at least this often (seconds) besides every checkpoint_every steps: a killed run then
# replays at most this much work, however slow its steps are.
DEFAULT_CHECKPOINT_EVERY_SECS = 180.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch, split across replicas
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    # The cosine decays to learning_rate * min_lr_ratio (1.0: constant after warmup), so the late stages
    # of a curriculum still train at a useful rate.
    min_lr_ratio: float = 0.0
    # The last this many steps fall linearly to 0 from wherever the cosine is (0: none), so a run with a
    # floor still ends with its weights settled.
    cooldown_steps: int = 0
    clip_norm: float = 1.0
    jit_compile: Optional[bool] = None  # None: measured on this run (see tfmstep/autotune.py)
    steps_per_call: int = 0  # optimizer steps per compiled call (fewer Python round trips); 0: measured
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500  # 0: only at the end
    eval_batches: int = 0  # 0: the whole evaluation split
    keep_best: str = "train_loss"  # one of KEEP_BEST
    early_stop_evals: int = 0  # keep_best=eval_loss: stop after this many evaluations without a new best
    seed: int = 0
    mixed_precision: str = "auto"  # one of MIXED_PRECISION
    distribute: str = "default"
    # A requested dataset that is not prepared locally is an error unless this allows the offline one
    allow_fallback: bool = False
    # A new run starts from the model weights of this run's latest checkpoint (a workdir) or of one
    # checkpoint (a path to ckpt-N); the optimizer and step start afresh. A resumed run ignores it.
    init_from: str = ""

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_call < 0:
            raise UserError(f"steps_per_call must be >= 1, or 0 to choose it by measuring; got "
                            f"{self.steps_per_call}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1] (a fraction of learning_rate), got {self.min_lr_ratio}")
        if not 0 <= self.cooldown_steps <= self.steps:
            raise UserError(f"cooldown_steps must be in [0, steps={self.steps}], got {self.cooldown_steps}")
        if self.keep_best not in KEEP_BEST:
            raise UserError(f"keep_best must be one of {', '.join(KEEP_BEST)}, got {self.keep_best!r}")
        if self.early_stop_evals < 0 or (self.early_stop_evals and (self.keep_best != "eval_loss"
                                                                    or not self.eval_every)):
            raise UserError(f"early_stop_evals={self.early_stop_evals} needs keep_best=eval_loss and "
                            f"eval_every > 0 (it counts evaluations without a new best validation loss)")
        if self.distribute not in STRATEGIES:
            raise UserError(f"unknown distribute {self.distribute!r}; choose one of {', '.join(STRATEGIES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"mixed_precision must be one of {', '.join(repr(p) for p in MIXED_PRECISION)}, "
                            f"got {self.mixed_precision!r}")
