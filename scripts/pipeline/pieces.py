"""Stage 5's pieces, for every front-end: a `GenerationRequest` becomes `<name>.{wav,th,png,json}`.

`write_pieces(request)` is the whole job behind the command line and the studio: skip finished
pieces, load the checkpoint's model and codec (or reuse a `Preloaded` pair), resolve the artist
conditioning and the window, build the prompt (none, a token file, or audio encoded like the
training data), generate (`pipeline.generation`) while a worker decodes finished codec chunks
(`pipeline.decoding`), normalise, and write each piece into `music_transformer/<label>/`. The JSON
is written last: it marks a finished piece.

A job that cannot be done raises `GenerationRefused` (stage 5 turns it into exit status 2, the
studio into a failed job); a failure that concerns one piece only is recorded in the report.
"""
from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .audio import DEFAULT_TARGET_LUFS, AudioDecodeError, load_conditioned, normalise_wave
from .cli import StageReport, resolve_device
from .codec import UNTRAINED_WARNING, CodecUnavailable, load_codec
from .contract import SAMPLE_RATE, TokenFile, TokenFileError, load_token_file, save_token_file
from .decoding import (OverlappedDecoder, chunk_scales, decode_chunked, frames_for_samples, frames_to_chunk_codes,
                       samples_for_frames)
from .files import PathEscapesRoot, atomic_path, atomic_write_json, remove_stale_temporaries, resolve_inside
from .generation import (GenerationSettings, ThreadPlan, blend_weights, cpu_threads, generate_frames, label_weights,
                         thread_plan)
from .loops import join_step_report
from .manifest import ManifestError, manifest_path, read_manifest
from .model_io import LoadedModel, load_model
from .originality import TrainingIndex
from .precision import PrecisionChoice, choose_precision
from .publish import (INDEXES, LoopChoice, LoopPlan, choose_loop, describe_copy, longest_copy_seconds, loop_audio,
                      loop_plan, retry_seed, write_loop_wav)
from .request import DEFAULT_CFG_COEF, GenerationRefused, GenerationRequest, check_artist_options
from .runs import find_checkpoint, pieces_dir
from .sampling import CollapseDetector, CollapseSettings, SamplingSettings

LOG = logging.getLogger("pipeline.pieces")
STAGE = "5_MusicPrediction"
OUTPUT_SUFFIXES = (".wav", ".th", ".png", ".json")  # the JSON is written last: it marks a finished piece


# ==== the model and its codec =================================================================
@dataclass
class Preloaded:
    """A checkpoint's model and its codec, loaded once and reused (the studio keeps one per model)."""

    loaded: LoadedModel
    codec: object
    device: str
    load_seconds: float


def load_model_and_codec(request: GenerationRequest, codec_loader=None) -> Preloaded:
    """The checkpoint the request names (`checkpoint`, `epoch`, else the model's best/last) and its codec.

    `codec_loader(spec, device)` builds the codec (default `pipeline.codec.load_codec`)."""
    started = time.perf_counter()
    device = resolve_device(request.device)
    path = find_checkpoint(request.root, request.model_name, request.checkpoint, request.epoch)
    loaded = load_model(path, device)  # float32: generation makes its reduced-precision copy (`pipeline.precision`)
    LOG.info("model from %s (epoch %s, step %s, %s pattern, Q = %d)", loaded.path, loaded.epoch, loaded.step,
             loaded.pattern, loaded.n_codebooks)
    try:
        codec = (codec_loader or load_codec)(request.codec or checked_codec_spec(loaded, request.root), device)
    except CodecUnavailable as error:
        raise GenerationRefused(str(error)) from None
    if not codec.pretrained:
        LOG.warning("%s", UNTRAINED_WARNING)
    return Preloaded(loaded=loaded, codec=codec, device=device, load_seconds=time.perf_counter() - started)


