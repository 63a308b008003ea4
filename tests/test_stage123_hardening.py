"""Hardening of stages 1-3: odd inputs, extreme audio, untrusted files, SIGINT/SIGTERM.

Only what the stage tests do not already show is here; HARDENING.md maps every
hardening case for these stages to the test that shows it, here or in the stage's own file.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import SCRIPTS, finished_files, sine_tone
from pipeline.contract import TokenFile, load_token_file, save_token_file
from pipeline.files import is_temporary
from pipeline.manifest import manifest_path

ARTIST = "Odd Band"
CEILING_PCM = round(10 ** (-1 / 20) * 32767) + 1  # the -1 dBFS cap in int16 steps, one step of rounding
LONG_NAME = "a" * 196 + ".wav"  # 200 characters: its clips are 204, under the 255 of most file systems
TOO_LONG_NAME = "b" * 250 + ".wav"  # 254 characters: the file exists, its clip names (258) cannot


def write(path: Path, data, rate: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kwargs)
    return path


def cut(path: Path, share: float) -> None:
    """Keep the first `share` of the file's bytes, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * share)])


def noise(seconds: float, rate: int, channels: int, level: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal((int(round(seconds * rate)), channels))).astype(np.float32)


# ---- stage 1: one run over odd files ------------------------------------------------------------
BAD_FILES = {  # file -> words its reason must contain
    "loop one.wav": "symbolic link loop",
    "loop two.wav": "symbolic link loop",
    "cut.flac": "decoding failed part-way",
    "cut too.mp3": "truncated",
    "picture.flac": "cannot decode",
    "photo.mp3": "cannot decode audio (not a recognised audio format)",
    "nan.wav": "NaN or infinite",
    "inf.wav": "NaN or infinite",
    "overflow.wav": "overflow when resampled",
    "overflow 6 channels.wav": "overflow when its 6 channels are mixed to stereo",
    TOO_LONG_NAME: "File name too long",
}
GOOD_FILES = {  # file -> clips expected (1 s clips)
    "phone 8k mono.wav": 2,
    "surround 96k 24-bit.wav": 2,
    "studio 192k.wav": 2,
    "what's this? [demo] *final* .wav": 2,
    "ünïcødé 音楽 track.flac": 2,
    LONG_NAME: 2,
    "one sample.wav": 0,
}


def short_id(name: str) -> str:
    return name if len(name) < 40 else f"{len(name)}-character name"


def make_odd_inputs(raw: Path) -> None:
    tone = sine_tone(2.0, 44_100)
    for name in ("cut.flac", "cut too.mp3"):
        write(raw / name, tone, 44_100, format=name[-4:].lstrip(".").upper())
        cut(raw / name, 0.6)
    (raw / "picture.flac").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    (raw / "photo.mp3").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 40)
    (raw / "loop one.wav").symlink_to("loop two.wav")
    (raw / "loop two.wav").symlink_to("loop one.wav")
    (raw / "again").symlink_to(".", target_is_directory=True)  # a folder loop: the scan must not follow it
    for name, poison in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        data = sine_tone(2.0)
        data[48_000, 1] = poison
        write(raw / name, data, 48_000, subtype="FLOAT")
    huge = np.full((44_100, 2), 3.4e38, dtype=np.float32)  # finite, but the resampler's ringing overflows
    huge[::7] *= -1
    write(raw / "overflow.wav", huge, 44_100, subtype="FLOAT")
    write(raw / "overflow 6 channels.wav", np.full((48_000, 6), 3.4e38, dtype=np.float32), 48_000, subtype="FLOAT")
    write(raw / TOO_LONG_NAME, sine_tone(2.0), 48_000)

    write(raw / "phone 8k mono.wav", sine_tone(2.0, 8_000, channels=1, freq=300), 8_000)
    surround = noise(2.0, 96_000, 6, level=0.02)
    surround[:, 2] += sine_tone(2.0, 96_000, channels=1)[:, 0]
    write(raw / "surround 96k 24-bit.wav", surround, 96_000, subtype="PCM_24")
    write(raw / "studio 192k.wav", noise(2.0, 192_000, 2, seed=1), 192_000, subtype="PCM_24")
    for name in ("what's this? [demo] *final* .wav", "ünïcødé 音楽 track.flac", LONG_NAME):
        write(raw / name, sine_tone(2.0, 44_100, freq=220), 44_100)
    write(raw / "one sample.wav", np.array([[0.5, -0.5]], dtype=np.float32), 48_000)


