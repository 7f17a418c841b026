"""Run the training program (``python -m tfmstep.cli.train``) as several MultiWorkerMirroredStrategy
workers on this machine (TF_CONFIG on localhost ports): the same code path a multi-host cluster uses,
minus the network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

# The installed module, not a path into a source checkout: workers start the same in any install.
TRAIN_COMMAND = (sys.executable, "-m", "tfmstep.cli.train")


def _free_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(train_args: list, workdir: str, num_workers: int = 2, timeout: float = 900) -> dict:
    """Train with ``num_workers`` local worker processes; returns the chief's metrics and wall time."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(num_workers)]
    processes = []
    start = time.perf_counter()
    for task_id in range(num_workers):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": task_id}}))
        # One core per worker: the workers are meant to stand for separate machines.
        env.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        processes.append(subprocess.Popen(
            [*TRAIN_COMMAND, *train_args, f"--workdir={workdir}", "--distribute=multi_worker"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = []
    try:
        for task_id, process in enumerate(processes):
            _, stderr = process.communicate(timeout=timeout)
            if process.returncode != 0:
                errors.append(f"worker {task_id} exited {process.returncode}: {stderr[-1500:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return {"metrics": metrics, "wall_seconds": time.perf_counter() - start}
