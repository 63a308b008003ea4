#!/usr/bin/env python3
"""Stage 5 speed: KV-cache generation against the recompute path, and the real-time factor of `small`.

    python bench/bench_stage5.py                      # defaults below; prints the cache/recompute ratio last
    python bench/bench_stage5.py --recompute-full     # the reference path over all 1,500 frames (slow)

Both paths run the same randomly initialised model in this one process, greedy, from BOS. The
recompute path re-runs the whole history at every step, so a step's cost depends only on the
length reached; by default it is timed on a few short stretches centred in equal parts of the
1,500-frame piece (continuing the cached run's tokens, which it must reproduce) and averaged,
instead of running all 1,500 steps. The real-time factor covers generation plus decoding with the
random 48 kHz Encodec (same architecture and cost as the pretrained one).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline.codec import load_codec  # noqa: E402
from pipeline.contract import SAMPLE_RATE  # noqa: E402
from pipeline.stages import load_stage  # noqa: E402

stage4 = load_stage("4_Transformer")
stage5 = load_stage("5_MusicPrediction")


def build_model(preset: str, n_codebooks: int, context_frames: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return stage4.MusicTransformer(stage4.model_args_for(preset, n_codebooks, context_frames)).eval()


def make_engine(model, pattern: str, context: int, use_cache: bool):
    settings = stage5.GenerationSettings(pattern=pattern, context_frames=context, stride_frames=context // 2,
                                         use_cache=use_cache, num_samples=1)
    return stage5.TokenGenerator(model, settings, stage5.SamplingSettings(temperature=0.0), None, None, "cpu")


def frames_per_second(model, pattern: str, frames: int, context: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    """Greedy generation of a whole piece from BOS -> (frames/s, frames `[1, N, Q]`)."""
    engine = make_engine(model, pattern, context, use_cache)
    engine.generate(None, 8)  # warm-up: first-call allocations are not what we measure
    started = time.perf_counter()
    codes = engine.generate(None, frames)  # [1, frames, Q]
    return frames / (time.perf_counter() - started), codes


def recompute_frames_per_second_sampled(model, pattern: str, reference: torch.Tensor, context: int,
                                        segments: int, per_segment: int) -> tuple[float, bool]:
    """The recompute path's cost over a `reference`-long piece, measured on `segments` stretches of
    `per_segment` frames centred in equal parts of it (midpoint rule; each step costs one forward
    over the whole history, so its cost depends only on the length reached).

    Each stretch continues the cached run's own tokens, so its greedy output must match them.
    -> (frames/s, tokens identical).
    """
    frames = reference.shape[1]
    extra_rows = stage4.extra_steps(pattern, reference.shape[2])
    seconds_per_row, identical = [], True
    for segment in range(segments):
        start = (2 * segment + 1) * frames // (2 * segments) - per_segment // 2
        engine = make_engine(model, pattern, context, use_cache=False)
        started = time.perf_counter()
        codes = engine.generate(reference[:, :start], start + per_segment)  # [1, start+per_segment, Q]
        seconds_per_row.append((time.perf_counter() - started) / (per_segment + extra_rows))
        checked = start + per_segment - extra_rows  # a shorter piece's last Q-1 delayed frames see BOS
        identical &= torch.equal(codes[:, :checked], reference[:, :checked])
    return 1.0 / (sum(seconds_per_row) / segments), identical


class FrameClock:
    """A progress sink that records when each frame was finished."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def update(self, count: int) -> None:
        self.stamps.extend([time.perf_counter()] * count)


