"""Seamless loops: choose where a piece ends so that its end flows into its start, and mark it in the WAV.

A loop is made from a piece generated past its intended end:

1. `choose_loop_end`: among the frames around the intended end, the loop end `L` is the frame after
   which the model finds the piece's first frames most likely (the lowest NLL of the start given
   the `L` frames before it). The model is the one that made the piece, so the join is judged by
   the same ear that judges every other frame.
2. `crossfade_loop`: the audio that the model generated after `L` is faded into the loop's first
   samples, so the sample after the loop's last one is what naturally followed it: playing the loop
   twice in a row shows no step.
3. `with_loop_points`: a RIFF `smpl` chunk with one forward loop over the whole piece, which
   samplers and game engines read (soundfile/libsndfile ignores it when reading the audio).

`join_report` measures each loop for its sidecar: the NLL of the frames across the join against the
piece's mean per-frame NLL, and the largest sample step at the join against the 99.9th percentile of
the sample steps inside the piece.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .contract import PAD
from .patterns import build_sequence, codebook_offsets

LN2 = float(np.log(2.0))
CROSSFADE_SECONDS = 0.02


# ---- the model's view of a join -------------------------------------------------------------
@torch.no_grad()
def frame_nll_bits(model, frames: torch.Tensor, pattern: str, artist: torch.Tensor | None = None) -> torch.Tensor:
    """NLL of each frame given the frames before it: `[B, L, Q]` frames -> `[B, L]` bits per frame."""
    inputs, targets = build_sequence(frames, pattern)  # [B, S, Q] each
    logits, _ = model(inputs, artist=artist)  # [B, S, Q, V]
    nll = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), ignore_index=PAD,
                          reduction="none").view(targets.shape) / LN2  # [B, S, Q]
    offsets = codebook_offsets(pattern, frames.shape[-1])  # [Q]: row of frame f's codebook q = f + offset q
    length = frames.shape[1]
    per_codebook = [nll[:, int(offsets[q]):int(offsets[q]) + length, q] for q in range(frames.shape[-1])]
    return torch.stack(per_codebook, dim=-1).sum(dim=-1)  # Q x [B, L] -> [B, L]


def join_nll_bits(model, frames: torch.Tensor, end: int, pattern: str, context: int, join_frames: int,
                  artist: torch.Tensor | None = None) -> float:
    """Mean NLL (bits/frame) of the piece's first `join_frames` frames when they follow frame `end - 1`."""
    before = frames[:, max(0, end - context + join_frames):end]  # [1, C, Q]
    joined = torch.cat([before, frames[:, :join_frames]], dim=1)  # [1, C + J, Q]
    return float(frame_nll_bits(model, joined, pattern, artist)[0, -join_frames:].mean())


def join_nll_bits_of_ends(model, frames: torch.Tensor, ends: list[int], pattern: str, context: int, join_frames: int,
                          artist: torch.Tensor | None = None, batch: int = 16) -> dict[int, float]:
    """`join_nll_bits` of every end in `ends` -> {end: bits}. The ends with a full `context` before the join
    are scored `batch` at a time (one forward each); the others, whose windows are shorter, one by one."""
    scores = {end: join_nll_bits(model, frames, end, pattern, context, join_frames, artist)
              for end in ends if end < context - join_frames}
    full = [end for end in ends if end >= context - join_frames]
    for first in range(0, len(full), batch):
        group = full[first:first + batch]
        joined = torch.stack([torch.cat([frames[0, end - context + join_frames:end], frames[0, :join_frames]])
                              for end in group])  # G x [C, Q] -> [G, C, Q]
        rows = None if artist is None else artist.expand(len(group), -1)  # [1, n] -> [G, n]
        bits = frame_nll_bits(model, joined, pattern, rows)[:, -join_frames:].mean(dim=1)  # [G, C] -> [G]
        scores.update(zip(group, bits.tolist()))
    return scores


def choose_loop_end(model, frames: torch.Tensor, intended_end: int, search_frames: int, pattern: str,
                    context: int, join_frames: int = 8, artist: torch.Tensor | None = None) -> tuple[int, float]:
    """(loop end, its join NLL): the end within `intended_end ± search_frames` (inside the generated
    frames) after which the piece's start is most likely."""
    total = frames.shape[1]
    first = max(join_frames + 1, intended_end - search_frames)
    last = min(total, intended_end + search_frames)
    scores = join_nll_bits_of_ends(model, frames, list(range(first, last + 1)), pattern, context, join_frames, artist)
    best = min(scores, key=scores.get)
    return best, scores[best]


