"""A faster Encodec decoder for the CPU: transformers' `EncodecDecoder` run as time-major matrix products.

transformers' decoder keeps activations channel-major, `[B, C, T]`. On a CPU that costs, besides the
arithmetic, a reflection pad (a slow kernel) and a fresh padded copy before every convolution,
layout conversions around each convolution, transposed convolutions with few channels that run
far below the speed of the same products as matrix multiplications, a 2-output final convolution
at a few GFLOP/s, and fresh memory for every intermediate (tens of MB a chunk, each page faulted
in anew). BENCHMARKS.md, "A faster Encodec decoder on the CPU", has the profile.

`FastEncodecDecoder` reads the weights of the decoder it is given (nothing is converted or saved)
and runs the same layers on time-major activations `x[T, C]`, one piece at a time:

- a convolution of kernel K is K products `x[k*d : k*d + T] @ W_k` accumulated in place
  (`addmm_`); time-major, each shifted input is a contiguous block of rows, so nothing is copied
  besides the padding (two reversed row slices and one `cat`), and an ELU before the convolution
  runs in place on the padded copy;
- a transposed convolution of stride s and kernel m*s is m products, each added in place into the
  output rows it overlaps (no scatter, no separate overlap-add);
- GroupNorm(1, C) ("time_group_norm") is a sum and a sum of squares over the whole tensor (float32
  pairwise sums) and one multiply-add in place;
- the LSTM is transformers' own `nn.LSTM` on `[T, 1, C]` (no permutes);
- the last convolution, to the audio channels, is one product `[K*2, C] @ x^T` and K shifted adds,
  written channel-major: the wave `[2, T]`;
- intermediates go to buffers kept between calls (about 30 MB for 1 s chunks; one set for each
  call running at the same time).

The audio equals transformers' decoder up to float32 rounding (about 1e-6 of the peak; the tests
hold it within 1e-4). Configurations it does not cover (causal convolutions, padding other than
reflection, weights off the CPU or not float32) raise `UnsupportedDecoder`; `pipeline.codec` then
keeps transformers' decoder.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


class UnsupportedDecoder(ValueError):
    """The decoder's configuration is one this module does not restructure."""


def _modules():
    from transformers.models.encodec import modeling_encodec

    return modeling_encodec


# ==== shared pieces ==============================================================================
class _Buffers:
    """Float32 buffers reused between calls, by name: fresh tensors of several MB each would have
    their pages faulted in (and zeroed by the kernel) on every chunk."""

    def __init__(self):
        self.storage: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        storage = self.storage.get(name)
        if storage is None or storage.numel() < size:
            storage = self.storage[name] = torch.empty(size)
        return storage[:size].view(shape)


def _padding(module) -> tuple[int, int]:
    """The (left, right) padding of a non-causal EncodecConv1d of stride 1 (no extra padding then)."""
    conv = module.conv
    if module.causal or module.pad_mode != "reflect":
        raise UnsupportedDecoder(f"causal={module.causal}, pad_mode={module.pad_mode!r}: only non-causal "
                                 "convolutions with reflection padding are restructured")
    if conv.stride[0] != 1:
        raise UnsupportedDecoder(f"a decoder convolution of stride {conv.stride[0]}")
    total = (conv.kernel_size[0] - 1) * conv.dilation[0]
    return total - total // 2, total // 2


def _reflect_rows(x: torch.Tensor, left: int, right: int, out: torch.Tensor) -> torch.Tensor:
    """Reflection padding along time of `x[T, C]` into `out[left + T + right, C]`, as transformers pads."""
    length = x.shape[0]
    if length <= max(left, right):  # transformers' own helper (zero-extends before reflecting)
        padded = _modules().EncodecConv1d._pad1d(x.T.unsqueeze(0), (left, right), "reflect")  # [1, C, T']
        return out.copy_(padded[0].T)
    return torch.cat([x[1:left + 1].flip(0), x, x[length - right - 1:length - 1].flip(0)], out=out)


class _GroupNorm:
    """GroupNorm(1, C) of transformers' "time_group_norm", applied in place (nothing for weight norm)."""

    def __init__(self, module):
        norm = module.norm if module.norm_type == "time_group_norm" else None
        self.weight = None if norm is None else norm.weight.detach()  # [C]
        self.bias = None if norm is None else norm.bias.detach()  # [C]
        self.eps = None if norm is None else float(norm.eps)

    def __call__(self, y: torch.Tensor, buffers: _Buffers, channel_dim: int = 1) -> torch.Tensor:
        """`y[T, C]` (channel_dim 1) or `[C, T]` (channel_dim 0), contiguous -> normalised, in place."""
        if self.weight is None:
            return y
        flat = y.view(-1)
        count = flat.numel()
        mean = flat.sum() / count  # pairwise float32 sums: about 1e-7 from float64 here
        squares = torch.mul(flat, flat, out=buffers.get("scratch", (count,)))
        variance = (squares.sum() / count - mean * mean).clamp_min(0.0)
        scale = self.weight * torch.rsqrt(variance + self.eps)  # [C]
        shift = self.bias - mean * scale  # [C]
        if channel_dim == 0:
            scale, shift = scale[:, None], shift[:, None]  # [C, 1]
        return torch.addcmul(shift, y, scale, out=y)


