"""The faster Encodec decoder on the CPU (pipeline.encodec_decoder) against transformers' decoder.

Full scale is 1.0 (a wave in -1..1); the random codec's unscaled decoder output peaks near 4, so a
bound of 1e-4 on it is stricter than 1e-4 of full scale on the audio stage 5 writes."""
from __future__ import annotations

import pytest
import torch

from pipeline.codec import DECODER_ENV, Codec, CodecUnavailable, decoder_choice, load_codec
from pipeline.contract import CODEBOOK_SIZE
from pipeline.decoding import decode_chunked
from pipeline.encodec_decoder import FastEncodecDecoder, UnsupportedDecoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FULL_SCALE_TOLERANCE = 1e-4


def random_codes(frames: int, seed: int, n_codebooks: int = 4) -> torch.Tensor:
    return torch.randint(0, CODEBOOK_SIZE, (n_codebooks, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference_codec(random_codec):
    """The session's random codec (the same model, the same weights) decoding with transformers' decoder."""
    return Codec(random_codec.model, random_codec.name, pretrained=False, decoder="transformers")


@pytest.fixture(scope="module")
def fast_codec(random_codec):
    return Codec(random_codec.model, random_codec.name, pretrained=False, decoder="fast")


@pytest.mark.parametrize("frames", [150, 37, 3, 1])  # a full chunk; short last chunks (1 and 3 frames:
def test_fast_decoder_equals_transformers_decoder(random_codec, frames):  # shorter than the padding)
    model = random_codec.model
    codes = random_codes(frames, seed=frames).unsqueeze(1)  # [Q, 1, F]
    with torch.no_grad():
        embeddings = model.quantizer.decode(codes)  # [1, D, F]
        reference = model.decoder(embeddings)  # [1, 2, F*hop]
    fast = FastEncodecDecoder(model.decoder)(embeddings)
    assert fast.shape == reference.shape == (1, 2, frames * random_codec.hop_length)
    assert float(reference.abs().max()) > 0.5  # a signal on the order of full scale, not near silence
    assert float((fast - reference).abs().max()) <= FULL_SCALE_TOLERANCE


def test_a_batch_decodes_each_piece_as_alone(random_codec):
    model = random_codec.model
    with torch.no_grad():
        embeddings = model.quantizer.decode(torch.stack([random_codes(20, 1), random_codes(20, 2)], 1))  # [2, D, 20]
        reference = model.decoder(embeddings)  # [2, 2, 20*hop]
    decoder = FastEncodecDecoder(model.decoder)
    both = decoder(embeddings)
    assert torch.equal(both[1:], decoder(embeddings[1:]))  # the buffers kept between calls leave nothing behind
    assert float((both - reference).abs().max()) <= FULL_SCALE_TOLERANCE


def test_calls_from_several_threads_at_once_do_not_share_buffers(random_codec):
    import threading

    model = random_codec.model
    with torch.no_grad():
        embeddings = [model.quantizer.decode(random_codes(30, seed).unsqueeze(1)) for seed in (3, 4)]  # [1, D, 30]
    decoder = FastEncodecDecoder(model.decoder)
    alone = [decoder(piece) for piece in embeddings]
    together = [[], []]

    def decode(index):
        for _ in range(3):
            together[index].append(decoder(embeddings[index]))

    workers = [threading.Thread(target=decode, args=(index,)) for index in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(torch.equal(wave, alone[index]) for index in (0, 1) for wave in together[index])
    assert 1 <= len(decoder.idle_buffers) <= 2


def test_the_codec_decodes_with_the_fast_decoder_by_default(random_codec, fast_codec, reference_codec, monkeypatch):
    monkeypatch.delenv(DECODER_ENV, raising=False)
    assert decoder_choice() == "fast" and fast_codec.decoder_in_use == "fast"
    assert reference_codec.decoder_in_use == "transformers"
    codes = random_codes(150, seed=5)
    fast, reference = fast_codec.decode_chunk(codes, 0.2), reference_codec.decode_chunk(codes, 0.2)
    assert float((fast - reference).abs().max()) <= FULL_SCALE_TOLERANCE
    assert not torch.equal(fast, reference)  # it is another computation, not transformers' decoder again


def test_switched_off_the_codec_decodes_exactly_as_before(reference_codec, monkeypatch):
    """decoder="transformers" (or $PIPELINE_CODEC_DECODER=transformers) runs transformers' decoder as the
    codec always did: bit for bit."""
    monkeypatch.setenv(DECODER_ENV, "transformers")
    assert decoder_choice() == "transformers"
    codes = random_codes(150, seed=6)
    model = reference_codec.model
    with torch.no_grad():
        before = model.decoder(model.quantizer.decode(codes.unsqueeze(1)))[0] * 0.3  # [2, F*hop]
    assert torch.equal(reference_codec.decode_chunk(codes, 0.3), before)


def test_an_unknown_decoder_name_is_refused(monkeypatch):
    monkeypatch.setenv(DECODER_ENV, "onnx")
    with pytest.raises(CodecUnavailable, match="unknown Encodec decoder 'onnx'.*fast, transformers"):
        load_codec("random:0")


def test_multi_chunk_decoding_matches_transformers_and_does_not_depend_on_grouping(fast_codec, reference_codec):
    num_samples = 2 * fast_codec.chunk_stride + 3_200  # three chunks, the last holding 10 frames
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, 3 * fast_codec.chunk_frames),
                          generator=torch.Generator().manual_seed(8))  # [1, Q, T]
    scales = torch.tensor([0.5, 1.0, 0.7])
    reference = decode_chunked(reference_codec, codes, scales, num_samples, 3)
    one_pass = decode_chunked(fast_codec, codes, scales, num_samples, 3)
    assert one_pass.shape == reference.shape == (2, num_samples)
    assert float((one_pass - reference).abs().max()) <= FULL_SCALE_TOLERANCE
    assert torch.equal(decode_chunked(fast_codec, codes, scales, num_samples, 1), one_pass)
    assert torch.equal(fast_codec.decode(codes, scales, num_samples), one_pass)


def test_on_a_gpu_or_for_another_layout_transformers_decoder_runs(random_codec, monkeypatch):
    codec = Codec(random_codec.model, random_codec.name, pretrained=False, decoder="fast")
    monkeypatch.setattr(codec, "device", "cuda")
    assert codec.fast_decoder() is None and codec.decoder_in_use == "transformers"

    from transformers import EncodecConfig, EncodecModel

    causal = EncodecModel(EncodecConfig(num_filters=4, hidden_size=8, codebook_dim=8, upsampling_ratios=[2, 2],
                                        chunk_length_s=1.0, overlap=0.01, use_causal_conv=True)).eval()
    with pytest.raises(UnsupportedDecoder, match="causal=True"):
        FastEncodecDecoder(causal.decoder)
    fallback = Codec(causal, "causal", pretrained=False, decoder="fast")
    assert fallback.decoder_in_use == "transformers" and fallback.fast_decoder() is None


@pytest.mark.parametrize("norm_type", ["time_group_norm", "weight_norm"])
def test_other_decoder_layouts_match_too(norm_type):
    """Dilated residual convolutions, an identity shortcut, one LSTM layer, mono, weight norm."""
    from transformers import EncodecConfig
    from transformers.models.encodec.modeling_encodec import EncodecDecoder

    torch.manual_seed(0)
    config = EncodecConfig(audio_channels=1, num_filters=8, hidden_size=16, codebook_dim=16,
                           upsampling_ratios=[4, 3, 2], num_residual_layers=2, use_conv_shortcut=False,
                           num_lstm_layers=1, norm_type=norm_type, use_causal_conv=False)
    decoder = EncodecDecoder(config).eval()
    embeddings = torch.randn(2, 16, 30)  # [B, D, F]
    with torch.no_grad():
        reference = decoder(embeddings)  # [2, 1, 30*24]
    fast = FastEncodecDecoder(decoder)(embeddings)
    assert fast.shape == reference.shape == (2, 1, 720)
    assert float((fast - reference).abs().max()) <= FULL_SCALE_TOLERANCE * max(1.0, float(reference.abs().max()))
