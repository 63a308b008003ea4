#!/usr/bin/env python3
"""Stage 5: continue (or start) a piece with a trained MusicTransformer and decode it to stereo audio.

Story of a run: parse the options, find and rebuild the checkpoint's model, build the prompt
(none, a token file, or audio encoded with the training codec), generate tokens with the KV cache
(sliding the context window MusicGen-style when the piece outgrows it), decode them with per-chunk
scales and Encodec's overlap-add, normalise, and write `<name>.{wav,th,json,png}` per piece into
`music_transformer/<artist>/`.

Token grid: the model reads and writes "rows" of Q codebook cells. In the `parallel` pattern row s
holds frame s; in the `delay` pattern cell (s, q) holds codebook q of frame s - q. Input position 0
is always a BOS row and position p >= 1 holds row p - 1, so the logits at position p predict row p
(exactly the layout `build_sequence` trains on). Cells outside the window's frames are BOS.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.audio import DEFAULT_TARGET_LUFS, AudioDecodeError, load_conditioned, normalise_wave  # noqa: E402
from pipeline.cli import (StageError, StageReport, bounded_number, make_parser, non_negative_float,  # noqa: E402
                          non_negative_int, positive_float, positive_int, resolve_device, run_main,
                          setup_logging)
from pipeline.codec import UNTRAINED_WARNING, CodecUnavailable, load_codec  # noqa: E402
from pipeline.contract import (BOS, CODEBOOK_SIZE, SAMPLE_RATE, TokenFile, TokenFileError,  # noqa: E402
                               load_token_file, save_token_file)
from pipeline.files import (PathEscapesRoot, atomic_path, atomic_write_json, remove_stale_temporaries,  # noqa: E402
                            resolve_inside)
from pipeline.manifest import ManifestError, manifest_path, read_manifest  # noqa: E402
from pipeline.stages import load_stage  # noqa: E402

LOG = logging.getLogger("pipeline.stage5")
STAGE = "5_MusicPrediction"
UNKNOWN = -1  # a cell of the frame buffer that is neither prompt nor generated yet
OUTPUT_SUFFIXES = (".wav", ".th", ".png", ".json")  # the JSON is written last: it marks a finished piece

probability_mass = bounded_number(float, 0.0, 1.0, minimum_inclusive=False)
penalty_factor = bounded_number(float, 1.0)
loudness_target = bounded_number(float, None, 0.0)


# ==== checkpoint ==============================================================================
@dataclass
class LoadedModel:
    """A rebuilt model with what stage 5 needs from its checkpoint."""

    model: torch.nn.Module
    path: Path
    model_args: dict
    contract: dict
    epoch: int | None
    step: int | None

    @property
    def n_codebooks(self) -> int:
        return int(self.model_args["n_codebooks"])


def find_checkpoint(root: Path, artist: str, checkpoint: Path | None, epoch: int | None) -> Path:
    """`--checkpoint`, else `--epoch N`, else `best.pt`, else `last.pt` in `model_results/<artist>/`."""
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise StageError(f"checkpoint {checkpoint} does not exist")
        return checkpoint
    folder = root / "model_results" / artist
    if epoch is not None:
        path = folder / f"music_transformer_ep{epoch}.pt"
        if not path.is_file():
            raise StageError(f"no checkpoint for epoch {epoch}: {path} does not exist ({_held_checkpoints(folder)})")
        return path
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    raise StageError(f"no best.pt or last.pt in {folder} ({_held_checkpoints(folder)}): train the artist with "
                     f"scripts/4_Transformer.py --artist {artist!r}, or pass --checkpoint / --epoch")


def _held_checkpoints(folder: Path) -> str:
    names = sorted(path.name for path in folder.glob("*.pt")) if folder.is_dir() else []
    return f"it holds {', '.join(names)}" if names else "it holds no checkpoint"


def load_checkpoint(path: Path, device: str) -> LoadedModel:
    """Rebuild the model from the saved constructor arguments; only the weights go to `device`."""
    stage4 = load_stage("4_Transformer")
    # stage 4's reader: weights_only, on the CPU (optimizer states never touch the device), prefixes stripped
    checkpoint = stage4.load_checkpoint(path)
    if "token_contract" not in checkpoint:
        raise StageError(f"{path}: not a stage-4 checkpoint, missing token_contract")
    model_args, contract = dict(checkpoint["model_args"]), dict(checkpoint["token_contract"])
    model = build_model(stage4, model_args, path)
    check_contract(model_args, contract, path)
    stage4.check_state_dict(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return LoadedModel(model=model, path=path, model_args=model_args, contract=contract,
                       epoch=checkpoint.get("epoch"), step=checkpoint.get("step"))


def build_model(stage4, model_args: dict, path: Path) -> torch.nn.Module:
    return stage4.MusicTransformer(stage4.model_args_from(model_args, path))


def check_contract(model_args: dict, contract: dict, path: Path) -> None:
    missing = [key for key in ("n_codebooks", "bandwidth", "codec", "pattern") if key not in contract]
    if missing:
        raise StageError(f"{path}: token_contract lacks {', '.join(missing)}")
    if int(contract["n_codebooks"]) != int(model_args.get("n_codebooks", -1)):
        raise StageError(f"{path}: token_contract says Q = {contract['n_codebooks']} codebooks, "
                         f"model_args says n_codebooks = {model_args.get('n_codebooks')}")
    if contract["pattern"] not in ("parallel", "delay"):
        raise StageError(f"{path}: unknown codebook pattern {contract['pattern']!r}")


# ==== frames <-> samples ======================================================================
def frames_for_samples(codec, num_samples: int) -> int:
    """Codec frames that carry `num_samples` of audio: full chunks, then the last chunk's real frames."""
    return (codec.n_chunks(num_samples) - 1) * codec.chunk_frames + codec.last_chunk_frames(num_samples)


