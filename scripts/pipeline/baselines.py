"""Count-based baselines that a trained model must beat: per-codebook unigram and bigram.

Both are fitted on the train split's real frames and scored on held-out clips in bits per frame
(the sum over codebooks), the unit stage 4 reports. A model no better than the unigram has learned
only how often each code occurs; one no better than the bigram has learned nothing a count table
of "which code follows which" does not already know.

    unigram  p(x) = (count(x) + 1/2) / (N + 1024/2)                        (add-half smoothing)
    bigram   p(x | a) = l_a * count(a, x) / count(a) + (1 - l_a) * unigram(x),
             l_a = count(a) / (count(a) + distinct successors of a)      (Witten-Bell; no tuning)
    interpolated  p(x | a) = w * bigram(x | a) + (1 - w) * unigram(x), one w per codebook fitted on a
             slice of the train split (the last tenth of every train clip, held out from the counts,
             then the counts are refitted on all of it); never on the held-out clips.

The first frame of a clip has no predecessor: the bigram scores it with the unigram.

On music whose codes follow each other loosely (real songs through a random codec) the Witten-Bell
bigram can score worse than the unigram on held-out clips; the interpolated bigram cannot go far
below its parts, so the yardstick a model is judged against is the best count model: the lower of
the unigram and the interpolated bigram.
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
    interpolated_bits_per_codebook: list
    interpolation_weights: list  # w of each codebook (0: the unigram alone, 1: the bigram alone)

    @property
    def unigram_bits_per_frame(self) -> float:
        return float(sum(self.unigram_bits_per_codebook))

    @property
    def bigram_bits_per_frame(self) -> float:
        return float(sum(self.bigram_bits_per_codebook))

    @property
    def interpolated_bits_per_frame(self) -> float:
        return float(sum(self.interpolated_bits_per_codebook))

    @property
    def best_count_model(self) -> str:
        """"unigram" or "interpolated bigram": whichever scores lower on the held-out clips."""
        return "unigram" if self.unigram_bits_per_frame <= self.interpolated_bits_per_frame else "interpolated bigram"

    @property
    def best_count_bits_per_frame(self) -> float:
        return min(self.unigram_bits_per_frame, self.interpolated_bits_per_frame)

    def as_record(self) -> dict:
        return {"unigram_bits_per_frame": self.unigram_bits_per_frame,
                "bigram_bits_per_frame": self.bigram_bits_per_frame,
                "interpolated_bigram_bits_per_frame": self.interpolated_bits_per_frame,
                "best_count_bits_per_frame": self.best_count_bits_per_frame,
                "best_count_model": self.best_count_model,
                "unigram_bits_per_codebook": list(self.unigram_bits_per_codebook),
                "bigram_bits_per_codebook": list(self.bigram_bits_per_codebook),
                "interpolated_bits_per_codebook": list(self.interpolated_bits_per_codebook),
                "interpolation_weights": list(self.interpolation_weights),
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


class CodebookCounts:
    """The unigram and Witten-Bell bigram of one codebook, fitted on some clips."""

    def __init__(self, train_clips: list[np.ndarray], codebook: int):
        self.codebook = codebook
        self.unigram = unigram_probabilities(train_clips, codebook)  # [1024]
        self.pairs = bigram_counts(train_clips, codebook).reshape(CODEBOOK_SIZE, CODEBOOK_SIZE)  # [a, x]
        self.from_a = self.pairs.sum(axis=1).astype(np.float64)  # [a]
        distinct = (self.pairs > 0).sum(axis=1).astype(np.float64)  # [a]
        self.weight = np.divide(self.from_a, self.from_a + distinct, out=np.zeros_like(self.from_a),
                                where=self.from_a > 0)  # [a]

    def probabilities(self, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unigram, bigram) probability of every token of one clip `[T, Q]`: two `[T]` arrays; the
        bigram scores the first token with the unigram."""
        codes = clip[:, self.codebook].astype(np.int64)  # [T]
        p_unigram = self.unigram[codes]  # [T]
        previous, current = codes[:-1], codes[1:]
        seen = np.divide(self.pairs[previous, current], self.from_a[previous], out=np.zeros(current.size),
                         where=self.from_a[previous] > 0)  # [T-1]
        p_bigram = self.weight[previous] * seen + (1.0 - self.weight[previous]) * self.unigram[current]  # [T-1]
        return p_unigram, np.concatenate([p_unigram[:1], p_bigram])


