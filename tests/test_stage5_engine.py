"""The generation core: the lean decoder against the training model, long greedy runs against the
recompute reference, progress and cancel, and overlapped decoding against decoding at the end."""
from __future__ import annotations

import pytest
import torch

from pipeline import decoding, generation, sampling
from pipeline.contract import BOS, CODEBOOK_SIZE, PAD
from pipeline.copying import CopyPath
from pipeline.lean_decoder import LeanDecoder, TracedStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


POSITIONS = ["learned", "rope", "alibi"]  # every position scheme (pipeline.positions) is held to the same exactness


def spread_model(transformer_module, context_frames=40, n_codebooks=4, seed=0, positions="learned"):
    """A tiny model whose logits spread far above float noise (greedy ties would make tokens arbitrary)."""
    torch.manual_seed(seed)
    args = transformer_module.model_args_for("tiny", n_codebooks, context_frames, {"positions": positions})
    model = transformer_module.MusicTransformer(args).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
        for table in model.embeddings:
            table.weight[PAD] = 0.0
    return model


def random_tokens(batch, length, n_codebooks=4, seed=1):
    return torch.randint(0, CODEBOOK_SIZE, (batch, length, n_codebooks), generator=torch.Generator().manual_seed(seed))


# ---- the lean decoder against the training model's full forward ----------------------------------
def one_step(decoder, traced, mode, row, position):
    """One lean step of `row` `[B, 1, Q]` at `position` the way `mode` runs it -> logits `[B, Q, V]`."""
    if mode == "step":
        return decoder.step(row)
    if mode == "traced":
        return traced(row)
    visible = decoder.slots[:position + 1] if mode == "visible" else None  # "static": the whole cache, masked
    logits = decoder.step_static(row, torch.tensor([position]), visible)
    decoder.length += 1
    return logits


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("mode", ["step", "static", "visible", "traced"])
def test_lean_logits_equal_full_forward_at_every_step(transformer_module, mode, positions):
    """Every way to step: eager, fixed shapes (CUDA graphs), the attended slice given (`visible`), and its
    TorchScript trace (the CPU default), which must serve every position from one trace."""
    model = spread_model(transformer_module, positions=positions)
    tokens = random_tokens(3, 40)  # [B, T, Q], batch > 1
    with torch.inference_mode():
        full, _ = model(tokens)  # [B, T, Q, V]
        decoder = LeanDecoder(model, batch=3, capacity=44)
        traced = TracedStep(decoder, 4, BOS) if mode == "traced" else None
        logits = [decoder.prefill(tokens[:, :5])]  # positions 0..4
        for position in range(5, 40):
            logits.append(one_step(decoder, traced, mode, tokens[:, position:position + 1], position))
    engine = torch.stack(logits, dim=1)  # 36 x [B, Q, V] -> [B, 36, Q, V]
    assert float((engine - full[:, 4:]).abs().max()) <= 1e-4
    assert float(full.std()) > 1.0  # the comparison is about real logits, not a flat zero


def test_steps_of_two_rows_use_row_major_copies_that_follow_the_weights(transformer_module):
    """CPU steps of 2-3 rows (CFG of one piece) multiply by `[out, in]` copies of the Conv1D weights:
    the logits match the full forward, and a weight changed in place (training) is copied again."""
    from pipeline import lean_decoder

    model = spread_model(transformer_module)
    tokens = random_tokens(2, 12)  # [B=2, T, Q]
    conv = model.backbone.h[0].attn.c_attn
    for change in range(2):
        with torch.inference_mode():
            full, _ = model(tokens)  # [B, T, Q, V]
            decoder = LeanDecoder(model, batch=2, capacity=12)
            decoder.prefill(tokens[:, :11])
            last = decoder.step(tokens[:, 11:12])  # [B, Q, V], 2 rows: the row-major path
        assert float((last - full[:, 11]).abs().max()) <= 1e-4
        assert lean_decoder._row_major_copies[conv][0] == conv.weight._version  # made by the step, current
        copy = lean_decoder.row_major_weight(conv)
        assert copy.shape == conv.weight.shape[::-1] and torch.equal(copy, conv.weight.t())
        if change == 0:
            with torch.no_grad():
                conv.weight.mul_(1.5)  # in place, as an optimizer step: the copy must follow


