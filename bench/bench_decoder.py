#!/usr/bin/env python3
"""The Encodec decoder on the CPU: transformers' decoder against the restructured one stage 5 runs.

    python bench/bench_decoder.py                    # about a minute on 2 cores
    python bench/bench_decoder.py --rounds 21 --piece-seconds 0

Everything runs in this one process on the random 48 kHz Encodec (the pretrained codec's
architecture and cost; speed does not depend on the weights), through `pipeline.codec.Codec` with
`decoder="transformers"` (the reference) and `decoder="fast"` (`pipeline.encodec_decoder`), both on
the same model. Each figure is the median of interleaved rounds (reference, fast, reference, ...),
so a change in the machine's load touches both alike; the load average is printed before and after.

1. the largest difference between the two, for a 1 s chunk (unscaled: the decoder's own output)
   and for a 10 s wave through `decode_chunked` (scaled as stage 5 scales it), against full scale 1.0;
2. a 1 s chunk (`Codec.decode_chunk`, 150 frames) on 1 thread and on 2 threads: wall time, and on 1
   thread the CPU time of the decoding thread too (what the other processes do not change as much);
3. 10 s of audio (11 chunks) decoded at the end (`decode_chunked`), 1 thread;
4. with `--piece-seconds S` (default 10): a `small` piece of S seconds generated and decoded the way
   stage 5 does it (each codec chunk decoded by a worker thread on the other core while the next
   frames are generated), with each decoder: the wall time to the audio, and the worker's time per
   chunk (decoding beside generation, in a process that has done a stage 5's work: what stage 5 pays).

The last line is the reference's time over the fast decoder's for a 1 s chunk on 1 thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import decoding, generation  # noqa: E402
from pipeline.codec import Codec, load_codec  # noqa: E402
from pipeline.contract import CODEBOOK_SIZE, SAMPLE_RATE  # noqa: E402
from pipeline.model_io import model_module  # noqa: E402
from pipeline.sampling import CollapseSettings, SamplingSettings  # noqa: E402


def load_line() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def decoders(codec) -> dict[str, Codec]:
    """The reference and the fast decoder, both on `codec`'s model (the same weights)."""
    return {name: Codec(codec.model, codec.name, codec.pretrained, decoder=name) for name in ("transformers", "fast")}


