"""Stage 1 (scripts/1_audio_preprocessing.py) end to end on small synthetic songs.

One module-scoped run over a folder of good and bad inputs feeds most tests; the re-run,
--workers, kill-and-rerun and option tests make their own roots. Clips are 1 s long.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from helpers import SCRIPTS, sine_tone

ARTIST = "Test Band"
CLIP_SECONDS = 1.0
FADE = 960  # 20 ms at 48 kHz
CEILING = 10 ** (-1 / 20)  # the -1 dBFS peak cap of pipeline.audio
BAD_INPUTS = {  # file -> a word its reason must contain
    "empty.wav": "empty",
    "cut.ogg": "truncated",
    "notes.wav": "cannot decode",
    "folder.wav": "folder",
    "gone.flac": "broken symbolic link",
}
ODD_NAME = "sub dir/My [live] * song é"  # spaces, brackets, '*', unicode


def noise(seconds, rate=48_000, channels=2, level=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)


def silence(seconds, rate=48_000, channels=2):
    return np.zeros((int(seconds * rate), channels), dtype=np.float32)


def write(folder: Path, name: str, data, rate, **kwargs) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kwargs)
    return path


def make_good_inputs(raw: Path) -> dict:
    """Write the good songs; return {track file: indices of the clips expected}."""
    write(raw, "sine.flac", sine_tone(3.5, 44_100), 44_100)  # 3 clips, 0.5 s tail dropped
    write(raw, "mono noise.wav", noise(2.2, 22_050, channels=1), 22_050)
    six = noise(2.0, channels=6, level=0.02, seed=1)
    six[:, 2] += sine_tone(2.0, channels=1, amplitude=0.4)[:, 0]  # a loud centre must reach both sides
    write(raw, "surround.wav", six, 48_000)
    write(raw, "phone.wav", sine_tone(2.0, 8_000, freq=300), 8_000)
    write(raw, "hires.wav", noise(2.0, 96_000, seed=2), 96_000, subtype="PCM_24")
    write(raw, "silent.wav", silence(3.0), 48_000)  # trimmed to nothing: no clip
    write(raw, "short.wav", sine_tone(0.5), 48_000)  # shorter than a clip: no clip
    write(raw, "padded.wav",  # 1 s of silence each side is trimmed -> 2 clips
          np.concatenate([silence(1.0), sine_tone(2.05), silence(1.0)]), 48_000)
    write(raw, "gap.wav",  # clip 2 falls in the silent middle and is dropped
          np.concatenate([sine_tone(1.5), silence(2.0), sine_tone(1.5)]), 48_000)
    spiky = noise(2.0, level=0.01, seed=3)
    spiky[30_000] = 0.9  # one click: the gain to -20 LUFS would push it far over full scale
    write(raw, "spiky.wav", spiky, 48_000)
    write(raw, "dc.wav", np.full((96_000, 2), 0.25, dtype=np.float32), 48_000)  # fades show plainly on DC
    write(raw, f"{ODD_NAME}.ogg", sine_tone(2.0, 44_100, freq=220), 44_100, format="OGG", subtype="VORBIS")
    two = [0, 1]
    return {"sine.flac": [0, 1, 2], "mono noise.wav": two, "surround.wav": two, "phone.wav": two, "hires.wav": two,
            "silent.wav": [], "short.wav": [], "padded.wav": two, "gap.wav": [0, 1, 3, 4], "spiky.wav": two,
            "dc.wav": two, f"{ODD_NAME}.ogg": two}


def make_bad_inputs(raw: Path) -> None:
    (raw / "empty.wav").write_bytes(b"")
    whole = write(raw, "whole.ogg", sine_tone(3.0), 48_000, format="OGG", subtype="VORBIS").read_bytes()
    (raw / "whole.ogg").unlink()
    (raw / "cut.ogg").write_bytes(whole[: int(len(whole) * 0.9)])
    (raw / "notes.wav").write_text("these are not samples\n")
    (raw / "folder.wav").mkdir()
    (raw / "gone.flac").symlink_to(raw / "does-not-exist.flac")
    (raw / ".hidden.wav").write_text("macOS resource fork: never tried")
    (raw / "cover.jpg").write_bytes(b"\xff\xd8 not audio")


def run_stage(stage1, root: Path, *extra) -> int:
    return stage1.main(["--artist", ARTIST, "--root", str(root), "--clip-seconds", str(CLIP_SECONDS), *extra])


def read_report(root: Path) -> dict:
    return json.loads((root / "data_processed" / ARTIST / "report.json").read_text(encoding="utf-8"))


def clip_files(root: Path) -> dict[str, bytes]:
    out = root / "data_processed" / ARTIST
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.rglob("*.wav"))}


@pytest.fixture(scope="module")
def processed(stage1, tmp_path_factory):
    """One run over every good and bad input: (root, exit status, expected clips per track)."""
    root = tmp_path_factory.mktemp("stage1")
    raw = root / "raw_audio" / ARTIST
    expected = make_good_inputs(raw)
    make_bad_inputs(raw)
    status = run_stage(stage1, root)
    return root, status, expected


def test_bad_inputs_are_named_and_good_ones_still_come_out(processed):
    root, status, expected = processed
    report = read_report(root)
    assert status == 1 and report["exit_status"] == 1
    reasons = {item["path"]: item["reason"] for item in report["failed"]}
    assert set(reasons) == set(BAD_INPUTS)
    for name, word in BAD_INPUTS.items():
        assert word in reasons[name], (name, reasons[name])
    assert report["counters"]["ignored_non_audio_files"] == 1  # cover.jpg; .hidden.wav is not even counted
    assert report["done"] == len(expected)


def test_every_track_gives_the_expected_clips(processed):
    root, _, expected = processed
    wanted = {f"{track.rsplit('.', 1)[0]}_{index:03d}.wav" for track, indices in expected.items() for index in indices}
    assert set(clip_files(root)) == wanted
    tracks = read_report(root)["details"]["tracks"]
    assert {track: info["clips"] for track, info in tracks.items()} == {
        track: len(indices) for track, indices in expected.items()}


def test_clips_are_48k_stereo_pcm16_of_uniform_length(processed):
    root, _, _ = processed
    for path in (root / "data_processed" / ARTIST).rglob("*.wav"):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (48_000, 2, 48_000, "PCM_16"), path


def test_counts_of_silence_and_tails(processed):
    root, _, _ = processed
    report = read_report(root)
    tracks = report["details"]["tracks"]
    assert tracks["gap.wav"]["silent_clips_dropped"] == 1
    assert tracks["silent.wav"]["clips"] == 0 and tracks["silent.wav"]["trimmed_s"] == [0.0, 0.0]
    assert tracks["sine.flac"]["tail_dropped_s"] == pytest.approx(0.5, abs=0.02)
    assert tracks["padded.wav"]["trimmed_s"] == pytest.approx([1.0, 3.05], abs=0.011)
    assert report["counters"]["silent_clips_dropped"] == 1
    assert report["counters"]["tracks_without_clips"] == 2


def pcm(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="int16")[0]


def test_loudness_reaches_the_target_where_the_cap_does_not_bind(processed):
    root, _, _ = processed
    out = root / "data_processed" / ARTIST
    tracks = read_report(root)["details"]["tracks"]
    meter = pyloudnorm.Meter(48_000)  # an independent BS.1770 implementation
    for track in ("sine.flac", "mono noise.wav", "surround.wav", "phone.wav", "hires.wav", f"{ODD_NAME}.ogg"):
        assert not tracks[track]["gain_capped_by_peak"], track
        stem = track.rsplit(".", 1)[0]
        wave = np.concatenate([sf.read(str(path))[0] for path in sorted(out.glob(glob.escape(stem) + "_*.wav"))])
        assert meter.integrated_loudness(wave) == pytest.approx(-20.0, abs=0.5), stem


def test_peak_cap_keeps_every_sample_under_full_scale(processed):
    root, _, _ = processed
    out = root / "data_processed" / ARTIST
    assert read_report(root)["details"]["tracks"]["spiky.wav"]["gain_capped_by_peak"]
    peak = max(np.abs(pcm(path).astype(np.int32)).max() for path in out.rglob("*.wav"))
    assert 0 < peak <= CEILING * 32767 + 1
    spiky_peak = max(np.abs(pcm(path).astype(np.int32)).max() for path in out.glob("spiky_*.wav"))
    assert spiky_peak == pytest.approx(CEILING * 32767, abs=2)  # the cap binds exactly at -1 dBFS


def test_fades_are_linear_20ms(processed):
    root, _, _ = processed
    clip = pcm(root / "data_processed" / ARTIST / "dc_000.wav").astype(np.float64)  # a constant, faded
    plateau = clip[FADE:-FADE]
    assert plateau.min() == plateau.max() > 1000
    ramp = plateau[0, 0] * np.arange(FADE) / FADE
    np.testing.assert_allclose(clip[:FADE, 0], ramp, atol=1.0)
    np.testing.assert_allclose(clip[-FADE:, 1], ramp[::-1], atol=1.0)


def test_mono_gives_equal_channels_and_surround_reaches_both_sides(processed):
    root, _, _ = processed
    out = root / "data_processed" / ARTIST
    mono = pcm(out / "mono noise_000.wav")
    assert np.array_equal(mono[:, 0], mono[:, 1]) and np.abs(mono).max() > 1000
    surround = pcm(out / "surround_000.wav").astype(np.float64)
    correlation = np.corrcoef(surround[:, 0], surround[:, 1])[0, 1]
    assert correlation > 0.9  # the centre tone dominates both sides


def test_short_track_gives_a_clear_log_line(stage1, tmp_path, capsys):
    raw = tmp_path / "raw_audio" / ARTIST
    write(raw, "tiny.wav", sine_tone(0.5), 48_000)
    assert run_stage(stage1, tmp_path) == 0
    assert "tiny.wav: 0.50 s after trimming silence, shorter than one 1 s clip: no clip" in capsys.readouterr().err
    assert clip_files(tmp_path) == {}


def test_pad_tail_pads_the_tail_and_a_short_track(stage1, tmp_path):
    raw = tmp_path / "raw_audio" / ARTIST
    write(raw, "tone.wav", sine_tone(2.5), 48_000)
    write(raw, "tiny.wav", sine_tone(0.5), 48_000)
    assert run_stage(stage1, tmp_path, "--pad-tail") == 0
    files = clip_files(tmp_path)
    assert sorted(files) == ["tiny_000.wav", "tone_000.wav", "tone_001.wav", "tone_002.wav"]
    tail = pcm(tmp_path / "data_processed" / ARTIST / "tone_002.wav")
    assert len(tail) == 48_000 and np.abs(tail[:24_000 - FADE]).max() > 1000 and not tail[24_000:].any()
    assert read_report(tmp_path)["counters"]["tails_padded"] == 2


def copy_raw(source_root: Path, target_root: Path) -> None:
    shutil.copytree(source_root / "raw_audio", target_root / "raw_audio", symlinks=True)


@pytest.mark.slow
def test_workers_2_gives_byte_identical_clips(stage1, processed, tmp_path):
    root, _, _ = processed
    copy_raw(root, tmp_path)
    assert run_stage(stage1, tmp_path, "--workers", "2") == 1
    assert clip_files(tmp_path) == clip_files(root)
    assert [item["path"] for item in read_report(tmp_path)["failed"]] == [
        item["path"] for item in read_report(root)["failed"]]


def test_rerun_skips_finished_tracks_and_overwrite_redoes_them(stage1, tmp_path):
    raw = tmp_path / "raw_audio" / ARTIST
    write(raw, "a.wav", sine_tone(2.0), 48_000)
    write(raw, "b.wav", noise(2.0), 48_000)
    assert run_stage(stage1, tmp_path) == 0
    out = tmp_path / "data_processed" / ARTIST
    first = clip_files(tmp_path)
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("*.wav")}
    assert run_stage(stage1, tmp_path) == 0
    report = read_report(tmp_path)
    assert (report["done"], report["skipped"]) == (0, 2)
    assert report["details"]["tracks"]["a.wav"]["clips"] == 2  # skipped tracks keep their figures
    assert {path: path.stat().st_mtime_ns for path in out.glob("*.wav")} == stamps
    assert run_stage(stage1, tmp_path, "--overwrite") == 0
    assert read_report(tmp_path)["done"] == 2 and clip_files(tmp_path) == first
    assert run_stage(stage1, tmp_path, "--target-lufs", "-23") == 0  # other settings: the markers are stale
    assert read_report(tmp_path)["done"] == 2 and clip_files(tmp_path) != first


def test_unfinished_track_is_redone_and_leftovers_are_removed(stage1, tmp_path):
    raw = tmp_path / "raw_audio" / ARTIST
    write(raw, "a.wav", sine_tone(2.0), 48_000)
    write(raw, "a_001.wav", sine_tone(2.0, freq=880), 48_000)  # its clips must survive a's clean-up
    assert run_stage(stage1, tmp_path) == 0
    out = tmp_path / "data_processed" / ARTIST
    reference = clip_files(tmp_path)
    (out / ".stage1" / "a.json").unlink()  # as if killed before a's marker was written
    (out / "a_000.wav").write_bytes(b"partial")
    (out / "a_007.wav").write_bytes(b"from an older run")
    (out / ".a_001.tmp-xyz.wav").write_bytes(b"temporary")
    assert run_stage(stage1, tmp_path) == 0
    report = read_report(tmp_path)
    assert report["done"] == 1 and report["skipped"] == 1
    assert report["counters"]["stale_temporaries_removed"] == 1
    assert clip_files(tmp_path) == reference


@pytest.mark.slow
def test_kill_and_rerun_ends_with_the_files_of_an_uninterrupted_run(stage1, tmp_path):
    reference_root, killed_root = tmp_path / "reference", tmp_path / "killed"
    raw = reference_root / "raw_audio" / ARTIST
    for index in range(4):
        write(raw, f"song {index}.flac", noise(20.0, 44_100, seed=index), 44_100)
    copy_raw(reference_root, killed_root)
    out = killed_root / "data_processed" / ARTIST
    command = [sys.executable, str(SCRIPTS / "1_audio_preprocessing.py"), "--artist", ARTIST, "--root",
               str(killed_root), "--clip-seconds", str(CLIP_SECONDS)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(out.rglob("*.wav")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    for path in out.glob("*.wav"):  # whatever carries a final name is a whole clip
        if ".tmp-" not in path.name:
            assert sf.info(str(path)).frames == 48_000, path
    assert run_stage(stage1, reference_root) == 0
    assert run_stage(stage1, killed_root) == 0
    assert clip_files(killed_root) == clip_files(reference_root)
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name]


def test_usage_errors_exit_2(stage1, tmp_path):
    from pipeline.cli import run_main

    assert run_main(stage1.main, ["--artist", ARTIST, "--root", str(tmp_path)]) == 2  # no raw_audio/<artist>
    (tmp_path / "raw_audio" / ARTIST).mkdir(parents=True)
    (tmp_path / "raw_audio" / ARTIST / "readme.txt").write_text("no songs")
    assert run_main(stage1.main, ["--artist", ARTIST, "--root", str(tmp_path)]) == 2  # no audio in it
    with pytest.raises(SystemExit) as exit_info:
        stage1.main(["--artist", ARTIST, "--root", str(tmp_path), "--clip-seconds", "0.01"])
    assert exit_info.value.code == 2


def test_help_explains_every_option(stage1):
    text = stage1.build_parser().format_help()
    for option in ("--artist", "--root", "--overwrite", "--log-level", "--target-lufs", "--clip-seconds",
                   "--silence-db", "--trim-db", "--pad-tail", "--workers"):
        assert option in text
    assert "default: -20.0" in text and "default: 60.0" in text and "default: -45.0" in text


def test_names_that_are_not_utf8_or_hold_a_newline_work_and_are_reported_readably(stage1, tmp_path):
    raw = tmp_path / "raw_audio" / ARTIST
    write(raw, "plain.wav", sine_tone(2.0), 48_000)
    os.rename(raw / "plain.wav", os.fsencode(raw) + b"/caf\xe9 (latin-1)\nline.wav")
    assert run_stage(stage1, tmp_path) == 0
    out = tmp_path / "data_processed" / ARTIST
    assert sorted(os.listdir(os.fsencode(out))) == [b".stage1", b"caf\xe9 (latin-1)\nline_000.wav",
                                                    b"caf\xe9 (latin-1)\nline_001.wav", b"report.json"]
    assert list(read_report(tmp_path)["details"]["tracks"]) == ["caf\\xe9 (latin-1)\\nline.wav"]
    assert run_stage(stage1, tmp_path) == 0 and read_report(tmp_path)["skipped"] == 1
