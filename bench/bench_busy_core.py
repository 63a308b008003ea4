#!/usr/bin/env python3
"""A busy core costs no more than the core is worth: the demo on an idle and on a busy machine.

    python bench/bench_busy_core.py                  # three demo runs: about 10-12 minutes on 2 cores
    python bench/bench_busy_core.py --tracks 2 --track-seconds 10   # a smaller demo corpus

Runs the README's demo (`scripts/run_pipeline.sh --demo`, fresh each time) three ways, one after the
other in this one process:

1. idle machine, the project's default threads;
2. idle machine, one thread (`OMP_NUM_THREADS=1`): what one core does alone;
3. one core kept busy by another process (a `while True: pass` loop), the project's default threads.

The last line is run 3's time over run 2's: the goal is at most 1.15 (a busy core costs about what
the core is worth). Before the stages sized their threads to the free cores, run 3 took 1.66x run 2
on a 2-core AMD EPYC. Run it on an otherwise quiet machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import cpu_name, finish, run_command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_demo(root: Path, options: list[str], env: dict) -> float:
    """Seconds for one demo run from scratch into `root`."""
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    run_command(["bash", REPO / "scripts" / "run_pipeline.sh", "--demo", "--root", root, *options], env=env)
    return time.perf_counter() - started


def busy_core() -> subprocess.Popen:
    """Another process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=None, help="demo tracks per artist (default: the demo's)")
    parser.add_argument("--track-seconds", type=float, default=None, help="length of each demo track")
    args = parser.parse_args()
    options = [*(["--demo-tracks", str(args.tracks)] if args.tracks else []),
               *(["--demo-track-seconds", str(args.track_seconds)] if args.track_seconds else [])]
    base_env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    base_env["PYTHON"] = sys.executable
    print(f"machine: {os.cpu_count()} cores, {cpu_name()}")
    with tempfile.TemporaryDirectory(prefix="bench_busy_") as scratch:
        root = Path(scratch) / "demo_run"
        idle = run_demo(root, options, base_env)
        print(f"idle, default threads:  {idle:7.1f} s", flush=True)
        one = run_demo(root, options, {**base_env, "OMP_NUM_THREADS": "1"})
        print(f"idle, one thread:       {one:7.1f} s", flush=True)
        spinner = busy_core()
        try:
            busy = run_demo(root, options, base_env)
        finally:
            spinner.kill()
            spinner.wait()
        print(f"one core busy, default: {busy:7.1f} s", flush=True)
    ratio = busy / one
    print(f"busy / idle with one thread: {ratio:.2f}x (goal <= 1.15)")
    return {"value": round(ratio, 3), "idle_default_s": round(idle, 1), "idle_one_thread_s": round(one, 1),
            "busy_default_s": round(busy, 1)}


if __name__ == "__main__":
    finish(main, name="busy_core", unit="x one idle thread", goal="<= 1.15")
