"""End to end: scripts/run_pipeline.sh on the synthetic demo corpus and on real songs (subprocesses)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import SCRIPTS, finished_files, load, results, sine_tone, write_dataset
from pipeline.files import is_temporary

RUN_PIPELINE = SCRIPTS / "run_pipeline.sh"
SMALL_RUN = ["--codec", "random:0", "--preset", "tiny", "--epochs", "2", "--context-frames", "150",
             "--bandwidth", "6", "--device", "cpu"]


def run_pipeline(*args, cwd: Path, shell: str = "bash", python: str = sys.executable) -> subprocess.CompletedProcess:
    """The loop with this test's interpreter (PYTHON), whatever `python3` the shell's PATH finds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHON=python)
    return subprocess.run([shell, str(RUN_PIPELINE), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=900)


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every output file (not the logs/reports that carry timings)."""
    digests = {}
    for folder in ("data_processed", "encoded_tokens", "music_transformer"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in {".wav", ".th"} and not is_temporary(path):
                digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted(root.glob("metadata_clean_*.jsonl")) + finished_files(root / "model_results", ".pt"):
        digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def check_contract(root: Path, artist: str, clip_seconds: float, generated_seconds: float) -> dict:
    """Every stage's outputs exist and satisfy docs/contract.md; returns a few counts."""
    clips = sorted((root / "data_processed" / artist).rglob("*.wav"))
    assert clips, f"stage 1 wrote no clip for {artist}"
    for clip in clips:
        info = sf.info(clip)
        assert (info.samplerate, info.channels) == (48_000, 2)
        assert info.frames == round(clip_seconds * 48_000)
    tokens = finished_files(root / "encoded_tokens" / artist, ".th")
    assert len(tokens) == len(clips)
    for path in tokens:
        token = torch.load(path, weights_only=True)
        assert token["codes"].dtype == torch.int16 and token["codes"].shape[:2] == (1, 4)
        assert token["codes"].shape[2] == 150 * token["scales"].numel()
        assert token["num_samples"] == round(clip_seconds * 48_000) and token["format"] == 1
    manifest = [json.loads(line) for line in (root / f"metadata_clean_{artist}.jsonl").read_text().splitlines()]
    assert len(manifest) == len(tokens)
    for entry in manifest:
        assert {"audio", "duration", "sample_rate", "frames", "codebooks", "bandwidth", "codec", "source", "track",
                "split", "median_scale"} <= entry.keys()
        assert (root / entry["audio"]).is_file()
    results = root / "model_results" / artist
    checkpoints = sorted(results.glob("music_transformer_ep*.pt"))
    assert checkpoints and (results / "metrics.jsonl").is_file() and (results / "loss.png").is_file()
    checkpoint = torch.load(checkpoints[-1], weights_only=True)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    lines = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "baselines" and lines[0]["bigram_bits_per_frame"] > 0  # then one line an epoch
    metrics = lines[1:]
    wavs = sorted((root / "music_transformer" / artist).glob("*.wav"))
    assert wavs, f"stage 5 wrote no WAV for {artist}"
    for wav in wavs:
        audio, rate = sf.read(wav, always_2d=True)
        assert rate == 48_000 and audio.shape[1] == 2
        assert abs(audio.shape[0] - generated_seconds * 48_000) <= 48_000 / 150  # within one codec frame
        assert np.abs(audio).max() <= 1.0
        for suffix in (".json", ".th", ".png"):
            assert wav.with_suffix(suffix).is_file()
    return {"clips": len(clips), "metrics": metrics}


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end_and_reruns_idempotently(tmp_path):
    """The demo loop for one of its two artists (named on the command line: the loop takes only those);
    the joint test and the failing-artist test loop over two."""
    args = ["--demo", "--root", tmp_path / "demo", "--demo-tracks", "2", "--demo-track-seconds", "9",
            "--clip-seconds", "4", "--seconds", "2", *SMALL_RUN, "demo_sunny_arps"]
    first = run_pipeline(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    root = tmp_path / "demo"
    counts = check_contract(root, "demo_sunny_arps", clip_seconds=4, generated_seconds=2)
    assert counts["clips"] == 2 * 2  # two 9 s tracks -> two 4 s clips each (the 1 s tails dropped)
    assert (root / "raw_audio" / "demo_night_bells").is_dir()  # the demo corpus has both artists ...
    assert not (root / "data_processed" / "demo_night_bells").exists()  # ... and the loop ran the one named
    assert "demo_sunny_arps" in first.stdout and "valid NLL" in first.stdout and "gain vs best count model" in first.stdout
    assert "untrained codec" in first.stdout + first.stderr
    before = file_digests(root)
    second = run_pipeline(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert file_digests(root) == before, "a re-run must skip finished work and leave results identical"


def test_pipeline_reports_a_failing_artist_and_goes_on(tmp_path):
    (tmp_path / "raw_audio" / "a_broken").mkdir(parents=True)
    (tmp_path / "raw_audio" / "a_broken" / "notes.txt").write_text("no audio here")  # stage 1 exits 2
    (tmp_path / "raw_audio" / "b_fine").mkdir()
    sf.write(tmp_path / "raw_audio" / "b_fine" / "tone.wav", sine_tone(1.2, rate=44_100), 44_100)
    result = run_pipeline("--stop-stage", "1", "--clip-seconds", "0.5", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("a_broken", "b_fine"))}
    assert "failed at stage 1" in rows["a_broken"]
    assert rows["b_fine"].split()[1] == "2" and rows["b_fine"].rstrip().endswith("ok")  # went on: 2 clips


def test_pipeline_refuses_bad_stage_range(tmp_path):
    result = run_pipeline("--stage", "4", "--stop-stage", "2", cwd=tmp_path)
    assert result.returncode == 2 and "stage <= stop-stage" in result.stderr
    result = run_pipeline("--resume", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and "--resume and --overwrite exclude each other" in result.stderr


def test_pipeline_under_a_shell_older_than_bash_4_4_stops_with_a_message(tmp_path):
    """macOS's /bin/bash is 3.2; sh is not bash at all: both get a message, not a syntax error."""
    shell = "dash" if subprocess.run(["which", "dash"], capture_output=True).returncode == 0 else "sh"
    result = run_pipeline("--stop-stage", "1", cwd=tmp_path, shell=shell)
    assert result.returncode == 2, result.stderr
    assert "needs bash 4.4 or newer" in result.stderr and "brew install bash" in result.stderr
    assert not (tmp_path / "demo_run").exists()


def test_pipeline_names_its_interpreter_and_stops_early_without_the_requirements(tmp_path):
    result = run_pipeline("--stage", "3", "--stop-stage", "3", "Nobody", cwd=tmp_path)
    assert f"python: {sys.executable}" in result.stderr
    bare = tmp_path / "bare-python"  # this interpreter without its site-packages: no torch
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    result = run_pipeline("--demo", cwd=tmp_path, python=str(bare))
    assert result.returncode == 2, result.stderr
    assert "module 'torch' is not importable" in result.stderr and "requirements are not importable" in result.stderr
    assert not (tmp_path / "demo_run" / "raw_audio").exists()  # stopped before any stage or the demo corpus


@pytest.mark.slow
def test_pipeline_resume_overwrite_and_stage_arguments_with_spaces(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40, 30))
    tiny = ["--stage", "4", "--stop-stage", "4", "--root", tmp_path, "--preset", "tiny", "--context-frames", "32",
            "--pattern", "parallel", "--device", "cpu", "--stage4-arg", "--batch-size", "--stage4-arg", "2", "A"]
    fresh = run_pipeline(*tiny, "--epochs", "1", "--resume", cwd=tmp_path)  # nothing to resume: starts fresh
    assert fresh.returncode == 0 and "no model_results/A/last.pt to resume" in fresh.stderr, fresh.stderr
    longer = run_pipeline(*tiny, "--epochs", "2", cwd=tmp_path)
    assert longer.returncode == 1 and "already holds a run finished at epoch 1" in longer.stderr, longer.stderr
    resumed = run_pipeline(*tiny, "--epochs", "2", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    two_epochs = load(results(tmp_path) / "last.pt")
    assert two_epochs["epoch"] == 2
    steps_per_epoch = two_epochs["step"] // 2
    saved = tmp_path / "saved runs" / "epoch two.pt"  # a path with spaces, as one --stage4-arg
    saved.parent.mkdir()
    saved.write_bytes((results(tmp_path) / "last.pt").read_bytes())
    again = run_pipeline(*tiny, "--epochs", "1", "--overwrite", cwd=tmp_path)  # from scratch
    assert again.returncode == 0, again.stderr
    assert load(results(tmp_path) / "last.pt")["step"] == steps_per_epoch
    assert not (results(tmp_path) / "music_transformer_ep2.pt").exists()
    from_saved = run_pipeline(*tiny, "--epochs", "3", "--stage4-arg", f"--resume={saved}", cwd=tmp_path)
    assert from_saved.returncode == 0, from_saved.stderr
    last = load(results(tmp_path) / "last.pt")
    assert (last["epoch"], last["step"]) == (3, 3 * steps_per_epoch)  # the saved run's two epochs, then one more


def _real_songs() -> list[Path]:
    listing = subprocess.run(["dpkg", "-L", "fretsonfire-songs-sectoid"], capture_output=True, text=True)
    if listing.returncode != 0:
        return []
    # each song folder holds guitar.ogg and song.ogg; song.ogg is the backing mix
    return sorted(Path(line) for line in listing.stdout.splitlines() if line.endswith("/song.ogg"))


@pytest.mark.slow
def test_real_music_end_to_end(tmp_path):
    songs = _real_songs()
    if len(songs) < 2:
        if os.environ.get("CI"):
            pytest.fail("CI must install fretsonfire-songs-sectoid (see .ci/run)")
        pytest.skip("real music not installed: apt-get install fretsonfire-songs-sectoid")
    artist_dir = tmp_path / "raw_audio" / "Sectoid"
    artist_dir.mkdir(parents=True)
    excerpt_seconds = {0: 13.0, 1: 9.5}
    for index, song in enumerate(songs[:2]):
        data, rate = sf.read(song, always_2d=True)
        start = int(30 * rate)  # an excerpt from the middle of the song: no silence at its ends
        excerpt = data[start:start + int(excerpt_seconds[index] * rate)]
        assert excerpt.shape[0] == int(excerpt_seconds[index] * rate), f"{song} is shorter than expected"
        sf.write(artist_dir / f"{song.parent.name}.ogg", excerpt, rate, format="OGG")
    result = run_pipeline("--clip-seconds", "3", "--seconds", "2", *SMALL_RUN, cwd=tmp_path)  # 2 epochs
    assert result.returncode == 0, result.stdout + result.stderr
    counts = check_contract(tmp_path, "Sectoid", clip_seconds=3, generated_seconds=2)
    assert counts["clips"] == sum(math.floor(seconds / 3) for seconds in excerpt_seconds.values())  # 4 + 3
    losses = [row["train_loss"] for row in counts["metrics"]]
    assert losses[-1] < losses[0], f"training loss did not decrease: {losses}"
