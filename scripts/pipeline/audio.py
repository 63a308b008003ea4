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