def checked_codec_spec(loaded: LoadedModel, root: Path) -> str:
    """The checkpoint's codec; a local folder it names must lie inside the root (`--codec` trusts one outside)."""
    spec = str(loaded.contract["codec"])
    local = Path(spec).expanduser()
    if local.exists():  # load_codec would read this folder (a hub id or `random:N` is no local path)
        try:
            resolve_inside(root, local.resolve())
        except PathEscapesRoot:
            raise GenerationRefused(f"{loaded.path} names the codec folder {spec}, outside the project root "
                                    f"{Path(root).resolve()}: refused; pass --codec {spec} to trust it") from None
    return spec


# ==== conditioning and window =================================================================
@dataclass
class Conditioning:
    """What a joint model is asked to play: the label weights and the guidance."""

    weights: tuple | None  # n_artists + 1 weights, None for an unconditioned model
    cfg_coef: float  # 1.0 = off
    label: str | None  # the artist, or None for a blend
    blend: dict | None  # {artist: normalised weight}

    def describe(self, model: str, artists: list) -> dict:
        return {"model": model, "artists": artists, "label": self.label, "blend": self.blend,
                "weights": None if self.weights is None else [round(w, 6) for w in self.weights],
                "cfg_coef": self.cfg_coef}


def resolve_conditioning(request: GenerationRequest, loaded: LoadedModel) -> Conditioning:
    """The label / blend weights and the CFG coefficient for `loaded`; unknown artists are named."""
    if loaded.n_artists == 0:
        if request.blend:
            raise GenerationRefused(f"{loaded.path} is a one-artist model (no artist labels): --blend needs a "
                                    "joint model")
        if request.cfg_coef not in (None, 1.0):
            LOG.warning("--cfg-coef %g ignored: %s has no artist labels to guide with", request.cfg_coef, loaded.path)
        return Conditioning(weights=None, cfg_coef=1.0, label=request.artist, blend=None)
    cfg = DEFAULT_CFG_COEF if request.cfg_coef is None else request.cfg_coef
    if request.blend:
        try:
            weights = blend_weights(request.blend, loaded.artists)
        except ValueError as error:
            raise GenerationRefused(f"--blend: {error} ({loaded.path})") from None
        total = sum(request.blend.values())
        return Conditioning(weights=weights, cfg_coef=cfg, label=None,
                            blend={name: weight / total for name, weight in request.blend.items()})
    if request.artist not in loaded.artists:
        raise GenerationRefused(f"--artist {request.artist!r} is not one of the artists of {loaded.path}: "
                                f"{', '.join(loaded.artists)}")
    return Conditioning(weights=label_weights(loaded.artists.index(request.artist), loaded.n_artists),
                        cfg_coef=cfg, label=request.artist, blend=None)


