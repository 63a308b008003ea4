"""Decoding for the generation core: frame and sample arithmetic, per-chunk scales, chunked decoding
with its out-of-memory fallbacks, and the `OverlappedDecoder` that decodes each finished codec
chunk on a worker thread while the next frames are generated.

Frames are the codec's (150 per 48 kHz Encodec chunk, chunks 0.99 s apart); a piece's frames are
`[B, N, Q]` long tensors, its codes for the codec `[1, Q, n_chunks*150]`.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import queue
import threading
import time

import torch

LOG = logging.getLogger("pipeline.decoding")


class DecodingOutOfMemory(RuntimeError):
    """Decoding ran out of memory even one chunk at a time on the CPU."""


# ==== frames <-> samples ======================================================================
def frames_for_samples(codec, audio_samples: int) -> int:
    """Codec frames that carry `audio_samples` of audio: full chunks, then the last chunk's real frames."""
    return (codec.n_chunks(audio_samples) - 1) * codec.chunk_frames + codec.last_chunk_frames(audio_samples)


def samples_for_frames(codec, n_frames: int) -> int:
    """Inverse of `frames_for_samples` (a last chunk keeps at most 149 frames: a chunk overlaps the next)."""
    n_chunks = math.ceil(n_frames / codec.chunk_frames)
    last_frames = n_frames - (n_chunks - 1) * codec.chunk_frames
    return (n_chunks - 1) * codec.chunk_stride + min(last_frames * codec.hop_length, codec.chunk_stride)


# ==== decoding ================================================================================
def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_chunked(codec, codes: torch.Tensor, scales: torch.Tensor, audio_samples: int, chunks_per_pass: int,
                   notes: list | None = None) -> torch.Tensor:
    """codes `[1, Q, T]` -> wave `[2, audio_samples]`, decoding `chunks_per_pass` codec chunks at a time.

    Each chunk decodes on its own exactly, so the groups only bound memory; the overlap-add runs
    once over all chunks. On a CUDA out-of-memory error: free memory, halve the group, and at one
    chunk a pass move the codec to the CPU. Every fallback is logged and appended to `notes`.
    """
    n_chunks = codec.n_chunks(audio_samples)
    group = max(1, min(chunks_per_pass, n_chunks))
    waves: list[torch.Tensor] = []
    while len(waves) < n_chunks:
        first = len(waves)
        try:
            waves.extend(codec.decode_chunks(codes, scales, audio_samples, first, first + group))
        except torch.cuda.OutOfMemoryError:
            free_accelerator_memory()
            group = _after_out_of_memory(codec, group, notes if notes is not None else [])
    return codec.overlap_add(waves, audio_samples)


def _after_out_of_memory(codec, group: int, notes: list) -> int:
    if group > 1:
        message = f"decoding ran out of memory on {codec.device} with {group} chunks a pass; retrying with {group // 2}"
        group //= 2
    elif codec.device != "cpu":
        message = f"decoding ran out of memory on {codec.device} even one chunk at a time; falling back to the CPU"
        codec.move_to("cpu")
    else:
        raise DecodingOutOfMemory("decoding ran out of memory on the CPU, one chunk at a time")
    LOG.warning("%s", message)
    notes.append(message)
    return group


def chunk_scales(prompt_scales: torch.Tensor | None, n_chunks: int, median_scale: float | None,
                 median_source: str) -> tuple[torch.Tensor, list[str]]:
    """Per-chunk scales: the prompt's first, then the median scale, else 1.0 -> (`[n_chunks]`, sources)."""
    scales, sources = [], []
    for index in range(n_chunks):
        if prompt_scales is not None and index < prompt_scales.numel():
            scales.append(float(prompt_scales[index]))
            sources.append("prompt")
        elif median_scale is not None:
            scales.append(float(median_scale))
            sources.append(median_source)
        else:
            scales.append(1.0)
            sources.append("default 1.0")
    return torch.tensor(scales, dtype=torch.float32), sources


def frames_to_chunk_codes(codec, frames: torch.Tensor, audio_samples: int) -> torch.Tensor:
    """One piece's frames `[1, N, Q]` -> codes `[1, Q, n_chunks*150]`, the last chunk padded with zeros."""
    n_chunks = codec.n_chunks(audio_samples)
    codes = torch.zeros(1, n_chunks * codec.chunk_frames, frames.shape[2], dtype=torch.long)  # [1, T, Q]
    codes[:, :frames.shape[1]] = frames
    return codes.transpose(1, 2)  # [1, T, Q] -> [1, Q, T]


