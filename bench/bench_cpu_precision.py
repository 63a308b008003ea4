#!/usr/bin/env python3
"""Generation in reduced precision on a CPU: what each precision costs in quality and gains in speed.

    python bench/bench_cpu_precision.py                                   # trains `small` on a Markov stream first
    python bench/bench_cpu_precision.py --root demo_run --model demo_night_bells   # a trained model, its held-out clips
    python bench/bench_cpu_precision.py --train-dir /tmp/markov           # keep the trained model for the next run

For float32, bfloat16 and int8 (`pipeline.precision`; stage 5's `--dtype`), in this one process:

- quality, on a trained `small` and a held-out clip: the valid NLL (bits per frame) teacher-forced
  through the lean decoder exactly as generation runs it (a prefill of the BOS row, then one step
  per row, over back-to-back windows of the training context), and its difference to float32
  (goal: at most 0.05), and how often its likeliest token is float32's in those teacher-forced
  cells; greedy generation from the clip's first second, compared with float32's tokens over the
  first 100 generated frames (all equal, or the first frame that differs: a model whose best
  tokens nearly tie, like any model of noisy tokens, parts there however small the error).
  Without `--root`/`--model`, `small` is trained first through the normal stage 4 on the order-1
  Markov stream of `pipeline.synthetic` (peaked distributions: 2 bits per codebook per frame at
  best), for `--steps` steps, and scored on its held-out clips.
- speed, on `small` (and `base`) with random weights and the 1,500-frame (10 s) context, as in
  bench_stage5.py (speed does not depend on the weights): the lean step at batch 1 on one thread
  (rounds interleaved across the precisions; the median and the best round; also the bf16 path
  before this choice existed: the model cast to bf16 with a bf16 KV cache), and a 10 s piece
  sampled with the defaults and decoded with the random Encodec, overlapped, on stage 5's thread
  plan: frames/s and the real-time factor (150 frames/s is real time).

The last line is `RESULT {json}`: the largest NLL difference of a reduced precision to float32
(goal <= 0.05), with every figure and what `--dtype auto` chooses on this machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import cpu_name, finish

import torch
import torch.nn.functional as F

from bench_stage5 import build_model, piece_with_decoding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from pipeline import generation  # noqa: E402
from pipeline.codec import load_codec  # noqa: E402
from pipeline.contract import PAD, load_token_file  # noqa: E402
from pipeline.lean_decoder import LeanDecoder  # noqa: E402
from pipeline.manifest import manifest_path, read_manifest  # noqa: E402
from pipeline.model_io import LoadedModel, load_model  # noqa: E402
from pipeline.patterns import build_sequence  # noqa: E402
from pipeline.precision import choose_precision, int8_available, precision_model  # noqa: E402
from pipeline.runs import find_checkpoint  # noqa: E402
from pipeline.sampling import SamplingSettings  # noqa: E402
from pipeline.synthetic import StreamSpec, train_on_stream  # noqa: E402

LN2 = 0.6931471805599453
FRAME_RATE = 150  # frames per second of audio: the real-time line
MARKOV_ARTIST = "synthetic_markov"  # the artist `train_on_stream` writes the Markov stream under
CAST_BF16 = "bfloat16 cast, bf16 cache (before)"  # stage 5's CPU bf16 path before `pipeline.precision`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a project root holding a trained model (with --model)")
    parser.add_argument("--model", help="the model folder under ROOT/model_results/ (its best.pt, else last.pt)")
    parser.add_argument("--train-dir", type=Path,
                        help="without --model: train the Markov `small` here, or reuse the one already there "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the Markov `small` (about)")
    parser.add_argument("--greedy-frames", type=int, default=100, help="generated frames compared with float32")
    parser.add_argument("--step-rounds", type=int, default=9, help="interleaved rounds of the step timing")
    parser.add_argument("--skip-base", action="store_true", help="leave out `base` (26 M) from the step timing")
    parser.add_argument("--skip-pieces", action="store_true", help="leave out the 10 s pieces with decoding")
    parser.add_argument("--piece-rounds", type=int, default=3, help="interleaved rounds of the 10 s pieces")
    return parser


# ==== the model and its held-out clips ===========================================================
def trained_model(args, work: Path) -> tuple[LoadedModel, list[torch.Tensor]]:
    """(the model, its held-out clips as frames long `[1, T, Q]`): the named model, else the Markov `small`."""
    if args.model:
        root, artist = args.root or Path("."), None
        loaded = load_model(find_checkpoint(root, args.model))
    else:
        root, artist = work, MARKOV_ARTIST
        checkpoint = work / "model_results" / MARKOV_ARTIST / "best.pt"
        if not checkpoint.is_file():
            started = time.perf_counter()
            result = train_on_stream(work, StreamSpec("markov"), ["--preset", "small", "--copy-path", "off"],
                                     args.steps)
            print(f"trained small on the Markov stream: {result.steps} steps in {time.perf_counter() - started:.0f} s, "
                  f"valid {result.model_bits:.2f} bits/frame (oracle {result.oracle_bits:.2f}, unigram "
                  f"{result.unigram_bits:.2f})")
        loaded = load_model(checkpoint)
    artist = artist or loaded.artists[0]
    entries = [entry for entry in read_manifest(manifest_path(root, artist), root) if entry.get("split") == "valid"]
    if not entries:
        raise SystemExit(f"{manifest_path(root, artist)} lists no valid (held-out) clip")
    clips = [load_token_file(entry["path"]).codes[:, :, :int(entry["frames"])].long().transpose(1, 2)
             for entry in entries]  # [1, Q, T] -> [1, T, Q]
    print(f"model {loaded.path} ({loaded.model_args['d_model']}-wide, {loaded.model_args['n_layer']} layers, "
          f"context {loaded.max_context_frames}, {loaded.pattern}); {len(clips)} held-out clip(s) of {artist}")
    return loaded, clips


def artist_rows(loaded: LoadedModel, batch: int) -> torch.Tensor | None:
    """A joint model plays its first artist; a one-artist model has no labels."""
    if loaded.n_artists == 0:
        return None
    weights = generation.label_weights(0, loaded.n_artists)
    return torch.tensor(weights).expand(batch, -1)  # [n+1] -> [B, n+1]


# ==== quality ===================================================================================
@torch.inference_mode()
def lean_nll_bits(loaded: LoadedModel, clips: list[torch.Tensor], precision: str) -> tuple[float, torch.Tensor]:
    """(bits per frame, the likeliest token of every real cell `[N]`) of the clips' back-to-back windows,
    teacher-forced through the lean decoder in `precision`."""
    context = loaded.max_context_frames
    windows = [clip[:, start:start + context] for clip in clips
               for start in range(0, clip.shape[1] - context + 1, context)]
    frames = torch.cat(windows)  # W x [1, C, Q] -> [W, C, Q]
    inputs, targets = build_sequence(frames, loaded.pattern)  # [W, S, Q] each
    model = precision_model(loaded.model, precision)
    decoder = LeanDecoder(model, inputs.shape[0], inputs.shape[1], artist_rows(loaded, inputs.shape[0]))
    logits = [decoder.prefill(inputs[:, :1])]  # the BOS row predicts row 0
    for row in range(1, inputs.shape[1]):
        logits.append(decoder.step(inputs[:, row:row + 1]))  # [W, Q, V] each
    stacked = torch.stack(logits, dim=1).float()  # [W, S, Q, V]
    nll = F.cross_entropy(stacked.flatten(0, 2), targets.flatten(), ignore_index=PAD, reduction="sum")
    likeliest = stacked.argmax(dim=-1)[targets != PAD]  # [W, S, Q] -> [N] real cells
    return float(nll) / LN2 / frames.shape[0] / frames.shape[1], likeliest


def greedy_frames(loaded: LoadedModel, clip: torch.Tensor, frames: int, precision: str) -> torch.Tensor:
    """Greedy generation from the clip's first second -> the `frames` generated frames `[1, frames, Q]`."""
    prompt = clip[:, :FRAME_RATE]  # [1, 150, Q]
    context = loaded.max_context_frames
    weights = None if loaded.n_artists == 0 else generation.label_weights(0, loaded.n_artists)
    settings = generation.GenerationSettings(pattern=loaded.pattern, context_frames=context,
                                             stride_frames=context // 2, precision=precision,
                                             artist_weights=weights)
    total = prompt.shape[1] + frames + loaded.n_codebooks  # a few more: the piece's last delayed frames see BOS
    codes, _ = generation.generate_frames(loaded.model, prompt, total, settings, SamplingSettings(temperature=0.0),
                                          None, 0, "cpu", threads=1)
    return codes[:, prompt.shape[1]:prompt.shape[1] + frames]


