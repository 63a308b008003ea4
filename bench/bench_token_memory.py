#!/usr/bin/env python3
"""Tokens larger than memory: each training process's private memory, and the time to its first step.

    python bench/bench_token_memory.py                 # a 100-hour synthetic corpus against a 1-hour one
    python bench/bench_token_memory.py --hours 10      # a quicker run

Builds synthetic token corpora (random int16 codes, Q=4, clips of --clip-seconds; never committed, in a
temporary folder), then trains `tiny` for --steps optimizer steps with two processes
(`torchrun --nproc_per_node 2`, gloo) on each corpus, twice: cold (the first run packs the artist's
token cache) and warm (the runs after it map the cache). A monitor reads every process's anonymous
memory (`Anonymous:` of /proc/<pid>/smaps_rollup: pages of the memory-mapped cache are file-backed
and shared, so they do not count) every 0.1 s; each process records the seconds from the launch to
the end of its first optimizer step. The headline is the largest growth of a process's peak anonymous
memory from the 1-hour corpus to the large one, warm (goal: at most 100 MB); the first step of a warm
run must come within 30 s of the launch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import numpy as np
import torch


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from pipeline.contract import TokenFile, save_token_file  # noqa: E402

FRAME_RATE = 150
ARTIST = "bench"
GOAL_MB, GOAL_FIRST_STEP_S = 100.0, 30.0


def make_corpus(root: Path, hours: float, clip_seconds: float, q: int = 4) -> int:
    """Random tokens of `hours` in clips of `clip_seconds` (two of them in the valid split) and the manifest."""
    rng = np.random.default_rng(0)
    frames = int(clip_seconds * FRAME_RATE)
    n_clips = max(3, int(round(hours * 3600 / clip_seconds)))
    lines = []
    for index in range(n_clips):
        codes = torch.from_numpy(rng.integers(0, 1024, (1, q, frames), dtype=np.int16))  # [1, Q, T]
        rel = f"encoded_tokens/{ARTIST}/clip_{index:05d}.th"
        save_token_file(TokenFile(codes=codes, scales=torch.ones(1), num_samples=frames * 320, bandwidth=6.0,
                                  codec="random:0", chunk_frames=frames), root / rel)
        lines.append({"audio": rel, "duration": clip_seconds, "sample_rate": 48000, "codebooks": q,
                      "bandwidth": 6.0, "split": "valid" if index >= n_clips - 2 else "train"})
    (root / f"metadata_clean_{ARTIST}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return n_clips


# ---- one process of a training run (started by torchrun) -----------------------------------------
def anonymous_kb(pid: int | str = "self") -> int | None:
    """The process's anonymous memory in kB (`Anonymous:` of smaps_rollup), None when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def worker(stage4_argv: list[str]) -> int:
    """Run stage 4 in this process, recording the time from the launch to the end of the first step."""
    from pipeline import trainer as trainer_module
    from pipeline.model_io import model_module

    out, launched = Path(os.environ["BENCH_OUT"]), float(os.environ["BENCH_LAUNCHED"])
    rank = int(os.environ.get("RANK", 0))
    (out / f"pid_{os.getpid()}").write_text(str(rank))
    first_step = trainer_module.Trainer.optimizer_step

    def timed_step(self, *args, **kwargs):
        stop = first_step(self, *args, **kwargs)
        record = out / f"first_step_{rank}.json"
        if not record.exists():
            record.write_text(json.dumps({"seconds": time.time() - launched, "anonymous_kb": anonymous_kb()}))
        return stop

    trainer_module.Trainer.optimizer_step = timed_step
    return model_module().main(stage4_argv)


# ---- the parent: launch, watch, compare ------------------------------------------------------------
def watch(folder: Path, peaks: dict, done: threading.Event) -> None:
    """Every 0.1 s, the anonymous memory of every process that wrote its pid into `folder`: peaks[pid]."""
    while not done.is_set():
        for marker in folder.glob("pid_*"):
            pid = int(marker.name[4:])
            now = anonymous_kb(pid)
            if now is not None:
                peaks[pid] = max(peaks.get(pid, 0), now)
        done.wait(0.1)


