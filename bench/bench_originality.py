#!/usr/bin/env python3
"""The originality index on hours of tokens: build time, size on disk, load time, and the lookup of a piece.

    python bench/bench_originality.py                      # 3 hours of random [T, 4] codes, a 60 s piece
    python bench/bench_originality.py --hours 10 --piece-seconds 120

Stage 4 builds `training_index.npz` from its train split once per run (`pipeline.originality`); stage 5
loads it once per model and looks every piece up. The training tokens here are random codes in
60 s clips (the index's cost depends on the frame count, not on the music); the piece is random
frames with 2 s copied from one clip, so the lookup finds something. The RESULT line is the lookup
time of one piece (the median of --repeats), against the goal of under a second for 60 s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline.originality import TrainingIndex  # noqa: E402
from pipeline.runs import TRAINING_INDEX  # noqa: E402

FRAME_RATE = 150


def training_clips(hours: float, clip_seconds: float, n_codebooks: int, seed: int) -> list[np.ndarray]:
    """Random int16 clips `[T, Q]` (as stage 4's token store holds them) adding up to `hours`."""
    rng = np.random.default_rng(seed)
    total, per_clip = round(hours * 3600 * FRAME_RATE), round(clip_seconds * FRAME_RATE)
    lengths = [per_clip] * (total // per_clip) + ([total % per_clip] if total % per_clip else [])
    return [rng.integers(0, 1024, size=(length, n_codebooks), dtype=np.int16) for length in lengths]


def piece_with_a_copy(clips: list[np.ndarray], seconds: float, seed: int) -> np.ndarray:
    """Random frames `[T, Q]` with 2 s of the middle clip at 1 s into it."""
    rng = np.random.default_rng(seed + 1)
    piece = rng.integers(0, 1024, size=(round(seconds * FRAME_RATE), clips[0].shape[1]), dtype=np.int16)
    source = clips[len(clips) // 2]
    piece[FRAME_RATE:3 * FRAME_RATE] = source[FRAME_RATE:3 * FRAME_RATE]
    return piece


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=3.0, help="hours of training tokens")
    parser.add_argument("--clip-seconds", type=float, default=60.0, help="length of each training clip")
    parser.add_argument("--codebooks", type=int, default=4, help="Q (4 = 6 kbps)")
    parser.add_argument("--piece-seconds", type=float, default=60.0, help="length of the piece looked up")
    parser.add_argument("--repeats", type=int, default=5, help="lookups timed (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clips = training_clips(args.hours, args.clip_seconds, args.codebooks, args.seed)
    frames = sum(len(clip) for clip in clips)
    print(f"{cpu_name()}; {len(clips)} clips, {frames:,} frames ({frames / FRAME_RATE / 3600:.2f} h), "
          f"Q = {args.codebooks}", flush=True)
    started = time.perf_counter()
    index = TrainingIndex.build(clips, [f"clip_{number:04d}.th" for number in range(len(clips))], FRAME_RATE)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / TRAINING_INDEX
        started = time.perf_counter()
        index.save(path)
        save_s, size_mb = time.perf_counter() - started, path.stat().st_size / 1e6
        started = time.perf_counter()
        index = TrainingIndex.load(path)
        load_s = time.perf_counter() - started
    piece = piece_with_a_copy(clips, args.piece_seconds, args.seed)
    timings, report = [], None
    for _ in range(args.repeats):
        started = time.perf_counter()
        report = index.report(piece)
        timings.append(time.perf_counter() - started)
    lookup_s = statistics.median(timings)
    print(f"build {build_s:.2f} s, save {save_s:.2f} s, {size_mb:.1f} MB on disk, load {load_s:.2f} s; "
          f"lookup of a {args.piece_seconds:g} s piece {lookup_s * 1000:.0f} ms (median of {args.repeats}); "
          f"found {report['longest_copy_seconds']:.2f} s of {report['training_file']} at "
          f"{report['training_seconds']:.2f} s", flush=True)
    if report["longest_copy_frames"] < 2 * FRAME_RATE:
        raise RuntimeError(f"the lookup missed the copied 2 s: {report}")
    return {"value": round(lookup_s, 4), "training_hours": round(frames / FRAME_RATE / 3600, 3), "frames": frames,
            "build_s": round(build_s, 2), "size_mb": round(size_mb, 1), "load_s": round(load_s, 3),
            "piece_seconds": args.piece_seconds}


if __name__ == "__main__":
    finish(main, name="originality", unit="s to look a piece up in the training index", goal="< 1")
