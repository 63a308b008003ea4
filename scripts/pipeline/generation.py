"""The generation core: the windowed token generator over the lean KV-cache engine, its reference
engines, classifier-free guidance, the artist-conditioning weights and the CPU thread plan.

Front-ends (stage 5 and the studio, both through `pipeline.pieces`) build a model, settings
dataclasses and a codec, then call `generate_frames` (or `TokenGenerator`) with an
`OverlappedDecoder`'s `frames_final` (`pipeline.decoding`) in their progress callback; sampling and
the collapse detector live in `pipeline.sampling`. Nothing here parses options or writes files.

Token grid: the model reads and writes "rows" of Q codebook cells, laid out by the checkpoint's
codebook pattern (`pipeline.patterns`: codebook q of frame s sits in row s + offset[q]). Input
position 0 is always a BOS row and position p >= 1 holds row p - 1, so the logits at position p
predict row p (exactly the layout `build_sequence` trains on). Cells outside the window's frames
are BOS.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

import torch

from .contract import BOS, CODEBOOK_SIZE
from .copying import CopyPath
from .lean_decoder import LeanDecoder
from .patterns import check_pattern, codebook_offsets, extra_steps
from .precision import PRECISIONS, precision_model, traceable
from .sampling import (CollapseDetector, CollapseSettings, SamplingSettings, apply_repetition_penalty, entropy_bits,
                       sample_tokens)
from .threads import SpeedWatch, free_cores, threads_were_chosen, usable_cores

LOG = logging.getLogger("pipeline.generation")
UNKNOWN = -1  # a cell of the frame buffer that is neither prompt nor generated yet


# ==== settings and engines ====================================================================
ENGINES = ("lean", "transformers")  # "transformers" (and use_cache=False) are reference paths for tests and benches


@dataclass
class GenerationSettings:
    pattern: str  # the checkpoint's codebook pattern (`LoadedModel.pattern`); required: it must be training's
    context_frames: int = 1500
    stride_frames: int = 750
    use_cache: bool = True  # False: recompute the whole window every step (the reference path)
    num_samples: int = 1  # pieces generated together in one batch
    engine: str = "lean"  # the cached path: "lean" (LeanDecoder) or "transformers" (GPT-2's own cache)
    cuda_graph: bool = True  # on CUDA, replay each lean step from a captured graph
    cpu_trace: bool = True  # on a CPU, replay each lean step from a TorchScript trace (no Python between its kernels)
    # a conditioned model's (n_artists > 0) artist: weights per label, n_artists + 1 of them ("no artist"
    # last; a label is one-hot, a blend sums to 1); None = "no artist". Unconditioned models ignore both.
    artist_weights: tuple | None = None
    cfg_coef: float = 1.0  # classifier-free guidance: uncond + cfg_coef * (cond - uncond); 1 = off
    # the checkpoint's fitted copy path (`LoadedModel.copy_path`, a `pipeline.copying.CopyPath` record):
    # every step's distribution is mixed with an in-context copy of the window's rows; None = off
    copy_path: dict | None = None
    # the precision every engine runs the model in (`pipeline.precision`): float32 (the model itself),
    # bfloat16 or int8 (a copy of the model in that precision); the logits are sampled in float32
    precision: str = "float32"

    def __post_init__(self):
        check_pattern(self.pattern)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")


class GenerationCancelled(RuntimeError):
    """The caller's cancel check asked generation to stop."""


