"""Token streams with a known entropy: the instrument that shows whether stage 4 learns.

Each process writes ordinary token files and a manifest, so the normal stage 4 trains on it, and
knows the best NLL any model can reach on the frames stage 4 scores (its validation windows):

    markov   every codebook an order-1 Markov chain over `states` codes, each state with 4 equally
             likely successors (2 bits per codebook per frame); the frame's codebooks independent.
             A bigram table learns it; the unigram cannot.
    copy     each clip picks a period P (tens of frames); frame t repeats frame t-P, each token
             replaced by a random one with probability `mutation`. The phrase is new in every clip,
             so no n-gram table helps: only looking back P frames in context does.
    cross    codebook 0 is uniform over `states` codes; codebook q > 0 is a fixed function of
             codebook 0 of the same frame, replaced by a random code with probability `mutation`.
             The delay pattern sees codebook 0 before predicting q; the parallel pattern cannot,
             so its best is the sum of the marginals.
    loop     each clip picks a fresh random motif of `loop_range` frames (20-60) and repeats it to the
             clip's end, every token of a repeat replaced by a random one with probability
             `mutation` (the motif itself stays clean, so every repeat is a noisy copy of the same
             motif). Many clips, each with its own motif: only looking back one period helps.

All codes are drawn from a random subset of 0..1023 (`states` of them per codebook).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import BANDWIDTH_TO_Q, TokenFile, samples_for, save_token_file
from . import runs

PROCESSES = ("markov", "copy", "cross", "loop")
SUCCESSORS = 4  # markov: equally likely next states of every state


@dataclass(frozen=True)
class StreamSpec:
    process: str
    n_codebooks: int = 4
    states: int = 64  # codes in use per codebook
    mutation: float = 0.05  # copy / cross: probability that a token is replaced by a random one
    period_range: tuple = (16, 48)  # copy: period of the repeated phrase, drawn per clip
    loop_range: tuple = (20, 60)  # loop: length of the motif, drawn per clip
    seed: int = 0


def noisy_copy_bits(states: int, mutation: float) -> float:
    """Entropy (bits) of a token that equals a known one, except that with probability `mutation`
    it is drawn uniformly from all `states` codes (which may give the known one back)."""
    keep = 1.0 - mutation + mutation / states
    other = mutation / states
    return -keep * math.log2(keep) - (states - 1) * (other * math.log2(other) if other > 0 else 0.0)


class Stream:
    """One process: its fixed tables (shared by every clip) and a clip generator."""

    def __init__(self, spec: StreamSpec):
        if spec.process not in PROCESSES:
            raise ValueError(f"unknown process {spec.process!r}: choose one of {', '.join(PROCESSES)}")
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 1])
        q, s = spec.n_codebooks, spec.states
        self.alphabet = np.stack([rng.choice(1024, size=s, replace=False) for _ in range(q)])  # [Q, S] codes
        # markov: successors of state i in codebook q are (perm[q, i] + j) mod S, j < 4: every state
        # has 4 successors and 4 predecessors, so the chain's stationary distribution is uniform.
        self.successor_base = np.stack([rng.permutation(s) for _ in range(q)])  # [Q, S]
        self.cross_maps = np.stack([rng.permutation(s) for _ in range(q)])  # [Q, S]: codebook 0 state -> q's

    def clip(self, n_frames: int, rng: np.random.Generator, period: int) -> np.ndarray:
        """One clip of `n_frames` frames as states `[n_frames, Q]` (`codes` gives the codes); `period`
        is the copy process's phrase length or the loop's motif length (the others ignore it)."""
        if self.spec.process in ("copy", "loop"):
            return getattr(self, f"_{self.spec.process}")(n_frames, rng, period)
        return getattr(self, f"_{self.spec.process}")(n_frames, rng)

    def codes(self, states: np.ndarray) -> np.ndarray:
        """States `[T, Q]` -> codes `[T, Q]` in 0..1023."""
        return self.alphabet[np.arange(self.spec.n_codebooks)[None, :], states]

    def _markov(self, n_frames: int, rng: np.random.Generator) -> np.ndarray:
        q, s = self.spec.n_codebooks, self.spec.states
        states = np.empty((n_frames, q), dtype=np.int64)
        states[0] = rng.integers(0, s, size=q)
        steps = rng.integers(0, SUCCESSORS, size=(n_frames, q))
        for t in range(1, n_frames):
            states[t] = (self.successor_base[np.arange(q), states[t - 1]] + steps[t]) % s
        return states

    def _copy(self, n_frames: int, rng: np.random.Generator, period: int) -> np.ndarray:
        q, s = self.spec.n_codebooks, self.spec.states
        states = rng.integers(0, s, size=(n_frames, q))  # frames < period stay random
        mutated = rng.random((n_frames, q)) < self.spec.mutation
        for t in range(period, n_frames):
            states[t] = np.where(mutated[t], states[t], states[t - period])
        return states

    def _loop(self, n_frames: int, rng: np.random.Generator, period: int) -> np.ndarray:
        q, s = self.spec.n_codebooks, self.spec.states
        motif = rng.integers(0, s, size=(period, q))  # the clip's own motif
        states = motif[np.arange(n_frames) % period]  # [T, Q]: the motif repeated
        mutated = rng.random((n_frames, q)) < self.spec.mutation
        mutated[:period] = False  # the first period is the motif itself
        states[mutated] = rng.integers(0, s, size=int(mutated.sum()))
        return states

    def _cross(self, n_frames: int, rng: np.random.Generator) -> np.ndarray:
        q, s = self.spec.n_codebooks, self.spec.states
        first = rng.integers(0, s, size=n_frames)  # [T]
        states = self.cross_maps[:, first].T.copy()  # [Q, T] -> [T, Q]
        states[:, 0] = first
        mutated = rng.random((n_frames, q)) < self.spec.mutation
        mutated[:, 0] = False
        states[mutated] = rng.integers(0, s, size=int(mutated.sum()))
        return states

    # ---- the best any model can do ----------------------------------------------------------------
    def frame_bits(self, position_in_window: np.ndarray, period: int, pattern: str) -> np.ndarray:
        """Entropy (bits) of each scored frame given the frames before it in its window `[N] -> [N]`."""
        q, s, spec = self.spec.n_codebooks, self.spec.states, self.spec
        uniform = math.log2(s)
        first = position_in_window == 0
        if spec.process == "markov":
            return np.where(first, q * uniform, q * math.log2(SUCCESSORS))
        if spec.process in ("copy", "loop"):  # loop: a repeat is a noisy copy of the clean motif
            return np.where(position_in_window < period, q * uniform, q * noisy_copy_bits(s, spec.mutation))
        noisy = noisy_copy_bits(s, spec.mutation) if pattern == "delay" else uniform
        return np.full(position_in_window.shape, uniform + (q - 1) * noisy)


def window_positions(n_frames: int, context: int) -> np.ndarray:
    """Position of every frame inside stage 4's back-to-back validation windows `[n_frames]`."""
    return np.arange(n_frames) % context


