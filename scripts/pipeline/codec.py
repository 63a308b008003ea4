"""The one adapter around Encodec 48 kHz (transformers' `EncodecModel`), shared by stages 2 and 5.

Everything else in the project talks to the codec through `Codec`: sample rate, frame rate,
chunking, Q for a bandwidth, `encode` and `decode`. Codec internals stay in this file and, for the
faster decoder on the CPU, in `encodec_decoder.py`.

`--codec` accepts
    facebook/encodec_48khz   a hub id (the default; downloaded once, then read from the HF cache)
    /path/to/folder          a folder holding a saved model (`save_pretrained` / a hub snapshot)
    random | random:<seed>   the same architecture, randomly initialised and seeded: offline and
                             for tests. Its audio is NOT music: outputs say so.

Decoding on the CPU runs transformers' decoder restructured (`encodec_decoder.FastEncodecDecoder`:
the same weights, the same audio within float32 rounding, 1.2-1.6x faster); the environment variable
PIPELINE_CODEC_DECODER=transformers (or `Codec(..., decoder="transformers")`) keeps transformers'
own decoder. On a GPU, transformers' decoder always runs.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import torch

from .cli import error_reason
from .contract import BANDWIDTH_TO_Q, CHANNELS, SAMPLE_RATE, q_for_bandwidth
from .encodec_decoder import FastEncodecDecoder, UnsupportedDecoder

LOG = logging.getLogger("pipeline.codec")
DECODER_ENV = "PIPELINE_CODEC_DECODER"
DECODERS = ("fast", "transformers")  # the first is the default
UNTRAINED_WARNING = ("audio decoded with an UNTRAINED (randomly initialised) Encodec: it is noise-like, "
                     "not music. Install the pretrained weights (see README, 'Codec weights') for real audio.")


class CodecUnavailable(RuntimeError):
    """The codec weights cannot be loaded; the message says how to get them."""


def decoder_choice(value: str | None = None) -> str:
    """`value`, else $PIPELINE_CODEC_DECODER, else "fast": which decoder runs on the CPU."""
    choice = (value if value is not None else os.environ.get(DECODER_ENV, "")).strip().lower() or DECODERS[0]
    if choice not in DECODERS:
        raise CodecUnavailable(f"unknown Encodec decoder {choice!r} (from {DECODER_ENV} or the caller): "
                               f"use one of {', '.join(DECODERS)}")
    return choice


def encodec_48khz_config():
    """The architecture of facebook/encodec_48khz, built offline."""
    from transformers import EncodecConfig

    return EncodecConfig(sampling_rate=SAMPLE_RATE, audio_channels=CHANNELS, normalize=True,
                         chunk_length_s=1.0, overlap=0.01, target_bandwidths=sorted(BANDWIDTH_TO_Q),
                         use_causal_conv=False, norm_type="time_group_norm")


def _random_model(seed: int):
    """The 48 kHz architecture with seeded random weights and usable codebooks.

    transformers initialises the quantizer's codebooks to zeros (the real ones come from k-means
    on data), which would map every frame to code 0. Each residual layer's codebook is drawn from
    a Gaussian matched to the residual it sees on one second of seeded noise, so codes spread
    over 0..1023 as they do with trained weights.
    """
    from transformers import EncodecModel

    with torch.random.fork_rng(devices=[]):  # keep the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = EncodecModel(encodec_48khz_config()).eval()
        noise = 0.1 * torch.randn(1, CHANNELS, SAMPLE_RATE)  # [1, 2, S]
        with torch.no_grad():
            residual = model.encoder(noise)[0].T  # [1, D, F] -> [F, D]
            for layer in model.quantizer.layers:
                codebook = layer.codebook
                codebook.embed.copy_(torch.randn_like(codebook.embed) * residual.std(dim=0))  # [1024, D]
                codebook.embed_avg.copy_(codebook.embed)
                residual = residual - codebook.embed[codebook.quantize(residual)]  # [F, D]
    return model


def _pretrained_model(spec: str):
    from transformers import EncodecModel

    folder = Path(spec).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise CodecUnavailable(f"codec folder {folder} holds no config.json: save it with "
                                   "EncodecModel.save_pretrained(folder) or download a hub snapshot into it")
        source = str(folder)
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise CodecUnavailable(f"codec path {spec} does not exist")
    else:
        source = spec
    try:  # the cache first: no network round trip when the weights are already here
        return EncodecModel.from_pretrained(source, local_files_only=True)
    except OSError:
        if folder.exists():
            raise CodecUnavailable(f"cannot load the codec from {folder}: files are missing or damaged") from None
    LOG.info("codec %s is not cached: downloading it from the Hugging Face hub", spec)
    try:
        return EncodecModel.from_pretrained(source)
    except OSError as error:
        raise CodecUnavailable(
            f"cannot load codec {spec!r}: it is not in the Hugging Face cache and the hub could not be reached "
            f"({error_reason(error)}).\n"
            f"  Get the weights on a machine with internet: `huggingface-cli download {spec}` (then copy "
            f"~/.cache/huggingface to this machine), or pass --codec /path/to/a/saved/folder.\n"
            f"  For an offline test of the mechanics, --codec random uses an untrained codec (noise, not music)."
        ) from None


def parse_random_spec(spec: str) -> int | None:
    """`random` -> 0, `random:<seed>` -> seed, anything else -> None."""
    if spec == "random":
        return 0
    if spec.startswith("random:"):
        try:
            return int(spec.split(":", 1)[1])
        except ValueError:
            raise CodecUnavailable(f"bad codec {spec!r}: use random:<integer seed>") from None
    return None


class Codec:
    """Encodec 48 kHz behind a small interface. Waves are float32 `[B, 2, S]` in -1..1.

    `decoder`: "fast" (the restructured decoder on the CPU) or "transformers" (transformers' own);
    None reads $PIPELINE_CODEC_DECODER (default "fast").
    """

    def __init__(self, model, name: str, pretrained: bool, device: str = "cpu", decoder: str | None = None):
        self.model = model.eval().to(device)
        self.name = name
        self.pretrained = pretrained
        self.device = device
        self.decoder = decoder_choice(decoder)
        self._fast_decoder: FastEncodecDecoder | None = None  # built at the first decode on the CPU
        self._fast_lock = threading.Lock()
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = int(math.prod(config.upsampling_ratios))
        self.frame_rate = int(math.ceil(self.sample_rate / self.hop_length))  # 150
        self.chunk_length = int(config.chunk_length)  # samples per chunk (48,000)
        self.chunk_stride = int(config.chunk_stride)  # samples between chunk starts (47,520)
        self.chunk_frames = self.chunk_length // self.hop_length  # 150
        self.bandwidths = [float(b) for b in config.target_bandwidths]

    # ---- facts --------------------------------------------------------------------------
    def n_codebooks(self, bandwidth: float) -> int:
        q_for_bandwidth(bandwidth)  # raises for unknown bandwidths with a helpful message
        if float(bandwidth) not in self.bandwidths:
            raise ValueError(f"codec {self.name} does not support {bandwidth:g} kbps")
        return q_for_bandwidth(bandwidth)

    def n_chunks(self, num_samples: int) -> int:
        return max(1, math.ceil(num_samples / self.chunk_stride))

    def last_chunk_frames(self, num_samples: int) -> int:
        """Real (unpadded) frames in the last chunk of a `num_samples` wave."""
        last_length = num_samples - (self.n_chunks(num_samples) - 1) * self.chunk_stride
        return math.ceil(last_length / self.hop_length)

    def move_to(self, device: str) -> None:
        self.model.to(device)
        self.device = device
        self._fast_decoder = None  # it read the weights where they were

    @property
    def decoder_in_use(self) -> str:
        """The decoder `decode_chunk` runs now: "fast" or "transformers"."""
        return "fast" if self.fast_decoder() is not None else "transformers"

    def fast_decoder(self) -> FastEncodecDecoder | None:
        """The restructured decoder, when asked for and the codec is on the CPU; else None."""
        if self.decoder != "fast" or torch.device(self.device).type != "cpu":
            return None
        with self._fast_lock:  # the decoding worker and the main thread may both get here first
            if self._fast_decoder is None:
                try:
                    self._fast_decoder = FastEncodecDecoder(self.model.decoder)
                except UnsupportedDecoder as reason:
                    LOG.info("decoding with transformers' Encodec decoder: %s", reason)
                    self.decoder = "transformers"
            return self._fast_decoder

    # ---- encode -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wave: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
        """wave `[B, 2, S]` (or `[2, S]`) -> codes int16 `[B, Q, n_chunks*150]`, scales float32 `[B, n_chunks]`."""
        if wave.dim() == 2:
            wave = wave.unsqueeze(0)  # [2, S] -> [1, 2, S]
        if wave.dim() != 3 or wave.shape[1] != self.channels:
            raise ValueError(f"expected a stereo wave [B, 2, S], got shape {list(wave.shape)}")
        self.n_codebooks(bandwidth)
        wave = wave.to(self.device, torch.float32)
        out = self.model.encode(wave, bandwidth=float(bandwidth), return_dict=True)
        codes = out.audio_codes  # [n_chunks, B, Q, F]; F < 150 only for a wave shorter than one chunk
        if codes.shape[-1] < self.chunk_frames:  # pad as transformers pads a short last chunk: T = 150 x n_chunks
            codes = torch.nn.functional.pad(codes, (0, self.chunk_frames - codes.shape[-1]))  # -> [n_chunks, B, Q, 150]
        codes = codes.permute(1, 2, 0, 3).reshape(codes.shape[1], codes.shape[2], -1)  # -> [B, Q, n_chunks*150]
        scales = torch.cat([s.reshape(-1, 1) for s in out.audio_scales], dim=1)  # n_chunks x [B, 1] -> [B, n_chunks]
        return codes.to(torch.int16).cpu(), scales.to(torch.float32).cpu()

    # ---- decode -------------------------------------------------------------------------
    @torch.no_grad()
    def decode_chunk(self, chunk_codes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """One chunk: codes `[Q, F]` (F <= 150) -> wave `[2, F*hop]` on the CPU, scaled."""
        codes = chunk_codes.to(self.device, torch.long).unsqueeze(0)  # [Q, F] -> [1, Q, F]
        embeddings = self.model.quantizer.decode(codes.transpose(0, 1))  # [Q, 1, F] -> [1, D, F]
        fast = self.fast_decoder()
        wave = self.model.decoder(embeddings) if fast is None else fast(embeddings)  # [1, 2, F*hop]
        return (wave[0] * float(scale)).float().cpu()

    def decode_chunks(self, codes: torch.Tensor, scales: torch.Tensor, num_samples: int,
                      first: int, stop: int) -> list[torch.Tensor]:
        """Chunks `first..stop-1` of codes `[1, Q, T]` -> list of per-chunk waves `[2, L]` (CPU)."""
        n_chunks = self.n_chunks(num_samples)
        waves = []
        for index in range(first, min(stop, n_chunks)):
            start = index * self.chunk_frames
            frames = self.last_chunk_frames(num_samples) if index == n_chunks - 1 else self.chunk_frames
            waves.append(self.decode_chunk(codes[0, :, start:start + frames], scales[index]))
        return waves

    def overlap_add(self, chunk_waves: list[torch.Tensor], num_samples: int) -> torch.Tensor:
        """Encodec's linear overlap-add of per-chunk waves -> `[2, num_samples]`."""
        total = self.chunk_stride * (len(chunk_waves) - 1) + chunk_waves[-1].shape[-1]
        position = torch.linspace(0, 1, self.chunk_length + 2, dtype=torch.float32)[1:-1]
        weight = 0.5 - (position - 0.5).abs()  # triangle peaking mid-chunk, [chunk_length]
        out = torch.zeros(chunk_waves[0].shape[0], total)
        weight_sum = torch.zeros(total)
        for index, wave in enumerate(chunk_waves):
            offset = index * self.chunk_stride
            length = wave.shape[-1]
            out[:, offset:offset + length] += weight[:length] * wave
            weight_sum[offset:offset + length] += weight[:length]
        out = out / weight_sum
        if out.shape[-1] < num_samples:  # never expected: the codec covers the whole input
            out = torch.nn.functional.pad(out, (0, num_samples - out.shape[-1]))
        return out[:, :num_samples]

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, num_samples: int) -> torch.Tensor:
        """codes `[1, Q, T]` + scales `[n_chunks]` -> stereo wave `[2, num_samples]` (CPU, float32)."""
        n_chunks = self.n_chunks(num_samples)
        if codes.shape[-1] < n_chunks * self.chunk_frames - (self.chunk_frames - self.last_chunk_frames(num_samples)):
            raise ValueError(f"{codes.shape[-1]} frames are too few for {num_samples} samples")
        if scales.numel() < n_chunks:
            raise ValueError(f"{scales.numel()} scales for {n_chunks} chunks")
        return self.overlap_add(self.decode_chunks(codes, scales, num_samples, 0, n_chunks), num_samples)


