#!/usr/bin/env python3
"""Stage 5 speed: the lean engine against transformers' cache and the original's full recompute,
batches, overlapped decoding, threads per phase, and `base` against its memory-bandwidth bound.

    python bench/bench_stage5.py                       # every speed goal; last line engine/recompute
    python bench/bench_stage5.py --recompute-full      # the original's path over all 1,500 frames (slow)
    python bench/bench_stage5.py --long-seconds 30     # a shorter "long piece" for a quick run

The 10 s piece runs in stage 5's default precision on this machine (`--dtype auto`), every other
figure in float32. Everything runs in this one process on randomly initialised models (speed does
not depend on the weights) and the random 48 kHz Encodec (the pretrained codec's architecture and cost), through
the generation core stage 5 itself calls (`pipeline.generation`). Each ratio compares two figures
measured in this run. The recompute path re-runs the whole history every step, so by default it
is timed on a few short stretches centred in equal parts of the piece (continuing the cached run's
tokens, which it must reproduce) and averaged; `--recompute-full` runs all the steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import decoding, generation  # noqa: E402
from pipeline.codec import load_codec  # noqa: E402
from pipeline.contract import SAMPLE_RATE  # noqa: E402
from pipeline.model_io import model_module  # noqa: E402
from pipeline.patterns import extra_steps  # noqa: E402
from pipeline.precision import choose_precision  # noqa: E402
from pipeline.sampling import CollapseSettings, SamplingSettings  # noqa: E402

stage4 = model_module()  # the model class and its presets
FRAME_RATE = 150  # codec frames per second of audio (the real-time line)


def build_model(preset: str, n_codebooks: int, context_frames: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return stage4.MusicTransformer(stage4.model_args_for(preset, n_codebooks, context_frames)).eval()


def settings_for(pattern: str, context: int, batch: int = 1, engine: str = "lean", use_cache: bool = True,
                 precision: str = "float32"):
    return generation.GenerationSettings(pattern=pattern, context_frames=context, stride_frames=context // 2,
                                         use_cache=use_cache, num_samples=batch, engine=engine, precision=precision)


def timed_generation(model, settings, frames: int, sampled: bool, threads: int | None, prompt=None, progress=None):
    """-> (seconds, frames `[B, N, Q]`) of one `generate_frames` call (after a short warm-up)."""
    sampling = SamplingSettings() if sampled else SamplingSettings(temperature=0.0)
    collapse = CollapseSettings() if sampled else None
    generation.generate_frames(model, None, 8, settings, sampling, collapse, 0, "cpu", threads=threads)
    started = time.perf_counter()
    codes, _ = generation.generate_frames(model, prompt, frames, settings, sampling, collapse, 0, "cpu",
                                          progress=progress, threads=threads)
    return time.perf_counter() - started, codes


def recompute_sampled_fps(model, pattern: str, reference: torch.Tensor, context: int, segments: int,
                          per_segment: int, threads: int | None) -> tuple[float, bool]:
    """The seed's recompute path timed on `segments` stretches of `per_segment` frames centred in equal
    parts of the `reference` piece (midpoint rule; a step's cost depends only on the length reached).
    Each stretch continues the cached run's own tokens, so its greedy output must match them."""
    frames = reference.shape[1]
    extra_rows = extra_steps(pattern, reference.shape[2])
    seconds_per_row, identical = [], True
    for segment in range(segments):
        start = (2 * segment + 1) * frames // (2 * segments) - per_segment // 2
        settings = settings_for(pattern, context, use_cache=False)
        seconds, codes = timed_generation(model, settings, start + per_segment, False, threads,
                                          prompt=reference[:, :start])
        seconds_per_row.append(seconds / (per_segment + extra_rows))
        checked = start + per_segment - extra_rows  # a shorter piece's last Q-1 delayed frames see BOS
        identical &= torch.equal(codes[:, :checked], reference[:, :checked])
    return 1.0 / (sum(seconds_per_row) / segments), identical


def read_bandwidth_gb_s(gigabytes: float = 1.5, repeats: int = 3) -> float:
    """Memory read bandwidth on one thread: summing a buffer larger than the caches (1.5 GB; the build
    machine's L3 holds 480 MB), best of three."""
    buffer = torch.ones(int(gigabytes * 1e9 / 4))
    with generation.cpu_threads(1):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def step_bytes(model, batch: int, mean_position: float) -> float:
    """Bytes one cached step must read: every weight except the position table (one row of it), and the
    KV cache up to the mean position of a window."""
    table = model.backbone.wpe.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - table.numel() * table.element_size()
    weights += table.shape[1] * table.element_size()
    args = model.args
    cache = 2 * args.n_layer * batch * mean_position * args.d_model * table.element_size()
    return weights + cache


def lean_step_ms(model, batch: int, threads: int, steps: int = 150) -> float:
    """ms of one lean step at positions 1..steps (model only, no sampling)."""
    from pipeline.lean_decoder import LeanDecoder

    tokens = torch.zeros(batch, 1, model.args.n_codebooks, dtype=torch.long)
    with torch.inference_mode(), generation.cpu_threads(threads):
        decoder = LeanDecoder(model, batch, steps + 2)
        decoder.prefill(tokens)
        for _ in range(10):
            decoder.step(tokens)
        decoder.prefill(tokens)
        started = time.perf_counter()
        for _ in range(steps):
            decoder.step(tokens)
    return 1000 * (time.perf_counter() - started) / steps


def decode_chunk_ms(codec, threads: int) -> float:
    codes = torch.randint(0, 1024, (4, codec.chunk_frames))
    with torch.inference_mode(), generation.cpu_threads(threads):
        codec.decode_chunk(codes, 0.05)
        started = time.perf_counter()
        codec.decode_chunk(codes, 0.05)
    return 1000 * (time.perf_counter() - started)


def piece_with_decoding(model, codec, pattern: str, context: int, seconds: float, overlapped: bool,
                        batch: int = 1, precision: str = "float32") -> dict:
    """A sampled piece decoded to audio the way stage 5 does it (generation in `precision`) -> timings and frames/s."""
    audio_samples = round(seconds * SAMPLE_RATE)
    total = decoding.frames_for_samples(codec, audio_samples)
    plan = generation.thread_plan("cpu", 0)
    scales = torch.full((codec.n_chunks(audio_samples),), 0.05)
    chunks_per_pass = 10  # stage 5's default --decode-chunk-seconds
    decoder = (decoding.OverlappedDecoder(codec, scales, audio_samples, batch, chunks_per_pass, plan.decode)
               if overlapped else None)
    progress = None if decoder is None else decoder.frames_final
    generate_s, frames = timed_generation(model, settings_for(pattern, context, batch, precision=precision), total,
                                          True, plan.generate, progress=progress)
    started = time.perf_counter()
    if decoder is not None:
        decoder.finish(frames)
    else:
        with generation.cpu_threads(plan.decode):
            for piece in range(batch):
                codes = decoding.frames_to_chunk_codes(codec, frames[piece:piece + 1], audio_samples)
                decoding.decode_chunked(codec, codes, scales, audio_samples, chunks_per_pass)
    tail_s = time.perf_counter() - started
    wall = generate_s + tail_s
    return {"frames": total, "generate_s": generate_s, "tail_s": tail_s, "wall_s": wall,
            "frames_per_s": total * batch / wall, "rtf": seconds * batch / wall}


def machine_line() -> str:
    return (f"machine: {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads by default, load average {os.getloadavg()[0]:.1f}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="delay", choices=["parallel", "delay"], help="codebook pattern")
    parser.add_argument("--codebooks", type=int, default=4, help="Q (4 = 6 kbps)")
    parser.add_argument("--context-frames", type=int, default=1500, help="window (10 s)")
    parser.add_argument("--frames", type=int, default=1500, help="frames of the engine comparisons")
    parser.add_argument("--recompute-full", action="store_true", help="the original's path over all --frames (slow)")
    parser.add_argument("--segments", type=int, default=4, help="stretches the recompute path is timed on")
    parser.add_argument("--segment-frames", type=int, default=25, help="frames per stretch")
    parser.add_argument("--batch", type=int, default=8, help="the batch compared with batch 1")
    parser.add_argument("--long-seconds", type=float, default=120.0, help="the long piece of the overlap goal")
    parser.add_argument("--skip-base", action="store_true", help="leave out the `base` preset (26 M)")
    return parser


def report_threads(small, base, codec) -> None:
    """Threads per phase, measured: a lean step and a decoded chunk on 1 and 2 threads."""
    for name, model in (("small", small), ("base", base)):
        if model is not None:
            one, two = lean_step_ms(model, 1, 1), lean_step_ms(model, 1, 2)
            print(f"threads: {name} lean step (batch 1, positions 1-150) {one:.2f} ms on 1 thread, "
                  f"{two:.2f} ms on 2 threads")
    print(f"threads: decoding one codec chunk (1 s) {decode_chunk_ms(codec, 1):.0f} ms on 1 thread, "
          f"{decode_chunk_ms(codec, 2):.0f} ms on 2 threads")


def small_piece_goal(small, codec, pattern: str, context: int) -> dict:
    """A 10 s `small` piece including decoding, overlapped and at the end, in stage 5's default precision."""
    default = choose_precision("auto", "cpu").used  # stage 5's default precision on this machine
    overlapped = piece_with_decoding(small, codec, pattern, context, 10.0, overlapped=True, precision=default)
    at_end = piece_with_decoding(small, codec, pattern, context, 10.0, overlapped=False, precision=default)
    print(f"small, 10 s piece incl. decoding (generation in {default}, stage 5's --dtype auto here; float32 and "
          "the others: bench_cpu_precision.py), overlapped: generation "
          f"{overlapped['generate_s']:.2f} s + decoding "
          f"tail {overlapped['tail_s']:.2f} s -> {overlapped['frames_per_s']:.0f} frames/s, "
          f"{overlapped['rtf']:.2f}x real time (goal >= 5x, 750 frames/s); decoding at the end: "
          f"{at_end['generate_s']:.2f} s + {at_end['tail_s']:.2f} s -> {at_end['rtf']:.2f}x")
    return overlapped


def engine_goals(args, small, base, codec) -> dict:
    """The engine's goals against transformers' cache, batches, a 10 s piece, base and a long piece."""
    pattern, context, frames = args.pattern, args.context_frames, args.frames
    bandwidth = read_bandwidth_gb_s()
    rows = frames + extra_steps(pattern, args.codebooks)  # steps of one piece

    def against_bound(model, batch: int, seconds: float) -> str:
        step_ms = 1000 * seconds / rows
        bound_ms = 1000 * step_bytes(model, batch, frames / 2) / (bandwidth * 1e9)
        megabytes = step_bytes(model, batch, frames / 2) / 1e6
        return (f"step {step_ms:.2f} ms, {step_ms / bound_ms:.2f}x the {bound_ms:.2f} ms it takes to read "
                f"{megabytes:.0f} MB of weights and mean KV cache at {bandwidth:.1f} GB/s (1 thread, measured)")

    # goal: lean vs transformers' cache, same threads
    lean_s, _ = timed_generation(small, settings_for(pattern, context), frames, True, 1)
    hf_s, _ = timed_generation(small, settings_for(pattern, context, engine="transformers"), frames, True, 1)
    print(f"lean vs transformers cache (small, batch 1, sampled, 1 thread, {frames} frames): "
          f"{frames / lean_s:.0f} vs {frames / hf_s:.0f} frames/s: {hf_s / lean_s:.2f}x (goal >= 3x); lean "
          f"{against_bound(small, 1, lean_s)}")

    # goal: batch 8 vs batch 1, frames/s per piece summed
    batch_s, _ = timed_generation(small, settings_for(pattern, context, args.batch), frames, True, 1)
    print(f"batch {args.batch} vs batch 1 (small, sampled, 1 thread): {args.batch * frames / batch_s:.0f} vs "
          f"{frames / lean_s:.0f} frames/s summed over the pieces: {args.batch * lean_s / batch_s:.2f}x (goal >= 4x); "
          f"batch {args.batch} {against_bound(small, args.batch, batch_s)}")

    overlapped = small_piece_goal(small, codec, pattern, context)  # goal: small on 2 cores, 10 s with decoding

    # goal: base on 2 cores, batch 1, against the memory-bandwidth bound
    if base is not None:
        base_s, _ = timed_generation(base, settings_for(pattern, context), frames, True, 1)
        print(f"base (26 M), batch 1, sampled, 1 thread: {frames / base_s:.0f} frames/s = "
              f"{frames / base_s / FRAME_RATE:.2f}x real time (goal >= 1x); {against_bound(base, 1, base_s)} "
              f"(goal <= 2x the bound)")
        cores = os.cpu_count() or 1
        if cores > 1:
            all_cores_s, _ = timed_generation(base, settings_for(pattern, context), frames, True, cores)
            print(f"base, batch 1, sampled, {cores} threads (--threads {cores}): {frames / all_cores_s:.0f} frames/s = "
                  f"{frames / all_cores_s / FRAME_RATE:.2f}x real time")

    # goal: long piece, overlapped decoding against generation alone
    audio_samples = round(args.long_seconds * SAMPLE_RATE)
    long_frames = decoding.frames_for_samples(codec, audio_samples)
    alone_s, _ = timed_generation(small, settings_for(pattern, context), long_frames, True, 1)
    long = piece_with_decoding(small, codec, pattern, context, args.long_seconds, overlapped=True)
    print(f"{args.long_seconds:g} s piece (small, {long_frames} frames): generation alone {alone_s:.1f} s, with "
          f"overlapped decoding {long['wall_s']:.1f} s (decoding tail {long['tail_s']:.1f} s): "
          f"{long['wall_s'] / alone_s:.2f}x (goal <= 1.15x)")
    return {"lean_vs_transformers_cache": round(hf_s / lean_s, 2),
            f"batch_{args.batch}_vs_batch_1": round(args.batch * lean_s / batch_s, 2),
            "small_10s_piece_x_real_time": round(overlapped["rtf"], 2),
            "long_piece_overlapped_vs_alone": round(long["wall_s"] / alone_s, 3)}


def recompute_goal(args, small) -> dict:
    """Lean against the original's full recompute, default threads for both; greedy tokens compared."""
    pattern, context, frames = args.pattern, args.context_frames, args.frames
    plan = generation.thread_plan("cpu", 0)
    lean_default_s, cached = timed_generation(small, settings_for(pattern, context), frames, False, plan.generate)
    if args.recompute_full:
        recompute_s, recomputed = timed_generation(small, settings_for(pattern, context, use_cache=False), frames,
                                                   False, None)
        recompute_fps, identical = frames / recompute_s, torch.equal(recomputed, cached)
        how = f"all {frames} frames"
    else:
        recompute_fps, identical = recompute_sampled_fps(small, pattern, cached, context, args.segments,
                                                         args.segment_frames, None)
        how = f"{args.segments} stretches of {args.segment_frames} frames spread over the {frames}-frame piece"
    print(f"recompute (the original's path, {torch.get_num_threads()} threads, {how}): {recompute_fps:.2f} frames/s; "
          f"lean engine ({plan.generate} thread, greedy): {frames / lean_default_s:.0f} frames/s; greedy tokens "
          f"identical: {identical}")
    one_thread_fps, _ = recompute_sampled_fps(small, pattern, cached, context, args.segments, args.segment_frames, 1)
    print(f"with equal threads (recompute on 1 thread too): {one_thread_fps:.2f} frames/s, "
          f"engine/recompute {frames / lean_default_s / one_thread_fps:.1f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"engine/recompute: {frames / lean_default_s / recompute_fps:.1f}x (goal >= 50x)")
    return {"value": round(frames / lean_default_s / recompute_fps, 2), "greedy_tokens_identical": identical}


def main() -> dict:
    args = build_parser().parse_args()
    print(machine_line())
    small = build_model("small", args.codebooks, args.context_frames)
    base = None if args.skip_base else build_model("base", args.codebooks, args.context_frames)
    codec = load_codec("random:0")
    report_threads(small, base, codec)
    goals = engine_goals(args, small, base, codec)
    return {**recompute_goal(args, small), **goals}

if __name__ == "__main__":
    finish(main, name="stage5", unit="x the frames/s of the full recompute (engine / recompute)", goal=">= 50")
