#!/usr/bin/env python3
"""Stage 2: encode an artist's clips into Encodec tokens.

    data_processed/<artist>/<path>.wav  ->  encoded_tokens/<artist>/<path>.th

Each `.th` is the contract's token file (docs/contract.md, 'Token files'): int16 codes `[1, Q, T]`
with T = 150 x n_chunks, Encodec's per-chunk scales (needed to decode), and metadata.
Clips of equal length are encoded together in batches of `--batch-size`.

`--shifts K` encodes each clip K times, at sub-frame offsets spread over one 320-sample hop: the
variant at offset s drops the clip's first s samples and ends with s zeros (same length, same frames),
so Encodec sees the same music on another grid and writes other tokens. Offset 0 is the clip's own
`<path>.th`; offset s > 0 is `<path>.shift<s>.th`, recording `shift_samples` (docs/stage2.md).
A run given `--shifts` removes the variants of the offsets it does not make; a run without it
encodes the clips alone and leaves the variants there are alone.

Under `torchrun --nproc_per_node=K` each rank encodes its round-robin share of the sorted clip
list, so no file is written twice; no process group is needed. Every rank writes
`report.rank<k>.json`; the last rank to finish merges them into `report.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import threads  # noqa: E402
from pipeline.audio import AudioDecodeError, read_audio  # noqa: E402
from pipeline.cli import (StageError, StageReport, make_parser, positive_int, resolve_device,  # noqa: E402
                          run_main, setup_logging)
from pipeline.codec import Codec, CodecUnavailable, load_codec, parse_random_spec  # noqa: E402
from pipeline.contract import (BANDWIDTH_TO_Q, CHANNELS, DEFAULT_CODEC, MAX_SHIFTS, SAMPLE_RATE,  # noqa: E402
                               TokenFile, TokenFileError, load_token_file, parse_variant_path,
                               save_token_file, shift_offsets, variant_path)
from pipeline.dist import DistInfo, dist_info, shard  # noqa: E402
from pipeline.files import atomic_write_json, is_temporary, remove_stale_temporaries  # noqa: E402

STAGE = "stage2"
DEFAULT_BANDWIDTH = 6.0
STAGE1_REPORT = "report.json"  # stage 1's report, beside its clips in data_processed/<artist>/
GPU_BATCH_SIZE = 8  # --batch-size auto: batches on a GPU, one clip at a time on a CPU, where
# batching measured slower (docs/stage2.md: 4.1x vs 5.3x real time on 2 cores)


class ClipError(ValueError):
    """A clip that cannot be encoded; the message says why."""


@dataclass(frozen=True)
class Clip:
    path: Path  # the .wav clip
    output: Path  # its .th token file
    source: str  # the clip's path relative to the root (stored in the token file)
    num_samples: int = 0  # filled in by `probe_clip`
    shift: int = 0  # sub-frame offset in samples: 0 is the clip itself, > 0 a shifted variant

    @property
    def label(self) -> str:
        """How the report and the log name this encoding: the clip, and its offset for a variant."""
        return self.source if self.shift == 0 else f"{self.source} (shifted {self.shift} samples)"


# ---- command line ---------------------------------------------------------------------------
def parse_args(argv=None):
    parser = make_parser(
        "Stage 2: encode data_processed/<artist>/**/*.wav into Encodec tokens "
        "encoded_tokens/<artist>/**/*.th (codes + per-chunk scales).",
        epilog="Several processes: torchrun --nproc_per_node=K scripts/2_Tokenization.py --artist NAME")
    parser.add_argument("--codec", default=DEFAULT_CODEC,
                        help="Encodec 48 kHz weights: a hub id, a local folder saved with save_pretrained, "
                             "or 'random' / 'random:<seed>' (untrained, offline tests only: not music)")
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, choices=sorted(BANDWIDTH_TO_Q),
                        help="target bandwidth in kbps; codebooks Q = 2, 4, 8, 16 for 3, 6, 12, 24")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the codec runs; auto picks CUDA when PyTorch sees a GPU "
                             "(under torchrun each rank takes cuda:<LOCAL_RANK>)")
    parser.add_argument("--batch-size", type=batch_size_arg, default="auto",
                        help=f"clips of equal length encoded together in one forward pass; auto: "
                             f"{GPU_BATCH_SIZE} on a GPU, 1 on a CPU (where batching is slower)")
    parser.add_argument("--shifts", type=shifts_arg, default=None, metavar="K",
                        help="encode each clip at K sub-frame offsets round(k x 320 / K) samples, k = 0..K-1 "
                             "(1..320): more token sequences of the same music for training; offset s > 0 "
                             "is written to <clip>.shift<s>.th, and variants of offsets K does not make are "
                             "removed (--shifts 1 removes them all). Not given: the clips alone are encoded "
                             "and existing variants are left as they are")
    return parser.parse_args(argv)


def shifts_arg(text: str) -> int:
    shifts = positive_int(text)
    if shifts > MAX_SHIFTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SHIFTS} offsets fit in one {MAX_SHIFTS}-sample hop, "
                                         f"got {shifts}")
    return shifts


def batch_size_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = dist_info()
    label = f"{STAGE}[rank {info.rank}/{info.world_size}]" if info.is_distributed else STAGE
    log = setup_logging(args.log_level, label)
    threads.configure(log)  # only the cores other processes leave free
    report = tokenize_artist(args.root, args.artist, codec_spec=args.codec, bandwidth=args.bandwidth,
                             device=args.device, batch_size=args.batch_size, overwrite=args.overwrite,
                             info=info, log=log, shifts=args.shifts)
    return report.exit_code()


# ---- the stage, callable from tests with a ready codec ---------------------------------------
def tokenize_artist(root, artist: str, codec_spec: str = DEFAULT_CODEC, bandwidth: float = DEFAULT_BANDWIDTH,
                    device: str = "auto", batch_size: int | str = "auto", overwrite: bool = False,
                    info: DistInfo | None = None, log: logging.Logger | None = None,
                    codec: Codec | None = None, shifts: int | None = None) -> StageReport:
    """Encode this rank's share of the artist's clips (each at `shifts` offsets); write the report(s);
    return the report. `shifts` None: offset 0 alone, and the variants there are kept (1: removed).

    `codec`: an already-loaded codec (tests); otherwise `codec_spec` is loaded only if some clip
    still needs encoding, so a finished artist never touches the hub.
    """
    root, info = Path(root), info or DistInfo()
    log = log or logging.getLogger(f"pipeline.{STAGE}")
    clip_dir, token_dir = root / "data_processed" / artist, root / "encoded_tokens" / artist
    report = StageReport(STAGE, artist)
    codec_name = codec.name if codec is not None else expected_codec_name(codec_spec)
    offsets = shift_offsets(shifts or 1)
    report.details.update(codec=codec_name, bandwidth=float(bandwidth), rank=info.rank, world_size=info.world_size)
    if shifts is not None and shifts > 1:
        report.details.update(shifts=shifts, shift_samples=offsets)

    all_clips = find_clips(root, clip_dir, token_dir)
    clear_leftovers(token_dir, info, log)
    my_clips = shard(all_clips, info)  # a clip and its variants stay on one rank
    log.info("%d clip(s) for %s; this process takes %d", len(all_clips), artist, len(my_clips))
    if shifts is not None:
        remove_other_variants(token_dir, my_clips, offsets, log)

    pending = select_pending(with_variants(my_clips, offsets), bandwidth, codec_name, overwrite, report, log)
    if pending:
        codec = codec or open_codec(codec_spec, device, info, log)
        warn_if_untrained(codec, log)
        report.details["codec_pretrained"] = bool(codec.pretrained)
        report.details["batch_size"] = batch_size = resolve_batch_size(batch_size, codec)
        encode_clips(codec, pending, bandwidth, batch_size, report, log)
    write_reports(report, token_dir, info, log)
    log.info("%s", report.summary())
    return report


def clear_leftovers(token_dir: Path, info: DistInfo, log: logging.Logger) -> None:
    """Remove what an earlier, interrupted run left that would confuse this one."""
    if info.is_distributed:  # only this rank's old report: another rank may be writing temporaries now
        rank_report_path(token_dir, info.rank).unlink(missing_ok=True)
        return
    removed = remove_stale_temporaries(token_dir)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)


def expected_codec_name(spec: str) -> str:
    """The name a codec loaded from `spec` will carry (`random` -> `random:0`), without loading it."""
    try:
        seed = parse_random_spec(spec)
    except CodecUnavailable as error:
        raise StageError(str(error)) from None
    return f"random:{seed}" if seed is not None else spec


def open_codec(spec: str, device: str, info: DistInfo, log: logging.Logger) -> Codec:
    device = resolve_device(device)
    if device == "cuda" and info.is_distributed:
        device = f"cuda:{info.local_rank}"  # one GPU per rank
    log.info("loading codec %s on %s", spec, device)
    try:
        return load_codec(spec, device)
    except CodecUnavailable as error:
        raise StageError(str(error)) from None


def resolve_batch_size(batch_size: int | str, codec: Codec) -> int:
    if batch_size != "auto":
        return int(batch_size)
    return GPU_BATCH_SIZE if str(codec.device).startswith("cuda") else 1


def warn_if_untrained(codec: Codec, log: logging.Logger) -> None:
    if not codec.pretrained:
        log.warning("codec %s is UNTRAINED (random weights): these tokens are for testing the pipeline only; "
                    "a model trained on them learns noise, not music", codec.name)


# ---- finding work ---------------------------------------------------------------------------
def find_clips(root: Path, clip_dir: Path, token_dir: Path) -> list[Clip]:
    """Every finished `.wav` below `clip_dir`, sorted (the same list on every rank)."""
    if not clip_dir.is_dir():
        raise StageError(f"clip folder {clip_dir} does not exist: run scripts/1_audio_preprocessing.py first")
    paths = sorted(path for path in clip_dir.rglob("*.wav") if path.is_file() and not is_temporary(path))
    if not paths:
        raise StageError(no_clips_reason(clip_dir))
    return [Clip(path=path, output=(token_dir / path.relative_to(clip_dir)).with_suffix(".th"),
                 source=path.relative_to(root).as_posix()) for path in paths]


def no_clips_reason(clip_dir: Path, shown: int = 3) -> str:
    """Why `clip_dir` holds no clip, told from stage 1's report there when it has one: every file
    rejected (the first `shown` reasons), every file too short or silent, or clips removed since."""
    path = clip_dir / STAGE1_REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not isinstance(report, dict):
        return f"clip folder {clip_dir} holds no .wav clips: run scripts/1_audio_preprocessing.py first"
    failed, processed = report.get("failed") or [], (report.get("done") or 0) + (report.get("skipped") or 0)
    raw = f"raw_audio/{clip_dir.name}/"
    if failed and not processed:
        reasons = "; ".join(f"{item.get('path')}: {item.get('reason')}" for item in failed[:shown])
        more = f"; and {len(failed) - shown} more" if len(failed) > shown else ""
        return (f"clip folder {clip_dir} holds no .wav clips: stage 1 rejected every one of the {len(failed)} "
                f"audio file(s) in {raw} ({reasons}{more}). Every reason is in {path}: fix or replace the "
                f"files, then run scripts/1_audio_preprocessing.py again")
    tracks = (report.get("details") or {}).get("tracks") or {}
    listed = sum(int((track or {}).get("clips") or 0) for track in tracks.values())
    if processed and not listed:
        return (f"clip folder {clip_dir} holds no .wav clips: stage 1 processed {processed} file(s) of {raw} but "
                f"none gave a clip (each shorter than one clip, or silent; see {path}). Run stage 1 again with "
                f"--pad-tail or a shorter --clip-seconds")
    return (f"clip folder {clip_dir} holds no .wav clips, although stage 1's report {path} lists {listed}: they "
            f"were removed since; run scripts/1_audio_preprocessing.py --overwrite again")


def with_variants(clips: list[Clip], offsets: list[int]) -> list[Clip]:
    """Each clip followed by its shifted variants (offset 0 is the clip itself: `[0]` gives `clips`)."""
    return [Clip(clip.path, variant_path(clip.output, shift), clip.source, shift=shift)
            for clip in clips for shift in offsets]


def remove_other_variants(token_dir: Path, clips: list[Clip], offsets: list[int], log: logging.Logger) -> None:
    """Delete the variants of `clips` whose offset this run does not make (an earlier, other --shifts),
    so the token folder holds what this run asked for. Variants of clips no longer there are left alone."""
    if not token_dir.is_dir():
        return
    outputs, wanted = {clip.output for clip in clips}, set(offsets)
    removed = 0
    for path in sorted(token_dir.rglob("*.shift*.th")):
        parsed = parse_variant_path(path)
        if parsed is None or is_temporary(path) or not path.is_file():
            continue
        clip_output, shift = parsed
        if clip_output in outputs and shift not in wanted:
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d shifted variant(s) of offsets this run's --shifts does not make", removed)


def select_pending(clips: list[Clip], bandwidth: float, codec_name: str, overwrite: bool,
                   report: StageReport, log: logging.Logger) -> list[Clip]:
    """Drop finished clips (unless --overwrite) and clips that are not 48 kHz stereo; probe the rest."""
    pending = []
    for clip in clips:
        if not overwrite and is_finished(clip, bandwidth, codec_name, log):
            report.skipped.append(clip.label)
            continue
        try:
            pending.append(probe_clip(clip))
        except ClipError as error:
            report.fail(clip.label, str(error), log)
    if report.skipped:
        log.info("%d clip(s) or shifted variant(s) already encoded: skipped (--overwrite redoes them)",
                 len(report.skipped))
    return pending


def is_finished(clip: Clip, bandwidth: float, codec_name: str, log: logging.Logger) -> bool:
    """A readable token file of the clip's offset exists. One made with other settings is kept, with a warning."""
    if not clip.output.is_file():
        return False
    try:
        existing = load_token_file(clip.output)
    except TokenFileError as error:
        log.warning("%s; encoding it again", error)
        return False
    if existing.shift_samples != clip.shift:
        log.warning("%s: records an offset of %d samples, its name says %d; encoding it again", clip.output,
                    existing.shift_samples, clip.shift)
        return False
    if existing.bandwidth != float(bandwidth) or existing.codec != codec_name:
        log.warning("%s: kept as is, although it was encoded with %s at %g kbps (this run: %s at %g kbps); "
                    "pass --overwrite to re-encode", clip.output, existing.codec, existing.bandwidth,
                    codec_name, bandwidth)
    return True


