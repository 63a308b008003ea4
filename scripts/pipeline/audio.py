"""Audio decoding and conditioning shared by stage 1 (clips) and stage 5 (prompt audio).

Stereo rule (`to_stereo`): mono -> both channels; stereo unchanged; more channels follow the
ITU-R BS.775 downmix for the WAV/SMPTE orders (L R C LFE Ls Rs [Lb Rb]): centre and surrounds
enter at -3 dB (0.7071), LFE is dropped; other layouts put channel 0 left, channel 1 right and
the rest at -3 dB into both. Loudness normalisation afterwards restores the level.

Two ways in: `load_conditioned` decodes a whole (short) file at once; `stream_stereo` yields
48 kHz stereo blocks of any length of file with bounded memory, and `LoudnessMeter` measures
BS.1770 integrated loudness over such a stream. Both give the same samples: soxr's streaming
resampler returns exactly what its one-shot resampler does, whatever the block size.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.signal
import soundfile as sf
import soxr

from .contract import SAMPLE_RATE

MINUS_3DB = 0.70710678
FLOAT32_MAX = float(np.finfo(np.float32).max)
DECODE_BLOCK_FRAMES = 1 << 16  # ~1.4 s at 44.1 kHz: large enough to amortise Python, small in memory
TRUNCATION_TOLERANCE = 0.01  # MP3 frame counts are estimates; a shortfall beyond 1 % means a cut file


class AudioDecodeError(ValueError):
    """libsndfile cannot read the file; the message names the file and the reason."""

    def __init__(self, path, reason: str | None = None):
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path = path
        self.reason = reason


def downmix_matrix(channels: int) -> np.ndarray:
    """`[channels, 2]` matrix that maps a frame of `channels` samples to stereo."""
    matrix = np.zeros((channels, 2), dtype=np.float64)
    if channels == 1:
        matrix[0] = [1.0, 1.0]
        return matrix
    matrix[0, 0] = matrix[1, 1] = 1.0
    if channels in (6, 8):  # L R C LFE Ls Rs (Lb Rb)
        matrix[2] = [MINUS_3DB, MINUS_3DB]
        for left in range(4, channels, 2):
            matrix[left, 0] = matrix[left + 1, 1] = MINUS_3DB
    else:
        matrix[2:] = MINUS_3DB
    return matrix


def to_stereo(block: np.ndarray, path="audio") -> np.ndarray:
    """`[n, C]` (or `[n]`) samples -> `[n, 2]` float32 by the documented rule.

    Raises AudioDecodeError (naming `path`) when the downmix of finite samples leaves float32's
    range (channels of ~3e38 summed): such a file is refused, never turned into infinities."""
    if block.ndim == 1:
        block = block[:, None]  # [n] -> [n, 1]
    if block.shape[1] == 2:
        return np.ascontiguousarray(block, dtype=np.float32)
    mixed = block @ downmix_matrix(block.shape[1])  # [n, C] @ [C, 2] -> [n, 2], float64
    if np.abs(mixed).max(initial=0.0) > FLOAT32_MAX:
        raise AudioDecodeError(path, f"samples too large to process: they overflow when its {block.shape[1]} "
                                     f"channels are mixed to stereo")
    return mixed.astype(np.float32)


def _check_is_audio_file(path: Path) -> None:
    """Reasons libsndfile would give cryptically (or not at all), named plainly."""
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as error:
            if error.errno == errno.ELOOP:  # exists() says False for a loop too: name it apart
                raise AudioDecodeError(path, "symbolic link loop (following its links never reaches a file)") \
                    from None
        raise AudioDecodeError(path, f"broken symbolic link (points to {os.readlink(path)!r})")
    if path.is_dir():
        raise AudioDecodeError(path, "is a folder, not an audio file")
    if not path.is_file():
        raise AudioDecodeError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")


def ogg_is_complete(path: Path) -> bool:
    """True when an Ogg file ends with a whole end-of-stream page.

    libsndfile decodes a cut Ogg file silently up to its last whole page, so a truncated download
    would pass as a shorter song; the last page tells: it must carry the EOS flag and end exactly
    at the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - (1 << 17)))  # an Ogg page is at most 65,307 bytes
        tail = handle.read()
    start = tail.rfind(b"OggS")
    if start < 0 or len(tail) - start < 27:
        return False
    header_type, n_segments = tail[start + 5], tail[start + 26]
    segments = tail[start + 27:start + 27 + n_segments]
    page_end = start + 27 + n_segments + sum(segments)
    return bool(header_type & 0x04) and len(segments) == n_segments and page_end == len(tail)


