"""One generation job as data: `GenerationRequest`, its limits and checks, and its output folder.

Stage 5's command line builds a request from its parsed options and the studio builds one from its
JSON body; both then hand it to `pipeline.pieces.write_pieces`. The limits are one table (`LIMITS`):
stage 5's parser uses each as an argparse type, and `check_request` applies the same ones to a
request built by other code, naming the field in `InvalidRequest`.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .audio import DEFAULT_TARGET_LUFS
from .cli import artist_name, bounded_number, non_negative_float, non_negative_int, positive_float, positive_int
from .contract import FRAME_RATE, SAMPLE_RATE, VOCAB_SIZE
from .generation import ENGINES
from .lean_decoder import ROW_MAJOR_ROWS
from .patterns import extra_steps
from .precision import DTYPES
from .publish import LOOP_EXTRA_SECONDS
from .sampling import CollapseSettings, SamplingSettings

DEFAULT_CFG_COEF = 3.0  # audiocraft's default guidance for a conditioned model


class GenerationRefused(ValueError):
    """A job that cannot be done as asked (a prompt longer than the piece, an artist the model does not
    know, ...): nothing is written; stage 5 exits with status 2 and the message."""


class InvalidRequest(GenerationRefused):
    """A request's value is out of range, or its fields contradict each other; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class GenerationRequest:
    """Every setting of one generation job; the defaults are stage 5's (its `--help` shows them)."""

    root: Path = Path(".")
    artist: str | None = None  # the output folder and, for a joint model, the label played
    model: str | None = None  # model_results/<model>/ (default: the artist's folder)
    blend: dict | None = None  # {artist: weight >= 0} of a joint model, instead of `artist`
    cfg_coef: float | None = None  # classifier-free guidance (None: DEFAULT_CFG_COEF for a joint model)
    checkpoint: Path | None = None
    epoch: int | None = None
    codec: str | None = None  # None: the checkpoint's
    device: str = "auto"
    threads: int = 0  # 0: the measured plan (`pipeline.generation.thread_plan`)
    dtype: str = "auto"  # generation's precision (`pipeline.precision`): auto, float32, bfloat16 or int8
    prompt_tokens: Path | None = None  # a .th token file to continue
    prompt_audio: Path | None = None  # an audio file to continue
    prompt_seconds: float | None = None  # None: the whole prompt
    seconds: float = 10.0  # each piece's length, prompt included
    context_frames: int | None = None  # None: the training context
    stride_frames: int | None = None  # None: half the context
    use_cache: bool = True  # False: the reference path that recomputes the window every step
    engine: str = "lean"  # the cached engine; "transformers" is the reference it replaced
    cuda_graph: bool = True  # on CUDA, replay each lean step from a captured CUDA graph
    cpu_trace: bool = True  # on a CPU, replay each lean step (and the copy path's mixing) from a TorchScript trace
    copy_path: bool = True  # mix in the checkpoint's fitted in-context copy path (False: the model alone)
    temperature: float = SamplingSettings.temperature
    top_k: int = SamplingSettings.top_k
    top_p: float = SamplingSettings.top_p
    repetition_penalty: float = SamplingSettings.repetition_penalty
    repetition_window: int = SamplingSettings.repetition_window
    seed: int | None = None  # None: drawn and recorded in the sidecar
    num_samples: int = 1  # pieces generated together in one batch
    collapse_bits: float = CollapseSettings.bits
    collapse_window: int = CollapseSettings.window
    boost: float = CollapseSettings.boost
    boost_frames: int = CollapseSettings.boost_frames
    max_temperature: float = CollapseSettings.max_temperature
    decode_chunk_seconds: float = 10.0  # 0: all chunks in one pass
    decode_at_end: bool = False
    target_lufs: float = DEFAULT_TARGET_LUFS
    loop: bool = False  # True: each piece ends where it flows into its start (a seamless loop, `smpl` chunk)
    max_copy_seconds: float | None = None  # regenerate a piece that copies more of the training tokens; None: off
    max_copy_retries: int = 3  # regenerations per piece before it is kept with a warning
    name: str = "sample"  # <name>, or <name>_<i> for several pieces
    overwrite: bool = False

    def parameters(self) -> dict:
        """The request as JSON values (paths as text), for the sidecar."""
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self).items()}

    @property
    def label(self) -> str:
        """The folder under music_transformer/: the artist, or the blend's label."""
        return blend_label(self.blend) if self.blend else self.artist

    @property
    def model_name(self) -> str:
        return self.model or self.artist


# ==== limits ==================================================================================
probability_mass = bounded_number(float, 0.0, 1.0, minimum_inclusive=False)
factor_at_least_one = bounded_number(float, 1.0)  # repetition penalty, boost
loudness_target = bounded_number(float, None, 0.0)

