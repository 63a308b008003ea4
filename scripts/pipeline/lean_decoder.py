"""A lean incremental decoder over a trained MusicTransformer's own GPT-2 weights.

The training model runs transformers' GPT-2 stack; at one frame per step that stack spends most of
its time on per-call bookkeeping (module calls, mask building, cache objects). This decoder runs the
same blocks as a handful of tensor operations per layer on a preallocated KV cache:

    x   = model.embed(tokens) + wpe[position]                    # the model's own input end
    per layer:  x += c_proj(attention(c_attn(ln_1(x)), cache))   # GPT-2's fused QKV projection
                x += mlp(ln_2(x))
    logits = model.logits(ln_f(x))                               # the model's own output end

The two ends are the model's `embed` and `logits` methods, so a change to either (untied heads,
conditioning) needs nothing here beyond passing `artist` (the rows' artist labels or blend weights,
fixed for the decoder's life) to `embed`. The parameters are read from the model: no conversion
step and no second checkpoint format. GPT-2's `Conv1D` stores its weight as `[in, out]`, hence
`addmm(bias, x, weight)` — except for steps of 2 or 3 rows on a CPU (classifier-free guidance of one
piece is 2 rows): there the BLAS repacks an `[in, out]` matrix before a product with a few rows,
which made a guided step of `base` cost 1.4x a one-row step; an `[out, in]` copy of each weight,
made once per weight version and kept while the model lives, brings that to 1.17x (BENCHMARKS.md).

Two ways to step:
- `step` (the CPU default) attends to the cache slice `[..., :length]`: no mask at all.
- `step_static` keeps every shape fixed (the whole cache and a validity mask, the write position
  a device tensor), so a CUDA graph can capture it once and replay it every step (`GraphedStep`).
  Given `visible` (the slots `[position + 1]` a row may see) it attends to that slice instead, with
  no mask: the form a TorchScript trace replays on a CPU (`TracedStep`), the attended length
  following the size of `visible`.

Relative positions (`model.args.positions`, `pipeline.positions`): with `rope` no position row is
added and queries and keys are rotated by their position before the keys enter the cache (the
cache holds rotated keys); with `alibi` every head adds -slope * distance to its scores. The
rotation tables and slopes are made once per decoder.
"""
from __future__ import annotations

import logging
import warnings
import weakref

import torch
import torch.nn.functional as F

from .positions import alibi_bias, alibi_slopes, apply_rope, rope_tables
from .precision import ReducedLinear

LOG = logging.getLogger("pipeline.lean_decoder")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
ROW_MAJOR_ROWS = (2, 3)  # CPU steps of this many rows multiply by `[out, in]` copies (measured: 1 and 4+ do not gain)
_row_major_copies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Conv1D -> (weight version, copy)


def row_major_weight(conv) -> torch.Tensor:
    """A Conv1D's weight `[in, out]` as a contiguous `[out, in]` copy, made again only when the weight
    changes in place (an optimizer step, `load_state_dict`) and dropped with the module."""
    version = conv.weight._version
    cached = _row_major_copies.get(conv)
    if cached is None or cached[0] != version:
        cached = (version, conv.weight.detach().t().contiguous())  # [in, out] -> [out, in]
        _row_major_copies[conv] = cached
    return cached[1]


def default_cache_dtype(position_table: torch.Tensor) -> torch.dtype:
    """float32 on a CPU whatever the weights (its bf16 attention for one query row was slower than its
    float32 one: `pipeline.precision`); elsewhere the weights' dtype."""
    return torch.float32 if position_table.device.type == "cpu" else position_table.dtype


class UnsupportedBackbone(ValueError):
    """The GPT-2 configuration uses an option this decoder does not implement."""


def check_backbone(config) -> None:
    """Refuse GPT-2 options the lean decoder does not reproduce (the training model never sets them)."""
    problems = []
    if config.activation_function not in SUPPORTED_ACTIVATIONS:
        problems.append(f"activation {config.activation_function!r}")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        problems.append("layer-wise attention scaling")
    if not getattr(config, "scale_attn_weights", True):
        problems.append("unscaled attention")
    if getattr(config, "add_cross_attention", False):
        problems.append("cross-attention")
    if problems:
        raise UnsupportedBackbone(f"the lean decoder does not implement {', '.join(problems)}")


