"""The shared step under MultiWorkerMirroredStrategy: 2 worker processes on localhost train like one."""

import json
import os
import subprocess

import numpy as np

from tfmstep import multiworker

# GroupNorm: BatchNorm statistics are per replica by design and would differ from one device.
ARGS = ["--model=cnn_classifier", "--preset=tiny", "--config=norm=group", "--config=groups=4",
        "--steps=30", "--batch_size=32", "--eval_every=0", "--log_every=10", "--checkpoint_every=30",
        "--clip_norm=0.5", "--jit_compile=false"]


def _losses(workdir):
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def test_two_local_workers_match_single_worker_training(tmp_path):
    single = tmp_path / "single"
    result = subprocess.run([*multiworker.TRAIN_COMMAND, *ARGS, f"--workdir={single}"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-2000:]
    multi = tmp_path / "multi"
    run = multiworker.run_workers(ARGS, str(multi), num_workers=2)
    assert run["metrics"]["step"] == 30
    assert (multi / "workers" / "1" / "checkpoints").is_dir()  # the non-chief kept out of the chief's files
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
    single_eval = json.loads((single / "metrics.json").read_text())["eval"]
    np.testing.assert_allclose(run["metrics"]["eval"]["loss"], single_eval["loss"], rtol=1e-4)