def samples_for_frames(codec, n_frames: int) -> int:
    """Inverse of `frames_for_samples` (a last chunk keeps at most 149 frames: a chunk overlaps the next)."""
    n_chunks = math.ceil(n_frames / codec.chunk_frames)
    last_frames = n_frames - (n_chunks - 1) * codec.chunk_frames
    return (n_chunks - 1) * codec.chunk_stride + min(last_frames * codec.hop_length, codec.chunk_stride)


# ==== prompt ==================================================================================
@dataclass
class Prompt:
    frames: torch.Tensor | None  # long [1, L, Q], None for an unconditional start
    scales: torch.Tensor | None  # float32 [n_chunks] of the prompt's chunks, None when unknown
    kind: str = "none"
    source: str = ""

    @property
    def n_frames(self) -> int:
        return 0 if self.frames is None else int(self.frames.shape[1])


def prompt_from_tokens(path: Path, codec, n_codebooks: int, bandwidth: float, prompt_seconds: float | None) -> Prompt:
    """A `.th` file (contract dict or bare `[1, Q, T]`) -> its first `prompt_seconds` of frames."""
    try:
        tokens = load_token_file(path)
    except TokenFileError as error:
        raise StageError(str(error)) from None
    if tokens.n_codebooks != n_codebooks:
        raise StageError(f"{path}: the prompt has Q = {tokens.n_codebooks} codebooks, the checkpoint was trained "
                         f"on Q = {n_codebooks} ({bandwidth:g} kbps): tokenize the prompt at that bandwidth")
    if tokens.codec not in ("unknown", codec.name):
        LOG.warning("%s was encoded with codec %s, generation decodes with %s", path, tokens.codec, codec.name)
    n_frames = min(tokens.n_frames, frames_for_samples(codec, tokens.num_samples))
    if prompt_seconds is not None:
        n_frames = min(n_frames, frames_for_samples(codec, round(prompt_seconds * SAMPLE_RATE)))
    frames = tokens.codes[:, :, :n_frames].long().transpose(1, 2)  # [1, Q, T] -> [1, L, Q]
    scales = None if tokens.scales is None else tokens.scales[:math.ceil(n_frames / codec.chunk_frames)]
    return Prompt(frames=frames, scales=scales, kind="tokens", source=str(path))


def prompt_from_audio(path: Path, codec, bandwidth: float, prompt_seconds: float | None, target_lufs: float) -> Prompt:
    """Any audio stage 1 reads, conditioned the same way and encoded like the training tokens."""
    try:
        wave = load_conditioned(path, target_lufs=target_lufs, max_seconds=prompt_seconds)  # [n, 2]
    except (AudioDecodeError, OSError) as error:
        raise StageError(str(error)) from None
    if wave.shape[0] < codec.hop_length:
        raise StageError(f"{path}: the prompt audio is shorter than one codec frame")
    codes, scales = codec.encode(torch.from_numpy(wave.T.copy()), bandwidth)  # [2, n] -> [1, Q, T], [1, C]
    n_frames = frames_for_samples(codec, wave.shape[0])
    frames = codes[:, :, :n_frames].long().transpose(1, 2)  # [1, Q, T] -> [1, L, Q]
    return Prompt(frames=frames, scales=scales[0], kind="audio", source=str(path))


# ==== sampling ================================================================================
@dataclass
class SamplingSettings:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 250  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_window: int = 150


