#!/usr/bin/env python3
"""Stage 1: turn an artist's songs into uniform, loudness-normalised 48 kHz stereo clips.

raw_audio/<artist>/**/<track>.<ext>  ->  data_processed/<artist>/**/<track>_<iii>.wav

Each track is read twice, a block at a time, so memory does not grow with its length:
pass 1 measures BS.1770 loudness, the peak and where the music starts and ends; pass 2
resamples again (soxr gives identical samples both times), applies the gain and writes clips.
A track is finished when its completion marker (data_processed/<artist>/.stage1/<track>.json)
exists: re-runs skip it, and a track interrupted before its marker is redone from scratch.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.audio import (  # noqa: E402
    DEFAULT_TARGET_LUFS, PEAK_CEILING_DBFS, AudioDecodeError, LoudnessMeter, normalisation_gain, split_windows,
    stream_stereo)
from pipeline.cli import (  # noqa: E402
    EXIT_USAGE, StageError, StageReport, make_parser, positive_float, positive_int, run_main, setup_logging)
from pipeline.contract import CHANNELS, SAMPLE_RATE  # noqa: E402
from pipeline.files import atomic_path, atomic_write_json, is_temporary, remove_stale_temporaries  # noqa: E402

STAGE = "stage1"
FADE_SECONDS = 0.02  # linear fade in and out of every clip (docs/contract.md, 'Folders')
TRIM_WINDOW = SAMPLE_RATE // 100  # leading/trailing silence is trimmed in 10 ms steps
MARKER_DIR = ".stage1"  # per-track completion markers, hidden from the clip scanners of stage 2
MARKER_VERSION = 1
REPORT_NAME = "report.json"
PCM_FULL_SCALE = 32767  # int16 output; see `quantise`
# Extensions tried with libsndfile; other files (cover.jpg, notes.txt) are counted as ignored.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf",
    ".w64", ".rf64", ".voc", ".sf", ".ircam", ".nist", ".sph", ".paf", ".svx", ".8svx", ".avr", ".htk",
    ".mat4", ".mat5", ".pvf", ".sds", ".sd2", ".xi", ".wve"})


@dataclass(frozen=True)
class ClipSettings:
    """Everything that shapes a track's clips; a marker written under other settings is stale."""

    target_lufs: float = DEFAULT_TARGET_LUFS
    silence_db: float = -45.0
    trim_db: float = -60.0
    clip_seconds: float = 60.0
    pad_tail: bool = False

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * SAMPLE_RATE))

    @property
    def fade_samples(self) -> int:
        return int(round(FADE_SECONDS * SAMPLE_RATE))


@dataclass(frozen=True)
class Track:
    """One input file and where its clips go (`stem` is its path below the artist folder, sans extension)."""

    source: Path
    relative: PurePosixPath

    @property
    def stem(self) -> PurePosixPath:
        return self.relative.parent / self.relative.stem


@dataclass
class TrackResult:
    """What processing one track did; returned from worker processes to the main one."""

    track: str
    failed: str | None = None
    skipped: bool = False
    info: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)  # (level, text) for the main process to log


# ---------------------------------------------------------------- finding tracks


def display(path) -> str:
    """A path as one printable line of UTF-8: undecodable bytes and control characters escaped."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def is_hidden(relative: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def find_tracks(raw_dir: Path) -> tuple[list[Track], int]:
    """Every candidate audio file below `raw_dir` (sorted), and how many other files were ignored.

    Hidden files and folders (`.DS_Store`, macOS `._song.mp3`, our temporaries) are never tried.
    Anything named like audio is returned even when it is a folder or a broken link, so that
    it is reported rather than silently passed over.
    """
    tracks, ignored = [], 0
    for path in sorted(raw_dir.rglob("*")):
        relative = PurePosixPath(path.relative_to(raw_dir).as_posix())
        if is_hidden(relative) or is_temporary(path):
            continue
        if path.suffix.lower() in AUDIO_EXTENSIONS:
            tracks.append(Track(path, relative))
        elif path.is_file():
            ignored += 1
    return tracks, ignored


def split_name_clashes(tracks: list[Track]) -> tuple[list[Track], list[tuple[Track, str]]]:
    """Tracks whose clip names would collide (song.mp3 beside song.flac): the first keeps the name."""
    owners: dict[PurePosixPath, Track] = {}
    kept, clashes = [], []
    for track in tracks:
        owner = owners.setdefault(track.stem, track)
        if owner is track:
            kept.append(track)
        else:
            clashes.append((track, f"its clips would have the same names as those of {display(owner.relative)!r}; "
                                   "rename one of the two to keep both"))
    return kept, clashes


# ---------------------------------------------------------------- output paths and markers


def clip_path(out_dir: Path, track: Track, index: int) -> Path:
    return out_dir / f"{track.stem}_{index:03d}.wav"


def marker_path(out_dir: Path, track: Track) -> Path:
    return out_dir / MARKER_DIR / f"{track.stem}.json"


def existing_clips(out_dir: Path, track: Track) -> list[Path]:
    """Clip files of this track already on disk (`<stem>_<digits>.wav`; another track's never match)."""
    folder = (out_dir / track.stem).parent
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(track.stem.name) + r"_\d{3,}\.wav")
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name) and path.is_file())


