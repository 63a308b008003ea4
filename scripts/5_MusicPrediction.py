#!/usr/bin/env python3
"""Stage 5: continue (or start) a piece with a trained MusicTransformer and decode it to stereo audio.

A thin command line over the package: the options become a `GenerationRequest`
(`pipeline.request`), and `pipeline.pieces.write_pieces` does the job (find and rebuild the
checkpoint's model, build the prompt, generate with the lean KV-cache engine while a worker thread
decodes finished codec chunks, normalise, and write `<name>.{wav,th,json,png}` per piece into
`music_transformer/<artist>/`). The studio builds the same request from its JSON.

A joint model (stage 4 with several `--artist`, in `model_results/<name>/`) is picked with `--model
NAME`; `--artist A` selects its label, `--blend "A=0.7,B=0.3"` mixes labels, and `--cfg-coef F`
applies classifier-free guidance (default 3.0 for such a model). Blends go to
`music_transformer/<blend label>/`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline.cli import StageError, artist_name, make_parser, run_main, setup_logging  # noqa: E402
from pipeline.codec import load_codec  # noqa: E402
from pipeline.decoding import DecodingOutOfMemory  # noqa: E402
from pipeline.generation import ENGINES  # noqa: E402
from pipeline.pieces import write_pieces  # noqa: E402
from pipeline.request import (DTYPES, LIMITS, GenerationRefused, GenerationRequest, InvalidRequest,  # noqa: E402
                              check_blend)

LOG = logging.getLogger("pipeline.stage5")
DEFAULTS = GenerationRequest()


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("Generate music with a trained MusicTransformer and decode it to 48 kHz stereo WAV.",
                         epilog="Outputs: <root>/music_transformer/<artist or blend label>/<name>.{wav,th,json,png}.",
                         artist_required=False)
    source = parser.add_argument_group("checkpoint")
    source.add_argument("--model", type=artist_name,
                        help="model folder model_results/<model>/ (default: the --artist folder); a joint model "
                             "of several artists is named here")
    which = source.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="checkpoint file (default: best.pt, then last.pt)")
    which.add_argument("--epoch", type=LIMITS["epoch"], help="use music_transformer_ep<N>.pt")
    source.add_argument("--codec", help="codec spec for the prompt and decoding (default: the checkpoint's)")
    source.add_argument("--device", default=DEFAULTS.device, help="auto, cpu or cuda[:N]")
    source.add_argument("--threads", type=LIMITS["threads"], default=DEFAULTS.threads,
                        help="CPU threads for torch; 0 = automatic (measured, see docs/stage5.md): one thread for "
                             "generation steps on the CPU, the other cores for the overlapped decoding")
    source.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype,
                        help="precision of generation's weights: auto = on a CPU bfloat16 with AMX, else int8 "
                             "where it loads, on a GPU float32 (docs/stage5.md, 'Precision'); float32 forces full "
                             "precision; int8 is for a CPU. Sampling and decoding stay float32")
    prompt = parser.add_argument_group("prompt")
    prompt_source = prompt.add_mutually_exclusive_group()
    prompt_source.add_argument("--prompt-tokens", type=Path,
                               help="continue a .th token file (contract dict or [1,Q,T])")
    prompt_source.add_argument("--seed-tokens", type=Path, dest="deprecated_seed_tokens", help=argparse.SUPPRESS)
    prompt_source.add_argument("--prompt-audio", type=Path,
                               help="continue an audio file (encoded like the training data)")
    prompt.add_argument("--prompt-seconds", type=LIMITS["prompt_seconds"], help="use only this much of the prompt")
    length = parser.add_argument_group("length and window")
    length.add_argument("--seconds", type=LIMITS["seconds"], default=DEFAULTS.seconds,
                        help="length of each piece, prompt included")
    length.add_argument("--context-frames", type=LIMITS["context_frames"],
                        help="window in frames (default: the training context)")
    length.add_argument("--stride-frames", type=LIMITS["stride_frames"],
                        help="frames a full window moves on; it keeps context - stride (default: half the context)")
    length.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, run each lean step eagerly instead of replaying a captured CUDA graph")
    length.add_argument("--no-cpu-trace", action="store_true",
                        help="on a CPU, run each lean step eagerly instead of replaying its TorchScript trace "
                             "(the same tokens, slower at batch 1; docs/stage5.md)")
    length.add_argument("--no-copy-path", dest="copy_path", action="store_false",
                        help="sample from the model alone, without the checkpoint's fitted in-context copy path "
                             "(docs/stage4.md, 'Reusing what it just heard')")
    # developer-only reference paths (tests, benchmarks; docs/stage5.md): the same tokens, slower
    length.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    length.add_argument("--engine", choices=ENGINES, default=DEFAULTS.engine, help=argparse.SUPPRESS)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=LIMITS["temperature"], default=DEFAULTS.temperature,
                          help="sampling temperature; 0 = greedy (always the likeliest code); negative is refused")
    sampling.add_argument("--top-k", type=LIMITS["top_k"], default=DEFAULTS.top_k,
                          help="keep the k likeliest codes (0 = off); a k of 1024 or more is clamped to "
                               "the 1024 codes, i.e. off")
    sampling.add_argument("--top-p", type=LIMITS["top_p"], default=DEFAULTS.top_p,
                          help="nucleus mass in (0, 1] (1 = off)")
    sampling.add_argument("--repetition-penalty", type=LIMITS["repetition_penalty"],
                          default=DEFAULTS.repetition_penalty,
                          help=">= 1: a token seen in the recent window loses log(penalty) of logit (1 = off)")
    sampling.add_argument("--repetition-window", type=LIMITS["repetition_window"],
                          default=DEFAULTS.repetition_window, help="frames the penalty looks back")
    sampling.add_argument("--seed", type=LIMITS["seed"], help="random seed (default: drawn and recorded in the JSON)")
    sampling.add_argument("--num-samples", type=LIMITS["num_samples"], default=DEFAULTS.num_samples,
                          help="pieces generated in one batch")
    artists = parser.add_argument_group("artist conditioning (joint models)")
    artists.add_argument("--blend", type=parse_blend, metavar='"A=0.7,B=0.3"',
                         help="mix the artist embeddings of a joint model (weights >= 0, normalised to sum 1); "
                              "instead of --artist")
    artists.add_argument("--cfg-coef", type=LIMITS["cfg_coef"],
                         help="classifier-free guidance: logits = uncond + F * (cond - uncond), both halves in one "
                              "batched step (default 3.0 for a joint model; 1 = off; ignored by a one-artist model)")
    collapse = parser.add_argument_group("collapse detector")
    collapse.add_argument("--collapse-bits", type=LIMITS["collapse_bits"], default=DEFAULTS.collapse_bits,
                          help="boost when a codebook's mean entropy falls below this many bits (0 = off)")
    collapse.add_argument("--collapse-window", type=LIMITS["collapse_window"], default=DEFAULTS.collapse_window,
                          help="frames the entropy is averaged over")
    collapse.add_argument("--boost", type=LIMITS["boost"], default=DEFAULTS.boost,
                          help="temperature factor on a collapse")
    collapse.add_argument("--boost-frames", type=LIMITS["boost_frames"], default=DEFAULTS.boost_frames,
                          help="frames the boost decays over")
    collapse.add_argument("--max-temperature", type=LIMITS["max_temperature"], default=DEFAULTS.max_temperature,
                          help="cap of a boosted temperature")
    add_publishing_options(parser)
    output = parser.add_argument_group("decoding and output")
    output.add_argument("--decode-chunk-seconds", type=LIMITS["decode_chunk_seconds"],
                        default=DEFAULTS.decode_chunk_seconds,
                        help="decode this much audio a pass (0 = all at once); halves on out-of-memory")
    output.add_argument("--decode-at-end", action="store_true",
                        help="decode after generation instead of overlapping it with generation (same audio)")
    output.add_argument("--target-lufs", type=LIMITS["target_lufs"], default=DEFAULTS.target_lufs,
                        help="loudness of the WAV (peak capped at -1 dBFS)")
    output.add_argument("--name", default=DEFAULTS.name, help="output name; <name>_<i> when --num-samples > 1")
    return parser


def add_publishing_options(parser: argparse.ArgumentParser) -> None:
    publish = parser.add_argument_group("publishing: originality and loops (docs/stage5.md)")
    publish.add_argument("--loop", action="store_true",
                         help="make each piece a seamless loop: generated past --seconds, it ends near --seconds "
                              "where the model finds its start most likely, the audio after the end is crossfaded "
                              "into the start, and the WAV gets a smpl chunk with the loop points")
    publish.add_argument("--max-copy-seconds", type=LIMITS["max_copy_seconds"], metavar="S",
                         help="generate again (new seed) a piece that repeats more than S seconds of the training "
                              "tokens verbatim (needs the model's training_index.npz); off when not given")
    publish.add_argument("--max-copy-retries", type=LIMITS["max_copy_retries"], default=DEFAULTS.max_copy_retries,
                         metavar="N",
                         help="regenerations per piece before it is kept, with a warning, as it is")


def parse_blend(text: str) -> dict:
    """argparse type: "A=0.7,B=0.3" -> {"A": 0.7, "B": 0.3}; refuses negative weights and a zero sum."""
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
    try:
        return check_blend(blend)
    except InvalidRequest as error:
        raise argparse.ArgumentTypeError(error.message) from None


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The parsed options as a request (the deprecated `--seed-tokens` as `--prompt-tokens`, with a warning)."""
    values = {field.name: getattr(args, field.name) for field in fields(GenerationRequest) if hasattr(args, field.name)}
    values.update(use_cache=not args.no_cache, cuda_graph=not args.no_cuda_graph,
                  cpu_trace=not args.no_cpu_trace)
    if args.deprecated_seed_tokens is not None:
        LOG.warning("--seed-tokens is deprecated and will be removed in the next release: use --prompt-tokens")
        values["prompt_tokens"] = args.deprecated_seed_tokens
    return GenerationRequest(**values)


class ProgressBar:
    """`on_frames(done, total)` as a tqdm bar of frames/s on stderr, opened at the first report and
    closed when the last frame is done."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", desc="generating", mininterval=0.5)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "stage5")
    progress = ProgressBar()
    try:  # run_main turns SIGTERM into Ctrl-C's clean stop
        # the codec loader by this module's name: the test fixtures swap in a seeded random codec here
        report = write_pieces(request_from_args(args), on_frames=progress, codec_loader=load_codec)
    except (GenerationRefused, DecodingOutOfMemory) as error:
        raise StageError(str(error)) from None
    finally:
        progress.close()
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(run_main(main))