class LeanSteps:
    """The lean engine: a static KV cache over the model's own weights (`pipeline.lean_decoder`)."""

    name = "lean"

    def __init__(self, model, batch: int, capacity: int, cuda_graph: bool, artist: torch.Tensor | None = None,
                 cpu_trace: bool = False):
        self.decoder = LeanDecoder(model, batch, capacity, artist)
        self.graphed = None  # a replayed step: a CUDA graph on a GPU, a TorchScript trace on a CPU
        if cuda_graph and self.decoder.position_table.is_cuda:
            self.graphed = capture_step(self.decoder, int(model.args.n_codebooks))
        elif cpu_trace and self.decoder.position_table.device.type == "cpu" and traceable(model):
            self.graphed = trace_step(self.decoder, int(model.args.n_codebooks))

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.prefill(tokens)

    def step(self, row: torch.Tensor, position: int) -> torch.Tensor:
        assert position == self.decoder.length, "the lean engine appends rows in order"
        return self.graphed(row) if self.graphed is not None else self.decoder.step(row)


def capture_step(decoder, n_codebooks: int):
    """A CUDA graph of the lean step, or None (logged) when capturing fails: the eager step then runs."""
    from .lean_decoder import GraphedStep

    try:
        return GraphedStep(decoder, n_codebooks, BOS)
    except RuntimeError as error:  # an unsupported kernel or driver: correctness first
        LOG.warning("CUDA graph capture of the lean step failed (%s): running it eagerly", error)
        return None


def trace_step(decoder, n_codebooks: int):
    """A TorchScript trace of the lean step on a CPU, or None (logged) when tracing fails: the eager step then runs."""
    from .lean_decoder import TracedStep

    try:
        return TracedStep(decoder, n_codebooks, BOS)
    except (RuntimeError, AttributeError) as error:  # TorchScript is in maintenance: a future torch may refuse
        LOG.warning("tracing the lean step failed (%s): running it eagerly", error)
        return None


class TransformersCacheSteps:
    """The model's own forward with transformers' cache (the path before the lean engine; benchmarks)."""

    name = "transformers"

    def __init__(self, model, artist: torch.Tensor | None = None):
        self.model, self.cache, self.artist = model, None, artist

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.cache = forward_at(self.model, tokens, 0, None, use_cache=True, artist=self.artist)
        return logits[:, -1]

    def step(self, row: torch.Tensor, position: int) -> torch.Tensor:
        logits, self.cache = forward_at(self.model, row, position, self.cache, use_cache=True, artist=self.artist)
        return logits[:, -1]


class RecomputeSteps:
    """The reference path: the training model's full forward over the whole window at every step."""

    name = "recompute"

    def __init__(self, model, artist: torch.Tensor | None = None):
        self.model, self.inputs, self.artist = model, None, artist

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.inputs = tokens
        return forward_at(self.model, tokens, 0, None, use_cache=False, artist=self.artist)[0][:, -1]

    def step(self, row: torch.Tensor, position: int) -> torch.Tensor:
        self.inputs = torch.cat([self.inputs, row], dim=1)  # [B, P, Q] -> [B, P+1, Q]
        return forward_at(self.model, self.inputs, 0, None, use_cache=False, artist=self.artist)[0][:, -1]


