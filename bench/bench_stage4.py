#!/usr/bin/env python3
"""Stage 4 benchmark: training frames/s, model FLOPs per frame and MFU, engine vs the original's set-up.

    python bench/bench_stage4.py                      # tiny and small on this machine, then the comparison
    python bench/bench_stage4.py --device cuda --presets base --compile --batch-size 16

The engine (one int16 array in memory, SDPA attention, bf16 autocast on a GPU) is compared, in the
same process and on the same synthetic tokens, with the original's set-up: fp32, every `.th` file
re-read with `torch.load` for each sample, eager attention. The ratio is printed last, then its
`RESULT {json}` line; `--device cuda` without a GPU exits 77 (skipped).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# first: its SIGTERM handler gives a RESULT line even during the slow imports below
from _result import finish, require_cuda

import numpy as np
import torch


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from pipeline.contract import PAD, TokenFile, save_token_file  # noqa: E402
from pipeline.dist import DistInfo  # noqa: E402
from pipeline.model_io import model_module  # noqa: E402
from pipeline.patterns import build_sequence  # noqa: E402
from pipeline.train_data import load_dataset, read_training_manifest  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402
from pipeline.training import StopRequest  # noqa: E402

stage4 = model_module()  # the model, its presets and the training options' defaults
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16


def make_data(root: Path, clips: int, frames: int, q: int) -> list[dict]:
    """Random tokens in the contract's `.th` layout and the matching manifest."""
    generator = torch.Generator().manual_seed(0)
    lines = []
    for index in range(clips):
        codes = torch.randint(0, 1024, (1, q, frames), generator=generator, dtype=torch.int16)
        rel = f"encoded_tokens/bench/clip_{index}.th"
        save_token_file(TokenFile(codes=codes, scales=torch.ones(frames // 150), num_samples=frames * 320,
                                  bandwidth={2: 3.0, 4: 6.0, 8: 12.0, 16: 24.0}[q], codec="random:0"), root / rel)
        lines.append({"audio": rel, "duration": frames / 150, "sample_rate": 48000, "codebooks": q,
                      "bandwidth": {2: 3.0, 4: 6.0, 8: 12.0, 16: 24.0}[q], "split": "train"})
    (root / "metadata_clean_bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_training_manifest(root, "bench")


def flops_per_frame(model_args, context: int) -> tuple[float, int]:
    """nanoGPT's estimate: 6N (forward + backward of every weight) + 12 * layers * heads * head_dim * context."""
    model = stage4.MusicTransformer(model_args)
    n_params = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name and "wte" not in name)
    head_dim = model_args.d_model // model_args.n_head
    return 6 * n_params + 12 * model_args.n_layer * model_args.n_head * head_dim * context, n_params


def train_args(options, preset: str) -> dict:
    return {**stage4.TRAIN_DEFAULTS, "preset": preset, "lr": stage4.PRESET_LR[preset], "context_frames": options.context_frames,
            "batch_size": options.batch_size, "epochs": 1, "compile": options.compile, "device": options.device}


def engine_step(options, data, preset: str, device: str):
    """The engine's own micro-step + optimizer step (its defaults: SDPA, AMP on GPU, frame dropout)."""
    args = train_args(options, preset)
    model_args = stage4.model_args_for(preset, data.store.n_codebooks, options.context_frames)
    model = stage4.new_model(model_args, args["seed"])
    trainer = Trainer(args, model, data, Path(tempfile.mkdtemp()), "bench", DistInfo(), device)
    batches = trainer.epoch_batches(0)
    totals, stop = trainer.new_totals(), StopRequest()

    def step(index: int):
        trainer.micro_step(batches[index % len(batches)], 0, index, 1, True, totals)
        trainer.optimizer_step(totals.loss, stop, 0)

    return step


def original_step(options, entries, preset: str, device: str):
    """The original's set-up: fp32, torch.load of a `.th` for every sample, eager attention."""
    q = int(entries[0]["codebooks"])
    context, batch = options.context_frames, options.batch_size
    torch.manual_seed(0)
    model = stage4.MusicTransformer(stage4.model_args_for(preset, q, context)).to(device)
    model.backbone.set_attn_implementation("eager")
    model.backbone.wte.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    rng = np.random.default_rng(0)

    def sample() -> torch.Tensor:
        entry = entries[rng.integers(len(entries))]
        codes = torch.load(entry["path"], map_location="cpu", weights_only=True)["codes"][0].T  # [T, Q]
        start = rng.integers(0, codes.shape[0] - context + 1)
        return codes[start:start + context].long()  # [C, Q]

    def step(_index: int):
        frames = torch.stack([sample() for _ in range(batch)]).to(device)  # B x [C, Q] -> [B, C, Q]
        inputs, targets = build_sequence(frames, "parallel")
        logits, _ = model(inputs)  # [B, C, Q] -> [B, C, Q, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=PAD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def frames_per_second(steps: list, options, device: str, rounds: int = 1) -> list[float]:
    """Best-of-`rounds` frames/s of each step function, the rounds interleaved so that a busy machine
    slows every contender alike."""
    frames = options.context_frames * options.batch_size
    best = [0.0] * len(steps)
    for index, step in enumerate(steps):
        for warm in range(options.warmup):
            step(warm)
    for _ in range(rounds):
        for index, step in enumerate(steps):
            synchronize(device)
            start = time.perf_counter()
            for count in range(options.steps):
                step(options.warmup + count)
            synchronize(device)
            best[index] = max(best[index], frames * options.steps / (time.perf_counter() - start))
    return best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets to time")
    parser.add_argument("--compare-preset", default="small", help="preset of the engine-vs-original comparison")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--context-frames", type=int, default=1500, help="frames per training window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the comparison (best kept)")
    parser.add_argument("--clips", type=int, default=8, help="synthetic 60 s clips")
    parser.add_argument("--codebooks", type=int, default=4, help="Q (4 = 6 kbps)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    options = parser.parse_args()
    device = "cuda" if options.device == "auto" and torch.cuda.is_available() else options.device
    device = "cpu" if device == "auto" else device
    require_cuda(device)
    throughput = {}
    peak = peak_flops(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, context {options.context_frames}, "
          f"batch {options.batch_size}, Q {options.codebooks}")
    with tempfile.TemporaryDirectory() as folder:
        entries = make_data(Path(folder), options.clips, 9000, options.codebooks)
        data = load_dataset(entries)
        for preset in options.presets.split(","):
            model_args = stage4.model_args_for(preset, options.codebooks, options.context_frames)
            flops, n_params = flops_per_frame(model_args, options.context_frames)
            [fps] = frames_per_second([engine_step(options, data, preset, device)], options, device)
            mfu = f"{100 * flops * fps / peak:.1f}%" if peak else "n/a (no GPU peak known)"
            throughput[preset] = round(fps)
            print(f"{preset:>6}: {n_params / 1e6:6.2f} M params, {flops / 1e6:8.1f} MFLOP/frame, "
                  f"{fps:9.0f} frames/s, {flops * fps / 1e12:7.3f} TFLOP/s, MFU {mfu}")
        preset = options.compare_preset
        original, engine = frames_per_second([original_step(options, entries, preset, device),
                                              engine_step(options, data, preset, device)], options, device,
                                             rounds=options.rounds)
        print(f"{preset} original set-up (fp32, torch.load per sample, eager): {original:9.0f} frames/s")
        print(f"{preset} engine default ({'bf16' if device.startswith('cuda') else 'fp32'}, in-memory int16, "
              f"SDPA{', compile' if options.compile else ''}): {engine:9.0f} frames/s")
    print(f"engine / original: {engine / original:.2f}x")
    return {"value": round(engine / original, 3), "device": device, "compare_preset": preset,
            "original_frames_per_s": round(original), "engine_frames_per_s": round(engine),
            "training_frames_per_s": throughput}


if __name__ == "__main__":
    finish(main, name="stage4", unit="x the original set-up's training frames/s (engine / original)")