class OverlappedDecoder:
    """Decodes each piece's codec chunks on a worker thread while the next frames are generated.

    Feed it `frames_final(final_frames, frames)` (the `TokenGenerator` progress signature): each
    chunk whose frames are all final is copied and queued at once, so decoding trails generation by
    about one chunk (1 s of audio). Chunks decode independently (`Codec.decode_chunk`), so the audio
    equals decoding at the end; the overlap-add runs in `finish`. `chunks_per_pass` bounds the
    groups of a decoding redone at the end. The worker uses `threads` torch threads (its own
    count; the generating thread keeps its own). A failure in the worker (a CUDA out-of-memory error, say)
    is kept, and `finish` decodes that piece again at the end with `decode_chunked`'s fallbacks.
    """

    def __init__(self, codec, scales: torch.Tensor, audio_samples: int, batch: int, chunks_per_pass: int,
                 threads: int | None = None):
        self.codec, self.scales, self.audio_samples, self.batch = codec, scales, audio_samples, batch
        self.n_chunks = codec.n_chunks(audio_samples)
        self.chunks_per_pass = max(1, min(chunks_per_pass, self.n_chunks))
        self.chunk_frames = [codec.chunk_frames] * (self.n_chunks - 1) + [codec.last_chunk_frames(audio_samples)]
        self.queued = 0  # chunks handed to the worker so far
        self.waves = [[None] * self.n_chunks for _ in range(batch)]  # per piece, per chunk: [2, L]
        self.error: BaseException | None = None
        self.busy_seconds = 0.0
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, args=(threads,), name="stage5-decoder", daemon=True)
        self.worker.start()

    def _frames_needed(self, stop_chunk: int) -> int:
        """Final frames that chunks `0..stop_chunk-1` need."""
        return (stop_chunk - 1) * self.codec.chunk_frames + self.chunk_frames[stop_chunk - 1]

    def frames_final(self, final_frames: int, frames: torch.Tensor) -> None:
        """Queue every chunk the first `final_frames` frames of `frames` `[B, N, Q]` cover."""
        while self.queued < self.n_chunks:
            stop = self.queued + 1
            if final_frames < self._frames_needed(stop):
                return
            first_frame = self.queued * self.codec.chunk_frames
            codes = frames[:, first_frame:self._frames_needed(stop)].to("cpu", copy=True)  # [B, F, Q]
            self.jobs.put((self.queued, stop, codes))
            self.queued = stop

    def _work(self, threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's own count
        on_gpu = str(self.codec.device).startswith("cuda")
        # on a GPU, a stream of its own lets decoding run beside the generation steps instead of between them
        with torch.cuda.stream(torch.cuda.Stream(self.codec.device)) if on_gpu else contextlib.nullcontext():
            self._work_through_jobs()

    def _work_through_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            first, stop, codes = job
            started = time.perf_counter()
            try:
                self._decode_group(first, stop, codes)
            except Exception as error:  # noqa: BLE001 - kept for finish(), which decodes again with fallbacks
                self.error = error
            self.busy_seconds += time.perf_counter() - started

    @torch.inference_mode()
    def _decode_group(self, first: int, stop: int, codes: torch.Tensor) -> None:
        """Chunks `first..stop-1` of every piece from their frames `codes` `[B, F, Q]`."""
        for piece in range(self.batch):
            offset = 0
            for chunk in range(first, stop):
                length = self.chunk_frames[chunk]
                chunk_codes = codes[piece, offset:offset + length].T  # [F, Q] -> [Q, F]
                self.waves[piece][chunk] = self.codec.decode_chunk(chunk_codes, self.scales[chunk])
                offset += self.codec.chunk_frames

    def close(self) -> None:
        """Stop the worker after the chunks already queued (after a cancelled generation, say)."""
        if self.worker.is_alive():
            self.jobs.put(None)
            self.worker.join()

    def finish(self, frames: torch.Tensor, notes: list | None = None) -> list[torch.Tensor]:
        """All frames `[B, N, Q]` final -> one wave `[2, audio_samples]` per piece."""
        self.frames_final(frames.shape[1], frames)
        self.close()
        if self.error is not None:
            LOG.warning("overlapped decoding failed (%s: %s): decoding again at the end",
                        type(self.error).__name__, self.error)
        waves = []
        for piece in range(self.batch):
            if self.error is None and all(wave is not None for wave in self.waves[piece]):
                waves.append(self.codec.overlap_add(self.waves[piece], self.audio_samples))
            else:
                codes = frames_to_chunk_codes(self.codec, frames[piece:piece + 1].cpu(), self.audio_samples)
                waves.append(decode_chunked(self.codec, codes, self.scales, self.audio_samples, self.chunks_per_pass,
                                            notes))
        return waves
