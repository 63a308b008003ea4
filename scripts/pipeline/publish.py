"""Pieces a user can publish: each piece's originality report, and seamless loops (stage 5 and the studio,
through `pipeline.pieces`).

Originality: the model folder's `training_index.npz` (stage 4 writes it; `python -m
pipeline.originality --model DIR` builds it for an older run) is loaded lazily, once per file version,
and every piece's frames are looked up in it (`pipeline.originality`); the prompt's frames are marked
so that they do not count against the piece. Without an index a piece's `originality` is null and the
reason says how to get one (logged once per model).

Loops: the piece is generated past its intended end (`loop_plan`), the loop end is chosen near the
intended end where the model finds the piece's start most likely (`pipeline.loops.choose_loop_end`),
the audio that followed the end is crossfaded into the start and cut (`loop_audio`), and the WAV gets
a `smpl` chunk (`write_loop_wav`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_path
from .loops import (CROSSFADE_SECONDS, LoopPoints, choose_loop_end, crossfade_loop, mean_piece_nll_bits,
                    with_loop_points)
from .originality import TrainingIndex
from .runs import TRAINING_INDEX

LOG = logging.getLogger("pipeline.publish")
LOOP_EXTRA_FRACTION = 0.25  # a loop is generated 25 % past its intended end ...
LOOP_EXTRA_SECONDS = (0.5, 2.0)  # ... but at least 0.5 s and at most 2 s
LOOP_SEARCH_SECONDS = 0.5  # the loop end is searched within ± this of the intended end (and half the extra)
LOOP_JOIN_FRAMES = 16  # the start frames (about 0.1 s) whose NLL after the end judges a join
LOOP_SCORE_CONTEXT = 300  # frames before a join (and per window of the piece's mean) the model scores with
JOIN_TOLERANCE = 1.10  # a join is "within 10 %" when its NLL is at most 110 % of the piece's mean


# ==== originality =============================================================================
class IndexCache:
    """The training index beside each checkpoint, loaded on first use and again only when its file changes."""

    def __init__(self):
        self._loaded: dict[Path, tuple[int, TrainingIndex]] = {}  # index path -> (mtime_ns, index)
        self._told: set[Path] = set()  # folders whose missing index was logged already

    def get(self, checkpoint: Path) -> tuple[TrainingIndex | None, str | None]:
        """(the index of the model folder holding `checkpoint`, None) or (None, why there is none)."""
        path = Path(checkpoint).parent / TRAINING_INDEX
        if not path.is_file():
            return None, self._missing(path, "does not exist (a model trained before stage 4 wrote one)")
        stamp = path.stat().st_mtime_ns
        cached = self._loaded.get(path)
        if cached is None or cached[0] != stamp:
            try:
                cached = (stamp, TrainingIndex.load(path))
            except (OSError, ValueError, KeyError) as error:
                return None, self._missing(path, f"cannot be read ({error})")
            self._loaded[path] = cached
        return cached[1], None

    def _missing(self, path: Path, what: str) -> str:
        reason = (f"{path} {what}: build it with `PYTHONPATH=scripts python -m pipeline.originality --model "
                  f"{path.parent}`")
        if path.parent not in self._told:
            self._told.add(path.parent)
            LOG.warning("no originality report for this model's pieces: %s", reason)
        return reason


INDEXES = IndexCache()


def longest_copy_seconds(report: dict | None) -> float:
    """The longest run (all codebooks) a report found in training; 0 without a report."""
    return 0.0 if report is None else float(report["longest_copy_seconds"])


def describe_copy(report: dict | None) -> str:
    """A log phrase: 'no copied run' or 'longest copied run 1.23 s (song.th at 4.56 s)'."""
    if report is None:
        return "no originality report"
    if report["longest_copy_frames"] == 0:
        return "no run copied from training"
    return (f"longest copied run {report['longest_copy_seconds']:.2f} s ({report['training_file']} at "
            f"{report['training_seconds']:.2f} s), {report['copied_share']:.1%} of its windows copied")


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of regeneration `attempt` (1, 2, ...) of a job seeded with `seed`: new, yet reproducible."""
    import random

    return random.Random(f"{seed}:{attempt}").randrange(2**31)


