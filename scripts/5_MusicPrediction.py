#!/usr/bin/env python3
"""Stage 5: continue (or start) a piece with a trained MusicTransformer and decode it to stereo audio.

A thin command line over the generation core (`pipeline.generation`): parse the options, find and
rebuild the checkpoint's model, build the prompt (none, a token file, or audio encoded with the
training codec), generate tokens with the lean KV-cache engine (sliding the context window
MusicGen-style when the piece outgrows it) while a worker thread decodes each finished group of
codec chunks, normalise, and write `<name>.{wav,th,json,png}` per piece into
`music_transformer/<artist>/`.

A joint model (stage 4 with several `--artist`, in `model_results/<name>/`) is picked with `--model
NAME`; `--artist A` selects its label, `--blend "A=0.7,B=0.3"` mixes labels, and `--cfg-coef F`
applies classifier-free guidance (default 3.0 for such a model). Blends go to
`music_transformer/<blend label>/`.
"""
from __future__ import annotations

import contextlib
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
from pipeline.cli import (StageError, StageReport, artist_name, bounded_number, make_parser,  # noqa: E402
                          non_negative_float,
                          non_negative_int, positive_float, positive_int, resolve_device, run_main,
                          setup_logging)
from pipeline.codec import UNTRAINED_WARNING, CodecUnavailable, load_codec  # noqa: E402
from pipeline.contract import SAMPLE_RATE, TokenFile, TokenFileError, load_token_file, save_token_file  # noqa: E402
from pipeline.files import (PathEscapesRoot, atomic_path, atomic_write_json, remove_stale_temporaries,  # noqa: E402
                            resolve_inside)
from pipeline.generation import (ENGINES, CollapseDetector, CollapseSettings, GenerationSettings,  # noqa: E402
                                 OverlappedDecoder, SamplingSettings, ThreadPlan, blend_weights, chunk_scales,
                                 cpu_threads, label_weights,
                                 decode_chunked, frames_for_samples, frames_to_chunk_codes, generate_frames,
                                 samples_for_frames, thread_plan)
# the generation core's names stage 5 used to define itself, still reachable as `stage5.<name>`
from pipeline.generation import (TokenGenerator, apply_repetition_penalty, entropy_bits,  # noqa: E402,F401
                                 mask_special, sample_tokens)
from pipeline.manifest import ManifestError, manifest_path, read_manifest  # noqa: E402
from pipeline.model_io import LoadedModel, load_model  # noqa: E402
from pipeline.runs import find_checkpoint  # noqa: E402

LOG = logging.getLogger("pipeline.stage5")
STAGE = "5_MusicPrediction"
OUTPUT_SUFFIXES = (".wav", ".th", ".png", ".json")  # the JSON is written last: it marks a finished piece

probability_mass = bounded_number(float, 0.0, 1.0, minimum_inclusive=False)
factor_at_least_one = bounded_number(float, 1.0)  # --repetition-penalty, --boost
loudness_target = bounded_number(float, None, 0.0)


