"""Count-based baselines that a trained model must beat: per-codebook unigram and bigram.

Both are fitted on the train split's real frames and scored on held-out clips in bits per frame
(the sum over codebooks), the unit stage 4 reports. A model no better than the unigram has learned
only how often each code occurs; one no better than the bigram has learned nothing a count table
of "which code follows which" does not already know.

    unigram  p(x) = (count(x) + 1/2) / (N + 1024/2)                        (add-half smoothing)
    bigram   p(x | a) = l_a * count(a, x) / count(a) + (1 - l_a) * unigram(x),
             l_a = count(a) / (count(a) + distinct successors of a)      (Witten-Bell; no tuning)

The first frame of a clip has no predecessor: the bigram scores it with the unigram.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import CODEBOOK_SIZE


@dataclass
class BaselineScores:
    """Bits per token of each codebook; `*_bits_per_frame` sums them."""

    unigram_bits_per_codebook: list
    bigram_bits_per_codebook: list
    scored_frames: int

    @property
    def unigram_bits_per_frame(self) -> float:
        return float(sum(self.unigram_bits_per_codebook))

    @property
    def bigram_bits_per_frame(self) -> float:
        return float(sum(self.bigram_bits_per_codebook))

    def as_record(self) -> dict:
        return {"unigram_bits_per_frame": self.unigram_bits_per_frame,
                "bigram_bits_per_frame": self.bigram_bits_per_frame,
                "unigram_bits_per_codebook": list(self.unigram_bits_per_codebook),
                "bigram_bits_per_codebook": list(self.bigram_bits_per_codebook),
                "scored_frames": self.scored_frames}


def unigram_probabilities(train_clips: list[np.ndarray], codebook: int) -> np.ndarray:
    """Add-half unigram of one codebook over the 1024 codes `[1024]`."""
    counts = np.zeros(CODEBOOK_SIZE, dtype=np.float64)
    for clip in train_clips:
        counts += np.bincount(clip[:, codebook].astype(np.int64), minlength=CODEBOOK_SIZE)
    return (counts + 0.5) / (counts.sum() + 0.5 * CODEBOOK_SIZE)


def bigram_counts(train_clips: list[np.ndarray], codebook: int) -> np.ndarray:
    """count(a, x) of consecutive codes within clips, flat `[1024 * 1024]` (index a * 1024 + x)."""
    counts = np.zeros(CODEBOOK_SIZE * CODEBOOK_SIZE, dtype=np.int64)
    for clip in train_clips:
        codes = clip[:, codebook].astype(np.int64)  # [T]
        counts += np.bincount(codes[:-1] * CODEBOOK_SIZE + codes[1:], minlength=counts.size)
    return counts


def score_codebook(train_clips: list[np.ndarray], eval_clips: list[np.ndarray], codebook: int) -> tuple[float, float]:
    """Mean bits per token of one codebook on `eval_clips`: (unigram, bigram)."""
    unigram = unigram_probabilities(train_clips, codebook)  # [1024]
    pairs = bigram_counts(train_clips, codebook).reshape(CODEBOOK_SIZE, CODEBOOK_SIZE)  # [a, x]
    from_a = pairs.sum(axis=1).astype(np.float64)  # [a]
    distinct = (pairs > 0).sum(axis=1).astype(np.float64)  # [a]
    weight = np.divide(from_a, from_a + distinct, out=np.zeros_like(from_a), where=from_a > 0)  # [a]
    unigram_bits, bigram_bits, tokens = 0.0, 0.0, 0
    for clip in eval_clips:
        codes = clip[:, codebook].astype(np.int64)  # [T]
        p_unigram = unigram[codes]  # [T]
        previous, current = codes[:-1], codes[1:]
        seen = np.divide(pairs[previous, current], from_a[previous], out=np.zeros(current.size),
                         where=from_a[previous] > 0)  # [T-1]
        p_bigram = weight[previous] * seen + (1.0 - weight[previous]) * unigram[current]  # [T-1]
        unigram_bits -= np.log2(p_unigram).sum()
        bigram_bits -= np.log2(p_unigram[0]) + np.log2(p_bigram).sum()
        tokens += codes.size
    return unigram_bits / max(tokens, 1), bigram_bits / max(tokens, 1)


def fit_and_score(train_clips: list[np.ndarray], eval_clips: list[np.ndarray]) -> BaselineScores:
    """Clips are code arrays `[T, Q]`; fit on `train_clips`, score `eval_clips`."""
    n_codebooks = train_clips[0].shape[1]
    scores = [score_codebook(train_clips, eval_clips, q) for q in range(n_codebooks)]
    return BaselineScores(unigram_bits_per_codebook=[unigram for unigram, _ in scores],
                          bigram_bits_per_codebook=[bigram for _, bigram in scores],
                          scored_frames=int(sum(clip.shape[0] for clip in eval_clips)))