@pytest.fixture(scope="module")
def odd_run(stage1, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    make_odd_inputs(root / "raw_audio" / ARTIST)
    status = stage1.main(["--artist", ARTIST, "--root", str(root), "--clip-seconds", "1"])
    report = json.loads((root / "data_processed" / ARTIST / "report.json").read_text(encoding="utf-8"))
    return root, status, report


def clips_of(root: Path, name: str) -> list[Path]:
    out = root / "data_processed" / ARTIST
    stem = Path(name).stem
    return sorted(path for path in out.iterdir() if path.name.startswith(stem + "_") and path.suffix == ".wav")


@pytest.mark.parametrize("name", sorted(BAD_FILES), ids=short_id)
def test_stage1_names_each_odd_file_and_its_reason(odd_run, name):
    root, status, report = odd_run
    reasons = {item["path"]: item["reason"] for item in report["failed"]}
    assert status == 1 and set(reasons) == set(BAD_FILES)
    assert BAD_FILES[name] in reasons[name], reasons[name]
    assert clips_of(root, name) == []  # a failed track leaves no clip behind


@pytest.mark.parametrize("name", sorted(GOOD_FILES), ids=short_id)
def test_stage1_odd_rates_channels_and_names_give_valid_clips(odd_run, name):
    root, _, report = odd_run
    assert report["details"]["tracks"][name]["clips"] == GOOD_FILES[name]
    clips = clips_of(root, name)
    assert [path.name for path in clips] == [f"{Path(name).stem}_{index:03d}.wav" for index in range(GOOD_FILES[name])]
    for path in clips:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (48_000, 2, 48_000, "PCM_16")
        samples = sf.read(str(path), dtype="int16")[0]
        assert np.abs(samples.astype(np.int32)).max() <= CEILING_PCM
        if "mono" in name:
            assert np.array_equal(samples[:, 0], samples[:, 1])
        if "surround" in name:  # the loud centre channel reaches both sides alike
            left, right = np.abs(samples.astype(np.int32)).max(axis=0)
            assert min(left, right) > 3_000 and abs(left - right) < 0.1 * left


def test_stage1_folder_symlink_loop_is_not_followed(odd_run):
    root, _, report = odd_run
    assert report["counters"]["ignored_non_audio_files"] == 0  # 'again' is neither tried nor counted
    assert not (root / "data_processed" / ARTIST / "again").exists()


def test_stage1_follows_a_file_symlink_that_points_outside_the_root(stage1, tmp_path):
    """Decision (HARDENING.md): raw_audio/ is the user's own input, and linking songs from a music
    library elsewhere is its normal use; stage 1 only reads them. So a symlinked file is followed
    wherever it points, and its clips are named after the link, inside the root."""
    library = write(tmp_path / "library" / "song.wav", sine_tone(2.5, rate=48_000), 48_000)
    root = tmp_path / "project"
    (root / "raw_audio" / ARTIST).mkdir(parents=True)
    (root / "raw_audio" / ARTIST / "linked song.wav").symlink_to(library)
    assert stage1.main(["--artist", ARTIST, "--root", str(root), "--clip-seconds", "1"]) == 0
    clips = sorted(path.name for path in (root / "data_processed" / ARTIST).glob("*.wav"))
    assert clips == ["linked song_000.wav", "linked song_001.wav"]
    assert sorted(path.name for path in library.parent.iterdir()) == ["song.wav"]  # nothing written outside


def test_stage1_one_sample_file_at_44k_is_done_with_a_reason_for_no_clip(stage1, tmp_path, capsys):
    """Resampled, one sample gives soxr's first output blocks empty; this used to fail with a ValueError."""
    write(tmp_path / "raw_audio" / ARTIST / "blip.wav", np.array([[0.5]], dtype=np.float32), 44_100)
    assert stage1.main(["--artist", ARTIST, "--root", str(tmp_path), "--clip-seconds", "1"]) == 0
    assert "blip.wav: 0.00 s after trimming silence, shorter than one 1 s clip: no clip" in capsys.readouterr().err


def test_stage1_short_float_file_beyond_full_scale_is_scaled_not_clipped(stage1, tmp_path):
    """Under 400 ms the loudness is unknown (no gain), but the -1 dBFS peak cap still applies."""
    write(tmp_path / "raw_audio" / ARTIST / "hot.wav", sine_tone(0.3, amplitude=4.0), 48_000, subtype="FLOAT")
    assert stage1.main(["--artist", ARTIST, "--root", str(tmp_path), "--clip-seconds", "0.1"]) == 0
    clips = sorted((tmp_path / "data_processed" / ARTIST).glob("hot_*.wav"))
    assert len(clips) == 3
    peak = max(np.abs(sf.read(str(path), dtype="int16")[0].astype(np.int32)).max() for path in clips)
    assert CEILING_PCM - 40 <= peak <= CEILING_PCM  # at the cap, not at full scale


def test_stage1_memory_does_not_grow_with_the_length_of_a_track(stage1, tmp_path):
    """A 2-hour file is too slow for a test: this measures how the peak memory grows with length instead."""
    peaks = {}
    for seconds in (60, 240):
        source = write(tmp_path / f"{seconds} s.wav", noise(seconds, 8_000, 1), 8_000, subtype="PCM_16")
        track = stage1.Track(source, PurePosixPath(source.name))
        tracemalloc.start()
        try:
            result = stage1.process_track(track, tmp_path / "out", stage1.ClipSettings(clip_seconds=10.0), True)
            peaks[seconds] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.failed is None and result.info["clips"] == seconds // 10
    whole_track = 240 * 48_000 * 2 * 4  # 92 MB: the 240 s track decoded at once
    assert peaks[240] < whole_track / 3
    assert peaks[240] - peaks[60] < 1_000_000  # measured ~0.7 kB per second of audio: 2 hours add ~5 MB


# ---- stage 1: property-based --------------------------------------------------------------------
LEVELS = [0.0, 1e-7, 1e-3, 0.3, 1.0, 8.0, 1e30, 3.4e38]
SECONDS = [0.0, 0.01, 0.3, 0.45, 0.8, 1.3, 2.0]  # plus 0..50 frames: empty, one sample, under 400 ms, clips


@st.composite
def audio_files(draw):
    rate = draw(st.integers(8_000, 192_000))
    return {
        "rate": rate,
        "channels": draw(st.integers(1, 8)),
        "frames": int(draw(st.sampled_from(SECONDS)) * rate) + draw(st.integers(0, 50)),
        "subtype": draw(st.sampled_from(["FLOAT", "DOUBLE", "PCM_16", "PCM_24"])),
        "shape": draw(st.sampled_from(["noise", "sine", "constant", "square"])),
        "level": draw(st.sampled_from(LEVELS)),
        "poison": draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf])),
        "pad_tail": draw(st.booleans()),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def synthesise(spec: dict) -> np.ndarray:
    frames, channels = spec["frames"], spec["channels"]
    rng = np.random.default_rng(spec["seed"])
    t = np.arange(frames)[:, None] / spec["rate"]
    unit = {"noise": lambda: np.clip(rng.standard_normal((frames, channels)), -1, 1),
            "sine": lambda: np.sin(2 * np.pi * 440 * t) * np.ones(channels),
            "constant": lambda: np.ones((frames, channels)),
            "square": lambda: np.where(np.arange(frames)[:, None] % 7 == 0, -1.0, 1.0) * np.ones(channels)}
    data = unit[spec["shape"]]() * spec["level"]  # [frames, channels] float64
    if spec["poison"] is not None and frames:
        data[rng.integers(frames), rng.integers(channels)] = spec["poison"]
    return data


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=audio_files())
@example(spec={"rate": 44_100, "channels": 6, "frames": 35_280, "subtype": "DOUBLE", "shape": "noise",
               "level": 3.4e38, "poison": None, "pad_tail": False, "seed": 0})  # its downmix leaves float32's range