def resolve_window(request: GenerationRequest, loaded: LoadedModel) -> tuple[int, int]:
    """(context_frames, stride_frames) within the context the model was trained on."""
    longest = loaded.max_context_frames
    context = request.context_frames or longest
    if context > longest:
        raise GenerationRefused(f"--context-frames {context} exceeds the training context of {longest} "
                                f"frames (the checkpoint's token_contract context_frames; the model's "
                                f"{loaded.model_args['n_positions']} positions beyond it were never trained)")
    stride = request.stride_frames or max(1, context // 2)
    if stride > context:
        raise GenerationRefused(f"--stride-frames {stride} is larger than the context ({context} frames)")
    return context, stride


def resolve_precision(request: GenerationRequest, device: str) -> PrecisionChoice:
    """The precision generation runs in (`--dtype`, auto: chosen for this machine), logged once per job."""
    try:
        choice = choose_precision(request.dtype, device)
    except ValueError as error:
        raise GenerationRefused(f"--dtype {request.dtype}: {error}") from None
    LOG.info("generation in %s (%s; the KV cache in %s, sampling and decoding in float32)%s", choice.used,
             choice.reason, choice.describe()["kv_cache"],
             "" if choice.used == "float32" else ": --dtype float32 forces full precision")
    return choice


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


def build_prompt(request: GenerationRequest, codec, loaded: LoadedModel) -> Prompt:
    bandwidth = float(loaded.contract["bandwidth"])
    if request.prompt_tokens is not None:
        return prompt_from_tokens(request.prompt_tokens, codec, loaded.n_codebooks, bandwidth, request.prompt_seconds)
    if request.prompt_audio is not None:
        # conditioned like stage 1's clips (its default level), whatever level the output WAV gets
        return prompt_from_audio(request.prompt_audio, codec, bandwidth, request.prompt_seconds, DEFAULT_TARGET_LUFS)
    if request.prompt_seconds is not None:
        LOG.warning("--prompt-seconds has no effect without --prompt-tokens or --prompt-audio")
    return Prompt(frames=None, scales=None)


def prompt_from_tokens(path: Path, codec, n_codebooks: int, bandwidth: float, prompt_seconds: float | None) -> Prompt:
    """A `.th` file (contract dict or bare `[1, Q, T]`) -> its first `prompt_seconds` of frames."""
    try:
        tokens = load_token_file(path)
    except TokenFileError as error:
        raise GenerationRefused(str(error)) from None
    if tokens.n_codebooks != n_codebooks:
        raise GenerationRefused(f"{path}: the prompt has Q = {tokens.n_codebooks} codebooks, the checkpoint was "
                                f"trained on Q = {n_codebooks} ({bandwidth:g} kbps): tokenize the prompt at that "
                                "bandwidth")
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
        raise GenerationRefused(str(error)) from None
    if wave.shape[0] < codec.hop_length:
        raise GenerationRefused(f"{path}: the prompt audio is shorter than one codec frame")
    codes, scales = codec.encode(torch.from_numpy(wave.T.copy()), bandwidth)  # [2, n] -> [1, Q, T], [1, C]
    n_frames = frames_for_samples(codec, wave.shape[0])
    frames = codes[:, :, :n_frames].long().transpose(1, 2)  # [1, Q, T] -> [1, L, Q]
    return Prompt(frames=frames, scales=scales[0], kind="audio", source=str(path))


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


# ==== one job =================================================================================
@dataclass
class Run:
    """Everything one job produced, for the sidecar JSON."""

    request: GenerationRequest
    loaded: LoadedModel
    codec: object
    prompt: Prompt
    seed: int
    device: str
    context: int
    stride: int
    total_frames: int
    audio_samples: int  # length of each piece's wave (`num_samples` counts pieces)
    scales: torch.Tensor  # float32 [n_chunks], the per-chunk decoding scales
    scale_sources: list
    threads: ThreadPlan
    conditioning: Conditioning
    precision: PrecisionChoice  # what generation runs in (the request's dtype, resolved)
    timings: dict = field(default_factory=dict)
    index: TrainingIndex | None = None  # the model's training index (pipeline.originality), None without one
    index_reason: str | None = None  # why there is no index
    loop: LoopPlan | None = None  # a loop job: where each piece should end (generated past it)

    @property
    def overlapped(self) -> bool:
        """Decode while generating, unless asked not to or generation's threads already fill the cores."""
        return not self.request.decode_at_end and self.threads.overlap

    @property
    def chunks_per_pass(self) -> int:
        """`decode_chunk_seconds` in codec chunks (0 = all of them)."""
        if self.request.decode_chunk_seconds == 0:
            return self.codec.n_chunks(self.audio_samples)
        return max(1, round(self.request.decode_chunk_seconds * SAMPLE_RATE / self.codec.chunk_stride))

    @property
    def engine_name(self) -> str:
        return self.request.engine if self.request.use_cache else "recompute"


def write_pieces(request: GenerationRequest, preloaded: Preloaded | None = None, on_frames=None, cancel=None,
                 codec_loader=None) -> StageReport:
    """Generate and write every piece `request` asks for -> the report.

    `preloaded`: a model and codec kept in memory (else loaded, with `codec_loader` if given);
    `on_frames(done, total)` after each final frame; `cancel()` True stops generation
    (`GenerationCancelled`) before anything is written.
    """
    started = time.time()
    check_artist_options(request)
    report = StageReport(stage=STAGE, artist=request.label, started=started)
    out_folder = pieces_dir(request.root, request.label)
    names = piece_names(request.name, request.num_samples)
    todo = [name for name in names if request.overwrite or not is_complete(out_folder, name)]
    if not todo:
        LOG.info("all %d piece(s) already exist in %s: nothing to do (pass --overwrite or another --name)",
                 len(names), out_folder)
        report.skipped.extend(names)
        return report
    remove_stale_temporaries(out_folder)
    if request.threads:
        torch.set_num_threads(request.threads)
    run = prepare(request, preloaded or load_model_and_codec(request, codec_loader),
                  already_loaded=preloaded is not None)
    frames, detector, waves, notes = generate_and_decode(run, on_frames, cancel)
    takes = {index: make_take(run, frames, detector, waves, index, run.seed)
             for index, name in enumerate(names) if name in todo}
    takes = enforce_max_copy(run, takes, notes, cancel)
    for index, name in enumerate(names):
        if name not in todo:
            report.skipped.append(name)
            continue
        try:
            finish_piece(run, takes[index], index, out_folder / name, notes)
            report.done.append(name)
        except (OSError, RuntimeError, ValueError) as error:  # one piece's failure must not lose the others
            report.fail(out_folder / name, f"{type(error).__name__}: {error}", LOG)
    LOG.info("%s", report.summary())
    return report


def prepare(request: GenerationRequest, preloaded: Preloaded, already_loaded: bool) -> Run:
    """The job's conditioning, prompt, window, lengths, scales, seed and threads, checked before generating."""
    loaded, codec = preloaded.loaded, preloaded.codec
    conditioning = resolve_conditioning(request, loaded)  # per request: a preloaded model serves every artist
    prompt_started = time.perf_counter()
    prompt = build_prompt(request, codec, loaded)
    context, stride = resolve_window(request, loaded)
    audio_samples, total_frames, plan = piece_length(request, codec, prompt)
    index, index_reason = INDEXES.get(loaded.path)
    if index is None and request.max_copy_seconds is not None:
        raise GenerationRefused(f"--max-copy-seconds needs the model's training index: {index_reason}")
    median, median_source = median_scale_for(loaded.contract, request.root, request.artist or next(iter(request.blend)))
    scales, scale_sources = chunk_scales(prompt.scales, codec.n_chunks(audio_samples), median, median_source)
    if "default 1.0" in scale_sources:
        LOG.warning("no scale for generated chunks (%s): using 1.0, the level may be off", median_source)
    seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**31)
    run = Run(request=request, loaded=loaded, codec=codec, prompt=prompt, seed=seed, device=preloaded.device,
              context=context, stride=stride, total_frames=total_frames, audio_samples=audio_samples, scales=scales,
              scale_sources=scale_sources, threads=thread_plan(preloaded.device, request.threads),
              conditioning=conditioning, precision=resolve_precision(request, preloaded.device), index=index,
              index_reason=index_reason, loop=plan)
    run.timings.update(load_s=0.0 if already_loaded else preloaded.load_seconds,
                       prompt_s=time.perf_counter() - prompt_started)
    return run


