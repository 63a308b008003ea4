"""Pieces a user can publish: stage 4's training index, every piece's originality report, regeneration of
pieces that copy too much, and seamless loops (a WAV whose smpl chunk round-trips)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import ARTIST, TINY, add_joint_model, make_root, outputs, write_dataset
from pipeline import pieces
from pipeline.contract import CODEBOOK_SIZE, TokenFile, load_token_file, save_token_file
from pipeline.dist import DistInfo
from pipeline.loops import read_loop_points
from pipeline.originality import WINDOW_FRAMES, TrainingIndex
from pipeline.runs import TRAINING_INDEX as INDEX_FILE
from pipeline.train_data import load_artists

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAINING_FILE = "encoded_tokens/demo/song_0.th"


def write_training(root, frames=600) -> np.ndarray:
    """A training clip's tokens `[T, 4]` as a token file under the root, indexed beside the model."""
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, frames), generator=torch.Generator().manual_seed(5))
    save_token_file(TokenFile(codes=codes.to(torch.int16), scales=torch.full((4,), 0.05), num_samples=frames * 320,
                              bandwidth=6.0, codec="random:0"), root / TRAINING_FILE)
    clip = codes[0].T.numpy()  # [1, Q, T] -> [T, Q]
    TrainingIndex.build([clip], [TRAINING_FILE]).save(root / "model_results" / ARTIST / INDEX_FILE)
    return clip


def sidecar(root, name) -> dict:
    return json.loads(outputs(root, name)[".json"].read_text())


# ---- stage 4 writes the index -------------------------------------------------------------------
def test_stage4_indexes_its_train_split_once_per_run(transformer_module, tmp_path):
    write_dataset(tmp_path, lengths=(100, 70, 50))  # clip_2 is the valid split
    assert transformer_module.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    path = tmp_path / "model_results" / "A" / INDEX_FILE
    index = TrainingIndex.load(path)
    assert index.files == ["encoded_tokens/A/clip_0.th", "encoded_tokens/A/clip_1.th"]  # the manifest's names
    assert len(index.full.hashes) == (100 - WINDOW_FRAMES + 1) + (70 - WINDOW_FRAMES + 1)
    clip = load_token_file(tmp_path / "encoded_tokens/A/clip_1.th").codes[0].T.numpy()  # [T, Q]
    report = index.report(clip[10:60])
    assert report["training_file"] == "encoded_tokens/A/clip_1.th" and report["longest_copy_frames"] == 50
    path.unlink()
    assert transformer_module.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2", "--resume"]) == 0
    assert path.is_file()  # a resumed run writes it when it is missing ...
    stamp = path.stat().st_mtime_ns
    data, _ = load_artists(tmp_path, ["A"])
    transformer_module.ensure_training_index(data, path.parent, False, DistInfo(), logging.getLogger("test"))
    assert path.stat().st_mtime_ns == stamp  # ... and keeps it when it is there
    transformer_module.ensure_training_index(data, path.parent, True, DistInfo(), logging.getLogger("test"))
    rebuilt = path.stat().st_mtime_ns
    assert rebuilt != stamp  # a fresh run builds it again
    transformer_module.ensure_training_index(data, path.parent, True, DistInfo(rank=1, world_size=2),
                                             logging.getLogger("test"))
    assert path.stat().st_mtime_ns == rebuilt  # on rank 0 only


def test_the_entry_point_builds_the_index_of_an_older_run(transformer_module, tmp_path):
    from pipeline.originality import main

    write_dataset(tmp_path, lengths=(80, 60))
    assert transformer_module.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    path = tmp_path / "model_results" / "A" / INDEX_FILE
    built = TrainingIndex.load(path)
    path.unlink()
    assert main(["--model", str(tmp_path / "model_results" / "A")]) == 0
    assert TrainingIndex.load(path).files == built.files == ["encoded_tokens/A/clip_0.th"]


# ---- originality in every sidecar -------------------------------------------------------------------
def test_every_piece_carries_its_originality_or_says_why_not(transformer_module, in_process, tmp_path, capsys):
    root = make_root(tmp_path, transformer_module, "delay")
    assert in_process(root, "--seconds", 1.0, "--seed", 1, "--num-samples", 2, "--name", "before") == 0
    assert "pipeline.originality --model" in capsys.readouterr().err
    for name in ("before_0", "before_1"):
        described = sidecar(root, name)
        assert described["originality"] is None and INDEX_FILE in described["originality_reason"]
    write_training(root)
    assert in_process(root, "--seconds", 1.0, "--seed", 1, "--name", "after") == 0
    described = sidecar(root, "after")
    report = described["originality"]
    assert described["originality_reason"] is None
    assert report["windows"] == described["frames"]["total"] - WINDOW_FRAMES + 1 and report["prompt_windows"] == 0
    assert report["longest_copy_seconds"] == 0.0 and report["codebook0"]["copied_windows"] == 0


def test_a_prompt_from_training_does_not_count_against_the_piece(transformer_module, in_process, tmp_path):
    root = make_root(tmp_path, transformer_module, "delay")
    clip = write_training(root)
    assert in_process(root, "--prompt-tokens", root / TRAINING_FILE, "--prompt-seconds", 1.0, "--seconds", 1.5,
                      "--seed", 2, "--name", "continued") == 0
    described = sidecar(root, "continued")
    report, prompt = described["originality"], described["prompt"]["frames"]  # 1 s: 152 frames (2 codec chunks)
    assert report["prompt_windows"] == prompt and report["copied_windows"] == 0  # the prompt's windows stand apart
    frames = load_token_file(outputs(root, "continued")[".th"]).codes[0, :, :described["frames"]["total"]].T.numpy()
    assert np.array_equal(frames[:prompt], clip[:prompt])  # [T, Q]
    unmarked = TrainingIndex.load(root / "model_results" / ARTIST / INDEX_FILE).report(frames)
    assert unmarked["longest_copy_frames"] == prompt  # what it would say without the mark


