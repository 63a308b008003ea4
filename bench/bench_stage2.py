#!/usr/bin/env python3
"""Stage 2 speed: batched encoding vs one clip at a time, with the seeded random codec, in one run.

Both ways run the stage itself (`tokenize_artist`: read the WAVs, encode, write the `.th` files)
on the same clips with the same loaded codec; only `--batch-size` differs. Prints x real time
for each and, last, the ratio batched / one-at-a-time and its `RESULT {json}` line.

    python bench/bench_stage2.py [--clips 8] [--seconds 10] [--batch-size 8] [--threads 0]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import finish

import numpy as np
import soundfile as sf
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline.codec import load_codec  # noqa: E402
from pipeline.contract import SAMPLE_RATE  # noqa: E402
from pipeline.stages import load_stage  # noqa: E402

ARTIST = "bench"


def write_clips(root: Path, n_clips: int, seconds: float) -> None:
    """Equal-length stereo clips of seeded, band-limited noise with a tone (a stage-1-like signal)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    folder = root / "data_processed" / ARTIST
    folder.mkdir(parents=True)
    for index in range(n_clips):
        tone = 0.2 * np.sin(2 * np.pi * (110 + 55 * index) * t)
        noise = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8, mode="same") * 0.05
        wave = np.stack([tone + noise, tone - noise], axis=1).astype(np.float32)  # [S, 2]
        sf.write(folder / f"track{index}_000.wav", wave, SAMPLE_RATE, subtype="PCM_16")


def timed_run(stage2, root: Path, codec, batch_size: int) -> float:
    started = time.perf_counter()
    report = stage2.tokenize_artist(root, ARTIST, codec=codec, batch_size=batch_size, overwrite=True,
                                    log=logging.getLogger("bench.stage2"))
    elapsed = time.perf_counter() - started
    assert report.exit_code() == 0 and report.failed == [], report.failed
    return elapsed


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8, help="number of equal-length clips (default 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the batched run (default 8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0 keeps torch's default (default 0). On a shared machine, 1 "
                             "avoids the thread oversubscription that slows small batches most")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each way; the best is kept (default 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    stage2 = load_stage("2_Tokenization")
    codec = load_codec("random:0", "cpu")
    audio_seconds = args.clips * args.seconds
    print(f"stage 2 benchmark: {args.clips} clips x {args.seconds:g} s, random codec, 6 kbps, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_clips(root, args.clips, args.seconds)
        timed_run(stage2, root, codec, batch_size=args.batch_size)  # warm-up: allocator, first-call costs
        best = {"batched": float("inf"), "one at a time": float("inf")}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both ways alike
            best["batched"] = min(best["batched"], timed_run(stage2, root, codec, args.batch_size))
            best["one at a time"] = min(best["one at a time"], timed_run(stage2, root, codec, 1))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes slow both ways alike)")
    for way, seconds in best.items():
        label = f"batch size {args.batch_size}" if way == "batched" else "batch size 1"
        print(f"{way:>14} ({label}): {seconds:6.2f} s for {audio_seconds:g} s of audio = "
              f"{audio_seconds / seconds:5.1f}x real time")
    print(f"batched / one at a time: {best['one at a time'] / best['batched']:.2f}x the speed "
          f"({audio_seconds / best['batched']:.1f}x vs {audio_seconds / best['one at a time']:.1f}x real time)")
    return {"value": round(best["one at a time"] / best["batched"], 3), "batch_size": args.batch_size,
            "batched_x_real_time": round(audio_seconds / best["batched"], 2),
            "one_at_a_time_x_real_time": round(audio_seconds / best["one at a time"], 2)}


if __name__ == "__main__":
    finish(main, name="stage2", unit="x the speed of one clip at a time (batched, random codec)")