def probe_clip(clip: Clip) -> Clip:
    """Check the header: 48 kHz, stereo, not empty. Returns the clip with its length."""
    try:
        header = sf.info(str(clip.path))
    except (sf.LibsndfileError, RuntimeError) as error:
        raise ClipError(f"cannot read the clip ({error})") from None
    if header.samplerate != SAMPLE_RATE:
        raise ClipError(f"sample rate is {header.samplerate} Hz, expected {SAMPLE_RATE} Hz (re-run stage 1)")
    if header.channels != CHANNELS:
        raise ClipError(f"has {header.channels} channel(s), expected {CHANNELS} (re-run stage 1)")
    if header.frames == 0:
        raise ClipError("holds no samples")
    return Clip(clip.path, clip.output, clip.source, num_samples=int(header.frames), shift=clip.shift)


def make_batches(clips: list[Clip], batch_size: int) -> list[list[Clip]]:
    """Group clips of equal length (one tensor per batch), at most `batch_size` each, order kept."""
    by_length: dict[int, list[Clip]] = defaultdict(list)
    for clip in clips:
        by_length[clip.num_samples].append(clip)
    return [group[start:start + batch_size] for group in by_length.values()
            for start in range(0, len(group), batch_size)]


# ---- encoding -------------------------------------------------------------------------------
def read_clip(clip: Clip) -> torch.Tensor:
    """The clip's samples as float32 `[2, S]`; a variant's start `clip.shift` samples later, zeros at its end."""
    try:
        data, _ = read_audio(clip.path)  # [S, 2]
    except AudioDecodeError as error:  # its message starts with the path: the report names it once
        raise ClipError(str(error).removeprefix(f"{clip.path}: ")) from None
    if data.shape != (clip.num_samples, CHANNELS):
        raise ClipError(f"decoded shape {list(data.shape)} differs from its header "
                        f"({clip.num_samples} x {CHANNELS}); the file may be truncated")
    if not np.isfinite(data).all():
        raise ClipError("holds NaN or infinite samples")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # [S, 2] -> [2, S]
    return shifted(wave, clip.shift) if clip.shift else wave


