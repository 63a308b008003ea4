#!/usr/bin/env python3
"""Does starting from a joint model help an artist with little music? --init-from against scratch.

    python bench/bench_init_from.py                    # the demo corpus (built into a temporary root)
    python bench/bench_init_from.py --root demo_run    # reuse a root whose artists are tokenized (stages 1-3)
    python bench/bench_init_from.py --steps 150 --preset small

For the target artist (--target; by default the last in name order, the demo's demo_sunny_arps) and the
other artists of the root:

1. a joint model of every artist is trained (`--name All`) for --joint-steps;
2. the target's own model is trained from scratch for --steps optimizer steps;
3. the same, starting from the joint model's weights (`--init-from All`), for the same steps;
4. the same, from a joint model of the OTHER artists only (the target's music never seen), when there
   are other artists: what the shared knowledge alone is worth.

Each run's best valid NLL (bits per frame, on the target's held-out tracks) is printed; the last line
is scratch minus init-from-All (the goal: at least 0.5 bit per frame better at equal steps).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import cpu_name, finish, run_command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))
from pipeline import runs  # noqa: E402


def build_demo_root(root: Path) -> None:
    """The README demo's corpus, tokenized with the random codec (stages 1-3 of the loop)."""
    run_command(["bash", SCRIPTS / "run_pipeline.sh", "--demo", "--root", root, "--stop-stage", "3", "--codec",
                 "random:0"])


def artists_of(root: Path) -> list[str]:
    return sorted(path.name[len("metadata_clean_"):-len(".jsonl")] for path in root.glob("metadata_clean_*.jsonl"))


def train(root: Path, artists: list[str], name: str, options: list[str]) -> float:
    """Train stage 4 and return the best valid NLL of the target (the first artist) in bits per frame."""
    argv = [sys.executable, str(SCRIPTS / "4_Transformer.py"), "--root", str(root), "--log-level", "WARNING",
            "--overwrite", "--patience", "0"]
    for artist in artists:
        argv += ["--artist", artist]
    if len(artists) > 1 or name != artists[0]:
        argv += ["--name", name]
    run_command([*argv, *options])
    records = runs.epoch_records(runs.read_metrics(runs.model_dir(root, name) / runs.METRICS_FILE))
    key = "valid_nll_bits_per_frame"
    if len(artists) > 1:
        return min(r["valid_nll_by_artist"][artists[0]] for r in records if r.get("valid_nll_by_artist"))
    return min(r[key] for r in records if r.get(key) is not None)


def steps_options(steps: int, batch_size: int, context: int) -> list[str]:
    """--epochs / --max-steps so that the run takes `steps` optimizer steps."""
    return ["--epochs", "1000", "--max-steps", str(steps), "--batch-size", str(batch_size),
            "--context-frames", str(context)]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a project root with tokenized artists (default: the demo's)")
    parser.add_argument("--target", help="the artist with little music (default: the last artist in name order)")
    parser.add_argument("--preset", default="small", help="model size (default: small)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of each target run (default: 150)")
    parser.add_argument("--joint-steps", type=int, default=300, help="optimizer steps of each joint model (300)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step (default: 4, the demo's)")
    parser.add_argument("--context-frames", type=int, default=300, help="window (default: 300, the demo's)")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}")
    with tempfile.TemporaryDirectory(prefix="bench_init_") as scratch:
        root = args.root or Path(scratch) / "demo"
        if args.root is None:
            build_demo_root(root)
        everyone = artists_of(root)
        target = args.target or everyone[-1]
        others = [a for a in everyone if a != target]
        common = ["--preset", args.preset]
        joint = common + steps_options(args.joint_steps, args.batch_size, args.context_frames)
        own = common + steps_options(args.steps, args.batch_size, args.context_frames)
        started = time.perf_counter()
        figures = {"joint_all": train(root, [target, *others], "All", joint)}
        figures["scratch"] = train(root, [target], target, own)
        figures["init_from_all"] = train(root, [target], target, own + ["--init-from", "All"])
        if others:
            train(root, others, "Others", joint)
            figures["init_from_others"] = train(root, [target], target, own + ["--init-from", "Others"])
        for name, bits in figures.items():
            print(f"{target}: {name:18s} best valid NLL {bits:7.3f} bits/frame")
        gain = figures["scratch"] - figures["init_from_all"]
        print(f"{len(everyone)} artists, {args.steps} steps per target run, {time.perf_counter() - started:.0f} s; "
              f"init-from-All is {gain:+.3f} bits/frame better than scratch (goal >= 0.5)")
        print(json.dumps(figures))
    return {"value": round(gain, 3), **{k: round(v, 3) for k, v in figures.items()}, "target": target}


if __name__ == "__main__":
    finish(main, name="init_from", unit="bits/frame better than scratch", goal=">= 0.5")