# ==== checkpoint ==============================================================================
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
                         epilog="Outputs: <root>/music_transformer/<artist or blend label>/<name>.{wav,th,json,png}.",
                         artist_required=False)
    source = parser.add_argument_group("checkpoint")
    source.add_argument("--model", type=artist_name,
                        help="model folder model_results/<model>/ (default: the --artist folder); a joint model "
                             "of several artists is named here")
    which = source.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="checkpoint file (default: best.pt, then last.pt)")
    which.add_argument("--epoch", type=non_negative_int, help="use music_transformer_ep<N>.pt")
    source.add_argument("--codec", help="codec spec for the prompt and decoding (default: the checkpoint's)")
    source.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    source.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads for torch; 0 = automatic (measured, see docs/stage5.md): one thread for "
                             "generation steps on the CPU, the other cores for the overlapped decoding")
    source.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and KV cache of generation (bfloat16: for a GPU; decoding stays float32)")
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
    length.add_argument("--engine", choices=ENGINES, default="lean",
                        help="cached decoding: lean (a static KV cache over the model's weights) or transformers "
                             "(GPT-2's own cache, the slower path it replaced; kept for comparison)")
    length.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, run each lean step eagerly instead of replaying a captured CUDA graph")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=non_negative_float, default=1.0,
                          help="sampling temperature; 0 = greedy (always the likeliest code); negative is refused")
    sampling.add_argument("--top-k", type=non_negative_int, default=250,
                          help="keep the k likeliest codes (0 = off); a k of 1024 or more is clamped to "
                               "the 1024 codes, i.e. off")
    sampling.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus mass in (0, 1] (1 = off)")
    sampling.add_argument("--repetition-penalty", type=factor_at_least_one, default=1.0,
                          help=">= 1: a token seen in the recent window loses log(penalty) of logit (1 = off)")
    sampling.add_argument("--repetition-window", type=positive_int, default=150, help="frames the penalty looks back")
    artists = parser.add_argument_group("artist conditioning (joint models)")
    artists.add_argument("--blend", type=parse_blend, metavar='"A=0.7,B=0.3"',
                         help="mix the artist embeddings of a joint model (weights >= 0, normalised to sum 1); "
                              "instead of --artist")
    artists.add_argument("--cfg-coef", type=non_negative_float,
                         help="classifier-free guidance: logits = uncond + F * (cond - uncond), both halves in one "
                              "batched step (default 3.0 for a joint model; 1 = off; ignored by a one-artist model)")
    sampling.add_argument("--seed", type=non_negative_int, help="random seed (default: drawn and recorded in the JSON)")
    sampling.add_argument("--num-samples", type=positive_int, default=1, help="pieces generated in one batch")
    collapse = parser.add_argument_group("collapse detector")
    collapse.add_argument("--collapse-bits", type=non_negative_float, default=0.5,
                          help="boost when a codebook's mean entropy falls below this many bits (0 = off)")
    collapse.add_argument("--collapse-window", type=positive_int, default=150,
                          help="frames the entropy is averaged over")
    collapse.add_argument("--boost", type=factor_at_least_one, default=1.5, help="temperature factor on a collapse")
    collapse.add_argument("--boost-frames", type=positive_int, default=150, help="frames the boost decays over")
    collapse.add_argument("--max-temperature", type=positive_float, default=2.0, help="cap of a boosted temperature")
    output = parser.add_argument_group("decoding and output")
    output.add_argument("--decode-chunk-seconds", type=non_negative_float, default=10.0,
                        help="decode this much audio a pass (0 = all at once); halves on out-of-memory")
    output.add_argument("--decode-at-end", action="store_true",
                        help="decode after generation instead of overlapping it with generation (same audio)")
    output.add_argument("--target-lufs", type=loudness_target, default=DEFAULT_TARGET_LUFS,
                        help="loudness of the WAV (peak capped at -1 dBFS)")
    output.add_argument("--name", default="sample", help="output name; <name>_<i> when --num-samples > 1")
    return parser


DEFAULT_CFG_COEF = 3.0  # audiocraft's default guidance for a conditioned model


def parse_blend(text: str) -> dict:
    """argparse type: "A=0.7,B=0.3" -> {"A": 0.7, "B": 0.3}; refuses negative weights and a zero sum."""
    import argparse

    blend = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"blend part {part!r} is not ARTIST=WEIGHT")
        name = artist_name(name.strip())
        if name in blend:
            raise argparse.ArgumentTypeError(f"artist {name!r} appears twice in the blend")
        try:
            blend[name] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"blend weight {weight!r} of {name!r} is not a number") from None
        if not math.isfinite(blend[name]) or blend[name] < 0:
            raise argparse.ArgumentTypeError(f"blend weight of {name!r} is {weight.strip()}: weights must be >= 0")
    if sum(blend.values()) <= 0:
        raise argparse.ArgumentTypeError(f"blend weights {text!r} sum to 0: at least one must be positive")
    return blend