def per_frame_ms_over_a_long_piece(model, pattern: str, frames: int, context: int, blocks: int = 5) -> list[float]:
    """Cached generation far past the window (it slides every context/2 frames): ms per frame in each block."""
    settings = stage5.GenerationSettings(pattern=pattern, context_frames=context, stride_frames=context // 2)
    engine = stage5.TokenGenerator(model, settings, stage5.SamplingSettings(temperature=0.0), None, None, "cpu")
    clock = FrameClock()
    engine.generate(None, frames, clock)
    size = frames // blocks
    return [1000 * (clock.stamps[(b + 1) * size] - clock.stamps[b * size]) / size for b in range(blocks)]


def real_time_factor(model, pattern: str, seconds: float, context: int, codec, threads: int | None) -> dict:
    """Generation (cache, sampled) plus decoding of `seconds` of audio -> frames/s and audio s per wall s."""
    num_samples = round(seconds * SAMPLE_RATE)
    total = stage5.frames_for_samples(codec, num_samples)
    settings = stage5.GenerationSettings(pattern=pattern, context_frames=context, stride_frames=context // 2)
    detector = stage5.CollapseDetector(stage5.CollapseSettings(), 1, model.args.n_codebooks, "cpu")
    engine = stage5.TokenGenerator(model, settings, stage5.SamplingSettings(), detector,
                                   torch.Generator().manual_seed(0), "cpu")
    started = time.perf_counter()
    with stage5.cpu_threads(threads):
        frames = engine.generate(None, total)  # [1, N, Q]
    generated = time.perf_counter()
    n_chunks = codec.n_chunks(num_samples)
    codes = torch.zeros(1, n_chunks * codec.chunk_frames, frames.shape[2], dtype=torch.long)
    codes[:, :total] = frames
    stage5.decode_chunked(codec, codes.transpose(1, 2), torch.full((n_chunks,), 0.05), num_samples, 10)
    decoded = time.perf_counter()
    return {"frames": total, "generate_s": generated - started, "decode_s": decoded - generated,
            "frames_per_s": total / (decoded - started), "rtf": seconds / (decoded - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model size (4_Transformer.PRESETS)")
    parser.add_argument("--pattern", default="delay", choices=["parallel", "delay"], help="codebook pattern")
    parser.add_argument("--codebooks", type=int, default=4, help="Q (4 = 6 kbps)")
    parser.add_argument("--context-frames", type=int, default=1500, help="window (10 s)")
    parser.add_argument("--frames", type=int, default=1500, help="frames generated with the cache")
    parser.add_argument("--recompute-full", action="store_true",
                        help="run the reference path over all --frames (slow) instead of sampled stretches")
    parser.add_argument("--segments", type=int, default=4, help="stretches the reference path is timed on")
    parser.add_argument("--segment-frames", type=int, default=25, help="frames per stretch")
    parser.add_argument("--rtf-seconds", type=float, default=10.0, help="audio length for the real-time factor")
    parser.add_argument("--long-frames", type=int, default=1500, help="frames of the window-slide run")
    parser.add_argument("--long-context", type=int, default=300, help="window of the window-slide run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for everything; 0 = as the script does: one thread for cached "
                             "generation, torch's default (all cores) for the recompute path and decoding")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cached_threads = 1 if not args.threads else None  # None: leave the count as it is
    model = build_model(args.preset, args.codebooks, args.context_frames)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    threads = f"{args.threads}" if args.threads else f"1 (cached generation) / {torch.get_num_threads()} (the rest)"
    print(f"machine: {threads} CPU threads, torch {torch.__version__}; model {args.preset} "
          f"({params:.1f} M parameters), Q={args.codebooks}, {args.pattern} pattern, context {args.context_frames}")
    with torch.inference_mode():
        codec = load_codec("random:0")
        rtf = real_time_factor(model, args.pattern, args.rtf_seconds, args.context_frames, codec, cached_threads)
        print(f"real time ({args.rtf_seconds:g} s, sampled + decoded): generation {rtf['generate_s']:.2f} s, "
              f"decoding {rtf['decode_s']:.2f} s -> {rtf['frames_per_s']:.0f} frames/s, "
              f"real-time factor {rtf['rtf']:.2f} (goal >= 150 frames/s, 1.0)")
        with stage5.cpu_threads(cached_threads):
            blocks = per_frame_ms_over_a_long_piece(model, args.pattern, args.long_frames, args.long_context)
        print(f"long piece: {args.long_frames} frames through a {args.long_context}-frame window, ms per frame in "
              f"consecutive fifths: {', '.join(f'{ms:.2f}' for ms in blocks)} (flat = the slide costs nothing extra)")
        with stage5.cpu_threads(cached_threads):
            cached_fps, cached = frames_per_second(model, args.pattern, args.frames, args.context_frames, True)
        print(f"kv cache:  {args.frames} frames at {cached_fps:.1f} frames/s")
        if args.recompute_full:
            recompute_fps, recomputed = frames_per_second(model, args.pattern, args.frames, args.context_frames, False)
            identical = torch.equal(recomputed, cached)
            how = f"all {args.frames} frames"
        else:
            recompute_fps, identical = recompute_frames_per_second_sampled(
                model, args.pattern, cached, args.context_frames, args.segments, args.segment_frames)
            how = (f"estimated from {args.segments} stretches of {args.segment_frames} frames spread over the "
                   f"{args.frames}-frame piece, not a full run")
        print(f"recompute: {recompute_fps:.2f} frames/s ({how})")
        print(f"greedy tokens identical to the cached run: {identical}")
    print(f"ratio cache/recompute: {cached_fps / recompute_fps:.1f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