def mask_special(logits: torch.Tensor) -> torch.Tensor:
    """BOS and PAD are never sampled: their logits become -inf."""
    logits = logits.clone()
    logits[..., CODEBOOK_SIZE:] = float("-inf")
    return logits


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """Lower every token seen in `recent` `[B, W, Q]` (UNKNOWN = none) by log(penalty) in logit space.

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
                  generator: torch.Generator | None) -> torch.Tensor:
    """Masked logits `[B, Q, V]` and per-piece temperatures `[B]` -> tokens `[B, Q]` (temperature 0 = greedy).

    Top-k, then top-p over the k candidates, then one draw; drawing among the k candidates instead
    of the whole vocabulary keeps the random-number work (most of a step's sampling cost) small.
    """
    greedy_pieces = temperatures <= 0  # [B]
    if bool(greedy_pieces.all()):
        return logits.argmax(dim=-1)  # [B, Q]
    scaled = logits / temperatures.clamp_min(1e-6).view(-1, 1, 1)  # [B, Q, V]
    if 0 < settings.top_k < min(scaled.shape[-1], CODEBOOK_SIZE):  # k >= 1024 keeps every code: off
        candidates, token_ids = torch.topk(scaled, settings.top_k, dim=-1)  # [B, Q, k], sorted descending
    else:
        candidates, token_ids = torch.sort(scaled, dim=-1, descending=True)  # [B, Q, V]
    probs = torch.softmax(keep_nucleus(candidates, settings.top_p), dim=-1).flatten(0, 1)  # [B*Q, k]
    choice = torch.multinomial(probs, 1, generator=generator)  # [B*Q, 1] index among the candidates
    drawn = token_ids.flatten(0, 1).gather(1, choice).view(logits.shape[:2])  # [B*Q, 1] -> [B, Q]
    if bool(greedy_pieces.any()):
        return torch.where(greedy_pieces.view(-1, 1), logits.argmax(dim=-1), drawn)
    return drawn


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

    @property
    def enabled(self) -> bool:
        return self.settings.bits > 0

    def temperatures(self, base: float) -> torch.Tensor:
        """Per-piece temperature `[B]`: boosted pieces decay linearly back to `base`."""
        if not any(self.boost_left):  # the usual case: reuse one tensor instead of building one per step
            if self._unboosted is None or float(self._unboosted[0]) != base:
                self._unboosted = torch.full((len(self.boost_left),), base, device=self.history.device)
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


# ==== generation ==============================================================================
@dataclass
class GenerationSettings:
    pattern: str = "parallel"
    context_frames: int = 1500
    stride_frames: int = 750
    use_cache: bool = True
    num_samples: int = 1


class WindowPlan:
    """One window's grid: for each row and codebook, its frame, whether it lies in the window, whether it is open."""

    def __init__(self, frames: torch.Tensor, inside: torch.Tensor, open_cells: torch.Tensor, device: str):
        self.frames, self.inside, self.open_cells = frames, inside, open_cells  # [R, Q] each, on the CPU
        self.frames_on_device = frames.to(device)
        self.inside_on_device = inside.to(device)
        self.open_on_device = open_cells.to(device)
        self.n_rows = int(frames.shape[0])
        open_rows = open_cells.any(dim=1)  # [R]
        self.row_has_open = open_rows.tolist()
        self.row_all_open = open_cells.all(dim=1).tolist()
        self.row_closes_frame = open_cells[:, -1].tolist()
        self.first_open_row = int(torch.nonzero(open_rows)[0]) if bool(open_rows.any()) else self.n_rows


class TokenGenerator:
    """Fills a frame buffer `[B, N, Q]` window by window; each window is one causal pass over the grid.

    A window covers at most `context_frames` frames. When it is full, the next one keeps the most
    recent `context_frames - stride_frames` frames as its prompt (re-prefilled from a fresh BOS),
    so no step ever attends to more than one window and the time per frame stays flat.
    """

    def __init__(self, model, generation: GenerationSettings, sampling: SamplingSettings,
                 detector: CollapseDetector | None, generator: torch.Generator | None, device: str):
        self.model = model
        self.generation = generation
        self.sampling = sampling
        self.detector = detector
        self.generator = generator
        self.device = device
        self.n_codebooks = int(model.args.n_codebooks)
        delayed = generation.pattern == "delay"
        self.offsets = torch.arange(self.n_codebooks) if delayed else torch.zeros(self.n_codebooks, dtype=torch.long)
        self.extra_rows = self.n_codebooks - 1 if delayed else 0
        self.max_position = 0  # the largest position any forward pass used (tests check the window bound)
        self.codebook_index = torch.arange(self.n_codebooks, device=device)
        self._temperatures = None

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor | None, total_frames: int, progress=None) -> torch.Tensor:
        """prompt long `[1, L, Q]` (or None) -> frames long `[B, total_frames, Q]` with the prompt kept."""
        batch = self.generation.num_samples
        self.codes = torch.full((batch, total_frames, self.n_codebooks), UNKNOWN, dtype=torch.long,
                                device=self.device)  # [B, N, Q]
        self.known = torch.zeros(total_frames, self.n_codebooks, dtype=torch.bool)  # [N, Q], shared by the batch
        if prompt is not None:
            length = min(prompt.shape[1], total_frames)
            self.codes[:, :length] = prompt[:, :length].to(self.device)  # [1, L, Q] -> [B, L, Q]
            self.known[:length] = True
        self.progress = progress
        while not bool(self.known.all()):
            start = self._window_start()
            self._run_window(self.plan_window(start, min(self.generation.context_frames, total_frames - start)))
        return self.codes

    def _window_start(self) -> int:
        """0 while the whole history fits with room to generate; later the last (context - stride) frames."""
        first_unknown = int(torch.nonzero(~self.known.all(dim=1))[0])
        context = self.generation.context_frames
        if first_unknown < context:
            return 0
        return first_unknown - (context - self.generation.stride_frames)

    def plan_window(self, start: int, frames_in_window: int) -> "WindowPlan":
        """Where every cell of the window's grid comes from, computed once so a step only indexes it."""
        rows = torch.arange(frames_in_window + self.extra_rows).unsqueeze(1)  # [R, 1]
        relative = rows - self.offsets.unsqueeze(0)  # [R, 1] - [1, Q] -> [R, Q] frame within the window
        inside = (relative >= 0) & (relative < frames_in_window)  # [R, Q]
        frames = start + relative.clamp(0, frames_in_window - 1)  # [R, Q] frame in the piece
        open_cells = inside & ~self.known[frames, torch.arange(self.n_codebooks)]  # [R, Q] to be sampled
        return WindowPlan(frames=frames, inside=inside, open_cells=open_cells, device=self.device)

    def _rows(self, plan: "WindowPlan", first_row: int, stop_row: int) -> torch.Tensor:
        """Grid rows `first_row..stop_row-1` -> model inputs `[B, S, Q]` (BOS outside the window)."""
        batch = self.codes.shape[0]
        index = plan.frames_on_device[first_row:stop_row].unsqueeze(0).expand(batch, -1, -1)  # [B, S, Q]
        values = self.codes.gather(1, index)  # [B, S, Q]
        return torch.where(plan.inside_on_device[first_row:stop_row], values, BOS)

    def _run_window(self, plan: "WindowPlan") -> None:
        first_row, n_rows = plan.first_open_row, plan.n_rows
        batch = self.codes.shape[0]
        bos = torch.full((batch, 1, self.n_codebooks), BOS, dtype=torch.long, device=self.device)
        inputs = torch.cat([bos, self._rows(plan, 0, first_row)], dim=1)  # [B, 1+S, Q]
        logits, cache = self._forward(inputs, 0, None)
        for row in range(first_row, n_rows):
            self._fill_row(plan, row, logits[:, -1])  # logits at position `row` predict grid row `row`
            if row + 1 == n_rows:
                break
            new_row = self._rows(plan, row, row + 1)  # [B, 1, Q], input position row + 1
            if self.generation.use_cache:
                logits, cache = self._forward(new_row, row + 1, cache)
            else:
                inputs = torch.cat([inputs, new_row], dim=1)  # [B, P, Q] -> [B, P+1, Q]
                logits, _ = self._forward(inputs, 0, None)
        self.known[plan.frames[plan.open_cells], torch.nonzero(plan.open_cells)[:, 1]] = True

    def _forward(self, tokens: torch.Tensor, first_position: int, cache):
        """Run the model on `tokens` `[B, T, Q]` at positions `first_position..`; -> (logits `[B, T, Q, V]`, cache)."""
        batch, length, _ = tokens.shape
        positions = torch.arange(first_position, first_position + length, device=self.device)
        self.max_position = max(self.max_position, first_position + length - 1)
        return self.model(tokens, cache=cache, use_cache=self.generation.use_cache,
                          position_ids=positions.unsqueeze(0).expand(batch, -1))  # [T] -> [B, T]

    def _fill_row(self, plan: "WindowPlan", row: int, logits: torch.Tensor) -> None:
        """Sample the open cells of `row` from logits `[B, Q, V]` into the frame buffer."""
        if not plan.row_has_open[row]:
            return
        logits = mask_special(logits.float())
        if self.sampling.repetition_penalty > 1.0:
            logits = apply_repetition_penalty(logits, self._recent(plan.frames[row]), self.sampling.repetition_penalty)
        base = self.sampling.temperature
        temperatures = self.detector.temperatures(base) if self.detector is not None else self._base_temperatures(
            logits.shape[0], base, logits.device)
        tokens = sample_tokens(logits, temperatures, self.sampling, self.generator)  # [B, Q]
        if plan.row_all_open[row]:
            self.codes[:, plan.frames_on_device[row], self.codebook_index] = tokens
        else:
            codebooks = torch.nonzero(plan.open_on_device[row]).flatten()  # [k]
            self.codes[:, plan.frames_on_device[row, codebooks], codebooks] = tokens[:, codebooks]
        if self.detector is not None:
            self.detector.observe(entropy_bits(logits), plan.open_on_device[row], int(plan.frames[row, 0]), base)
        if self.progress is not None and plan.row_closes_frame[row]:
            self.progress.update(1)  # the last codebook closes a frame in both patterns

    def _base_temperatures(self, batch: int, base: float, device) -> torch.Tensor:
        if self._temperatures is None:
            self._temperatures = torch.full((batch,), base, device=device)
        return self._temperatures

    def _recent(self, frames: torch.Tensor) -> torch.Tensor:
        """Tokens of the `repetition_window` frames before each cell's frame -> `[B, W, Q]` (UNKNOWN before 0)."""
        window = self.sampling.repetition_window
        index = frames.unsqueeze(0) - torch.arange(window, 0, -1).unsqueeze(1)  # [W, 1] -> [W, Q]
        batch = self.codes.shape[0]
        values = self.codes.gather(1, index.clamp_min(0).to(self.device).unsqueeze(0).expand(batch, -1, -1))
        return values.masked_fill((index < 0).to(self.device).unsqueeze(0), UNKNOWN)  # [B, W, Q]


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """Run a block with `count` torch CPU threads (None: leave them), then restore the previous count.

    Cached generation steps are one frame each: their matrix products are too small to share out,
    and a second thread only adds synchronisation (measured slower even on an idle 2-core machine,
    and several times slower on a busy one). The occasional re-prefill after a window slide runs
    on that one thread too; decoding keeps torch's default.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ==== decoding ================================================================================
def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_chunked(codec, codes: torch.Tensor, scales: torch.Tensor, num_samples: int, chunks_per_pass: int,
                   notes: list | None = None) -> torch.Tensor:
    """codes `[1, Q, T]` -> wave `[2, num_samples]`, decoding `chunks_per_pass` codec chunks at a time.

    Each chunk decodes on its own exactly, so the groups only bound memory; the overlap-add runs
    once over all chunks. On a CUDA out-of-memory error: free memory, halve the group, and at one
    chunk a pass move the codec to the CPU. Every fallback is logged and appended to `notes`.
    """
    n_chunks = codec.n_chunks(num_samples)
    group = max(1, min(chunks_per_pass, n_chunks))
    waves: list[torch.Tensor] = []
    while len(waves) < n_chunks:
        first = len(waves)
        try:
            waves.extend(codec.decode_chunks(codes, scales, num_samples, first, first + group))
        except torch.cuda.OutOfMemoryError:
            free_accelerator_memory()
            group = _after_out_of_memory(codec, group, notes if notes is not None else [])
    return codec.overlap_add(waves, num_samples)


def _after_out_of_memory(codec, group: int, notes: list) -> int:
    if group > 1:
        message = f"decoding ran out of memory on {codec.device} with {group} chunks a pass; retrying with {group // 2}"
        group //= 2
    elif codec.device != "cpu":
        message = f"decoding ran out of memory on {codec.device} even one chunk at a time; falling back to the CPU"
        codec.move_to("cpu")
    else:
        raise StageError("decoding ran out of memory on the CPU, one chunk at a time")
    LOG.warning("%s", message)
    notes.append(message)
    return group


def chunk_scales(prompt_scales: torch.Tensor | None, n_chunks: int, median_scale: float | None,
                 median_source: str) -> tuple[torch.Tensor, list[str]]:
    """Per-chunk scales: the prompt's first, then the median scale, else 1.0 -> (`[n_chunks]`, sources)."""
    scales, sources = [], []
    for index in range(n_chunks):
        if prompt_scales is not None and index < prompt_scales.numel():
            scales.append(float(prompt_scales[index]))
            sources.append("prompt")
        elif median_scale is not None:
            scales.append(float(median_scale))
            sources.append(median_source)
        else:
            scales.append(1.0)
            sources.append("default 1.0")
    return torch.tensor(scales, dtype=torch.float32), sources


