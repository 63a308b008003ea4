#!/usr/bin/env python3
"""Stage 4: train the multi-codebook GPT-2 on an artist's Encodec tokens.

The model (`MusicTransformer`, `ModelArgs`, the presets and the checks of saved weights) and the
command line live here. The engine that trains it is the package's (`pipeline.trainer`), and
generation loads the model through `pipeline.model_io`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.baselines import BaselineScores, fit_and_score  # noqa: E402
from pipeline.cli import (EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED, StageError, StageReport, artist_name,  # noqa: E402
                          fraction, make_parser, non_negative_float, non_negative_int, positive_float, positive_int,
                          resolve_device, run_main, setup_logging)
from pipeline.contract import CODEBOOK_SIZE, PAD, VOCAB_SIZE, TokenFileError, load_token_file  # noqa: E402
from pipeline.dist import DistInfo, dist_info, finish_process_group, init_process_group  # noqa: E402
from pipeline.files import atomic_path, atomic_torch_save, remove_stale_temporaries  # noqa: E402
from pipeline.manifest import ManifestError, check_uniform, manifest_path, read_manifest  # noqa: E402
from pipeline.patterns import PATTERNS, build_sequence, extra_steps  # noqa: E402
from pipeline.requirements import check_transformers  # noqa: E402
from pipeline.runs import (append_metrics, baseline_record, clear_outputs,  # noqa: E402
                           epoch_checkpoint_path, epoch_checkpoints, epoch_records, model_dir, prune_epochs,
                           read_checkpoint, store_baselines)

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
    tie_heads: bool = False  # True: the seed's heads, logits = proj(hidden) @ embedding table
    embed_init: str = "match"  # input channels start at std 0.02 ("match", the position table's), 1 ("unit") or ~0.004 ("gpt2", the seed)
    n_artists: int = 0  # artist labels; 0: unconditioned (no table), N > 0: N + 1 embeddings, "no artist" last


# The seed's architecture, for checkpoints written before these fields existed.
LEGACY_MODEL_ARGS = {"tie_heads": True, "embed_init": "gpt2"}
INPUT_STD = {"unit": 1.0, "match": 0.02}  # std of an input channel at init, per embed_init
EMBED_INITS = (*INPUT_STD, "gpt2")


class MusicTransformer(nn.Module):
    """Per-codebook embeddings -> concat -> projection -> GPT-2 -> Q output heads.

    Input tokens `[B, T, Q]` (codes 0..1023, BOS, PAD); output logits `[B, T, Q, VOCAB_SIZE]`
    where position t predicts the tokens of position t+1. The heads are one `Linear(d_model, Q*V)`
    (untied, the default) or, with `tie_heads`, a `d_model -> d_embed` projection per codebook
    multiplied by that codebook's embedding table (the seed's design; see docs/stage4.md for why
    it is no longer the default).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        check_transformers()  # an older transformers would drop `cache=` silently
        from transformers import GPT2Config, GPT2Model

        if args.embed_init not in EMBED_INITS:
            raise ValueError(f"embed_init {args.embed_init!r}: choose one of {', '.join(EMBED_INITS)}")
        self.args = args
        self.embeddings = nn.ModuleList(
            nn.Embedding(VOCAB_SIZE, args.d_embed, padding_idx=PAD) for _ in range(args.n_codebooks))
        self.input_proj = nn.Linear(args.n_codebooks * args.d_embed, args.d_model)
        config = GPT2Config(vocab_size=1, n_embd=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                            n_positions=args.n_positions, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                            attn_pdrop=args.dropout, bos_token_id=None, eos_token_id=None, use_cache=False)
        config._attn_implementation = "sdpa"
        self.backbone = GPT2Model(config)
        if args.n_artists > 0:  # absent at 0: unconditioned models keep exactly their old weights
            self.artist_table = nn.Embedding(args.n_artists + 1, args.d_model)
        if args.tie_heads:
            self.head_proj = nn.ModuleList(nn.Linear(args.d_model, args.d_embed) for _ in range(args.n_codebooks))
        else:
            self.heads = nn.Linear(args.d_model, args.n_codebooks * VOCAB_SIZE)
        self._init_own_weights()

    def _init_own_weights(self) -> None:
        """Initialise the layers around the backbone (docs/stage4.md, "The recipe, and how it was chosen").

        "gpt2" (the seed): embeddings and input projection both N(0, 0.02), so a token reached the
        backbone at ~0.004 per channel, five times below GPT-2's position table (0.02): the first
        layers saw mostly position. "unit" / "match": embeddings N(0, 1) and a projection scaled so
        that each input channel starts at std 1 / 0.02 (the position table's scale). Heads N(0, 0.02).
        """
        embed_std = 0.02 if self.args.embed_init == "gpt2" else 1.0
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=embed_std)
            with torch.no_grad():
                table.weight[PAD].zero_()  # padding_idx keeps a zero vector
        fan_in = self.input_proj.in_features
        proj_std = 0.02 if self.args.embed_init == "gpt2" else INPUT_STD[self.args.embed_init] / math.sqrt(fan_in)
        nn.init.normal_(self.input_proj.weight, std=proj_std)
        nn.init.zeros_(self.input_proj.bias)
        for layer in (self.head_proj if self.args.tie_heads else [self.heads]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if self.args.n_artists > 0:
            nn.init.normal_(self.artist_table.weight, std=0.02)  # like GPT-2's position table

    @property
    def no_artist(self) -> int:
        """The label id of "no artist" (the unconditional embedding): the last row of the table."""
        return int(self.args.n_artists)

    def embed(self, tokens: torch.Tensor, artist: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `[B, T, Q]` -> model inputs `[B, T, d_model]`, plus the artist embedding at every position.

        `artist`: long `[B]` label ids, or float `[B, n_artists + 1]` weights (a blend: the weighted sum
        of the label embeddings); None = "no artist". Ignored by an unconditioned model (n_artists 0).
        """
        per_codebook = [table(tokens[..., q]) for q, table in enumerate(self.embeddings)]  # Q x [B, T, d_embed]
        inputs = self.input_proj(torch.cat(per_codebook, dim=-1))  # [B, T, Q*d_embed] -> [B, T, d_model]
        if self.args.n_artists == 0:
            return inputs
        return inputs + self.artist_vector(artist, tokens.shape[0]).unsqueeze(1).to(inputs.dtype)  # + [B, 1, d]

    def artist_vector(self, artist: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Labels `[B]`, weights `[B, n_artists+1]` or None ("no artist") -> embeddings `[B, d_model]`."""
        table = self.artist_table.weight  # [n_artists + 1, d_model]
        if artist is None:
            return table[self.no_artist].expand(batch, -1)  # [d] -> [B, d]
        if artist.is_floating_point():
            if artist.shape[-1] != table.shape[0]:
                raise ValueError(f"artist weights have {artist.shape[-1]} columns, the model has "
                                 f"{table.shape[0]} labels (n_artists + 1)")
            return artist.to(table.dtype) @ table  # [B, n+1] @ [n+1, d] -> [B, d]
        return self.artist_table(artist)  # [B] -> [B, d]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[B, T, d_model]` -> logits `[B, T, Q, V]`."""
        if not self.args.tie_heads:
            flat = self.heads(hidden)  # [B, T, d_model] -> [B, T, Q*V]
            return flat.unflatten(-1, (self.args.n_codebooks, VOCAB_SIZE))  # -> [B, T, Q, V]
        per_codebook = [proj(hidden) @ table.weight.T  # [B, T, d_embed] @ [d_embed, V] -> [B, T, V]
                        for proj, table in zip(self.head_proj, self.embeddings)]
        return torch.stack(per_codebook, dim=2)  # Q x [B, T, V] -> [B, T, Q, V]

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                use_cache: bool = False, position_ids: torch.Tensor | None = None,
                artist: torch.Tensor | None = None):
        """tokens `[B, T, Q]` -> (logits `[B, T, Q, V]`, cache or None).

        `attention_mask` `[B, past+T]` (1 = attend) defaults to `padding_mask(tokens)` without a cache.
        `artist` as in `embed` (None: "no artist").
        """
        if attention_mask is None and cache is None:
            attention_mask = padding_mask(tokens)
        out = self.backbone(inputs_embeds=self.embed(tokens, artist), attention_mask=attention_mask, cache=cache,
                            use_cache=use_cache, position_ids=position_ids)
        return self.logits(out.last_hidden_state), (out.cache if use_cache else None)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, T, Q]` -> `[B, T]` long: 0 where ANY codebook of the frame is PAD, else 1."""
    return (tokens != PAD).all(dim=-1).long()


def model_args_for(preset: str, n_codebooks: int, context_frames: int, overrides: dict | None = None) -> ModelArgs:
    """Preset sizes, overridden by explicit flags, with room for `context_frames` plus BOS and delay steps."""
    values = dict(PRESETS[preset])
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return ModelArgs(n_codebooks=n_codebooks, n_positions=context_frames + n_codebooks, **values)


def model_args_from(saved: dict, where) -> ModelArgs:
    """A checkpoint's `model_args`, refusing keys this model does not take (another architecture)."""
    unknown = sorted(set(saved) - set(ModelArgs.__dataclass_fields__))
    if unknown:
        raise StageError(f"{where}: model_args has keys this model does not take: {', '.join(unknown)} "
                         "(a checkpoint of another architecture or program)")
    return ModelArgs(**{**LEGACY_MODEL_ARGS, **saved})


def check_state_dict(model: nn.Module, state: dict, where) -> None:
    """Refuse weights that do not fit `model` (rebuilt from the checkpoint's model_args), naming every difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {list(state[key].shape)} vs model {list(expected[key].shape)}"
              for key in sorted(set(expected) & set(state)) if state[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_short_list(shapes)}")
    if problems:
        raise StageError(f"{where}: weights do not match the model its model_args describe "
                         f"(n_codebooks={model.args.n_codebooks}, d_model={model.args.d_model}, "
                         f"n_layer={model.args.n_layer}): " + "; ".join(problems))


def _short_list(items: list, limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# =============================================================================================
# The training engine. Everything below is used by `main()`; importing this module runs nothing.
# =============================================================================================
CHECKPOINT_FORMAT = 1
LN2 = math.log(2.0)
LOG = logging.getLogger("pipeline.stage4")

# Training options a resumed run takes from its checkpoint unless given again on the command line.
TRAIN_DEFAULTS = dict(
    preset="base", d_embed=None, d_model=None, n_layer=None, n_head=None, dropout=None, tie_heads=False,
    embed_init="match", pattern="delay", context_frames=1500, epochs=20, batch_size=8, grad_accum=1, lr=None,
    min_lr_frac=0.1, warmup_frac=0.05, weight_decay=0.1, max_grad_norm=1.0, label_smoothing=0.0,
    frame_dropout=0.0, seed=0, keep_last=3, max_steps=0, device="auto", compile=False,
    grad_checkpointing=False, artist_alpha=0.5, cond_dropout=0.3,
)
# Peak learning rate of each preset when --lr is not given (docs/stage4.md, "The recipe").
PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "base": 6e-4}
# These fix the model or the meaning of its tokens: a resumed run must keep them.
LOCKED_ON_RESUME = ("preset", "d_embed", "d_model", "n_layer", "n_head", "tie_heads", "embed_init", "pattern",
                    "context_frames")


# ---- data: every token file read once into one int16 array --------------------------------
@dataclass
class TokenStore:
    """All clips back to back in one contiguous array; a clip is (offset, length) into it."""

    codes: np.ndarray  # int16 [total_frames, Q]
    offsets: np.ndarray  # int64 [n_clips]
    lengths: np.ndarray  # int64 [n_clips]
    splits: list
    names: list
    labels: np.ndarray | None = None  # int64 [n_clips]: each clip's artist label (None: one artist, label 0)

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[1])

    def clip_labels(self, clips: np.ndarray) -> np.ndarray:
        """Artist labels `[N]` of clips `[N]` (0 for every clip of a one-artist store)."""
        if self.labels is None:
            return np.zeros(len(clips), dtype=np.int64)
        return self.labels[clips]

    def clips(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def clip_codes(self, clip: int) -> np.ndarray:
        """One clip's real frames `[T, Q]` (a view)."""
        return self.codes[self.offsets[clip]:self.offsets[clip] + self.lengths[clip]]


def fit_baselines(store: TokenStore, train_clips: np.ndarray, eval_clips: np.ndarray) -> BaselineScores:
    """Unigram and bigram per codebook fitted on `train_clips`, scored on `eval_clips` (bits per frame)."""
    return fit_and_score([store.clip_codes(c) for c in train_clips], [store.clip_codes(c) for c in eval_clips])


@dataclass
class Dataset:
    store: TokenStore
    token_contract: dict
    skipped: list  # [(audio, reason)] token files that could not be used


def read_training_manifest(root: Path, artist: str, allow_outside_root: bool = False) -> list[dict]:
    """The artist's manifest, checked: exists, not empty, every file present, one Q and bandwidth."""
    path = manifest_path(root, artist)
    try:
        entries = read_manifest(path, root, allow_outside_root=allow_outside_root)
        check_uniform(entries, where=str(path))
    except ManifestError as error:
        raise StageError(str(error)) from None
    for number, entry in enumerate(entries, start=1):
        split = entry.get("split", "train")
        if split not in ("train", "valid"):
            raise StageError(f"{path}: entry {number} ({entry['audio']}) has split {split!r}; "
                             "expected 'train' or 'valid'")
    return entries


def read_artist_manifests(root: Path, artists: list[str], allow_outside_root: bool = False
                          ) -> tuple[list[dict], list[int], list[Path]]:
    """Every artist's manifest, checked, pooled -> (entries, the artist label of each, manifest paths).

    One model reads one token format: every manifest must hold the first one's Q and bandwidth."""
    entries, labels, paths, first = [], [], [], None
    for label, artist in enumerate(artists):
        own = read_training_manifest(root, artist, allow_outside_root)
        token_format = (own[0].get("codebooks"), own[0].get("bandwidth"))  # uniform within the manifest
        if first is None:
            first = (artist, token_format)
        elif token_format != first[1]:
            raise StageError(f"{manifest_path(root, artist)}: artist {artist!r} has {token_format[0]} codebooks at "
                             f"{token_format[1]} kbps, artist {first[0]!r} has {first[1][0]} at {first[1][1]} kbps; "
                             "one model reads one token format: re-tokenize with one --bandwidth")
        entries.extend(own)
        labels.extend([label] * len(own))
        paths.append(manifest_path(root, artist))
    return entries, labels, paths


def load_dataset(entries: list[dict], log: logging.Logger = LOG, entry_labels: list[int] | None = None) -> Dataset:
    """Read every token file once (int16) into a TokenStore; unusable files are named and skipped.

    `entry_labels`: the artist label of each entry (a joint model's pooled manifests)."""
    chunks, lengths, splits, names, skipped, files, labels = [], [], [], [], [], [], []
    for number, entry in enumerate(entries):
        try:
            token_file = load_token_file(entry["path"])
            check_entry_matches(entry, token_file)
        except TokenFileError as error:
            log.error("skipping a token file: %s", error)
            skipped.append((entry["audio"], str(error)))
            continue
        real = token_file.real_frames  # frames past the audio encode the codec's zero padding: dropped
        chunks.append(token_file.codes[0, :, :real].T.numpy())  # [1, Q, T] -> [real, Q]
        lengths.append(real)
        splits.append(entry.get("split", "train"))
        names.append(entry["audio"])
        files.append(token_file)
        labels.append(0 if entry_labels is None else entry_labels[number])
    if not chunks:
        raise StageError("no usable token file in the manifest (every one was skipped, see above)")
    codebook_counts = {chunk.shape[1] for chunk in chunks}
    if len(codebook_counts) > 1:
        raise StageError(f"token files mix codebook counts {sorted(codebook_counts)}; "
                         "re-tokenize the artist with one --bandwidth")
    codes = np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.int16)  # [total_frames, Q]
    lengths = np.array(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    store = TokenStore(codes=codes, offsets=offsets, lengths=lengths, splits=splits, names=names,
                       labels=None if entry_labels is None else np.array(labels, dtype=np.int64))
    return Dataset(store=store, token_contract=token_contract_of(files, entries), skipped=skipped)


def check_entry_matches(entry: dict, token_file) -> None:
    """The manifest's claims about a file (Q, bandwidth) must match the file itself."""
    where = entry["audio"]
    if "codebooks" in entry and int(entry["codebooks"]) != token_file.n_codebooks:
        raise TokenFileError(f"{where}: the manifest says {entry['codebooks']} codebooks, "
                             f"the file has {token_file.n_codebooks}")
    if "bandwidth" in entry and float(entry["bandwidth"]) != token_file.bandwidth:
        raise TokenFileError(f"{where}: the manifest says {entry['bandwidth']} kbps, "
                             f"the file says {token_file.bandwidth:g}")


def token_contract_of(files: list, entries: list[dict]) -> dict:
    """What stage 5 needs to turn the model's tokens back into audio (saved in every checkpoint)."""
    first = files[0]
    scales = [float(e["median_scale"]) for e in entries if e.get("median_scale") is not None]
    return {"n_codebooks": first.n_codebooks, "bandwidth": float(first.bandwidth), "codec": first.codec,
            "frame_rate": int(first.frame_rate), "sample_rate": int(first.sample_rate),
            "median_scale": float(np.median(scales)) if scales else None}


# ---- windows: which frames go into which batch ------------------------------------------------
def train_window_starts(length: int, context: int, rng: np.random.Generator) -> np.ndarray:
    """Starts of full windows covering every frame of a clip, with random overlaps.

    A clip no longer than the context is one (padded) window. A longer one gets `length // context + 1`
    windows, first at 0 and last at `length - context`; the spare frames become overlaps drawn at
    random, so the window boundaries move every epoch even when the length is a multiple of the context.
    """
    if length <= context:
        return np.zeros(1, dtype=np.int64)
    n_windows = length // context + 1
    spare = n_windows * context - length  # total overlap, >= 1
    cuts = np.sort(rng.integers(0, spare + 1, size=n_windows - 2))
    overlaps = np.diff(np.concatenate([[0], cuts, [spare]]))  # [n_windows - 1], sums to spare
    steps = context - overlaps
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


def windows_per_clip(length: int, context: int) -> int:
    return 1 if length <= context else length // context + 1


def epoch_windows(store: TokenStore, clips: np.ndarray, context: int, seed: int, epoch: int) -> np.ndarray:
    """This epoch's training windows `[N, 2]` (clip, start), shuffled; the same on every rank."""
    rng = np.random.default_rng([seed, epoch])
    windows = covering_windows(store, clips, context, rng)  # [N, 2]
    return windows[rng.permutation(len(windows))]


