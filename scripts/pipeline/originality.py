"""Is a generated piece new, or a copy of a training song? An index of the training tokens and its lookup.

The index holds a 64-bit hash of every window of `window_frames` consecutive frames of the training
clips (all Q codebooks of each frame; a second index hashes codebook 0 alone, a looser, melodic
match), sorted, with where each window starts (clip, frame). Stage 4 writes it next to the model
(`training_index.npz`, once per run); stage 5 and the studio load it lazily and report, per piece:

- `longest_copy_seconds`: the longest run of the piece's frames every window of which appears in
  the training tokens, with the training file and time where its first window starts;
- `copied_share`: the share of the piece's windows found in training;
- the same for codebook 0 alone (`codebook0`).

Frames that came from the user's prompt are not the model's doing: windows that touch them are left
out of the figures above and counted apart (`prompt_windows`). With the default 38-frame window
(about 1/4 s at 150 frames per second) a chance match of random tokens is vanishingly unlikely, so a
found window means the same audio.
"""
from __future__ import annotations

import argparse
import json
import logging
import struct
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .files import atomic_path
from .runs import TRAINING_INDEX

LOG = logging.getLogger("pipeline.originality")
INDEX_FORMAT = 1
WINDOW_FRAMES = 38  # ~0.25 s at 150 frames/s
_MASK64 = (1 << 64) - 1