class LeanDecoder:
    """Incremental decoding of `model` (a MusicTransformer) for a batch of `batch` sequences.

    `prefill(tokens)` starts a sequence at position 0; each `step(tokens)` appends one row. Both
    return the logits of the last row, `[B, Q, V]`. The KV cache is one `[B, H, capacity, head_dim]`
    pair per layer, allocated once and written in place.
    """

    def __init__(self, model, batch: int, capacity: int, artist: torch.Tensor | None = None,
                 cache_dtype: torch.dtype | None = None):
        backbone = model.backbone
        config = backbone.config
        check_backbone(config)
        if capacity > config.n_positions:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's {config.n_positions}")
        self.model = model
        self.artist = artist  # None, labels long [B] or weights float [B, n_artists + 1] (see `model.embed`)
        self.blocks = list(backbone.h)
        self.position_table = backbone.wpe.weight  # [n_positions, d]
        self.final_norm = backbone.ln_f
        self.n_head = int(config.n_head)
        self.d_model = int(config.n_embd)
        self.head_dim = self.d_model // self.n_head
        self.eps = float(config.layer_norm_epsilon)
        self.batch, self.capacity = batch, capacity
        like = self.position_table
        self.cache_dtype = cache_dtype or default_cache_dtype(like)  # the KV cache's and attention's dtype
        shape = (batch, self.n_head, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.cache_dtype, device=like.device) for _ in self.blocks]
        self.values = [torch.zeros(shape, dtype=self.cache_dtype, device=like.device) for _ in self.blocks]
        self.slots = torch.arange(capacity, device=like.device)  # [C], for step_static's validity mask
        self.length = 0
        self.positions = getattr(model.args, "positions", "learned")
        if self.positions == "rope":
            self.cos, self.sin = rope_tables(self.slots, self.head_dim, self.cache_dtype)  # [C, hd] each
        elif self.positions == "alibi":
            self.slopes = alibi_slopes(self.n_head).to(device=like.device, dtype=self.cache_dtype)  # [H]

    # ---- building blocks --------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, layer_norm) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), layer_norm.weight, layer_norm.bias, self.eps)

    @staticmethod
    def _conv1d(x: torch.Tensor, conv) -> torch.Tensor:
        """GPT-2's Conv1D on rows `[N, in]` -> `[N, out]` (its weight is `[in, out]`); a reduced-precision
        projection (`pipeline.precision`) computes itself."""
        if isinstance(conv, ReducedLinear):
            return conv(x)
        if x.device.type == "cpu" and x.shape[0] in ROW_MAJOR_ROWS:
            return F.linear(x, row_major_weight(conv), conv.bias)  # [N, in] @ [out, in]^T + [out]
        return torch.addmm(conv.bias, x, conv.weight)

    def _mlp(self, block, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self._conv1d(self._norm(x, block.ln_2), block.mlp.c_fc), approximate="tanh")
        return self._conv1d(hidden, block.mlp.c_proj)

    def _split_heads(self, qkv: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused QKV `[B*T, 3d]` -> q, k, v, each `[B, H, T, head_dim]` in the cache's dtype."""
        qkv = qkv.to(self.cache_dtype)  # a no-op unless the weights are bf16 and the cache float32
        grid = qkv.view(self.batch, rows, 3, self.n_head, self.head_dim)  # [B*T, 3d] -> [B, T, 3, H, hd]
        q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x [B, H, T, hd]
        return q, k, v

    def _merge_heads(self, attended: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`[B, H, T, head_dim]` -> rows `[B*T, d]` in the dtype of the rows `like`."""
        return attended.transpose(1, 2).reshape(-1, self.d_model).to(like.dtype)  # [B, H, T, hd] -> [B*T, d]

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden rows `[B, d]` -> logits `[B, Q, V]` through the model's own heads."""
        hidden = self._norm(x, self.final_norm).unsqueeze(1)  # [B, d] -> [B, 1, d]
        return self.model.logits(hidden)[:, 0]  # [B, 1, Q, V] -> [B, Q, V]

    def _embed(self, tokens: torch.Tensor, positions) -> torch.Tensor:
        """tokens `[B, T, Q]` -> rows `[B*T, d]` with the position embeddings added (learned positions only)."""
        x = self.model.embed(tokens, self.artist)  # [B, T, d]
        if self.positions == "learned":
            x = x + self.position_table[positions]  # + [T, d]
        return x.reshape(-1, self.d_model)  # [B, T, d] -> [B*T, d]

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q, k `[B, H, T, hd]` at positions `rows` (a slice, or a long tensor); else unchanged."""
        if self.positions != "rope":
            return q, k
        if isinstance(rows, torch.Tensor):
            cos, sin = self.cos.index_select(0, rows), self.sin.index_select(0, rows)  # [T, hd]
        else:
            cos, sin = self.cos[rows], self.sin[rows]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # ---- prefill: a whole prompt at once, causal ----------------------------------------------
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Start over: tokens `[B, T, Q]` at positions 0..T-1 -> logits of the last row `[B, Q, V]`."""
        rows = int(tokens.shape[1])
        if rows > self.capacity:
            raise ValueError(f"a prefill of {rows} rows exceeds the cache's {self.capacity} positions")
        x = self._embed(tokens, slice(0, rows))  # [B*T, d]
        if self.positions == "alibi":
            where = self.slots[:rows]
            bias = alibi_bias(where, where, self.slopes).to(self.cache_dtype)  # [H, T, T]
            bias = bias.masked_fill(where.view(1, -1) > where.view(-1, 1), float("-inf"))  # causal
        for block, keys, values in zip(self.blocks, self.keys, self.values):
            q, k, v = self._split_heads(self._conv1d(self._norm(x, block.ln_1), block.attn.c_attn), rows)
            q, k = self._rotate(q, k, slice(0, rows))
            keys[:, :, :rows] = k
            values[:, :, :rows] = v
            if self.positions == "alibi":
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, hd]
            else:
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
            x = x + self._conv1d(self._merge_heads(attended, x), block.attn.c_proj)
            x = x + self._mlp(block, x)
        self.length = rows
        last = x.view(self.batch, rows, self.d_model)[:, -1]  # [B*T, d] -> [B, T, d] -> [B, d]
        return self._output(last)

    # ---- one row at a time --------------------------------------------------------------------
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one row: tokens `[B, 1, Q]` at position `length` -> logits `[B, Q, V]`."""
        position = self.length
        if position >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions: prefill a new window first")
        x = self._embed(tokens, slice(position, position + 1))  # [B, d]
        seen = position + 1
        bias = None
        if self.positions == "alibi":
            bias = alibi_bias(self.slots[position:seen], self.slots[:seen], self.slopes)  # [H, 1, seen]
            bias = bias.to(self.cache_dtype)
        for block, keys, values in zip(self.blocks, self.keys, self.values):
            qkv = self._conv1d(self._norm(x, block.ln_1), block.attn.c_attn).to(self.cache_dtype)  # [B, 3d]
            q, k, v = qkv.view(self.batch, 3, self.n_head, 1, self.head_dim).unbind(1)  # -> 3 x [B, H, 1, hd]
            q, k = self._rotate(q, k, slice(position, seen))
            keys[:, :, position:seen] = k
            values[:, :, position:seen] = v
            # the newest row may see every cached one: no mask (ALiBi: its distance bias only)
            attended = F.scaled_dot_product_attention(q, keys[:, :, :seen], values[:, :, :seen],
                                                      attn_mask=bias)  # [B, H, 1, hd]
            merged = attended.view(self.batch, self.d_model).to(x.dtype)  # [B, H, 1, hd] -> [B, d]
            x = x + self._conv1d(merged, block.attn.c_proj)
            x = x + self._mlp(block, x)
        self.length = seen
        return self._output(x)

    def step_static(self, tokens: torch.Tensor, position: torch.Tensor,
                    visible: torch.Tensor | None = None) -> torch.Tensor:
        """`step` with the position as a long tensor `[1]` on the device. The caller advances `length`.

        Without `visible` every shape is fixed (for CUDA graphs): it attends to the whole cache under
        a validity mask (slots beyond `position` hold zeros or an older window's rows; the mask hides
        them). With `visible`, the slots `[position + 1]` the row may see (`slots[:position + 1]`), it
        attends to the cache slice of that size, unmasked, as `step` does (for a TorchScript trace).
        """
        x = self.model.embed(tokens, self.artist)[:, 0]  # [B, 1, d] -> [B, d]
        if self.positions == "learned":
            x = x + self.position_table.index_select(0, position)  # + [1, d]
        seen = self.slots if visible is None else visible  # [C] or [P+1]
        mask = None if visible is not None else (self.slots <= position).view(1, 1, 1, -1)  # [1, 1, 1, C]
        if self.positions == "alibi":  # the distance bias on the attended slots (-inf on the hidden ones)
            bias = alibi_bias(position, seen, self.slopes).to(self.cache_dtype)  # [H, 1, C or P+1]
            mask = bias.unsqueeze(0) if mask is None else bias.masked_fill(~mask[0], float("-inf")).unsqueeze(0)
        length = seen.shape[0]  # C, or P+1 (a traced size: one trace serves every position)
        for block, keys, values in zip(self.blocks, self.keys, self.values):
            q, k, v = self._split_heads(self._conv1d(self._norm(x, block.ln_1), block.attn.c_attn), 1)
            q, k = self._rotate(q, k, position)
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            attended = F.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length],
                                                      attn_mask=mask)  # [B, H, 1, hd]
            x = x + self._conv1d(self._merge_heads(attended, x), block.attn.c_proj)
            x = x + self._mlp(block, x)
        return self._output(x)


class GraphedStep:
    """`LeanDecoder.step_static` captured once in a CUDA graph and replayed for every step.

    Inputs are copied into static buffers; the returned logits tensor is the graph's own output
    buffer, overwritten by the next replay (the caller samples from it before stepping again).
    """

    def __init__(self, decoder: LeanDecoder, n_codebooks: int, fill_token: int, warmup: int = 3):
        device = decoder.position_table.device
        self.decoder = decoder
        self.tokens = torch.full((decoder.batch, 1, n_codebooks), fill_token, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):  # allocations and kernel choices happen before the capture
                decoder.step_static(self.tokens, self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step_static(self.tokens, self.position)  # [B, Q, V]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        position = self.decoder.length
        if position >= self.decoder.capacity:
            raise ValueError(f"the cache holds {self.decoder.capacity} positions: prefill a new window first")
        self.tokens.copy_(tokens)
        self.position.fill_(position)
        self.graph.replay()
        self.decoder.length = position + 1
        return self.logits


class _StepModule(torch.nn.Module):
    """`LeanDecoder.step_static` as a module whose submodule is the model, so a trace may call its weights."""

    def __init__(self, decoder: LeanDecoder):
        super().__init__()
        self.model = decoder.model
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.decoder.step_static(tokens, position, visible)


class TracedStep:
    """`LeanDecoder.step_static` traced once by TorchScript and replayed for every step on a CPU.

    The CPU's counterpart of `GraphedStep`: at batch 1 a step's ~150 small kernels cost less than
    the Python between them (BENCHMARKS.md, "A CPU step without Python"), and a trace runs them
    from C++. The attended length is the size of the input `visible` (`slots[:position + 1]`), so
    one trace serves every position; the KV cache, rotation tables and artist rows are the
    decoder's own tensors, held by the trace and written in place as the eager step writes them.
    Tracing runs one step at slot 0 (harmless: a prefill rewrites the cache before any step).
    """

    def __init__(self, decoder: LeanDecoder, n_codebooks: int, fill_token: int):
        self.decoder = decoder
        tokens = torch.full((decoder.batch, 1, n_codebooks), fill_token, dtype=torch.long)
        first = decoder.slots[:1]
        with warnings.catch_warnings():  # the tracer's notes on sizes read as ints: the sizes used are traced;
            # TorchScript's deprecation: a torch without it makes tracing fail, and the eager path runs (logged)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.traced = torch.jit.trace(_StepModule(decoder), (tokens, first, first), check_trace=False)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one row: tokens `[B, 1, Q]` at position `length` -> logits `[B, Q, V]`."""
        position = self.decoder.length
        if position >= self.decoder.capacity:
            raise ValueError(f"the cache holds {self.decoder.capacity} positions: prefill a new window first")
        slots = self.decoder.slots
        logits = self.traced(tokens, slots[position:position + 1], slots[:position + 1])
        self.decoder.length = position + 1
        return logits
