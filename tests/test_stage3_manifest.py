"""Stage 3 (scripts/3_data_preparation.py): token files -> validated manifest with a track-level split."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import soundfile as sf
import torch

from helpers import run_script, sine_tone
from pipeline.contract import TokenFile, save_token_file
from pipeline.manifest import MANIFEST_KEYS, manifest_path, read_manifest

ARTIST = "Band"


@pytest.fixture
def quiet_main(stage3, monkeypatch):
    """main() without setup_logging, which would replace the root handlers (and with them caplog's)."""
    monkeypatch.setattr(stage3, "setup_logging", lambda level, stage: logging.getLogger("pipeline.stage3"))
    return lambda *argv: stage3.run_main(stage3.main, [str(arg) for arg in argv])


def token_dir(root: Path) -> Path:
    return root / "encoded_tokens" / ARTIST


def write_tokens(root: Path, relative: str, q: int = 4, n_chunks: int = 2, seed: int = 0,
                 num_samples: int | None = None) -> Path:
    """A valid contract token file, as stage 2 writes it, without running the codec."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (1, q, 150 * n_chunks), generator=generator, dtype=torch.int16)  # [1, Q, T]
    scales = 0.05 + torch.rand(n_chunks, generator=generator)  # [n_chunks]
    bandwidth = {2: 3.0, 4: 6.0, 8: 12.0, 16: 24.0}[q]
    path = token_dir(root) / f"{relative}.th"
    save_token_file(TokenFile(codes=codes, scales=scales, num_samples=num_samples or 47_520 * n_chunks,
                              bandwidth=bandwidth, codec="random:0",
                              source=f"data_processed/{ARTIST}/{relative}.wav"), path)
    return path


def write_artist(root: Path, n_tracks: int, clips_per_track: int = 3) -> None:
    for track in range(n_tracks):
        for clip in range(clips_per_track):
            write_tokens(root, f"album {track % 2}/song [{track}]_{clip:03d}", seed=track * 100 + clip)


def prepare(stage3, root, **options):
    return stage3.prepare_artist(root, ARTIST, log=logging.getLogger("test.stage3"), **options)


def read_lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in manifest_path(root, ARTIST).read_text(encoding="utf-8").splitlines()]


# ---- the manifest -----------------------------------------------------------------------------
def test_manifest_has_the_contract_keys_and_reads_back(stage3, tmp_path):
    write_artist(tmp_path, n_tracks=4, clips_per_track=2)
    report = prepare(stage3, tmp_path)
    assert report.exit_code() == 0 and len(report.done) == 8

    lines = read_lines(tmp_path)
    assert len(lines) == 8 and all(set(MANIFEST_KEYS) <= set(line) for line in lines)
    first = lines[0]
    assert first["audio"] == f"encoded_tokens/{ARTIST}/album 0/song [0]_000.th"
    assert first["track"] == "album 0/song [0]"
    assert first["source"] == f"data_processed/{ARTIST}/album 0/song [0]_000.wav"
    assert first["duration"] == pytest.approx(2 * 47_520 / 48_000)
    # 2 chunks = 300 frames in the file; the last chunk holds 47,520 samples = 149 frames of audio
    assert (first["sample_rate"], first["frames"], first["codebooks"], first["bandwidth"]) == (48_000, 299, 4, 6.0)
    assert first["codec"] == "random:0" and first["split"] in ("train", "valid")
    scales = torch.load(tmp_path / first["audio"], weights_only=True)["scales"]
    assert first["median_scale"] == pytest.approx(float(scales.median()))

    entries = read_manifest(manifest_path(tmp_path, ARTIST), tmp_path)
    assert [entry["path"] for entry in entries] == [(tmp_path / line["audio"]).resolve() for line in lines]
    report_file = json.loads((token_dir(tmp_path) / "manifest_report.json").read_text())
    assert report_file["counters"]["tracks"] == 4 and report_file["counters"]["clips"] == 8


def test_older_bare_tensor_files_are_accepted_without_scales(stage3, tmp_path):
    write_tokens(tmp_path, "a_000")
    token_dir(tmp_path).joinpath("b_000.th").parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.randint(0, 1024, (1, 4, 300), dtype=torch.int16), token_dir(tmp_path) / "b_000.th")
    assert prepare(stage3, tmp_path).exit_code() == 0
    bare = [line for line in read_lines(tmp_path) if line["track"] == "b"][0]
    assert bare["median_scale"] is None and bare["frames"] == 300


# ---- the split --------------------------------------------------------------------------------
def test_split_is_by_track_and_deterministic(stage3, tmp_path):
    write_artist(tmp_path, n_tracks=10, clips_per_track=3)
    prepare(stage3, tmp_path, valid_fraction=0.3)
    first_bytes = manifest_path(tmp_path, ARTIST).read_bytes()
    lines = read_lines(tmp_path)
    sides: dict[str, set] = {}
    for line in lines:
        sides.setdefault(line["track"], set()).add(line["split"])
    assert len(sides) == 10 and all(len(split) == 1 for split in sides.values())  # no track on both sides
    assert sum(split == {"valid"} for split in sides.values()) == 3  # round(0.3 x 10) tracks

    prepare(stage3, tmp_path, valid_fraction=0.3, overwrite=True)
    assert manifest_path(tmp_path, ARTIST).read_bytes() == first_bytes  # same inputs, same manifest

    prepare(stage3, tmp_path, valid_fraction=0.3, seed=1)
    assert {line["track"] for line in read_lines(tmp_path) if line["split"] == "valid"} != \
        {line["track"] for line in lines if line["split"] == "valid"}  # the seed picks other tracks


@pytest.mark.parametrize("n_tracks, fraction, expected_valid", [
    (1, 0.05, 0), (2, 0.05, 1), (20, 0.05, 1), (100, 0.05, 5), (3, 1.0, 2), (5, 0.0, 0)])
def test_split_sizes(stage3, n_tracks, fraction, expected_valid):
    tracks = [f"track {index}" for index in range(n_tracks)]
    splits = stage3.split_tracks(tracks, fraction, seed=0)
    assert sum(split == "valid" for split in splits.values()) == expected_valid
    assert set(splits) == set(tracks)


def test_adding_a_track_moves_at_most_one_other(stage3):
    tracks = [f"album/track {index}" for index in range(60)]
    before = stage3.split_tracks(tracks, 0.1, seed=3)
    after = stage3.split_tracks(tracks + ["album/new one"], 0.1, seed=3)
    assert sum(before[track] != after[track] for track in tracks) <= 1


@pytest.mark.parametrize("relative, track", [
    ("album/song [x]_003.th", "album/song [x]"), ("song_1_002.th", "song_1"), ("no index.th", "no index"),
    ("a/b/c_0000.th", "a/b/c")])
def test_track_comes_from_the_clip_name(stage3, tmp_path, relative, track):
    assert stage3.track_of(tmp_path / relative, tmp_path) == track


# ---- broken files ------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this would create a marker file: weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def good_dict(q: int = 4) -> dict:
    return TokenFile(codes=torch.randint(0, 1024, (1, q, 300), dtype=torch.int16), scales=torch.ones(2),
                     num_samples=95_040, bandwidth={4: 6.0, 8: 12.0}[q], codec="random:0").to_dict()


def broken_case(case: str, path: Path, marker: Path) -> str:
    """Write the broken file for `case`; return a phrase its error must contain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = good_dict()
    if case == "codes out of range":
        data["codes"][0, 0, 7] = 1024
        expected = "..1024 leaves 0..1023"  # the low end depends on the random codes
    elif case == "wrong dtype":
        data["codes"] = data["codes"].float()
        expected = "dtype torch.float32"
    elif case == "wrong rank":
        data["codes"] = data["codes"][0]
        expected = "expected [1, Q, T]"
    elif case == "different Q":
        data = good_dict(q=8)
        expected = "Q=8 (12 kbps)"
    elif case == "not a tensor":
        data["codes"] = data["codes"].tolist()
        expected = "not a tensor"
    elif case == "runs code":
        data = {"codes": RunsCode(marker)}
        expected = "not a readable token file"
    elif case == "garbage bytes":
        path.write_bytes(b"\x00\x01 definitely not a zip")
        return "not a readable token file"
    elif case == "zero bytes":
        path.write_bytes(b"")
        return "not a readable token file"
    elif case == "length beyond the codes":
        data["num_samples"] = 300 * 320 + 1
        expected = "more than its 300 frames hold"
    torch.save(data, path)
    return expected


BROKEN_CASES = ["codes out of range", "wrong dtype", "wrong rank", "different Q", "not a tensor", "runs code",
                "garbage bytes", "zero bytes", "length beyond the codes"]


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_a_broken_file_is_named_and_left_out(stage3, tmp_path, case):
    write_artist(tmp_path, n_tracks=2, clips_per_track=2)
    broken = token_dir(tmp_path) / "broken_000.th"
    marker = tmp_path / "code_ran"
    expected = broken_case(case, broken, marker)

    report = prepare(stage3, tmp_path)
    assert report.exit_code() == 1
    assert len(report.failed) == 1 and report.failed[0]["path"] == f"encoded_tokens/{ARTIST}/broken_000.th"
    assert expected in report.failed[0]["reason"]
    audios = [line["audio"] for line in read_lines(tmp_path)]
    assert len(audios) == 4 and not any("broken" in audio for audio in audios)  # the good ones are kept
    assert not marker.exists()  # never executed
    saved_report = json.loads((token_dir(tmp_path) / "manifest_report.json").read_text())
    assert saved_report["failed"] == report.failed and saved_report["exit_status"] == 1


def test_the_code_running_pickle_is_real(tmp_path):
    """Guard for the case above: without weights_only the file does run code."""
    marker = tmp_path / "code_ran"
    broken_case("runs code", tmp_path / "evil.th", marker)
    torch.load(tmp_path / "evil.th", weights_only=False)
    assert marker.exists()


def test_the_majority_layout_wins(stage3, tmp_path):
    write_tokens(tmp_path, "a_000", q=8)
    write_tokens(tmp_path, "b_000", q=4)
    write_tokens(tmp_path, "c_000", q=4)
    report = prepare(stage3, tmp_path)
    assert [item["path"] for item in report.failed] == [f"encoded_tokens/{ARTIST}/a_000.th"]
    assert "--bandwidth 6" in report.failed[0]["reason"]
    assert {line["codebooks"] for line in read_lines(tmp_path)} == {4}


# ---- reruns and exit codes ---------------------------------------------------------------------
def test_rerun_skips_until_something_changes(stage3, tmp_path):
    write_artist(tmp_path, n_tracks=2, clips_per_track=1)
    prepare(stage3, tmp_path)
    output = manifest_path(tmp_path, ARTIST)
    stamp = output.stat().st_mtime_ns
    again = prepare(stage3, tmp_path)
    assert again.done == [] and output.stat().st_mtime_ns == stamp

    write_tokens(tmp_path, "late_000")
    grown = prepare(stage3, tmp_path)
    assert len(grown.done) == 3 and len(read_lines(tmp_path)) == 3
    assert len(prepare(stage3, tmp_path, overwrite=True).done) == 3


def test_rerun_repeats_the_earlier_failures(stage3, tmp_path):
    write_artist(tmp_path, n_tracks=2, clips_per_track=1)
    broken_case("wrong dtype", token_dir(tmp_path) / "bad_000.th", tmp_path / "unused")
    assert prepare(stage3, tmp_path).exit_code() == 1
    assert prepare(stage3, tmp_path).exit_code() == 1  # nothing changed, still one file left out


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "only broken files"])
def test_nothing_usable_exits_2(stage3, quiet_main, tmp_path, caplog, case):
    if case != "missing folder":
        token_dir(tmp_path).mkdir(parents=True)
    if case == "only broken files":
        broken_case("garbage bytes", token_dir(tmp_path) / "x_000.th", tmp_path / "unused")
    assert quiet_main("--artist", ARTIST, "--root", tmp_path) == 2
    expected = {"missing folder": "does not exist", "empty folder": "holds no .th files",
                "only broken files": "none of the 1 token file(s)"}[case]
    assert expected in caplog.text
    assert not manifest_path(tmp_path, ARTIST).exists()


