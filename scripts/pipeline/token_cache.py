"""Stage 4's packed token cache: each artist's token files packed once into one memory-mapped array.

    encoded_tokens/<artist>/.packed/tokens.npy   int16 [total_frames, Q]: every usable file's real frames,
                                                 back to back in manifest order, then every usable shifted
                                                 variant's (stage 2's --shifts), in the same order
    encoded_tokens/<artist>/.packed/index.json   the format, a stamp of every manifest entry (token file
                                                 path, size, mtime, the manifest's Q and bandwidth, and
                                                 its variants' paths, sizes and mtimes), what each entry
                                                 gave (its frames, or why it was skipped, the file's codec
                                                 fields, and each variant's frames or why it was skipped),
                                                 and the .npy's own size and mtime

The first stage-4 process that needs it builds it (others wait on a file lock in the same folder), then
every run and every process of a node maps the same `.npy` read-only (`np.load(mmap_mode="r")`): the
pages live once in the page cache, and a batch copies only the windows it gathers. The cache holds
every entry of the manifest whatever its split: the split is read from the manifest at each start, so
moving a clip between train and valid does not repack. It is rebuilt when a token file of the manifest
(a variant too) changed (size or mtime), was added or removed, or the manifest's claims about it changed;
without variants, the layout and the index are those of a cache from before variants existed. A cache that
cannot be read, is truncated or does not match its index is rebuilt with a warning, never trusted.
Deleting the folder is always safe: the next run rebuilds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .cli import StageError
from .contract import TokenFileError
from .files import atomic_path, atomic_write_json

LOG = logging.getLogger("pipeline.stage4")
PACK_FORMAT = 1
PACK_FOLDER = ".packed"
CODES_FILE = "tokens.npy"
INDEX_FILE = "index.json"
LOCK_FILE = "pack.lock"
CODES_DTYPE = np.dtype("<i2")


def cache_folder(root: str | Path, artist: str) -> Path:
    """Where an artist's packed cache lives: a hidden folder no listing of token files (`*.th`) sees."""
    return Path(root) / "encoded_tokens" / artist / PACK_FOLDER


@dataclass
class PackedTokens:
    """One artist's packed tokens: `codes` (memory-mapped) and what each manifest entry gave."""

    codes: np.ndarray  # int16 [total_frames, Q], read-only memory map
    records: list[dict]  # per manifest entry: {"frames": int} or {"skipped": reason}, plus "file" fields, and
    # "variants": [{"frames": int} or {"skipped": reason}] for an entry that lists some (packed after every clip)

    @property
    def used(self) -> list[int]:
        """Positions (in the manifest) of the entries packed, in packing order."""
        return [number for number, record in enumerate(self.records) if "frames" in record]


# ---- stamps: what a cache was built from ------------------------------------------------------
def entry_stamps(entries: list[dict]) -> list[dict]:
    """Each entry's token file (resolved path, size, mtime in ns) and the manifest's claims about it, and
    its variants' stamps when it lists some (an entry without keeps the stamp it had before variants)."""
    stamps = []
    for entry in entries:
        stamp = {**path_stamp(entry["path"]), "codebooks": entry.get("codebooks"), "bandwidth": entry.get("bandwidth")}
        if entry.get("variant_paths"):
            stamp["variants"] = [path_stamp(path) for path in entry["variant_paths"]]
        stamps.append(stamp)
    return stamps


def path_stamp(path) -> dict:
    """A token file's resolved path, size and mtime in ns (-1 when it is gone since the manifest was
    read: skipped at packing, rebuilt once it is back)."""
    try:
        status = os.stat(path)
        size, mtime = int(status.st_size), int(status.st_mtime_ns)
    except OSError:
        size, mtime = -1, -1
    return {"path": str(path), "size": size, "mtime_ns": mtime}


def packed_frames(record: dict) -> int:
    """The frames an entry's record put in the cache: its own and its variants'."""
    return record.get("frames", 0) + sum(variant.get("frames", 0) for variant in record.get("variants", []))


def file_stamp(path: Path) -> dict:
    status = path.stat()
    return {"size": int(status.st_size), "mtime_ns": int(status.st_mtime_ns)}


