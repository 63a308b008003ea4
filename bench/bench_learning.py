#!/usr/bin/env python3
"""Does stage 4 learn? Token streams of known entropy, trained through the normal stage 4.

    python bench/bench_learning.py                         # the goals: markov, copy, cross (both patterns), overfit
    python bench/bench_learning.py --suite sweep           # the recipe variants of docs/stage4.md on markov
    python bench/bench_learning.py --device cuda --steps 300 --json out.jsonl

Each stream (scripts/pipeline/synthetic.py) is written as ordinary token files with a manifest,
stage 4 trains on it for --steps optimizer steps of --batch-size x --context-frames frames, and the
valid NLL (bits per frame) is printed next to the best any model can reach on those frames (the
oracle), the unigram and the bigram. The Markov result against its goal comes last, then its
`RESULT {json}` line (the sweep's: its best variant). `--device cuda` without a GPU exits 77.
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
from _result import finish, require_cuda

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline.model_io import model_module  # noqa: E402
from pipeline.synthetic import StreamSpec, train_on_stream, write_corpus  # noqa: E402

# The seed's recipe (tied heads, its init, its defaults) and the candidate that the sweep tests against.
SEED = {"--tie-heads": None, "--embed-init": "gpt2", "--lr": "3e-4", "--label-smoothing": "0.1",
        "--frame-dropout": "0.01", "--warmup-frac": "0.05", "--weight-decay": "0.1"}
CANDIDATE = {"--embed-init": "match", "--lr": "1e-3", "--label-smoothing": "0", "--frame-dropout": "0",
             "--warmup-frac": "0.05", "--weight-decay": "0.1"}


def recipe(base: dict, **changes) -> list[str]:
    """Stage-4 options of `base` with some replaced (`label_smoothing=0.1` -> --label-smoothing 0.1;
    `tie_heads=False` drops the flag, `tie_heads=True` adds it)."""
    values = dict(base)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            values.pop(flag, None)
        else:
            values[flag] = None if value is True else str(value)
    return [item for flag, value in values.items() for item in ([flag] if value is None else [flag, value])]


# name -> stage-4 options on top of the preset; each changes one thing against its neighbour
SWEEP = {
    "seed recipe (tied, gpt2 init, lr 3e-4)": recipe(SEED),
    "seed recipe, lr 1e-3": recipe(SEED, lr=1e-3),
    "seed recipe, untied": recipe(SEED, tie_heads=False),
    "candidate, tied": recipe(CANDIDATE, tie_heads=True),
    "candidate, gpt2 init": recipe(CANDIDATE, embed_init="gpt2"),
    "candidate, unit init": recipe(CANDIDATE, embed_init="unit"),
    "candidate (untied, match init, lr 1e-3)": recipe(CANDIDATE),
    "candidate, lr 3e-4": recipe(CANDIDATE, lr=3e-4),
    "candidate, lr 3e-3": recipe(CANDIDATE, lr=3e-3),
    "candidate, label smoothing 0.1": recipe(CANDIDATE, label_smoothing=0.1),
    "candidate, frame dropout 0.05": recipe(CANDIDATE, frame_dropout=0.05),
    "candidate, weight decay 0": recipe(CANDIDATE, weight_decay=0),
    "candidate, warm-up 0.2": recipe(CANDIDATE, warmup_frac=0.2),
}


def quiet(function, *args, **kwargs):
    """Run stage 4 with its stderr (progress bars, log) swallowed: the figures come from its metrics.jsonl."""
    with contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


def run_goals(args) -> list[dict]:
    rows = []
    # (name, stream, pattern, train clips): markov_small is the small-data stream, 10 clips of 1,500 frames
    plans = [("markov", "markov", "delay", args.train_clips), ("markov_small", "markov", "delay", 10),
             ("copy", "copy", "delay", args.train_clips), ("cross", "cross", "delay", args.train_clips),
             ("cross", "cross", "parallel", args.train_clips)]
    for name, process, pattern, clips in [plan for plan in plans if plan[0] in args.processes.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            result = quiet(train_on_stream, Path(folder), StreamSpec(process, n_codebooks=args.codebooks),
                           [*base_options(args), *args.options], args.steps, args.context_frames, args.batch_size,
                           pattern, n_train=clips)
        rows.append({"suite": "goals", "stream": name, **vars(result), "excess_bits": result.excess_bits})
        print_row(rows[-1], f"{name} ({pattern})")
    if args.overfit_steps:
        rows.append(overfit_fixed_batch(args))
    return rows


def run_sweep(args) -> list[dict]:
    rows = []
    for name, options in SWEEP.items():
        with tempfile.TemporaryDirectory() as folder:
            result = quiet(train_on_stream, Path(folder), StreamSpec("markov", n_codebooks=args.codebooks),
                           [*base_options(args), *options], args.steps, args.context_frames, args.batch_size,
                           args.pattern)
        rows.append({"suite": "sweep", "variant": name, **vars(result), "excess_bits": result.excess_bits})
        print_row(rows[-1], name)
    return rows


def overfit_fixed_batch(args) -> dict:
    """The classic sanity check: one window of random tokens, trained on again and again, must be
    memorised (train NLL near 0 bits against ~40 for a guess)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        spec = StreamSpec("copy", n_codebooks=args.codebooks, states=1024, period_range=(10_000, 10_000))
        write_corpus(root, "overfit", spec, n_train=1, n_valid=0, n_frames=args.context_frames - 1,
                     context=args.context_frames, pattern="delay")
        options = ["--artist", "overfit", "--root", str(root), "--context-frames", str(args.context_frames),
                   "--batch-size", "1", "--epochs", str(args.overfit_steps), "--dropout", "0", "--frame-dropout", "0",
                   "--label-smoothing", "0", "--weight-decay", "0", "--keep-last", "1", "--log-level", "WARNING",
                   *base_options(args)]
        started = time.perf_counter()
        quiet(model_module().main, options)
        lines = (root / "model_results" / "overfit" / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
    row = {"suite": "goals", "process": "overfit one window", "pattern": "delay", "steps": last["step"],
           "train_bits": last["train_nll_bits_per_frame"], "seconds": time.perf_counter() - started}
    print(f"{'overfit one fixed window':34s} train NLL {row['train_bits']:7.3f} bits/frame after {row['steps']} "
          f"steps (a guess: {10 * args.codebooks:.0f})", flush=True)
    return row


def base_options(args) -> list[str]:
    return ["--preset", args.preset, "--device", args.device, "--seed", str(args.seed)]


def print_row(row: dict, name: str) -> None:
    print(f"{name:34s} model {row['model_bits']:6.2f}  oracle {row['oracle_bits']:6.2f}  unigram "
          f"{row['unigram_bits']:6.2f}  bigram {row['bigram_bits']:6.2f}  excess {row['excess_bits']:+6.2f} "
          f"bits/frame  ({row['steps']} steps, {row['seconds']:.0f} s)", flush=True)
    if row.get("best_bits") is not None:
        print(f"{'':34s} best {row['best_bits']:6.2f}  best count model {row['best_count_bits']:6.2f}  "
              f"last - best {row['model_bits'] - row['best_bits']:+.2f}  train (last) {row['train_bits']:6.2f}",
              flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("goals", "sweep"), default="goals", help="what to run")
    parser.add_argument("--preset", default="small", help="stage 4's --preset (default: small)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    parser.add_argument("--overfit-steps", type=int, default=200,
                        help="steps of the fixed-batch check (default: 200; 0 skips it)")
    parser.add_argument("--train-clips", type=int, default=40, help="train clips of 1,499 frames per stream (40)")
    parser.add_argument("--processes", default="markov,copy,cross",
                        help="streams of the goals suite, of: markov, markov_small (10 train clips), copy, cross")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    parser.add_argument("--context-frames", type=int, default=300, help="frames per window (default: 300)")
    parser.add_argument("--codebooks", type=int, default=4, help="codebooks of the streams (default: 4)")
    parser.add_argument("--pattern", default="delay", help="codebook pattern of the sweep (default: delay)")
    parser.add_argument("--device", default="auto", help="stage 4's --device (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="stage 4's --seed (default: 0)")
    parser.add_argument("--options", nargs="*", default=[],
                        help="extra stage-4 options for the goals suite, e.g. --options=--lr=1e-3")
    parser.add_argument("--json", type=Path, help="also write every row to this JSONL file")
    args = parser.parse_args(argv)
    require_cuda(args.device)
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"stage 4 on synthetic streams: preset {args.preset}, {args.steps} steps of {args.batch_size} x "
          f"{args.context_frames} frames, {args.codebooks} codebooks, device {args.device}", flush=True)
    rows = run_goals(args) if args.suite == "goals" else run_sweep(args)
    if args.json:
        args.json.write_text("".join(json.dumps(row) + "\n" for row in rows))
    markov = next((row for row in rows if row.get("stream") == "markov" and "model_bits" in row), None)
    if markov and args.suite == "goals":
        print(f"markov: model {markov['model_bits']:.2f} vs oracle {markov['oracle_bits']:.2f} bits/frame "
              f"(goal <= 9, unigram {markov['unigram_bits']:.1f})")
    if args.suite == "sweep":
        best = min(rows, key=lambda row: row["model_bits"])
        return {"name": "learning_sweep", "value": round(best["model_bits"], 3), "goal": None,
                "variant": best["variant"], "preset": args.preset, "steps": best["steps"],
                "oracle_bits": round(best["oracle_bits"], 3)}
    return {"value": None if markov is None else round(markov["model_bits"], 3), "preset": args.preset,
            "steps": None if markov is None else markov["steps"],
            "oracle_bits": None if markov is None else round(markov["oracle_bits"], 3),
            "excess_bits": {f"{row['process']} ({row['pattern']})": round(row["excess_bits"], 3)
                            for row in rows if "excess_bits" in row}}


if __name__ == "__main__":
    finish(main, name="learning", unit="bits/frame, valid NLL of the Markov stream", goal="<= 9")