def shifted(wave: torch.Tensor, shift: int) -> torch.Tensor:
    """`wave` `[2, S]` started `shift` samples later and padded with as many zeros: still `[2, S]`, so the
    variant has the clip's frames, frame t covering the clip's music from `t x 320 + shift` on."""
    if not 0 < shift < wave.shape[1]:
        raise ClipError(f"cannot shift a clip of {wave.shape[1]} samples by {shift}")
    return torch.cat([wave[:, shift:], wave.new_zeros(wave.shape[0], shift)], dim=1)  # [2, S - s] + [2, s]


def encode_clips(codec: Codec, clips: list[Clip], bandwidth: float, batch_size: int,
                 report: StageReport, log: logging.Logger) -> None:
    started, audio_seconds = time.perf_counter(), 0.0
    with tqdm(total=len(clips), unit="clip", desc=f"encoding {report.artist}", dynamic_ncols=True) as bar:
        for batch in make_batches(clips, batch_size):
            audio_seconds += encode_batch(codec, batch, bandwidth, report, log)
            bar.update(len(batch))
    elapsed = time.perf_counter() - started
    report.details.update(audio_seconds=round(audio_seconds, 3), encode_seconds=round(elapsed, 3),
                          realtime_factor=round(audio_seconds / elapsed, 2) if elapsed > 0 else None)
    log.info("encoded %.1f s of audio in %.1f s (%.1fx real time)", audio_seconds, elapsed,
             audio_seconds / max(elapsed, 1e-9))


