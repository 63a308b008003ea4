"""Sampling for the generation core: the sampling settings, the repetition penalty, entropy, top-k /
top-p and the inverse-CDF draw, and the collapse detector that boosts the temperature of a piece
whose distributions have gone flat (a loop, a stuck note).

Nothing here knows about windows, engines or files: `pipeline.generation` calls `sample_tokens` and
the detector once per grid row.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .contract import CODEBOOK_SIZE

LOG = logging.getLogger("pipeline.sampling")


# ==== sampling ================================================================================
@dataclass
class SamplingSettings:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 250  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_window: int = 150


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """Lower every token seen in `recent` `[B, W, Q]` (a negative cell = none) by log(penalty) in logit space.

    Subtracting a constant always lowers that token's probability, whatever the logit's sign
    (dividing a negative logit by the penalty, as the original did, raises it instead).
    """
    batch, n_codebooks, vocab = logits.shape
    index = recent.transpose(1, 2).clone()  # [B, W, Q] -> [B, Q, W]
    index[index < 0] = vocab  # a spare column collects the empty cells
    seen = logits.new_zeros(batch, n_codebooks, vocab + 1).scatter_(2, index, 1.0)[..., :vocab]  # [B, Q, V]
    return logits - math.log(penalty) * seen


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of softmax(logits) over the last axis: `[..., V]` -> `[...]`."""
    return torch.special.entr(torch.softmax(logits, dim=-1)).sum(dim=-1) / math.log(2)


def keep_nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits sorted in descending order `[..., K]`: drop the tail beyond mass `top_p` (the top one always stays)."""
    if top_p >= 1.0:
        return sorted_logits
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    return sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, settings: SamplingSettings,
                  generator: torch.Generator | None, all_greedy: bool | None = None) -> torch.Tensor:
    """Masked logits `[B, Q, V]` and per-piece temperatures `[B]` -> tokens `[B, Q]` (temperature 0 = greedy).

    `all_greedy`, when the caller knows it, says whether every piece is greedy (True) or none is
    (False); None reads it from `temperatures` (on a GPU, a wait for the device).

    All B*Q distributions at once: top-k (sorted only when top-p needs the order), top-p over the k
    candidates, then one uniform number per distribution through the inverse CDF. Random numbers
    are the costly part of sampling on a CPU: one per row instead of one per candidate.
    """
    if all_greedy:
        return logits.argmax(dim=-1)  # [B, Q]
    greedy_pieces = None if all_greedy is False else temperatures <= 0  # [B]
    if greedy_pieces is not None and bool(greedy_pieces.all()):
        return logits.argmax(dim=-1)  # [B, Q]
    scaled = logits / temperatures.clamp_min(1e-6).view(-1, 1, 1)  # [B, Q, V]
    nucleus = settings.top_p < 1.0
    if 0 < settings.top_k < min(scaled.shape[-1], CODEBOOK_SIZE):  # k >= 1024 keeps every code: off
        candidates, token_ids = torch.topk(scaled, settings.top_k, dim=-1, sorted=nucleus)  # [B, Q, k]
    elif nucleus:
        candidates, token_ids = torch.sort(scaled, dim=-1, descending=True)  # [B, Q, V]
    else:
        candidates, token_ids = scaled, None
    probs = torch.softmax(keep_nucleus(candidates, settings.top_p), dim=-1).flatten(0, 1)  # [B*Q, k]
    choice = draw_categorical(probs, generator)  # [B*Q, 1] index among the candidates
    if token_ids is None:
        drawn = choice.view(logits.shape[:2])  # [B*Q, 1] -> [B, Q]
    else:
        drawn = token_ids.flatten(0, 1).gather(1, choice).view(logits.shape[:2])  # [B*Q, 1] -> [B, Q]
    if greedy_pieces is not None and bool(greedy_pieces.any()):
        return torch.where(greedy_pieces.view(-1, 1), logits.argmax(dim=-1), drawn)
    return drawn


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` `[R, K]` (rows sum to 1) -> indices `[R, 1]`, by the inverse CDF."""
    cdf = torch.cumsum(probs, dim=-1)  # [R, K]
    uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    choice = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # [R, 1]; a zero-mass candidate never
    return choice.clamp_max(probs.shape[-1] - 1)  # rounding at the top end stays in range


