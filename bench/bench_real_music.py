#!/usr/bin/env python3
"""Real music, one artist: which recipe learns the held-out song best at equal training steps?

    python bench/bench_real_music.py                          # previous recipe vs defaults, 8 epochs
    python bench/bench_real_music.py --epochs 18 --patience 4 --threads 2 --parallel 1   # the row's recipe
    python bench/bench_real_music.py --arms learned,defaults,shifts,alibi --reuse-data
    python bench/bench_real_music.py --epochs 1 --songs-limit 2      # minutes: checks that the script works

Steps: the song.ogg of every song folder of Debian's fretsonfire-songs-sectoid go through stages 1-3
(10 s clips, a random codec unless --codec names real weights, 6 kbps, a quarter of the tracks held
out by stage 3's track hash). Stage 2 writes `sectoid_plain`, the clips alone, and, when an arm
trains on variants (shifts, shifts_*), `sectoid` with `--shifts K` (each clip also encoded at K-1
sub-frame offsets; the manifest lists them as variants; the same clips, split and valid tokens).
Every arm then trains `small` (delay pattern, context 300, batch 8, `--patience` as given: 0
trains every epoch) for the same --epochs (a variant adds no windows: equal epochs are equal optimizer steps; the LR
schedule spans them), --parallel arms at a time with --threads threads each. For each arm the bench
prints the best valid NLL of the model alone (bits/frame; what best.pt holds), the valid NLL with
the in-context copy path at that epoch as stage 4 fitted it (on at most 32 valid windows) and
refitted here on every valid window, the last epoch's valid and train NLL (overfitting), the valid
NLL by position bucket at the best epoch, and the run's training seconds. The `learned` arm is the
previous recipe (learned positions, no copy path); `defaults` is today's (RoPE, the copy path). The
last line's value is how far the `defaults` arm (its copy path refitted on every valid window) ends
below the `learned` arm's model alone (goal: at least 0.7 bit/frame). Without the song package it
exits 77.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _result import Missing, cpu_name, finish, link_songs, require_codec, run_command, stop_running

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from pipeline import runs  # noqa: E402
from pipeline.copying import score_run  # noqa: E402
from pipeline.training import in_position_order  # noqa: E402

SONGS = Path("/usr/share/games/fretsonfire/data/songs")
ARTIST = "sectoid"
PLAIN = f"{ARTIST}_plain"
# name -> (artist folder: with or without shifted variants, stage-4 options beyond the common recipe)
ARMS = {
    "defaults": (PLAIN, []),
    "shifts": (ARTIST, []),
    "rope": (PLAIN, ["--positions", "rope"]),
    "alibi": (PLAIN, ["--positions", "alibi"]),
    "dropout0.2": (PLAIN, ["--dropout", "0.2"]),
    "dropout0.3": (PLAIN, ["--dropout", "0.3"]),
    "wd0.3": (PLAIN, ["--weight-decay", "0.3"]),
    "shifts_dropout0.2": (ARTIST, ["--dropout", "0.2"]),
    "shifts_rope": (ARTIST, ["--positions", "rope"]),
    "lr2e-3": (PLAIN, ["--lr", "2e-3"]),
    "shifts_lr2e-3": (ARTIST, ["--lr", "2e-3"]),
    "learned": (PLAIN, ["--positions", "learned", "--copy-path", "off"]),
}


def run(script: str, *args, env=None) -> float:
    """One stage as a subprocess -> its seconds; its error output is shown when it fails."""
    return run_command([sys.executable, SCRIPTS / script, *args], env=env)


def needed_artists(options) -> set[str]:
    """The artist folders the chosen arms train on: `sectoid_plain`, `sectoid` (with variants) or both."""
    return {ARMS[name][0] for name in options.arms.split(",")}


def prepare(root: Path, options) -> None:
    """Stages 1-3 for `sectoid_plain` (the clips alone) and, when an arm needs it, `sectoid` (with --shifts)."""
    link_songs(root, ARTIST, options.songs, options.songs_limit)
    common = ["--root", root, "--log-level", "WARNING"]
    run("1_audio_preprocessing.py", "--artist", ARTIST, *common, "--clip-seconds", 10)
    plain_clips = root / "data_processed" / PLAIN
    if not plain_clips.exists():
        shutil.copytree(root / "data_processed" / ARTIST, plain_clips)
    for artist, shifts in ((PLAIN, 1), (ARTIST, options.shifts)):
        if artist not in needed_artists(options):
            continue
        seconds = run("2_Tokenization.py", "--artist", artist, *common, "--codec", options.codec,
                      "--bandwidth", 6, "--shifts", shifts)
        print(f"stage 2, {artist}, --shifts {shifts}: {seconds:.0f} s", flush=True)
        run("3_data_preparation.py", "--artist", artist, *common, "--valid-fraction", 0.25)


def train_arm(root: Path, name: str, options) -> dict:
    artist, extra = ARMS[name]
    folder = runs.model_dir(root, name)
    if not (options.reuse_models and (folder / "last.pt").is_file()):
        env = dict(os.environ, OMP_NUM_THREADS=str(options.threads))
        run("4_Transformer.py", "--artist", artist, "--name", name, "--root", root, "--preset", "small",
            "--pattern", "delay", "--context-frames", 300, "--batch-size", 8, "--epochs", options.epochs,
            "--patience", options.patience, "--device", "cpu", "--seed", options.seed, "--log-level", "WARNING",
            "--overwrite", *extra, env=env)
    row = summarise(name, folder)
    if row["copy_path_valid"] is not None:  # the arm trained with the copy path: refit it on every valid window
        row["copy_path_all_windows"] = score_run(root, artist, folder / "best.pt")["copy_path_bits"]
    return row


def summarise(name: str, folder: Path) -> dict:
    records = runs.read_metrics(folder / runs.METRICS_FILE)
    epochs = [record for record in runs.epoch_records(records) if record.get("valid_nll_bits_per_frame") is not None]
    best = min(epochs, key=lambda record: record["valid_nll_bits_per_frame"])
    baselines, last = runs.baseline_record(records), epochs[-1]
    return {"arm": name, "options": " ".join(ARMS[name][1]) or "(defaults)", "variants": ARMS[name][0] == ARTIST,
            "best_valid": best["valid_nll_bits_per_frame"], "best_epoch": best["epoch"], "best_step": best["step"],
            "copy_path_valid": best.get("valid_nll_copy_path_bits_per_frame"),
            "last_valid": last["valid_nll_bits_per_frame"], "last_train": last["train_nll_bits_per_frame"],
            "steps": last["step"], "train_seconds": last["elapsed_s"],
            "best_count": baselines.get("best_count_bits_per_frame"),
            "by_position": best.get("valid_nll_by_position")}


def print_table(rows: list[dict]) -> None:
    print("| arm | options | variants | best valid (step) | with copy path: stage 4's fit / every valid window | "
          "last valid / train | seconds | by position at best |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        copy = "" if row["copy_path_valid"] is None else (
            f"{row['copy_path_valid']:.2f} / {row['copy_path_all_windows']:.2f}")
        positions = ", ".join(f"{bucket} {bits:.2f}" for bucket, bits in in_position_order(row["by_position"] or {}))
        print(f"| {row['arm']} | {row['options']} | {'yes' if row['variants'] else 'no'} | "
              f"{row['best_valid']:.2f} ({row['best_step']}) | {copy} | {row['last_valid']:.2f} / "
              f"{row['last_train']:.2f} | {row['train_seconds']:.0f} | {positions} |")


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arms", default="learned,defaults",
                        help=f"comma-separated arms, of: {', '.join(ARMS)} (the last line needs learned and defaults)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every arm (46 optimizer steps each here)")
    parser.add_argument("--patience", type=int, default=0,
                        help="stage 4's --patience for every arm (0: every epoch; stage 4's own default is 4)")
    parser.add_argument("--shifts", type=int, default=2, help="stage 2's --shifts for the arms with variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    parser.add_argument("--parallel", type=int, default=2, help="arms trained at the same time")
    parser.add_argument("--seed", type=int, default=0, help="stage 4's --seed")
    parser.add_argument("--codec", default="random:0", help="codec spec of stage 2")
    parser.add_argument("--songs", type=Path, default=SONGS, help="folder of the song folders (one per artist)")
    parser.add_argument("--songs-limit", type=int, default=0, help="use only the first N songs (0: all)")
    parser.add_argument("--root", type=Path, help="work folder (default: a temporary one, deleted afterwards)")
    parser.add_argument("--reuse-data", action="store_true", help="keep the token files and manifests --root holds")
    parser.add_argument("--reuse-models", action="store_true", help="summarise the arms --root already trained")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    options = parser.parse_args(argv)
    unknown = set(options.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    return options


def benchmark(options, root: Path) -> dict:
    manifests = [root / f"metadata_clean_{artist}.jsonl" for artist in needed_artists(options)]
    if not options.reuse_data or not all(manifest.is_file() for manifest in manifests):
        prepare(root, options)
    names = options.arms.split(",")
    with ThreadPoolExecutor(max_workers=options.parallel) as pool:
        try:
            rows = list(pool.map(lambda name: train_arm(root, name, options), names))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            stop_running()
            raise
    print(f"{cpu_name()}; {options.epochs} epochs of `small` per arm, {options.parallel} arms at a time, "
          f"{options.threads} thread(s) each; best count model {rows[0]['best_count']:.2f} bits/frame")
    print_table(rows)
    if options.json:
        options.json.write_text(json.dumps(rows, indent=2))
    arms = {row["arm"]: row for row in rows}
    if not {"learned", "defaults"} <= set(arms):
        return {"value": None, "rows": len(rows)}
    previous, today = arms["learned"]["best_valid"], arms["defaults"]["copy_path_all_windows"]
    print(f"today's defaults (RoPE + the copy path fitted on every valid window) at {today:.2f} bits/frame "
          f"against the previous recipe's {previous:.2f} (learned positions, no copy path), "
          f"{arms['defaults']['train_seconds']:.0f} s against {arms['learned']['train_seconds']:.0f} s of "
          f"training: {previous - today:.2f} below (goal >= 0.7)")
    return {"value": round(previous - today, 3), "cpu": cpu_name()}


def main() -> dict:
    options = parse_options()
    if not any((options.songs / ARTIST).glob("*/song.ogg")):
        raise Missing(f"no */song.ogg under {options.songs / ARTIST} (apt-get install fretsonfire-songs-sectoid)")
    require_codec(options.codec)
    if options.root:
        options.root.mkdir(parents=True, exist_ok=True)
        return benchmark(options, options.root)
    with tempfile.TemporaryDirectory(prefix="bench_real_music_") as folder:
        return benchmark(options, Path(folder))


if __name__ == "__main__":
    finish(main, "stage 4 real music: today's defaults below the previous recipe", "bits/frame", ">= 0.7")