def encode_batch(codec: Codec, batch: list[Clip], bandwidth: float, report: StageReport,
                 log: logging.Logger) -> float:
    """Encode and save one batch of equal-length clips; returns the seconds of audio written."""
    readable, waves = [], []
    for clip in batch:
        try:
            waves.append(read_clip(clip))
            readable.append(clip)
        except ClipError as error:
            report.fail(clip.label, str(error), log)
    if not readable:
        return 0.0
    try:
        codes, scales = codec.encode(torch.stack(waves), bandwidth)  # B x [2, S] -> [B, Q, T], [B, n_chunks]
    except RuntimeError as error:  # e.g. out of GPU memory: retry the clips one at a time
        if len(readable) == 1:
            report.fail(readable[0].label, f"the codec failed: {error}", log)
            return 0.0
        log.warning("a batch of %d clips failed (%s): encoding them one at a time", len(readable), error)
        return sum(encode_batch(codec, [clip], bandwidth, report, log) for clip in readable)
    for index, clip in enumerate(readable):
        # clone: a slice shares the batch's storage, and torch.save would write all of it
        token_file = TokenFile(codes=codes[index:index + 1].clone(),  # [B, Q, T] -> [1, Q, T]
                               scales=scales[index].clone(),  # [B, n_chunks] -> [n_chunks]
                               num_samples=clip.num_samples, bandwidth=float(bandwidth), codec=codec.name,
                               source=clip.source, shift_samples=clip.shift)
        save_token_file(token_file, clip.output)
        report.done.append(clip.label)
    return len(readable) * readable[0].num_samples / SAMPLE_RATE