def piece_length(request: GenerationRequest, codec, prompt: Prompt) -> tuple[int, int, LoopPlan | None]:
    """(audio samples, frames) to generate, and a loop job's plan: a loop is generated past its length."""
    audio_samples = round(request.seconds * SAMPLE_RATE)
    total_frames = frames_for_samples(codec, audio_samples)
    if prompt.n_frames >= total_frames:
        raise GenerationRefused(f"the prompt already holds {prompt.n_frames} frames, --seconds {request.seconds:g} "
                                f"asks for {total_frames}: nothing to generate (raise --seconds or lower "
                                "--prompt-seconds)")
    if not request.loop:
        return audio_samples, total_frames, None
    plan = loop_plan(request.seconds, total_frames, codec.frame_rate, prompt.n_frames)
    audio_samples = round((request.seconds + plan.extra_seconds) * SAMPLE_RATE)
    return audio_samples, frames_for_samples(codec, audio_samples), plan


def generate_and_decode(run: Run, on_frames=None, cancel=None) -> tuple[torch.Tensor, CollapseDetector, list, list]:
    """Every piece's frames `[B, N, Q]`, the collapse detector, each piece's wave `[2, S]` (or the error
    that stopped it) and the decoding notes."""
    decoder = None if not run.overlapped else OverlappedDecoder(
        run.codec, run.scales, run.audio_samples, run.request.num_samples, run.chunks_per_pass, run.threads.decode)
    try:
        frames, detector = generate(run, decoder, on_frames, cancel)
    except BaseException:
        if decoder is not None:
            decoder.close()  # a cancelled or failed generation leaves no worker behind
        raise
    notes: list = []
    return frames, detector, decode_pieces(run, frames, decoder, notes), notes


