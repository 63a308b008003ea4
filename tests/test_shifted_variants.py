"""Sub-frame shifted variants (stage 2's --shifts): other encodings of the same clips, written by stage 2,
listed by stage 3 under their clip, and drawn among by stage 4's training windows only."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import soundfile as sf
import torch

from helpers import sine_tone
from pipeline.contract import load_token_file, shift_offsets, variant_path
from pipeline.stages import load_stage

ARTIST = "Band"


@pytest.fixture(scope="module")
def stage2():
    return load_stage("2_Tokenization")


def write_clip(root: Path, relative: str, seconds: float = 0.4, freq: float = 330.0) -> Path:
    """A clip below data_processed/<ARTIST>/ as stage 1 would write it."""
    path = root / "data_processed" / ARTIST / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, sine_tone(seconds, freq=freq), 48_000)  # [S, 2]
    return path


def tokenize(stage2, root, codec, **options):
    return stage2.tokenize_artist(root, ARTIST, codec=codec, log=logging.getLogger("test.shifts"), **options)


def token_path(root: Path, relative: str, shift: int = 0) -> Path:
    return variant_path((root / "encoded_tokens" / ARTIST / relative).with_suffix(".th"), shift)


def mtimes(root: Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in (root / "encoded_tokens" / ARTIST).rglob("*.th")}


# ---- stage 2 ------------------------------------------------------------------------------------
def test_offsets_spread_over_one_hop_and_name_their_files():
    assert shift_offsets(1) == [0] and shift_offsets(3) == [0, 107, 213] and shift_offsets(4) == [0, 80, 160, 240]
    assert len(set(shift_offsets(320))) == 320
    with pytest.raises(ValueError, match="1..320"):
        shift_offsets(321)
    assert variant_path(Path("a/song_000.th"), 107) == Path("a/song_000.shift107.th")
    assert variant_path(Path("a/song_000.th"), 0) == Path("a/song_000.th")


def test_shifts_write_a_file_per_offset_with_other_tokens_and_a_rerun_skips_them(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "album/song_000.wav")
    report = tokenize(stage2, tmp_path, random_codec, shifts=3)
    assert report.exit_code() == 0 and len(report.done) == 3
    assert report.details["shift_samples"] == [0, 107, 213]
    clip = load_token_file(token_path(tmp_path, "album/song_000"))
    assert clip.shift_samples == 0
    assert "shift_samples" not in torch.load(token_path(tmp_path, "album/song_000"), weights_only=True)
    wave = torch.from_numpy(sf.read(tmp_path / "data_processed" / ARTIST / "album/song_000.wav",
                                    dtype="float32")[0].T.copy())  # [S, 2] -> [2, S]
    for shift in (107, 213):
        variant = load_token_file(token_path(tmp_path, "album/song_000", shift))
        assert variant.shift_samples == shift and variant.codes.shape == clip.codes.shape
        assert variant.num_samples == clip.num_samples and variant.source == clip.source
        assert not torch.equal(variant.codes, clip.codes), "a shifted variant has the clip's own tokens"
        moved = torch.cat([wave[:, shift:], torch.zeros(2, shift)], dim=1)  # [2, S]: the music `shift` samples on
        codes, _ = random_codec.encode(moved[None], 6.0)  # [1, 2, S] -> [1, Q, T]
        assert torch.equal(variant.codes, codes.to(torch.int16))
    before = mtimes(tmp_path)
    again = tokenize(stage2, tmp_path, random_codec, shifts=3)
    assert len(again.done) == 0 and len(again.skipped) == 3 and mtimes(tmp_path) == before


def test_one_shift_writes_what_a_run_without_the_option_writes(stage2, random_codec, tmp_path):
    for root in (tmp_path / "plain", tmp_path / "one", tmp_path / "three"):
        write_clip(root, "song_000.wav")
    tokenize(stage2, tmp_path / "plain", random_codec)
    tokenize(stage2, tmp_path / "one", random_codec, shifts=1)
    tokenize(stage2, tmp_path / "three", random_codec, shifts=3)
    plain = token_path(tmp_path / "plain", "song_000").read_bytes()
    assert token_path(tmp_path / "one", "song_000").read_bytes() == plain
    assert token_path(tmp_path / "three", "song_000").read_bytes() == plain  # the clip's own file is untouched
    assert sorted(mtimes(tmp_path / "one")) == ["song_000.th"]


def test_another_shift_count_keeps_shared_offsets_and_removes_the_others(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "song_000.wav")
    write_clip(tmp_path, "other_000.wav", freq=500.0)
    tokenize(stage2, tmp_path, random_codec, shifts=2)  # 0, 160
    kept = mtimes(tmp_path)["song_000.shift160.th"]
    report = tokenize(stage2, tmp_path, random_codec, shifts=4)  # 0, 80, 160, 240
    assert len(report.done) == 4 and len(report.skipped) == 4  # two clips x (0, 160) were there already
    assert mtimes(tmp_path)["song_000.shift160.th"] == kept
    tokenize(stage2, tmp_path, random_codec, shifts=3)  # 0, 107, 213: 80, 160, 240 removed
    assert sorted(mtimes(tmp_path)) == ["other_000.shift107.th", "other_000.shift213.th", "other_000.th",
                                        "song_000.shift107.th", "song_000.shift213.th", "song_000.th"]
    tokenize(stage2, tmp_path, random_codec)
    assert sorted(mtimes(tmp_path)) == ["other_000.th", "song_000.th"]


def test_a_variant_recording_another_offset_is_encoded_again(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "song_000.wav")
    tokenize(stage2, tmp_path, random_codec, shifts=2)
    variant = token_path(tmp_path, "song_000", 160)
    variant.write_bytes(token_path(tmp_path, "song_000").read_bytes())  # the clip's file under a variant's name
    report = tokenize(stage2, tmp_path, random_codec, shifts=2)
    assert report.done == [f"data_processed/{ARTIST}/song_000.wav (shifted 160 samples)"]
    assert load_token_file(variant).shift_samples == 160


@pytest.mark.parametrize("value", ["0", "321", "two"])
def test_the_shift_count_is_checked_on_the_command_line(stage2, value, capsys):
    with pytest.raises(SystemExit):
        stage2.parse_args(["--artist", ARTIST, "--shifts", value])
    assert "--shifts" in capsys.readouterr().err


@pytest.mark.parametrize("shift", [320, -1, "107", 1.5, True])
def test_a_token_file_with_an_impossible_offset_is_refused(tmp_path, shift):
    from pipeline.contract import TokenFile, TokenFileError, save_token_file

    path = tmp_path / "song_000.shift107.th"
    token = TokenFile(codes=torch.zeros(1, 4, 150, dtype=torch.int16), scales=torch.ones(1), num_samples=47_520,
                      bandwidth=6.0, extra={"shift_samples": shift})
    save_token_file(token, path)
    with pytest.raises(TokenFileError, match="shift_samples is .*expected an integer 0..319"):
        load_token_file(path)