def covering_windows(store: TokenStore, clips: np.ndarray, context: int, rng: np.random.Generator) -> np.ndarray:
    """Windows `[N, 2]` (clip, start) covering every frame of `clips` once (in clip order)."""
    windows = []
    for clip in clips:
        starts = train_window_starts(int(store.lengths[clip]), context, rng)  # [n]
        windows.append(np.stack([np.full_like(starts, clip), starts], axis=1))  # [n] -> [n, 2]
    return np.concatenate(windows, axis=0)  # n_clips x [n, 2] -> [N, 2]


def artist_shares(frames_per_artist: np.ndarray, alpha: float) -> np.ndarray:
    """Probability of drawing each artist, proportional to its training frames ** alpha.

    alpha 1: as the data come (a large artist dominates); 0: every artist alike; 0.5 (the default)
    between the two, like multilingual language models' sampling of languages."""
    weights = np.asarray(frames_per_artist, dtype=np.float64) ** alpha  # [A]
    return weights / weights.sum()


def split_count(total: int, shares: np.ndarray) -> np.ndarray:
    """`total` split into integer counts `[A]` that follow `shares` `[A]` and sum to `total` (largest remainder)."""
    exact = shares * total  # [A]
    counts = np.floor(exact).astype(np.int64)
    leftover = int(total - counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


def draw_windows(windows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows of `windows` `[n, 2]`: whole passes over them, then a random subset without repeats."""
    passes, rest = divmod(count, len(windows))
    chosen = windows[rng.choice(len(windows), size=rest, replace=False)]  # [rest, 2]
    return np.concatenate([windows] * passes + [chosen], axis=0)  # -> [count, 2]


def balanced_epoch_windows(store: TokenStore, clips: np.ndarray, context: int, seed: int, epoch: int,
                           alpha: float) -> np.ndarray:
    """A joint model's epoch: as many windows as `epoch_windows` gives, but artist a's share of them is
    proportional to (its training frames) ** alpha, so a small artist is not drowned by a large one.
    Within an artist, its windows are drawn in whole passes, then a random subset. Shuffled `[N, 2]`."""
    rng = np.random.default_rng([seed, epoch])
    labels = store.clip_labels(clips)  # [n_clips]
    artists = np.unique(labels)
    per_artist = [covering_windows(store, clips[labels == a], context, rng) for a in artists]  # A x [n_a, 2]
    frames = [int(store.lengths[clips[labels == a]].sum()) for a in artists]
    counts = split_count(sum(len(w) for w in per_artist), artist_shares(np.array(frames), alpha))  # [A]
    windows = np.concatenate([draw_windows(w, int(c), rng) for w, c in zip(per_artist, counts)], axis=0)  # [N, 2]
    return windows[rng.permutation(len(windows))]


def valid_windows(store: TokenStore, clips: np.ndarray, context: int) -> np.ndarray:
    """Back-to-back windows `[N, 2]` from frame 0: each validation frame scored exactly once."""
    windows = [(clip, start) for clip in clips for start in range(0, int(store.lengths[clip]), context)]
    return np.array(windows, dtype=np.int64).reshape(-1, 2)


def rank_share(windows: np.ndarray, info: DistInfo, pad: bool) -> np.ndarray:
    """This rank's windows. With `pad`, the list is wrapped round so every rank gets as many (DDP
    needs each rank to run the same number of steps); without it (validation) nothing is repeated."""
    if pad and info.world_size > 1 and len(windows) % info.world_size:
        extra = info.world_size - len(windows) % info.world_size
        windows = np.concatenate([windows, windows[:extra]], axis=0)
    return windows[info.rank::info.world_size]


def train_windows_per_rank(store: TokenStore, clips: np.ndarray, context: int, world_size: int) -> int:
    total = sum(windows_per_clip(int(store.lengths[clip]), context) for clip in clips)
    return math.ceil(total / world_size)


def gather_frames(store: TokenStore, windows: np.ndarray, context: int) -> torch.Tensor:
    """Windows `[B, 2]` -> frames int16 `[B, context, Q]`, PAD past the end of a clip."""
    clip, start = windows[:, 0], windows[:, 1]
    available = np.minimum(context, store.lengths[clip] - start)  # [B]
    steps = np.arange(context)
    index = store.offsets[clip, None] + start[:, None] + np.minimum(steps, available[:, None] - 1)  # [B, C]
    frames = store.codes[index]  # [B, C] -> [B, C, Q]
    frames[steps[None, :] >= available[:, None]] = PAD
    return torch.from_numpy(frames)


def make_batch(store: TokenStore, windows: np.ndarray, context: int, pattern: str, frame_dropout: float = 0.0,
               rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> (inputs, targets) int16 `[B, S, Q]`; frame dropout blanks input steps (never BOS)."""
    inputs, targets = build_sequence(gather_frames(store, windows, context), pattern)  # 2 x [B, S, Q]
    if frame_dropout > 0:
        dropped = rng.random(inputs.shape[:2]) < frame_dropout  # [B, S]
        dropped[:, 0] = False
        inputs[torch.from_numpy(dropped)] = PAD  # targets keep these frames: only the input is hidden
    return inputs, targets


# ---- loss ---------------------------------------------------------------------------------------
def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """logits `[B, S, Q, V]`, targets `[B, S, Q]` -> (smoothed mean loss, NLL sums `[Q]` in nats, counts `[Q]`).

    The softmax runs over the 1024 real codes only: BOS and PAD are never targets and never sampled,
    so the NLL reported is that of the distribution stage 5 samples from. PAD targets are ignored.
    """
    log_probs = F.log_softmax(logits[..., :CODEBOOK_SIZE].float(), dim=-1)  # [B, S, Q, 1024]
    valid = targets != PAD  # [B, S, Q]
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    nll = -log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, S, Q]
    smoothed = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)  # [B, S, Q]
    weights = valid.float()
    loss = (smoothed * weights).sum() / weights.sum().clamp(min=1.0)
    nll_sums = (nll.detach() * weights).sum(dim=(0, 1))  # [Q]
    return loss, nll_sums, weights.sum(dim=(0, 1))


