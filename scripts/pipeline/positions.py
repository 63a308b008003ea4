"""Relative positions for the GPT-2 backbone: rotary embeddings (RoPE) and ALiBi.

`ModelArgs.positions` chooses how a MusicTransformer knows where a row is:

    learned  GPT-2's own learned absolute position table (`wpe`), added to the inputs (the default,
             and what every checkpoint written before `positions` existed is).
    rope     no position table; queries and keys of every layer are rotated by their position
             (Su et al. 2021, the "rotate half" layout), so a score depends on the distance only.
    alibi    no position table; every head adds -slope * distance to its scores (Press et al. 2022,
             slopes 2^(-8 i / H)).

With `rope` or `alibi` the training model does not call transformers' GPT2Model.forward: it runs
GPT-2's own blocks (same weights, same layer norms, MLPs and dropouts) through `relative_forward`
below, which differs from GPT-2's forward only in the attention scores. The lean decoder
(`lean_decoder.py`) uses the same `apply_rope` / `alibi_bias`, so its steps stay exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POSITIONS = ("learned", "rope", "alibi")
ROPE_BASE = 10_000.0


def check_positions(kind: str) -> str:
    if kind not in POSITIONS:
        raise ValueError(f"unknown positions {kind!r}: choose one of {', '.join(POSITIONS)}")
    return kind


# ---- RoPE ---------------------------------------------------------------------------------------
def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions long `[T]` -> (cos, sin), each `[T, head_dim]` (angles computed in float32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head size, got {head_dim}")
    half = head_dim // 2
    frequencies = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32, device=positions.device) / half)  # [hd/2]
    angles = positions.to(torch.float32).unsqueeze(-1) * frequencies  # [T, 1] * [hd/2] -> [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, T, hd]` by tables `[T, hd]` ("rotate half": pairs (i, i + hd/2))."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


# ---- ALiBi --------------------------------------------------------------------------------------
def alibi_slopes(n_head: int) -> torch.Tensor:
    """`[H]` slopes: the geometric series 2^(-8/H), 2^(-16/H), ... (interleaved for H not a power of 2)."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(query_positions: torch.Tensor, key_positions: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """`[Tq]`, `[Tk]` positions, `[H]` slopes -> additive scores `[H, Tq, Tk]`: -slope * (query - key).

    Keys after the query get a positive distance's mirror; the causal mask removes them anyway."""
    distance = (query_positions.unsqueeze(-1) - key_positions.unsqueeze(0)).to(torch.float32)  # [Tq, Tk]
    return -slopes.to(distance.device).view(-1, 1, 1) * distance.abs()


# ---- the training model's forward -------------------------------------------------------------------
def relative_forward(backbone, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, kind: str,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2's blocks on `inputs_embeds` `[B, T, d]` with `kind` positions -> last hidden state `[B, T, d]`.

    `attention_mask` `[B, T]` (1 = attend, 0 = a PAD frame no query may see); `position_ids` `[B, T]`
    or `[T]` (default 0..T-1; every row of a batch uses the first row's)."""
    check_positions(kind)
    if kind == "learned":
        raise ValueError("learned positions run transformers' GPT2Model.forward, not relative_forward")
    config = backbone.config
    batch, length, d_model = inputs_embeds.shape
    n_head = int(config.n_head)
    head_dim = d_model // n_head
    device = inputs_embeds.device
    if position_ids is None:
        positions = torch.arange(length, device=device)
    else:
        positions = (position_ids[0] if position_ids.dim() == 2 else position_ids).to(device)
    causal = positions.unsqueeze(-1) >= positions.unsqueeze(0)  # [T, T]
    mask = causal.view(1, 1, length, length)
    if attention_mask is not None:
        mask = mask & attention_mask.bool().view(batch, 1, 1, length)  # [B, 1, T, T]
    x = backbone.drop(inputs_embeds)
    dtype = x.dtype
    if kind == "rope":
        cos, sin = rope_tables(positions, head_dim)
        scores_mask = mask
    else:
        bias = alibi_bias(positions, positions, alibi_slopes(n_head).to(device)).unsqueeze(0)  # [1, H, T, T]
        scores_mask = bias.masked_fill(~mask, float("-inf"))  # [B or 1, H, T, T]
    dropout = float(config.attn_pdrop) if backbone.training else 0.0
    for block in backbone.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(d_model, dim=2)  # 3 x [B, T, d]
        q, k, v = (part.view(batch, length, n_head, head_dim).transpose(1, 2) for part in (q, k, v))  # [B, H, T, hd]
        if kind == "rope":
            q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_mask, dropout_p=dropout)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_mask.to(q.dtype), dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, length, d_model)  # [B, H, T, hd] -> [B, T, d]
        x = x + block.attn.resid_dropout(block.attn.c_proj(attended))
        x = x + block.mlp(block.ln_2(x))
    return backbone.ln_f(x).to(dtype)