def blend_label(blend: dict) -> str:
    """A folder name for a blend: blend_A-0.70_B-0.30 (normalised weights, in the order given)."""
    total = sum(blend.values())
    return "blend_" + "_".join(f"{name}-{weight / total:.2f}" for name, weight in blend.items())


def output_label(args) -> str:
    """The folder under music_transformer/: the artist, or the blend's label."""
    return blend_label(args.blend) if args.blend else args.artist


def check_artist_options(args) -> None:
    """--artist or --blend (not both); --blend needs --model (a joint model)."""
    if args.blend and args.artist:
        raise StageError("give --artist or --blend, not both")
    if not args.blend and not args.artist:
        raise StageError("--artist is required (or --model NAME with --blend)")
    if args.blend and not args.model:
        raise StageError("--blend needs --model NAME: the joint model whose artists it mixes")


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


def resolve_conditioning(args, loaded: LoadedModel) -> Conditioning:
    """The label / blend weights and the CFG coefficient for `loaded`; unknown artists are named."""
    if loaded.n_artists == 0:
        if args.blend:
            raise StageError(f"{loaded.path} is a one-artist model (no artist labels): --blend needs a joint model")
        if args.cfg_coef not in (None, 1.0):
            LOG.warning("--cfg-coef %g ignored: %s has no artist labels to guide with", args.cfg_coef, loaded.path)
        return Conditioning(weights=None, cfg_coef=1.0, label=args.artist, blend=None)
    cfg = DEFAULT_CFG_COEF if args.cfg_coef is None else args.cfg_coef
    if args.blend:
        try:
            weights = blend_weights(args.blend, loaded.artists)
        except ValueError as error:
            raise StageError(f"--blend: {error} ({loaded.path})") from None
        total = sum(args.blend.values())
        return Conditioning(weights=weights, cfg_coef=cfg, label=None,
                            blend={name: weight / total for name, weight in args.blend.items()})
    if args.artist not in loaded.artists:
        raise StageError(f"--artist {args.artist!r} is not one of the artists of {loaded.path}: "
                         f"{', '.join(loaded.artists)}")
    return Conditioning(weights=label_weights(loaded.artists.index(args.artist), loaded.n_artists), cfg_coef=cfg,
                        label=args.artist, blend=None)


def resolve_window(args, loaded: LoadedModel) -> tuple[int, int]:
    """(context_frames, stride_frames) within the context the model was trained on."""
    longest = loaded.max_context_frames
    context = args.context_frames or longest
    if context > longest:
        raise StageError(f"--context-frames {context} exceeds the training context of {longest} "
                         f"frames (the checkpoint's token_contract context_frames; the model's "
                         f"{loaded.model_args['n_positions']} positions beyond it were never trained)")
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
    audio_samples: int  # length of each piece's wave (`--num-samples` counts pieces)
    scales: torch.Tensor  # float32 [n_chunks], the per-chunk decoding scales
    scale_sources: list
    threads: ThreadPlan
    conditioning: Conditioning | None = None
    timings: dict = field(default_factory=dict)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "stage5")
    return generate_pieces(args)  # run_main turns SIGTERM into Ctrl-C's clean stop


def generate_pieces(args) -> int:
    return write_pieces(args).exit_code()