def test_cli_logs_counts(quiet_main, tmp_path, caplog):
    write_artist(tmp_path, n_tracks=3, clips_per_track=2)
    with caplog.at_level(logging.INFO):
        assert quiet_main("--artist", ARTIST, "--root", tmp_path, "--valid-fraction", "0.4", "--seed", "2") == 0
    assert "train: 2 track(s), 4 clip(s)" in caplog.text and "valid: 1 track(s), 2 clip(s)" in caplog.text


def test_script_runs_and_refuses_a_bad_fraction(tmp_path):
    write_artist(tmp_path, n_tracks=2, clips_per_track=1)
    bad = run_script("3_data_preparation.py", "--artist", ARTIST, "--root", tmp_path, "--valid-fraction", "1.5")
    assert bad.returncode == 2 and "--valid-fraction" in bad.stderr
    good = run_script("3_data_preparation.py", "--artist", ARTIST, "--root", tmp_path)
    assert good.returncode == 0, good.stderr
    assert len(read_lines(tmp_path)) == 2


# ---- with stage 2 -----------------------------------------------------------------------------
def test_stage2_output_becomes_a_manifest(stage2, stage3, random_codec, tmp_path):
    for relative in ("album/one_000", "album/one_001", "two_000"):
        path = tmp_path / "data_processed" / ARTIST / f"{relative}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, sine_tone(0.3), 48_000)
    stage2.tokenize_artist(tmp_path, ARTIST, codec=random_codec, log=logging.getLogger("test.stage2"))
    report = prepare(stage3, tmp_path)
    assert report.exit_code() == 0
    lines = read_lines(tmp_path)
    assert [line["track"] for line in lines] == ["album/one", "album/one", "two"]
    assert [line["source"] for line in lines] == [f"data_processed/{ARTIST}/{name}.wav"
                                                  for name in ("album/one_000", "album/one_001", "two_000")]
    assert {line["split"] for line in lines} == {"train", "valid"}  # two tracks: one on each side
    # the file holds one 150-frame chunk; 0.3 s of audio fills only the first 45 (14,400 / 320)
    assert all(line["frames"] == 45 and line["duration"] == pytest.approx(0.3) for line in lines)