# ==== collapse detector =======================================================================
@dataclass
class CollapseSettings:
    bits: float = 0.5  # 0 = off
    window: int = 150  # rows (about frames) over which the entropy is averaged
    boost: float = 1.5
    boost_frames: int = 150
    max_temperature: float = 2.0


class CollapseDetector:
    """Per piece and codebook, the mean entropy of the model's sampling distributions over a sliding
    window; a mean below `bits` (a loop or a stuck note) boosts that piece's temperature.

    The entropy is measured at temperature 1, before the boost, so the boost cannot hide the
    collapse it answers. After a trigger the piece's window restarts, so one collapse is one event.
    """

    def __init__(self, settings: CollapseSettings, batch: int, n_codebooks: int, device: str):
        self.settings = settings
        self.history = torch.zeros(batch, n_codebooks, settings.window, device=device)  # [B, Q, W]
        self.filled = torch.zeros(batch, n_codebooks, dtype=torch.long, device=device)  # [B, Q]
        self.boost_left = [0] * batch
        self.events: list[dict] = []
        self._unboosted: torch.Tensor | None = None
        self._unboosted_base: float | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.bits > 0

    def temperatures(self, base: float) -> torch.Tensor:
        """Per-piece temperature `[B]`: boosted pieces decay linearly back to `base`."""
        if not any(self.boost_left):  # the usual case: reuse one tensor instead of building one per step
            if self._unboosted is None or self._unboosted_base != base:  # no device read: no GPU sync
                self._unboosted = torch.full((len(self.boost_left),), base, device=self.history.device)
                self._unboosted_base = base
            return self._unboosted
        extra = [(self.settings.boost - 1.0) * left / self.settings.boost_frames for left in self.boost_left]
        ceiling = max(base, self.settings.max_temperature)
        return torch.tensor([min(base * (1.0 + e), ceiling) for e in extra], device=self.history.device)

    def observe(self, entropy: torch.Tensor, sampled: torch.Tensor, frame: int, base_temperature: float) -> None:
        """Record `entropy` `[B, Q]` for the codebooks that were `sampled` `[Q]` at this row."""
        self.boost_left = [max(0, left - 1) for left in self.boost_left]
        if not self.enabled:
            return
        slot = (self.filled % self.settings.window).unsqueeze(-1)  # [B, Q, 1]
        current = self.history.gather(2, slot).squeeze(-1)  # [B, Q]
        new = torch.where(sampled.view(1, -1), entropy, current)  # [B, Q]
        self.history.scatter_(2, slot, new.unsqueeze(-1))
        self.filled += sampled.view(1, -1).long()
        mean = self.history.mean(dim=-1)  # [B, Q, W] -> [B, Q]
        low = (self.filled >= self.settings.window) & (mean < self.settings.bits)  # [B, Q]
        if bool(low.any()):
            self._trigger(low, mean, frame, base_temperature)

    def _trigger(self, low: torch.Tensor, mean: torch.Tensor, frame: int, base_temperature: float) -> None:
        for piece in torch.nonzero(low.any(dim=1)).flatten().tolist():
            codebooks = torch.nonzero(low[piece]).flatten().tolist()
            self.boost_left[piece] = self.settings.boost_frames
            self.filled[piece] = 0
            temperature = float(self.temperatures(base_temperature)[piece])
            event = {"sample": piece, "frame": frame, "codebooks": codebooks,
                     "mean_entropy_bits": [round(float(mean[piece, q]), 4) for q in codebooks],
                     "threshold_bits": self.settings.bits, "temperature": round(temperature, 4),
                     "boost_frames": self.settings.boost_frames}
            self.events.append(event)
            LOG.warning("collapse in piece %d at frame %d: codebook(s) %s averaged %s bits < %g; temperature "
                        "boosted to %.3g for %d frames", piece, frame, codebooks, event["mean_entropy_bits"],
                        self.settings.bits, temperature, self.settings.boost_frames)
