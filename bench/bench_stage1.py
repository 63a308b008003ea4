#!/usr/bin/env python3
"""Stage 1 speed against sox on real songs, and its peak memory on a 2-hour file.

Run: python bench/bench_stage1.py [--hours 2] [--skip-long]

1. Real OGG songs (Debian's fretsonfire-songs-sectoid) go through stage 1 (--workers 1, then 2)
   and through `sox` doing the same conversion per song: 48 kHz stereo, gain (sox: --norm=-1,
   a two-pass peak normalisation; stage 1: BS.1770 loudness with a -1 dBFS cap, also two passes),
   16-bit, 60 s clips. Each timing is a whole process, start-up included, as a user would run it.
2. A synthetic 2-hour 44.1 kHz stereo FLAC (and a 2-minute one for comparison) goes through
   stage 1 with default settings; peak RSS comes from the kernel's accounting of that process.
The ratio stage-1 / sox (× real time, one worker) is printed last, then its `RESULT {json}` line.
Without sox (or with SOX=/path/that/does/not/exist) or the song package it exits 77 (skipped).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import finish, require_command, require_debian_package

import numpy as np
import soundfile as sf


REPO = Path(__file__).resolve().parent.parent
STAGE1 = REPO / "scripts" / "1_audio_preprocessing.py"
SONG_PACKAGE = "fretsonfire-songs-sectoid"


def find_songs() -> list[Path]:
    """The package's OGG songs; `_result.Missing` (exit 77) when it is not installed."""
    return [Path(line) for line in require_debian_package(SONG_PACKAGE, ".ogg")]


def run_measured(command: list[str]) -> tuple[float, float, float]:
    """Run a process to completion; (wall seconds, CPU seconds, its peak RSS in MiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    if process.returncode not in (0, 1):
        sys.exit(f"{command[:3]} failed ({process.returncode}):\n{stderr[-2000:]}")
    per_mib = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / per_mib


def stage1_command(root: Path, *extra) -> list[str]:
    return [sys.executable, str(STAGE1), "--artist", "bench", "--root", str(root), "--overwrite", *extra]


def bench_songs(work: Path, sox: str) -> tuple[float, float]:
    """(stage 1 × real time, sox × real time) on the package's songs, one process at a time.

    CPU seconds are printed too: on a machine shared with other jobs they move less than wall time.
    """
    songs = find_songs()
    raw = work / "songs" / "raw_audio" / "bench"
    for index, song in enumerate(songs):  # symlinks: stage 1 follows them
        link = raw / f"{index:02d} {song.parent.name}" / song.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(song)
    seconds = sum(sf.info(str(song)).duration for song in songs)
    print(f"{len(songs)} OGG songs from {SONG_PACKAGE}, {seconds / 60:.1f} min of audio")

    stage1_wall, stage1_cpu, stage1_rss = run_measured(stage1_command(work / "songs"))
    stage1_wall2, stage1_cpu2, _ = run_measured(stage1_command(work / "songs", "--workers", "2"))
    print(f"stage 1, 1 worker : {stage1_wall:6.2f} s  {seconds / stage1_wall:6.1f}x real time  "
          f"CPU {stage1_cpu:6.2f} s  peak RSS {stage1_rss:.0f} MiB")
    print(f"stage 1, 2 workers: {stage1_wall2:6.2f} s  {seconds / stage1_wall2:6.1f}x real time  "
          f"CPU {stage1_cpu2:6.2f} s")

    sox_out = work / "sox"
    sox_wall = sox_cpu = 0.0
    for index, song in enumerate(songs):
        target = sox_out / f"{index:02d}"
        target.mkdir(parents=True)
        command = [sox, "-D", "--norm=-1", str(song), "-b", "16", str(target / "clip.wav"),
                   "channels", "2", "rate", "-h", "48k", "trim", "0", "60", ":", "newfile", ":", "restart"]
        wall, cpu, _ = run_measured(command)
        sox_wall, sox_cpu = sox_wall + wall, sox_cpu + cpu
    print(f"sox, 1 process    : {sox_wall:6.2f} s  {seconds / sox_wall:6.1f}x real time  CPU {sox_cpu:6.2f} s")
    print(f"stage 1 / sox speed by CPU time (1 worker): {sox_cpu / stage1_cpu:.2f}")
    return seconds / stage1_wall, seconds / sox_wall


def write_long_flac(path: Path, hours: float, rate: int = 44_100) -> float:
    """A music-like stereo FLAC written a minute at a time (chords, a beat, noise); returns its seconds."""
    rng = np.random.default_rng(0)
    minute = 60 * rate
    total = int(hours * 3600 * rate)
    with sf.SoundFile(str(path), "w", rate, 2, subtype="PCM_16", format="FLAC") as sound:
        for start in range(0, total, minute):
            t = (start + np.arange(min(minute, total - start))) / rate
            chord = sum(np.sin(2 * np.pi * f * t) for f in rng.choice([110, 147, 165, 196, 220, 262, 330], 3))
            beat = (np.sin(2 * np.pi * 2 * t) > 0.95) * rng.standard_normal(t.size) * 0.3
            left = 0.1 * chord + beat + 0.01 * rng.standard_normal(t.size)
            right = 0.1 * chord + beat + 0.01 * rng.standard_normal(t.size)
            sound.write(np.stack([left, right], axis=1).astype(np.float32))  # [n, 2]
    return total / rate


def bench_long(work: Path, hours: float) -> float:
    """Stage 1 on a 2-minute and an `hours`-long synthetic FLAC; returns the long file's peak RSS in MiB."""
    for label, length in (("2-minute", 2 / 60), (f"{hours:g}-hour", hours)):
        root = work / f"long {length:g}"
        raw = root / "raw_audio" / "bench"
        raw.mkdir(parents=True)
        started = time.perf_counter()
        seconds = write_long_flac(raw / "long.flac", length)
        made = time.perf_counter() - started
        wall, _, rss = run_measured(stage1_command(root))
        size = (raw / "long.flac").stat().st_size / 2**20
        print(f"{label} FLAC ({size:.0f} MiB, written in {made:.0f} s): stage 1 {wall:.1f} s "
              f"({seconds / wall:.1f}x real time), peak RSS {rss:.0f} MiB")
        shutil.rmtree(root)
    return rss


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0, help="length of the long synthetic file")
    parser.add_argument("--skip-long", action="store_true", help="only the songs-vs-sox comparison")
    args = parser.parse_args()
    sox = require_command("sox", "apt-get install sox libsox-fmt-all", env="SOX")  # SOX=/path/to/sox overrides
    find_songs()  # both resources are checked before the long run
    print(f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as work:
        work = Path(work)
        long_rss = None if args.skip_long else bench_long(work, args.hours)
        stage1_speed, sox_speed = bench_songs(work, sox)
    print(f"stage 1 / sox speed (x real time, 1 worker each): {stage1_speed / sox_speed:.2f}")
    return {"value": round(stage1_speed / sox_speed, 3), "stage1_x_real_time": round(stage1_speed, 1),
            "sox_x_real_time": round(sox_speed, 1), "long_file_hours": None if long_rss is None else args.hours,
            "long_file_peak_rss_mib": None if long_rss is None else round(long_rss)}


if __name__ == "__main__":
    finish(main, name="stage1", unit="x the speed of sox (x real time, 1 worker each)")