def test_stage1_never_raises_and_gives_valid_clips_or_a_reason(stage1, spec):
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "song.wav", Path(folder) / "out"
        write(source, synthesise(spec), spec["rate"], subtype=spec["subtype"])
        clip_settings = stage1.ClipSettings(clip_seconds=0.25, pad_tail=spec["pad_tail"])
        track = stage1.Track(source, PurePosixPath("song.wav"))
        result = stage1.process_track(track, out, clip_settings, overwrite=True)  # must not raise

        on_disk = stage1.existing_clips(out, track)
        poisoned = spec["poison"] is not None and spec["frames"] > 0 and spec["subtype"] in ("FLOAT", "DOUBLE")
        if spec["frames"] == 0:
            assert result.failed and "no audio frames" in result.failed
        elif poisoned:  # NaN and infinity are refused, never cleaned
            assert result.failed and "NaN or infinite" in result.failed
        if result.failed:
            assert isinstance(result.failed, str) and not result.failed.startswith("unexpected"), result.failed
            assert on_disk == []
            return
        assert [path.name for path in on_disk] == [f"song_{index:03d}.wav" for index in result.info["clip_indices"]]
        for path in on_disk:
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.frames) == (48_000, 2, clip_settings.clip_samples)
            assert np.abs(sf.read(str(path), dtype="int16")[0].astype(np.int32)).max() <= CEILING_PCM