class GuidedSteps:
    """Classifier-free guidance over an engine built for 2B rows: rows 0..B-1 carry the artist, rows
    B..2B-1 "no artist". Each prefill and step runs both halves as ONE batched call (not two passes),
    then returns `uncond + coef * (cond - uncond)` `[B, Q, V]` (audiocraft's formula)."""

    def __init__(self, inner, coef: float):
        self.inner, self.coef = inner, float(coef)
        self.name = inner.name

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits `[2B, Q, V]` (conditioned rows first) -> guided logits `[B, Q, V]` in float32."""
        conditioned, unconditioned = logits.float().chunk(2, dim=0)  # [2B, Q, V] -> 2 x [B, Q, V]
        return unconditioned + self.coef * (conditioned - unconditioned)

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.combine(self.inner.prefill(torch.cat([tokens, tokens], dim=0)))  # [B, T, Q] -> [2B, T, Q]

    def step(self, row: torch.Tensor, position: int) -> torch.Tensor:
        return self.combine(self.inner.step(torch.cat([row, row], dim=0), position))  # [B, 1, Q] -> [2B, 1, Q]


def forward_at(model, tokens: torch.Tensor, first_position: int, cache, use_cache: bool,
               artist: torch.Tensor | None = None):
    """The training model on `tokens` `[B, T, Q]` at positions `first_position..` -> (logits `[B, T, Q, V]`, cache).

    `artist` (labels `[B]` or weights `[B, n_artists + 1]`) is passed on only when given."""
    batch, length, _ = tokens.shape
    positions = torch.arange(first_position, first_position + length, device=tokens.device)
    conditioning = {} if artist is None else {"artist": artist}
    return model(tokens, cache=cache, use_cache=use_cache,
                 position_ids=positions.unsqueeze(0).expand(batch, -1), **conditioning)  # [T] -> [B, T]


# ==== artist conditioning =====================================================================
def n_artists_of(model) -> int:
    """The artist labels a model knows (0: an unconditioned model, or one written before labels existed)."""
    return int(getattr(model.args, "n_artists", 0))


def no_artist_weights(n_artists: int) -> tuple:
    """The weight vector of the "no artist" label: one-hot on the last of n_artists + 1 labels."""
    return tuple([0.0] * n_artists + [1.0])


def label_weights(label: int, n_artists: int) -> tuple:
    """The weight vector of one artist label (its position in the checkpoint's `artists`)."""
    weights = [0.0] * (n_artists + 1)
    weights[label] = 1.0
    return tuple(weights)


def blend_weights(blend: dict, artists: list[str]) -> tuple:
    """{artist: weight >= 0} -> the normalised weight vector over `artists` + "no artist" (0 for it).

    Raises ValueError for an artist the model does not know, a negative weight or weights that sum to 0."""
    unknown = [name for name in blend if name not in artists]
    if unknown:
        raise ValueError(f"artist {unknown[0]!r} is not one of the model's artists: {', '.join(artists)}")
    if any(not math.isfinite(weight) or weight < 0 for weight in blend.values()):
        raise ValueError(f"blend weights must be finite and >= 0, got {blend}")
    total = sum(blend.values())
    if total <= 0:
        raise ValueError(f"blend weights sum to {total:g}: at least one must be positive")
    return tuple([blend.get(name, 0.0) / total for name in artists] + [0.0])


# ==== the windowed generator ==================================================================
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
        self.row_last_frame = frames[:, -1].tolist()  # the frame the last codebook's cell belongs to
        self.first_open_row = int(torch.nonzero(open_rows)[0]) if bool(open_rows.any()) else self.n_rows


class TokenGenerator:
    """Fills a frame buffer `[B, N, Q]` window by window; each window is one causal pass over the grid.

    A window covers at most `context_frames` frames. When it is full, the next one keeps the most
    recent `context_frames - stride_frames` frames as its prompt (re-prefilled from a fresh BOS),
    so no step ever attends to more than one window and the time per frame stays flat.

    `progress(final_frames, frames)` is called whenever the first `final_frames` frames of the live
    buffer `frames` `[B, N, Q]` are final (prompt included; they are never written again), and
    `cancel()` is asked once a frame; True stops with `GenerationCancelled`.
    """

    def __init__(self, model, generation: GenerationSettings, sampling: SamplingSettings,
                 detector: CollapseDetector | None, generator: torch.Generator | None, device: str):
        if generation.engine not in ENGINES:
            raise ValueError(f"unknown engine {generation.engine!r}: choose one of {', '.join(ENGINES)}")
        self.model = model
        self.generation = generation
        self.sampling = sampling
        self.detector = detector
        self.generator = generator
        self.device = device
        self.n_codebooks = int(model.args.n_codebooks)
        self.offsets = codebook_offsets(generation.pattern, self.n_codebooks)  # [Q] rows each codebook runs late
        self.extra_rows = extra_steps(generation.pattern, self.n_codebooks)
        if generation.context_frames + self.extra_rows > int(model.args.n_positions):
            raise ValueError(f"a {generation.context_frames}-frame window needs "
                             f"{generation.context_frames + self.extra_rows} positions, the model has "
                             f"{model.args.n_positions}")
        self.max_position = 0  # the largest position any forward pass used (tests check the window bound)
        self.codebook_index = torch.arange(self.n_codebooks, device=device)
        self._temperatures: torch.Tensor | None = None  # [B] the base temperature, reused while B and it hold
        self._temperatures_key: tuple | None = None  # (batch, base) of `_temperatures`
        self.steps = None
        self._steps_batch: int | None = None  # the batch `steps` was built for
        copy_path = CopyPath.from_record(generation.copy_path)
        self.copy_path = copy_path if copy_path is not None and copy_path.active else None
        self.window_inputs: torch.Tensor | None = None  # the window's input rows `[B, 1+R, Q]` (the copy path reads them)

    def make_steps(self, batch: int):
        """The cached engine the settings ask for, or the recompute path; guided (CFG) when asked."""
        artist = self.artist_rows(batch)  # [B, n_artists + 1] or None
        guided = artist is not None and self.generation.cfg_coef != 1.0
        if guided:  # one engine of 2B rows: the conditioned half, then the "no artist" half
            no_artist = torch.tensor(no_artist_weights(n_artists_of(self.model)), device=self.device)
            artist = torch.cat([artist, no_artist.expand(batch, -1)], dim=0)  # -> [2B, n_artists + 1]
        steps = self._engine(batch * 2 if guided else batch, artist)
        return GuidedSteps(steps, self.generation.cfg_coef) if guided else steps

    def artist_rows(self, batch: int) -> torch.Tensor | None:
        """The artist weights of every row `[B, n_artists + 1]`, or None for an unconditioned model."""
        n_artists = n_artists_of(self.model)
        if n_artists == 0:
            return None
        weights = self.generation.artist_weights or no_artist_weights(n_artists)
        if len(weights) != n_artists + 1:
            raise ValueError(f"artist_weights has {len(weights)} entries, the model has {n_artists + 1} labels "
                             "(its artists and 'no artist')")
        return torch.tensor(weights, dtype=torch.float32, device=self.device).expand(batch, -1)  # [n+1] -> [B, n+1]

    def _engine(self, rows: int, artist: torch.Tensor | None):
        model = precision_model(self.model, self.generation.precision)  # the model itself for float32
        if not self.generation.use_cache:
            return RecomputeSteps(model, artist)
        if self.generation.engine == "transformers":
            if getattr(model.args, "positions", "learned") != "learned":
                raise ValueError(f"the transformers engine has no cache for {model.args.positions} positions: "
                                 "use the lean engine")
            return TransformersCacheSteps(model, artist)
        capacity = min(self.generation.context_frames + self.extra_rows + 1, int(model.args.n_positions))
        return LeanSteps(model, rows, capacity, self.generation.cuda_graph, artist, self.generation.cpu_trace)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor | None, total_frames: int, progress=None, cancel=None) -> torch.Tensor:
        """prompt long `[1, L, Q]` (or None) -> frames long `[B, total_frames, Q]` with the prompt kept."""
        batch = self.generation.num_samples
        self.codes = torch.full((batch, total_frames, self.n_codebooks), UNKNOWN, dtype=torch.long,
                                device=self.device)  # [B, N, Q]
        self.known = torch.zeros(total_frames, self.n_codebooks, dtype=torch.bool)  # [N, Q], shared by the batch
        if prompt is not None:
            length = min(prompt.shape[1], total_frames)
            self.codes[:, :length] = prompt[:, :length].to(self.device)  # [1, L, Q] -> [B, L, Q]
            self.known[:length] = True
        self.progress, self.cancel = progress, cancel
        if self.steps is None or self._steps_batch != batch:
            self.steps, self._steps_batch = self.make_steps(batch), batch
        self._report(int(self.known.all(dim=1).long().cumprod(0).sum()))  # the prompt's frames are final
        while not bool(self.known.all()):
            start = self._window_start()
            self._run_window(self.plan_window(start, min(self.generation.context_frames, total_frames - start)))
        return self.codes

    def _report(self, final_frames: int) -> None:
        if self.progress is not None:
            self.progress(final_frames, self.codes)
        if self.cancel is not None and self.cancel():
            raise GenerationCancelled(f"generation cancelled after {final_frames} frames")

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
        self.max_position = max(self.max_position, int(inputs.shape[1]) - 1)
        if self.copy_path is not None:
            self.window_inputs = inputs.new_full((batch, n_rows + 1, self.n_codebooks), BOS)  # [B, 1+R, Q]
            self.window_inputs[:, :first_row + 1] = inputs
        logits = self.steps.prefill(inputs)  # [B, Q, V] at position first_row
        for row in range(first_row, n_rows):
            self._fill_row(plan, row, logits)  # logits at position `row` predict grid row `row`
            if row + 1 == n_rows:
                break
            self.max_position = max(self.max_position, row + 1)
            next_row = self._rows(plan, row, row + 1)  # [B, 1, Q]
            if self.copy_path is not None:
                self.window_inputs[:, row + 1:row + 2] = next_row
            logits = self.steps.step(next_row, row + 1)  # input [B, 1, Q] at position row + 1
        self.known[plan.frames[plan.open_cells], torch.nonzero(plan.open_cells)[:, 1]] = True

    def _fill_row(self, plan: "WindowPlan", row: int, logits: torch.Tensor) -> None:
        """Sample the open cells of `row` from logits `[B, Q, V]` into the frame buffer."""
        if not plan.row_has_open[row]:
            return
        logits = logits[..., :CODEBOOK_SIZE].float()  # [B, Q, V] -> [B, Q, 1024]: BOS and PAD are never sampled
        if self.copy_path is not None:  # the model's distribution mixed with the copy of the window's rows
            logits = self.copy_path.mix(logits, self.window_inputs[:, :row + 1], traced=self.generation.cpu_trace)
        if self.sampling.repetition_penalty > 1.0:
            logits = apply_repetition_penalty(logits, self._recent(plan.frames[row]), self.sampling.repetition_penalty)
        base = self.sampling.temperature
        temperatures = self.detector.temperatures(base) if self.detector is not None else self._base_temperatures(
            logits.shape[0], base, logits.device)
        # a boost multiplies the base temperature: every piece is greedy, or none is
        tokens = sample_tokens(logits, temperatures, self.sampling, self.generator, all_greedy=base <= 0)  # [B, Q]
        if plan.row_all_open[row]:
            self.codes[:, plan.frames_on_device[row], self.codebook_index] = tokens
        else:
            codebooks = torch.nonzero(plan.open_on_device[row]).flatten()  # [k]
            self.codes[:, plan.frames_on_device[row, codebooks], codebooks] = tokens[:, codebooks]
        if self.detector is not None:
            self.detector.observe(entropy_bits(logits), plan.open_on_device[row], int(plan.frames[row, 0]), base)
        if plan.row_closes_frame[row]:  # the last codebook closes a frame in both patterns
            self._report(plan.row_last_frame[row] + 1)

    def _base_temperatures(self, batch: int, base: float, device) -> torch.Tensor:
        """`[batch]` filled with `base`: one tensor reused while the batch and the base stay (no device read)."""
        if self._temperatures_key != (batch, base):
            self._temperatures = torch.full((batch,), base, device=device)
            self._temperatures_key = (batch, base)
        return self._temperatures

    def _recent(self, frames: torch.Tensor) -> torch.Tensor:
        """Tokens of the `repetition_window` frames before each cell's frame -> `[B, W, Q]` (UNKNOWN before 0)."""
        window = self.sampling.repetition_window
        index = frames.unsqueeze(0) - torch.arange(window, 0, -1).unsqueeze(1)  # [W, 1] -> [W, Q]
        batch = self.codes.shape[0]
        values = self.codes.gather(1, index.clamp_min(0).to(self.device).unsqueeze(0).expand(batch, -1, -1))
        return values.masked_fill((index < 0).to(self.device).unsqueeze(0), UNKNOWN)  # [B, W, Q]