# ---- the entry point ----------------------------------------------------------------------------
def packed_tokens(root: str | Path, artist: str, entries: list[dict], read_token_file: Callable,
                  check_entry: Callable, log: logging.Logger = LOG) -> PackedTokens:
    """The artist's packed tokens, from the cache when it matches `entries`, else packed now.

    `read_token_file(path)` reads one `.th` file; `check_entry(entry, token_file)` raises TokenFileError
    when the manifest's claims do not match the file. Processes of a node take turns on a file lock,
    so one packs and the others then map its result."""
    folder = cache_folder(root, artist)
    stamps = entry_stamps(entries)
    with pack_lock(folder):
        packed = open_cache(folder, stamps, log)
        if packed is None:
            return build_cache(folder, entries, stamps, read_token_file, check_entry, log)  # logs each skip
    for record in packed.records:
        if "skipped" in record:
            log.error("skipping a token file: %s", record["skipped"])
        for variant in record.get("variants", []):
            if "skipped" in variant:
                log.error("skipping a shifted variant: %s", variant["skipped"])
    return packed


@contextlib.contextmanager
def pack_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder/pack.lock` (released when the block ends or the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---- reading a cache ----------------------------------------------------------------------------
def open_cache(folder: Path, stamps: list[dict], log: logging.Logger) -> PackedTokens | None:
    """The cache mapped read-only, or None when there is none, it is stale, or it cannot be trusted."""
    index_path, codes_path = folder / INDEX_FILE, folder / CODES_FILE
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != PACK_FORMAT or index.get("entries") != stamps:
            log.info("the token files changed since %s was packed: packing again", folder)
            return None
        codes = mapped_codes(codes_path, index)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("the packed token cache %s cannot be trusted (%s): packing again", folder, error)
        return None
    return PackedTokens(codes=codes, records=index["records"])


def mapped_codes(codes_path: Path, index: dict) -> np.ndarray:
    """`tokens.npy` mapped read-only `[total_frames, Q]`; ValueError unless it is the file the index describes."""
    if file_stamp(codes_path) != index["codes_file"]:
        raise ValueError(f"{codes_path.name} is not the file its index describes (size or mtime differ)")
    codes = np.load(codes_path, mmap_mode="r", allow_pickle=False)
    expected = (int(index["total_frames"]), int(index["n_codebooks"]))
    if codes.dtype != CODES_DTYPE or codes.shape != expected:
        raise ValueError(f"{codes_path.name} holds {codes.dtype} {list(codes.shape)}, its index says int16 "
                         f"{list(expected)}")
    if sum(packed_frames(record) for record in index["records"]) != expected[0]:
        raise ValueError("the index's clip lengths do not add up to the packed frames")
    return codes


# ---- packing ------------------------------------------------------------------------------------
def build_cache(folder: Path, entries: list[dict], stamps: list[dict], read_token_file: Callable,
                check_entry: Callable, log: logging.Logger) -> PackedTokens:
    """Pack every usable token file's real frames into `tokens.npy`, then write the index (both atomic;
    the index last, so a crash between the two leaves a cache that the next run rebuilds)."""
    started = time.perf_counter()
    codes_path = folder / CODES_FILE
    with atomic_path(codes_path) as tmp:
        records, total, n_codebooks = write_packed_codes(tmp, entries, read_token_file, check_entry, log)
    index = {"format": PACK_FORMAT, "entries": stamps, "records": records, "total_frames": total,
             "n_codebooks": n_codebooks, "codes_file": file_stamp(codes_path)}
    atomic_write_json(index, folder / INDEX_FILE)
    variants = sum("frames" in variant for record in records for variant in record.get("variants", []))
    log.info("packed %d token files%s (%d frames x %d codebooks, %.1f MB) into %s in %.1f s",
             sum("frames" in record for record in records), f" and {variants} shifted variants" if variants else "",
             total, n_codebooks, codes_path.stat().st_size / 1e6, folder, time.perf_counter() - started)
    return PackedTokens(codes=mapped_codes(codes_path, index), records=records)


class PackWriter:
    """The `.npy` being packed: frames appended after a header reserved up front and written last."""

    def __init__(self, handle):
        self.handle, self.total, self.n_codebooks = handle, 0, None
        self.header_size = len(npy_header((0, 1)))  # a header's size does not depend on the frame count
        handle.write(b"\0" * self.header_size)

    def append(self, token_file) -> int:
        """Write the file's real frames `[T, Q]` (past them: the codec's zero padding, dropped); -> T."""
        real = token_file.real_frames
        frames = token_file.codes[0, :, :real].T.numpy().astype(CODES_DTYPE)  # [1, Q, T] -> [real, Q]
        if self.n_codebooks is not None and frames.shape[1] != self.n_codebooks:
            raise StageError(f"token files mix codebook counts {sorted({self.n_codebooks, frames.shape[1]})}; "
                             "re-tokenize the artist with one --bandwidth")
        self.n_codebooks = int(frames.shape[1])
        self.handle.write(np.ascontiguousarray(frames).tobytes())
        self.total += real
        return int(real)

    def finish(self) -> None:
        if self.n_codebooks is None:
            raise StageError("no usable token file in the manifest (every one was skipped, see above)")
        self.handle.seek(0)
        header = npy_header((self.total, self.n_codebooks))
        if len(header) != self.header_size:
            raise ValueError(f"a .npy header of {len(header)} bytes where {self.header_size} were reserved")
        self.handle.write(header)


def write_packed_codes(path: Path, entries: list[dict], read_token_file: Callable, check_entry: Callable,
                       log: logging.Logger) -> tuple[list[dict], int, int]:
    """Stream every usable file's real frames `[T, Q]` into the `.npy` at `path`, one file in memory at a
    time, then every usable variant's: the clips lie where they would without variants.
    -> (a record per entry, total frames, Q)."""
    records = []
    with open(path, "wb") as handle:
        writer = PackWriter(handle)
        for entry in entries:
            try:
                token_file = read_token_file(entry["path"])
                check_entry(entry, token_file)
            except TokenFileError as error:
                log.error("skipping a token file: %s", error)
                records.append({"skipped": str(error)})
                continue
            records.append({"frames": writer.append(token_file), "file": file_fields(token_file)})
        for entry, record in zip(entries, records):
            if entry.get("variant_paths") and "frames" in record:
                record["variants"] = [pack_variant(writer, entry, number, record["frames"], read_token_file,
                                                   check_entry, log) for number in range(len(entry["variant_paths"]))]
        writer.finish()
    return records, writer.total, writer.n_codebooks


def pack_variant(writer: PackWriter, entry: dict, number: int, clip_frames: int, read_token_file: Callable,
                 check_entry: Callable, log: logging.Logger) -> dict:
    """Pack the entry's variant `number` -> {"frames"}, or {"skipped": reason} when it cannot stand in for
    its clip (unreadable, other Q or bandwidth than the manifest says, other frames of audio)."""
    audio = entry["variants"][number]
    try:
        token_file = read_token_file(entry["variant_paths"][number])
        check_entry({**entry, "audio": audio}, token_file)
        if token_file.real_frames != clip_frames:
            raise TokenFileError(f"{audio}: {token_file.real_frames} frames of audio, its clip {entry['audio']} "
                                 f"has {clip_frames}; re-run scripts/2_Tokenization.py --overwrite")
    except TokenFileError as error:
        log.error("skipping a shifted variant: %s", error)
        return {"skipped": str(error)}
    return {"frames": writer.append(token_file)}


def npy_header(shape: tuple[int, int]) -> bytes:
    """The `.npy` (version 1.0) header of a C-ordered int16 array of `shape`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": CODES_DTYPE.str, "fortran_order": False,
                                                  "shape": tuple(int(n) for n in shape)})
    return buffer.getvalue()


def file_fields(token_file) -> dict:
    """What the token contract of a checkpoint needs from a file (see train_data.token_contract_of)."""
    return {"n_codebooks": token_file.n_codebooks, "bandwidth": float(token_file.bandwidth),
            "codec": token_file.codec, "frame_rate": int(token_file.frame_rate),
            "sample_rate": int(token_file.sample_rate)}


# ---- several artists: one array made of their caches ---------------------------------------------
class ConcatenatedCodes:
    """Several packed arrays `[T_i, Q]` read as one `[sum T_i, Q]`, without copying them: the indexing
    a TokenStore does (an integer array of frame rows, or a slice inside one part) is sent to the parts."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(part) for part in parts])]).astype(np.int64)  # [P + 1]
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))
        self.dtype = parts[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.parts, axis=0)  # a full copy: for tests and small data only
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, _ = index.indices(self.shape[0])
            part = int(np.searchsorted(self.starts, start, side="right") - 1)
            if stop <= self.starts[part + 1]:  # inside one part (a clip never spans two): a view
                return self.parts[part][start - self.starts[part]:stop - self.starts[part]]
            return np.asarray(self)[index]
        rows = np.asarray(index)  # any shape of frame rows -> [..., Q]
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty(rows.shape + (self.shape[1],), dtype=self.dtype)
        for number, part in enumerate(self.parts):
            mine = owner == number
            if mine.any():
                out[mine] = part[rows[mine] - self.starts[number]]
        return out