# ---- stage 2 ------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would create `marker`: weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_clips(root: Path, count: int, seconds: float = 1.0) -> None:
    for index in range(count):
        write(root / "data_processed" / ARTIST / f"track {index}_000.wav",
              sine_tone(seconds, freq=200.0 + 50 * index), 48_000)


def test_stage2_refuses_a_code_running_token_file_and_encodes_the_clip_again(stage2, random_codec, tmp_path):
    write_clips(tmp_path, 1, seconds=0.5)
    token = tmp_path / "encoded_tokens" / ARTIST / "track 0_000.th"
    token.parent.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"codes": RunsCode(marker)}, token)
    report = stage2.tokenize_artist(tmp_path, ARTIST, codec=random_codec, log=logging.getLogger("test.stage2"))
    assert not marker.exists()
    assert report.done == [f"data_processed/{ARTIST}/track 0_000.wav"]
    assert load_token_file(token).n_codebooks == 4  # replaced by real tokens


def test_stage2_refuses_a_clip_holding_nan(stage2, random_codec, tmp_path):
    write_clips(tmp_path, 1, seconds=0.5)
    bad = sine_tone(0.5)
    bad[100, 0] = np.nan
    write(tmp_path / "data_processed" / ARTIST / "nan_000.wav", bad, 48_000, subtype="FLOAT")
    report = stage2.tokenize_artist(tmp_path, ARTIST, codec=random_codec, log=logging.getLogger("test.stage2"))
    assert [(item["path"], item["reason"]) for item in report.failed] == [
        (f"data_processed/{ARTIST}/nan_000.wav", "holds NaN or infinite samples")]
    assert len(report.done) == 1


