#!/usr/bin/env python3
"""How fast can one CPU core generate with `small` at batch 1? The frame against its kernel floor.

    python bench/bench_cpu_floor.py                  # small, Q = 4, a 10 s window, int8 (stage 5's CPU default here)
    python bench/bench_cpu_floor.py --dtype float32  # the same in full precision
    python bench/bench_cpu_floor.py --skip-compile   # leave out torch.compile (about 15-60 s of compiling)

Stage 5 on a 2-core CPU generates on one core while the other decodes (docs/stage5.md, threads),
so a 10 s piece at 5x real time leaves generation 1.33 ms a frame. In this one process, on one
torch thread, with random weights (speed does not depend on them):

- **frame**: a sampled 10 s piece through the generation core (`pipeline.generation`, the lean
  engine, stage 5's sampling defaults, the collapse detector, a copy path with an active gate);
  ms per frame.
- **kernel floor**: the same frame's kernels timed alone, back to back, with no Python between
  them: the step's matrix products (every projection of every layer, the input projection and
  the heads, in the chosen precision) on one row, attention over the mean number of cached rows,
  the layer norms and GELUs, the copy path's distribution at that length, and sampling's
  top-k / softmax / draw. What a frame costs if every other overhead (Python, dispatch,
  bookkeeping) were gone.
- **torch.compile**: the lean step with fixed shapes (`LeanDecoder.step_static`, the CUDA-graph
  step) compiled by Inductor for the CPU, against the same step eager: compile seconds and ms
  a step (float32: the int8 kernels are opaque to the compiler).

It prints the real-time factor the floor allows (150 frames are 1 s), and last the ratio of the
frame to its floor: how much of a frame is overhead that faster Python could still remove.
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
import torch.nn.functional as F

from bench_stage5 import build_model, timed_generation

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import generation  # noqa: E402
from pipeline.copying import CopyPath, copy_distribution_last  # noqa: E402
from pipeline.lean_decoder import LeanDecoder  # noqa: E402
from pipeline.precision import PRECISIONS, ReducedLinear, precision_model, projection_weight  # noqa: E402
from pipeline.sampling import SamplingSettings, sample_tokens  # noqa: E402

FRAME_RATE = 150  # codec frames per second of audio: the real-time line
GOAL_MS = 1000 / (5 * FRAME_RATE)  # a frame at 5x real time: 1.33 ms


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="stage 4's preset (default: small)")
    parser.add_argument("--codebooks", type=int, default=4, help="Q (4 = 6 kbps)")
    parser.add_argument("--context-frames", type=int, default=1500, help="the window (default: 1,500 = 10 s)")
    parser.add_argument("--dtype", default="int8", choices=list(PRECISIONS),
                        help="precision of the weights (default: int8, what --dtype auto takes on a CPU without AMX)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every timing; the best is kept")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile timing")
    return parser


def best_ms(fn, calls: int, rounds: int) -> float:
    """The best of `rounds` means of `calls` calls of `fn`, in ms (after one warm-up round)."""
    means = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append(1000 * (time.perf_counter() - started) / calls)
    return min(means[1:])


def active_copy_path(n_codebooks: int) -> dict:
    """A fitted-looking copy path (n = 4 rows, every gate 0.1) so each step pays for it as a trained model does."""
    return CopyPath(n=4, beta=1.0, gate=[0.0] + [0.1] * (4 * n_codebooks + 1)).as_record()


def frame_ms(model, args) -> float:
    """ms per frame of a sampled 10 s piece through the generation core (one thread)."""
    settings = generation.GenerationSettings(pattern="delay", context_frames=args.context_frames,
                                             stride_frames=args.context_frames // 2, precision=args.dtype,
                                             copy_path=active_copy_path(args.codebooks))
    seconds = [timed_generation(model, settings, args.context_frames, True, 1)[0] for _ in range(args.rounds)]
    return 1000 * min(seconds) / args.context_frames


def projections(model) -> list:
    """Every projection a lean step runs, as callables on one row: (name, fn)."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, ReducedLinear):
            rows.append((name, module, module.in_features))
        elif projection_weight(module) is not None:
            weight = projection_weight(module).detach().contiguous()  # [out, in]
            rows.append((name, (lambda w, b: lambda x: F.linear(x, w, b))(weight, module.bias), weight.shape[1]))
    return [(name, (lambda fn, x: lambda: fn(x))(fn, torch.randn(1, width))) for name, fn, width in rows]


