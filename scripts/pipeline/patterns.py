"""Codebook patterns: how Q codebooks of a frame are laid out as the model's sequence.

The one place that knows them. There is no default pattern anywhere: training chooses one (stage 4's
`--pattern`, default `delay`) and the checkpoint's `token_contract["pattern"]` tells everything after.

parallel: row s holds frame s (all Q codebooks predicted together).
delay:    MusicGen's delay; cell (s, q) holds codebook q of frame s - q, so codebook q sees codebooks
          < q of the same frame before it is predicted.
"""
from __future__ import annotations

import torch

from .contract import BOS, PAD

PATTERNS = ("parallel", "delay")


def check_pattern(pattern: str) -> str:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown codebook pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")
    return pattern


def extra_steps(pattern: str, n_codebooks: int) -> int:
    """Sequence steps beyond the frame count that a pattern needs."""
    return n_codebooks - 1 if check_pattern(pattern) == "delay" else 0


def codebook_offsets(pattern: str, n_codebooks: int) -> torch.Tensor:
    """`[Q]` long: how many rows later than its frame codebook q is placed (0 everywhere in parallel)."""
    if check_pattern(pattern) == "delay":
        return torch.arange(n_codebooks)
    return torch.zeros(n_codebooks, dtype=torch.long)


def delay_shift(frames: torch.Tensor, fill: int) -> torch.Tensor:
    """MusicGen's delay: `[B, L, Q]` -> `[B, L+Q-1, Q]`, codebook k moved k steps later; empty cells = fill."""
    batch, length, n_codebooks = frames.shape
    grid = frames.new_full((batch, length + n_codebooks - 1, n_codebooks), fill)
    for q in range(n_codebooks):
        grid[:, q:q + length, q] = frames[:, :, q]
    return grid


def build_sequence(frames: torch.Tensor, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames `[B, L, Q]` -> (inputs, targets), both `[B, S, Q]`; inputs start with a BOS frame.

    parallel: S = L, inputs = [BOS, f0 .. f(L-2)], targets = [f0 .. f(L-1)].
    delay:    S = L+Q-1 over the delayed grid; empty cells are BOS in inputs ("nothing yet") and
              PAD in targets (ignored), so every real token is a target exactly once in both patterns.
    """
    batch, _, n_codebooks = frames.shape
    bos = frames.new_full((batch, 1, n_codebooks), BOS)
    if check_pattern(pattern) == "parallel":
        return torch.cat([bos, frames[:, :-1]], dim=1), frames
    grid_in = delay_shift(frames, BOS)  # [B, L+Q-1, Q]
    return torch.cat([bos, grid_in[:, :-1]], dim=1), delay_shift(frames, PAD)
