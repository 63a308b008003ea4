"""Sub-frame shifted variants (stage 2's --shifts): other encodings of the same clips, written by stage 2,
listed by stage 3 under their clip, and drawn among by stage 4's training windows only."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import SCRIPTS, TINY, assert_same_weights, finished_files, load, results, sine_tone, write_dataset
from pipeline import runs, token_cache, train_data
from pipeline.cli import StageError
from pipeline.contract import (PAD, TokenFile, TokenFileError, load_token_file, save_token_file, shift_offsets,
                               variant_path)
from pipeline.manifest import manifest_path, read_manifest

ARTIST = "Band"


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
    return {path.name: path.stat().st_mtime_ns for path in finished_files(root / "encoded_tokens" / ARTIST, ".th")}


# ---- stage 2 ------------------------------------------------------------------------------------
def test_offsets_spread_over_one_hop_and_name_their_files():
    assert shift_offsets(1) == [0] and shift_offsets(3) == [0, 107, 213] and shift_offsets(4) == [0, 80, 160, 240]
    assert len(set(shift_offsets(320))) == 320
    with pytest.raises(ValueError, match="1..320"):
        shift_offsets(321)
    assert variant_path(Path("a/song_000.th"), 107) == Path("a/song_000.shift107.th")
    assert variant_path(Path("a/song_000.th"), 0) == Path("a/song_000.th")


def test_shifts_write_a_file_per_offset_with_other_tokens_and_a_rerun_skips_them(stage2, stage3, random_codec,
                                                                                 tmp_path):
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
    assert stage3.prepare_artist(tmp_path, ARTIST, log=logging.getLogger("test.shifts")).exit_code() == 0
    [line] = manifest_lines(tmp_path)
    assert line["variants"] == [f"encoded_tokens/{ARTIST}/album/song_000.shift{s}.th" for s in (107, 213)]


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
    tokenize(stage2, tmp_path, random_codec)  # without --shifts: the variants are left alone
    assert len(mtimes(tmp_path)) == 6
    tokenize(stage2, tmp_path, random_codec, shifts=1)
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
    path = tmp_path / "song_000.shift107.th"
    token = TokenFile(codes=torch.zeros(1, 4, 150, dtype=torch.int16), scales=torch.ones(1), num_samples=47_520,
                      bandwidth=6.0, extra={"shift_samples": shift})
    save_token_file(token, path)
    with pytest.raises(TokenFileError, match="shift_samples is .*expected an integer 0..319"):
        load_token_file(path)


# ---- stage 3 ------------------------------------------------------------------------------------
def write_encoding(root: Path, relative: str, shift: int = 0, q: int = 4, n_chunks: int = 2,
                   num_samples: int = 2 * 47_520, seed: int | None = None) -> Path:
    """A clip's token file (shift 0) or one of its variants, as stage 2 writes them, without the codec."""
    generator = torch.Generator().manual_seed(seed if seed is not None else zlib.crc32(f"{relative}:{shift}".encode()))
    codes = torch.randint(0, 1024, (1, q, 150 * n_chunks), generator=generator, dtype=torch.int16)  # [1, Q, T]
    path = token_path(root, relative, shift)
    save_token_file(TokenFile(codes=codes, scales=torch.full((n_chunks,), 0.1), num_samples=num_samples,
                              bandwidth={2: 3.0, 4: 6.0, 8: 12.0}[q], codec="random:0",
                              source=f"data_processed/{ARTIST}/{relative}.wav", shift_samples=shift), path)
    return path


def write_shifted_artist(root: Path, n_tracks: int = 6, clips_per_track: int = 2, shifts: int = 3) -> None:
    for track in range(n_tracks):
        for clip in range(clips_per_track):
            for shift in shift_offsets(shifts):
                write_encoding(root, f"album/song{track}_{clip:03d}", shift, seed=track * 1000 + clip * 10 + shift)


def prepare(stage3, root, **options):
    return stage3.prepare_artist(root, ARTIST, log=logging.getLogger("test.shifts"), **options)


def manifest_lines(root: Path) -> list[dict]:
    return manifest_lines_of(root, ARTIST)


def manifest_lines_of(root: Path, artist: str) -> list[dict]:

    return [json.loads(line) for line in manifest_path(root, artist).read_text(encoding="utf-8").splitlines()]


