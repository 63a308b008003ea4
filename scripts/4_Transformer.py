#!/usr/bin/env python3
"""Stage 4: train the multi-codebook GPT-2 on an artist's Encodec tokens.

The model (`MusicTransformer`) and the codebook patterns live here; stage 5 imports them.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.contract import BOS, PAD, VOCAB_SIZE  # noqa: E402

PATTERNS = ("parallel", "delay")
PRESETS = {
    "tiny": dict(d_embed=16, d_model=32, n_layer=2, n_head=2),
    "small": dict(d_embed=32, d_model=256, n_layer=4, n_head=4),
    "base": dict(d_embed=64, d_model=512, n_layer=8, n_head=8),  # the original's size
}


@dataclass
class ModelArgs:
    """Constructor arguments, saved in every checkpoint so stage 5 rebuilds the same model."""

    n_codebooks: int = 4
    d_embed: int = 64
    d_model: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_positions: int = 1504  # context frames + Q (BOS, and the delay pattern's Q-1 extra steps)
    dropout: float = 0.1


class MusicTransformer(nn.Module):
    """Per-codebook embeddings -> concat -> projection -> GPT-2 -> Q heads tied to the embeddings.

    Input tokens `[B, T, Q]` (codes 0..1023, BOS, PAD); output logits `[B, T, Q, VOCAB_SIZE]`
    where position t predicts the tokens of position t+1.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.args = args
        self.embeddings = nn.ModuleList(
            nn.Embedding(VOCAB_SIZE, args.d_embed, padding_idx=PAD) for _ in range(args.n_codebooks))
        self.input_proj = nn.Linear(args.n_codebooks * args.d_embed, args.d_model)
        config = GPT2Config(vocab_size=1, n_embd=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                            n_positions=args.n_positions, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                            attn_pdrop=args.dropout, bos_token_id=None, eos_token_id=None, use_cache=False)
        config._attn_implementation = "sdpa"
        self.backbone = GPT2Model(config)
        self.head_proj = nn.ModuleList(nn.Linear(args.d_model, args.d_embed) for _ in range(args.n_codebooks))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[B, T, Q]` -> model inputs `[B, T, d_model]`."""
        per_codebook = [table(tokens[..., q]) for q, table in enumerate(self.embeddings)]  # Q x [B, T, d_embed]
        return self.input_proj(torch.cat(per_codebook, dim=-1))  # [B, T, Q*d_embed] -> [B, T, d_model]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[B, T, d_model]` -> logits `[B, T, Q, V]`, each head tied to its embedding table."""
        per_codebook = [proj(hidden) @ table.weight.T  # [B, T, d_embed] @ [d_embed, V] -> [B, T, V]
                        for proj, table in zip(self.head_proj, self.embeddings)]
        return torch.stack(per_codebook, dim=2)  # Q x [B, T, V] -> [B, T, Q, V]

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                use_cache: bool = False, position_ids: torch.Tensor | None = None):
        """tokens `[B, T, Q]` -> (logits `[B, T, Q, V]`, cache or None).

        `attention_mask` `[B, past+T]` (1 = attend) defaults to `padding_mask(tokens)` without a cache.
        """
        if attention_mask is None and cache is None:
            attention_mask = padding_mask(tokens)
        out = self.backbone(inputs_embeds=self.embed(tokens), attention_mask=attention_mask, cache=cache,
                            use_cache=use_cache, position_ids=position_ids)
        return self.logits(out.last_hidden_state), (out.cache if use_cache else None)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, T, Q]` -> `[B, T]` long: 0 where ANY codebook of the frame is PAD, else 1."""
    return (tokens != PAD).all(dim=-1).long()


# ---- codebook patterns ---------------------------------------------------------------------
def delay_shift(frames: torch.Tensor, fill: int) -> torch.Tensor:
    """MusicGen's delay: `[B, L, Q]` -> `[B, L+Q-1, Q]`, codebook k moved k steps later; empty cells = fill."""
    batch, length, n_codebooks = frames.shape
    grid = frames.new_full((batch, length + n_codebooks - 1, n_codebooks), fill)
    for q in range(n_codebooks):
        grid[:, q:q + length, q] = frames[:, :, q]
    return grid


def delay_unshift(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of `delay_shift`: `[B, S, Q]` -> `[B, S-Q+1, Q]`."""
    n_codebooks = grid.shape[-1]
    length = grid.shape[1] - n_codebooks + 1
    return torch.stack([grid[:, q:q + length, q] for q in range(n_codebooks)], dim=-1)


def build_sequence(frames: torch.Tensor, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames `[B, L, Q]` -> (inputs, targets), both `[B, S, Q]`; inputs start with a BOS frame.

    parallel: S = L, inputs = [BOS, f0 .. f(L-2)], targets = [f0 .. f(L-1)].
    delay:    S = L+Q-1 over the delayed grid; empty cells are BOS in inputs ("nothing yet") and
              PAD in targets (ignored), so every real token is a target exactly once in both patterns.
    """
    batch, _, n_codebooks = frames.shape
    bos = frames.new_full((batch, 1, n_codebooks), BOS)
    if pattern == "parallel":
        return torch.cat([bos, frames[:, :-1]], dim=1), frames
    if pattern == "delay":
        grid_in = delay_shift(frames, BOS)  # [B, L+Q-1, Q]
        return torch.cat([bos, grid_in[:, :-1]], dim=1), delay_shift(frames, PAD)
    raise ValueError(f"unknown pattern {pattern!r}: choose one of {', '.join(PATTERNS)}")


def extra_steps(pattern: str, n_codebooks: int) -> int:
    """Sequence steps beyond the frame count that a pattern needs."""
    return n_codebooks - 1 if pattern == "delay" else 0


def model_args_for(preset: str, n_codebooks: int, context_frames: int, overrides: dict | None = None) -> ModelArgs:
    """Preset sizes, overridden by explicit flags, with room for `context_frames` plus BOS and delay steps."""
    values = dict(PRESETS[preset])
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return ModelArgs(n_codebooks=n_codebooks, n_positions=context_frames + n_codebooks, **values)


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` prefixes (older checkpoints)."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key.replace("._orig_mod.", ".").replace(".module.", ".")] = value
    return cleaned