# ---- interruptions ------------------------------------------------------------------------------
def default_sigint():
    """A child started from a background job inherits SIGINT ignored; Python then never raises Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_midway(command: list, ready, sig: int, log_path: Path) -> tuple[int, str]:
    """Start `command`, wait until `ready(log text)` says it is mid-work, send `sig`; return (status, log)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, *map(str, command)], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if ready(log_path.read_text(errors="replace")):
            break
        time.sleep(0.005)
    assert process.poll() is None, "finished before it could be interrupted:\n" + log_path.read_text(errors="replace")
    process.send_signal(sig)
    status = process.wait(timeout=120)
    return status, log_path.read_text(errors="replace")


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if is_temporary(path)]


def file_bytes(folder: Path, suffix: str) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in finished_files(folder, suffix)}


SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


def check_clean_exit(status: int, log: str, out: Path, report_name: str) -> None:
    assert status == 130, log
    assert "interrupted; finished outputs are kept, re-run to continue" in log
    assert "Traceback" not in log
    assert not (out / report_name).exists(), "the run was not interrupted mid-work"
    assert temporaries(out) == []


def write_songs(root: Path) -> None:
    for index in range(8):
        write(root / "raw_audio" / ARTIST / f"song {index}.flac", noise(4.0, 44_100, 2, seed=index), 44_100)


