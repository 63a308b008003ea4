"""Audio decoding and conditioning shared by stage 1 (clips) and stage 5 (prompt audio).

Stereo rule (`to_stereo`): mono -> both channels; stereo unchanged; more channels follow the
ITU-R BS.775 downmix for the WAV/SMPTE orders (L R C LFE Ls Rs [Lb Rb]): centre and surrounds
enter at -3 dB (0.7071), LFE is dropped; other layouts put channel 0 left, channel 1 right and
the rest at -3 dB into both. Loudness normalisation afterwards restores the level.
"""
from __future__ import annotations

import numpy as np
import soundfile as sf
import soxr

from .contract import SAMPLE_RATE

MINUS_3DB = 0.70710678


class AudioDecodeError(ValueError):
    """libsndfile cannot read the file; the message names the file and the reason."""


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


def to_stereo(block: np.ndarray) -> np.ndarray:
    """`[n, C]` (or `[n]`) samples -> `[n, 2]` float32 by the documented rule."""
    if block.ndim == 1:
        block = block[:, None]  # [n] -> [n, 1]
    if block.shape[1] == 2:
        return block.astype(np.float32, copy=False)
    return (block @ downmix_matrix(block.shape[1])).astype(np.float32)  # [n, C] @ [C, 2] -> [n, 2]


def read_audio(path) -> tuple[np.ndarray, int]:
    """Decode a whole file -> (`[n, C]` float32, sample rate); AudioDecodeError if libsndfile cannot."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise AudioDecodeError(f"{path}: cannot decode audio ({error})") from None
    return data, rate


def resample(block: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """`[n, C]` at `rate` -> `[m, C]` at `target`, soxr high quality."""
    if rate == target:
        return block
    return soxr.resample(block, rate, target, quality="HQ").astype(np.float32, copy=False)


DEFAULT_TARGET_LUFS = -20.0  # ITU-R BS.1770 integrated loudness target
PEAK_CEILING_DBFS = -1.0  # the gain is capped so that no sample exceeds this


def integrated_loudness(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """BS.1770 integrated loudness of `[n, 2]` in LUFS (-inf for silence or < 400 ms)."""
    import pyloudnorm

    if wave.shape[0] < int(0.4 * rate):
        return float("-inf")
    return float(pyloudnorm.Meter(rate).integrated_loudness(wave.astype(np.float64)))


def normalisation_gain(loudness: float, peak: float, target_lufs: float = DEFAULT_TARGET_LUFS) -> float:
    """Linear gain that brings `loudness` to the target, capped so `peak * gain` stays under the ceiling."""
    if not np.isfinite(loudness) or peak <= 0:
        return 1.0
    gain = 10 ** ((target_lufs - loudness) / 20)
    ceiling = 10 ** (PEAK_CEILING_DBFS / 20)
    return float(min(gain, ceiling / peak))


def load_conditioned(path, target_lufs: float = DEFAULT_TARGET_LUFS, max_seconds: float | None = None) -> np.ndarray:
    """Decode any file stage 1 reads and condition it the same way: `[n, 2]` float32, 48 kHz, normalised.

    `max_seconds` keeps only the beginning (e.g. a generation prompt).
    """
    data, rate = read_audio(path)
    if max_seconds is not None:
        data = data[: int(round(max_seconds * rate))]
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{path}: holds NaN or infinite samples")
    wave = resample(to_stereo(data), rate)  # [n, C] at rate -> [m, 2] at 48 kHz
    gain = normalisation_gain(integrated_loudness(wave), float(np.abs(wave).max(initial=0.0)), target_lufs)
    return (wave * gain).astype(np.float32)