def test_lean_decoder_refuses_what_its_cache_cannot_hold(transformer_module):
    model = spread_model(transformer_module)
    decoder = LeanDecoder(model, batch=1, capacity=4)
    with torch.inference_mode():
        decoder.prefill(random_tokens(1, 4))
        with pytest.raises(ValueError, match="holds 4 positions"):
            decoder.step(random_tokens(1, 1))
    with pytest.raises(ValueError, match="exceeds the model's"):
        LeanDecoder(model, batch=1, capacity=10_000)


# ---- 1,500 greedy frames through window slides, against the recompute path --------------------------
class RecordingSteps:
    """Wraps a steps object and keeps every logits tensor it returns."""

    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def prefill(self, tokens):
        self.logits.append(self.inner.prefill(tokens).clone())
        return self.logits[-1]

    def step(self, row, position):
        self.logits.append(self.inner.step(row, position).clone())
        return self.logits[-1]


def greedy_run(model, pattern, use_cache, total_frames=1500, context=100, stride=37, batch=2, engine="lean",
               **settings_fields):
    settings = generation.GenerationSettings(pattern=pattern, context_frames=context, stride_frames=stride,
                                             use_cache=use_cache, num_samples=batch, engine=engine, **settings_fields)
    engine = generation.TokenGenerator(model, settings, sampling.SamplingSettings(temperature=0.0), None, None, "cpu")
    engine.steps, engine._steps_batch = RecordingSteps(engine.make_steps(batch)), batch
    prompt = random_tokens(1, 7, seed=5)  # [1, L, Q]
    frames = engine.generate(prompt, total_frames)
    return frames, engine.steps.logits


@pytest.mark.slow
@pytest.mark.parametrize("pattern, positions", [("parallel", "learned"), *(("delay", scheme) for scheme in POSITIONS)])
def test_lean_greedy_equals_recompute_over_1500_frames(transformer_module, pattern, positions):
    """The pattern decides which rows are generated, the position scheme how the lean decoder scores them:
    both patterns (learned), and every scheme with the default pattern."""
    model = spread_model(transformer_module, context_frames=100, positions=positions)
    lean, lean_logits = greedy_run(model, pattern, use_cache=True)
    reference, reference_logits = greedy_run(model, pattern, use_cache=False)
    assert lean.shape == (2, 1500, 4)
    assert torch.equal(lean, reference)  # every token, both pieces, across ~40 window slides
    assert len(lean_logits) == len(reference_logits) >= 1500 - 7  # one logits tensor per generated row
    worst = max(float((a - b).abs().max()) for a, b in zip(lean_logits, reference_logits))
    assert worst <= 1e-4
    assert int(lean.min()) >= 0 and int(lean.max()) < CODEBOOK_SIZE


def test_the_transformers_cache_engine_equals_recompute_too(transformer_module):
    model = spread_model(transformer_module, context_frames=30)
    cached, _ = greedy_run(model, "delay", True, total_frames=80, context=30, stride=11, engine="transformers")
    reference, _ = greedy_run(model, "delay", False, total_frames=80, context=30, stride=11)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("positions", POSITIONS)