# ---- reports --------------------------------------------------------------------------------
def write_reports(report: StageReport, token_dir: Path, info: DistInfo, log: logging.Logger) -> None:
    """One process: `report.json`. Under torchrun: `report.rank<k>.json`, merged by the last rank done."""
    if not info.is_distributed:
        report.write(token_dir / "report.json")
        return
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    rank_report = dict(report.as_dict(), run_id=run_id, written=list(report.done))  # names, to audit the shares
    atomic_write_json(rank_report, rank_report_path(token_dir, info.rank))
    # Each rank lists the rank reports after writing its own, so the last one to list sees them all.
    reports = [read_rank_report(rank_report_path(token_dir, rank)) for rank in range(info.world_size)]
    if all(is_from_run(other, run_id, info.world_size) for other in reports):
        atomic_write_json(merge_rank_reports(reports), token_dir / "report.json")
        log.info("all %d ranks finished: wrote %s", info.world_size, token_dir / "report.json")


def is_from_run(rank_report: dict | None, run_id: str, world_size: int) -> bool:
    return (rank_report is not None and rank_report.get("run_id") == run_id
            and rank_report.get("details", {}).get("world_size") == world_size)


def rank_report_path(token_dir: Path, rank: int) -> Path:
    return token_dir / f"report.rank{rank}.json"


def read_rank_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def merge_rank_reports(reports: list[dict]) -> dict:
    """Sum the counts of every rank's report; keep each rank's details."""
    counters: dict = defaultdict(int)
    for report in reports:
        for key, value in report["counters"].items():
            counters[key] += value
    failed = [item for report in reports for item in report["failed"]]
    return {
        "stage": reports[0]["stage"],
        "artist": reports[0]["artist"],
        "done": sum(report["done"] for report in reports),
        "skipped": sum(report["skipped"] for report in reports),
        "failed": failed,
        "counters": dict(counters),
        "details": {"world_size": len(reports), "run_id": reports[0]["run_id"],
                    "ranks": [report["details"] for report in reports]},
        "elapsed_s": max(report["elapsed_s"] for report in reports),
        "exit_status": 1 if failed else 0,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