@dataclass
class WrittenCorpus:
    manifest: Path
    oracle_bits_per_frame: float  # on the valid split, as stage 4 scores it
    valid_frames: int


def write_corpus(root: Path, artist: str, spec: StreamSpec, n_train: int, n_valid: int, n_frames: int,
                 context: int, pattern: str) -> WrittenCorpus:
    """Token files and `metadata_clean_<artist>.jsonl` for stage 4; the oracle NLL of the valid clips."""
    if spec.n_codebooks not in BANDWIDTH_TO_Q.values():
        raise ValueError(f"{spec.n_codebooks} codebooks is not one of Encodec's 2, 4, 8, 16")
    stream = Stream(spec)
    bandwidth = {q: b for b, q in BANDWIDTH_TO_Q.items()}[spec.n_codebooks]
    num_samples = samples_for(n_frames)
    lines, oracle_bits = [], []
    for index in range(n_train + n_valid):
        split = "train" if index < n_train else "valid"
        period_rng = np.random.default_rng([spec.seed, 3, index])
        clip_rng = np.random.default_rng([spec.seed, 4, index])
        low, high = spec.loop_range if spec.process == "loop" else spec.period_range
        period = int(period_rng.integers(low, high + 1))
        states = stream.clip(n_frames, clip_rng, period)
        rel = f"encoded_tokens/{artist}/{spec.process}_{index:03d}.th"
        _write_clip(root / rel, stream.codes(states), num_samples, bandwidth, spec)
        lines.append({"audio": rel, "duration": num_samples / 48_000, "sample_rate": 48_000, "frames": n_frames,
                      "codebooks": spec.n_codebooks, "bandwidth": bandwidth, "codec": f"synthetic:{spec.process}",
                      "source": rel, "track": f"{spec.process}_{index:03d}", "split": split, "median_scale": 1.0})
        if split == "valid":
            oracle_bits.append(stream.frame_bits(window_positions(n_frames, context), period, pattern))
    manifest = root / f"metadata_clean_{artist}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    bits = np.concatenate(oracle_bits) if oracle_bits else np.zeros(0)
    return WrittenCorpus(manifest=manifest, oracle_bits_per_frame=float(bits.mean()) if bits.size else float("nan"),
                         valid_frames=int(bits.size))