# ==== threads and the entry point =============================================================
@contextlib.contextmanager
def cpu_threads(count: int | None):
    """Run a block with `count` torch CPU threads (None: leave them), then restore the previous count.

    The count is per calling thread: a decoding worker thread sets its own.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class ThreadPlan:
    """Torch CPU threads per phase; None leaves torch's count as it is."""

    generate: int | None
    decode: int | None
    overlap: bool = True  # decode while generating; False when generation already holds every core


def thread_plan(device: str, requested: int = 0) -> ThreadPlan:
    """The measured choice (BENCHMARKS.md, stage 5): a generation step on the CPU is a chain of small
    matrix products that a second thread slows down, so generation runs on one thread. Decoding
    (large convolutions) gets the other cores, whether it overlaps generation or runs at the end:
    on the shared 2-core machine two threads for either phase were 7-16x slower than one, because
    OpenMP threads spin-wait for a core another process holds. `requested` > 0 (`--threads N`)
    uses N for both phases, and decoding waits for the end when N threads already fill the cores
    (an overlapping decoder would oversubscribe them). Only the cores other processes leave free
    count (`pipeline.threads`): with one free core, decoding waits for the end.
    """
    if requested:
        fills_the_cores = requested > 1 and requested >= (os.cpu_count() or 1)
        return ThreadPlan(generate=requested, decode=requested, overlap=not fills_the_cores)
    if device != "cpu":
        return ThreadPlan(generate=None, decode=None)
    cores = usable_cores() if threads_were_chosen() else free_cores()  # other processes' cores are not ours
    if cores < 2:  # one free core: generation and decoding would take turns on it anyway
        return ThreadPlan(generate=1, decode=1, overlap=False)
    return ThreadPlan(generate=1, decode=cores - 1)