def _multipliers(count: int, salt: int) -> np.ndarray:
    """`count` fixed odd 64-bit multipliers (the same in every process: the index is portable)."""
    rng = np.random.Generator(np.random.PCG64(0x5EED_0000 + salt))
    return rng.integers(0, 2**63, size=count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def frame_keys(codes: np.ndarray) -> np.ndarray:
    """`[T, Q]` integer codes -> `[T]` uint64: one key per frame (codes < 2^16 each, mixed per codebook)."""
    codes = np.asarray(codes).astype(np.uint64)  # [T, Q]
    weights = _multipliers(codes.shape[1], salt=1)  # [Q]
    with np.errstate(over="ignore"):
        return (codes * weights[None, :]).sum(axis=1, dtype=np.uint64) ^ (codes[:, 0] << np.uint64(48))


def window_hashes(codes: np.ndarray, window_frames: int) -> np.ndarray:
    """`[T, Q]` -> `[T - window_frames + 1]` uint64 hashes of every window (empty when T < window_frames)."""
    keys = frame_keys(codes)  # [T]
    count = len(keys) - window_frames + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    weights = _multipliers(window_frames, salt=2)  # [n]
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(window_frames):
            hashes += keys[offset:offset + count] * weights[offset]
        hashes ^= hashes >> np.uint64(29)
    return hashes


BUCKET_ROWS = 1 << 20  # hashes sorted at a time (~40 MB with their temporaries): bounds the build's memory
CHUNK_ROWS = 1 << 22  # hashes placed into their buckets at a time


def _new_array(work: Path | None, name: str, dtype, count: int) -> np.ndarray:
    """`[count]` of `dtype`: in memory, or memory-mapped in the folder `work` (file-backed pages: the index
    of a large corpus is built without growing the process's private memory)."""
    if work is None or count == 0:
        return np.empty(count, dtype=dtype)
    return np.lib.format.open_memmap(Path(work) / f"{name}.npy", mode="w+", dtype=dtype, shape=(count,))


def _bucket_shift(count: int) -> tuple[int, int]:
    """(number of buckets, right shift of a 64-bit hash to its bucket): about BUCKET_ROWS hashes a bucket."""
    bits = max(0, (max(1, -(-count // BUCKET_ROWS)) - 1).bit_length())
    return 1 << bits, 64 - bits


def _buckets(hashes: np.ndarray, shift: int) -> np.ndarray:
    """`[n]` uint64 hashes -> `[n]` int64 bucket of each (its top bits; all 0 with one bucket)."""
    if shift >= 64:
        return np.zeros(len(hashes), dtype=np.int64)
    return (hashes >> np.uint64(shift)).astype(np.int64)


@dataclass
class _Table:
    """Sorted window hashes with where each starts."""

    hashes: np.ndarray  # uint64 [N], sorted
    clips: np.ndarray  # int32 [N]
    frames: np.ndarray  # int32 [N]

    @classmethod
    def build(cls, clip_codes: Callable[[int], np.ndarray], n_clips: int, window_frames: int,
              work: Path | None = None, name: str = "table") -> "_Table":
        """The sorted windows of clips 0..n_clips-1 (`clip_codes(i)` -> `[T, Q]`), in the order of one stable
        sort of every (clip, frame): hashes are placed into buckets by their top bits, then each bucket is
        sorted on its own, so the memory a build needs beyond its arrays is one bucket's, whatever the corpus."""
        raw, starts = _raw_hashes(clip_codes, n_clips, window_frames, work, name)  # [N] in clip order, [n_clips+1]
        n_buckets, shift = _bucket_shift(len(raw))
        counts = np.zeros(n_buckets, dtype=np.int64)
        for begin in range(0, len(raw), CHUNK_ROWS):
            counts += np.bincount(_buckets(np.asarray(raw[begin:begin + CHUNK_ROWS]), shift), minlength=n_buckets)
        bounds = np.concatenate([[0], np.cumsum(counts)])  # [n_buckets + 1]
        table = cls(*(_new_array(work, f"{name}_{part}", dtype, len(raw))
                      for part, dtype in (("hashes", np.uint64), ("clips", np.int32), ("frames", np.int32))))
        table._place(raw, starts, bounds[:-1].copy(), shift)
        table._sort_buckets(bounds)
        return table

    def _place(self, raw: np.ndarray, starts: np.ndarray, cursor: np.ndarray, shift: int) -> None:
        """Copy `raw` (clip order) into the buckets, each bucket in clip order; `cursor` `[B]`: next free row."""
        for begin in range(0, len(raw), CHUNK_ROWS):
            hashes = np.asarray(raw[begin:begin + CHUNK_ROWS])  # [n]
            rows = np.arange(begin, begin + len(hashes))
            clips = np.searchsorted(starts, rows, side="right") - 1  # [n] the clip of each row
            bucket = _buckets(hashes, shift)
            order = np.argsort(bucket, kind="stable")
            per_bucket = np.bincount(bucket, minlength=len(cursor))  # [B]
            first = np.cumsum(per_bucket) - per_bucket  # [B] where each bucket starts in `order`
            sorted_buckets = bucket[order]
            destination = cursor[sorted_buckets] + np.arange(len(order)) - first[sorted_buckets]  # [n]
            self.hashes[destination] = hashes[order]
            self.clips[destination] = clips[order]
            self.frames[destination] = (rows - starts[clips])[order]
            cursor += per_bucket

    def _sort_buckets(self, bounds: np.ndarray) -> None:
        """Sort each bucket's rows by hash (stable: equal hashes stay in clip order)."""
        for low, high in zip(bounds[:-1], bounds[1:]):
            if high - low > 1:
                order = np.argsort(self.hashes[low:high], kind="stable")
                for array in (self.hashes, self.clips, self.frames):
                    array[low:high] = array[low:high][order]

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """`[M]` hashes -> `[M]` int64 row of each in the table, -1 where absent."""
        if len(self.hashes) == 0:
            return np.full(len(hashes), -1, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[rows] == hashes, rows, -1)


def _raw_hashes(clip_codes: Callable[[int], np.ndarray], n_clips: int, window_frames: int, work: Path | None,
                name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every clip's window hashes one after the other -> (`[N]` uint64, `[n_clips + 1]` first row of each clip)."""
    counts = [max(0, len(clip_codes(clip)) - window_frames + 1) for clip in range(n_clips)]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [n_clips + 1]
    raw = _new_array(work, f"{name}_raw", np.uint64, int(starts[-1]))
    for clip in range(n_clips):
        if counts[clip]:
            raw[starts[clip]:starts[clip + 1]] = window_hashes(clip_codes(clip), window_frames)
    return raw, starts


@dataclass
class TrainingIndex:
    """The training tokens' window index (all codebooks, and codebook 0 alone)."""

    files: list[str]  # the clips' token files, as the manifest names them
    window_frames: int
    frame_rate: float
    full: _Table
    codebook0: _Table

    @classmethod
    def build(cls, clips: Sequence[np.ndarray], files: list[str], frame_rate: float = 150.0,
              window_frames: int = WINDOW_FRAMES, work: Path | None = None) -> "TrainingIndex":
        """`clips`: each a `[T, Q]` array of one training clip's real frames (a memory map is read a clip at a
        time); `work`: a folder for the tables' memory-mapped arrays (None: in memory)."""
        return cls(files=list(files), window_frames=window_frames, frame_rate=float(frame_rate),
                   full=_Table.build(lambda clip: clips[clip], len(clips), window_frames, work, "full"),
                   codebook0=_Table.build(lambda clip: np.asarray(clips[clip])[:, :1], len(clips), window_frames,
                                          work, "codebook0"))

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.write(tmp)

    def write(self, path: Path) -> None:
        """The index as an uncompressed .npz at `path` (numpy writes a memory-mapped table in 16 MB pieces)."""
        meta = json.dumps({"format": INDEX_FORMAT, "files": self.files, "window_frames": self.window_frames,
                           "frame_rate": self.frame_rate})
        with open(path, "wb") as handle:
            np.savez(handle, meta=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8),
                     **{f"{name}_{part}": getattr(getattr(self, name), part)
                        for name in ("full", "codebook0") for part in ("hashes", "clips", "frames")})

    @classmethod
    def load(cls, path: Path) -> "TrainingIndex":
        """The index at `path`, its tables memory-mapped read-only (a lookup reads a few pages of them; the
        index of 100 hours, 1.7 GB, costs no private memory); read whole if a table is compressed."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"{path}: index format {meta.get('format')!r}, this program reads {INDEX_FORMAT}")
            names = [f"{name}_{part}" for name in ("full", "codebook0") for part in ("hashes", "clips", "frames")]
            arrays = _mapped_members(path, names)
            arrays = {name: arrays[name] if name in arrays else data[name] for name in names}
        tables = {name: _Table(*(arrays[f"{name}_{part}"] for part in ("hashes", "clips", "frames")))
                  for name in ("full", "codebook0")}
        return cls(files=meta["files"], window_frames=int(meta["window_frames"]),
                   frame_rate=float(meta["frame_rate"]), **tables)

    def report(self, piece: np.ndarray, prompt_frames: int = 0) -> dict:
        """Originality of one piece `[T, Q]` (its first `prompt_frames` frames came from the prompt)."""
        piece = np.asarray(piece)
        return {"window_frames": self.window_frames,
                "window_seconds": round(self.window_frames / self.frame_rate, 3),
                **asdict(self._match(self.full, piece, prompt_frames)),
                "codebook0": asdict(self._match(self.codebook0, piece[:, :1], prompt_frames))}

    def _match(self, table: _Table, piece: np.ndarray, prompt_frames: int) -> "Match":
        rows = table.find(window_hashes(piece, self.window_frames))  # [W]
        starts = np.arange(len(rows))
        own = starts >= prompt_frames  # windows that touch no prompt frame
        found = (rows >= 0) & own
        match = Match(windows=int(own.sum()), prompt_windows=int((~own).sum()),
                      copied_windows=int(found.sum()))
        match.copied_share = round(match.copied_windows / match.windows, 4) if match.windows else 0.0
        first, length = _longest_run(found)
        if length:
            row = rows[first]
            match.longest_copy_frames = length + self.window_frames - 1
            match.longest_copy_seconds = round(match.longest_copy_frames / self.frame_rate, 3)
            match.piece_seconds = round(first / self.frame_rate, 3)
            match.training_file = self.files[int(table.clips[row])]
            match.training_seconds = round(int(table.frames[row]) / self.frame_rate, 3)
        return match


def _mapped_members(path: Path, names: list[str]) -> dict:
    """The members `names` of an .npz that numpy stored uncompressed (`np.savez`) as read-only memory maps
    of the file itself: {name: array}; a compressed or empty member is left out (the caller reads it)."""
    mapped = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for name in names:
            info = archive.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            handle.seek(info.header_offset)
            local_header = handle.read(30)  # the member's local header: its name and extra field lengths last
            name_length, extra_length = struct.unpack("<HH", local_header[26:30])
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            if fortran_order or dtype.hasobject or not np.prod(shape):
                continue
            mapped[name] = np.memmap(path, dtype=dtype, mode="r", offset=handle.tell(), shape=shape)
    return mapped


@dataclass
class Match:
    windows: int = 0  # the piece's own windows (no prompt frame in them)
    prompt_windows: int = 0  # windows that touch the prompt: not counted against the piece
    copied_windows: int = 0
    copied_share: float = 0.0
    longest_copy_frames: int = 0
    longest_copy_seconds: float = 0.0
    piece_seconds: float | None = None  # where the longest copied run starts in the piece
    training_file: str | None = None  # ... and where its first window stands in training
    training_seconds: float | None = None


def _longest_run(flags: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in `flags`; (0, 0) when there is none."""
    if not flags.any():
        return 0, 0
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    best = int(np.argmax(stops - starts))
    return int(starts[best]), int(stops[best] - starts[best])


# ---- writing the index of a run ---------------------------------------------------------------
def write_training_index(store, folder: Path, frame_rate: float, log: logging.Logger = LOG) -> Path:
    """Index the train split of a stage-4 `TokenStore` (its real frames, files as the manifests name
    them; a clip's shifted variants, which the model also trained on, under the clip's own file) into
    `folder/training_index.npz`; logs its size and build time."""
    started = time.perf_counter()
    view = _ClipView(store, [int(clip) for clip in store.clips("train")])
    path = Path(folder) / TRAINING_INDEX
    with atomic_path(path) as tmp:  # its tables are memory-mapped in the private folder of the temporary
        index = TrainingIndex.build(view, [store.names[clip] for clip, _ in view.encodings], frame_rate,
                                    work=tmp.parent)
        index.write(tmp)
        windows = len(index.full.hashes)
        del index  # unmap before the folder goes
    clips = {clip for clip, _ in view.encodings}
    frames = sum(int(store.lengths[clip]) for clip in clips)
    variants = f" and {len(view) - len(clips)} shifted variants" if len(view) > len(clips) else ""
    log.info("training index: %d windows of %d train clips%s (%.2f h of frames), %.1f MB, built in %.2f s -> %s",
             windows, len(clips), variants, frames / frame_rate / 3600, path.stat().st_size / 1e6,
             time.perf_counter() - started, path)
    return path


class _ClipView(Sequence):
    """Every encoding of the train clips of a `TokenStore` (each clip, then its shifted variants) as a
    sequence of `[T, Q]` arrays, read one at a time."""

    def __init__(self, store, clips: list[int]):
        self.store = store
        counts = store.encoding_counts
        self.encodings = [(clip, encoding) for clip in clips
                          for encoding in range(1 if counts is None else int(counts[clip]))]  # (clip, encoding)

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, position: int) -> np.ndarray:
        clip, encoding = self.encodings[position]
        if encoding == 0:
            return self.store.clip_codes(clip)
        first = int(self.store.encoding_rows[clip, encoding])  # a variant has its clip's frame count
        return self.store.codes[first:first + int(self.store.lengths[clip])]


def main(argv=None) -> int:
    """`python -m pipeline.originality --model model_results/NAME`: (re)build a trained model's index
    from the manifests of the artists its checkpoint names (for runs made before stage 4 wrote one)."""
    from .cli import StageError, setup_logging
    from .runs import checkpoint_artists, preferred_checkpoint, read_checkpoint
    from .train_data import load_artists

    parser = argparse.ArgumentParser(description=main.__doc__.split(":", 1)[1].strip())
    parser.add_argument("--model", type=Path, required=True, help="the model folder, model_results/NAME")
    parser.add_argument("--root", type=Path, help="the project root (default: the folder above model_results/)")
    parser.add_argument("--allow-outside-root", action="store_true", help="trust manifest paths outside --root")
    args = parser.parse_args(argv)
    log = setup_logging("INFO", "originality")
    checkpoint_path = preferred_checkpoint(args.model)
    if checkpoint_path is None:
        raise SystemExit(f"{args.model} holds no best.pt or last.pt: train the model with stage 4 first")
    checkpoint = read_checkpoint(checkpoint_path, mmap=True)
    root = args.root or args.model.resolve().parent.parent
    try:
        data, _ = load_artists(root, checkpoint_artists(checkpoint), args.allow_outside_root, log)
    except StageError as error:
        raise SystemExit(f"cannot read the training data of {checkpoint_path}: {error}") from None
    write_training_index(data.store, args.model, float(checkpoint["token_contract"].get("frame_rate", 150)), log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