def open_audio(path) -> sf.SoundFile:
    """Open a file for block reading; AudioDecodeError (with a plain reason) if it is not usable audio."""
    path = Path(path)
    _check_is_audio_file(path)
    try:
        sound = sf.SoundFile(os.fsencode(path))  # bytes: names that are not valid UTF-8 open too
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        reason = (getattr(error, "error_string", None) or str(error)).strip()  # libsndfile's words, no path
        if reason.startswith("File does not exist"):  # its MP3 reader's words for garbage; the file is there
            reason = "not a recognised audio format"
        raise AudioDecodeError(path, f"cannot decode audio ({reason})") from None
    if sound.frames == 0 or sound.samplerate <= 0 or sound.channels <= 0:
        sound.close()
        raise AudioDecodeError(path, "holds no audio frames (empty or truncated)")
    if sound.format == "OGG" and not ogg_is_complete(path):
        sound.close()
        raise AudioDecodeError(path, "truncated Ogg file (its last page is cut or is not the end of the stream)")
    return sound


def _read_block(sound: sf.SoundFile, path, frames: int) -> np.ndarray:
    """Next `[n, C]` float32 block (n == 0 at the end) with NaN/inf refused."""
    try:
        block = sound.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as error:
        raise AudioDecodeError(path, f"decoding failed part-way ({error})") from None
    if not np.isfinite(block).all():
        raise AudioDecodeError(path, "holds NaN or infinite samples")
    return block