def generate_frames(model, prompt: torch.Tensor | None, total_frames: int, generation: GenerationSettings,
                    sampling: SamplingSettings, collapse: CollapseSettings | None, seed: int, device: str,
                    progress=None, cancel=None, threads: int | None = None) -> tuple[torch.Tensor, CollapseDetector]:
    """The generation core's entry point: `model` (a MusicTransformer on `device`) continues `prompt`
    long `[1, L, Q]` (None: from nothing) to `total_frames` frames for `generation.num_samples` pieces
    -> (frames long `[B, total_frames, Q]` on `device`, the collapse detector with its events).

    `progress(final_frames, frames)` and `cancel()` as in `TokenGenerator`; `threads` torch CPU
    threads for the generating thread (None: leave them).
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    detector = CollapseDetector(collapse or CollapseSettings(bits=0.0), generation.num_samples,
                                int(model.args.n_codebooks), device)
    engine = TokenGenerator(model, generation, sampling, detector, generator, device)
    watched = watch_speed(progress) if device == "cpu" else progress
    with cpu_threads(threads):
        frames = engine.generate(prompt, total_frames, progress=watched, cancel=cancel)  # [B, N, Q]
    return frames, detector


def watch_speed(progress):
    """`progress` wrapped so that a CPU generation that falls far below its own speed (another program
    took a core) drops to the free cores and says so once (`pipeline.threads.SpeedWatch`)."""
    watch, done = SpeedWatch("generation", "frames", LOG), [0]

    def reported(final_frames: int, frames: torch.Tensor) -> None:
        watch.observe(final_frames - done[0])
        done[0] = final_frames
        if progress is not None:
            progress(final_frames, frames)

    return reported
