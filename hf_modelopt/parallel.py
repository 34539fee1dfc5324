"""Independent runs (the points of a sweep, several recipes) side by side, each in its own process.

Each `ProcessRun` is a command run in its own process (not a `hf_modelopt.tasks.Task`, what a model does). With
GPUs, every process sees one of them
(`CUDA_VISIBLE_DEVICES`, round robin); on CPU, the cores are split between the processes running at once
(`OMP_NUM_THREADS`, which torch reads at start), since torch processes that each take every core slow each
other down more than they gain. Each process writes its output into its own log file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("hf_modelopt")


@dataclass
class ProcessRun:
    """One command to run in its own process, its output written to `log_file`."""

    name: str
    command: list[str]
    log_file: Path


def visible_gpus() -> list[str]:
    """The GPU indices this process may use (`CUDA_VISIBLE_DEVICES` when set, else every device torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def slot_environments(jobs: int, gpus: list[str] | None = None, cpus: int | None = None) -> list[dict[str, str]]:
    """The environment of each of `jobs` concurrent slots: one GPU each when there are GPUs, else a core share."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} for slot in range(jobs)]
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cpus // jobs))
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            for _ in range(jobs)]


def run_processes(runs: list[ProcessRun], jobs: int = 1, gpus: list[str] | None = None,
                  poll_seconds: float = 2.0) -> dict:
    """Run `runs`, at most `jobs` at once; {run name: exit code}. A failed run does not stop the others."""
    environments = slot_environments(max(1, jobs), gpus)
    free_slots = list(range(len(environments)))
    pending, running, codes = list(runs), {}, {}
    try:
        _schedule(pending, running, codes, environments, free_slots, poll_seconds)
    finally:  # interrupted (Ctrl-C): stop the runs still running; each saves what its own signal handling saves
        for process, log, _, _ in running.values():
            process.terminate()
            process.wait()
            log.close()
    return codes


def _schedule(pending, running, codes, environments, free_slots, poll_seconds) -> None:
    while pending or running:
        while pending and free_slots:
            run, slot = pending.pop(0), free_slots.pop(0)
            run.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.log_file, "w")  # noqa: SIM115  (closed when the run ends)
            env = {**os.environ, **environments[slot], "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[run.name] = (process, log, slot, time.monotonic())
            logger.info("run %s started (slot %d: %s); log: %s", run.name, slot,
                        ", ".join(f"{k}={v}" for k, v in environments[slot].items() if v), run.log_file)
        time.sleep(poll_seconds if running else 0)
        for name, (process, log, slot, started) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            codes[name] = process.returncode
            free_slots.append(slot)
            del running[name]
            logger.info("run %s %s after %.0f s", name, "finished" if process.returncode == 0 else
                        f"FAILED (exit {process.returncode})", time.monotonic() - started)