def bits_per_frame(nll_sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, list]:
    """Per-codebook NLL (nats summed) -> (bits per frame, bits per token of each codebook)."""
    per_codebook = (nll_sums.double() / counts.double().clamp(min=1.0) / LN2).tolist()
    return float(sum(per_codebook)), per_codebook


# ---- optimizer and schedule -------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; embeddings (tied heads too), norms and biases do not."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = name.startswith(("embeddings.", "artist_table.")) or ".wpe." in name or ".wte." in name
        (no_decay if parameter.dim() < 2 or is_embedding else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR factor of optimizer step s: linear warm-up, then a cosine down to `min_factor` (held after)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, args: dict, total_steps: int, device: str):
    optimizer = torch.optim.AdamW(parameter_groups(model, args["weight_decay"]), lr=args["lr"],
                                  betas=(0.9, 0.95), fused=device.startswith("cuda") or None)
    schedule = WarmupCosine(round(args["warmup_frac"] * total_steps), total_steps, args["min_lr_frac"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def set_schedule(scheduler, total_steps: int | None = None, peak_lr: float | None = None) -> None:
    """Re-plan a restored schedule (new length and/or new peak LR) and apply it at the current step."""
    schedule = scheduler.lr_lambdas[0]
    if total_steps is not None:
        schedule.total_steps = int(total_steps)
    if peak_lr is not None:
        scheduler.base_lrs = [peak_lr for _ in scheduler.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["initial_lr"] = peak_lr
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# ---- precision ----------------------------------------------------------------------------------
@dataclass
class Precision:
    """bf16 autocast on CUDA where supported, fp16 + grad scaler otherwise, fp32 on the CPU."""

    device: str
    dtype: torch.dtype | None

    @classmethod
    def for_device(cls, device: str) -> "Precision":
        if not device.startswith("cuda"):
            return cls(device, None)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
        return cls(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def grad_scaler(self):
        return torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)


# ---- randomness -----------------------------------------------------------------------------------
def micro_batch_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    """Each micro-batch reseeds torch from (seed, epoch, batch, rank): dropout then needs no saved state,
    so a run resumed mid-epoch draws exactly what the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, epoch, micro, rank]).generate_state(1)[0])


def rng_states() -> dict:
    """Python, numpy, torch and CUDA generator states as tensors and lists (weights_only-loadable)."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    states = {"python": [version, list(mt_state), gauss],
              "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                        int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- checkpoints ------------------------------------------------------------------------------------
def plain(value):
    """Resolved arguments as JSON-like plain types (Paths become strings)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- outputs: metrics and the loss plot ---------------------------------------------------------------
def plot_losses(records: list[dict], path: Path) -> None:
    """Train and valid NLL (bits per frame) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines, records = baseline_record(records), epoch_records(records)
    epochs = [r["epoch"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(epochs, [r["train_nll_bits_per_frame"] for r in records], "o-", label="train NLL")
    valid = [(r["epoch"], r["valid_nll_bits_per_frame"]) for r in records
             if r.get("valid_nll_bits_per_frame") is not None]
    if valid:
        axis.plot(*zip(*valid), "s-", label="valid NLL")
    if baselines:
        where = baselines.get("scored_on", "valid")
        axis.axhline(baselines["unigram_bits_per_frame"], color="tab:red", linestyle="--",
                     label=f"unigram ({where}): token frequencies only")
        axis.axhline(baselines["bigram_bits_per_frame"], color="tab:purple", linestyle=":",
                     label=f"bigram ({where}): previous token only")
    axis.set_xlabel("epoch")
    axis.set_ylabel("bits per frame")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


# ---- signals -------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C / SIGTERM: finish the current optimizer step, save a resumable checkpoint, exit.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal_number = 0
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        LOG.warning("%s received: saving a resumable checkpoint after this step (again to abort)",
                    signal.Signals(number).name)


# ---- the trainer ------------------------------------------------------------------------------------------
class TrainingDiverged(Exception):
    """The loss (or the gradient norm) stopped being finite: a started run failed (exit 1, not 2)."""


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    epoch_batches_done: int = 0  # micro-batches of the unfinished epoch already trained (mid-epoch save)
    best_nll: float | None = None  # the lowest epoch NLL so far, bits per frame, measured on `best_split`
    best_split: str = "valid"  # "valid", or "train" when the manifest has no valid clip
    elapsed_s: float = 0.0  # training time over every run so far


class Trainer:
    """One model, its optimizer and schedule, the data, and the loop that ties them together."""

    def __init__(self, args: dict, model_args: ModelArgs, data: Dataset, folder: Path, artist: str,
                 info: DistInfo, device: str, log: logging.Logger = LOG, artists: list[str] | None = None,
                 manifests: list | None = None):
        self.args, self.model_args, self.data, self.folder = args, model_args, data, folder
        self.artist, self.info, self.device, self.log = artist, info, device, log
        self.artists = list(artists) if artists else [artist]  # label ids: positions in this list
        self.manifests = [str(path) for path in manifests or []]
        self.conditioned = model_args.n_artists > 0
        self.store = data.store
        self.train_clips, self.valid_clips = self.store.clips("train"), self.store.clips("valid")
        self.precision = Precision.for_device(device)
        self.progress = Progress()
        self.epoch_totals = None  # partial sums of an unfinished epoch
        self.baselines = None  # unigram / bigram scores, set when the run starts
        per_rank = train_windows_per_rank(self.store, self.train_clips, args["context_frames"], info.world_size)
        self.micro_per_epoch = math.ceil(per_rank / args["batch_size"])
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / args["grad_accum"])
        self._build_model()
        self.optimizer, self.scheduler = build_optimizer(self.plain_model, args, self.total_steps(), device)
        self.scaler = self.precision.grad_scaler()

    def total_steps(self) -> int:
        return self.args["epochs"] * self.steps_per_epoch

    def _build_model(self) -> None:
        """Three handles on one network: `plain_model`, the nn.Module itself (its weights are what
        checkpoints save, the optimizer steps and gradients are clipped); `local_model`, this process's
        forward (torch.compile'd with --compile, else the plain model; validation uses it: no gradient
        sync); `synced_model`, the training forward and backward (DDP-wrapped under torchrun, so
        gradients are averaged across ranks; else the local model)."""
        torch.manual_seed(self.args["seed"])  # identical initial weights on every rank
        self.plain_model = MusicTransformer(self.model_args).to(self.device)
        self.plain_model.backbone.wte.requires_grad_(False)  # unused: inputs arrive through inputs_embeds
        if self.args["grad_checkpointing"]:
            self.plain_model.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        self.local_model = torch.compile(self.plain_model) if self.args["compile"] else self.plain_model
        self.synced_model = self.local_model
        if self.info.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            self.synced_model = DistributedDataParallel(self.local_model, device_ids=device_ids)

    # -- resume ---------------------------------------------------------------------------------------
    def restore(self, checkpoint: dict, new_lr: float | None = None, given: set[str] = frozenset()) -> None:
        """Continue exactly where `checkpoint` stopped; re-plan the schedule if --epochs changed.

        The optimizer's and the schedule's saved states carry the old --weight-decay, --warmup-frac and
        --min-lr-frac: each one in `given` (typed again) is applied over them here."""
        check_state_dict(self.plain_model, checkpoint["model"], checkpoint.get("loaded_from", "the checkpoint"))
        self.plain_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint["rng"])
        self.progress = Progress(epoch=int(checkpoint["epoch"]), step=int(checkpoint["step"]),
                                 epoch_batches_done=int(checkpoint.get("epoch_batches_done", 0)),
                                 best_nll=checkpoint.get("best_nll_bits_per_frame", checkpoint.get("best_valid_nll")),
                                 best_split=checkpoint.get("best_nll_split", "valid"),
                                 elapsed_s=float(checkpoint.get("elapsed_s", 0.0)))
        self.epoch_totals = checkpoint.get("epoch_totals")
        if not self.info.is_main and self.epoch_totals is not None:
            self.epoch_totals = torch.zeros_like(self.epoch_totals)  # saved summed over ranks: rank 0 holds them
        planned = self.scheduler.lr_lambdas[0].total_steps
        self.apply_given_options(given)
        if planned != self.total_steps() or new_lr is not None or given & {"warmup_frac", "min_lr_frac"}:
            before = self.scheduler.get_last_lr()[0]
            set_schedule(self.scheduler, self.total_steps(), new_lr)
            self.log.info("LR schedule re-planned (%d -> %d steps%s): LR %.3g -> %.3g", planned,
                          self.total_steps(), f", peak {new_lr:g}" if new_lr is not None else "", before,
                          self.scheduler.get_last_lr()[0])

    def apply_given_options(self, given: set[str]) -> None:
        """Put --weight-decay, --warmup-frac and --min-lr-frac typed with --resume into the restored states."""
        if "weight_decay" in given:
            self.optimizer.param_groups[0]["weight_decay"] = self.args["weight_decay"]  # group 0: the decayed
        schedule = self.scheduler.lr_lambdas[0]
        if "warmup_frac" in given:
            schedule.warmup_steps = round(self.args["warmup_frac"] * self.total_steps())
        if "min_lr_frac" in given:
            schedule.min_factor = float(self.args["min_lr_frac"])

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train until --epochs; returns the exit status (130 when stopped by a signal)."""
        self.log.info("training %s: %d train / %d valid clips, %d micro-batches (%d optimizer steps) per epoch "
                      "per rank, %s on %s x%d, %.2f M parameters", self.artist, len(self.train_clips),
                      len(self.valid_clips), self.micro_per_epoch, self.steps_per_epoch, self.precision.name,
                      self.device, self.info.world_size, count_parameters(self.plain_model) / 1e6)
        self.report_baselines()
        with StopRequest() as stop:
            while self.progress.epoch < self.args["epochs"]:
                finished = self.train_epoch(stop)
                if finished:
                    self.end_epoch()
                else:
                    self.save_last()  # every rank: the partial totals are summed before rank 0 writes
                if stop.signal_number:
                    self.log.warning("stopped by %s at epoch %d, step %d; resume with --resume",
                                     signal.Signals(stop.signal_number).name, self.progress.epoch + 1,
                                     self.progress.step)
                    return EXIT_INTERRUPTED
                if self.max_steps_reached():
                    self.log.info("--max-steps %d reached; resume with --resume", self.args["max_steps"])
                    return EXIT_OK
        return EXIT_OK

    def report_baselines(self) -> None:
        """Fit the unigram and bigram on the train split, log them, and store them in metrics.jsonl."""
        eval_clips = self.valid_clips if len(self.valid_clips) else self.train_clips
        scores = fit_baselines(self.store, self.train_clips, eval_clips)
        self.baselines = {**scores.as_record(), "scored_on": "valid" if len(self.valid_clips) else "train"}
        self.log.info("baselines on the %s split: unigram %.2f, bigram %.2f bits/frame; a model that learned "
                      "more than token frequencies ends below both", self.baselines["scored_on"],
                      scores.unigram_bits_per_frame, scores.bigram_bits_per_frame)
        if self.info.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            store_baselines(self.folder / "metrics.jsonl", self.baselines)

    def max_steps_reached(self) -> bool:
        return 0 < self.args["max_steps"] <= self.progress.step

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self.conditioned:
            windows = balanced_epoch_windows(self.store, self.train_clips, self.args["context_frames"],
                                             self.args["seed"], epoch, self.args["artist_alpha"])
        else:
            windows = epoch_windows(self.store, self.train_clips, self.args["context_frames"], self.args["seed"], epoch)
        mine = rank_share(windows, self.info, pad=True)
        size = self.args["batch_size"]
        return [mine[i:i + size] for i in range(0, len(mine), size)]

    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the current epoch from where it stands; False when stopped before its end."""
        epoch, accum = self.progress.epoch, self.args["grad_accum"]
        batches = self.epoch_batches(epoch)
        totals = self._new_totals() if self.epoch_totals is None else self.epoch_totals.to(self.device)
        self.synced_model.train()
        bar = self._progress_bar(epoch, len(batches))
        started, group_loss = time.perf_counter(), 0.0
        for micro in range(self.progress.epoch_batches_done, len(batches)):
            group_start = micro - micro % accum
            group_size = min(accum, len(batches) - group_start)  # a leftover group still counts
            is_last = micro == group_start + group_size - 1
            loss = self.micro_step(batches[micro], epoch, micro, group_size, is_last, totals)
            group_loss = group_loss + loss
            bar.update(1)
            if is_last:
                stop_now = self.optimizer_step(group_loss, stop, epoch)
                group_loss = 0.0
                self._update_bar(bar, totals, started)
                if stop_now and micro + 1 < len(batches):
                    self._pause_epoch(micro + 1, totals, started, bar)
                    return False
                if stop_now:
                    break
        bar.close()
        totals[-1] += time.perf_counter() - started
        self.epoch_totals = totals
        return True

    def _pause_epoch(self, batches_done: int, totals: torch.Tensor, started: float, bar) -> None:
        bar.close()
        totals[-1] += time.perf_counter() - started
        self.epoch_totals = totals
        self.progress.epoch_batches_done = batches_done

    def _new_totals(self) -> torch.Tensor:
        """[loss sum, micro-batches, frames, Q NLL sums, Q counts, seconds] of an epoch on this rank."""
        return torch.zeros(4 + 2 * self.store.n_codebooks, dtype=torch.float64, device=self.device)

    def micro_step(self, windows: np.ndarray, epoch: int, micro: int, group_size: int, is_last: bool,
                   totals: torch.Tensor) -> torch.Tensor:
        """Forward and backward one micro-batch; gradients sync across ranks only on a group's last."""
        q = self.store.n_codebooks
        seed = micro_batch_seed(self.args["seed"], epoch, micro, self.info.rank)
        torch.manual_seed(seed)
        inputs, targets = make_batch(self.store, windows, self.args["context_frames"], self.args["pattern"],
                                     self.args["frame_dropout"], np.random.default_rng(seed))
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        artist = self.training_labels(windows, seed) if self.conditioned else None
        sync = contextlib.nullcontext() if is_last or not self.info.is_distributed else self.synced_model.no_sync()
        with sync:
            with self.precision.autocast():
                logits, _ = self.synced_model(inputs, artist=artist)  # [B, S, Q] -> [B, S, Q, V]
            loss, nll_sums, counts = sequence_losses(logits, targets, self.args["label_smoothing"])
            self.scaler.scale(loss / group_size).backward()
        loss = loss.detach()
        totals[0] += loss.double()
        totals[1] += 1
        totals[2] += counts[0].double()
        totals[3:3 + q] += nll_sums.double()
        totals[3 + q:3 + 2 * q] += counts.double()
        return loss

    def training_labels(self, windows: np.ndarray, seed: int) -> torch.Tensor:
        """Each window's artist label `[B]`, replaced by "no artist" with probability --cond-dropout
        (drawn from the micro-batch's seed, so a resumed run drops the same labels)."""
        labels = self.store.clip_labels(windows[:, 0]).copy()  # [B]
        dropped = np.random.default_rng([seed, 1]).random(len(labels)) < self.args["cond_dropout"]  # [B]
        labels[dropped] = self.model_args.n_artists
        return self._to_device(torch.from_numpy(labels))

    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.device.startswith("cuda"):
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.long()

    def optimizer_step(self, group_loss: torch.Tensor, stop: StopRequest, epoch: int) -> bool:
        """Clip, step, advance the schedule; True when training should stop after this step."""
        flags = torch.tensor([float(stop.signal_number > 0), float(not torch.isfinite(group_loss).item())],
                             device=self.device)
        if self.info.is_distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1]:
            self.diverged(epoch, "loss")
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args["max_grad_norm"] if self.args["max_grad_norm"] > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.plain_model.parameters(), max_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            self.diverged(epoch, "gradient norm")  # identical on every rank: gradients are all-reduced
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1
        if flags[0] and not stop.signal_number:
            stop.signal_number = signal.SIGTERM  # another rank was signalled
        return bool(flags[0]) or self.max_steps_reached()

    def diverged(self, epoch: int, what: str) -> None:
        last = self.folder / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"training diverged: the {what} became NaN or infinite at epoch {epoch + 1}, optimizer step "
            f"{self.progress.step + 1}; nothing was saved after it and {kept}. Resume with a lower LR "
            f"(e.g. --resume --lr {self.scheduler.base_lrs[0] / 3:.2g}) or a smaller --max-grad-norm.")

    def _progress_bar(self, epoch: int, n_batches: int):
        from tqdm import tqdm

        return tqdm(total=n_batches, initial=self.progress.epoch_batches_done, unit="batch", leave=False,
                    desc=f"epoch {epoch + 1}/{self.args['epochs']}", disable=not self.info.is_main,
                    dynamic_ncols=True)

    def _update_bar(self, bar, totals: torch.Tensor, started: float) -> None:
        """Step, mean loss so far and frames/s (all ranks) on the bar."""
        if bar.disable:
            return
        seconds = time.perf_counter() - started
        bar.set_postfix(step=self.progress.step, loss=f"{totals[0].item() / max(1.0, totals[1].item()):.3f}",
                        fps=f"{totals[2].item() * self.info.world_size / max(seconds, 1e-9):.0f}")

    # -- end of an epoch ----------------------------------------------------------------------------
    def end_epoch(self) -> dict:
        totals = self.epoch_totals
        if self.info.is_distributed:
            seconds = totals[-1].clone()  # rank 0's own: the others' also hold their wait for its writes
            torch.distributed.all_reduce(totals)
            totals[-1] = seconds
        metrics = self.epoch_metrics(totals)
        self.progress.epoch += 1
        self.progress.epoch_batches_done = 0
        self.progress.elapsed_s += float(totals[-1])
        self.epoch_totals = None
        split = "train" if metrics["valid_nll_bits_per_frame"] is None else "valid"
        score = metrics[f"{split}_nll_bits_per_frame"]
        improved = (self.progress.best_nll is None or split != self.progress.best_split
                    or score < self.progress.best_nll)
        if improved:
            self.progress.best_nll, self.progress.best_split = score, split
        metrics.update(epoch=self.progress.epoch, step=self.progress.step, elapsed_s=self.progress.elapsed_s)
        if self.info.is_main:
            self.write_epoch(metrics, improved)
        gain = metrics["gain_over_bigram_bits_per_frame"]
        self.log.info("epoch %d/%d: train loss %.4f, train NLL %.3f bits/frame, valid NLL %s bits/frame "
                      "(%.2f %s the bigram), LR %.3g, %.0f frames/s", self.progress.epoch, self.args["epochs"],
                      metrics["train_loss"], metrics["train_nll_bits_per_frame"],
                      "n/a" if metrics["valid_nll_bits_per_frame"] is None
                      else f"{metrics['valid_nll_bits_per_frame']:.3f}", abs(gain), "below" if gain >= 0 else "above",
                      metrics["lr"], metrics["frames_per_s"])
        for artist, bits in metrics.get("valid_nll_by_artist", {}).items():
            self.log.info("  %s: valid NLL %.3f bits/frame with its label, %.3f with 'no artist'", artist, bits,
                          metrics["valid_nll_no_artist_by_artist"][artist])
        return metrics

    def epoch_metrics(self, totals: torch.Tensor) -> dict:
        q = self.store.n_codebooks
        train_bits, train_per_codebook = bits_per_frame(totals[3:3 + q], totals[3 + q:3 + 2 * q])
        valid = self.validate()
        by_artist = self.validate_by_artist() if self.conditioned else {}
        return {"train_loss": float(totals[0] / totals[1].clamp(min=1)),
                "train_nll_bits_per_frame": train_bits, "train_nll_bits_per_codebook": train_per_codebook,
                "valid_nll_bits_per_frame": valid[0] if valid else None,
                "valid_nll_bits_per_codebook": valid[1] if valid else None,
                "lr": self.scheduler.get_last_lr()[0], "frames": int(totals[2]),
                "frames_per_s": float(totals[2] / max(float(totals[-1]), 1e-9)),
                "epoch_time_s": float(totals[-1]), "pattern": self.args["pattern"],
                **by_artist, **self.gains(valid[0] if valid else train_bits)}

    def gains(self, model_bits: float) -> dict:
        """How far below the baselines the model is (bits/frame; positive = better than the baseline)."""
        return {"gain_over_unigram_bits_per_frame": self.baselines["unigram_bits_per_frame"] - model_bits,
                "gain_over_bigram_bits_per_frame": self.baselines["bigram_bits_per_frame"] - model_bits}

    @torch.no_grad()
    def validate(self):
        """NLL of the valid split in bits per frame (and per codebook); None without a valid split.
        A joint model is scored with each clip's own artist label."""
        if len(self.valid_clips) == 0:
            return None
        q = self.store.n_codebooks
        self.valid_own_sums = self.valid_sums("own" if self.conditioned else None)  # [A, 2Q], reused per artist
        sums = self.valid_own_sums.sum(dim=0)  # [A, 2Q] -> [2Q]
        return bits_per_frame(sums[:q], sums[q:])

    @torch.no_grad()
    def valid_sums(self, label_mode: str | int | None) -> torch.Tensor:
        """NLL sums and counts of the valid split per artist `[A, 2Q]` (A = 1 for an unconditioned model).

        `label_mode`: "own" (each clip's artist), an int (that label for every clip: "no artist" is
        n_artists) or None (no label given: an unconditioned model)."""
        q, size = self.store.n_codebooks, self.args["batch_size"]
        windows = rank_share(valid_windows(self.store, self.valid_clips, self.args["context_frames"]),
                             self.info, pad=False)
        sums = torch.zeros(max(1, self.model_args.n_artists), 2 * q, dtype=torch.float64, device=self.device)
        self.local_model.eval()
        for start in range(0, len(windows), size):
            batch = windows[start:start + size]
            inputs, targets = make_batch(self.store, batch, self.args["context_frames"], self.args["pattern"])
            owners = self.store.clip_labels(batch[:, 0])  # [B]
            artist = None if label_mode is None else self._to_device(torch.from_numpy(
                owners if label_mode == "own" else np.full_like(owners, label_mode)))
            with self.precision.autocast():
                logits, _ = self.local_model(self._to_device(inputs), artist=artist)  # [B, S, Q] -> [B, S, Q, V]
            for owner in np.unique(owners):
                rows = torch.from_numpy(np.flatnonzero(owners == owner)).to(self.device)  # [b]
                _, nll_sums, counts = sequence_losses(logits[rows], self._to_device(targets)[rows])
                sums[owner, :q] += nll_sums.double()
                sums[owner, q:] += counts.double()
        self.synced_model.train()
        if self.info.is_distributed:
            torch.distributed.all_reduce(sums)
        return sums

    def validate_by_artist(self) -> dict:
        """A joint model's valid NLL per artist with its own label and with "no artist" (what the label is worth)."""
        if len(self.valid_clips) == 0:
            return {}
        q = self.store.n_codebooks
        own, unlabelled = self.valid_own_sums, self.valid_sums(self.model_args.n_artists)  # [A, 2Q] each
        record = {"valid_nll_by_artist": {}, "valid_nll_no_artist_by_artist": {},
                  "valid_nll_no_artist_bits_per_frame": bits_per_frame(unlabelled.sum(0)[:q], unlabelled.sum(0)[q:])[0]}
        for label, name in enumerate(self.artists):
            if float(own[label, q:].sum()) == 0:
                continue  # an artist without valid clips
            record["valid_nll_by_artist"][name] = bits_per_frame(own[label, :q], own[label, q:])[0]
            record["valid_nll_no_artist_by_artist"][name] = bits_per_frame(unlabelled[label, :q],
                                                                            unlabelled[label, q:])[0]
        return record

    # -- writing (rank 0 only) ---------------------------------------------------------------------
    def checkpoint(self, metrics: dict | None) -> dict:
        """The contract's checkpoint; tensors on the CPU so a machine without a GPU loads it as it is."""
        return to_cpu({
            "format": CHECKPOINT_FORMAT,
            "model": self.plain_model.state_dict(),
            "model_args": asdict(self.model_args),
            "token_contract": {**self.data.token_contract, "pattern": self.args["pattern"],
                               "context_frames": self.args["context_frames"]},
            "artist": self.artist,
            "artists": list(self.artists),  # label ids: positions in this list (a joint model's)
            "manifests": list(self.manifests),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "epoch_batches_done": self.progress.epoch_batches_done,
            "epoch_totals": None if self.epoch_totals is None else self.epoch_totals.detach().cpu(),
            "elapsed_s": self.progress.elapsed_s,
            "train_args": plain(self.args),
            "best_nll_bits_per_frame": self.progress.best_nll,
            "best_nll_split": self.progress.best_split,
            "metrics": metrics,
        })

    def write_epoch(self, metrics: dict, improved: bool) -> None:
        path = epoch_checkpoint_path(self.folder, self.progress.epoch)
        atomic_torch_save(self.checkpoint(metrics), path)
        copy_atomically(path, self.folder / "last.pt")
        if improved:
            copy_atomically(path, self.folder / "best.pt")
        prune_epochs(self.folder, self.args["keep_last"])
        records = append_metrics(self.folder / "metrics.jsonl", metrics)
        plot_losses(records, self.folder / "loss.png")

    def save_last(self) -> None:
        """A mid-epoch checkpoint (Ctrl-C, --max-steps): last.pt only, resumable exactly. Call it on
        every rank: the epoch's partial totals are summed over the ranks (rank 0 keeps its own seconds),
        so the resumed epoch counts each rank's share once; on resume rank 0 starts from the sums and
        the other ranks from zero."""
        if self.info.is_distributed and self.epoch_totals is not None:
            summed = self.epoch_totals.clone()
            torch.distributed.all_reduce(summed)
            summed[-1] = self.epoch_totals[-1]
            if self.info.is_main:
                self.epoch_totals = summed
        if not self.info.is_main:
            return
        atomic_torch_save(self.checkpoint(None), self.folder / "last.pt")
        self.log.info("saved a resumable checkpoint %s (epoch %d, %d batches into it, step %d)",
                      self.folder / "last.pt", self.progress.epoch + 1, self.progress.epoch_batches_done,
                      self.progress.step)


def to_cpu(value):
    """A nested dict / list of tensors with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def copy_atomically(source: Path, destination: Path) -> None:
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)


# ---- command line -------------------------------------------------------------------------------------------
def build_parser():
    parser = make_parser(
        "Stage 4: train the multi-codebook GPT-2 on metadata_clean_<artist>.jsonl; writes "
        "model_results/<artist>/ (epoch checkpoints, last.pt, best.pt, metrics.jsonl, loss.png). "
        "With --artist given several times, one model learns every artist, conditioned on an artist label, "
        "and goes to model_results/<name>/.",
        epilog="Several GPUs or machines: torchrun --nproc_per_node=N scripts/4_Transformer.py --artist NAME. "
               "On --resume, training options not given again come from the checkpoint.",
        multiple_artists=True)
    parser.add_argument("--name", type=artist_name,
                        help="model folder name under model_results/ (required with several --artist; same "
                             "character rules as an artist)")
    parser.allow_abbrev = False  # explicit options are found by their exact spelling (resume overrides)
    d = TRAIN_DEFAULTS
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default=d["preset"],
                       help="model size: tiny (tests), small, base (the original: d_model 512, 8 layers)")
    model.add_argument("--d-embed", type=positive_int, help="per-codebook embedding width (overrides the preset)")
    model.add_argument("--d-model", type=positive_int, help="transformer width (overrides the preset)")
    model.add_argument("--n-layer", type=positive_int, help="transformer layers (overrides the preset)")
    model.add_argument("--n-head", type=positive_int, help="attention heads (overrides the preset)")
    model.add_argument("--dropout", type=fraction, help="dropout inside the transformer (preset: 0.1)")
    model.add_argument("--tie-heads", action="store_true",
                       help="the seed's output heads: logits = projection @ the codebook's embedding table "
                            "(default: an untied linear head per codebook, which learns far better)")
    model.add_argument("--embed-init", choices=EMBED_INITS, default=d["embed_init"],
                       help="initial scale of the token inputs: unit (std 1 per channel), match (0.02, the "
                            "position table's scale) or gpt2 (the seed's ~0.004)")
    model.add_argument("--pattern", choices=PATTERNS, default=d["pattern"],
                       help="parallel: all codebooks of a frame at once; delay: MusicGen's delayed codebooks")
    model.add_argument("--context-frames", type=positive_int, default=d["context_frames"],
                       help="frames per training window (150 frames = 1 s)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=d["epochs"], help="total epochs to train to")
    train.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                       help="windows per micro-batch per rank")
    train.add_argument("--grad-accum", type=positive_int, default=d["grad_accum"],
                       help="micro-batches per optimizer step")
    train.add_argument("--lr", type=positive_float, default=d["lr"],
                       help="peak learning rate (default: the preset's, " +
                            ", ".join(f"{name} {lr:g}" for name, lr in PRESET_LR.items()) +
                            "); given with --resume it replaces the checkpoint's peak")
    train.add_argument("--min-lr-frac", type=fraction, default=d["min_lr_frac"],
                       help="the cosine ends at this fraction of --lr")
    train.add_argument("--warmup-frac", type=fraction, default=d["warmup_frac"],
                       help="fraction of all optimizer steps spent warming the LR up linearly")
    train.add_argument("--weight-decay", type=non_negative_float, default=d["weight_decay"],
                       help="AdamW weight decay (never on embeddings, norms, biases)")
    train.add_argument("--max-grad-norm", type=non_negative_float, default=d["max_grad_norm"],
                       help="clip the gradient norm to this (0: no clipping)")
    train.add_argument("--label-smoothing", type=fraction, default=d["label_smoothing"],
                       help="label smoothing of the training loss (the reported NLL is unsmoothed)")
    train.add_argument("--frame-dropout", type=fraction, default=d["frame_dropout"],
                       help="probability that an input frame is replaced by PAD (targets are kept)")
    train.add_argument("--seed", type=non_negative_int, default=d["seed"], help="seed of every random draw")
    train.add_argument("--max-steps", type=non_negative_int, default=d["max_steps"],
                       help="stop this run after this many optimizer steps in all (0: no limit); the LR "
                            "schedule still spans --epochs, so --resume continues it")
    joint = parser.add_argument_group("several artists (one conditioned model)")
    joint.add_argument("--artist-alpha", type=non_negative_float, default=d["artist_alpha"],
                       help="draw each artist's training windows with probability proportional to its frames ** "
                            "alpha: 1 = as the data come, 0 = every artist alike (docs/stage4.md)")
    joint.add_argument("--cond-dropout", type=fraction, default=d["cond_dropout"],
                       help="probability that a training window's artist label is replaced by 'no artist' "
                            "(what classifier-free guidance needs at generation)")
    run = parser.add_argument_group("run")
    run.add_argument("--resume", nargs="?", const="last", default=None, metavar="PATH",
                     help="continue from model_results/<artist>/last.pt, or from PATH")
    run.add_argument("--keep-last", type=non_negative_int, default=d["keep_last"],
                     help="keep only the newest K epoch checkpoints (0: keep all; best.pt and last.pt stay)")
    run.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (GPU: faster after warm-up)")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute activations in the backward pass: less memory, ~30%% slower")
    run.add_argument("--allow-outside-root", action="store_true",
                     help="trust manifest paths that point outside --root")
    return parser


def explicit_options(parser, argv: list[str]) -> set[str]:
    """Destinations of the options actually typed (so a resumed run knows what to override)."""
    typed = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                typed.add(action.dest)
    return typed


def resolve_train_args(namespace, explicit: set[str], checkpoint: dict | None) -> dict:
    """Training options: the command line's, or on resume the checkpoint's unless typed again."""
    given = {key: getattr(namespace, key) for key in TRAIN_DEFAULTS}
    if checkpoint is None:
        return given
    saved = {**TRAIN_DEFAULTS, **{k: v for k, v in checkpoint.get("train_args", {}).items() if k in TRAIN_DEFAULTS}}
    for key in LOCKED_ON_RESUME:
        if key in explicit and given[key] != saved[key]:
            raise StageError(f"--{key.replace('_', '-')} {given[key]} differs from the checkpoint's {saved[key]}; "
                             "a resumed run keeps the model and its tokens (use --overwrite to start over)")
    if checkpoint.get("epoch_batches_done"):
        for key in ("batch_size", "grad_accum"):
            if key in explicit and given[key] != saved[key]:
                raise StageError(f"--{key.replace('_', '-')} {given[key]} differs from the checkpoint's {saved[key]}, "
                                 f"which stopped inside epoch {checkpoint['epoch'] + 1}: the rest of that epoch "
                                 "is counted in its batches; resume without it (it may change at an epoch end)")
    runtime = ("device", "compile", "grad_checkpointing", "max_steps", "keep_last")
    return {key: given[key] if key in explicit or key in runtime else saved[key] for key in TRAIN_DEFAULTS}


def build_model_args(args: dict, n_codebooks: int, checkpoint: dict | None, n_artists: int = 0) -> ModelArgs:
    """The model's constructor arguments: the checkpoint's on resume, else the preset's with the flags'."""
    if checkpoint is not None:
        model_args = model_args_from(checkpoint["model_args"], checkpoint.get("loaded_from", "the checkpoint"))
        if model_args.n_codebooks != n_codebooks:
            raise StageError(f"the checkpoint's model reads {model_args.n_codebooks} codebooks, the manifest's "
                             f"tokens have {n_codebooks}")
        if model_args.n_artists != n_artists:
            raise StageError(f"the checkpoint's model knows {model_args.n_artists} artist labels, this run gives "
                             f"{n_artists} (0: one artist, no labels); resume with the artists it was trained on")
        needed = args["context_frames"] + extra_steps(args["pattern"], n_codebooks)  # sequence steps per window
        if needed > model_args.n_positions:
            raise StageError(f"--context-frames {args['context_frames']} needs {needed} positions with the "
                             f"{args['pattern']} pattern, the model of "
                             f"{checkpoint.get('loaded_from', 'the checkpoint')} has only {model_args.n_positions}")
        if args["dropout"] is not None:
            model_args.dropout = args["dropout"]
        return model_args
    overrides = {key: args[key] for key in ("d_embed", "d_model", "n_layer", "n_head", "dropout", "tie_heads",
                                            "embed_init")}
    model_args = model_args_for(args["preset"], n_codebooks, args["context_frames"], overrides)
    model_args.n_artists = n_artists
    if model_args.d_model % model_args.n_head:
        raise StageError(f"--d-model {model_args.d_model} is not divisible by --n-head {model_args.n_head}")
    return model_args


def find_resume_checkpoint(namespace, folder: Path) -> tuple[dict | None, str]:
    """The checkpoint to continue from, or None for a fresh run; 'done' when nothing is left to do."""
    last = folder / "last.pt"
    if namespace.resume:
        path = last if namespace.resume == "last" else Path(namespace.resume)
        if not path.is_file():
            raise StageError(f"nothing to resume: {path} does not exist{resumable_alternatives(folder)}")
        return read_checkpoint(path), "resume"
    if namespace.overwrite or not last.is_file():
        return None, "fresh"
    checkpoint = read_checkpoint(last)
    whole_epochs = not checkpoint.get("epoch_batches_done")
    if checkpoint["epoch"] >= namespace.epochs and whole_epochs:
        return checkpoint, "done"
    planned = checkpoint.get("train_args", {}).get("epochs")
    state = "finished" if whole_epochs and planned is not None and checkpoint["epoch"] >= planned else "stopped"
    raise StageError(f"{folder} already holds a run {state} at epoch {checkpoint['epoch']} "
                     f"(step {checkpoint['step']}): pass --resume to continue it to --epochs {namespace.epochs}, "
                     "or --overwrite to start over")


def resumable_alternatives(folder: Path) -> str:
    """'; these checkpoints could be resumed: --resume PATH ...' for the epoch checkpoints in `folder`."""
    numbered = sorted(epoch_checkpoints(folder), reverse=True)
    if not numbered:
        return f" and {folder} holds no epoch checkpoint either"
    return "; resume one of the epoch checkpoints instead: " + ", ".join(
        f"--resume {path}" for _, path in numbered)


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    namespace = parser.parse_args(argv)
    info = dist_info()
    log = setup_logging(namespace.log_level if info.is_main else "WARNING", "stage4")
    device = resolve_device(namespace.device)
    if info.is_distributed:
        init_process_group(device)
        if device.startswith("cuda"):
            device = f"cuda:{info.local_rank}"
    try:
        status = train_from_command_line(namespace, explicit_options(parser, argv), info, device, log)
    except TrainingDiverged as error:
        log.error("%s", error)
        status = EXIT_RUN_FAILED  # the run started and failed: not a usage error
    except StageError:
        if info.is_distributed:
            finish_process_group()  # every rank meets the same start-up error
        raise
    if info.is_distributed:
        finish_process_group()
    return status


def model_name(artists: list[str], name: str | None) -> str:
    """The model's folder name under model_results/: --name, else the one artist's (--name is required with several)."""
    repeated = sorted({artist for artist in artists if artists.count(artist) > 1})
    if repeated:
        raise StageError(f"--artist {repeated[0]!r} is given more than once")
    if len(artists) > 1 and name is None:
        raise StageError(f"--name is required with several artists ({', '.join(artists)}): the joint model is "
                         "written to model_results/<name>/")
    return name or artists[0]


def check_artist_labels(checkpoint: dict | None, artists: list[str]) -> None:
    """A resumed joint model keeps its artists in their order (the order is the label ids)."""
    if checkpoint is None or int(checkpoint["model_args"].get("n_artists", 0)) == 0:
        return
    saved = list(checkpoint.get("artists", []))
    if saved != list(artists):
        raise StageError(f"{checkpoint.get('loaded_from', 'the checkpoint')} was trained on the artists "
                         f"{', '.join(saved)} (in this order, the label ids); resume with the same --artist list")


def load_training_data(namespace, artists: list[str], log) -> tuple[Dataset, list[Path]]:
    """The pooled dataset of `artists` (labels = their positions) and the manifests it came from."""
    entries, labels, manifests = read_artist_manifests(namespace.root, artists, namespace.allow_outside_root)
    data = load_dataset(entries, log, entry_labels=labels if len(artists) > 1 else None)
    train_labels = set(data.store.clip_labels(data.store.clips("train")).tolist())
    for label, artist in enumerate(artists):
        if label not in train_labels:
            raise StageError(f"{manifest_path(namespace.root, artist)}: no usable clip has split 'train'")
    return data, manifests


def train_from_command_line(namespace, explicit: set[str], info: DistInfo, device: str, log) -> int:
    artists = list(namespace.artist)
    name = model_name(artists, namespace.name)
    report = StageReport(stage="4_Transformer", artist=name)
    folder = model_dir(namespace.root, name)
    checkpoint, mode = find_resume_checkpoint(namespace, folder)
    if mode == "done":
        log.info("%s is already trained to epoch %d: nothing to do (--resume --epochs N continues, "
                 "--overwrite starts over)", folder, checkpoint["epoch"])
        return EXIT_OK
    if info.is_main and remove_stale_temporaries(folder):  # an interrupted write's leftovers; never read
        log.info("removed the temporary files of an interrupted write from %s", folder)
    if namespace.overwrite and not namespace.resume and info.is_main and folder.is_dir():
        log.info("--overwrite: removed %d previous outputs from %s", clear_outputs(folder), folder)
    args = resolve_train_args(namespace, explicit, checkpoint)
    if args["lr"] is None:  # a fresh run without --lr (a checkpoint always holds its LR)
        args["lr"] = PRESET_LR[args["preset"]]
    check_artist_labels(checkpoint, artists)
    data, manifests = load_training_data(namespace, artists, log)
    report.failed.extend({"path": audio, "reason": reason} for audio, reason in data.skipped)  # logged already
    if len(data.store.clips("valid")) == 0:
        log.warning("no 'valid' clips in the manifest: best.pt follows the training NLL instead")
    model_args = build_model_args(args, data.store.n_codebooks, checkpoint,
                                  n_artists=len(artists) if len(artists) > 1 else 0)
    args.update(tie_heads=model_args.tie_heads, embed_init=model_args.embed_init)  # an old checkpoint's: the seed's
    trainer = Trainer(args, model_args, data, folder, name, info, device, log, artists=artists, manifests=manifests)
    if checkpoint is not None:
        trainer.restore(checkpoint, args["lr"] if "lr" in explicit else None, explicit)
        progress = trainer.progress
        log.info("resuming epoch %d (%d batches into it) at optimizer step %d", progress.epoch + 1,
                 progress.epoch_batches_done, progress.step)
    status = trainer.run()
    best = trainer.progress.best_nll
    log.info("%s: %d epochs, %d steps, best %s NLL %s bits/frame; outputs in %s", name,
             trainer.progress.epoch, trainer.progress.step, trainer.progress.best_split,
             "n/a" if best is None else f"{best:.3f}", folder)
    return status if status != EXIT_OK else report.exit_code()


if __name__ == "__main__":
    sys.exit(run_main(main))
