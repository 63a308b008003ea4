#!/usr/bin/env python3
"""Stage 4: train the multi-codebook GPT-2 on an artist's Encodec tokens.

The model (`MusicTransformer`, `ModelArgs`, the presets and the checks of saved weights), the
command line and the resume policy (which options a resumed run takes from its checkpoint) live
here. The engine that trains the model is the package's: `pipeline.trainer` runs the loop on the
data of `pipeline.train_data` with the pieces of `pipeline.training`, and writes the run folder of
`pipeline.runs`. Everything else loads the model through `pipeline.model_io`.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.cli import (EXIT_OK, EXIT_RUN_FAILED, StageError, StageReport, artist_name, fraction,  # noqa: E402
                          make_parser, non_negative_float, non_negative_int, positive_float, positive_int,
                          resolve_device, run_main, setup_logging)
from pipeline.contract import PAD, VOCAB_SIZE  # noqa: E402
from pipeline.dist import DistInfo, dist_info, finish_process_group, init_process_group  # noqa: E402
from pipeline.files import remove_stale_temporaries  # noqa: E402
from pipeline.originality import write_training_index  # noqa: E402
from pipeline.model_io import find_init_source, initialise_from  # noqa: E402
from pipeline.patterns import PATTERNS, extra_steps  # noqa: E402
from pipeline.positions import POSITIONS, relative_forward  # noqa: E402
from pipeline import threads  # noqa: E402
from pipeline.requirements import check_transformers  # noqa: E402
from pipeline.runs import TRAINING_INDEX, clear_outputs, epoch_checkpoints, model_dir, read_checkpoint  # noqa: E402
from pipeline.train_data import load_artists  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402
from pipeline.training import TrainingDiverged  # noqa: E402

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
    tie_heads: bool = False  # True: the original's heads, logits = proj(hidden) @ embedding table
    # input channels start at std 0.02 ("match", the position table's), 1 ("unit") or ~0.004 ("gpt2", the original's)
    embed_init: str = "match"
    n_artists: int = 0  # artist labels; 0: unconditioned (no table), N > 0: N + 1 embeddings, "no artist" last
    # "learned" (GPT-2's table; every checkpoint written before this field), "rope" or "alibi" (pipeline.positions)
    positions: str = "learned"


# The original's architecture, for checkpoints written before these fields existed.
LEGACY_MODEL_ARGS = {"tie_heads": True, "embed_init": "gpt2"}
INPUT_STD = {"unit": 1.0, "match": 0.02}  # std of an input channel at init, per embed_init
EMBED_INITS = (*INPUT_STD, "gpt2")


class MusicTransformer(nn.Module):
    """Per-codebook embeddings -> concat -> projection -> GPT-2 -> Q output heads.

    Input tokens `[B, T, Q]` (codes 0..1023, BOS, PAD); output logits `[B, T, Q, VOCAB_SIZE]`
    where position t predicts the tokens of position t+1. The heads are one `Linear(d_model, Q*V)`
    (untied, the default) or, with `tie_heads`, a `d_model -> d_embed` projection per codebook
    multiplied by that codebook's embedding table (the original's design; see docs/stage4.md for why
    it is no longer the default).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        check_transformers()  # an older transformers would drop `cache=` silently
        from transformers import GPT2Config, GPT2Model

        if args.embed_init not in EMBED_INITS:
            raise ValueError(f"embed_init {args.embed_init!r}: choose one of {', '.join(EMBED_INITS)}")
        if args.positions not in POSITIONS:
            raise ValueError(f"positions {args.positions!r}: choose one of {', '.join(POSITIONS)}")
        self.args = args
        self.embeddings = nn.ModuleList(
            nn.Embedding(VOCAB_SIZE, args.d_embed, padding_idx=PAD) for _ in range(args.n_codebooks))
        self.input_proj = nn.Linear(args.n_codebooks * args.d_embed, args.d_model)
        config = GPT2Config(vocab_size=1, n_embd=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                            n_positions=args.n_positions, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                            attn_pdrop=args.dropout, bos_token_id=None, eos_token_id=None, use_cache=False,
                            attn_implementation="sdpa")
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

        "gpt2" (the original's): embeddings and input projection both N(0, 0.02), so a token reached the
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

    def prepare_training(self, grad_checkpointing: bool = False) -> None:
        """Freeze GPT-2's token table (unused: inputs arrive through inputs_embeds) and, with relative
        positions, its position table (RoPE / ALiBi carry the positions); with `grad_checkpointing`,
        recompute the backbone's activations in the backward pass."""
        self.backbone.wte.requires_grad_(False)
        if self.args.positions != "learned":
            self.backbone.wpe.requires_grad_(False)
        if grad_checkpointing:
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

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
        if self.args.positions != "learned":  # RoPE / ALiBi: GPT-2's blocks, relative scores (no cache)
            if cache is not None or use_cache:
                raise ValueError(f"a model with {self.args.positions} positions has no transformers cache: "
                                 "generate with the lean engine")
            hidden = relative_forward(self.backbone, self.embed(tokens, artist), attention_mask, self.args.positions,
                                      position_ids)
            return self.logits(hidden), None
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


def new_model(model_args: ModelArgs, seed: int) -> MusicTransformer:
    """An untrained model drawn from `seed` (the same weights on every rank of a torchrun)."""
    torch.manual_seed(seed)
    return MusicTransformer(model_args)


# ---- options and the resume policy ------------------------------------------------------------
# Training options a resumed run takes from its checkpoint unless given again on the command line.
TRAIN_DEFAULTS = dict(
    preset="base", d_embed=None, d_model=None, n_layer=None, n_head=None, dropout=None, tie_heads=False,
    embed_init="match", pattern="delay", context_frames=1500, epochs=20, batch_size=8, grad_accum=1, lr=None,
    min_lr_frac=0.1, warmup_frac=0.05, weight_decay=0.1, max_grad_norm=1.0, label_smoothing=0.0,
    frame_dropout=0.0, seed=0, keep_last=1, max_steps=0, patience=4, device="auto", compile=False,
    grad_checkpointing=False, artist_alpha=0.5, cond_dropout=0.3, init_from=None, positions="rope",
    copy_path="ngram",
)
# Peak learning rate of each preset when --lr is not given (docs/stage4.md, "The recipe").
PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "base": 6e-4}
# These fix the model or the meaning of its tokens: a resumed run must keep them.
LOCKED_ON_RESUME = ("preset", "d_embed", "d_model", "n_layer", "n_head", "tie_heads", "embed_init", "pattern",
                    "context_frames", "init_from", "positions")


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
    parser.allow_abbrev = False  # options are spelled out in full
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
                       help="the original's output heads: logits = projection @ the codebook's embedding table "
                            "(default: an untied linear head per codebook, which learns far better)")
    model.add_argument("--embed-init", choices=EMBED_INITS, default=d["embed_init"],
                       help="initial scale of the token inputs: unit (std 1 per channel), match (0.02, the "
                            "position table's scale) or gpt2 (the original's ~0.004)")
    model.add_argument("--pattern", choices=PATTERNS, default=d["pattern"],
                       help="parallel: all codebooks of a frame at once; delay: MusicGen's delayed codebooks")
    model.add_argument("--positions", choices=POSITIONS, default=d["positions"],
                       help="how the model knows where a frame is: learned (GPT-2's absolute table), rope "
                            "(rotary queries/keys) or alibi (a distance penalty per head); docs/stage4.md")
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
    train.add_argument("--copy-path", choices=("ngram", "off"), default=d["copy_path"],
                       help="ngram: a validation that improves the best valid NLL fits the in-context copy path "
                            "(pipeline/copying.py) on held-out windows, logs the mixture's NLL and saves it in the "
                            "checkpoint for stage 5; off: the model alone")
    train.add_argument("--seed", type=non_negative_int, default=d["seed"], help="seed of every random draw")
    train.add_argument("--max-steps", type=non_negative_int, default=d["max_steps"],
                       help="stop this run after this many optimizer steps in all (0: no limit); the LR "
                            "schedule still spans --epochs, so --resume continues it; the last steps are "
                            "validated before it stops")
    train.add_argument("--patience", type=non_negative_int, default=d["patience"],
                       help="stop early when the valid NLL has not improved for N epochs (0: never); best.pt "
                            "keeps the best epoch")
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
    run.add_argument("--init-from", metavar="MODEL|PATH", default=d["init_from"],
                     help="start from the weights of another run (a model name under model_results/, e.g. a joint "
                          "model of all your artists, or a checkpoint file) and fine-tune them; the model keeps "
                          "that run's size, pattern and context (docs/stage4.md, 'Starting from another model')")
    run.add_argument("--keep-last", type=non_negative_int, default=d["keep_last"],
                     help="keep only the newest K epoch checkpoints (0: keep all; best.pt and last.pt stay)")
    run.add_argument("--device", default=d["device"], help="auto, cpu, cuda or cuda:N")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (GPU: faster after warm-up)")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute activations in the backward pass: less memory, ~30%% slower")
    run.add_argument("--allow-outside-root", action="store_true",
                     help="trust manifest paths that point outside --root")
    return parser


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The training options actually typed in `argv` (so a resumed run knows what to override).

    argparse fills in an option's default only where the namespace it parses into lacks the
    attribute: parsed into a namespace where every training option already holds a marker, the
    options that lose their marker are the typed ones."""
    untyped = object()
    marked = argparse.Namespace(**{key: untyped for key in TRAIN_DEFAULTS})
    parser.parse_args(argv, namespace=marked)
    return {key for key in TRAIN_DEFAULTS if getattr(marked, key) is not untyped}


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
    runtime = ("device", "compile", "grad_checkpointing", "max_steps", "keep_last", "patience")
    return {key: given[key] if key in explicit or key in runtime else saved[key] for key in TRAIN_DEFAULTS}


def build_model_args(args: dict, n_codebooks: int, checkpoint: dict | None, n_artists: int = 0,
                     fresh_labels: bool = False) -> ModelArgs:
    """The model's constructor arguments: the checkpoint's on resume (or --init-from's, with this run's
    artist labels when `fresh_labels`), else the preset's with the flags'."""
    if checkpoint is not None:
        model_args = model_args_from(checkpoint["model_args"], checkpoint.get("loaded_from", "the checkpoint"))
        if model_args.n_codebooks != n_codebooks:
            raise StageError(f"the checkpoint's model reads {model_args.n_codebooks} codebooks, the manifest's "
                             f"tokens have {n_codebooks}")
        if fresh_labels:
            model_args.n_artists = n_artists
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
                                            "embed_init", "positions")}
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
    if device == "cpu":
        threads.configure(log)  # only the cores other processes leave free
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


def ensure_training_index(data, folder: Path, fresh: bool, info: DistInfo, log) -> None:
    """Rank 0 indexes the train split's frames next to the model (what stage 5's originality report looks
    pieces up in): on a fresh run, and on a resumed one whose folder lacks the index."""
    if info.is_main and (fresh or not (folder / TRAINING_INDEX).is_file()):
        write_training_index(data.store, folder, float(data.token_contract["frame_rate"]), log)


def init_source(root: Path, args: dict, checkpoint: dict | None, log) -> dict | None:
    """--init-from on a fresh run: the source checkpoint, its architecture and pattern adopted (recorded in
    `args`); None without it or on resume (a resumed run continues its own weights)."""
    if checkpoint is not None or not args["init_from"]:
        return None
    path = find_init_source(root, args["init_from"])
    source = read_checkpoint(path)
    saved = {**TRAIN_DEFAULTS, **source.get("train_args", {})}
    pattern = source.get("token_contract", {}).get("pattern", saved["pattern"])
    if pattern != args["pattern"]:
        log.info("--init-from %s: using its %s pattern (this run asked for %s)", path, pattern, args["pattern"])
    model_args = source["model_args"]
    positions = model_args.get("positions", "learned")
    if positions != args["positions"]:
        log.info("--init-from %s: using its %s positions (this run asked for %s)", path, positions, args["positions"])
    args.update(pattern=pattern, preset=saved["preset"], positions=positions,
                **{key: model_args.get(key) for key in ("d_embed", "d_model", "n_layer", "n_head")})
    return source


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
    data, manifests = load_artists(namespace.root, artists, namespace.allow_outside_root, log)
    report.failed.extend({"path": audio, "reason": reason} for audio, reason in data.skipped)  # logged already
    if len(data.store.clips("valid")) == 0:
        log.warning("no 'valid' clips in the manifest: best.pt follows the training NLL instead")
    source = init_source(namespace.root, args, checkpoint, log)
    model_args = build_model_args(args, data.store.n_codebooks, checkpoint or source,
                                  n_artists=len(artists) if len(artists) > 1 else 0, fresh_labels=source is not None)
    # an old checkpoint's: the original's heads and init, learned positions
    args.update(tie_heads=model_args.tie_heads, embed_init=model_args.embed_init, positions=model_args.positions)
    model = new_model(model_args, args["seed"])
    if checkpoint is not None:
        check_state_dict(model, checkpoint["model"], checkpoint.get("loaded_from", "the checkpoint"))
    elif source is not None:
        log.info("starting from the weights of %s (epoch %s); %s", source["loaded_from"], source.get("epoch"),
                 initialise_from(source, model, artists))
    trainer = Trainer(args, model, data, folder, name, info, device, log, artists=artists, manifests=manifests)
    if checkpoint is not None:
        trainer.restore(checkpoint, args["lr"] if "lr" in explicit else None, explicit)
        progress = trainer.progress
        log.info("resuming epoch %d (%d batches into it) at optimizer step %d", progress.epoch + 1,
                 progress.epoch_batches_done, progress.step)
    status = trainer.run()
    if status == EXIT_OK:  # after training: the first step does not wait for it (a stopped run builds it on resume)
        ensure_training_index(data, folder, checkpoint is None, info, log)
    best = trainer.progress.best_nll
    log.info("%s: %d epochs, %d steps, best %s NLL %s bits/frame; outputs in %s", name,
             trainer.progress.epoch, trainer.progress.step, trainer.progress.best_split,
             "n/a" if best is None else f"{best:.3f}", folder)
    return status if status != EXIT_OK else report.exit_code()


if __name__ == "__main__":
    sys.exit(run_main(main))