def source_signature(track: Track) -> dict:
    stat = track.source.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_finished_marker(out_dir: Path, track: Track, settings: ClipSettings) -> dict | None:
    """The track's marker if it proves the clips on disk are complete and current, else None."""
    path = marker_path(out_dir, track)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        current = (marker["version"] == MARKER_VERSION and marker["settings"] == asdict(settings)
                   and marker["source"] == source_signature(track))
        clips_present = all(clip_path(out_dir, track, index).is_file() for index in marker["clip_indices"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if current and clips_present else None


# ---------------------------------------------------------------- pass 1: measure


@dataclass
class TrackScan:
    """Pass 1's findings on the 48 kHz stereo stream of a track."""

    n_samples: int
    loudness: float  # LUFS, -inf when silent or shorter than 400 ms
    peak: float  # largest |sample| before gain
    window_peaks: np.ndarray  # [n_samples // TRIM_WINDOW (+1)] largest |sample| per 10 ms


def scan_track(path: Path) -> TrackScan:
    meter = LoudnessMeter(SAMPLE_RATE)
    carry = np.zeros((0, CHANNELS), dtype=np.float32)
    window_peaks, n_samples, peak = [], 0, 0.0
    for block in stream_stereo(path):  # [n, 2] at 48 kHz
        block_peak = float(np.abs(block).max(initial=0.0))
        if not math.isfinite(block_peak):  # finite input that overflows float32 in the resampler (|x| ~ 3e38)
            raise AudioDecodeError(path, "samples too large to process: they overflow when resampled to 48 kHz")
        peak = max(peak, block_peak)
        meter.add(block)
        windows, carry = split_windows(carry, block, TRIM_WINDOW)
        window_peaks += [np.abs(window).max(axis=(1, 2), initial=0.0) for window in windows]  # [k, W, 2] -> [k]
        n_samples += block.shape[0]
    if carry.shape[0]:
        window_peaks.append(np.abs(carry).max(keepdims=True).reshape(1))  # the last, partial window
    peaks = np.concatenate(window_peaks) if window_peaks else np.zeros(0, dtype=np.float32)
    return TrackScan(n_samples, meter.integrated(), peak, peaks)


def trim_bounds(scan: TrackScan, gain: float, trim_db: float) -> tuple[int, int]:
    """[start, end) samples between the first and last 10 ms whose peak after gain reaches `trim_db`."""
    threshold = 10 ** (trim_db / 20) / gain
    loud = np.flatnonzero(scan.window_peaks >= threshold)
    if loud.size == 0:
        return 0, 0
    return int(loud[0]) * TRIM_WINDOW, min(scan.n_samples, (int(loud[-1]) + 1) * TRIM_WINDOW)


# ---------------------------------------------------------------- pass 2: write clips


def linear_fade(length: int) -> np.ndarray:
    """`[length, 1]` ramp 0, 1/length, ..., (length-1)/length: the first sample of a clip is silent."""
    return (np.arange(length, dtype=np.float32) / length)[:, None]


def apply_fades(clip: np.ndarray, content: int, fade: int) -> None:
    """Fade in the start and fade out the end of `clip[:content]` (`[n, 2]`) in place, linearly."""
    fade = min(fade, content // 2)
    if fade:
        ramp = linear_fade(fade)  # [fade, 1]
        clip[:fade] *= ramp
        clip[content - fade:content] *= ramp[::-1]


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level over all samples and channels; einsum sums without a squared copy of a 60 s clip."""
    mean_square = float(np.einsum("nc,nc->", samples, samples)) / samples.size if samples.size else 0.0
    return 10 * math.log10(mean_square) if mean_square > 0 else float("-inf")


def quantise(clip: np.ndarray) -> np.ndarray:
    """float `[n, 2]` -> int16 by plain rounding (no dither: byte-identical on every run); overwrites `clip`.

    16-bit: the clips are normalised to -20 LUFS with a -1 dBFS peak cap, so 16 bits leave
    ~75 dB between the music and the rounding noise, far more than the codec keeps, at half
    the disk of float32. The clip to the int16 range never engages below the peak cap.
    """
    np.multiply(clip, PCM_FULL_SCALE, out=clip)
    np.rint(clip, out=clip)
    np.clip(clip, -PCM_FULL_SCALE - 1, PCM_FULL_SCALE, out=clip)
    return clip.astype(np.int16)


def iter_trimmed(path: Path, start: int, end: int):
    """The 48 kHz stream of `path` restricted to samples [start, end), as `[n, 2]` blocks."""
    position = 0
    for block in stream_stereo(path):  # [n, 2]
        low, high = max(start - position, 0), min(end - position, block.shape[0])
        position += block.shape[0]
        if high > low:
            yield block[low:high]
        if position >= end:
            return


def iter_clips(path: Path, start: int, end: int, clip_samples: int, pad_tail: bool):
    """Yield (`[clip_samples, 2]` float32, content length) for each clip of [start, end)."""
    buffer = np.zeros((clip_samples, CHANNELS), dtype=np.float32)
    filled = 0
    for block in iter_trimmed(path, start, end):
        while block.shape[0]:
            take = min(clip_samples - filled, block.shape[0])
            buffer[filled:filled + take] = block[:take]
            filled, block = filled + take, block[take:]
            if filled == clip_samples:
                yield buffer, clip_samples
                filled = 0
    if filled and pad_tail:
        buffer[filled:] = 0.0
        yield buffer, filled


def write_clip(samples: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        sf.write(os.fsencode(tmp), quantise(samples), SAMPLE_RATE, subtype="PCM_16", format="WAV")


def write_clips(track: Track, out_dir: Path, start: int, end: int, gain: float, settings: ClipSettings,
                info: dict) -> list[int]:
    """Pass 2: cut [start, end) into clips, gain, fade, drop silent ones, write the rest; return their indices."""
    written = []
    spans = iter_clips(track.source, start, end, settings.clip_samples, settings.pad_tail)
    for index, (clip, content) in enumerate(spans):  # the clip buffer is reused: work in place
        clip *= np.float32(gain)
        if rms_dbfs(clip[:content]) < settings.silence_db:
            info["silent_clips_dropped"] += 1
            continue
        apply_fades(clip, content, settings.fade_samples)
        write_clip(clip, clip_path(out_dir, track, index))
        written.append(index)
    return written


# ---------------------------------------------------------------- one track, start to end


def plan_clips(trimmed: int, settings: ClipSettings) -> tuple[int, int]:
    """(clips the trimmed track yields, samples of its tail) for `trimmed` samples."""
    whole, tail = divmod(trimmed, settings.clip_samples)
    return whole + (1 if tail and settings.pad_tail else 0), tail


def describe(scan: TrackScan, gain: float, bounds: tuple[int, int], settings: ClipSettings) -> dict:
    """The per-track figures of the marker and report.json."""
    start, end = bounds
    _, tail = plan_clips(end - start, settings)
    known = math.isfinite(scan.loudness) and scan.peak > 0
    uncapped_gain = 10 ** ((settings.target_lufs - scan.loudness) / 20) if known else 1.0
    return {
        "duration_s": round(scan.n_samples / SAMPLE_RATE, 3),
        "loudness_lufs": round(scan.loudness, 2) if math.isfinite(scan.loudness) else None,
        "peak_dbfs": round(20 * math.log10(scan.peak), 2) if scan.peak > 0 else None,
        "gain_db": round(20 * math.log10(gain), 2),
        "gain_capped_by_peak": gain < uncapped_gain,
        "trimmed_s": [round(start / SAMPLE_RATE, 3), round(end / SAMPLE_RATE, 3)],
        "silent_clips_dropped": 0,
        "tail_dropped_s": round(tail / SAMPLE_RATE, 3) if not settings.pad_tail else 0.0,
        "tail_padded_s": round(tail / SAMPLE_RATE, 3) if settings.pad_tail else 0.0,
    }


def why_no_clip(track: Track, bounds: tuple[int, int], settings: ClipSettings) -> str:
    start, end = bounds
    if end <= start:
        return (f"{display(track.relative)}: silent (nothing above {settings.trim_db:g} dBFS after normalisation): "
                "no clip")
    return (f"{display(track.relative)}: {(end - start) / SAMPLE_RATE:.2f} s after trimming silence, shorter than "
            f"one {settings.clip_seconds:g} s clip: no clip (use --pad-tail or a shorter --clip-seconds to keep it)")


def condition_track(track: Track, out_dir: Path, settings: ClipSettings, result: TrackResult) -> dict:
    """Both passes for one track; returns the marker contents."""
    scan = scan_track(track.source)  # first: it names what is wrong with a bad file
    signature = source_signature(track)  # before pass 2: a file replaced meanwhile is redone next run
    gain = normalisation_gain(scan.loudness, scan.peak, settings.target_lufs)
    start, end = trim_bounds(scan, gain, settings.trim_db)
    info = describe(scan, gain, (start, end), settings)
    n_clips, _ = plan_clips(end - start, settings)
    if n_clips == 0:
        result.messages.append(("WARNING", why_no_clip(track, (start, end), settings)))
    clip_indices = write_clips(track, out_dir, start, end, gain, settings, info) if n_clips else []
    info["clips"] = len(clip_indices)
    return {"version": MARKER_VERSION, "track": display(track.relative), "settings": asdict(settings),
            "source": signature, "clip_indices": clip_indices, **info}


def process_track(track: Track, out_dir: Path, settings: ClipSettings, overwrite: bool) -> TrackResult:
    """Skip a finished track, else clear its leftovers and condition it. Runs in worker processes."""
    result = TrackResult(track=display(track.relative))
    marker = None if overwrite else read_finished_marker(out_dir, track, settings)
    if marker is not None:
        result.skipped, result.info = True, marker
        return result
    try:
        marker_path(out_dir, track).unlink(missing_ok=True)  # first: a crash below leaves the track unfinished
        for stale in existing_clips(out_dir, track):
            stale.unlink()
        marker = condition_track(track, out_dir, settings, result)
        atomic_write_json(marker, marker_path(out_dir, track))
    except AudioDecodeError as error:
        result.failed = error.reason
    except OSError as error:  # unreadable source, full disk, a name the file system refuses
        result.failed = f"{type(error).__name__}: {error.strerror or error}"
    except (RuntimeError, ValueError) as error:  # a decoder failure libsndfile did not announce as such
        result.failed = f"unexpected {type(error).__name__}: {error}"
    if result.failed:
        for partial in existing_clips(out_dir, track):  # no clips without a marker: the set stays consistent
            partial.unlink()
    else:
        result.info = marker
    return result


# ---------------------------------------------------------------- the stage


def build_parser():
    parser = make_parser(
        "Stage 1: decode every song of raw_audio/<artist>/ (any format libsndfile reads), convert it to "
        "48 kHz stereo, normalise its loudness, trim leading and trailing silence and cut it into uniform "
        "clips with 20 ms fades: data_processed/<artist>/<track path>_<iii>.wav.",
        epilog="Example: python scripts/1_audio_preprocessing.py --artist 'Some Band' --clip-seconds 30 --workers 2")
    parser.add_argument("--target-lufs", type=float, default=DEFAULT_TARGET_LUFS,
                        help="loudness every track is normalised to (ITU-R BS.1770 integrated, LUFS); the gain is "
                             f"capped so that no sample exceeds {PEAK_CEILING_DBFS:g} dBFS")
    parser.add_argument("--clip-seconds", type=positive_float, default=60.0,
                        help="length of every clip in seconds (at least 0.05)")
    parser.add_argument("--silence-db", type=float, default=-45.0,
                        help="a clip whose RMS level (dBFS, after normalisation) is below this is dropped and counted")
    parser.add_argument("--trim-db", type=float, default=-60.0,
                        help="leading and trailing audio whose 10 ms peaks stay below this level (dBFS, after "
                             "normalisation) is trimmed before cutting clips")
    parser.add_argument("--pad-tail", action="store_true",
                        help="pad the last partial clip (and a track shorter than one clip) with silence to a full "
                             "clip instead of dropping it")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="tracks processed in parallel by separate processes; the clips are byte-identical "
                             "whatever the number")
    return parser


def parse_settings(parser, args) -> ClipSettings:
    if not -70.0 <= args.target_lufs <= 0.0:
        parser.error(f"--target-lufs {args.target_lufs:g} must lie between -70 and 0 LUFS")
    for name in ("silence_db", "trim_db"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a finite level at or below 0 dBFS")
    if args.clip_seconds < 0.05 or not math.isfinite(args.clip_seconds):
        parser.error(f"--clip-seconds {args.clip_seconds:g} is too short: clips need at least 0.05 s for their fades")
    return ClipSettings(target_lufs=args.target_lufs, silence_db=args.silence_db, trim_db=args.trim_db,
                        clip_seconds=args.clip_seconds, pad_tail=args.pad_tail)


def run_tracks(tracks: list[Track], out_dir: Path, settings: ClipSettings, overwrite: bool, workers: int):
    """Yield each track's TrackResult as it finishes (in any order), under a progress bar over files."""
    with tqdm(total=len(tracks), unit="file", desc="stage 1", disable=None) as bar:
        if workers == 1:
            for track in tracks:
                yield process_track(track, out_dir, settings, overwrite)
                bar.update()
            return
        # fork on Linux: the workers inherit the loaded modules, also when main() runs inside pytest
        context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(process_track, track, out_dir, settings, overwrite) for track in tracks]
            try:
                for future in futures:  # submission order: the log reads the same for every --workers
                    yield future.result()
                    bar.update()
            except BaseException:  # Ctrl-C, SIGTERM or a failure: finish the running tracks, start no other
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def record(report: StageReport, result: TrackResult, log) -> None:
    for level, text in result.messages:
        log.log(getattr(logging, level), "%s", text)
    if result.failed:
        report.fail(result.track, result.failed, log)
        return
    (report.skipped if result.skipped else report.done).append(result.track)
    info = result.info
    report.details.setdefault("tracks", {})[result.track] = {
        key: info.get(key) for key in ("clips", "gain_db", "gain_capped_by_peak", "loudness_lufs", "peak_dbfs",
                                       "duration_s", "trimmed_s", "silent_clips_dropped", "tail_dropped_s",
                                       "tail_padded_s")}
    if not result.skipped:
        report.count("clips_written", info["clips"])
        report.count("silent_clips_dropped", info["silent_clips_dropped"])
        report.count("tails_dropped", int(info["tail_dropped_s"] > 0))
        report.count("tails_padded", int(info["tail_padded_s"] > 0))
        report.count("tracks_without_clips", int(info["clips"] == 0))
        log.debug("%s: %d clips, gain %+.2f dB", result.track, info["clips"], info["gain_db"])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = parse_settings(parser, args)
    log = setup_logging(args.log_level, STAGE)
    raw_dir = args.root / "raw_audio" / args.artist
    out_dir = args.root / "data_processed" / args.artist
    if not raw_dir.is_dir():
        raise StageError(f"no input folder {raw_dir}: put the artist's songs in raw_audio/{args.artist}/")
    candidates, ignored = find_tracks(raw_dir)
    if not candidates:
        raise StageError(f"{raw_dir} holds no audio files (extensions tried: {', '.join(sorted(AUDIO_EXTENSIONS))})")
    tracks, clashes = split_name_clashes(candidates)
    report = StageReport(stage=STAGE, artist=args.artist)
    report.details["settings"] = asdict(settings)
    report.count("ignored_non_audio_files", ignored)
    report.count("stale_temporaries_removed", remove_stale_temporaries(out_dir))
    for track, reason in clashes:
        report.fail(display(track.relative), reason, log)
    log.info("%d audio files in %s (%d other files ignored), %d workers", len(candidates), raw_dir, ignored,
             args.workers)
    for result in run_tracks(tracks, out_dir, settings, args.overwrite, args.workers):
        record(report, result, log)
    rejected_all = bool(report.failed) and not report.done and not report.skipped
    exit_code = EXIT_USAGE if rejected_all else report.exit_code()  # nothing usable: the run failed
    atomic_write_json({**report.as_dict(), "exit_status": exit_code}, out_dir / REPORT_NAME)
    log.info("%s; report: %s", report.summary(), out_dir / REPORT_NAME)
    if rejected_all:
        log.error("every one of the %d audio files of %r was rejected (reasons above and in %s): "
                  "there is nothing for stage 2", len(report.failed), args.artist, out_dir / REPORT_NAME)
    return exit_code


if __name__ == "__main__":
    sys.exit(run_main(main))
