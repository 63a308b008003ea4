"""The token contract between stages: special tokens, bandwidths and the `.th` token-file format."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: stage 1 needs the constants only
    import torch

SAMPLE_RATE = 48_000
CHANNELS = 2
FRAME_RATE = 150  # codec frames per second
CHUNK_FRAMES = 150  # frames per Encodec chunk (1 s chunks, 1 % overlap)
HOP_LENGTH = 320  # samples per codec frame
CHUNK_STRIDE = 47_520  # samples between chunk starts: 48,000-sample chunks overlapping by 1 %
CODEBOOK_SIZE = 1024  # real codes are 0..1023
BOS = 1024
PAD = 1025
VOCAB_SIZE = 1026  # per codebook: codes + BOS + PAD
TOKEN_FORMAT = 1
BANDWIDTH_TO_Q = {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}
DEFAULT_CODEC = "facebook/encodec_48khz"
MAX_SHIFTS = HOP_LENGTH  # more offsets than samples in a hop would repeat one
VARIANT_STEM = re.compile(r"^(?P<clip>.+)\.shift(?P<samples>[1-9]\d*)$")  # <clip>.shift<samples>.th


def frames_for(num_samples: int, chunk_frames: int = CHUNK_FRAMES, chunk_stride: int = CHUNK_STRIDE,
               hop_length: int = HOP_LENGTH) -> int:
    """Codec frames that carry `num_samples` of audio: every full chunk, then the last chunk's real frames.

    The codec zero-pads the last chunk to a full one; its frames past the audio encode that padding,
    not music, so whatever learns from or counts tokens uses only these first frames.
    """
    n_chunks = max(1, math.ceil(num_samples / chunk_stride))
    last_chunk_samples = num_samples - (n_chunks - 1) * chunk_stride
    return (n_chunks - 1) * chunk_frames + math.ceil(last_chunk_samples / hop_length)


def samples_for(n_frames: int, chunk_frames: int = CHUNK_FRAMES, chunk_stride: int = CHUNK_STRIDE,
                hop_length: int = HOP_LENGTH) -> int:
    """A `num_samples` whose `frames_for` is `n_frames` (token files written from frames, not audio).

    A last chunk carries at most 149 frames of audio (a chunk overlaps the next by 1 %), so a
    multiple of 150 frames is never a clip's frame count.
    """
    n_chunks = max(1, math.ceil(n_frames / chunk_frames))
    last_frames = n_frames - (n_chunks - 1) * chunk_frames
    num_samples = (n_chunks - 1) * chunk_stride + min(last_frames * hop_length, chunk_stride)
    if n_frames < 1 or frames_for(num_samples, chunk_frames, chunk_stride, hop_length) != n_frames:
        raise ValueError(f"no clip length gives exactly {n_frames} frames (a last chunk holds 1..149)")
    return num_samples


def shift_offsets(shifts: int) -> list[int]:
    """The sub-frame offsets, in samples, of `shifts` encodings of one clip: `round(k x 320 / shifts)`
    for k = 0..shifts-1, spread over one hop (1 -> [0]; 3 -> [0, 107, 213])."""
    if not 1 <= shifts <= MAX_SHIFTS:
        raise ValueError(f"--shifts must be 1..{MAX_SHIFTS} (one hop holds {HOP_LENGTH} samples), got {shifts}")
    return [round(k * HOP_LENGTH / shifts) for k in range(shifts)]


def variant_path(clip_path: str | Path, shift_samples: int) -> Path:
    """The token file of a clip encoded `shift_samples` later: `song_000.th` -> `song_000.shift107.th`
    (offset 0 is the clip's own file)."""
    clip_path = Path(clip_path)
    if shift_samples == 0:
        return clip_path
    return clip_path.with_name(f"{clip_path.stem}.shift{int(shift_samples)}{clip_path.suffix}")


def parse_variant_path(path: str | Path) -> tuple[Path, int] | None:
    """`song_000.shift107.th` -> (`song_000.th`, 107); None for a file that is not a shifted variant.
    Stage 1 names clips `<track>_<iii>`, so no clip of its own is ever read as a variant."""
    path = Path(path)
    match = VARIANT_STEM.match(path.stem)
    if match is None:
        return None
    return path.with_name(match["clip"] + path.suffix), int(match["samples"])


class TokenFileError(ValueError):
    """A token file that cannot be read or breaks the contract."""


def q_for_bandwidth(bandwidth: float) -> int:
    """Number of codebooks Encodec 48 kHz uses at `bandwidth` kbps."""
    try:
        return BANDWIDTH_TO_Q[float(bandwidth)]
    except (KeyError, TypeError, ValueError):
        choices = ", ".join(f"{b:g}" for b in BANDWIDTH_TO_Q)
        raise ValueError(f"unknown bandwidth {bandwidth!r} kbps: choose one of {choices}") from None


def bandwidth_for_q(n_codebooks: int) -> float:
    for bandwidth, q in BANDWIDTH_TO_Q.items():
        if q == n_codebooks:
            return bandwidth
    raise ValueError(f"no Encodec 48 kHz bandwidth uses {n_codebooks} codebooks")


@dataclass
class TokenFile:
    """In-memory form of a `.th` token file (docs/contract.md, 'Token files')."""

    codes: torch.Tensor  # int16 [1, Q, T]
    scales: torch.Tensor | None  # float32 [n_chunks], None for bare-tensor files
    num_samples: int
    bandwidth: float
    codec: str = "unknown"
    source: str = ""
    frame_rate: int = FRAME_RATE
    chunk_frames: int = CHUNK_FRAMES
    sample_rate: int = SAMPLE_RATE
    shift_samples: int = 0  # a variant's sub-frame offset: its audio starts this many samples into the clip
    extra: dict = field(default_factory=dict)

    @property
    def n_codebooks(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_frames(self) -> int:
        return int(self.codes.shape[2])

    @property
    def real_frames(self) -> int:
        """Frames that encode the clip's audio (`frames_for(num_samples)`); the rest encode padding."""
        return min(self.n_frames, frames_for(self.num_samples, self.chunk_frames))

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    def to_dict(self) -> dict:
        import torch

        if self.scales is None:
            raise TokenFileError("cannot write a token file without per-chunk scales")
        return {
            "codes": self.codes.to(torch.int16).contiguous(),
            "scales": self.scales.to(torch.float32).contiguous(),
            "frame_rate": int(self.frame_rate),
            "chunk_frames": int(self.chunk_frames),
            "sample_rate": int(self.sample_rate),
            "num_samples": int(self.num_samples),
            "bandwidth": float(self.bandwidth),
            "codec": str(self.codec),
            "source": str(self.source),
            "format": TOKEN_FORMAT,
            **({"shift_samples": int(self.shift_samples)} if self.shift_samples else {}),  # absent: 0
            **self.extra,
        }


def validate_codes(codes: torch.Tensor, where: str) -> torch.Tensor:
    """Check a codes tensor is an integer `[1, Q, T]` with values in 0..1023; return it as int16."""
    import torch

    if not isinstance(codes, torch.Tensor):
        raise TokenFileError(f"{where}: 'codes' is a {type(codes).__name__}, not a tensor")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TokenFileError(f"{where}: codes have dtype {codes.dtype}, expected an integer dtype (int16)")
    if codes.dim() != 3 or codes.shape[0] != 1:
        raise TokenFileError(f"{where}: codes have shape {list(codes.shape)}, expected [1, Q, T]")
    if codes.shape[1] not in BANDWIDTH_TO_Q.values():
        raise TokenFileError(f"{where}: {codes.shape[1]} codebooks is not one of Encodec's 2, 4, 8, 16")
    if codes.shape[2] == 0:
        raise TokenFileError(f"{where}: codes hold no frames")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= CODEBOOK_SIZE:
        raise TokenFileError(f"{where}: codes range {low}..{high} leaves 0..{CODEBOOK_SIZE - 1}")
    return codes.to(torch.int16)


def load_token_file(path: str | Path) -> TokenFile:
    """Read and validate a `.th` file: the contract dict or a bare `[1, Q, T]` tensor (older files).

    Always `weights_only=True`: a file whose pickle would run code is refused, never executed.
    """
    import torch

    from .cli import error_reason

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe pickles
        reason = error_reason(error)
        raise TokenFileError(f"{path}: not a readable token file ({reason})") from error
    if isinstance(obj, torch.Tensor):
        codes = validate_codes(obj, str(path))
        q = int(codes.shape[1])
        return TokenFile(codes=codes, scales=None, num_samples=int(codes.shape[2]) * SAMPLE_RATE // FRAME_RATE,
                         bandwidth=bandwidth_for_q(q), source="")
    if not isinstance(obj, dict):
        raise TokenFileError(f"{path}: holds a {type(obj).__name__}, expected a dict or a codes tensor")
    if "codes" not in obj:
        raise TokenFileError(f"{path}: no 'codes' key")
    codes = validate_codes(obj["codes"], str(path))
    scales = obj.get("scales")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dim() != 1:
            raise TokenFileError(f"{path}: 'scales' must be a 1-D float tensor")
        scales = scales.to(torch.float32)
        chunk_frames = int(obj.get("chunk_frames", CHUNK_FRAMES))
        if codes.shape[2] != chunk_frames * scales.numel():
            raise TokenFileError(f"{path}: {codes.shape[2]} frames do not match {scales.numel()} chunks "
                                 f"of {chunk_frames} frames")
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise TokenFileError(f"{path}: scales must be finite and positive")
    bandwidth = float(obj.get("bandwidth", bandwidth_for_q(codes.shape[1])))
    if q_for_bandwidth(bandwidth) != codes.shape[1]:
        raise TokenFileError(f"{path}: bandwidth {bandwidth:g} kbps means {q_for_bandwidth(bandwidth)} "
                             f"codebooks, the codes have {codes.shape[1]}")
    known = {"codes", "scales", "frame_rate", "chunk_frames", "sample_rate", "num_samples", "bandwidth",
             "codec", "source", "format", "shift_samples"}
    return TokenFile(
        codes=codes,
        scales=scales,
        num_samples=int(obj.get("num_samples", codes.shape[2] * SAMPLE_RATE // FRAME_RATE)),
        bandwidth=bandwidth,
        codec=str(obj.get("codec", "unknown")),
        source=str(obj.get("source", "")),
        frame_rate=int(obj.get("frame_rate", FRAME_RATE)),
        chunk_frames=int(obj.get("chunk_frames", CHUNK_FRAMES)),
        sample_rate=int(obj.get("sample_rate", SAMPLE_RATE)),
        shift_samples=read_shift_samples(obj, path),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def read_shift_samples(obj: dict, path: Path) -> int:
    """A token file's `shift_samples`: 0 when absent, else an integer offset inside one hop."""
    shift = obj.get("shift_samples", 0)
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < HOP_LENGTH:
        raise TokenFileError(f"{path}: shift_samples is {shift!r}, expected an integer 0..{HOP_LENGTH - 1}")
    return shift


def save_token_file(token_file: TokenFile, path: str | Path) -> None:
    """Write a token file atomically (temporary name, then rename), byte-identical across runs."""
    from .files import atomic_torch_save

    atomic_torch_save(token_file.to_dict(), path)