def interleaved(calls: dict, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of each call over `rounds` interleaved rounds (after one untimed round)."""
    for call in calls.values():
        call()
    seconds = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = clock()
            call()
            seconds[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def ratio_line(what: str, seconds: dict[str, float]) -> float:
    ratio = seconds["transformers"] / seconds["fast"]
    print(f"{what}: transformers {1000 * seconds['transformers']:.1f} ms, fast {1000 * seconds['fast']:.1f} ms: "
          f"{ratio:.2f}x")
    return ratio


def exactness(codecs: dict[str, Codec], chunk: torch.Tensor, wave_codes: torch.Tensor, samples: int) -> dict:
    """Largest |fast - transformers| on one unscaled chunk and on a scaled multi-chunk wave."""
    model = codecs["fast"].model
    with torch.no_grad():
        embeddings = model.quantizer.decode(chunk.unsqueeze(1))  # [Q, F] -> [1, D, F]
        reference = model.decoder(embeddings)  # [1, 2, F*hop]
    fast = codecs["fast"].fast_decoder()(embeddings)
    scales = torch.full((codecs["fast"].n_chunks(samples),), 0.1)
    waves = {name: decoding.decode_chunked(codec, wave_codes, scales, samples, 10) for name, codec in codecs.items()}
    figures = {"chunk_max_abs_diff": float((fast - reference).abs().max()),
               "chunk_peak": float(reference.abs().max()),
               "wave_max_abs_diff": float((waves["fast"] - waves["transformers"]).abs().max()),
               "wave_peak": float(waves["transformers"].abs().max())}
    print(f"1 s chunk, unscaled: max |fast - transformers| {figures['chunk_max_abs_diff']:.2e} "
          f"(peak {figures['chunk_peak']:.2f}); 10 s wave, scale 0.1: {figures['wave_max_abs_diff']:.2e} "
          f"(peak {figures['wave_peak']:.3f}); full scale 1.0, bound 1e-4")
    return figures


def chunk_timings(codecs: dict[str, Codec], chunk: torch.Tensor, rounds: int) -> float:
    """A 1 s chunk on 1 thread (wall and CPU) and 2 threads (wall); returns the 1-thread wall ratio."""
    calls = {name: (lambda codec=codec: codec.decode_chunk(chunk, 0.1)) for name, codec in codecs.items()}
    with generation.cpu_threads(2):
        two = interleaved(calls, rounds)
    with generation.cpu_threads(1):
        cpu = interleaved(calls, rounds, clock=time.thread_time)
        one = interleaved(calls, rounds)
    ratio_line("1 s chunk, 2 threads, wall", two)
    ratio_line("1 s chunk, 1 thread, CPU time of the decoding thread", cpu)
    return ratio_line("1 s chunk, 1 thread, wall", one)


def small_model() -> torch.nn.Module:
    """stage 4's `small` preset (3.7 M parameters, Q = 4, 10 s context), randomly initialised."""
    stage4 = model_module()
    torch.manual_seed(0)
    return stage4.MusicTransformer(stage4.model_args_for("small", 4, 1500)).eval()


def overlapped_piece(model, codec: Codec, seconds: float) -> dict[str, float]:
    """A sampled piece generated with each codec chunk decoded by a worker as soon as it is final (stage
    5's default) -> generation seconds, seconds after the last frame, the worker's seconds per chunk."""
    audio_samples = round(seconds * SAMPLE_RATE)
    plan = generation.thread_plan("cpu", 0)
    scales = torch.full((codec.n_chunks(audio_samples),), 0.05)
    decoder = decoding.OverlappedDecoder(codec, scales, audio_samples, 1, 10, plan.decode)
    settings = generation.GenerationSettings(pattern="delay", context_frames=1500, stride_frames=750)
    started = time.perf_counter()
    frames, _ = generation.generate_frames(model, None, decoding.frames_for_samples(codec, audio_samples), settings,
                                           SamplingSettings(), CollapseSettings(), 0, "cpu",
                                           progress=decoder.frames_final, threads=plan.generate)
    generated = time.perf_counter()
    decoder.finish(frames)
    return {"generate_s": generated - started, "tail_s": time.perf_counter() - generated,
            "chunk_s": decoder.busy_seconds / decoder.n_chunks}


def piece_timings(codecs: dict[str, Codec], seconds: float, rounds: int) -> float:
    """The overlapped piece with each decoder, interleaved; returns the ratio of the worker's time per chunk."""
    model = small_model()
    overlapped_piece(model, codecs["fast"], 1.0)  # warm-up: the engine's first window, the decoder's buffers
    runs = {name: [] for name in codecs}
    for _ in range(rounds):
        for name, codec in codecs.items():
            runs[name].append(overlapped_piece(model, codec, seconds))
    medians = {name: {key: statistics.median(run[key] for run in piece) for key in piece[0]}
               for name, piece in runs.items()}
    for name, figures in medians.items():
        wall = figures["generate_s"] + figures["tail_s"]
        print(f"{seconds:g} s `small` piece, decoding overlapped, {name}: generation {figures['generate_s']:.2f} s "
              f"+ {figures['tail_s']:.2f} s after the last frame ({seconds / wall:.2f}x real time); the worker "
              f"decoded a chunk in {1000 * figures['chunk_s']:.0f} ms")
    return ratio_line("the overlapped piece's worker, per chunk", {name: m["chunk_s"] for name, m in medians.items()})


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per figure (median)")
    parser.add_argument("--piece-seconds", type=float, default=10.0, help="the overlapped piece (0: skip it)")
    parser.add_argument("--piece-rounds", type=int, default=3, help="pieces per decoder (median)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, {load_line()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    codecs = decoders(load_codec("random:0"))
    generator = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, CODEBOOK_SIZE, (4, 150), generator=generator)  # [Q, F]: 1 s
    samples = 10 * SAMPLE_RATE
    n_chunks = codecs["fast"].n_chunks(samples)
    wave_codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, n_chunks * 150), generator=generator)  # [1, Q, T]
    figures = exactness(codecs, chunk, wave_codes, samples)
    scales = torch.full((n_chunks,), 0.1)
    at_end = {name: (lambda codec=codec: decoding.decode_chunked(codec, wave_codes, scales, samples, 10))
              for name, codec in codecs.items()}
    with generation.cpu_threads(1):
        wave_ratio = ratio_line("10 s decoded at the end, 1 thread, wall",
                                interleaved(at_end, max(3, args.rounds // 3)))
    piece_ratio = piece_timings(codecs, args.piece_seconds, args.piece_rounds) if args.piece_seconds > 0 else None
    ratio = chunk_timings(codecs, chunk, args.rounds)
    print(load_line())
    print(f"transformers / fast, 1 s chunk, 1 thread: {ratio:.2f}x")
    return {"value": round(ratio, 3), "wave_10s_ratio": round(wave_ratio, 3),
            "piece_chunk_ratio": None if piece_ratio is None else round(piece_ratio, 3),
            **{key: float(f"{value:.3g}") for key, value in figures.items()}}


if __name__ == "__main__":
    finish(main, name="decoder", unit="x (transformers' Encodec decoder / the fast one, 1 s chunk, 1 thread)")
