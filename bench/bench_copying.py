#!/usr/bin/env python3
"""Can stage 4 reuse what it just heard? One stream, one variant, trained through the normal stage 4
(like bench_learning.py), then its best.pt and last.pt scored on the valid split with and without
the in-context copy path (`scripts/pipeline/copying.py`).

    python bench/bench_copying.py                                   # loop stream, small, 600 steps
    python bench/bench_copying.py --process copy --steps 300 --root /tmp/runs/copy_learned
    python bench/bench_copying.py --process copy --positions rope --steps 300
    python bench/bench_copying.py --process copy --root /tmp/runs/copy_learned --evaluate-only

The run folder is kept when `--root` is given, so the copy path can be scored again on a trained
model (`--evaluate-only`). Every figure is valid bits per frame; the copy path's are cross-fitted
(its gate fitted on one half of the valid windows, scored on the other, both ways). The RESULT line
holds the copy path's excess over the oracle at best.pt (what stage 5 generates from): the goals are
within 1.5 bits/frame on the copy stream (b) and within 2 on the loop stream (e), in at most 600
`small` steps. One JSON line per run is appended to `--json`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import copying, runs  # noqa: E402
from pipeline.synthetic import StreamSpec, train_on_stream, write_corpus  # noqa: E402

GOALS = {"copy": 1.5, "loop": 2.0}  # bits/frame above the oracle, with the copy path, at best.pt


def score(root: Path, artist: str, checkpoint: str) -> dict:
    """The model alone and with the copy path (fitted on every valid window) of one checkpoint."""
    path = runs.model_dir(root, artist) / checkpoint
    scores = copying.score_run(root, artist, path)
    return {"step": scores["checkpoint_step"], "model_alone_bits": scores["model_alone_bits"],
            "copy_path_bits": scores["copy_path_bits"], "copy_path": scores["copy_path"],
            "fit_seconds": scores["copy_path_fit_seconds"], "windows": scores["windows"]}


def run(args, root: Path) -> dict:
    spec = StreamSpec(args.process, n_codebooks=args.codebooks, states=args.states)
    if args.period:
        spec = StreamSpec(args.process, n_codebooks=args.codebooks, states=args.states,
                          period_range=tuple(args.period), loop_range=tuple(args.period))
    options = ["--preset", args.preset, "--device", "cpu", *args.options]
    if args.positions:
        options += ["--positions", args.positions]
    row = {"name": args.name or f"{args.process} {args.positions or 'default'} {' '.join(args.options)}".strip(),
           "process": args.process, "positions": args.positions, "options": args.options, "preset": args.preset,
           "machine": f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)"}
    if not args.evaluate_only:
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars and the log: the figures come from files
            result = train_on_stream(root, spec, options, args.steps, args.context_frames, args.batch_size,
                                     args.pattern, n_train=args.train_clips, n_valid=args.valid_clips,
                                     n_frames=args.frames)
        row.update(vars(result))
    artist = f"synthetic_{spec.process}"
    corpus = write_corpus(root / "oracle_only", artist, spec, args.train_clips, args.valid_clips, args.frames,
                          args.context_frames, args.pattern)
    records = runs.read_metrics(runs.model_dir(root, artist) / runs.METRICS_FILE)
    baselines = runs.baseline_record(records)
    started = time.perf_counter()
    row.update(oracle_bits=corpus.oracle_bits_per_frame, unigram_bits=baselines["unigram_bits_per_frame"],
               bigram_bits=baselines["bigram_bits_per_frame"], best=score(root, artist, "best.pt"),
               last=score(root, artist, "last.pt"), score_seconds=time.perf_counter() - started)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process", default="loop", help="markov, copy, cross or loop (default: loop)")
    parser.add_argument("--positions", default=None, help="stage 4's --positions (default: stage 4's own)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (whole epochs; default 600)")
    parser.add_argument("--train-clips", type=int, default=40)
    parser.add_argument("--valid-clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1499)
    parser.add_argument("--context-frames", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--codebooks", type=int, default=4)
    parser.add_argument("--states", type=int, default=64)
    parser.add_argument("--pattern", default="delay")
    parser.add_argument("--period", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="the copy stream's period / the loop's motif length range (default: the stream's)")
    parser.add_argument("--root", type=Path, default=None, help="the run's folder, kept (default: a temporary one)")
    parser.add_argument("--options", nargs="*", default=[], help="more stage-4 options, e.g. --options=--lr=3e-3")
    parser.add_argument("--evaluate-only", action="store_true", help="score the trained run in --root again")
    parser.add_argument("--name", default=None, help="the row's name in --json")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.evaluate_only and args.root is None:
        parser.error("--evaluate-only scores the run in --root: give --root")
    torch.set_num_threads(1)
    print(f"stage 4 on the {args.process} stream: {args.preset}, {args.steps} steps of {args.batch_size} x "
          f"{args.context_frames} frames, positions {args.positions or 'default'}", flush=True)
    if args.root is not None:
        row = run(args, args.root)
    else:
        with tempfile.TemporaryDirectory() as folder:
            row = run(args, Path(folder))
    print(f"oracle {row['oracle_bits']:.2f}, unigram {row['unigram_bits']:.2f}, bigram {row['bigram_bits']:.2f} "
          "bits/frame", flush=True)
    for which in ("best", "last"):
        figures = row[which]
        print(f"{which}.pt (step {figures['step']}): model alone {figures['model_alone_bits']:.2f}, with the copy "
              f"path {figures['copy_path_bits']:.2f} (n {figures['copy_path']['n']}, beta "
              f"{figures['copy_path']['beta']:g}; fitted on {figures['windows']} windows in "
              f"{figures['fit_seconds']:.1f} s)", flush=True)
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    goal = GOALS.get(args.process)
    return {"value": round(row["best"]["copy_path_bits"] - row["oracle_bits"], 3),
            "goal": None if goal is None else f"<= {goal:g}", "process": args.process,
            "positions": args.positions, "steps": row["best"]["step"],
            "copy_path_bits": round(row["best"]["copy_path_bits"], 3),
            "model_alone_bits": round(row["best"]["model_alone_bits"], 3),
            "oracle_bits": round(row["oracle_bits"], 3)}


if __name__ == "__main__":
    finish(main, name="copying", unit="bits/frame above the oracle, copy path at best.pt", goal="<= 2")