@pytest.fixture(scope="module")
def stage1_reference(stage1, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1_reference")
    write_songs(root)
    assert stage1.main(["--artist", ARTIST, "--root", str(root), "--clip-seconds", "1"]) == 0
    return file_bytes(root / "data_processed" / ARTIST, ".wav")


@pytest.mark.parametrize("sig", SIGNALS)
def test_stage1_interrupted_exits_cleanly_and_a_rerun_finishes_identically(stage1, stage1_reference, tmp_path, sig):
    write_songs(tmp_path)
    out = tmp_path / "data_processed" / ARTIST
    command = [SCRIPTS / "1_audio_preprocessing.py", "--artist", ARTIST, "--root", tmp_path, "--clip-seconds", "1"]
    status, log = interrupt_midway(command, lambda _: bool(finished_files(out, ".wav")), sig, tmp_path / "log")
    check_clean_exit(status, log, out, "report.json")
    assert all(sf.info(str(path)).frames == 48_000 for path in finished_files(out, ".wav"))  # whole clips only
    assert stage1.main(["--artist", ARTIST, "--root", str(tmp_path), "--clip-seconds", "1"]) == 0
    assert file_bytes(out, ".wav") == stage1_reference
    assert temporaries(out) == []


def test_stage1_with_workers_stops_starting_tracks_when_interrupted(stage1, stage1_reference, tmp_path):
    """The pool used to run every queued track to the end after Ctrl-C or SIGTERM before exiting."""
    write_songs(tmp_path)
    out = tmp_path / "data_processed" / ARTIST
    command = [SCRIPTS / "1_audio_preprocessing.py", "--artist", ARTIST, "--root", tmp_path, "--clip-seconds", "1",
               "--workers", "2"]
    status, log = interrupt_midway(command, lambda _: bool(finished_files(out, ".wav")), signal.SIGTERM,
                                   tmp_path / "log")
    check_clean_exit(status, log, out, "report.json")
    assert len(list((out / ".stage1").glob("*.json"))) < 8  # the queued tracks were not started
    assert stage1.main(["--artist", ARTIST, "--root", str(tmp_path), "--clip-seconds", "1"]) == 0
    assert file_bytes(out, ".wav") == stage1_reference


@pytest.fixture(scope="module")
def saved_codec(random_codec, tmp_path_factory):
    """random:0's weights saved as a folder: a child process loads it in a few seconds, building takes ~10."""
    from pipeline.codec import load_codec

    folder = tmp_path_factory.mktemp("codec") / "random0"
    random_codec.model.save_pretrained(folder)
    return load_codec(str(folder))


def tokenize(stage2, root: Path, codec):
    return stage2.tokenize_artist(root, ARTIST, codec=codec, log=logging.getLogger("test.stage2"))


@pytest.fixture(scope="module")
def stage2_reference(stage2, saved_codec, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_reference")
    write_clips(root, 4, seconds=0.5)
    assert tokenize(stage2, root, saved_codec).exit_code() == 0
    return file_bytes(root / "encoded_tokens" / ARTIST, ".th")


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS)
def test_stage2_interrupted_exits_cleanly_and_a_rerun_finishes_identically(stage2, saved_codec, stage2_reference,
                                                                           tmp_path, sig):
    write_clips(tmp_path, 4, seconds=0.5)
    out = tmp_path / "encoded_tokens" / ARTIST
    command = [SCRIPTS / "2_Tokenization.py", "--artist", ARTIST, "--root", tmp_path, "--codec", saved_codec.name,
               "--device", "cpu", "--batch-size", "1"]
    status, log = interrupt_midway(command, lambda _: bool(finished_files(out, ".th")), sig, tmp_path / "log")
    check_clean_exit(status, log, out, "report.json")
    for path in finished_files(out, ".th"):
        load_token_file(path)  # whole, valid token files only
    report = tokenize(stage2, tmp_path, saved_codec)
    assert report.exit_code() == 0 and len(report.skipped) >= 1 and len(report.done) >= 1
    assert file_bytes(out, ".th") == stage2_reference  # byte for byte, those of the first run included
    assert temporaries(out) == []


N_TOKEN_FILES = 800  # ~1 s of loading: time to be interrupted in the middle


def write_token_files(root: Path) -> None:
    """Many small valid token files (one written, the rest byte copies under other track names)."""
    folder = root / "encoded_tokens" / ARTIST
    generator = torch.Generator().manual_seed(0)
    first = folder / "t0000_000.th"
    save_token_file(TokenFile(codes=torch.randint(0, 1024, (1, 2, 150), generator=generator, dtype=torch.int16),
                              scales=torch.ones(1), num_samples=48_000, bandwidth=3.0, codec="random:0"), first)
    data = first.read_bytes()
    for index in range(1, N_TOKEN_FILES):
        (folder / f"t{index:04d}_000.th").write_bytes(data)


@pytest.fixture(scope="module")
def stage3_reference(stage3, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3_reference")
    write_token_files(root)
    assert stage3.prepare_artist(root, ARTIST, log=logging.getLogger("test.stage3")).exit_code() == 0
    return manifest_path(root, ARTIST).read_bytes()


@pytest.mark.parametrize("sig", SIGNALS)
def test_stage3_interrupted_exits_cleanly_and_a_rerun_finishes_identically(stage3, stage3_reference, tmp_path, sig):
    write_token_files(tmp_path)
    command = [SCRIPTS / "3_data_preparation.py", "--artist", ARTIST, "--root", tmp_path]
    status, log = interrupt_midway(command, lambda text: f"checking {ARTIST}:" in text, sig, tmp_path / "log")
    out = tmp_path / "encoded_tokens" / ARTIST
    check_clean_exit(status, log, out, "manifest_report.json")
    assert not manifest_path(tmp_path, ARTIST).exists() and temporaries(tmp_path) == []
    assert stage3.prepare_artist(tmp_path, ARTIST, log=logging.getLogger("test.stage3")).exit_code() == 0
    assert manifest_path(tmp_path, ARTIST).read_bytes() == stage3_reference


def test_the_loops_help_lists_every_option_before_its_environment_section():
    """`run_pipeline.sh --help`: `-h, --help` stands with the other options, not after "Environment:"."""
    result = subprocess.run(["bash", str(SCRIPTS / "run_pipeline.sh"), "--help"], capture_output=True, text=True,
                            timeout=60)
    lines = result.stdout.splitlines()

    def first(prefix: str) -> int:
        return next(index for index, line in enumerate(lines) if line.strip().startswith(prefix))

    options_at, help_at, environment_at = first("Options"), first("-h, --help"), first("Environment:")
    assert result.returncode == 0 and options_at < help_at < environment_at
    assert all(not line.lstrip().startswith("-") for line in lines[environment_at:])