def test_the_manifest_lists_each_clips_variants_under_it_and_splits_by_track_as_without(stage3, tmp_path):
    write_shifted_artist(tmp_path / "shifted")
    write_shifted_artist(tmp_path / "plain", shifts=1)
    report = prepare(stage3, tmp_path / "shifted", valid_fraction=0.34)
    assert report.exit_code() == 0 and len(report.done) == 12
    prepare(stage3, tmp_path / "plain", valid_fraction=0.34)
    lines, plain = manifest_lines(tmp_path / "shifted"), manifest_lines(tmp_path / "plain")
    assert [line["audio"] for line in lines] == [line["audio"] for line in plain]  # no variant is a clip
    assert [line["split"] for line in lines] == [line["split"] for line in plain]  # the split is by track
    assert {line["split"] for line in lines} == {"train", "valid"}
    assert all("variants" not in line for line in plain)
    for line in lines:
        stem = line["audio"].removesuffix(".th")
        assert line["variants"] == [f"{stem}.shift107.th", f"{stem}.shift213.th"]
        assert {key: value for key, value in line.items() if key != "variants"} == plain[lines.index(line)]
    assert report.counters["train_variants"] + report.counters["valid_variants"] == 24
    assert report.counters["valid_variants"] == 2 * sum(line["split"] == "valid" for line in lines)
    entries = read_manifest(manifest_path(tmp_path / "shifted", ARTIST), tmp_path / "shifted")
    assert entries[0]["variant_paths"] == [(tmp_path / "shifted" / name).resolve() for name in lines[0]["variants"]]


@pytest.mark.parametrize("case, reason", [
    ("other q", "Q=2 .* differs from its clip's Q=4"),
    ("other frames", "450 frames.* differs from its clip's .*300 frames"),
    ("other length", "94000 samples\\) differs from its clip's .*95040 samples"),
    ("wrong offset", "records an offset of 5 samples, its name says 107"),
    ("no clip", "a shifted variant of encoded_tokens/Band/lone_000.th, which does not exist"),
    ("unreadable", "not a readable token file"),
])
def test_a_variant_unlike_its_clip_is_left_out_with_its_reason(stage3, tmp_path, case, reason):
    write_shifted_artist(tmp_path, n_tracks=2, clips_per_track=1, shifts=3)
    odd = token_path(tmp_path, "album/song0_000", 107)
    if case == "other q":
        write_encoding(tmp_path, "album/song0_000", 107, q=2)
    elif case == "other frames":
        write_encoding(tmp_path, "album/song0_000", 107, n_chunks=3)
    elif case == "other length":
        write_encoding(tmp_path, "album/song0_000", 107, num_samples=94_000)
    elif case == "wrong offset":
        odd.unlink()
        write_encoding(tmp_path, "album/song0_000", 5).rename(odd)
    elif case == "no clip":
        odd = write_encoding(tmp_path, "lone_000", 107)
    elif case == "unreadable":
        odd.write_bytes(b"not a torch file")
    report = prepare(stage3, tmp_path)
    assert report.exit_code() == 1
    assert [item["path"] for item in report.failed] == [odd.relative_to(tmp_path).as_posix()]
    assert re.search(reason, report.failed[0]["reason"]), report.failed[0]["reason"]
    listed = [variant for line in manifest_lines(tmp_path) for variant in line.get("variants", [])]
    assert odd.relative_to(tmp_path).as_posix() not in listed
    assert len(listed) == (4 if case == "no clip" else 3)  # 2 clips x 2 variants, less the odd one


def test_the_variants_of_a_clip_left_out_are_left_out_with_it(stage3, tmp_path):
    write_shifted_artist(tmp_path, n_tracks=2, clips_per_track=1, shifts=2)
    token_path(tmp_path, "album/song1_000").write_bytes(b"broken")
    report = prepare(stage3, tmp_path)
    reasons = {item["path"]: item["reason"] for item in report.failed}
    assert "which was left out" in reasons[f"encoded_tokens/{ARTIST}/album/song1_000.shift160.th"]
    assert [line["audio"] for line in manifest_lines(tmp_path)] == [f"encoded_tokens/{ARTIST}/album/song0_000.th"]