def _conv_weight(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The effective weight `[Cout, Cin, K]` (a weight norm evaluated once) and bias `[Cout]`."""
    conv = module.conv
    return conv.weight.detach(), conv.bias.detach()


# ==== layers: each maps `x[T, Cin]` to its output, written into the buffer named `output` ============
class _Conv:
    """EncodecConv1d (stride 1), optionally after an ELU: `x[T, Cin]` -> `[T, Cout]`."""

    def __init__(self, module, output: str):
        weight, self.bias = _conv_weight(module)  # [Cout, Cin, K], [Cout]
        self.taps = [weight[:, :, k].T.contiguous() for k in range(weight.shape[2])]  # K x [Cin, Cout]
        self.dilation = module.conv.dilation[0]
        self.left, self.right = _padding(module)
        self.norm = _GroupNorm(module)
        self.output = output

    def __call__(self, x: torch.Tensor, buffers: _Buffers, elu_alpha: float | None = None,
                 owned: bool = False) -> torch.Tensor:
        """`owned`: `x` may be overwritten (an ELU then runs in place on it)."""
        length, channels = x.shape
        if len(self.taps) > 1:
            shape = (self.left + length + self.right, channels)
            x = _reflect_rows(x, self.left, self.right, buffers.get("scratch", shape))  # [T + K' - 1, Cin]
            owned = True
        if elu_alpha is not None:  # the ELU commutes with the reflection: apply it to the padded copy
            x = F.elu(x, elu_alpha, inplace=owned)
        y = buffers.get(self.output, (length, self.bias.shape[0]))  # [T, Cout]
        torch.addmm(self.bias, x[:length], self.taps[0], out=y)
        for k, tap in enumerate(self.taps[1:], start=1):
            y.addmm_(x[k * self.dilation:k * self.dilation + length], tap)
        return self.norm(y, buffers)


class _OutputConv:
    """The last EncodecConv1d, to the audio channels: `x[T, Cin]` -> channel-major `[Cout, T]`."""

    def __init__(self, module):
        weight, bias = _conv_weight(module)  # [Cout, Cin, K]
        self.out_channels, _, self.kernel = weight.shape
        self.stacked = weight.permute(2, 0, 1).reshape(-1, weight.shape[1]).contiguous()  # [K*Cout, Cin]
        self.bias = bias[:, None]  # [Cout, 1]
        self.dilation = module.conv.dilation[0]
        self.left, self.right = _padding(module)
        self.norm = _GroupNorm(module)

    def __call__(self, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        length, channels = x.shape
        padded_length = self.left + length + self.right
        padded = _reflect_rows(x, self.left, self.right, buffers.get("scratch", (padded_length, channels)))
        taps = torch.mm(self.stacked, padded.T, out=buffers.get("taps", (self.stacked.shape[0], padded_length)))
        c = self.out_channels  # taps: [K*Cout, T + K' - 1], tap k in rows k*Cout .. (k+1)*Cout - 1
        y = torch.add(taps[:c, :length], self.bias, out=buffers.get("wave", (c, length)))  # [Cout, T]
        for k in range(1, self.kernel):
            y += taps[k * c:(k + 1) * c, k * self.dilation:k * self.dilation + length]
        return self.norm(y, buffers, channel_dim=0)


class _ConvTranspose:
    """EncodecConvTranspose1d (non-causal, kernel = m x stride): `x[T, Cin]` -> `[T*stride, Cout]`."""

    def __init__(self, module, output: str):
        conv = module.conv
        weight = conv.weight.detach()  # [Cin, Cout, K]
        in_channels, self.out_channels, kernel = weight.shape
        self.stride = conv.stride[0]
        if module.causal or kernel % self.stride:
            raise UnsupportedDecoder(f"transposed convolution: causal={module.causal}, kernel {kernel}, "
                                     f"stride {self.stride}")
        self.overlaps = kernel // self.stride  # m input frames feed each output frame of `stride` samples
        rows = weight.permute(0, 2, 1).reshape(in_channels, self.overlaps, -1)  # [Cin, m, stride*Cout]
        self.parts = [rows[:, i].contiguous() for i in range(self.overlaps)]  # m x [Cin, stride*Cout]
        self.bias = conv.bias.detach().repeat(self.stride)  # [stride*Cout], (phase, channel)
        trim = kernel - self.stride
        self.left, self.right = trim - trim // 2, trim // 2
        self.norm = _GroupNorm(module)
        self.output = output

    def __call__(self, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        length = x.shape[0]
        frames = length + self.overlaps - 1
        out = buffers.get(self.output, (frames, self.stride * self.out_channels))  # [T + m - 1, stride*Cout]
        torch.addmm(self.bias, x, self.parts[0], out=out[:length])
        out[length:] = self.bias
        for i, part in enumerate(self.parts[1:], start=1):
            out[i:i + length].addmm_(x, part)
        samples = self.norm(out.view(frames * self.stride, self.out_channels), buffers)  # [(T + m - 1)*stride, Cout]
        return samples[self.left:samples.shape[0] - self.right]  # the normalisation saw the untrimmed output


class _Lstm:
    """EncodecLSTM (the LSTM plus its input): `x[T, C]` -> `[T, C]`, through the module's own `nn.LSTM`."""

    def __init__(self, module, output: str):
        self.lstm = module.lstm

    def __call__(self, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        return self.lstm(x.unsqueeze(1))[0].squeeze(1).add_(x)  # [T, 1, C] -> [T, C]


class _ResnetBlock:
    """EncodecResnetBlock: (ELU, conv) pairs plus the shortcut (a 1x1 conv, or the input itself)."""

    def __init__(self, module, output: str):
        layers = list(module.block)
        self.alphas = [float(layer.alpha) for layer in layers[0::2]]  # the ELUs
        convs = layers[1::2]
        names = [f"hidden{index % 2}" for index in range(len(convs) - 1)] + [output]
        self.convs = [_Conv(conv, name) for conv, name in zip(convs, names)]
        shortcut = module.shortcut
        self.shortcut = _Conv(shortcut, "shortcut") if isinstance(shortcut, _modules().EncodecConv1d) else None

    def __call__(self, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        hidden = x
        for alpha, conv in zip(self.alphas, self.convs):
            hidden = conv(hidden, buffers, alpha, owned=hidden is not x)  # x itself feeds the shortcut
        return hidden.add_(x if self.shortcut is None else self.shortcut(x, buffers))


class _Elu:
    def __init__(self, module, output: str):
        self.alpha = float(module.alpha)

    def __call__(self, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        return F.elu(x, self.alpha, inplace=True)  # every step's input is the previous step's own output


# ==== the decoder ===============================================================================
def _steps(decoder) -> list:
    """One step per decoder layer; the steps that write a new tensor alternate between two buffers."""
    modules = _modules()
    kinds = {modules.EncodecConv1d: _Conv, modules.EncodecConvTranspose1d: _ConvTranspose,
             modules.EncodecLSTM: _Lstm, modules.EncodecResnetBlock: _ResnetBlock, torch.nn.ELU: _Elu}
    *layers, last = list(decoder.layers)
    steps, written = [], 0
    for layer in layers:
        if type(layer) not in kinds:
            raise UnsupportedDecoder(f"decoder layer {type(layer).__name__}")
        steps.append(kinds[type(layer)](layer, "even" if written % 2 == 0 else "odd"))
        written += not isinstance(layer, torch.nn.ELU)
    if type(last) is not modules.EncodecConv1d:
        raise UnsupportedDecoder(f"the decoder ends in {type(last).__name__}, not a convolution")
    return steps + [_OutputConv(last)]


class FastEncodecDecoder:
    """transformers' `EncodecDecoder` restructured for the CPU (module docstring), with its weights.

    `FastEncodecDecoder(model.decoder)(embeddings[B, D, F])` -> wave `[B, channels, F*hop]`, as
    `model.decoder(embeddings)` returns it. Raises `UnsupportedDecoder` for a configuration it does
    not cover. It reads the weights when built: build it again after moving the model. Calls from
    several threads are safe: each running call takes a set of buffers of its own.
    """

    def __init__(self, decoder):
        parameter = next(decoder.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            raise UnsupportedDecoder(f"weights on {parameter.device} in {parameter.dtype}: float32 on the CPU only")
        self.steps = _steps(decoder)
        self.idle_buffers: list[_Buffers] = []  # one set per call running at once, kept for the next calls
        self.lock = threading.Lock()

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        with self.lock:
            buffers = self.idle_buffers.pop() if self.idle_buffers else _Buffers()
        try:
            waves = [self._decode(piece, buffers).clone() for piece in embeddings]  # out of the reused buffers
        finally:
            with self.lock:
                self.idle_buffers.append(buffers)
        return torch.stack(waves)  # [B, channels, F*hop]

    def _decode(self, piece: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
        """One piece's embeddings `[D, F]` -> its wave `[channels, F*hop]`, in one of `buffers`."""
        with torch.inference_mode():  # always: the reused buffers are inference tensors
            hidden = piece.T.contiguous()  # [F, D]: time-major
            for step in self.steps:
                hidden = step(hidden, buffers)
        return hidden
