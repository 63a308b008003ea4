"""Loops: the join is chosen where the model finds the start most likely, the audio join shows no step,
and the WAV's `smpl` chunk round-trips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.contract import BOS, VOCAB_SIZE
from pipeline.loops import (LoopPoints, choose_loop_end, crossfade_loop, frame_nll_bits, join_step_report,
                            read_loop_points, with_loop_points)

PERIOD = 16


class CountingModel(torch.nn.Module):
    """A stand-in that predicts `previous code + 1 (mod 16)` in every codebook with probability ~0.9."""

    def forward(self, tokens, artist=None):  # tokens [B, S, Q]
        logits = torch.full((*tokens.shape, VOCAB_SIZE), -4.0)  # [B, S, Q, V]
        following = torch.where(tokens == BOS, torch.zeros_like(tokens), (tokens + 1) % PERIOD)
        logits.scatter_(-1, following.unsqueeze(-1), 6.0)
        return logits, None


def counting_frames(length: int, n_codebooks: int = 2) -> torch.Tensor:
    return (torch.arange(length) % PERIOD).unsqueeze(-1).expand(length, n_codebooks).unsqueeze(0)  # [1, L, Q]


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_frame_nll_counts_every_token_once(pattern):
    frames = counting_frames(40)
    nll = frame_nll_bits(CountingModel(), frames, pattern)  # [1, 40]
    assert nll.shape == (1, 40)
    assert float(nll[0, 5:].max()) < 1.0  # predictable frames: well under a bit for 2 codebooks
    shuffled = frames.clone()
    shuffled[0, 20] = 7  # a surprise at frame 20
    assert float(frame_nll_bits(CountingModel(), shuffled, pattern)[0, 20]) > 10


def test_the_loop_ends_where_the_start_follows_naturally():
    frames = counting_frames(100)  # generated past the intended end of 70 frames
    end, join_bits = choose_loop_end(CountingModel(), frames, intended_end=70, search_frames=12,
                                     pattern="delay", context=48, join_frames=4)
    assert end % PERIOD == 0 and abs(end - 70) <= 12  # frame end-1 is 15: the start (0) follows it
    assert join_bits < 1.0


def test_the_crossfaded_join_shows_no_step():
    rate = 48_000
    t = np.arange(int(1.3 * rate)) / rate
    audio = np.stack([np.sin(2 * np.pi * 220.3 * t), np.sin(2 * np.pi * 330.1 * t)], axis=1).astype(np.float32)
    cut = int(1.0 * rate)
    assert not join_step_report(audio[:cut])["join_step_ok"]  # a plain cut mid-wave steps
    loop = crossfade_loop(audio, cut, rate)
    assert loop.shape == (cut, 2)
    report = join_step_report(loop)
    assert report["join_step_ok"], report


def test_the_smpl_chunk_round_trips_and_the_audio_still_reads(tmp_path):
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, size=(4800, 2)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, audio, 48_000, format="WAV", subtype="PCM_16")
    looped = with_loop_points(buffer.getvalue(), LoopPoints(0, 4799), 48_000)
    assert read_loop_points(looped) == LoopPoints(0, 4799)
    again = with_loop_points(looped, LoopPoints(10, 4000), 48_000)  # replaced, not added twice
    assert read_loop_points(again) == LoopPoints(10, 4000) and again.count(b"smpl") == 1
    path = tmp_path / "loop.wav"
    path.write_bytes(again)
    data, rate = sf.read(path, dtype="float32")
    assert rate == 48_000 and data.shape == (4800, 2)
    np.testing.assert_allclose(data, audio, atol=1 / 32768 * 1.01)
    assert read_loop_points(buffer.getvalue()) is None
    with pytest.raises(ValueError, match="RIFF"):
        with_loop_points(b"not a wave file", LoopPoints(0, 1), 48_000)
