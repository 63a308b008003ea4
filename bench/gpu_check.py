#!/usr/bin/env python3
"""Stage 5 on a CUDA GPU, in about two minutes: is the lean engine exact there, and how fast is `base`?

    python bench/gpu_check.py                # base, batch 1 and 16, fp32 and bf16, CUDA graphs on and off
    python bench/gpu_check.py --frames 750   # shorter

Prints, for the `base` preset (26 M parameters, Q = 4, delay pattern, 1,500-frame context, random
weights: speed does not depend on them):
  1. exactness on the GPU: lean logits against the training model's full forward (fp32), and greedy
     tokens of the graphed step against the eager one;
  2. frames/s generated (sampled, top-k 250, collapse detector on) per piece and summed, and the
     real-time factor of generation (150 frames = 1 s of audio), for batch 1 and 16, CUDA graph on
     and off, fp32 and bf16;
  3. a 10 s piece with decoding overlapped on the GPU (random 48 kHz Encodec, the pretrained cost):
     wall time and real-time factor including decoding.
The headline `base batch 1: N frames/s (R x real time); batch 16: M frames/s summed` comes last,
then its `RESULT {json}` line (R against the goal of 50x real time). Without a CUDA GPU it exits 77.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import Missing, finish

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import decoding, generation, sampling  # noqa: E402
from pipeline.codec import load_codec  # noqa: E402
from pipeline.contract import CODEBOOK_SIZE, SAMPLE_RATE  # noqa: E402
from pipeline.lean_decoder import LeanDecoder  # noqa: E402
from pipeline.model_io import model_module  # noqa: E402

stage4 = model_module()  # the model class and its presets
DEVICE = "cuda"


def build(preset: str, context: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = stage4.MusicTransformer(stage4.model_args_for(preset, 4, context)).eval()
    return model.to(DEVICE, dtype)


def exactness(model) -> float:
    """Max |lean - full forward| over up to 64 steps of a batch of 2 (fp32)."""
    length = min(64, int(model.args.n_positions))
    tokens = torch.randint(0, CODEBOOK_SIZE, (2, length, 4), device=DEVICE)
    with torch.inference_mode():
        full, _ = model(tokens)  # [B, T, Q, V]
        decoder = LeanDecoder(model, 2, length)
        logits = [decoder.prefill(tokens[:, :1])]
        logits += [decoder.step(tokens[:, t:t + 1]) for t in range(1, length)]
    return float((torch.stack(logits, dim=1) - full).abs().max())  # T x [B, Q, V] -> [B, T, Q, V]


def generate(model, batch: int, frames: int, context: int, cuda_graph: bool, sampled: bool = True, progress=None):
    """-> (seconds, frames `[B, N, Q]`) of one generation, timed after a warm-up run of the same engine
    (the CUDA graph is captured once, in the warm-up)."""
    settings = generation.GenerationSettings(pattern="delay", context_frames=context, stride_frames=context // 2,
                                             num_samples=batch, cuda_graph=cuda_graph)
    draw = sampling.SamplingSettings() if sampled else sampling.SamplingSettings(temperature=0.0)
    detector = sampling.CollapseDetector(sampling.CollapseSettings(bits=0.5 if sampled else 0.0), batch, 4, DEVICE)
    engine = generation.TokenGenerator(model, settings, draw, detector,
                                       torch.Generator(device=DEVICE).manual_seed(0), DEVICE)
    engine.generate(None, 16)  # warm-up: cache allocation, graph capture
    torch.cuda.synchronize()
    started = time.perf_counter()
    codes = engine.generate(None, frames, progress=progress)
    torch.cuda.synchronize()
    return time.perf_counter() - started, codes


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--frames", type=int, default=1500, help="frames generated per measurement")
    parser.add_argument("--context-frames", type=int, default=1500)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise Missing("no CUDA GPU visible: this check is for a GPU machine (bench/bench_stage5.py covers the CPU)")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    frames, context = args.frames, args.context_frames
    fp32 = build(args.preset, context, torch.float32)
    print(f"exactness: lean vs full forward, fp32, max |diff| of the logits {exactness(fp32):.2e} (CPU tests: <= 1e-4)")
    _, graphed = generate(fp32, 2, 200, context, True, sampled=False)
    _, eager = generate(fp32, 2, 200, context, False, sampled=False)
    print(f"exactness: greedy tokens, CUDA graph vs eager step, 200 frames x 2: "
          f"identical {torch.equal(graphed, eager)}")

    headline = {}
    bf16 = build(args.preset, context, torch.bfloat16)
    for dtype_name, model in (("fp32", fp32), ("bf16", bf16)):
        for batch in (1, 16):
            for cuda_graph in (True, False):
                seconds, _ = generate(model, batch, frames, context, cuda_graph)
                per_piece = frames / seconds
                print(f"{args.preset} {dtype_name} batch {batch:2d} graph {'on ' if cuda_graph else 'off'}: "
                      f"{per_piece:7.0f} frames/s per piece, {per_piece * batch:8.0f} summed, "
                      f"{per_piece / 150:5.2f}x real time per piece (step {1000 * seconds / (frames + 3):.2f} ms)")
                if cuda_graph:
                    headline[(dtype_name, batch)] = per_piece

    codec = load_codec("random:0", DEVICE)
    audio_samples = 10 * SAMPLE_RATE
    total = decoding.frames_for_samples(codec, audio_samples)
    scales = torch.full((codec.n_chunks(audio_samples),), 0.05)
    decoder = decoding.OverlappedDecoder(codec, scales, audio_samples, 1, 2)
    generate_s, codes = generate(fp32, 1, total, context, True, progress=decoder.frames_final)
    started = time.perf_counter()
    decoder.finish(codes)
    torch.cuda.synchronize()
    wall = generate_s + time.perf_counter() - started
    print(f"10 s piece, fp32, batch 1, decoding overlapped on the GPU: generation {generate_s:.2f} s, audio ready "
          f"after {wall:.2f} s -> {10 / wall:.2f}x real time including decoding")
    best = headline[("fp32", 1)]
    print(f"{args.preset} batch 1: {best:.0f} frames/s ({best / 150:.2f}x real time, fp32, CUDA graph); "
          f"batch 16: {16 * headline[('fp32', 16)]:.0f} frames/s summed (fp32), "
          f"{16 * headline[('bf16', 16)]:.0f} (bf16)")
    return {"value": round(best / 150, 2), "device": torch.cuda.get_device_name(), "preset": args.preset,
            "batch_1_frames_per_s": round(best),
            "batch_16_frames_per_s_summed_fp32": round(16 * headline[("fp32", 16)]),
            "batch_16_frames_per_s_summed_bf16": round(16 * headline[("bf16", 16)]),
            "piece_10s_x_real_time_with_decoding": round(10 / wall, 2)}


if __name__ == "__main__":
    finish(main, name="gpu_check", unit="x real time (batch 1, fp32, CUDA graph)", goal=">= 50")
