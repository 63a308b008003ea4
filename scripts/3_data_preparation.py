#!/usr/bin/env python3
"""Stage 3: check an artist's token files and write the training manifest.

    encoded_tokens/<artist>/**/*.th  ->  metadata_clean_<artist>.jsonl

Every token file is loaded with `weights_only=True` (a pickle that would run code is refused,
never executed) and validated. One model consumes them all, so they must share one Q and one
bandwidth: the majority wins and the others are named and left out. Clips are grouped by the
track they were cut from, and whole tracks go to `train` or `valid`, so no song is on both sides.

Stage 2's shifted variants (`<clip>.shift<s>.th`, `--shifts`) are not clips of their own: each is
checked against its clip (same Q, bandwidth, codec, frames and length) and listed in the clip's
entry under `variants`, so it follows its clip's track into the same split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.cli import (StageError, StageReport, fraction, make_parser, non_negative_int,  # noqa: E402
                          run_main, setup_logging)
from pipeline.contract import (FRAME_RATE, SAMPLE_RATE, TokenFile, TokenFileError,  # noqa: E402
                               load_token_file, parse_variant_path)
from pipeline.files import is_temporary  # noqa: E402
from pipeline.manifest import manifest_path, write_manifest  # noqa: E402

STAGE = "stage3"
DEFAULT_VALID_FRACTION = 0.05
CLIP_INDEX_SUFFIX = re.compile(r"_\d+$")  # stage 1 names clips <track path>_<iii>
REPORT_NAME = "manifest_report.json"
SPLIT_VERSION = 1  # part of the fingerprint: bump when the split rule changes


def parse_args(argv=None):
    parser = make_parser(
        "Stage 3: validate encoded_tokens/<artist>/**/*.th and write metadata_clean_<artist>.jsonl "
        "with a train/valid split by track.")
    parser.add_argument("--valid-fraction", type=fraction, default=DEFAULT_VALID_FRACTION,
                        help="share of the tracks held out for validation (at least one track when there "
                             "are two or more, unless 0; never all of them)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the track hash that decides the split (same seed, same split)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(args.log_level, STAGE)
    report = prepare_artist(args.root, args.artist, valid_fraction=args.valid_fraction, seed=args.seed,
                            overwrite=args.overwrite, log=log)
    return report.exit_code()


def prepare_artist(root, artist: str, valid_fraction: float = DEFAULT_VALID_FRACTION, seed: int = 0,
                   overwrite: bool = False, log: logging.Logger | None = None) -> StageReport:
    """Validate the artist's token files, split them by track and write the manifest and report."""
    root = Path(root)
    log = log or logging.getLogger(f"pipeline.{STAGE}")
    token_dir = root / "encoded_tokens" / artist
    output, report_path = manifest_path(root, artist), token_dir / REPORT_NAME
    paths = find_token_files(token_dir)
    clip_paths, variant_paths = separate_variants(paths)
    if not clip_paths:
        raise StageError(f"token folder {token_dir} holds only shifted variants (<clip>.shift<s>.th), no clip's "
                         "own .th: run scripts/2_Tokenization.py again")
    fingerprint = inputs_fingerprint(root, paths, valid_fraction, seed, has_variants=bool(variant_paths))
    if not overwrite:
        previous = up_to_date_report(output, report_path, fingerprint)
        if previous is not None:
            log.info("%s is up to date with %d token file(s): nothing to do (--overwrite rebuilds it)",
                     output, len(paths))
            return previous

    report = StageReport(STAGE, artist)
    report.details.update(fingerprint=fingerprint, valid_fraction=valid_fraction, seed=seed,
                          manifest=output.relative_to(root).as_posix())
    loaded = load_token_files(root, clip_paths, report, log)
    kept = keep_majority_layout(loaded, report, log)
    if not kept:
        report.write(report_path)
        raise StageError(f"none of the {len(clip_paths)} token file(s) in {token_dir} is usable "
                         f"(each is named above and in {report_path}); re-run scripts/2_Tokenization.py")
    variants = matching_variants(root, variant_paths, kept, report, log)  # clip audio -> its variants' audio
    tracks = {audio: track_of(audio_path, token_dir) for audio, (audio_path, _) in kept.items()}
    splits = split_tracks(sorted(set(tracks.values())), valid_fraction, seed)
    entries = [manifest_entry(audio, token, tracks[audio], splits[tracks[audio]], variants.get(audio, []))
               for audio, (_, token) in sorted(kept.items())]
    write_manifest(entries, output)
    report.done.extend(entry["audio"] for entry in entries)
    summarise(entries, report, log)
    warn_on_mixed_codecs(entries, log)
    report.write(report_path)
    log.info("wrote %s; %s", output, report.summary())
    return report