def test_traced_steps_equal_eager_steps_across_window_slides(transformer_module, positions):
    """The CPU default replays each step (and the copy path's mixing) from a TorchScript trace: the same
    tokens and logits as the eager engine, through window slides (re-prefills of the cache the trace holds)."""
    model = spread_model(transformer_module, context_frames=30, positions=positions)
    copy_path = CopyPath(n=2, beta=1.0, gate=[0.0] + [0.3] * 9).as_record()  # active: every step mixes
    runs = {trace: greedy_run(model, "delay", True, total_frames=90, context=30, stride=11, cpu_trace=trace,
                              copy_path=copy_path) for trace in (False, True)}
    (eager, eager_logits), (traced, traced_logits) = runs[False], runs[True]
    assert torch.equal(traced, eager)
    assert len(traced_logits) == len(eager_logits) > 80
    assert max(float((a - b).abs().max()) for a, b in zip(traced_logits, eager_logits)) <= 1e-5


def test_a_torch_that_cannot_trace_generates_eagerly(transformer_module, monkeypatch, caplog):
    """TorchScript is deprecated: where `torch.jit.trace` fails, the step and the copy path's mixing run
    eagerly (each logged once) and the tokens are those of the traced run."""
    model = spread_model(transformer_module, context_frames=30)
    copy_path = CopyPath(n=2, beta=1.0, gate=[0.0] + [0.3] * 9).as_record()
    traced, _ = greedy_run(model, "delay", True, total_frames=60, context=30, stride=11, copy_path=copy_path)

    def refuse(*_, **__):
        raise RuntimeError("this torch cannot trace")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    with caplog.at_level("WARNING"):
        steps = generation.LeanSteps(model, 1, 34, cuda_graph=False, cpu_trace=True)
        fallback, _ = greedy_run(model, "delay", True, total_frames=60, context=30, stride=11, copy_path=copy_path)
    assert steps.graphed is None and "tracing the lean step failed (this torch cannot trace)" in caplog.text
    assert caplog.text.count("tracing the copy path's mixing failed (this torch cannot trace)") == 1
    assert torch.equal(fallback, traced)


@pytest.mark.parametrize("positions", POSITIONS)
def test_batch_pieces_equal_single_pieces(transformer_module, positions):
    """A piece of a batch gets the tokens it would get alone (greedy): batching changes only the speed."""
    model = spread_model(transformer_module, context_frames=30, positions=positions)
    batched, _ = greedy_run(model, "delay", True, total_frames=80, context=30, stride=11, batch=3)
    alone, _ = greedy_run(model, "delay", True, total_frames=80, context=30, stride=11, batch=1)
    assert torch.equal(batched, alone.expand(3, -1, -1))


# ---- progress and cancel ---------------------------------------------------------------------------
def test_progress_reports_final_frames_in_order_and_cancel_stops(transformer_module):
    model = spread_model(transformer_module, context_frames=20)
    settings = generation.GenerationSettings(pattern="delay", context_frames=20, stride_frames=7)
    reports = []

    def progress(final_frames, frames):
        reports.append(final_frames)
        assert bool((frames[:, :final_frames] >= 0).all())  # a frame reported final has every codebook

    frames, _ = generation.generate_frames(model, random_tokens(1, 5), 50, settings,
                                           sampling.SamplingSettings(), None, seed=3, device="cpu",
                                           progress=progress)
    assert reports == list(range(5, 51)) and frames.shape == (1, 50, 4)
    checks = []

    def cancel():  # asked once for the (empty) prompt, then once a frame
        checks.append(1)
        return len(checks) > 12

    with pytest.raises(generation.GenerationCancelled, match="after 12 frames"):
        generation.generate_frames(model, None, 50, settings, sampling.SamplingSettings(), None, seed=3,
                                   device="cpu", cancel=cancel)


# ---- overlapped decoding ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pieces(random_codec):
    audio_samples = 2 * random_codec.chunk_stride + 3_200  # three chunks, the last holding 10 frames
    n_frames = decoding.frames_for_samples(random_codec, audio_samples)
    frames = random_tokens(2, n_frames, seed=9)  # [B, N, Q]
    scales = torch.tensor([0.05, 0.1, 0.07])
    at_end = [decoding.decode_chunked(random_codec,
                                      decoding.frames_to_chunk_codes(random_codec, frames[i:i + 1], audio_samples),
                                      scales, audio_samples, 3) for i in range(2)]
    return frames, scales, audio_samples, at_end