def copying_generation(clip: np.ndarray, monkeypatch) -> list:
    """Make the generation core return training frames after the prompt: every take copies. -> the seeds."""
    real, seeds = pieces.generate_frames, []

    def copying(model, prompt, total_frames, settings, sampling, collapse, seed, *args, **kwargs):
        frames, detector = real(model, prompt, total_frames, settings, sampling, collapse, seed, *args, **kwargs)
        copied = torch.from_numpy(clip[:total_frames]).long().expand_as(frames).clone()  # [N, Q] -> [B, N, Q]
        seeds.append(seed)
        return copied, detector

    monkeypatch.setattr(pieces, "generate_frames", copying)
    return seeds


def test_a_copying_piece_is_regenerated_then_kept_with_a_warning(transformer_module, in_process, tmp_path,
                                                                 monkeypatch, capsys):
    root = make_root(tmp_path, transformer_module, "parallel")
    seeds = copying_generation(write_training(root), monkeypatch)
    assert in_process(root, "--seconds", 1.0, "--seed", 3, "--max-copy-seconds", 0, "--max-copy-retries", 2,
                      "--decode-at-end", "--name", "copied") == 0
    assert len(seeds) == 3 and seeds[0] == 3 and len(set(seeds)) == 3  # the job, then two new seeds
    report = sidecar(root, "copied")["originality"]
    assert [attempt["seed"] for attempt in report["attempts"]] == seeds
    total = sidecar(root, "copied")["frames"]["total"]  # 1 s: 152 frames (two codec chunks)
    assert report["longest_copy_frames"] == total and report["training_file"] == TRAINING_FILE
    assert "over --max-copy-seconds 0" in report["warning"] and report["max_copy_seconds"] == 0.0
    assert "over --max-copy-seconds 0" in capsys.readouterr().err


def test_max_copy_seconds_keeps_an_original_piece_and_needs_an_index(transformer_module, in_process, tmp_path,
                                                                     capsys):
    root = make_root(tmp_path, transformer_module, "delay")
    assert in_process(root, "--seconds", 1.0, "--max-copy-seconds", 0.5, "--name", "unchecked") == 2
    assert "--max-copy-seconds needs the model's training index" in capsys.readouterr().err
    write_training(root)
    assert in_process(root, "--seconds", 1.0, "--seed", 4, "--max-copy-seconds", 0, "--name", "new") == 0
    report = sidecar(root, "new")["originality"]
    assert report["warning"] is None and [attempt["seed"] for attempt in report["attempts"]] == [4]


# ---- loops ------------------------------------------------------------------------------------------
def test_a_loop_wav_carries_its_smpl_chunk_and_each_piece_its_own_end(transformer_module, in_process, random_codec,
                                                                     tmp_path):
    from pipeline.decoding import frames_for_samples

    root = make_root(tmp_path, transformer_module, "delay")
    intended = frames_for_samples(random_codec, 72_000)  # 1.5 s
    assert in_process(root, "--seconds", 1.5, "--seed", 6, "--num-samples", 2, "--loop", "--name", "loop") == 0
    for name in ("loop_0", "loop_1"):
        files, described = outputs(root, name), sidecar(root, name)
        loop = described["loop"]
        points = read_loop_points(files[".wav"].read_bytes())
        wave, rate = sf.read(files[".wav"])
        assert rate == 48_000 and wave.shape == (loop["end_sample"] + 1, 2)
        assert (points.start, points.end) == (loop["start_sample"], loop["end_sample"]) == (0, wave.shape[0] - 1)
        assert abs(loop["end_frame"] - intended) <= 38  # near the asked 1.5 s: within half the 0.5 s generated past it
        assert described["audio_samples"] == wave.shape[0] and described["frames"]["total"] == loop["end_frame"]
        tokens = load_token_file(files[".th"])
        assert tokens.num_samples == wave.shape[0] and tokens.extra["loop"] is True
        assert {"join_nll_bits", "piece_mean_nll_bits", "join_within_10_percent", "join_sample_step",
                "inside_step_p99_9", "join_step_ok"} <= set(loop)
        assert loop["join_step_ok"] and loop["join_sample_step"] <= loop["inside_step_p99_9"]


def test_a_joint_model_loops_with_its_artist_label(transformer_module, in_process, tmp_path, monkeypatch):
    root = make_root(tmp_path, transformer_module, "delay")
    add_joint_model(root, transformer_module)
    labels = []
    real = pieces.choose_loop

    def recording(model, frames, plan, pattern, context, artist_weights, device):
        labels.append(artist_weights)
        return real(model, frames, plan, pattern, context, artist_weights, device)

    monkeypatch.setattr(pieces, "choose_loop", recording)
    assert in_process(root, "--model", "mix", "--artist", "High", "--seconds", 1.0, "--seed", 1, "--loop",
                      "--name", "joint") == 0
    assert labels == [(0.0, 1.0, 0.0)]  # the label the piece was generated with
    described = json.loads((root / "music_transformer" / "High" / "joint.json").read_text())
    assert described["loop"]["join_step_ok"] and described["conditioning"]["label"] == "High"