def write_pieces(args, preloaded: Preloaded | None = None, on_frames=None, cancel=None) -> StageReport:
    """Generate and write every piece `args` asks for -> the report (the studio's entry point too).

    `preloaded`: a model and codec kept in memory (else loaded from `args`); `on_frames(done, total)`
    after each final frame instead of the tqdm bar; `cancel()` True stops generation
    (`GenerationCancelled`) before anything is written.
    """
    started = time.time()
    check_artist_options(args)
    out_folder = args.root / "music_transformer" / output_label(args)
    names = piece_names(args.name, args.num_samples)
    report = StageReport(stage=STAGE, artist=output_label(args), started=started)
    todo = [name for name in names if args.overwrite or not is_complete(out_folder, name)]
    if not todo:
        LOG.info("all %d piece(s) already exist in %s: nothing to do (pass --overwrite or another --name)",
                 len(names), out_folder)
        report.skipped.extend(names)
        return report
    remove_stale_temporaries(out_folder)
    run = prepare(args, preloaded)
    decoder = None if not overlapped(run) else OverlappedDecoder(
        run.codec, run.scales, run.audio_samples, args.num_samples, chunks_per_pass(run), run.threads.decode)
    try:
        frames, detector = generate(run, decoder, on_frames, cancel)
    except BaseException:
        if decoder is not None:
            decoder.close()  # a cancelled or failed generation leaves no worker behind
        raise
    notes: list = []
    waves = decode_pieces(run, frames, decoder, notes)
    for index, name in enumerate(names):
        if name not in todo:
            report.skipped.append(name)
            continue
        try:
            finish_piece(run, frames[index:index + 1], waves[index], detector, index, out_folder / name, notes)
            report.done.append(name)
        except (OSError, RuntimeError, ValueError) as error:  # one piece's failure must not lose the others
            report.fail(out_folder / name, f"{type(error).__name__}: {error}", LOG)
    LOG.info("%s", report.summary())
    return report


@dataclass
class Preloaded:
    """A checkpoint's model and its codec, loaded once and reused (the studio keeps one per model)."""

    loaded: LoadedModel
    codec: object
    device: str
    load_seconds: float


def load_model_and_codec(args) -> Preloaded:
    """The checkpoint `args` names (`--checkpoint`, `--epoch`, else the artist's best/last) and its codec."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    loaded = load_model(find_checkpoint(args.root, args.model or args.artist, args.checkpoint, args.epoch), device)
    if args.dtype == "bfloat16":
        loaded.model.to(torch.bfloat16)  # the engine reads the model's own weights in their dtype
    LOG.info("model from %s (epoch %s, step %s, %s pattern, Q = %d)", loaded.path, loaded.epoch, loaded.step,
             loaded.contract["pattern"], loaded.n_codebooks)
    try:
        codec = load_codec(args.codec or checked_codec_spec(loaded, args.root), device)
    except CodecUnavailable as error:
        raise StageError(str(error)) from None
    if not codec.pretrained:
        LOG.warning("%s", UNTRAINED_WARNING)
    return Preloaded(loaded=loaded, codec=codec, device=device, load_seconds=time.perf_counter() - started)


def prepare(args, preloaded: Preloaded | None = None) -> Run:
    if args.threads:
        torch.set_num_threads(args.threads)
    if preloaded is None:
        preloaded = load_model_and_codec(args)
        load_seconds = preloaded.load_seconds
    else:
        load_seconds = 0.0  # already in memory
    loaded, codec, device = preloaded.loaded, preloaded.codec, preloaded.device
    conditioning = resolve_conditioning(args, loaded)  # per request: a preloaded model serves every artist
    prompt_started = time.perf_counter()
    prompt = build_prompt(args, codec, loaded)
    context, stride = resolve_window(args, loaded)
    audio_samples = round(args.seconds * SAMPLE_RATE)
    total_frames = frames_for_samples(codec, audio_samples)
    if prompt.n_frames >= total_frames:
        raise StageError(f"the prompt already holds {prompt.n_frames} frames, --seconds {args.seconds:g} asks for "
                         f"{total_frames}: nothing to generate (raise --seconds or lower --prompt-seconds)")
    median, median_source = median_scale_for(loaded.contract, args.root, args.artist or next(iter(args.blend)))
    scales, scale_sources = chunk_scales(prompt.scales, codec.n_chunks(audio_samples), median, median_source)
    if "default 1.0" in scale_sources:
        LOG.warning("no scale for generated chunks (%s): using 1.0, the level may be off", median_source)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    threads = thread_plan(device, args.threads)
    run = Run(args=args, loaded=loaded, codec=codec, prompt=prompt, seed=seed, device=device, context=context,
              stride=stride, total_frames=total_frames, audio_samples=audio_samples, scales=scales,
              scale_sources=scale_sources, threads=threads, conditioning=conditioning)
    run.timings.update(load_s=load_seconds, prompt_s=time.perf_counter() - prompt_started)
    return run


def overlapped(run: Run) -> bool:
    """Decode while generating, unless asked not to or generation's threads already fill the cores."""
    return not run.args.decode_at_end and run.threads.overlap