def train_run(root: Path, label: str, options: argparse.Namespace) -> dict:
    """One two-process run of `tiny` on the corpus in `root` -> peaks and first steps per rank."""
    out = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, "--worker", "--", "--artist", ARTIST, "--root", str(root), "--preset", "tiny",
               "--epochs", "1", "--max-steps", str(options.steps), "--batch-size", str(options.batch_size),
               "--overwrite", "--log-level", "INFO"]
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_OUT=str(out), BENCH_LAUNCHED=str(time.time()))
    peaks, done = {}, threading.Event()
    monitor = threading.Thread(target=watch, args=(out, peaks, done), daemon=True)
    monitor.start()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    done.set()
    monitor.join()
    if result.returncode != 0:
        raise RuntimeError(f"{label}: the training run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    ranks = {pid: int((out / f"pid_{pid}").read_text()) for pid in peaks}
    steps = [json.loads((out / f"first_step_{rank}.json").read_text()) for rank in (0, 1)]
    packed = [line for line in result.stderr.splitlines() if "packed " in line]
    row = {"peak_anonymous_mb": [round(peaks[pid] / 1024, 1) for pid in sorted(peaks, key=ranks.get)],
           "first_step_s": [round(step["seconds"], 2) for step in steps],
           "anonymous_at_first_step_mb": [round(step["anonymous_kb"] / 1024, 1) for step in steps]}
    print(f"{label}: {json.dumps(row)}" + (f"\n    {packed[0].split('] ')[-1]}" if packed else ""), flush=True)
    return row


def run(options: argparse.Namespace) -> dict:
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; tiny, 2 processes (gloo), {options.steps} steps",
          flush=True)
    base = Path(tempfile.mkdtemp(prefix="bench-token-memory-", dir=options.tmp))
    try:
        return summary({hours: corpus_runs(base / f"{hours:g}h", hours, options)
                        for hours in (options.baseline_hours, options.hours)}, options)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def corpus_runs(root: Path, hours: float, options: argparse.Namespace) -> dict:
    """Write a corpus of `hours`, then train on it cold (packing its cache) and warm (mapping it)."""
    started = time.perf_counter()
    clips = make_corpus(root, hours, options.clip_seconds)
    size = sum(p.stat().st_size for p in (root / "encoded_tokens" / ARTIST).glob("*.th")) / 1e6
    print(f"{hours:g} h corpus: {clips} clips, {size:.0f} MB of token files, written in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return {"cold": train_run(root, f"{hours:g} h cold", options),
            "warm": train_run(root, f"{hours:g} h warm", options)}


def summary(runs: dict, options: argparse.Namespace) -> dict:
    small, large = runs[options.baseline_hours], runs[options.hours]
    growth = {state: [round(b - a, 1) for a, b in zip(small[state]["peak_anonymous_mb"],
                                                      large[state]["peak_anonymous_mb"])] for state in ("cold", "warm")}
    first_step = {state: max(large[state]["first_step_s"]) for state in ("cold", "warm")}
    print(f"peak anonymous memory growth {options.baseline_hours:g} h -> {options.hours:g} h, per rank: "
          f"warm {growth['warm']} MB, cold {growth['cold']} MB (goal: <= {GOAL_MB:g} MB)", flush=True)
    print(f"first optimizer step of the {options.hours:g} h corpus: warm {first_step['warm']:.1f} s, cold "
          f"{first_step['cold']:.1f} s after the launch (goal: <= {GOAL_FIRST_STEP_S:g} s)", flush=True)
    return {"value": max(growth["warm"]), "hours": options.hours, "growth_mb": growth,
            "first_step_s": first_step, "first_step_met": first_step["warm"] <= GOAL_FIRST_STEP_S,
            "machine": cpu_name()}


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=100.0, help="the large corpus (default 100)")
    parser.add_argument("--baseline-hours", type=float, default=1.0, help="the corpus compared against (default 1)")
    parser.add_argument("--clip-seconds", type=float, default=180.0, help="length of each synthetic clip")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tmp", default=None, help="where the corpora go (default: the system's temp folder)")
    return parser.parse_args()


if __name__ == "__main__":
    if "--worker" in sys.argv:  # one training process, started by torchrun
        sys.exit(worker(sys.argv[sys.argv.index("--") + 1:]))
    finish(lambda: run(parse_options()), name="token_memory_growth", unit="MB", goal=f"<= {GOAL_MB:g}")