def generation_settings(run: Run) -> tuple[GenerationSettings, SamplingSettings, CollapseSettings]:
    request = run.request
    collapse = CollapseSettings(bits=request.collapse_bits, window=request.collapse_window, boost=request.boost,
                                boost_frames=request.boost_frames, max_temperature=request.max_temperature)
    sampling = SamplingSettings(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                                repetition_penalty=request.repetition_penalty,
                                repetition_window=request.repetition_window)
    settings = GenerationSettings(pattern=run.loaded.pattern, context_frames=run.context, stride_frames=run.stride,
                                  use_cache=request.use_cache, num_samples=request.num_samples,
                                  engine=request.engine, cuda_graph=request.cuda_graph,
                                  cpu_trace=request.cpu_trace,
                                  artist_weights=run.conditioning.weights, cfg_coef=run.conditioning.cfg_coef,
                                  copy_path=run.loaded.copy_path if request.copy_path else None,
                                  precision=run.precision.used)
    return settings, sampling, collapse


def generate(run: Run, decoder: OverlappedDecoder | None, on_frames=None,
             cancel=None) -> tuple[torch.Tensor, CollapseDetector]:
    """Generate every piece's frames `[B, N, Q]`, feeding finished frames to `decoder` as they come.

    `on_frames(done, total)` reports the frames generated so far; `cancel` goes to the core."""
    settings, sampling, collapse = generation_settings(run)
    to_generate = run.total_frames - run.prompt.n_frames
    started = time.perf_counter()

    def progress(final_frames: int, frames: torch.Tensor) -> None:
        if on_frames is not None:
            on_frames(final_frames - run.prompt.n_frames, to_generate)
        if decoder is not None:
            decoder.frames_final(final_frames, frames)

    frames, detector = generate_frames(run.loaded.model, run.prompt.frames, run.total_frames, settings, sampling,
                                       collapse, run.seed, run.device, progress=progress, cancel=cancel,
                                       threads=run.threads.generate)
    run.timings["generate_s"] = time.perf_counter() - started
    LOG.info("generated %d frames x %d piece(s) in %.1f s (%.0f frames/s)", to_generate, settings.num_samples,
             run.timings["generate_s"], to_generate / max(run.timings["generate_s"], 1e-9))
    return frames.cpu(), detector