def median_scale_for(contract: dict, root: Path, artist: str) -> tuple[float | None, str]:
    """The checkpoint's median scale, else the median of the manifest's, else (None, reason)."""
    if contract.get("median_scale") is not None:
        return float(contract["median_scale"]), "checkpoint median"
    try:
        entries = read_manifest(manifest_path(root, artist), root)
    except ManifestError as error:
        return None, f"no manifest ({error})"
    values = [float(e["median_scale"]) for e in entries if e.get("median_scale") is not None]
    if not values:
        return None, "the manifest has no median_scale"
    return statistics.median(values), "manifest median"


def normalise(wave: torch.Tensor, target_lufs: float) -> tuple[np.ndarray, float]:
    """`[2, S]` -> (`[S, 2]` float32 at the target loudness, peak at most -1 dBFS; the gain in dB)."""
    samples, gain = normalise_wave(wave.T.numpy().astype(np.float32), target_lufs)  # [2, S] -> [S, 2]
    return samples, 20 * math.log10(gain)


# ==== outputs =================================================================================
def write_wav(samples: np.ndarray, path: Path) -> None:
    import soundfile as sf

    with atomic_path(path) as tmp:
        sf.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16")


def write_spectrogram(samples: np.ndarray, path: Path, title: str, prompt_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4))
    mono = samples.mean(axis=1)  # [S, 2] -> [S]
    axis.specgram(mono, NFFT=2048, Fs=SAMPLE_RATE, noverlap=1536, cmap="magma")
    if prompt_seconds > 0:
        axis.axvline(prompt_seconds, color="cyan", linestyle="--", linewidth=1, label="end of prompt")
        axis.legend(loc="upper right")
    axis.set(title=title, xlabel="time (s)", ylabel="frequency (Hz)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


def piece_names(name: str, count: int) -> list[str]:
    return [name] if count == 1 else [f"{name}_{index}" for index in range(count)]


def is_complete(folder: Path, name: str) -> bool:
    return all((folder / f"{name}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


# ==== command line ============================================================================
def build_parser():
    parser = make_parser("Generate music with a trained MusicTransformer and decode it to 48 kHz stereo WAV.",
                         epilog="Outputs: <root>/music_transformer/<artist>/<name>.{wav,th,json,png}.")
    source = parser.add_argument_group("checkpoint")
    which = source.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="checkpoint file (default: best.pt, then last.pt)")
    which.add_argument("--epoch", type=non_negative_int, help="use music_transformer_ep<N>.pt")
    source.add_argument("--codec", help="codec spec for the prompt and decoding (default: the checkpoint's)")
    source.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    source.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads for torch; 0 = automatic: one thread for cached generation steps on "
                             "the CPU (they are too small to share), torch's default for the rest")
    prompt = parser.add_argument_group("prompt").add_mutually_exclusive_group()
    prompt.add_argument("--seed-tokens", type=Path, help="continue a .th token file (contract dict or [1,Q,T])")
    prompt.add_argument("--prompt-audio", type=Path, help="continue an audio file (encoded like the training data)")
    parser.add_argument("--prompt-seconds", type=positive_float, help="use only this much of the prompt")
    length = parser.add_argument_group("length and window")
    length.add_argument("--seconds", type=positive_float, default=10.0, help="length of each piece, prompt included")
    length.add_argument("--context-frames", type=positive_int, help="window in frames (default: the training context)")
    length.add_argument("--stride-frames", type=positive_int,
                        help="frames a full window moves on; it keeps context - stride (default: half the context)")
    length.add_argument("--no-cache", action="store_true", help="recompute the whole window each step (reference path)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=non_negative_float, default=1.0,
                          help="sampling temperature; 0 = greedy (always the likeliest code); negative is refused")
    sampling.add_argument("--top-k", type=non_negative_int, default=250,
                          help="keep the k likeliest codes (0 = off); a k of 1024 or more is clamped to "
                               "the 1024 codes, i.e. off")
    sampling.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus mass in (0, 1] (1 = off)")
    sampling.add_argument("--repetition-penalty", type=penalty_factor, default=1.0,
                          help=">= 1: a token seen in the recent window loses log(penalty) of logit (1 = off)")
    sampling.add_argument("--repetition-window", type=positive_int, default=150, help="frames the penalty looks back")
    sampling.add_argument("--seed", type=non_negative_int, help="random seed (default: drawn and recorded in the JSON)")
    sampling.add_argument("--num-samples", type=positive_int, default=1, help="pieces generated in one batch")
    collapse = parser.add_argument_group("collapse detector")
    collapse.add_argument("--collapse-bits", type=non_negative_float, default=0.5,
                          help="boost when a codebook's mean entropy falls below this many bits (0 = off)")
    collapse.add_argument("--collapse-window", type=positive_int, default=150,
                          help="frames the entropy is averaged over")
    collapse.add_argument("--boost", type=penalty_factor, default=1.5, help="temperature factor on a collapse")
    collapse.add_argument("--boost-frames", type=positive_int, default=150, help="frames the boost decays over")
    collapse.add_argument("--max-temperature", type=positive_float, default=2.0, help="cap of a boosted temperature")
    output = parser.add_argument_group("decoding and output")
    output.add_argument("--decode-chunk-seconds", type=non_negative_float, default=10.0,
                        help="decode this much audio a pass (0 = all at once); halves on out-of-memory")
    output.add_argument("--target-lufs", type=loudness_target, default=DEFAULT_TARGET_LUFS,
                        help="loudness of the WAV (peak capped at -1 dBFS)")
    output.add_argument("--name", default="sample", help="output name; <name>_<i> when --num-samples > 1")
    return parser


def resolve_window(args, loaded: LoadedModel) -> tuple[int, int]:
    """(context_frames, stride_frames) within what the model's positions allow."""
    n_codebooks = loaded.n_codebooks
    extra = n_codebooks - 1 if loaded.contract["pattern"] == "delay" else 0
    limit = int(loaded.model_args["n_positions"]) - extra  # BOS + (frames + extra - 1) rows fit the positions
    trained = int(loaded.contract.get("context_frames") or limit)
    context = args.context_frames or min(trained, limit)
    if context > limit:
        raise StageError(f"--context-frames {context} exceeds what the model's {loaded.model_args['n_positions']} "
                         f"positions hold ({limit} frames with the {loaded.contract['pattern']} pattern)")
    stride = args.stride_frames or max(1, context // 2)
    if stride > context:
        raise StageError(f"--stride-frames {stride} is larger than the context ({context} frames)")
    return context, stride


# ==== main ====================================================================================
@dataclass
class Run:
    """Everything one invocation produced, for the sidecar JSON."""

    args: object
    loaded: LoadedModel
    codec: object
    prompt: Prompt
    seed: int
    device: str
    context: int
    stride: int
    total_frames: int
    num_samples: int
    timings: dict = field(default_factory=dict)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "stage5")
    return generate_pieces(args)  # run_main turns SIGTERM into Ctrl-C's clean stop


def generate_pieces(args) -> int:
    started = time.time()
    out_folder = args.root / "music_transformer" / args.artist
    names = piece_names(args.name, args.num_samples)
    todo = [name for name in names if args.overwrite or not is_complete(out_folder, name)]
    if not todo:
        LOG.info("all %d piece(s) already exist in %s: nothing to do (pass --overwrite or another --name)",
                 len(names), out_folder)
        return 0
    remove_stale_temporaries(out_folder)
    run = prepare(args)
    frames, detector = generate(run)
    report = StageReport(stage=STAGE, artist=args.artist, started=started)
    for index, name in enumerate(names):
        if name not in todo:
            report.skipped.append(name)
            continue
        try:
            finish_piece(run, frames[index:index + 1], detector, index, out_folder / name, report)
        except (OSError, RuntimeError, ValueError) as error:  # one piece's failure must not lose the others
            report.fail(out_folder / name, f"{type(error).__name__}: {error}", LOG)
    LOG.info("%s", report.summary())
    return report.exit_code()


def prepare(args) -> Run:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_checkpoint(find_checkpoint(args.root, args.artist, args.checkpoint, args.epoch), device)
    LOG.info("model from %s (epoch %s, step %s, %s pattern, Q = %d)", loaded.path, loaded.epoch, loaded.step,
             loaded.contract["pattern"], loaded.n_codebooks)
    try:
        codec = load_codec(args.codec or checked_codec_spec(loaded, args.root), device)
    except CodecUnavailable as error:
        raise StageError(str(error)) from None
    if not codec.pretrained:
        LOG.warning("%s", UNTRAINED_WARNING)
    load_seconds = time.perf_counter() - started
    prompt = build_prompt(args, codec, loaded)
    context, stride = resolve_window(args, loaded)
    num_samples = round(args.seconds * SAMPLE_RATE)
    total_frames = frames_for_samples(codec, num_samples)
    if prompt.n_frames >= total_frames:
        raise StageError(f"the prompt already holds {prompt.n_frames} frames, --seconds {args.seconds:g} asks for "
                         f"{total_frames}: nothing to generate (raise --seconds or lower --prompt-seconds)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    run = Run(args=args, loaded=loaded, codec=codec, prompt=prompt, seed=seed, device=device, context=context,
              stride=stride, total_frames=total_frames, num_samples=num_samples)
    run.timings.update(load_s=load_seconds, prompt_s=time.perf_counter() - started - load_seconds)
    return run


def checked_codec_spec(loaded: LoadedModel, root: Path) -> str:
    """The checkpoint's codec; a local folder it names must lie inside the root (`--codec` trusts one outside)."""
    spec = str(loaded.contract["codec"])
    local = Path(spec).expanduser()
    if local.exists():  # load_codec would read this folder (a hub id or `random:N` is no local path)
        try:
            resolve_inside(root, local.resolve())
        except PathEscapesRoot:
            raise StageError(f"{loaded.path} names the codec folder {spec}, outside the project root "
                             f"{Path(root).resolve()}: refused; pass --codec {spec} to trust it") from None
    return spec


def build_prompt(args, codec, loaded: LoadedModel) -> Prompt:
    bandwidth = float(loaded.contract["bandwidth"])
    if args.seed_tokens is not None:
        return prompt_from_tokens(args.seed_tokens, codec, loaded.n_codebooks, bandwidth, args.prompt_seconds)
    if args.prompt_audio is not None:
        # conditioned like stage 1's clips (its default level), whatever level the output WAV gets
        return prompt_from_audio(args.prompt_audio, codec, bandwidth, args.prompt_seconds, DEFAULT_TARGET_LUFS)
    if args.prompt_seconds is not None:
        LOG.warning("--prompt-seconds has no effect without --seed-tokens or --prompt-audio")
    return Prompt(frames=None, scales=None)


def generate(run: Run) -> tuple[torch.Tensor, CollapseDetector]:
    args = run.args
    torch.manual_seed(run.seed)
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    collapse = CollapseSettings(bits=args.collapse_bits, window=args.collapse_window, boost=args.boost,
                                boost_frames=args.boost_frames, max_temperature=args.max_temperature)
    detector = CollapseDetector(collapse, args.num_samples, run.loaded.n_codebooks, run.device)
    sampling = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, repetition_window=args.repetition_window)
    settings = GenerationSettings(pattern=run.loaded.contract["pattern"], context_frames=run.context,
                                  stride_frames=run.stride, use_cache=not args.no_cache, num_samples=args.num_samples)
    engine = TokenGenerator(run.loaded.model, settings, sampling, detector, generator, run.device)
    from tqdm import tqdm

    to_generate = run.total_frames - run.prompt.n_frames
    one_frame_steps = run.device == "cpu" and not args.threads and not args.no_cache
    started = time.perf_counter()
    with tqdm(total=to_generate, unit="frame", desc="generating", mininterval=0.5) as progress, \
            cpu_threads(1 if one_frame_steps else None):
        frames = engine.generate(run.prompt.frames, run.total_frames, progress)  # [B, N, Q]
    run.timings["generate_s"] = time.perf_counter() - started
    LOG.info("generated %d frames x %d piece(s) in %.1f s (%.0f frames/s)", to_generate, args.num_samples,
             run.timings["generate_s"], to_generate / max(run.timings["generate_s"], 1e-9))
    return frames.cpu(), detector


