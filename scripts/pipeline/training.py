"""The pieces a training loop is built from: the loss and its units, the optimizer and its schedule,
mixed precision, reproducible randomness, the loss plot and a graceful stop on Ctrl-C / SIGTERM.

None of them knows the run folder or the model's class: `pipeline.trainer` puts them together.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import CODEBOOK_SIZE, PAD
from .files import atomic_path
from .runs import baseline_record, epoch_records

LN2 = math.log(2.0)
LOG = logging.getLogger("pipeline.stage4")


class TrainingDiverged(Exception):
    """The loss (or the gradient norm) stopped being finite: a started run failed (exit 1, not 2)."""


# ---- loss ---------------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits `[B, S, Q, V]`, targets `[B, S, Q]` -> (NLL in nats `[B, S, Q]`, 1.0 where a real target `[B, S, Q]`,
    log-probabilities `[B, S, Q, 1024]`).

    The softmax runs over the 1024 real codes only: BOS and PAD are never targets and never sampled,
    so the NLL reported is that of the distribution stage 5 samples from. PAD targets weigh 0.
    """
    log_probs = F.log_softmax(logits[..., :CODEBOOK_SIZE].float(), dim=-1)  # [B, S, Q, 1024]
    valid = targets != PAD  # [B, S, Q]
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    nll = -log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, S, Q]
    return nll, valid.float(), log_probs


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """logits `[B, S, Q, V]`, targets `[B, S, Q]` -> (smoothed mean loss, NLL sums `[Q]` in nats, counts `[Q]`)."""
    nll, weights, log_probs = token_nll(logits, targets)  # [B, S, Q] x2, [B, S, Q, 1024]
    smoothed = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)  # [B, S, Q]
    loss = (smoothed * weights).sum() / weights.sum().clamp(min=1.0)
    nll_sums = (nll.detach() * weights).sum(dim=(0, 1))  # [Q]
    return loss, nll_sums, weights.sum(dim=(0, 1))


# Where in its window a frame stands: the valid NLL per bucket shows whether the model listens back.
POSITION_EDGES = (0, 10, 50, 150, 300, 750, 1500)


def position_buckets(context_frames: int) -> list[tuple[int, int]]:
    """The buckets [start, stop) of POSITION_EDGES that a window of `context_frames` frames reaches."""
    edges = [edge for edge in POSITION_EDGES if edge < context_frames] + [min(context_frames, POSITION_EDGES[-1])]
    return [(start, stop) for start, stop in zip(edges[:-1], edges[1:]) if stop > start]


def bucket_sums(nll: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor,
                buckets: list[tuple[int, int]]) -> torch.Tensor:
    """NLL `[B, S, Q]` (nats) and weights of sequence cells -> `[2, K]` float64: per position bucket, the
    NLL summed over its cells, and its cell count. Cell (s, q) holds frame s - offsets[q] of the window."""
    rows = torch.arange(nll.shape[1], device=nll.device)[:, None] - offsets.to(nll.device)[None, :]  # [S, Q]
    edges = torch.tensor([stop for _, stop in buckets], device=nll.device)  # [K]
    index = torch.bucketize(rows, edges, right=True)  # [S, Q] in 0..K (K: past the last bucket)
    index = torch.where(rows < buckets[0][0], len(buckets), index)  # before the window's first frame: none
    sums = torch.zeros(2, len(buckets) + 1, dtype=torch.float64, device=nll.device)
    flat = index.expand_as(nll).reshape(-1)  # [B*S*Q]
    sums[0].index_add_(0, flat, (nll * weights).reshape(-1).double())
    sums[1].index_add_(0, flat, weights.reshape(-1).double())
    return sums[:, :-1]


def bits_by_position(sums: torch.Tensor, buckets: list[tuple[int, int]], n_codebooks: int) -> dict:
    """`[2, K]` bucket sums -> {"0-10": bits per frame, ...} (buckets without a frame left out)."""
    record = {}
    for (start, stop), total, cells in zip(buckets, sums[0].tolist(), sums[1].tolist()):
        if cells > 0:
            record[f"{start}-{stop}"] = total / LN2 / (cells / n_codebooks)
    return record


def bits_per_frame(nll_sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, list]:
    """Per-codebook NLL (nats summed) -> (bits per frame, bits per token of each codebook)."""
    per_codebook = (nll_sums.double() / counts.double().clamp(min=1.0) / LN2).tolist()
    return float(sum(per_codebook)), per_codebook