def first_difference(frames: torch.Tensor, reference: torch.Tensor) -> int | None:
    """The first frame `[1, N, Q]` where any codebook differs, or None when all N are equal."""
    differs = (frames != reference).any(dim=-1)[0]  # [N]
    return int(torch.nonzero(differs)[0]) if bool(differs.any()) else None


def quality(loaded: LoadedModel, clips: list[torch.Tensor], precisions: list[str], greedy: int) -> dict:
    """{precision: {nll_bits, nll_delta_bits, top1_agreement, greedy_first_difference}} against float32."""
    figures, reference = {}, None
    for precision in precisions:
        started = time.perf_counter()
        nll, likeliest = lean_nll_bits(loaded, clips, precision)
        frames = greedy_frames(loaded, clips[0], greedy, precision)
        reference = reference or (nll, likeliest, frames)  # float32 comes first
        agreement = float((likeliest == reference[1]).float().mean())
        differs = first_difference(frames, reference[2])
        figures[precision] = {"nll_bits": round(nll, 4), "nll_delta_bits": round(nll - reference[0], 4),
                              "top1_agreement": round(agreement, 5), "greedy_first_difference": differs}
        match = f"all {greedy} equal" if differs is None else f"first difference at generated frame {differs}"
        print(f"quality {precision}: valid NLL {nll:.4f} bits/frame ({nll - reference[0]:+.4f} against float32, "
              f"goal within 0.05); teacher-forced likeliest token as float32's in {100 * agreement:.2f} % of the "
              f"cells; greedy tokens against float32: {match} ({time.perf_counter() - started:.0f} s)")
    return figures


