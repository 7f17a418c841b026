"""Multi-worker scaling: one worker vs two MultiWorkerMirroredStrategy workers on localhost."""

from __future__ import annotations

import os
import tempfile

from tfmstep import multiworker


def scaling_report(name: str, preset: str = "default", steps: int = 200, batch_size: int = 64) -> dict:
    """One worker vs two MultiWorkerMirroredStrategy workers (localhost) training ``name`` on the same
    global batch."""
    args = [f"--model={name}", f"--preset={preset}", f"--steps={steps}", f"--batch_size={batch_size}",
            "--eval_every=0", f"--log_every={steps}", f"--checkpoint_every={steps}", "--jit_compile=false"]
    with tempfile.TemporaryDirectory() as tmp:
        single = multiworker.run_workers(args, os.path.join(tmp, "one"), num_workers=1)
        double = multiworker.run_workers(args, os.path.join(tmp, "two"), num_workers=2)
    one = single["metrics"]["train_seconds_this_run"]
    two = double["metrics"]["train_seconds_this_run"]
    return {"model": name, "steps": steps, "global_batch": batch_size, "one_worker_train_seconds": one,
            "two_workers_train_seconds": two, "speedup": one / two,
            "one_worker_eval": single["metrics"]["eval"], "two_workers_eval": double["metrics"]["eval"]}