WEIGHT_GRID = np.linspace(0.0, 1.0, 101)
MAX_SLICE_TOKENS = 1_000_000  # tokens the weight is fitted on, at most: memory and time stay flat as the corpus grows


def fit_interpolation(counts: CodebookCounts, slice_clips: list[np.ndarray]) -> float:
    """The weight w in [0, 1] of the bigram that scores `slice_clips` best (a grid of 0.01 steps).

    On a slice of more than MAX_SLICE_TOKENS tokens, every k-th token of it (evenly spaced, so the
    same every run) is scored: one scalar needs no more, and the cost no longer grows with the corpus."""
    stride = max(1, -(-sum(clip.shape[0] for clip in slice_clips) // MAX_SLICE_TOKENS))  # ceil(N / max)
    pairs = [tuple(p[::stride] for p in counts.probabilities(clip)) for clip in slice_clips if clip.shape[0] > 0]
    if not pairs:
        return 0.5
    unigram = np.concatenate([u for u, _ in pairs])  # [N']
    bigram = np.concatenate([b for _, b in pairs])  # [N']
    bits = [-np.log2(w * bigram + (1 - w) * unigram).sum() for w in WEIGHT_GRID]  # [101], one [N'] at a time
    return float(WEIGHT_GRID[np.argmin(bits)])


def split_train_slice(train_clips: list[np.ndarray], share: float = 0.1) -> tuple[list, list]:
    """(heads, tails): every train clip cut before its last `share` (tails of under 2 frames dropped)."""
    heads, tails = [], []
    for clip in train_clips:
        cut = clip.shape[0] - max(2, int(round(share * clip.shape[0])))
        if cut < 2:
            heads.append(clip)
            continue
        heads.append(clip[:cut])
        tails.append(clip[cut:])
    return heads, tails


def score_codebook(train_clips: list[np.ndarray], eval_clips: list[np.ndarray], codebook: int,
                   weight: float = 0.5) -> tuple[float, float, float]:
    """Mean bits per token of one codebook on `eval_clips`: (unigram, bigram, interpolated with `weight`)."""
    counts = CodebookCounts(train_clips, codebook)
    unigram_bits, bigram_bits, mixed_bits, tokens = 0.0, 0.0, 0.0, 0
    for clip in eval_clips:
        p_unigram, p_bigram = counts.probabilities(clip)  # [T] each
        unigram_bits -= np.log2(p_unigram).sum()
        bigram_bits -= np.log2(p_bigram).sum()
        mixed_bits -= np.log2(weight * p_bigram + (1 - weight) * p_unigram).sum()
        tokens += p_unigram.size
    tokens = max(tokens, 1)
    return unigram_bits / tokens, bigram_bits / tokens, mixed_bits / tokens


def fit_and_score(train_clips: list[np.ndarray], eval_clips: list[np.ndarray]) -> BaselineScores:
    """Clips are code arrays `[T, Q]`; fit on `train_clips` (the interpolation weight on a slice of
    them), score `eval_clips`."""
    n_codebooks = train_clips[0].shape[1]
    heads, tails = split_train_slice(train_clips)
    weights = [fit_interpolation(CodebookCounts(heads, q), tails) for q in range(n_codebooks)]
    scores = [score_codebook(train_clips, eval_clips, q, weights[q]) for q in range(n_codebooks)]
    return BaselineScores(unigram_bits_per_codebook=[s[0] for s in scores],
                          bigram_bits_per_codebook=[s[1] for s in scores],
                          scored_frames=int(sum(clip.shape[0] for clip in eval_clips)),
                          interpolated_bits_per_codebook=[s[2] for s in scores],
                          interpolation_weights=weights)