def mean_piece_nll_bits(model, frames: torch.Tensor, end: int, pattern: str, context: int,
                        artist: torch.Tensor | None = None) -> float:
    """Mean NLL (bits/frame) of the loop's frames 1..end-1 under the model, window by window: each window
    of at most `context` frames scores its last `context - context // 2` frames after the others."""
    totals, count = 0.0, 0
    step = context - context // 2
    for start in range(0, end, step):
        window = frames[:, max(0, start - context // 2):min(end, start + step)]  # [1, <= context, Q]
        nll = frame_nll_bits(model, window, pattern, artist)[0]  # [W]
        skip = start - max(0, start - context // 2)
        if start == 0:
            skip = 1  # frame 0 has no context at all: the join is compared with frames that have some
        totals += float(nll[skip:].sum())
        count += int(nll[skip:].numel())
    return totals / max(count, 1)


# ---- the audio ------------------------------------------------------------------------------
def crossfade_loop(audio: np.ndarray, loop_samples: int, sample_rate: int,
                   seconds: float = CROSSFADE_SECONDS) -> np.ndarray:
    """`[S, C]` audio generated past the loop -> `[loop_samples, C]`: the samples that followed the loop's
    end are faded (equal power) into its first samples, so the loop's last sample flows into its first."""
    fade = min(int(seconds * sample_rate), audio.shape[0] - loop_samples, loop_samples // 2)
    loop = np.array(audio[:loop_samples], dtype=np.float32, copy=True)
    if fade <= 0:
        return loop
    ramp = np.linspace(0.0, np.pi / 2, fade, dtype=np.float32)[:, None]  # [F, 1]
    loop[:fade] = loop[:fade] * np.sin(ramp) + audio[loop_samples:loop_samples + fade] * np.cos(ramp)
    return loop


def join_step_report(loop: np.ndarray) -> dict:
    """The largest sample step at the join (last sample -> first) against the steps inside the loop."""
    inside = np.abs(np.diff(loop, axis=0)).max(axis=1)  # [S-1]
    join = float(np.abs(loop[0] - loop[-1]).max())
    limit = float(np.percentile(inside, 99.9))
    return {"join_sample_step": round(join, 6), "inside_step_p99_9": round(limit, 6), "join_step_ok": join <= limit}


# ---- the smpl chunk -----------------------------------------------------------------------------
@dataclass
class LoopPoints:
    start: int  # first sample of the loop
    end: int  # last sample of the loop (inclusive, as the smpl chunk counts)


def smpl_chunk(points: LoopPoints, sample_rate: int) -> bytes:
    """A RIFF `smpl` chunk with one forward loop, played forever (play count 0)."""
    header = struct.pack("<9I", 0, 0, round(1e9 / sample_rate), 60, 0, 0, 0, 1, 0)  # 36 bytes, 1 loop
    loop = struct.pack("<6I", 0, 0, points.start, points.end, 0, 0)  # cue id, type 0 = forward
    body = header + loop
    return b"smpl" + struct.pack("<I", len(body)) + body


def with_loop_points(wav: bytes, points: LoopPoints, sample_rate: int) -> bytes:
    """A WAV file's bytes with a `smpl` chunk appended (an existing one replaced) and the RIFF size fixed."""
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    chunks = [(name, body) for name, body in _chunks(wav) if name != b"smpl"]
    chunks.append((b"smpl", smpl_chunk(points, sample_rate)[8:]))
    payload = b"".join(name + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")
                       for name, body in chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WAVE" + payload


def read_loop_points(wav: bytes) -> LoopPoints | None:
    """The first loop of a WAV's `smpl` chunk, or None."""
    for name, body in _chunks(wav):
        if name == b"smpl" and len(body) >= 60 and struct.unpack_from("<I", body, 28)[0] >= 1:
            start, end = struct.unpack_from("<II", body, 36 + 8)
            return LoopPoints(start, end)
    return None


def _chunks(wav: bytes):
    """(name, body) of every chunk after the RIFF header."""
    position = 12
    while position + 8 <= len(wav):
        name, size = wav[position:position + 4], struct.unpack_from("<I", wav, position + 4)[0]
        yield name, wav[position + 8:position + 8 + size]
        position += 8 + size + (size % 2)
