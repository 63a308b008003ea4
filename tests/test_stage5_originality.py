"""The originality report: a piece copied from training is flagged with the right file and time; random
tokens are not; frames from the prompt do not count against the piece."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import originality
from pipeline.originality import WINDOW_FRAMES, TrainingIndex, window_hashes

FRAME_RATE = 150.0


def training_clips(rng, count=4, frames=900, n_codebooks=4):
    return [rng.integers(0, 1024, size=(frames, n_codebooks)) for _ in range(count)]


@pytest.fixture
def index_and_clips(tmp_path):
    rng = np.random.default_rng(0)
    clips = training_clips(rng)
    index = TrainingIndex.build(clips, [f"song_{i}.th" for i in range(len(clips))], FRAME_RATE)
    index.save(tmp_path / "training_index.npz")
    return TrainingIndex.load(tmp_path / "training_index.npz"), clips, rng


def test_window_hashes_equal_for_equal_windows_only():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1024, size=(100, 4))
    hashes = window_hashes(np.concatenate([codes, codes]), 10)  # [191]
    assert np.array_equal(hashes[:91], hashes[100:191])
    assert len(np.unique(hashes[:91])) == 91
    changed = codes.copy()
    changed[50, 3] += 1  # one code of one codebook
    assert not np.array_equal(window_hashes(changed, 10)[41:51], window_hashes(codes, 10)[41:51])


def test_a_bucketed_memory_mapped_build_equals_one_stable_sort_of_every_window(tmp_path, monkeypatch):
    """The build sorts a bucket at a time (memory bounded whatever the corpus): its tables must be the
    ones a single stable sort of every (clip, frame) gives, duplicates in clip order included."""
    rng = np.random.default_rng(3)
    clips = training_clips(rng, count=5, frames=400, n_codebooks=2)
    clips.append(np.concatenate([clips[1][:120], clips[1][:120]]))  # repeated windows: ties across clips
    clips.append(rng.integers(0, 1024, size=(WINDOW_FRAMES - 1, 2)))  # too short for any window
    hashes = [window_hashes(codes, WINDOW_FRAMES) for codes in clips]
    everything = np.concatenate(hashes)
    order = np.argsort(everything, kind="stable")
    expected_clips = np.concatenate([np.full(len(h), i) for i, h in enumerate(hashes)])[order]
    expected_frames = np.concatenate([np.arange(len(h)) for h in hashes])[order]
    monkeypatch.setattr(originality, "BUCKET_ROWS", 64)  # ~32 buckets
    monkeypatch.setattr(originality, "CHUNK_ROWS", 100)  # many chunks, a chunk across clips
    (tmp_path / "work").mkdir()
    for work in (None, tmp_path / "work"):
        table = TrainingIndex.build(clips, [f"song_{i}.th" for i in range(len(clips))], FRAME_RATE, work=work).full
        assert np.array_equal(table.hashes, everything[order])
        assert np.array_equal(table.clips, expected_clips) and np.array_equal(table.frames, expected_frames)
    assert sorted(path.name for path in (tmp_path / "work").iterdir())[:2] == ["codebook0_clips.npy",
                                                                                "codebook0_frames.npy"]


def test_a_piece_built_from_training_tokens_is_flagged_with_file_and_time(index_and_clips):
    index, clips, rng = index_and_clips
    copied = clips[2][300:600]  # 2 s of song_2, starting at 2.0 s
    piece = np.concatenate([rng.integers(0, 1024, size=(150, 4)), copied, rng.integers(0, 1024, size=(150, 4))])
    report = index.report(piece)
    assert report["longest_copy_frames"] == 300
    assert report["longest_copy_seconds"] == pytest.approx(2.0)
    assert report["training_file"] == "song_2.th"
    assert report["training_seconds"] == pytest.approx(2.0)
    assert report["piece_seconds"] == pytest.approx(1.0)
    windows = len(piece) - WINDOW_FRAMES + 1
    assert report["copied_share"] == pytest.approx((300 - WINDOW_FRAMES + 1) / windows, abs=1e-4)
    assert report["codebook0"]["longest_copy_frames"] >= 300  # the looser match sees it too


def test_random_tokens_are_not_flagged(index_and_clips):
    index, _, rng = index_and_clips
    report = index.report(rng.integers(0, 1024, size=(9000, 4)))  # 60 s
    assert report["copied_windows"] == 0 and report["longest_copy_seconds"] == 0.0
    assert report["training_file"] is None
    assert report["codebook0"]["copied_windows"] == 0


def test_the_prompt_does_not_count_against_the_piece(index_and_clips):
    index, clips, rng = index_and_clips
    prompt = clips[0][:300]  # the user prompted with a training song's first 2 s
    piece = np.concatenate([prompt, rng.integers(0, 1024, size=(600, 4))])
    report = index.report(piece, prompt_frames=300)
    assert report["copied_windows"] == 0 and report["longest_copy_seconds"] == 0.0
    assert report["prompt_windows"] == 300
    assert report["windows"] == len(piece) - 300 - WINDOW_FRAMES + 1
    assert index.report(piece)["longest_copy_frames"] >= 300  # without the prompt mark it would count


def test_a_piece_shorter_than_a_window_and_an_empty_index():
    empty = TrainingIndex.build([], [], FRAME_RATE)
    report = empty.report(np.zeros((10, 4), dtype=np.int64))
    assert report["windows"] == 0 and report["copied_share"] == 0.0


def test_the_index_of_a_run_holds_the_shifted_variants_it_trained_on_under_their_clip(tmp_path):
    """Training windows also read the clips' shifted variants (stage 2's --shifts): a piece that repeats a
    variant's tokens is a copy too, reported under the clip's file; a valid clip is never indexed."""
    import logging

    from pipeline.train_data import TokenStore

    rng = np.random.default_rng(7)
    clip_a, clip_b, variant_a, valid = (rng.integers(0, 1024, (200, 4)) for _ in range(4))  # [T, Q] each
    codes = np.concatenate([clip_a, clip_b, valid, variant_a]).astype(np.int16)  # the variants after the clips
    store = TokenStore(codes=codes, offsets=np.array([0, 200, 400]), lengths=np.array([200, 200, 200]),
                       splits=["train", "train", "valid"], names=["a.wav", "b.wav", "v.wav"],
                       encoding_rows=np.array([[0, 600], [200, 200], [400, 400]]),
                       encoding_counts=np.array([2, 1, 1]))
    path = originality.write_training_index(store, tmp_path, 150.0, logging.getLogger("test"))
    index = TrainingIndex.load(path)
    assert len(index.full.hashes) == 3 * (200 - WINDOW_FRAMES + 1)  # a, its variant, b: not the valid clip
    report = index.report(variant_a[20:120])
    assert report["copied_share"] == 1.0 and report["training_file"] == "a.wav"
    assert report["longest_copy_frames"] == 100
    assert index.report(valid[:100])["copied_windows"] == 0


def test_a_loaded_index_maps_its_tables_from_the_file_and_finds_what_it_found_in_memory(index_and_clips):
    loaded, clips, _ = index_and_clips  # saved, then loaded
    index = TrainingIndex.build(clips, [f"song_{i}.th" for i in range(len(clips))], FRAME_RATE)  # in memory
    for name in ("full", "codebook0"):
        for part in ("hashes", "clips", "frames"):
            array = getattr(getattr(loaded, name), part)
            assert isinstance(array, np.memmap) and not array.flags.writeable
            assert np.array_equal(array, getattr(getattr(index, name), part))
    piece = np.concatenate([clips[1][10:90], np.random.default_rng(3).integers(0, 1024, (60, clips[1].shape[1]))])
    assert loaded.report(piece) == index.report(piece)
    assert loaded.report(piece)["longest_copy_frames"] == 80