# ---- inputs ---------------------------------------------------------------------------------
def find_token_files(token_dir: Path) -> list[Path]:
    if not token_dir.is_dir():
        raise StageError(f"token folder {token_dir} does not exist: run scripts/2_Tokenization.py first")
    paths = sorted(path for path in token_dir.rglob("*.th") if path.is_file() and not is_temporary(path))
    if not paths:
        raise StageError(f"token folder {token_dir} holds no .th files: run scripts/2_Tokenization.py first")
    return paths


def separate_variants(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Token files -> (clips, stage 2's shifted variants `<clip>.shift<s>.th`)."""
    variants = [path for path in paths if parse_variant_path(path) is not None]
    chosen = set(variants)
    return [path for path in paths if path not in chosen], variants


def inputs_fingerprint(root: Path, paths: list[Path], valid_fraction: float, seed: int,
                       has_variants: bool = False) -> str:
    """Changes when a token file (a variant too) is added, removed or rewritten, or the split options
    change. Without variants it is what it was before variants existed, so those manifests stay current."""
    options = [SPLIT_VERSION, valid_fraction, seed] + (["variants"] if has_variants else [])
    digest = hashlib.sha256(json.dumps(options).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def up_to_date_report(output: Path, report_path: Path, fingerprint: str) -> StageReport | None:
    """The earlier run's report (its failures kept, so the exit status repeats) if nothing changed."""
    try:
        previous = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not output.is_file() or previous.get("details", {}).get("fingerprint") != fingerprint:
        return None
    report = StageReport(STAGE, previous.get("artist", ""), failed=list(previous.get("failed", [])),
                         details=dict(previous.get("details", {})))
    report.skipped.append(str(output))
    return report


def load_token_files(root: Path, paths: list[Path], report: StageReport,
                     log: logging.Logger) -> dict[str, tuple[Path, TokenFile]]:
    """Load and check each file; a broken one is named in the report and left out."""
    loaded = {}
    for path in tqdm(paths, unit="file", desc=f"checking {report.artist}", dynamic_ncols=True):
        audio = path.relative_to(root).as_posix()
        try:
            token = load_token_file(path)  # weights_only=True inside
            check_metadata(token, audio)
        except TokenFileError as error:  # its message starts with the path: the report names it once
            report.fail(audio, str(error).removeprefix(f"{path}: ").removeprefix(f"{audio}: "), log)
            continue
        loaded[audio] = (path, token)
    return loaded


def check_metadata(token: TokenFile, where: str) -> None:
    """What `load_token_file` leaves to the reader: rates and a length the codes can hold."""
    if token.sample_rate != SAMPLE_RATE or token.frame_rate != FRAME_RATE:
        raise TokenFileError(f"{where}: sample rate {token.sample_rate} Hz / frame rate {token.frame_rate} Hz, "
                             f"expected {SAMPLE_RATE} / {FRAME_RATE}")
    if token.num_samples <= 0:
        raise TokenFileError(f"{where}: num_samples is {token.num_samples}")
    samples_per_frame = SAMPLE_RATE // FRAME_RATE
    if token.num_samples > token.n_frames * samples_per_frame:
        raise TokenFileError(f"{where}: num_samples {token.num_samples} is more than its {token.n_frames} "
                             f"frames hold ({token.n_frames * samples_per_frame})")


def keep_majority_layout(loaded: dict[str, tuple[Path, TokenFile]], report: StageReport,
                         log: logging.Logger) -> dict[str, tuple[Path, TokenFile]]:
    """Keep the files with the most common (Q, bandwidth); name the others as failed."""
    if not loaded:
        return {}
    layouts = Counter((token.n_codebooks, token.bandwidth) for _, token in loaded.values())
    order = list(dict.fromkeys((token.n_codebooks, token.bandwidth) for _, token in loaded.values()))
    majority = max(layouts, key=lambda layout: (layouts[layout], -order.index(layout)))  # ties: first seen
    q, bandwidth = majority
    if len(layouts) > 1:
        log.warning("token files mix layouts %s: keeping Q=%d (%g kbps), the most common",
                    dict(layouts), q, bandwidth)
    kept = {}
    for audio, (path, token) in loaded.items():
        if (token.n_codebooks, token.bandwidth) == majority:
            kept[audio] = (path, token)
        else:
            report.fail(audio, f"has Q={token.n_codebooks} ({token.bandwidth:g} kbps) but {layouts[majority]} of "
                               f"its siblings have Q={q} ({bandwidth:g} kbps); re-encode it with "
                               f"--bandwidth {bandwidth:g} --overwrite", log)
    report.details.update(codebooks=q, bandwidth=bandwidth)
    return kept


# ---- shifted variants ------------------------------------------------------------------------
def matching_variants(root: Path, paths: list[Path], kept: dict[str, tuple[Path, TokenFile]],
                      report: StageReport, log: logging.Logger) -> dict[str, list[str]]:
    """Each kept clip's usable variants (audio paths, by offset). A variant whose clip was left out or
    is missing, that cannot be read, or that differs from its clip, is named in the report and left out."""
    if not paths:
        return {}
    by_path = {path: audio for audio, (path, _) in kept.items()}
    found: dict[str, list[tuple[int, str]]] = {}
    for path in tqdm(paths, unit="file", desc=f"checking {report.artist}'s variants", dynamic_ncols=True):
        audio = path.relative_to(root).as_posix()
        clip_path, shift = parse_variant_path(path)
        clip_audio = by_path.get(clip_path)
        if clip_audio is None:
            reason = "was left out (see its reason)" if clip_path.is_file() else "does not exist"
            report.fail(audio, f"a shifted variant of {clip_path.relative_to(root).as_posix()}, which {reason}; "
                               "left out with it", log)
            continue
        try:
            variant = load_token_file(path)  # weights_only=True inside
            check_metadata(variant, audio)
            check_variant(variant, shift, kept[clip_audio][1], audio)
        except TokenFileError as error:
            report.fail(audio, str(error).removeprefix(f"{path}: ").removeprefix(f"{audio}: "), log)
            continue
        found.setdefault(clip_audio, []).append((shift, audio))
    return {clip: [audio for _, audio in sorted(variants)] for clip, variants in found.items()}


def check_variant(variant: TokenFile, shift: int, clip: TokenFile, where: str) -> None:
    """A variant must be its clip's music on another grid: one layout, codec, length and frame count."""
    if variant.shift_samples != shift:
        raise TokenFileError(f"{where}: records an offset of {variant.shift_samples} samples, its name says "
                             f"{shift}; re-run scripts/2_Tokenization.py with --shifts")
    ours = (variant.n_codebooks, variant.bandwidth, variant.codec, variant.n_frames, variant.num_samples)
    theirs = (clip.n_codebooks, clip.bandwidth, clip.codec, clip.n_frames, clip.num_samples)
    if ours != theirs:
        raise TokenFileError(f"{where}: Q={ours[0]} ({ours[1]:g} kbps, codec {ours[2]}, {ours[3]} frames, "
                             f"{ours[4]} samples) differs from its clip's Q={theirs[0]} ({theirs[1]:g} kbps, codec "
                             f"{theirs[2]}, {theirs[3]} frames, {theirs[4]} samples); re-run "
                             "scripts/2_Tokenization.py --overwrite with the clip's settings")


# ---- tracks and the split --------------------------------------------------------------------
def track_of(token_path: Path, token_dir: Path) -> str:
    """`encoded_tokens/<artist>/album/song_003.th` -> `album/song`: the raw file the clip was cut from."""
    relative = token_path.relative_to(token_dir).with_suffix("").as_posix()
    return CLIP_INDEX_SUFFIX.sub("", relative) or relative


def track_score(track: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per (seed, track): independent of the other tracks."""
    digest = hashlib.sha256(f"{seed}\0{track}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_tracks(tracks: list[str], valid_fraction: float, seed: int) -> dict[str, str]:
    """The `round(fraction x tracks)` tracks with the lowest scores go to `valid` (at least one when
    there are two or more tracks and the fraction is above 0; never all). Scores depend only on the
    track's name, so adding a track moves at most one other track across the boundary.
    """
    ordered = sorted(tracks, key=lambda track: (track_score(track, seed), track))
    n_valid = round(valid_fraction * len(tracks))
    if len(tracks) >= 2 and valid_fraction > 0:
        n_valid = min(max(n_valid, 1), len(tracks) - 1)
    else:
        n_valid = 0
    valid = set(ordered[:n_valid])
    return {track: "valid" if track in valid else "train" for track in tracks}


# ---- output ---------------------------------------------------------------------------------
def manifest_entry(audio: str, token: TokenFile, track: str, split: str, variants: tuple[str, ...] | list[str] = ()
                   ) -> dict:
    """The clip's manifest line; `variants` (its shifted encodings' paths) only when it has some."""
    median_scale = float(token.scales.median()) if token.scales is not None else None
    entry = {
        "audio": audio,
        "duration": round(token.duration, 6),
        "sample_rate": token.sample_rate,
        "frames": token.real_frames,  # the frames past the audio encode the codec's padding
        "codebooks": token.n_codebooks,
        "bandwidth": token.bandwidth,
        "codec": token.codec,
        "source": token.source,
        "track": track,
        "split": split,
        "median_scale": median_scale,
    }
    if variants:
        entry["variants"] = list(variants)
    return entry


def summarise(entries: list[dict], report: StageReport, log: logging.Logger) -> None:
    """Counts per split (tracks, clips, hours) into the log and the report."""
    for split in ("train", "valid"):
        chosen = [entry for entry in entries if entry["split"] == split]
        tracks = len({entry["track"] for entry in chosen})
        hours = sum(entry["duration"] for entry in chosen) / 3600
        report.counters.update({f"{split}_tracks": tracks, f"{split}_clips": len(chosen)})
        report.details[f"{split}_hours"] = round(hours, 4)
        log.info("%s: %d track(s), %d clip(s), %.2f h", split, tracks, len(chosen), hours)
    report.counters["tracks"] = len({entry["track"] for entry in entries})
    report.counters["clips"] = len(entries)
    variants = {split: sum(len(entry.get("variants", [])) for entry in entries if entry["split"] == split)
                for split in ("train", "valid")}
    if any(variants.values()):  # listed in the manifest; stage 4 trains on the train clips' variants only
        report.counters.update(train_variants=variants["train"], valid_variants=variants["valid"])
        log.info("shifted variants: %d of train clips (drawn in training), %d of valid clips (never used)",
                 variants["train"], variants["valid"])
    report.details["hours"] = round(sum(entry["duration"] for entry in entries) / 3600, 4)
    if report.counters["valid_clips"] == 0:
        log.warning("no validation clips: %s",
                    "only one track" if report.counters["tracks"] < 2 else "--valid-fraction is 0")


def warn_on_mixed_codecs(entries: list[dict], log: logging.Logger) -> None:
    codecs = Counter(entry["codec"] for entry in entries)
    if len(codecs) > 1:
        log.warning("token files come from different codecs %s: their codes do not mean the same sounds; "
                    "re-encode them with one --codec", dict(codecs))
    if any(codec.startswith("random") for codec in codecs):
        log.warning("tokens from an UNTRAINED (random) codec: fine for testing the pipeline, useless for music")


if __name__ == "__main__":
    sys.exit(run_main(main))