def decode_pieces(run: Run, frames: torch.Tensor, decoder: OverlappedDecoder | None, notes: list) -> list:
    """Every piece's wave `[2, S]` (or the error that stopped it): the overlapped decoder's, or decoded now."""
    started = time.perf_counter()
    if decoder is not None:
        waves = decoder.finish(frames, notes)
        busy = decoder.busy_seconds
    else:
        waves = []
        with cpu_threads(run.threads.decode):
            for index in range(frames.shape[0]):
                codes = frames_to_chunk_codes(run.codec, frames[index:index + 1], run.audio_samples)  # [1, Q, T]
                try:
                    waves.append(decode_chunked(run.codec, codes, run.scales, run.audio_samples,
                                                run.chunks_per_pass, notes))
                except (RuntimeError, ValueError) as error:  # one piece's failure must not lose the others
                    waves.append(error)
        busy = time.perf_counter() - started
    run.timings["decode_wait_s"] = time.perf_counter() - started  # wall time decoding added after generation
    run.timings["decode_s"] = busy  # time spent decoding, all pieces
    return waves


# ==== takes: a piece as generated, its loop, its originality, and regenerations ===================
@dataclass
class Take:
    """One piece as generated, with what was found about it."""

    frames: torch.Tensor  # long [1, N, Q]: every generated frame (a loop's run past its end included)
    wave: object  # its wave [2, S], or the error that stopped its decoding
    events: list  # its collapse events
    seed: int  # the seed of the batch that generated it
    row: int  # its row in that batch
    pieces: int  # the pieces of that batch
    loop: LoopChoice | None = None
    originality: dict | None = None

    def kept_frames(self, run: Run) -> int:
        return run.total_frames if self.loop is None else self.loop.end_frame

    def kept_samples(self, run: Run) -> int:
        return run.audio_samples if self.loop is None else samples_for_frames(run.codec, self.loop.end_frame)


def make_take(run: Run, frames: torch.Tensor, detector: CollapseDetector, waves: list, row: int, seed: int) -> Take:
    """Row `row` of a batch's frames `[B, N, Q]`: its loop end chosen (a loop job), its frames looked up in
    the training index (the prompt's frames marked)."""
    take = Take(frames=frames[row:row + 1], wave=waves[row], seed=seed, row=row, pieces=frames.shape[0],
                events=[event for event in detector.events if event["sample"] == row])
    if run.loop is not None:
        with cpu_threads(run.threads.decode):  # batched forwards: large products, like decoding's
            take.loop = choose_loop(run.loaded.model, take.frames, run.loop, run.loaded.pattern, run.context,
                                    run.conditioning.weights, run.device)
    if run.index is not None:
        kept = take.frames[0, :take.kept_frames(run)].numpy()  # [1, N, Q] -> [T, Q]
        take.originality = run.index.report(kept, prompt_frames=run.prompt.n_frames)
    return take


def enforce_max_copy(run: Run, takes: dict, notes: list, cancel=None) -> dict:
    """{index: Take} with every piece whose longest copied run (all codebooks) exceeds --max-copy-seconds
    generated again, with a new seed each round, up to --max-copy-retries rounds; a piece still over the
    limit keeps its least copied take, with a warning in the log and in its `originality`."""
    limit = run.request.max_copy_seconds
    if limit is None or run.index is None:
        return takes
    tried = {index: [attempt_summary(take)] for index, take in takes.items()}
    for attempt in range(1, run.request.max_copy_retries + 1):
        over = [index for index, take in takes.items() if longest_copy_seconds(take.originality) > limit]
        if not over:
            break
        seed = retry_seed(run.seed, attempt)
        LOG.info("%d piece(s) copy more than %g s of the training tokens: generating them again with seed %d "
                 "(round %d of %d)", len(over), limit, seed, attempt, run.request.max_copy_retries)
        retry = replace(run, request=replace(run.request, num_samples=len(over)), seed=seed, timings={})
        frames, detector, waves, retry_notes = generate_and_decode(retry, cancel=cancel)
        notes.extend(retry_notes)
        run.timings["regenerate_s"] = (run.timings.get("regenerate_s", 0.0) + retry.timings["generate_s"]
                                       + retry.timings["decode_wait_s"])
        for row, index in enumerate(over):
            take = make_take(run, frames, detector, waves, row, seed)
            tried[index].append(attempt_summary(take))
            if longest_copy_seconds(take.originality) < longest_copy_seconds(takes[index].originality):
                takes[index] = take
    for index, take in takes.items():
        take.originality.update(max_copy_seconds=limit, attempts=tried[index],
                                warning=copy_warning(take.originality, limit, len(tried[index])))
        if take.originality["warning"]:
            LOG.warning("piece %d: %s", index, take.originality["warning"])
    return takes


