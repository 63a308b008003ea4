"""The end-of-run table of `scripts/run_pipeline.sh`: one row per artist, read from the stages' outputs.

    python -m pipeline.summary --root ROOT --results RESULTS.tsv

RESULTS.tsv holds one line per artist: `artist<TAB>status<TAB>elapsed seconds`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import runs
from .files import is_temporary

COLUMNS = ("artist", "clips", "token frames", "best valid NLL (bits/frame)", "gain vs best count model", "outputs",
           "elapsed", "status")


def count_clips(root: Path, artist: str) -> int:
    folder = root / "data_processed" / artist
    return sum(1 for path in folder.rglob("*.wav") if not is_temporary(path)) if folder.is_dir() else 0


def token_frames(root: Path, artist: str) -> int:
    manifest = root / f"metadata_clean_{artist}.jsonl"
    if not manifest.is_file():
        return 0
    total = 0
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            total += int(json.loads(line).get("frames", 0))
        except (ValueError, AttributeError):
            continue
    return total


def used_epoch_record(root: Path, artist: str) -> dict | None:
    """The epoch line of the model stage 5 generates from: the best valid NLL (`best.pt`), else the last
    epoch (damaged lines and the baseline line skipped)."""
    return runs.best_epoch_record(runs.read_metrics(runs.model_dir(root, artist) / runs.METRICS_FILE))


def used_valid_nll(root: Path, artist: str) -> str:
    record = used_epoch_record(root, artist) or {}
    value = record.get("valid_nll_bits_per_frame", record.get("train_nll_bits_per_frame"))
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def gain_over_best_count(root: Path, artist: str) -> str:
    """Bits per frame the model is below the best count model (negative: above it); older runs: the bigram."""
    record = used_epoch_record(root, artist) or {}
    value = record.get("gain_over_best_count_bits_per_frame", record.get("gain_over_bigram_bits_per_frame"))
    return f"{value:+.2f}" if isinstance(value, (int, float)) else "-"


def output_files(root: Path, artist: str) -> list[Path]:
    folder = runs.pieces_dir(root, artist)
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_temporary(p)) if folder.is_dir() else []


def rows(root: Path, results: list[tuple[str, str, float]]) -> list[tuple]:
    return [(artist, str(count_clips(root, artist)), str(token_frames(root, artist)), used_valid_nll(root, artist),
             gain_over_best_count(root, artist), str(len(output_files(root, artist))), f"{elapsed:.0f} s", status)
            for artist, status, elapsed in results]


def format_table(table: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in [COLUMNS, *table]) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [COLUMNS, *table]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="project root of the run")
    parser.add_argument("--results", type=Path, required=True, help="TSV: artist, status, elapsed seconds")
    parser.add_argument("--list-outputs", action="store_true", help="also list every generated file")
    args = parser.parse_args(argv)
    results = []
    for line in args.results.read_text(encoding="utf-8").splitlines():
        artist, status, elapsed = line.split("\t")
        results.append((artist, status, float(elapsed)))
    print(format_table(rows(args.root, results)))
    if args.list_outputs:
        for artist, _, _ in results:
            for path in output_files(args.root, artist):
                print(f"  {path}")
            loss_plot = runs.model_dir(args.root, artist) / runs.LOSS_PLOT
            if loss_plot.is_file():
                print(f"  {loss_plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