# ---- optimizer and schedule -------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; embeddings (tied heads too), norms and biases do not."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = name.startswith(("embeddings.", "artist_table.")) or ".wpe." in name or ".wte." in name
        (no_decay if parameter.dim() < 2 or is_embedding else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR factor of optimizer step s: linear warm-up, then a cosine down to `min_factor` (held after)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_factor: float):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, args: dict, total_steps: int, device: str):
    optimizer = torch.optim.AdamW(parameter_groups(model, args["weight_decay"]), lr=args["lr"],
                                  betas=(0.9, 0.95), fused=device.startswith("cuda") or None)
    schedule = WarmupCosine(round(args["warmup_frac"] * total_steps), total_steps, args["min_lr_frac"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def current_lr(optimizer) -> float:
    """The learning rate the next optimizer step uses (that of the first parameter group)."""
    return float(optimizer.param_groups[0]["lr"])


def set_schedule(scheduler, total_steps: int | None = None, peak_lr: float | None = None) -> None:
    """Re-plan a restored schedule (new length and/or new peak LR) and apply it at the current step.

    The new LR is written into the optimizer's groups, where `current_lr` reads it; the scheduler's
    own record of its last LR catches up at its next step."""
    schedule = scheduler.lr_lambdas[0]
    if total_steps is not None:
        schedule.total_steps = int(total_steps)
    if peak_lr is not None:
        scheduler.base_lrs = [peak_lr for _ in scheduler.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["initial_lr"] = peak_lr
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(scheduler.last_epoch)


# ---- precision ----------------------------------------------------------------------------------
@dataclass
class Precision:
    """bf16 autocast on CUDA where supported, fp16 + grad scaler otherwise, fp32 on the CPU."""

    device: str
    dtype: torch.dtype | None

    @classmethod
    def for_device(cls, device: str) -> "Precision":
        if not device.startswith("cuda"):
            return cls(device, None)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
        return cls(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def grad_scaler(self):
        return torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)


# ---- randomness -----------------------------------------------------------------------------------
def micro_batch_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    """Each micro-batch reseeds torch from (seed, epoch, batch, rank): dropout then needs no saved state,
    so a run resumed mid-epoch draws exactly what the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, epoch, micro, rank]).generate_state(1)[0])


def rng_states() -> dict:
    """Python, numpy, torch and CUDA generator states as tensors and lists (weights_only-loadable)."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    states = {"python": [version, list(mt_state), gauss],
              "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                        int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- checkpoints ------------------------------------------------------------------------------------
def plain(value):
    """Resolved arguments as JSON-like plain types (Paths become strings)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- outputs: metrics and the loss plot ---------------------------------------------------------------
def plot_losses(records: list[dict], path: Path) -> None:
    """Train and valid NLL (bits per frame) against epoch, with the count models' lines."""
    baselines, records = baseline_record(records), epoch_records(records)
    epochs = [r["epoch"] for r in records]
    figure, axis = _new_figure()
    axis.plot(epochs, [r["train_nll_bits_per_frame"] for r in records], "o-", label="train NLL")
    valid = [(r["epoch"], r["valid_nll_bits_per_frame"]) for r in records
             if r.get("valid_nll_bits_per_frame") is not None]
    if valid:
        axis.plot(*zip(*valid), "s-", label="valid NLL")
    if baselines:
        _draw_baselines(axis, baselines)
    _save_figure(figure, axis, "epoch", "bits per frame", path)


def _draw_baselines(axis, baselines: dict) -> None:
    where = baselines.get("scored_on", "valid")
    axis.axhline(baselines["unigram_bits_per_frame"], color="tab:red", linestyle="--",
                 label=f"unigram ({where}): token frequencies only")
    mixed = baselines.get("interpolated_bigram_bits_per_frame")
    if mixed is not None:
        axis.axhline(mixed, color="tab:purple", linestyle=":",
                     label=f"bigram + unigram ({where}): previous token, weight fitted on train")
    else:
        axis.axhline(baselines["bigram_bits_per_frame"], color="tab:purple", linestyle=":",
                     label=f"bigram ({where}): previous token only")


def in_position_order(by_position: dict) -> list[tuple[str, float]]:
    """A `valid_nll_by_position` mapping's (bucket, bits) in frame order ("0-10", "10-50", "50-150", ...):
    metrics.jsonl stores keys sorted as text, which puts "150-300" before "50-150"."""
    return sorted(by_position.items(), key=lambda item: int(str(item[0]).split("-")[0]))


def plot_positions(records: list[dict], path: Path) -> None:
    """Valid NLL by the frame's position in its window (the first, best and last validations): a model
    that listens back gets better further into the window."""
    scored = [r for r in epoch_records(records) if r.get("valid_nll_by_position")]
    if not scored:
        return
    best = min(scored, key=lambda r: r["valid_nll_bits_per_frame"])
    chosen = {id(r): r for r in (scored[0], best, scored[-1])}.values()
    figure, axis = _new_figure()
    for record in chosen:
        labels, bits = zip(*in_position_order(record["valid_nll_by_position"]))
        tag = " (best)" if record is best else ""
        axis.plot(labels, bits, "o-", label=f"epoch {record['epoch']}{tag}")
    _save_figure(figure, axis, "frames into the window (position bucket)", "valid NLL, bits per frame", path)


def _new_figure():
    """(figure, axis) of a 7 x 4 inch plot, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4))


def _save_figure(figure, axis, xlabel: str, ylabel: str, path: Path) -> None:
    """Label, grid and legend the axis, then write the figure atomically as `path`."""
    import matplotlib.pyplot as plt

    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


# ---- signals -------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C / SIGTERM: finish the current optimizer step, save a resumable checkpoint, exit.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal_number = 0
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number
        LOG.warning("%s received: saving a resumable checkpoint after this step (again to abort)",
                    signal.Signals(number).name)


def to_cpu(value):
    """A nested dict / list of tensors with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def copy_atomically(source: Path, destination: Path) -> None:
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