def kernel_floor(model, args) -> dict:
    """ms of each kind of kernel a frame runs, timed alone on one row (see the module docstring)."""
    config = model.backbone.config
    d_model, n_head, n_layer = int(config.n_embd), int(config.n_head), int(config.n_layer)
    mean_rows = args.context_frames * 3 // 4  # a window slides by half: it holds 1/2 to 1 of the context
    q = torch.randn(1, n_head, 1, d_model // n_head)
    keys = torch.randn(1, n_head, mean_rows, d_model // n_head)  # [B, H, L, hd]
    values = torch.randn(1, n_head, mean_rows, d_model // n_head)
    row, norm = torch.randn(1, d_model), model.backbone.ln_f
    window = torch.randint(0, 64, (1, mean_rows, args.codebooks))
    logits, temperatures = torch.randn(1, args.codebooks, 1024), torch.ones(1)
    calls, rounds = 200, args.rounds
    hidden = torch.randn(1, 4 * d_model)
    norm_ms = best_ms(lambda: F.layer_norm(row, (d_model,), norm.weight, norm.bias), calls, rounds)
    gelu_ms = best_ms(lambda: F.gelu(hidden, approximate="tanh"), calls, rounds)
    parts = {"products": sum(best_ms(fn, calls, rounds) for _, fn in projections(model)),
             "attention": n_layer * best_ms(lambda: F.scaled_dot_product_attention(q, keys, values), calls, rounds),
             "norms and GELU": (2 * n_layer + 1) * norm_ms + n_layer * gelu_ms,
             "copy path": best_ms(lambda: copy_distribution_last(window, 4, 1.0), calls, rounds),
             "sampling": best_ms(lambda: sample_tokens(torch.log_softmax(logits, -1), temperatures, SamplingSettings(),
                                                       None, all_greedy=False), calls, rounds)}
    return parts


def compiled_step(model, args) -> dict:
    """Eager against torch.compile'd `step_static` (float32, fixed shapes): compile s and ms a step."""
    decoder = LeanDecoder(model, 1, args.context_frames)
    tokens = torch.full((1, 1, args.codebooks), 5, dtype=torch.long)
    position = torch.tensor([args.context_frames // 2])
    with torch.inference_mode():
        eager = best_ms(lambda: decoder.step_static(tokens, position), 100, args.rounds)
        started = time.perf_counter()
        compiled = torch.compile(decoder.step_static, dynamic=False)
        compiled(tokens, position)
        compile_s = time.perf_counter() - started
        fast = best_ms(lambda: compiled(tokens, position), 100, args.rounds)
    return {"eager_ms": eager, "compiled_ms": fast, "compile_s": compile_s}


def main() -> dict:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, one torch thread, load "
          f"average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    model = build_model(args.preset, args.codebooks, args.context_frames)
    frame = frame_ms(model, args)
    with torch.inference_mode():
        parts = kernel_floor(precision_model(model, args.dtype), args)
    floor = sum(parts.values())
    print(f"`{args.preset}`, Q = {args.codebooks}, {args.context_frames}-frame window, {args.dtype} weights, batch 1:")
    print(f"  frame through the generation core: {frame:.2f} ms ({1000 / frame:.0f} frames/s, "
          f"{1000 / frame / FRAME_RATE:.2f}x real time before decoding)")
    for name, ms in parts.items():
        print(f"  kernel floor, {name:<15} {ms:.3f} ms")
    print(f"  kernel floor, all:            {floor:.3f} ms = at most {1000 / floor / FRAME_RATE:.2f}x real time "
          f"on one core (5x needs <= {GOAL_MS:.2f} ms a frame)")
    result = {"value": round(frame / floor, 2), "frame_ms": round(frame, 3), "floor_ms": round(floor, 3),
              "floor_parts_ms": {name: round(ms, 3) for name, ms in parts.items()},
              "floor_rtf": round(1000 / floor / FRAME_RATE, 2), "dtype": args.dtype, "cpu": cpu_name(),
              "load_average_end": round(os.getloadavg()[0], 2)}
    if not args.skip_compile:
        compiled = compiled_step(model, args)
        print(f"  torch.compile of the fixed-shape step (float32): {compiled['compile_s']:.1f} s to compile, "
              f"{compiled['compiled_ms']:.2f} ms a step against {compiled['eager_ms']:.2f} ms eager "
              f"({compiled['eager_ms'] / compiled['compiled_ms']:.2f}x the speed)")
        result["compile"] = {key: round(value, 3) for key, value in compiled.items()}
    print(f"frame / kernel floor: {frame / floor:.2f}x")
    return result


if __name__ == "__main__":
    finish(main, name="cpu_floor", unit="x, a frame's time over its kernels' time (small, one core)", goal=None)