LIMITS = {  # field -> a checker that parses text or a number and raises argparse.ArgumentTypeError
    "cfg_coef": non_negative_float, "epoch": non_negative_int, "threads": non_negative_int,
    "prompt_seconds": positive_float, "seconds": positive_float, "context_frames": positive_int,
    "stride_frames": positive_int, "temperature": non_negative_float, "top_k": non_negative_int,
    "top_p": probability_mass, "repetition_penalty": factor_at_least_one, "repetition_window": positive_int,
    "seed": non_negative_int, "num_samples": positive_int, "collapse_bits": non_negative_float,
    "collapse_window": positive_int, "boost": factor_at_least_one, "boost_frames": positive_int,
    "max_temperature": positive_float, "decode_chunk_seconds": non_negative_float, "target_lufs": loudness_target,
    "max_copy_seconds": non_negative_float, "max_copy_retries": non_negative_int,
}
NAME_FIELDS = ("artist", "model")  # folder names


def check_request(request: GenerationRequest) -> GenerationRequest:
    """Every value within stage 5's limits, or `InvalidRequest` naming the first field that is not."""
    for field in fields(request):
        value = getattr(request, field.name)
        checker = LIMITS.get(field.name) or (artist_name if field.name in NAME_FIELDS else None)
        if checker is None or value is None:
            continue
        try:
            checker(str(value))
        except argparse.ArgumentTypeError as error:
            raise InvalidRequest(field.name, str(error)) from None
    if request.dtype not in DTYPES:
        raise InvalidRequest("dtype", f"{request.dtype!r} is not one of {', '.join(DTYPES)}")
    if request.engine not in ENGINES:
        raise InvalidRequest("engine", f"{request.engine!r} is not one of {', '.join(ENGINES)}")
    if request.blend is not None:
        check_blend(request.blend)
    return request


def check_blend(blend: dict) -> dict:
    """{artist: weight}: folder names, finite weights >= 0 that do not all vanish."""
    for name, weight in blend.items():
        try:
            artist_name(name)
        except argparse.ArgumentTypeError as error:
            raise InvalidRequest("blend", str(error)) from None
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise InvalidRequest("blend", f"the weight of {name!r} is {weight}: weights must be >= 0")
    if sum(blend.values()) <= 0:
        raise InvalidRequest("blend", "the weights sum to 0: at least one must be positive")
    return blend


def check_artist_options(request: GenerationRequest) -> None:
    """An artist or a blend (not both); a blend needs the joint model it mixes."""
    if request.blend and request.artist:
        raise InvalidRequest("blend", "give an artist or a blend, not both")
    if not request.blend and not request.artist:
        raise InvalidRequest("artist", "name an artist (--artist), or a joint model (--model) and a blend")
    if request.blend and not request.model:
        raise InvalidRequest("blend", "a blend needs the joint model whose artists it mixes (--model NAME)")


def blend_label(blend: dict) -> str:
    """A folder name for a blend: blend_A-0.70_B-0.30 (normalised weights, in the order given)."""
    total = sum(blend.values())
    return "blend_" + "_".join(f"{name}-{weight / total:.2f}" for name, weight in blend.items())


# ==== memory ==================================================================================
def estimated_job_bytes(request: GenerationRequest, model_args: dict, contract: dict) -> int:
    """A generous estimate of the memory one job needs, from the checkpoint's `model_args` and
    `token_contract`: the model (and its reduced-precision copy unless `--dtype float32`, and the
    `[out, in]` copies a CPU step of 2-3 rows uses), the KV cache, a prefill's attention, the frame
    buffers and the waves."""
    d_model, layers, heads = int(model_args["d_model"]), int(model_args["n_layer"]), int(model_args["n_head"])
    n_codebooks, positions = int(model_args["n_codebooks"]), int(model_args["n_positions"])
    guided = int(model_args.get("n_artists", 0)) > 0 and request.cfg_coef != 1.0
    rows = request.num_samples * (2 if guided else 1)  # guidance doubles the engine's batch
    context = min(request.context_frames or int(contract.get("context_frames") or positions), positions)
    capacity = min(context + extra_steps(contract.get("pattern", "delay"), n_codebooks) + 1, positions)
    weights = 12 * layers * d_model ** 2 + d_model * n_codebooks * VOCAB_SIZE + positions * d_model
    if request.dtype != "float32":  # generation's copy: at most 2 bytes a weight (bf16; int8 is 1), half a word
        weights += weights // 2
    if rows in ROW_MAJOR_ROWS and not request.device.startswith("cuda"):  # 2-3-row CPU steps: Conv1D copies
        weights += 12 * layers * d_model ** 2
    kv_cache = 2 * layers * rows * capacity * d_model
    prefill = rows * capacity * (heads * capacity + 8 * d_model) + 4 * rows * n_codebooks * VOCAB_SIZE
    seconds = request.seconds + (LOOP_EXTRA_SECONDS[1] if request.loop else 0.0)  # a loop is generated past its end
    frames = math.ceil(seconds * FRAME_RATE) + 2 * FRAME_RATE  # the codec's chunks round up
    frame_buffers = 3 * request.num_samples * frames * n_codebooks * 2  # long = two float32 words
    # every piece's chunk waves and joined wave at the end of decoding, plus one piece being written
    waves = (2 * request.num_samples + 2) * round(seconds * SAMPLE_RATE) * 2
    return 4 * (weights + kv_cache + prefill + frame_buffers + waves)


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