def chunks_per_pass(run: Run) -> int:
    """`--decode-chunk-seconds` in codec chunks (0 = all of them)."""
    n_chunks = run.codec.n_chunks(run.audio_samples)
    if run.args.decode_chunk_seconds == 0:
        return n_chunks
    return max(1, round(run.args.decode_chunk_seconds * SAMPLE_RATE / run.codec.chunk_stride))


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


def generate(run: Run, decoder: OverlappedDecoder | None, on_frames=None,
             cancel=None) -> tuple[torch.Tensor, CollapseDetector]:
    """Generate every piece's frames `[B, N, Q]`, feeding finished frames to `decoder` as they come.

    `on_frames(done, total)` reports the frames generated so far (else a tqdm bar on stderr); `cancel`
    goes to the core.
    """
    args = run.args
    collapse = CollapseSettings(bits=args.collapse_bits, window=args.collapse_window, boost=args.boost,
                                boost_frames=args.boost_frames, max_temperature=args.max_temperature)
    sampling = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, repetition_window=args.repetition_window)
    settings = GenerationSettings(pattern=run.loaded.contract["pattern"], context_frames=run.context,
                                  stride_frames=run.stride, use_cache=not args.no_cache, num_samples=args.num_samples,
                                  engine=args.engine, cuda_graph=not args.no_cuda_graph,
                                  artist_weights=run.conditioning.weights, cfg_coef=run.conditioning.cfg_coef)
    to_generate = run.total_frames - run.prompt.n_frames
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if on_frames is None:
            on_frames = tqdm_reporter(stack, to_generate)

        def progress(final_frames: int, frames: torch.Tensor) -> None:
            on_frames(final_frames - run.prompt.n_frames, to_generate)
            if decoder is not None:
                decoder.frames_final(final_frames, frames)

        frames, detector = generate_frames(run.loaded.model, run.prompt.frames, run.total_frames, settings, sampling,
                                           collapse, run.seed, run.device, progress=progress, cancel=cancel,
                                           threads=run.threads.generate)
    run.timings["generate_s"] = time.perf_counter() - started
    LOG.info("generated %d frames x %d piece(s) in %.1f s (%.0f frames/s)", to_generate, args.num_samples,
             run.timings["generate_s"], to_generate / max(run.timings["generate_s"], 1e-9))
    return frames.cpu(), detector


def tqdm_reporter(stack: contextlib.ExitStack, total: int):
    """A tqdm bar (frames/s on stderr) entered on `stack` -> the `on_frames(done, total)` that moves it."""
    from tqdm import tqdm

    bar = stack.enter_context(tqdm(total=total, unit="frame", desc="generating", mininterval=0.5))
    return lambda done, _total: bar.update(done - bar.n)


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
                                                chunks_per_pass(run), notes))
                except (RuntimeError, ValueError) as error:  # one piece's failure must not lose the others
                    waves.append(error)
        busy = time.perf_counter() - started
    run.timings["decode_wait_s"] = time.perf_counter() - started  # wall time decoding added after generation
    run.timings["decode_s"] = busy  # time spent decoding, all pieces
    return waves