def attempt_summary(take: Take) -> dict:
    """One take of a piece, for the sidecar: how to generate it again, and how much it copied."""
    return {"seed": take.seed, "pieces": take.pieces, "row": take.row,
            "longest_copy_seconds": longest_copy_seconds(take.originality)}


def copy_warning(report: dict, limit: float, takes: int) -> str | None:
    if longest_copy_seconds(report) <= limit:
        return None
    return (f"{describe_copy(report)}: over --max-copy-seconds {limit:g} after {takes} takes; kept the least "
            "copied one. Listen to the training file at that time before publishing this piece")


# ==== outputs =================================================================================
def piece_names(name: str, count: int) -> list[str]:
    return [name] if count == 1 else [f"{name}_{index}" for index in range(count)]


def is_complete(folder: Path, name: str) -> bool:
    return all((folder / f"{name}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


def normalise(wave: torch.Tensor, target_lufs: float) -> tuple[np.ndarray, float]:
    """`[2, S]` -> (`[S, 2]` float32 at the target loudness, peak at most -1 dBFS; the gain in dB)."""
    samples, gain = normalise_wave(wave.T.numpy().astype(np.float32), target_lufs)  # [2, S] -> [S, 2]
    return samples, 20 * math.log10(gain)


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


def finish_piece(run: Run, take: Take, index: int, stem: Path, notes: list) -> None:
    """Write one piece's WAV (a loop's with its `smpl` chunk), tokens, spectrogram and sidecar JSON."""
    if isinstance(take.wave, Exception):
        raise take.wave
    codec = run.codec
    kept_frames, kept_samples = take.kept_frames(run), take.kept_samples(run)
    codes = frames_to_chunk_codes(codec, take.frames[:, :kept_frames], kept_samples)  # [1, Q, n_chunks*150]
    samples, gain_db, loop = piece_samples(run, take)
    if loop is None:
        write_wav(samples, stem.with_suffix(".wav"))
    else:
        write_loop_wav(samples, stem.with_suffix(".wav"), SAMPLE_RATE)
    token_file = TokenFile(codes=codes.to(torch.int16), scales=run.scales[:codec.n_chunks(kept_samples)],
                           num_samples=kept_samples, bandwidth=float(run.loaded.contract["bandwidth"]),
                           codec=codec.name, source=run.prompt.source,
                           extra={"generated_by": STAGE, "prompt_frames": run.prompt.n_frames,
                                  "pattern": run.loaded.pattern, "loop": loop is not None})
    save_token_file(token_file, stem.with_suffix(".th"))
    prompt_seconds = samples_for_frames(codec, run.prompt.n_frames) / SAMPLE_RATE if run.prompt.n_frames else 0.0
    write_spectrogram(samples, stem.with_suffix(".png"), stem.name, prompt_seconds)
    sidecar = describe(run, take, index, stem.name, gain_db, notes, loop)
    atomic_write_json(sidecar, stem.with_suffix(".json"))
    loop_note = "" if loop is None else (
        f"; a loop of {kept_samples} samples, join NLL {loop['join_nll_bits']:.2f} against the piece's mean "
        f"{loop['piece_mean_nll_bits']:.2f} bits/frame, join step {'within' if loop['join_step_ok'] else 'OVER'} "
        "the piece's 99.9th percentile")
    LOG.info("wrote %s.{wav,th,png,json} (%.1f s of audio, real-time factor %.2f); %s%s", stem,
             kept_samples / SAMPLE_RATE, sidecar["real_time_factor"], describe_copy(take.originality), loop_note)


def piece_samples(run: Run, take: Take) -> tuple[np.ndarray, float, dict | None]:
    """The piece's samples `[S, 2]` at the target loudness, the gain in dB, and a loop's sidecar figures:
    a loop's audio after its end is crossfaded into its start, then cut (`pipeline.publish.loop_audio`)."""
    if take.loop is None:
        samples, gain_db = normalise(take.wave, run.request.target_lufs)
        return samples, gain_db, None
    loop_samples = take.kept_samples(run)
    looped = loop_audio(take.wave.T.numpy().astype(np.float32), loop_samples, SAMPLE_RATE)  # [2, S] -> [L, 2]
    samples, gain_db = normalise(torch.from_numpy(np.ascontiguousarray(looped.T)), run.request.target_lufs)
    return samples, gain_db, take.loop.report(loop_samples, join_step_report(samples))


def describe(run: Run, take: Take, index: int, name: str, gain_db: float, notes: list, loop: dict | None) -> dict:
    """The sidecar JSON: every parameter, the checkpoint, the precision, seeds, collapse events, timings, codec, the
    originality report (null without a training index, `originality_reason` says why) and a loop's figures."""
    request = run.request
    kept_frames, kept_samples = take.kept_frames(run), take.kept_samples(run)
    wall_seconds = run.timings["generate_s"] + run.timings["decode_wait_s"]  # the whole batch, audio ready
    generated = run.total_frames - run.prompt.n_frames  # per piece, a loop's frames past its end included
    return {
        "name": name, "artist": request.label, "sample_index": index, "stage": STAGE,
        "conditioning": run.conditioning.describe(request.model_name, run.loaded.artists),
        "parameters": request.parameters(),
        "checkpoint": {"path": str(run.loaded.path), "epoch": run.loaded.epoch, "step": run.loaded.step,
                       "model_args": run.loaded.model_args, "token_contract": run.loaded.contract},
        "seed": take.seed, "seeding": "one torch.Generator seeded with `seed` draws every piece of the batch",
        "device": run.device, "precision": run.precision.describe(),
        "window": {"context_frames": run.context, "stride_frames": run.stride, "kv_cache": request.use_cache,
                   "engine": run.engine_name},
        "prompt": {"kind": run.prompt.kind, "source": run.prompt.source, "frames": run.prompt.n_frames},
        "frames": {"total": kept_frames, "prompt": run.prompt.n_frames, "generated": kept_frames - run.prompt.n_frames},
        "duration_s": kept_samples / SAMPLE_RATE, "audio_samples": kept_samples, "sample_rate": SAMPLE_RATE,
        "channels": 2, "scales": [round(float(s), 6) for s in run.scales[:run.codec.n_chunks(kept_samples)]],
        "scale_sources": run.scale_sources[:run.codec.n_chunks(kept_samples)],
        "loudness": {"target_lufs": request.target_lufs, "gain_db": round(gain_db, 3)},
        "collapse_events": take.events,
        "timings": {key: round(value, 4) for key, value in run.timings.items()},
        "threads": {"generate": run.threads.generate, "decode": run.threads.decode,
                    "decode_overlapped": run.overlapped},
        "frames_per_second": round(generated * request.num_samples / max(run.timings["generate_s"], 1e-9), 2),
        "real_time_factor": round(kept_samples / SAMPLE_RATE * request.num_samples / max(wall_seconds, 1e-9), 3),
        "codec": {"name": run.codec.name, "pretrained": run.codec.pretrained,
                  "bandwidth": float(run.loaded.contract["bandwidth"]), "decoder": run.codec.decoder_in_use},
        "warning": None if run.codec.pretrained else UNTRAINED_WARNING,
        "decode_notes": notes,
        "originality": take.originality, "originality_reason": run.index_reason,
        "loop": loop,
    }
