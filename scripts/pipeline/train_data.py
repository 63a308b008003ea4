"""Stage 4's training data: every token file read once into one int16 array (memory-mapped from each
artist's packed cache, pipeline.token_cache), and the windows cut from it.

    manifests -> `load_artists` -> `Dataset` (a `TokenStore` of all clips back to back, the token
    contract the checkpoint records, the files skipped) -> windows `[N, 2]` of (clip, start) ->
    `make_batch` -> (inputs, targets) `[B, S, Q]` in the codebook pattern's layout.

A training epoch's windows cover every frame of every train clip once, at random offsets that move
every epoch (`epoch_windows`); a joint model of several artists draws each artist's share by its
frames ** alpha (`balanced_epoch_windows`). Validation windows are back to back from frame 0, so
each validation frame is scored exactly once.

Stage 2's shifted variants (`--shifts`) are other encodings of the same clip, not clips: the store keeps
each train clip's encodings (`encoding_rows`), and a training window reads one of them drawn uniformly
from the epoch's seed (`draw_encodings`: windows `[N, 3]` (clip, start, encoding)). Validation, the count
baselines and everything else read the clip itself (encoding 0); without variants nothing changes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .baselines import BaselineScores, fit_and_score
from .cli import StageError
from .contract import PAD, TokenFileError, load_token_file
from .dist import DistInfo
from .manifest import ManifestError, check_uniform, manifest_path, read_manifest
from .patterns import build_sequence

LOG = logging.getLogger("pipeline.stage4")


# ---- the store: every token file read once into one int16 array --------------------------------
@dataclass
class TokenStore:
    """All clips back to back in one contiguous array; a clip is (offset, length) into it."""

    codes: np.ndarray  # int16 [total_frames, Q]
    offsets: np.ndarray  # int64 [n_clips]
    lengths: np.ndarray  # int64 [n_clips]
    splits: list
    names: list
    labels: np.ndarray | None = None  # int64 [n_clips]: each clip's artist label (None: one artist, label 0)
    # train clips' shifted variants (None: no clip has any): where each encoding of a clip starts in `codes`
    # (column 0 = `offsets`, the clip itself; a clip with fewer encodings repeats its own row) and how many
    encoding_rows: np.ndarray | None = None  # int64 [n_clips, E]
    encoding_counts: np.ndarray | None = None  # int64 [n_clips], 1 for a clip without variants

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[1])

    def clip_labels(self, clips: np.ndarray) -> np.ndarray:
        """Artist labels `[N]` of clips `[N]` (0 for every clip of a one-artist store)."""
        if self.labels is None:
            return np.zeros(len(clips), dtype=np.int64)
        return self.labels[clips]

    def clips(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def clip_codes(self, clip: int) -> np.ndarray:
        """One clip's real frames `[T, Q]` (a view)."""
        return self.codes[self.offsets[clip]:self.offsets[clip] + self.lengths[clip]]

    def first_rows(self, windows: np.ndarray) -> np.ndarray:
        """Where each window's clip starts in `codes` `[B]`: the clip itself for windows `[B, 2]`, the
        encoding drawn for windows `[B, 3]` (clip, start, encoding)."""
        if windows.shape[1] == 2:
            return self.offsets[windows[:, 0]]
        return self.encoding_rows[windows[:, 0], windows[:, 2]]



def fit_baselines(store: TokenStore, train_clips: np.ndarray, eval_clips: np.ndarray) -> BaselineScores:
    """Unigram and bigram per codebook fitted on `train_clips`, scored on `eval_clips` (bits per frame)."""
    return fit_and_score([store.clip_codes(c) for c in train_clips], [store.clip_codes(c) for c in eval_clips])


@dataclass
class Dataset:
    store: TokenStore
    token_contract: dict
    skipped: list  # [(audio, reason)] token files that could not be used



# ---- reading the manifests ---------------------------------------------------------------------
def read_training_manifest(root: Path, artist: str, allow_outside_root: bool = False) -> list[dict]:
    """The artist's manifest, checked: exists, not empty, every file present, one Q and bandwidth."""
    path = manifest_path(root, artist)
    try:
        entries = read_manifest(path, root, allow_outside_root=allow_outside_root)
        check_uniform(entries, where=str(path))
    except ManifestError as error:
        raise StageError(str(error)) from None
    for number, entry in enumerate(entries, start=1):
        split = entry.get("split", "train")
        if split not in ("train", "valid"):
            raise StageError(f"{path}: entry {number} ({entry['audio']}) has split {split!r}; "
                             "expected 'train' or 'valid'")
    return entries