def finish_piece(run: Run, frames: torch.Tensor, wave, detector: CollapseDetector, index: int, stem: Path,
                 notes: list) -> None:
    """Write one piece's WAV, tokens, spectrogram and sidecar JSON from its frames `[1, N, Q]` and wave `[2, S]`."""
    if isinstance(wave, Exception):
        raise wave
    codec, args = run.codec, run.args
    codes = frames_to_chunk_codes(codec, frames, run.audio_samples)  # [1, Q, n_chunks*150], padded last chunk
    samples, gain_db = normalise(wave, args.target_lufs)
    write_wav(samples, stem.with_suffix(".wav"))
    token_file = TokenFile(codes=codes.to(torch.int16), scales=run.scales, num_samples=run.audio_samples,
                           bandwidth=float(run.loaded.contract["bandwidth"]), codec=codec.name,
                           source=run.prompt.source,
                           extra={"generated_by": STAGE, "prompt_frames": run.prompt.n_frames,
                                  "pattern": run.loaded.contract["pattern"]})
    save_token_file(token_file, stem.with_suffix(".th"))
    prompt_seconds = samples_for_frames(codec, run.prompt.n_frames) / SAMPLE_RATE if run.prompt.n_frames else 0.0
    write_spectrogram(samples, stem.with_suffix(".png"), stem.name, prompt_seconds)
    sidecar = describe(run, index, stem.name, detector, gain_db, notes)
    atomic_write_json(sidecar, stem.with_suffix(".json"))
    LOG.info("wrote %s.{wav,th,png,json} (%.1f s of audio, real-time factor %.2f)", stem,
             run.audio_samples / SAMPLE_RATE, sidecar["real_time_factor"])


def engine_name(args) -> str:
    return "recompute" if args.no_cache else args.engine


def describe(run: Run, index: int, name: str, detector: CollapseDetector, gain_db: float, notes: list) -> dict:
    """The sidecar JSON: every parameter, the checkpoint, seeds, collapse events, timings, codec."""
    audio_seconds = run.audio_samples / SAMPLE_RATE
    pieces = run.args.num_samples
    wall_seconds = run.timings["generate_s"] + run.timings["decode_wait_s"]  # the whole batch, audio ready
    generated = run.total_frames - run.prompt.n_frames
    return {
        "name": name, "artist": output_label(run.args), "sample_index": index, "stage": STAGE,
        "conditioning": run.conditioning.describe(run.args.model or run.args.artist, run.loaded.artists),
        "parameters": {key: (str(value) if isinstance(value, Path) else value)
                       for key, value in vars(run.args).items()},
        "checkpoint": {"path": str(run.loaded.path), "epoch": run.loaded.epoch, "step": run.loaded.step,
                       "model_args": run.loaded.model_args, "token_contract": run.loaded.contract},
        "seed": run.seed, "seeding": "one torch.Generator seeded with `seed` draws every piece of the batch",
        "device": run.device,
        "window": {"context_frames": run.context, "stride_frames": run.stride, "kv_cache": not run.args.no_cache,
                   "engine": engine_name(run.args)},
        "prompt": {"kind": run.prompt.kind, "source": run.prompt.source, "frames": run.prompt.n_frames},
        "frames": {"total": run.total_frames, "prompt": run.prompt.n_frames, "generated": generated},
        "duration_s": audio_seconds, "audio_samples": run.audio_samples, "sample_rate": SAMPLE_RATE, "channels": 2,
        "scales": [round(float(s), 6) for s in run.scales], "scale_sources": run.scale_sources,
        "loudness": {"target_lufs": run.args.target_lufs, "gain_db": round(gain_db, 3)},
        "collapse_events": [event for event in detector.events if event["sample"] == index],
        "timings": {key: round(value, 4) for key, value in run.timings.items()},
        "threads": {"generate": run.threads.generate, "decode": run.threads.decode,
                    "decode_overlapped": overlapped(run)},
        "frames_per_second": round(generated * pieces / max(run.timings["generate_s"], 1e-9), 2),
        "real_time_factor": round(audio_seconds * pieces / max(wall_seconds, 1e-9), 3),
        "codec": {"name": run.codec.name, "pretrained": run.codec.pretrained,
                  "bandwidth": float(run.loaded.contract["bandwidth"])},
        "warning": None if run.codec.pretrained else UNTRAINED_WARNING,
        "decode_notes": notes,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