# ==== speed =====================================================================================
@torch.inference_mode()
def step_ms(models: dict, rounds: int, position: int = 750, steps: int = 40) -> dict:
    """{label: (median, best) ms of one lean step at batch 1 and `position`}, rounds interleaved;
    `models` maps a label to (model, KV cache dtype or None for the decoder's default)."""
    row = torch.randint(0, 1024, (1, 1, 4), generator=torch.Generator().manual_seed(0))  # [1, 1, Q]
    decoders = {}
    with generation.cpu_threads(1):
        for label, (model, cache_dtype) in models.items():
            decoders[label] = LeanDecoder(model, 1, position + steps + 1, cache_dtype=cache_dtype)
            decoders[label].prefill(torch.zeros(1, position, 4, dtype=torch.long))
        times = {label: [] for label in models}
        for _ in range(rounds):
            for label, decoder in decoders.items():
                decoder.length = position
                started = time.perf_counter()
                for _ in range(steps):
                    decoder.step(row)
                times[label].append(1000 * (time.perf_counter() - started) / steps)
    return {label: (statistics.median(values), min(values)) for label, values in times.items()}


def step_variants(model, precisions: list[str]) -> dict:
    """Each precision's copy with the decoder's default cache, and the bf16 path before `pipeline.precision`
    (the model cast to bf16, unpacked weights, a bf16 KV cache)."""
    variants = {precision: (precision_model(model, precision), None) for precision in precisions}
    variants[CAST_BF16] = (copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
    return variants


def speed(args, precisions: list[str]) -> dict:
    """Step times of `small` (and `base`) and a 10 s `small` piece with decoding, per precision."""
    figures = {precision: {} for precision in precisions}
    for preset in ("small",) if args.skip_base else ("small", "base"):
        timed = step_ms(step_variants(build_model(preset, 4, 1500), precisions), args.step_rounds)
        reference = timed["float32"][0]
        for label, (median, best) in timed.items():
            figures.setdefault(label, {})[f"{preset}_step_ms"] = round(median, 3)
            figures[label][f"{preset}_step_vs_float32"] = round(reference / median, 2)
            print(f"speed {preset} {label}: lean step {median:.2f} ms (median of {args.step_rounds} rounds, best "
                  f"{best:.2f}) at position 750, batch 1, 1 thread: {reference / median:.2f}x float32")
    if not args.skip_pieces:
        for precision, piece in pieces(precisions, args.piece_rounds).items():
            figures[precision].update(piece_frames_per_s=round(piece["frames_per_s"], 1),
                                      piece_x_real_time=round(piece["rtf"], 2))
            print(f"speed small {precision}: 10 s piece, sampled, decoded overlapped: generation "
                  f"{piece['generate_s']:.2f} s + decoding tail {piece['tail_s']:.2f} s -> "
                  f"{piece['frames_per_s']:.0f} frames/s, {piece['rtf']:.2f}x real time (best of "
                  f"{args.piece_rounds} interleaved rounds; goal >= 5x)")
    return figures


def pieces(precisions: list[str], rounds: int) -> dict:
    """{precision: the fastest of `rounds` 10 s `small` pieces with overlapped decoding}, rounds interleaved
    (on a shared machine the best round is the one least disturbed)."""
    small, codec = build_model("small", 4, 1500), load_codec("random:0")
    runs = {precision: [] for precision in precisions}
    for _ in range(rounds):
        for precision in precisions:
            runs[precision].append(piece_with_decoding(small, codec, "delay", 1500, 10.0, overlapped=True,
                                                       precision=precision))
    return {precision: max(timed, key=lambda run: run["rtf"]) for precision, timed in runs.items()}


# ==== the run ===================================================================================
def main() -> dict:
    args = build_parser().parse_args()
    if args.root and not args.model:
        raise SystemExit("--root needs --model (the trained model's folder under ROOT/model_results/)")
    auto = choose_precision("auto", "cpu")
    print(f"machine: {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; --dtype auto chooses "
          f"{auto.used} here ({auto.reason})")
    precisions = ["float32", "bfloat16"] + (["int8"] if int8_available() else [])
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as scratch:
        work = args.train_dir or Path(scratch)
        loaded, clips = trained_model(args, work)
        judged = quality(loaded, clips, precisions, args.greedy_frames)
    timed = speed(args, precisions)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    worst = max(abs(judged[precision]["nll_delta_bits"]) for precision in precisions if precision != "float32")
    figures = {label: {**judged.get(label, {}), **timed[label]} for label in timed}
    print(f"largest valid-NLL difference to float32: {worst:.4f} bits/frame (goal <= 0.05)")
    return {"value": round(worst, 4), "auto": auto.used, "model": str(loaded.path), "cpu": cpu_name(),
            "precisions": figures}


if __name__ == "__main__":
    finish(main, name="cpu_precision", unit="bits/frame, largest valid-NLL difference to float32", goal="<= 0.05")