def read_artist_manifests(root: Path, artists: list[str], allow_outside_root: bool = False
                          ) -> tuple[list[dict], list[int], list[Path]]:
    """Every artist's manifest, checked, pooled -> (entries, the artist label of each, manifest paths).

    One model reads one token format: every manifest must hold the first one's Q and bandwidth."""
    entries, labels, paths, first = [], [], [], None
    for label, artist in enumerate(artists):
        own = read_training_manifest(root, artist, allow_outside_root)
        token_format = (own[0].get("codebooks"), own[0].get("bandwidth"))  # uniform within the manifest
        if first is None:
            first = (artist, token_format)
        elif token_format != first[1]:
            raise StageError(f"{manifest_path(root, artist)}: artist {artist!r} has {token_format[0]} codebooks at "
                             f"{token_format[1]} kbps, artist {first[0]!r} has {first[1][0]} at {first[1][1]} kbps; "
                             "one model reads one token format: re-tokenize with one --bandwidth")
        entries.extend(own)
        labels.extend([label] * len(own))
        paths.append(manifest_path(root, artist))
    return entries, labels, paths


def load_artists(root: Path, artists: list[str], allow_outside_root: bool = False,
                 log: logging.Logger = LOG) -> tuple[Dataset, list[Path]]:
    """The pooled dataset of `artists` (labels = their positions) and the manifests it came from.

    Every artist needs at least one usable clip in the train split."""
    entries, labels, manifests = read_artist_manifests(root, artists, allow_outside_root)
    data = load_packed_dataset(root, artists, entries, labels, log)
    train_labels = set(data.store.clip_labels(data.store.clips("train")).tolist())
    for label, artist in enumerate(artists):
        if label not in train_labels:
            raise StageError(f"{manifest_path(root, artist)}: no usable clip has split 'train'")
    return data, manifests


def load_packed_dataset(root: Path, artists: list[str], entries: list[dict], entry_labels: list[int],
                        log: logging.Logger = LOG) -> Dataset:
    """The dataset of the pooled `entries` (artist `entry_labels`), each artist's frames memory-mapped from
    its packed cache (pipeline.token_cache: packed on first use, rebuilt when a token file changes), with
    the train clips' shifted variants when the manifests list some."""
    from .token_cache import ConcatenatedCodes, packed_tokens

    packs, used, rows, skipped = [], [], [], []  # per artist's PackedTokens; then, over the pooled entries in
    for label, artist in enumerate(artists):  # order: those packed, where their encodings start, those skipped
        numbers = [number for number, own in enumerate(entry_labels) if own == label]  # this artist's entries
        packs.append(packed_tokens(root, artist, [entries[n] for n in numbers], load_token_file,
                                   check_entry_matches, log))
        first_row = sum(len(pack.codes) for pack in packs[:-1])  # the artist's rows in the pooled codes
        own_used, own_rows, own_skipped = pack_contents(packs[-1].records, entries, numbers, first_row)
        used.extend(own_used)
        rows.extend(own_rows)
        skipped.extend(own_skipped)
    codebook_counts = {int(pack.codes.shape[1]) for pack in packs}
    if len(codebook_counts) > 1:
        raise StageError(f"token files mix codebook counts {sorted(codebook_counts)}; "
                         "re-tokenize the artist with one --bandwidth")
    splits = [entries[n].get("split", "train") for n, _ in used]
    labels = None if len(artists) == 1 else np.array([entry_labels[n] for n, _ in used], dtype=np.int64)  # [n_clips]
    encoding_rows, encoding_counts = encoding_table(rows, splits)
    if encoding_counts is not None:
        log.info("shifted variants: training windows draw among %d encodings of %d train clips (validation "
                 "reads the clips alone)", int(encoding_counts[np.array(splits) == "train"].sum()),
                 splits.count("train"))
    store = TokenStore(codes=packs[0].codes if len(packs) == 1 else ConcatenatedCodes([p.codes for p in packs]),
                       offsets=np.array([own[0] for own in rows], dtype=np.int64),  # [n_clips]
                       lengths=np.array([record["frames"] for _, record in used], dtype=np.int64),  # [n_clips]
                       splits=splits, names=[entries[n]["audio"] for n, _ in used], labels=labels,
                       encoding_rows=encoding_rows, encoding_counts=encoding_counts)
    files = [SimpleNamespace(**record["file"]) for _, record in used]  # what token_contract_of reads of a file
    return Dataset(store=store, token_contract=token_contract_of(files, entries), skipped=skipped)