# ==== loops ===================================================================================
@dataclass
class LoopPlan:
    """Where a loop piece should end and how far past that it is generated."""

    intended_frames: int  # the frames of the asked length
    search_frames: int  # the loop end is chosen within intended_frames ± this
    extra_seconds: float  # generated past the asked length
    tail_frames: int  # frames the crossfade needs after the loop's end


def loop_plan(seconds: float, intended_frames: int, frame_rate: float, prompt_frames: int) -> LoopPlan:
    """Generate 25 % (0.5-2 s) past `seconds` (`intended_frames` frames); search the end within half that
    and at most 0.5 s, never inside the prompt."""
    low, high = LOOP_EXTRA_SECONDS
    extra = min(max(LOOP_EXTRA_FRACTION * seconds, low), high)
    search = min(round(extra * frame_rate / 2), round(LOOP_SEARCH_SECONDS * frame_rate),
                 max(intended_frames - prompt_frames - 1, 0))
    return LoopPlan(intended_frames=intended_frames, search_frames=search, extra_seconds=extra,
                    tail_frames=math.ceil(CROSSFADE_SECONDS * frame_rate) + 1)


@dataclass
class LoopChoice:
    end_frame: int  # the loop holds frames 0..end_frame-1
    join_nll_bits: float  # mean NLL of the first LOOP_JOIN_FRAMES frames after frame end_frame-1
    piece_mean_nll_bits: float  # mean NLL per frame of the loop's frames
    score_context: int  # frames of context both were scored with

    def report(self, loop_samples: int, join_step: dict) -> dict:
        """The sidecar's `loop`, with `join_step` (`pipeline.loops.join_step_report` of the written audio)."""
        return {"start_sample": 0, "end_sample": loop_samples - 1, "end_frame": self.end_frame,
                "join_nll_bits": round(self.join_nll_bits, 4),
                "piece_mean_nll_bits": round(self.piece_mean_nll_bits, 4),
                "join_within_10_percent": self.join_nll_bits <= JOIN_TOLERANCE * self.piece_mean_nll_bits,
                "score_context_frames": self.score_context, **join_step}


def choose_loop(model, frames: torch.Tensor, plan: LoopPlan, pattern: str, context: int,
                artist_weights: tuple | None, device: str) -> LoopChoice:
    """The loop end of one piece's frames `[1, N, Q]` (generated past `plan.intended_frames`), judged by
    the model that made it, with the artist conditioning it generated with."""
    score_context = min(context, LOOP_SCORE_CONTEXT)
    frames = frames.to(device)  # [1, N, Q]
    artist = None if artist_weights is None else torch.tensor([artist_weights], dtype=torch.float32,
                                                              device=device)  # [1, n_artists + 1]
    search = max(0, min(plan.search_frames, frames.shape[1] - plan.tail_frames - plan.intended_frames))
    end, join_bits = choose_loop_end(model, frames, plan.intended_frames, search, pattern, score_context,
                                     LOOP_JOIN_FRAMES, artist)
    mean_bits = mean_piece_nll_bits(model, frames, end, pattern, score_context, artist)
    return LoopChoice(end_frame=end, join_nll_bits=join_bits, piece_mean_nll_bits=mean_bits,
                      score_context=score_context)


def loop_audio(wave: np.ndarray, loop_samples: int, sample_rate: int) -> np.ndarray:
    """`[S, 2]` audio generated past the loop -> `[loop_samples, 2]` whose last sample flows into its first."""
    if wave.shape[0] <= loop_samples:
        raise ValueError(f"the loop needs audio after its end: {wave.shape[0]} samples for a loop of {loop_samples}")
    return crossfade_loop(wave, loop_samples, sample_rate)


def write_loop_wav(samples: np.ndarray, path: Path, sample_rate: int) -> LoopPoints:
    """A 16-bit WAV with a `smpl` chunk looping all of it, added to the temporary before the rename."""
    import soundfile as sf

    points = LoopPoints(start=0, end=samples.shape[0] - 1)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), samples, sample_rate, subtype="PCM_16")
        tmp.write_bytes(with_loop_points(tmp.read_bytes(), points, sample_rate))
    return points