def load_codec(spec: str, device: str = "cpu", decoder: str | None = None) -> Codec:
    """Load the codec named by `spec` (hub id, local folder, `random`, `random:<seed>`); `decoder` as in `Codec`."""
    decoder = decoder_choice(decoder)  # a bad $PIPELINE_CODEC_DECODER fails before the weights load
    seed = parse_random_spec(spec)
    if seed is not None:
        LOG.warning("using a RANDOM, untrained Encodec (seed %d): tokens and audio are not musical", seed)
        return Codec(_random_model(seed), name=f"random:{seed}", pretrained=False, device=device, decoder=decoder)
    model = _pretrained_model(spec)
    return Codec(model, name=spec, pretrained=True, device=device, decoder=decoder)


def probe(spec: str, timeout: float = 3.0) -> str:
    """Can `spec` be loaded without waiting on retries?

    Returns 'random', 'local', 'cached', 'downloadable' or 'unavailable'.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if parse_random_spec(spec) is not None:
        return "random"
    if Path(spec).expanduser().exists():
        return "local" if (Path(spec).expanduser() / "config.json").is_file() else "unavailable"
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(spec, name) for name in ("config.json", "model.safetensors")]
    if all(isinstance(path, str) for path in cached):
        return "cached"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "unavailable"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return "unavailable"
    return "downloadable"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Say whether a codec spec can be loaded here (used by run_pipeline.sh).")
    parser.add_argument("--probe", required=True, metavar="SPEC", help="hub id, local folder or random[:seed]")
    print(probe(parser.parse_args().probe))