def finish_piece(run: Run, frames: torch.Tensor, detector: CollapseDetector, index: int, stem: Path,
                 report: StageReport) -> None:
    """Decode one piece `[1, N, Q]` and write its WAV, tokens, spectrogram and sidecar JSON."""
    codec, args = run.codec, run.args
    n_chunks = codec.n_chunks(run.num_samples)
    codes = torch.zeros(1, n_chunks * codec.chunk_frames, frames.shape[2], dtype=torch.long)  # padded last chunk
    codes[:, :frames.shape[1]] = frames
    codes = codes.transpose(1, 2)  # [1, T, Q] -> [1, Q, T]
    median, median_source = median_scale_for(run.loaded.contract, args.root, args.artist)
    scales, scale_sources = chunk_scales(run.prompt.scales, n_chunks, median, median_source)
    if "default 1.0" in scale_sources:
        LOG.warning("no scale for generated chunks (%s): using 1.0, the level may be off", median_source)
    started = time.perf_counter()
    notes: list = []
    chunks_per_pass = (n_chunks if args.decode_chunk_seconds == 0
                       else max(1, round(args.decode_chunk_seconds * SAMPLE_RATE / codec.chunk_stride)))
    wave = decode_chunked(codec, codes, scales, run.num_samples, chunks_per_pass, notes)  # [2, S]
    decode_seconds = time.perf_counter() - started
    samples, gain_db = normalise(wave, args.target_lufs)
    write_wav(samples, stem.with_suffix(".wav"))
    token_file = TokenFile(codes=codes.to(torch.int16), scales=scales, num_samples=run.num_samples,
                           bandwidth=float(run.loaded.contract["bandwidth"]), codec=codec.name,
                           source=run.prompt.source,
                           extra={"generated_by": STAGE, "prompt_frames": run.prompt.n_frames,
                                  "pattern": run.loaded.contract["pattern"]})
    save_token_file(token_file, stem.with_suffix(".th"))
    prompt_seconds = samples_for_frames(codec, run.prompt.n_frames) / SAMPLE_RATE if run.prompt.n_frames else 0.0
    write_spectrogram(samples, stem.with_suffix(".png"), stem.name, prompt_seconds)
    sidecar = describe(run, index, stem.name, detector, scales, scale_sources, gain_db, decode_seconds, notes)
    atomic_write_json(sidecar, stem.with_suffix(".json"))
    report.done.append(stem.name)
    LOG.info("wrote %s.{wav,th,png,json} (%.1f s of audio, real-time factor %.2f)", stem,
             run.num_samples / SAMPLE_RATE, sidecar["real_time_factor"])