def _write_clip(path: Path, codes: np.ndarray, num_samples: int, bandwidth: float, spec: StreamSpec) -> None:
    """Codes `[T, Q]` -> a contract token file; the codec's padded tail (frames past T) is code 0."""
    import torch

    n_frames, q = codes.shape
    n_chunks = math.ceil(n_frames / 150)
    padded = np.zeros((q, n_chunks * 150), dtype=np.int16)
    padded[:, :n_frames] = codes.T  # [T, Q] -> [Q, T]
    token_file = TokenFile(codes=torch.from_numpy(padded)[None], scales=torch.ones(n_chunks), num_samples=num_samples,
                           bandwidth=bandwidth, codec=f"synthetic:{spec.process}", source=str(path.name))
    save_token_file(token_file, path)


# ---- training stage 4 on a stream ----------------------------------------------------------------
@dataclass
class LearnabilityResult:
    process: str
    pattern: str
    model_bits: float  # valid NLL of the trained model, bits per frame
    oracle_bits: float  # the best any model can reach on the same frames
    unigram_bits: float
    bigram_bits: float
    train_bits: float
    steps: int
    seconds: float
    copy_path_bits: float | None = None  # valid NLL with the in-context copy path at best.pt (cross-fitted), if fitted
    best_bits: float | None = None  # the lowest valid NLL of any epoch (best.pt's); model_bits is the last epoch's
    best_count_bits: float | None = None  # the run's best count model (unigram or interpolated bigram)

    @property
    def excess_bits(self) -> float:
        return self.model_bits - self.oracle_bits


def steps_per_epoch(n_clips: int, n_frames: int, context: int, batch_size: int) -> int:
    windows_per_clip = 1 if n_frames <= context else n_frames // context + 1  # as stage 4 tiles a clip
    return math.ceil(n_clips * windows_per_clip / batch_size)


def train_on_stream(root: Path, spec: StreamSpec, stage4_options: list[str], steps: int, context: int = 300,
                    batch_size: int = 8, pattern: str = "delay", n_train: int = 40, n_valid: int = 4,
                    n_frames: int = 1499) -> LearnabilityResult:
    """Write the stream's corpus under `root`, train the normal stage 4 on it for about `steps`
    optimizer steps (whole epochs: the count is rounded to them), and score it against the oracle
    and the baselines."""
    import time

    from .model_io import model_module

    artist = f"synthetic_{spec.process}"
    corpus = write_corpus(root, artist, spec, n_train, n_valid, n_frames, context, pattern)
    epochs = max(1, round(steps / steps_per_epoch(n_train, n_frames, context, batch_size)))
    argv = ["--artist", artist, "--root", str(root), "--context-frames", str(context), "--batch-size",
            str(batch_size), "--pattern", pattern, "--epochs", str(epochs),
            "--keep-last", "1", "--log-level", "WARNING", *stage4_options]
    started = time.perf_counter()
    status = model_module().main(argv)  # the training script's command line, in this process
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"stage 4 exited {status} on the {spec.process} stream")
    records = runs.read_metrics(runs.model_dir(root, artist) / runs.METRICS_FILE)
    baselines, epochs = runs.baseline_record(records), runs.epoch_records(records)
    last = epochs[-1]
    return LearnabilityResult(process=spec.process, pattern=pattern, model_bits=last["valid_nll_bits_per_frame"],
                              oracle_bits=corpus.oracle_bits_per_frame, unigram_bits=baselines["unigram_bits_per_frame"],
                              bigram_bits=baselines["bigram_bits_per_frame"], train_bits=last["train_nll_bits_per_frame"],
                              steps=last["step"], seconds=seconds, copy_path_bits=copy_path_bits(records),
                              best_bits=min(record["valid_nll_bits_per_frame"] for record in epochs),
                              best_count_bits=baselines.get("best_count_bits_per_frame"))


def copy_path_bits(records: list[dict]) -> float | None:
    """The valid NLL with the copy path of the latest fit (stage 4 fits it when the valid NLL improves:
    the best epoch's, which best.pt carries), or None when none was fitted."""
    fitted = [record for record in runs.epoch_records(records) if "valid_nll_copy_path_bits_per_frame" in record]
    return fitted[-1]["valid_nll_copy_path_bits_per_frame"] if fitted else None