def stream_stereo(path, target: int = SAMPLE_RATE, block_frames: int = DECODE_BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Yield the file as `[n, 2]` float32 blocks at `target` Hz (soxr HQ), a block at a time.

    The concatenated blocks equal `resample(to_stereo(read_audio(path)[0]), rate)`; memory stays
    at a few blocks whatever the file's length. Raises AudioDecodeError, possibly part-way, for a
    file that cannot be decoded, holds NaN, or decodes to fewer frames than its header declares.
    """
    with open_audio(path) as sound:
        rate, declared = sound.samplerate, sound.frames
        resampler = None if rate == target else soxr.ResampleStream(rate, target, 2, dtype="float32", quality="HQ")
        decoded = 0
        while True:
            block = _read_block(sound, path, block_frames)  # [n, C] at rate
            if block.shape[0] == 0:
                break
            decoded += block.shape[0]
            stereo = to_stereo(block, path)  # [n, C] -> [n, 2]
            out = stereo if resampler is None else resampler.resample_chunk(stereo)  # [n, 2] -> [m, 2] at target
            if out.shape[0]:  # soxr holds back the first few samples: a tiny file's first block may be empty
                yield out
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros((0, 2), dtype=np.float32), last=True)  # flush the filter
            if tail.shape[0]:
                yield tail
    if declared > 0 and decoded < declared * (1 - TRUNCATION_TOLERANCE):
        raise AudioDecodeError(path, f"truncated: decoded {decoded} of the {declared} frames its header declares")


def read_audio(path, max_frames: int | None = None) -> tuple[np.ndarray, int]:
    """Decode a file (or its first `max_frames`) -> (`[n, C]` float32, sample rate); AudioDecodeError if it cannot."""
    with open_audio(path) as sound:
        frames = -1 if max_frames is None else max_frames
        return _read_block(sound, path, frames), sound.samplerate


def resample(block: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """`[n, C]` at `rate` -> `[m, C]` at `target`, soxr high quality."""
    if rate == target:
        return block
    return soxr.resample(block, rate, target, quality="HQ").astype(np.float32, copy=False)


def split_windows(carry: np.ndarray, block: np.ndarray, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut `carry + block` (`[n, C]`) into whole windows; return them (a list of `[k, size, C]` views) and the
    leftover `[r, C]`. Only the window that straddles the two is copied: blocks are large, windows small."""
    windows = []
    if carry.shape[0]:
        need = size - carry.shape[0]
        if block.shape[0] < need:
            return [], np.concatenate([carry, block])
        windows.append(np.concatenate([carry, block[:need]])[None])  # [size, C] -> [1, size, C]
        block = block[need:]
    whole = block.shape[0] // size * size
    windows.append(block[:whole].reshape(-1, size, block.shape[1]))  # [k*size, C] -> [k, size, C]
    return windows, block[whole:].copy()


DEFAULT_TARGET_LUFS = -20.0  # ITU-R BS.1770 integrated loudness target
PEAK_CEILING_DBFS = -1.0  # the gain is capped so that no sample exceeds this
GATE_BLOCK_SECONDS = 0.4  # BS.1770 gating block ...
GATE_HOP_SECONDS = 0.1  # ... overlapping by 75 %
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0


def k_weighting_sos(rate: int) -> np.ndarray:
    """BS.1770 K-weighting (pre-filter shelf, then RLB high-pass) as `[2, 6]` second-order sections.

    The analogue prototypes of libebur128, mapped to `rate` by the bilinear transform; at 48 kHz
    they give the coefficients printed in ITU-R BS.1770-4 to 1e-8.
    """
    shelf_freq, shelf_gain_db, shelf_q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = np.tan(np.pi * shelf_freq / rate)
    vh = 10 ** (shelf_gain_db / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / shelf_q + k * k
    shelf = [(vh + vb * k / shelf_q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / shelf_q + k * k) / a0,
             1.0, 2 * (k * k - 1) / a0, (1 - k / shelf_q + k * k) / a0]
    highpass_freq, highpass_q = 38.13547087602444, 0.5003270373238773
    k = np.tan(np.pi * highpass_freq / rate)
    a0 = 1 + k / highpass_q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2 * (k * k - 1) / a0, (1 - k / highpass_q + k * k) / a0]
    return np.array([shelf, highpass])


class LoudnessMeter:
    """Streaming ITU-R BS.1770-4 integrated loudness of stereo audio (channel weights 1, 1).

    `add` K-weights each block with carried filter state and keeps one mean-square pair per
    100 ms hop (16 bytes per 100 ms: 1.2 MB for two hours); `integrated` forms the 400 ms gating
    blocks from four hops and applies the -70 LUFS absolute and -10 LU relative gates.
    """

    def __init__(self, rate: int = SAMPLE_RATE):
        self.sos = k_weighting_sos(rate)
        self.hop = int(round(GATE_HOP_SECONDS * rate))
        self.hops_per_block = int(round(GATE_BLOCK_SECONDS / GATE_HOP_SECONDS))
        self.state = np.zeros((self.sos.shape[0], 2, 2))  # [sections, 2 delays, channels]
        self.carry = np.zeros((0, 2))
        self.hop_energy: list[np.ndarray] = []  # each [k, 2]: sum of squares per hop and channel

    def add(self, block: np.ndarray) -> None:
        if block.shape[0] == 0:  # scipy's sosfilt cannot take an empty block
            return
        filtered, self.state = scipy.signal.sosfilt(self.sos, block, axis=0, zi=self.state)  # float64 out
        windows, self.carry = split_windows(self.carry, filtered, self.hop)
        for window in windows:
            self.hop_energy.append(np.einsum("khc,khc->kc", window, window))  # [k, hop, 2] -> [k, 2]

    def integrated(self) -> float:
        """Integrated loudness in LUFS; -inf for silence or less than one 400 ms block."""
        if not self.hop_energy:
            return float("-inf")
        hops = np.concatenate(self.hop_energy)  # [H, 2]
        n_blocks = hops.shape[0] - self.hops_per_block + 1
        if n_blocks <= 0:
            return float("-inf")
        cumulative = np.concatenate([np.zeros((1, 2)), np.cumsum(hops, axis=0)])  # [H + 1, 2]
        block_energy = cumulative[self.hops_per_block:] - cumulative[:n_blocks]  # [n_blocks, 2]
        mean_square = block_energy / (self.hop * self.hops_per_block)  # z_ij of BS.1770, [n_blocks, 2]
        with np.errstate(divide="ignore"):
            block_loudness = -0.691 + 10 * np.log10(mean_square.sum(axis=1))  # [n_blocks]
        above_absolute = block_loudness >= ABSOLUTE_GATE_LUFS
        if not above_absolute.any():
            return float("-inf")
        relative_gate = -0.691 + 10 * np.log10(mean_square[above_absolute].mean(axis=0).sum()) + RELATIVE_GATE_LU
        gated = above_absolute & (block_loudness > relative_gate)
        return float(-0.691 + 10 * np.log10(mean_square[gated].mean(axis=0).sum()))


def integrated_loudness(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """BS.1770 integrated loudness of `[n, 2]` in LUFS (-inf for silence or < 400 ms)."""
    meter = LoudnessMeter(rate)
    meter.add(to_stereo(wave))
    return meter.integrated()


def normalisation_gain(loudness: float, peak: float, target_lufs: float = DEFAULT_TARGET_LUFS) -> float:
    """Linear gain that brings `loudness` to the target, capped so `peak * gain` stays under the ceiling.

    Unknown loudness (silence, or under 400 ms): no gain, but still the cap, so a short float file
    holding samples beyond full scale is scaled down rather than clipped.
    """
    if not np.isfinite(peak) or peak <= 0:
        return 1.0
    ceiling = 10 ** (PEAK_CEILING_DBFS / 20)
    gain = 10 ** ((target_lufs - loudness) / 20) if np.isfinite(loudness) else 1.0
    return float(min(gain, ceiling / peak))


def normalise_wave(wave: np.ndarray, target_lufs: float = DEFAULT_TARGET_LUFS) -> tuple[np.ndarray, float]:
    """A whole `[n, 2]` 48 kHz wave -> (float32 wave at the target loudness under the peak cap, linear gain)."""
    gain = normalisation_gain(integrated_loudness(wave), float(np.abs(wave).max(initial=0.0)), target_lufs)
    return (wave * gain).astype(np.float32), gain


def load_conditioned(path, target_lufs: float = DEFAULT_TARGET_LUFS, max_seconds: float | None = None) -> np.ndarray:
    """Decode any file stage 1 reads and condition it the same way: `[n, 2]` float32, 48 kHz, normalised.

    `max_seconds` keeps only the beginning (e.g. a generation prompt); only that much is decoded.
    """
    with open_audio(path) as sound:
        rate = sound.samplerate
    max_frames = None if max_seconds is None else int(round(max_seconds * rate))
    data, rate = read_audio(path, max_frames)
    wave = resample(to_stereo(data, path), rate)  # [n, C] at rate -> [m, 2] at 48 kHz
    return normalise_wave(wave, target_lufs)[0]