def test_a_variant_added_or_removed_rebuilds_the_manifest(stage3, tmp_path):
    write_shifted_artist(tmp_path, n_tracks=2, clips_per_track=1, shifts=1)
    prepare(stage3, tmp_path)
    assert all("variants" not in line for line in manifest_lines(tmp_path))
    assert prepare(stage3, tmp_path).skipped, "an unchanged folder is up to date"
    added = write_encoding(tmp_path, "album/song0_000", 160)
    assert len(prepare(stage3, tmp_path).done) == 2
    assert manifest_lines(tmp_path)[0]["variants"] == [added.relative_to(tmp_path).as_posix()]
    assert prepare(stage3, tmp_path).skipped
    added.unlink()
    assert len(prepare(stage3, tmp_path).done) == 2
    assert all("variants" not in line for line in manifest_lines(tmp_path))


def test_a_folder_of_variants_alone_is_refused(stage3, tmp_path):
    write_shifted_artist(tmp_path, n_tracks=2, clips_per_track=1, shifts=2)
    token_path(tmp_path, "album/song0_000").unlink()
    token_path(tmp_path, "album/song1_000").unlink()
    with pytest.raises(StageError, match="holds only shifted variants"):
        prepare(stage3, tmp_path)


def test_the_fingerprint_without_variants_is_the_one_from_before_variants(stage3, tmp_path):
    """Manifests written before variants existed stay up to date: the formula is unchanged for them."""
    write_shifted_artist(tmp_path, n_tracks=2, clips_per_track=1, shifts=1)
    paths = stage3.find_token_files(token_path(tmp_path, "x").parent)
    digest = hashlib.sha256(json.dumps([1, 0.05, 0]).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(tmp_path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    assert stage3.inputs_fingerprint(tmp_path, paths, 0.05, 0) == digest.hexdigest()
    assert stage3.inputs_fingerprint(tmp_path, paths, 0.05, 0, has_variants=True) != digest.hexdigest()


# ---- stage 4 ------------------------------------------------------------------------------------
def add_variants(root: Path, shifts=(107, 213), frames: dict | None = None, artist: str = "A") -> None:
    """Shifted variants of every clip of `helpers.write_dataset`'s manifest, listed in it as stage 3 would.
    `frames`: {(clip index, shift): frames} for a variant of another length than its clip."""
    manifest = manifest_path(root, artist)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for index, line in enumerate(lines):
        line["variants"] = []
        for shift in shifts:
            n_frames = (frames or {}).get((index, shift), line["frames"])
            rel = variant_path(Path(line["audio"]), shift).as_posix()
            write_variant(root, rel, n_frames, seed=100 * index + shift, shift=shift)
            line["variants"].append(rel)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_variant(root: Path, rel: str, n_frames: int, seed: int, shift: int) -> None:
    codes = torch.randint(0, 1024, (1, 4, n_frames), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int16)  # [1, Q, T]
    save_token_file(TokenFile(codes=codes, scales=torch.ones(1), num_samples=n_frames * 320, bandwidth=6.0,
                              codec="random:0", chunk_frames=n_frames, shift_samples=shift), root / rel)


def encoding_codes(root: Path, clip: int, encoding: int) -> torch.Tensor:
    """Clip `clip`'s encoding (0: its own file, 1, 2: its shift 107, 213 variants) as frames `[T, Q]`."""
    rel = variant_path(Path(f"encoded_tokens/A/clip_{clip}.th"), (0, 107, 213)[encoding])
    return load_token_file(root / rel).codes[0].T  # [1, Q, T] -> [T, Q]


def test_training_windows_draw_among_the_encodings_and_validation_reads_the_clip(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1)  # clip_2 is valid: its variants are never read
    add_variants(tmp_path)
    data, _ = train_data.load_artists(tmp_path, ["A"])
    store, train = data.store, data.store.clips("train")
    assert store.encoding_counts.tolist() == [3, 3, 1] and data.skipped == []
    windows = train_data.epoch_windows(store, train, 32, seed=5, epoch=1)  # [N, 3]
    plain = dataclasses.replace(store, encoding_rows=None, encoding_counts=None)
    np.testing.assert_array_equal(windows[:, :2], train_data.epoch_windows(plain, train, 32, seed=5, epoch=1))
    assert set(windows[:, 2].tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(windows, train_data.epoch_windows(store, train, 32, seed=5, epoch=1))
    assert not np.array_equal(windows[:, 2], train_data.epoch_windows(store, train, 32, seed=5, epoch=2)[:, 2])
    frames = train_data.gather_frames(store, windows, 32)  # [N, 32, Q]
    for (clip, start, encoding), window in zip(windows, frames):
        expected = encoding_codes(tmp_path, clip, encoding)[start:start + 32]  # [<=32, Q]
        assert torch.equal(window[:len(expected)], expected) and (window[len(expected):] == PAD).all()
    valid = train_data.valid_windows(store, store.clips("valid"), 32)  # [2, 2]: back to back, the clip itself
    assert valid.shape == (2, 2)
    gathered = train_data.gather_frames(store, valid, 32).reshape(-1, 4)[:40]  # [2, 32, Q] -> [40, Q]
    assert torch.equal(gathered, encoding_codes(tmp_path, 2, 0))


def test_without_variants_the_windows_are_those_of_before(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1)
    store = train_data.load_artists(tmp_path, ["A"])[0].store
    assert store.encoding_rows is None and store.encoding_counts is None
    train = store.clips("train")
    rng = np.random.default_rng([5, 1])  # what epoch_windows drew before variants existed
    before = train_data.covering_windows(store, train, 32, rng)
    np.testing.assert_array_equal(train_data.epoch_windows(store, train, 32, seed=5, epoch=1),
                                  before[rng.permutation(len(before))])


def test_a_joint_models_windows_draw_encodings_too(tmp_path):
    write_dataset(tmp_path, "A", lengths=(70, 64, 40), valid=1)
    add_variants(tmp_path, artist="A")
    write_dataset(tmp_path, "B", lengths=(50, 30), valid=1)  # no variants
    store = train_data.load_artists(tmp_path, ["A", "B"])[0].store
    assert store.encoding_counts.tolist() == [3, 3, 1, 1, 1]
    windows = np.concatenate([train_data.balanced_epoch_windows(store, store.clips("train"), 32, seed=0,
                                                                epoch=epoch, alpha=0.5) for epoch in range(4)])
    assert windows.shape[1] == 3 and set(windows[windows[:, 0] < 2, 2].tolist()) == {0, 1, 2}
    assert (windows[windows[:, 0] == 3, 2] == 0).all()  # B's clip reads itself
    frames = train_data.gather_frames(store, windows, 32)
    for (clip, start, encoding), window in zip(windows, frames):
        if clip < 2:
            expected = encoding_codes(tmp_path, clip, encoding)[start:start + 32]
            assert torch.equal(window[:len(expected)], expected)


def test_a_variant_of_another_length_is_skipped_with_its_reason(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1)
    add_variants(tmp_path, frames={(1, 107): 60})
    data, _ = train_data.load_artists(tmp_path, ["A"])
    assert data.store.encoding_counts.tolist() == [3, 2, 1]
    [(audio, reason)] = data.skipped
    assert audio == "encoded_tokens/A/clip_1.shift107.th" and "60 frames of audio, its clip" in reason


def edit_touched_variant(root):
    os.utime(root / "encoded_tokens/A/clip_0.shift107.th", ns=(1, 1))


def edit_rewritten_variant(root):
    write_variant(root, "encoded_tokens/A/clip_0.shift107.th", 70, seed=999, shift=107)


def edit_added_variants(root):
    add_variants(root, shifts=(107, 160, 213))


def edit_removed_variants(root):
    add_variants(root, shifts=(213,))


@pytest.mark.parametrize("edit", [edit_touched_variant, edit_rewritten_variant, edit_added_variants,
                                  edit_removed_variants])
def test_the_packed_cache_is_rebuilt_when_a_variant_changes(tmp_path, monkeypatch, edit):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1)
    add_variants(tmp_path)
    train_data.load_artists(tmp_path, ["A"])
    edit(tmp_path)
    reads, real_load = [], train_data.load_token_file
    monkeypatch.setattr(train_data, "load_token_file", lambda path: reads.append(path) or real_load(path))
    store = train_data.load_artists(tmp_path, ["A"])[0].store
    assert reads, "the cache was trusted after a variant changed"
    variants = manifest_lines_of(tmp_path, "A")[0]["variants"]
    assert store.encoding_counts[0] == 1 + len(variants)
    for encoding, rel in enumerate(variants, start=1):
        row = store.encoding_rows[0, encoding]
        expected = load_token_file(tmp_path / rel).codes[0].T.numpy()  # [T, Q]
        np.testing.assert_array_equal(np.asarray(store.codes)[row:row + 70], expected)


def test_a_cache_without_variants_keeps_the_index_and_layout_of_before(tmp_path):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1)
    store = train_data.load_artists(tmp_path, ["A"])[0].store
    index = json.loads((token_cache.cache_folder(tmp_path, "A") / token_cache.INDEX_FILE).read_text())
    assert all(set(stamp) == {"path", "size", "mtime_ns", "codebooks", "bandwidth"} for stamp in index["entries"])
    assert all("variants" not in record for record in index["records"])
    assert store.offsets.tolist() == [0, 70, 134] and len(store.codes) == 174
    add_variants(tmp_path)
    shifted = train_data.load_artists(tmp_path, ["A"])[0].store
    assert shifted.offsets.tolist() == [0, 70, 134] and len(shifted.codes) == 3 * 174  # variants after the clips
    np.testing.assert_array_equal(np.asarray(shifted.codes)[:174], np.asarray(store.codes))


def trained(stage4, root: Path, *extra) -> dict:
    """A tiny stage-4 run of 2 epochs (2 optimizer steps each) on `root`'s artist A; its last.pt."""
    status = stage4.main(["--artist", "A", "--root", root, *TINY, "--grad-accum", "2", "--epochs", "2", *extra])
    assert status == 0
    return load(results(root) / "last.pt")


@pytest.mark.usefixtures("one_torch_thread")
def test_training_on_variants_resumes_exactly_and_differs_from_training_without(stage4, tmp_path):
    for name in ("plain", "straight", "resumed"):
        write_dataset(tmp_path / name, lengths=(70, 64, 40, 30))
        if name != "plain":
            add_variants(tmp_path / name)
    plain, straight = trained(stage4, tmp_path / "plain"), trained(stage4, tmp_path / "straight")
    assert any(not torch.equal(plain["model"][key], straight["model"][key]) for key in plain["model"]), \
        "training read no variant"
    stopped = trained(stage4, tmp_path / "resumed", "--max-steps", "3")  # stops inside epoch 2
    assert (stopped["epoch"], stopped["epoch_batches_done"]) == (1, 2)
    resumed = trained(stage4, tmp_path / "resumed", "--resume")
    assert_same_weights(resumed["model"], straight["model"])
    # the count baselines read the clips alone: the same as without variants
    baselines = [runs.baseline_record(runs.read_metrics(results(tmp_path / name) / "metrics.jsonl"))
                 for name in ("plain", "resumed")]
    assert baselines[0]["bigram_bits_per_frame"] == baselines[1]["bigram_bits_per_frame"]
    assert baselines[0]["scored_frames"] == baselines[1]["scored_frames"]


@pytest.mark.parametrize("variants, message", [
    ("encoded_tokens/A/clip_0.shift107.th", "'variants' must be a list of token file paths"),
    (["encoded_tokens/A/clip_0.shift5.th"], "variant token file encoded_tokens/A/clip_0.shift5.th does not exist"),
    (["../outside.th"], "outside"),
])
def test_a_manifest_with_bad_variants_is_refused_at_start_up(tmp_path, variants, message):
    write_dataset(tmp_path, lengths=(70, 64, 40), valid=1, entry_overrides={0: {"variants": variants}})
    with pytest.raises(StageError, match=message):
        train_data.load_artists(tmp_path, ["A"])


# ---- run_pipeline.sh ----------------------------------------------------------------------------
@pytest.mark.parametrize("options, passed", [(["--shifts", "3"], ["--shifts", "3"]), ([], [])])
def test_run_pipeline_passes_shifts_to_stage_2_only_when_given(tmp_path, options, passed):
    """Stage 2 is a stand-in that records its arguments (the other calls go to this Python)."""
    calls = tmp_path / "stage2_calls.txt"
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase "$1" in *2_Tokenization.py) printf "%s\\n" "$@" > "{calls}"; '
                      f'exit 0 ;; esac\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPTS / "run_pipeline.sh"), "--root", str(tmp_path), "--stage", "2",
                             "--stop-stage", "2", "--codec", "random:0", *options, ARTIST],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": str(python)}, timeout=120)
    assert result.returncode == 0, result.stderr
    arguments = calls.read_text().splitlines()
    assert ("--shifts" in arguments) == bool(passed)
    if passed:
        assert arguments[arguments.index("--shifts") + 1] == passed[1]


def test_run_pipeline_refuses_an_impossible_shift_count(tmp_path):
    result = subprocess.run(["bash", str(SCRIPTS / "run_pipeline.sh"), "--root", str(tmp_path), "--shifts", "0",
                             ARTIST], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--shifts must be a whole number 1..320, got '0'" in result.stderr
