#!/usr/bin/env python
"""Interrupt a recipe run mid-stage, resume it, and compare the result with an uninterrupted run.

Starts `hf-modelopt run RECIPE --output-dir OUTPUT`, sends SIGTERM (or SIGKILL) once a line of its output
matches `--when` (default: our pruning callback's log of step 700), waits for it to exit, runs the resume
command it printed (`... --resume`), and prints the final metrics of both outputs side by side with those of
`--reference`, an uninterrupted run of the same recipe.

Usage: python scripts/interrupt_and_resume.py recipes/sst2-minilm/gmp-90.yaml --output-dir g-resumed \\
           --reference g-uninterrupted --rerun-from prune [--when "pruning: step 700,"] [--signal KILL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_until(command: list[str], pattern: str, signum: int) -> tuple[int, float]:
    """Run `command`, echo its output, send `signum` at the first line matching `pattern`; (exit code, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    sent = False
    for line in process.stdout:
        sys.stdout.write(line)
        if not sent and re.search(pattern, line):
            print(f"\n>>> sending {signal.Signals(signum).name} to the run\n", flush=True)
            os.killpg(process.pid, signum)  # the whole group: a launcher and its workers alike
            sent = True
    code = process.wait()
    if not sent:
        raise SystemExit(f"the run ended (exit {code}) before a line matched {pattern!r}")
    return code, time.monotonic() - started


def final_metrics(output: Path) -> dict:
    """The evaluate stages' metrics (`metrics.json`) and every stage's own (each `stages/*/stage.json`)."""
    results = {record["stage"]: record["metrics"] for record in json.loads((output / "metrics.json").read_text())}
    for record in sorted((output / "stages").glob("*/stage.json")):
        stage = json.loads(record.read_text())
        if stage.get("metrics") and stage.get("name") not in results:
            results[stage.get("name", record.parent.name)] = stage["metrics"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--reference", help="output folder of an uninterrupted run of the same recipe")
    parser.add_argument("--when", default=r"pruning: step 700,", help="regular expression over the run's output")
    parser.add_argument("--signal", default="TERM", choices=["TERM", "INT", "KILL"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rerun-from", metavar="STAGE", help="passed to `hf-modelopt run`: train that stage "
                        "again although the stage cache holds it (the uninterrupted run's, for instance)")
    args = parser.parse_args()

    command = [sys.executable, "-m", "hf_modelopt.cli", "run", args.recipe, "--output-dir", args.output_dir]
    for override in args.overrides:
        command += ["--set", override]
    if args.rerun_from:
        command += ["--rerun-from", args.rerun_from]
    code, seconds = run_until(command, args.when, getattr(signal, f"SIG{args.signal}"))
    print(f"\n>>> interrupted run exited with {code} after {seconds:.0f} s; resuming\n", flush=True)
    started = time.monotonic()
    resumed = subprocess.run(command + ["--resume"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if resumed.returncode != 0:
        raise SystemExit(f"the resumed run failed with exit code {resumed.returncode}")
    print(f"\n>>> resumed run finished after {time.monotonic() - started:.0f} s")
    results = {"resumed": final_metrics(Path(args.output_dir))}
    if args.reference:
        results["uninterrupted"] = final_metrics(Path(args.reference))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