def test_overlapped_decoding_equals_decoding_at_the_end(random_codec, pieces):
    frames, scales, audio_samples, at_end = pieces
    decoder = decoding.OverlappedDecoder(random_codec, scales, audio_samples, batch=2, chunks_per_pass=3,
                                         threads=1)
    live = torch.full_like(frames, -1)  # the generator's buffer: frames become final one by one
    for final in range(1, frames.shape[1] + 1):
        live[:, final - 1] = frames[:, final - 1]
        decoder.frames_final(final, live)
        if final in (149, 150):
            assert decoder.queued == final - 149  # chunk 0 is queued as soon as its 150 frames are final
    waves = decoder.finish(frames)
    assert decoder.error is None and decoder.busy_seconds > 0
    for wave, reference in zip(waves, at_end):
        assert wave.shape == (2, audio_samples) and torch.equal(wave, reference)


def test_overlapped_decoding_recovers_from_a_worker_failure(random_codec, pieces, monkeypatch):
    frames, scales, audio_samples, at_end = pieces
    real_decode_chunk = random_codec.decode_chunk
    calls = []

    def failing_once(codes, scale):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_decode_chunk(codes, scale)

    monkeypatch.setattr(random_codec, "decode_chunk", failing_once)
    decoder = decoding.OverlappedDecoder(random_codec, scales, audio_samples, batch=2, chunks_per_pass=1,
                                         threads=1)
    waves = decoder.finish(frames)
    assert isinstance(decoder.error, torch.cuda.OutOfMemoryError)
    for wave, reference in zip(waves, at_end):
        assert torch.equal(wave, reference)  # decoded again at the end: the same audio


# ---- sampling ----------------------------------------------------------------------------------------
def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_mass():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20_000, -1).contiguous()  # [R, K]
    choice = sampling.draw_categorical(probs, torch.Generator().manual_seed(0))  # [R, 1]
    counts = torch.bincount(choice.flatten(), minlength=5).float() / 20_000
    assert counts[1] == 0 and counts[4] == 0  # zero-mass candidates are never drawn
    assert torch.allclose(counts, probs[0], atol=0.015)


def test_a_window_beyond_the_position_table_is_refused(transformer_module):
    model = spread_model(transformer_module, context_frames=20)  # 24 positions
    settings = generation.GenerationSettings(pattern="delay", context_frames=22, stride_frames=5)
    with pytest.raises(ValueError, match="needs 25 positions, the model has 24"):
        generation.TokenGenerator(model, settings, sampling.SamplingSettings(), None, None, "cpu")


# ---- settings ----------------------------------------------------------------------------------------
def test_the_pattern_has_no_default_and_must_be_known():
    with pytest.raises(TypeError, match="pattern"):
        generation.GenerationSettings(context_frames=20)  # the checkpoint says which: no silent default
    with pytest.raises(ValueError, match="unknown codebook pattern 'diagonal'"):
        generation.GenerationSettings(pattern="diagonal")


def test_one_generator_serves_batches_of_different_sizes(transformer_module):
    """The engine and the per-piece temperatures are rebuilt when the batch changes (sampled, no detector)."""
    model = spread_model(transformer_module, context_frames=20)
    settings = generation.GenerationSettings(pattern="delay", context_frames=20, stride_frames=7, num_samples=2)
    engine = generation.TokenGenerator(model, settings, sampling.SamplingSettings(), None,
                                       torch.Generator().manual_seed(0), "cpu")
    assert engine.generate(None, 30).shape == (2, 30, 4)
    settings.num_samples = 3
    assert engine.generate(None, 30).shape == (3, 30, 4)
    assert engine._temperatures.shape == (3,)