def describe(run: Run, index: int, name: str, detector: CollapseDetector, scales: torch.Tensor,
             scale_sources: list, gain_db: float, decode_seconds: float, notes: list) -> dict:
    """The sidecar JSON: every parameter, the checkpoint, seeds, collapse events, timings, codec."""
    audio_seconds = run.num_samples / SAMPLE_RATE
    batch_seconds = run.timings["generate_s"] / run.args.num_samples + decode_seconds
    generated = run.total_frames - run.prompt.n_frames
    return {
        "name": name, "artist": run.args.artist, "sample_index": index, "stage": STAGE,
        "parameters": {key: (str(value) if isinstance(value, Path) else value)
                       for key, value in vars(run.args).items()},
        "checkpoint": {"path": str(run.loaded.path), "epoch": run.loaded.epoch, "step": run.loaded.step,
                       "model_args": run.loaded.model_args, "token_contract": run.loaded.contract},
        "seed": run.seed, "seeding": "one torch.Generator seeded with `seed` draws every piece of the batch",
        "device": run.device,
        "window": {"context_frames": run.context, "stride_frames": run.stride, "kv_cache": not run.args.no_cache},
        "prompt": {"kind": run.prompt.kind, "source": run.prompt.source, "frames": run.prompt.n_frames},
        "frames": {"total": run.total_frames, "prompt": run.prompt.n_frames, "generated": generated},
        "duration_s": audio_seconds, "num_samples": run.num_samples, "sample_rate": SAMPLE_RATE, "channels": 2,
        "scales": [round(float(s), 6) for s in scales], "scale_sources": scale_sources,
        "loudness": {"target_lufs": run.args.target_lufs, "gain_db": round(gain_db, 3)},
        "collapse_events": [event for event in detector.events if event["sample"] == index],
        "timings": {**{k: round(v, 4) for k, v in run.timings.items()}, "decode_s": round(decode_seconds, 4)},
        "frames_per_second": round(generated * run.args.num_samples / max(run.timings["generate_s"], 1e-9), 2),
        "real_time_factor": round(audio_seconds / max(batch_seconds, 1e-9), 3),
        "codec": {"name": run.codec.name, "pretrained": run.codec.pretrained,
                  "bandwidth": float(run.loaded.contract["bandwidth"])},
        "warning": None if run.codec.pretrained else UNTRAINED_WARNING,
        "decode_notes": notes,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