def pack_contents(records: list[dict], entries: list[dict], numbers: list[int], first_row: int
                  ) -> tuple[list[tuple[int, dict]], list[list[int]], list[tuple[str, str]]]:
    """One artist's cache records (of the pooled `entries` at `numbers`), its rows starting at `first_row`
    -> (the packed entries (number, record), the rows where each one's encodings start (the clip's, then
    its packed variants'), the (audio, reason) of every file skipped). The cache holds the clips back to
    back, then the variants in the same order (pipeline.token_cache)."""
    used, skipped = [], []
    for number, record in zip(numbers, records):
        if "frames" in record:
            used.append((number, record))
        else:
            skipped.append((entries[number]["audio"], record["skipped"]))
    next_row = first_row + sum(record["frames"] for _, record in used)  # the first variant's row
    rows, clip_row = [], first_row
    for number, record in used:
        own = [clip_row]
        clip_row += record["frames"]
        for audio, variant in zip(entries[number].get("variants", []), record.get("variants", [])):
            if "frames" in variant:
                own.append(next_row)
                next_row += variant["frames"]
            else:
                skipped.append((audio, variant["skipped"]))
        rows.append(own)
    return used, rows, skipped


def encoding_table(rows: list[list[int]], splits: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each clip's encoding rows `[n_clips, E]` and counts `[n_clips]` for the store; a valid clip keeps
    only its own encoding (its variants are never read). (None, None) when no train clip has a variant."""
    own = [clip_rows if split == "train" else clip_rows[:1] for clip_rows, split in zip(rows, splits)]
    counts = np.array([len(clip_rows) for clip_rows in own], dtype=np.int64)  # [n_clips]
    if not len(counts) or counts.max() == 1:
        return None, None
    table = np.array([clip_rows + clip_rows[:1] * (counts.max() - len(clip_rows)) for clip_rows in own],
                     dtype=np.int64)  # [n_clips, E]
    return table, counts


def load_dataset(entries: list[dict], log: logging.Logger = LOG, entry_labels: list[int] | None = None) -> Dataset:
    """Read every token file once (int16) into an in-memory TokenStore; unusable files are named and skipped.
    (Stage 4 maps each artist's packed cache instead: `load_packed_dataset`.) Shifted variants are not read:
    this store holds the clips only, as the packed store does without variants.

    `entry_labels`: the artist label of each entry (a joint model's pooled manifests)."""
    chunks, lengths, splits, names, skipped, files, labels = [], [], [], [], [], [], []
    for number, entry in enumerate(entries):
        try:
            token_file = load_token_file(entry["path"])
            check_entry_matches(entry, token_file)
        except TokenFileError as error:
            log.error("skipping a token file: %s", error)
            skipped.append((entry["audio"], str(error)))
            continue
        real = token_file.real_frames  # frames past the audio encode the codec's zero padding: dropped
        chunks.append(token_file.codes[0, :, :real].T.numpy())  # [1, Q, T] -> [real, Q]
        lengths.append(real)
        splits.append(entry.get("split", "train"))
        names.append(entry["audio"])
        files.append(token_file)
        labels.append(0 if entry_labels is None else entry_labels[number])
    if not chunks:
        raise StageError("no usable token file in the manifest (every one was skipped, see above)")
    codebook_counts = {chunk.shape[1] for chunk in chunks}
    if len(codebook_counts) > 1:
        raise StageError(f"token files mix codebook counts {sorted(codebook_counts)}; "
                         "re-tokenize the artist with one --bandwidth")
    codes = np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.int16)  # [total_frames, Q]
    lengths = np.array(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    store = TokenStore(codes=codes, offsets=offsets, lengths=lengths, splits=splits, names=names,
                       labels=None if entry_labels is None else np.array(labels, dtype=np.int64))
    return Dataset(store=store, token_contract=token_contract_of(files, entries), skipped=skipped)


def check_entry_matches(entry: dict, token_file) -> None:
    """The manifest's claims about a file (Q, bandwidth) must match the file itself."""
    where = entry["audio"]
    if "codebooks" in entry and int(entry["codebooks"]) != token_file.n_codebooks:
        raise TokenFileError(f"{where}: the manifest says {entry['codebooks']} codebooks, "
                             f"the file has {token_file.n_codebooks}")
    if "bandwidth" in entry and float(entry["bandwidth"]) != token_file.bandwidth:
        raise TokenFileError(f"{where}: the manifest says {entry['bandwidth']} kbps, "
                             f"the file says {token_file.bandwidth:g}")


def token_contract_of(files: list, entries: list[dict]) -> dict:
    """What stage 5 needs to turn the model's tokens back into audio (saved in every checkpoint)."""
    first = files[0]
    scales = [float(e["median_scale"]) for e in entries if e.get("median_scale") is not None]
    return {"n_codebooks": first.n_codebooks, "bandwidth": float(first.bandwidth), "codec": first.codec,
            "frame_rate": int(first.frame_rate), "sample_rate": int(first.sample_rate),
            "median_scale": float(np.median(scales)) if scales else None}



# ---- windows: which frames go into which batch ------------------------------------------------
def train_window_starts(length: int, context: int, rng: np.random.Generator) -> np.ndarray:
    """Starts of full windows covering every frame of a clip, with random overlaps.

    A clip no longer than the context is one (padded) window. A longer one gets `length // context + 1`
    windows, first at 0 and last at `length - context`; the spare frames become overlaps drawn at
    random, so the window boundaries move every epoch even when the length is a multiple of the context.
    """
    if length <= context:
        return np.zeros(1, dtype=np.int64)
    n_windows = length // context + 1
    spare = n_windows * context - length  # total overlap, >= 1
    cuts = np.sort(rng.integers(0, spare + 1, size=n_windows - 2))
    overlaps = np.diff(np.concatenate([[0], cuts, [spare]]))  # [n_windows - 1], sums to spare
    steps = context - overlaps
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)


def windows_per_clip(length: int, context: int) -> int:
    return 1 if length <= context else length // context + 1


def epoch_windows(store: TokenStore, clips: np.ndarray, context: int, seed: int, epoch: int) -> np.ndarray:
    """This epoch's training windows `[N, 2]` (clip, start), shuffled; the same on every rank. A store
    with shifted variants gives `[N, 3]` (clip, start, encoding): the same windows, each reading one of its
    clip's encodings (`draw_encodings`)."""
    rng = np.random.default_rng([seed, epoch])
    windows = covering_windows(store, clips, context, rng)  # [N, 2]
    return draw_encodings(store, windows[rng.permutation(len(windows))], seed, epoch)


ENCODING_DRAWS = 1  # third word of the seed of the encoding draws (the windows' own generator has two)


def draw_encodings(store: TokenStore, windows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Training windows `[N, 2]` -> `[N, 3]` (clip, start, encoding): each window reads one of its clip's
    encodings, uniformly (0 = the clip itself, then its shifted variants), drawn from the run's seed and the
    epoch by a generator of its own, so the windows are those of a store without variants and a resumed
    epoch draws the same. A store without variants: `windows` as they are."""
    if store.encoding_counts is None:
        return windows
    rng = np.random.default_rng([seed, epoch, ENCODING_DRAWS])
    encodings = rng.integers(0, store.encoding_counts[windows[:, 0]])  # [N], each in 0..count-1
    return np.concatenate([windows, encodings[:, None]], axis=1)  # [N, 2] + [N, 1] -> [N, 3]


def covering_windows(store: TokenStore, clips: np.ndarray, context: int, rng: np.random.Generator) -> np.ndarray:
    """Windows `[N, 2]` (clip, start) covering every frame of `clips` once (in clip order)."""
    windows = []
    for clip in clips:
        starts = train_window_starts(int(store.lengths[clip]), context, rng)  # [n]
        windows.append(np.stack([np.full_like(starts, clip), starts], axis=1))  # [n] -> [n, 2]
    return np.concatenate(windows, axis=0)  # n_clips x [n, 2] -> [N, 2]


def artist_shares(frames_per_artist: np.ndarray, alpha: float) -> np.ndarray:
    """Probability of drawing each artist, proportional to its training frames ** alpha.

    alpha 1: as the data come (a large artist dominates); 0: every artist alike; 0.5 (the default)
    between the two, like multilingual language models' sampling of languages."""
    weights = np.asarray(frames_per_artist, dtype=np.float64) ** alpha  # [A]
    return weights / weights.sum()


def split_count(total: int, shares: np.ndarray) -> np.ndarray:
    """`total` split into integer counts `[A]` that follow `shares` `[A]` and sum to `total` (largest remainder)."""
    exact = shares * total  # [A]
    counts = np.floor(exact).astype(np.int64)
    leftover = int(total - counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


def draw_windows(windows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows of `windows` `[n, 2]`: whole passes over them, then a random subset without repeats."""
    passes, rest = divmod(count, len(windows))
    chosen = windows[rng.choice(len(windows), size=rest, replace=False)]  # [rest, 2]
    return np.concatenate([windows] * passes + [chosen], axis=0)  # -> [count, 2]


def balanced_epoch_windows(store: TokenStore, clips: np.ndarray, context: int, seed: int, epoch: int,
                           alpha: float) -> np.ndarray:
    """A joint model's epoch: as many windows as `epoch_windows` gives, but artist a's share of them is
    proportional to (its training frames) ** alpha, so a small artist is not drowned by a large one.
    Within an artist, its windows are drawn in whole passes, then a random subset. Shuffled `[N, 2]`."""
    rng = np.random.default_rng([seed, epoch])
    labels = store.clip_labels(clips)  # [n_clips]
    artists = np.unique(labels)
    per_artist = [covering_windows(store, clips[labels == a], context, rng) for a in artists]  # A x [n_a, 2]
    frames = [int(store.lengths[clips[labels == a]].sum()) for a in artists]
    counts = split_count(sum(len(w) for w in per_artist), artist_shares(np.array(frames), alpha))  # [A]
    windows = np.concatenate([draw_windows(w, int(c), rng) for w, c in zip(per_artist, counts)], axis=0)  # [N, 2]
    return draw_encodings(store, windows[rng.permutation(len(windows))], seed, epoch)  # [N, 2] or [N, 3]


def valid_windows(store: TokenStore, clips: np.ndarray, context: int) -> np.ndarray:
    """Back-to-back windows `[N, 2]` from frame 0: each validation frame scored exactly once."""
    windows = [(clip, start) for clip in clips for start in range(0, int(store.lengths[clip]), context)]
    return np.array(windows, dtype=np.int64).reshape(-1, 2)


def rank_share(windows: np.ndarray, info: DistInfo, pad: bool) -> np.ndarray:
    """This rank's windows. With `pad`, the list is wrapped round so every rank gets as many (DDP
    needs each rank to run the same number of steps); without it (validation) nothing is repeated."""
    if pad and info.world_size > 1 and len(windows) % info.world_size:
        extra = info.world_size - len(windows) % info.world_size
        windows = np.concatenate([windows, windows[:extra]], axis=0)
    return windows[info.rank::info.world_size]


def train_windows_per_rank(store: TokenStore, clips: np.ndarray, context: int, world_size: int) -> int:
    total = sum(windows_per_clip(int(store.lengths[clip]), context) for clip in clips)
    return math.ceil(total / world_size)


def gather_frames(store: TokenStore, windows: np.ndarray, context: int) -> torch.Tensor:
    """Windows `[B, 2]` (or `[B, 3]` with the encoding) -> frames int16 `[B, context, Q]`, PAD past the end
    of a clip."""
    clip, start = windows[:, 0], windows[:, 1]
    available = np.minimum(context, store.lengths[clip] - start)  # [B]
    steps = np.arange(context)
    index = store.first_rows(windows)[:, None] + start[:, None] + np.minimum(steps, available[:, None] - 1)  # [B, C]
    frames = store.codes[index]  # [B, C] -> [B, C, Q]
    frames[steps[None, :] >= available[:, None]] = PAD
    return torch.from_numpy(frames)


def make_batch(store: TokenStore, windows: np.ndarray, context: int, pattern: str, frame_dropout: float = 0.0,
               rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> (inputs, targets) int16 `[B, S, Q]`; frame dropout blanks input steps (never BOS)."""
    inputs, targets = build_sequence(gather_frames(store, windows, context), pattern)  # 2 x [B, S, Q]
    if frame_dropout > 0:
        dropped = rng.random(inputs.shape[:2]) < frame_dropout  # [B, S]
        dropped[:, 0] = False
        inputs[torch.from_numpy(dropped)] = PAD  # targets keep these frames: only the input is hidden
    return inputs, targets
