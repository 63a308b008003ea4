"""Stage 5 mechanics: checkpoint loading, sampling, the collapse detector, cached generation, decoding."""
from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from pipeline.cli import StageError
from pipeline.contract import BOS, CODEBOOK_SIZE, PAD, VOCAB_SIZE
from pipeline.decoding import chunk_scales, decode_chunked, frames_for_samples, samples_for_frames
from pipeline.files import atomic_torch_save
from pipeline.generation import GenerationSettings, TokenGenerator
from pipeline.model_io import load_model
from pipeline.patterns import build_sequence
from pipeline.runs import find_checkpoint
from pipeline.sampling import (CollapseDetector, CollapseSettings, SamplingSettings, apply_repetition_penalty,
                               sample_tokens)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(transformer_module, n_codebooks=4, context_frames=40, seed=0):
    torch.manual_seed(seed)
    args = transformer_module.model_args_for("tiny", n_codebooks, context_frames)
    model = transformer_module.MusicTransformer(args).eval()
    with torch.no_grad():  # logits spread far above float noise, whatever initialisation stage 4 chooses
        for table in model.embeddings:
            table.weight.normal_(0.0, 1.0)
            table.weight[PAD] = 0.0
        model.heads.weight.normal_(0.0, 0.5)
    return model


def save_checkpoint(path, model, pattern="parallel", state=None, context_frames=40, **contract):
    """The stage-4 checkpoint layout, built by hand (no dependency on stage 4's trainer)."""
    token_contract = {"n_codebooks": model.args.n_codebooks, "bandwidth": 6.0, "codec": "random:0",
                      "pattern": pattern, "frame_rate": 150, "sample_rate": 48000,
                      "context_frames": context_frames, "median_scale": None}
    token_contract.update(contract)
    atomic_torch_save({"format": 1, "model": model.state_dict() if state is None else state,
                       "model_args": asdict(model.args), "token_contract": token_contract, "artist": "demo",
                       "epoch": 1, "step": 5, "optimizer": {"state": {}, "param_groups": []}}, path)


def run_engine(model, pattern, total_frames, prompt=None, use_cache=True, context=12, stride=5,
               temperature=0.0, num_samples=1, seed=0, detector=None, engine="lean", **sampling):
    settings = GenerationSettings(pattern=pattern, context_frames=context, stride_frames=stride,
                                         use_cache=use_cache, num_samples=num_samples, engine=engine)
    sampling = SamplingSettings(temperature=temperature, **sampling)
    generator = torch.Generator().manual_seed(seed)
    engine = TokenGenerator(model, settings, sampling, detector, generator, "cpu")
    return engine.generate(prompt, total_frames), engine


# ---- loading ---------------------------------------------------------------------------------
def test_checkpoint_choice_best_then_last_then_epoch(tmp_path):
    folder = tmp_path / "model_results" / "demo"
    with pytest.raises(StageError, match="holds no checkpoint"):
        find_checkpoint(tmp_path, "demo", None, None)
    folder.mkdir(parents=True)
    for name in ("last.pt", "music_transformer_ep2.pt"):
        (folder / name).write_bytes(b"x")
    assert find_checkpoint(tmp_path, "demo", None, None).name == "last.pt"
    (folder / "best.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path, "demo", None, None).name == "best.pt"
    assert find_checkpoint(tmp_path, "demo", None, 2).name == "music_transformer_ep2.pt"
    with pytest.raises(StageError, match="epoch 7.*music_transformer_ep2.pt"):
        find_checkpoint(tmp_path, "demo", None, 7)


def test_a_missing_model_points_at_the_demo_root_when_the_demo_holds_it(tmp_path):
    demo = tmp_path / "demo_run" / "model_results" / "demo_sunny_arps"
    demo.mkdir(parents=True)
    (demo / "best.pt").write_bytes(b"x")
    with pytest.raises(StageError, match=r"demo_run holds one: pass --root .*demo_run"):
        find_checkpoint(tmp_path, "demo_sunny_arps", None, None)
    with pytest.raises(StageError) as refused:
        find_checkpoint(tmp_path, "someone_else", None, None)
    assert "demo_run" not in str(refused.value)


def test_prefixed_weights_load_and_match(transformer_module, tmp_path):
    model = tiny_model(transformer_module)
    prefixed = {f"module._orig_mod.{key}": value for key, value in model.state_dict().items()}
    save_checkpoint(tmp_path / "ck.pt", model, state=prefixed)
    loaded = load_model(tmp_path / "ck.pt", "cpu")
    assert loaded.epoch == 1 and loaded.step == 5 and loaded.n_codebooks == 4
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert not loaded.model.training


def test_mismatched_checkpoint_says_what_differs(transformer_module, tmp_path):
    four, eight = tiny_model(transformer_module, 4), tiny_model(transformer_module, 8)
    save_checkpoint(tmp_path / "q.pt", eight, state=four.state_dict())  # Q = 8 arguments, Q = 4 weights
    with pytest.raises(StageError, match=r"missing keys embeddings\.4\.weight.*shape mismatches"):
        load_model(tmp_path / "q.pt", "cpu")
    save_checkpoint(tmp_path / "c.pt", four, n_codebooks=8)
    with pytest.raises(StageError, match="token_contract says Q = 8.*n_codebooks = 4"):
        load_model(tmp_path / "c.pt", "cpu")
    state = dict(four.state_dict())
    state.pop("input_proj.bias")
    save_checkpoint(tmp_path / "m.pt", four, state=state)
    with pytest.raises(StageError, match=r"missing keys input_proj\.bias"):
        load_model(tmp_path / "m.pt", "cpu")


# ---- sampling --------------------------------------------------------------------------------
def test_repetition_penalty_always_lowers_repeated_tokens():
    logits = torch.full((1, 1, VOCAB_SIZE), -1.0)
    logits[0, 0, :4] = torch.tensor([3.0, -2.0, 0.5, -0.5])  # seen tokens 0 and 1: one positive, one negative
    recent = torch.tensor([[[0], [1], [-1]]])  # [B, W, Q]; -1 is an empty cell
    before = torch.softmax(logits[..., :CODEBOOK_SIZE], -1)
    after = torch.softmax(apply_repetition_penalty(logits[..., :CODEBOOK_SIZE], recent, 2.0), -1)
    assert after[0, 0, 0] < before[0, 0, 0] and after[0, 0, 1] < before[0, 0, 1]
    assert after[0, 0, 2] > before[0, 0, 2]  # unseen tokens gain the mass
    ratio = (after[0, 0, 0] / after[0, 0, 2]) / (before[0, 0, 0] / before[0, 0, 2])
    assert math.isclose(float(ratio), 0.5, rel_tol=1e-5)  # exactly 1/penalty relative to unseen tokens


def test_special_tokens_are_never_sampled(transformer_module):
    """A model whose heads put BOS and PAD far ahead of every code still generates codes only."""
    model = tiny_model(transformer_module)
    with torch.no_grad():
        model.heads.weight.zero_()
        model.heads.bias.zero_()
        model.heads.bias.view(model.args.n_codebooks, -1)[:, [BOS, PAD]] = 50.0
    for temperature in (0.0, 1.0, 5.0):
        frames, _ = run_engine(model, "delay", 20, temperature=temperature, num_samples=2, top_k=0)
        assert int(frames.min()) >= 0 and int(frames.max()) < CODEBOOK_SIZE


def test_top_k_top_p_and_greedy():
    logits = torch.randn(200, 2, CODEBOOK_SIZE, generator=torch.Generator().manual_seed(1))
    top3 = torch.topk(logits, 3, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    hot = torch.full((200,), 3.0)
    tokens = sample_tokens(logits, hot, SamplingSettings(top_k=3), generator)
    assert bool((tokens.unsqueeze(-1) == top3).any(-1).all())
    tokens = sample_tokens(logits, hot, SamplingSettings(top_k=0, top_p=1e-6), generator)
    assert torch.equal(tokens, logits.argmax(-1))
    tokens = sample_tokens(logits, torch.zeros(200), SamplingSettings(), generator)
    assert torch.equal(tokens, logits.argmax(-1))
    spread = sample_tokens(logits, hot, SamplingSettings(top_k=0), generator)
    assert len(set(spread.flatten().tolist())) > 50  # unfiltered sampling really samples


def test_invalid_values_are_refused_at_parsing(stage5, capsys):
    parser = stage5.build_parser()
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-2"],
                ["--repetition-penalty", "0.5"], ["--num-samples", "0"], ["--seconds", "0"],
                ["--boost", "0.9"], ["--prompt-tokens", "a.th", "--prompt-audio", "b.wav"],
                ["--seed-tokens", "a.th", "--prompt-audio", "b.wav"],
                ["--seed-tokens", "a.th", "--prompt-tokens", "b.th"]):
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(["--artist", "demo", *bad])
        assert caught.value.code == 2, bad
    assert "must be" in capsys.readouterr().err


# ---- generation ------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_greedy_cache_equals_recompute_across_the_window_slide(transformer_module, pattern):
    model = tiny_model(transformer_module, context_frames=12)
    prompt = torch.randint(0, CODEBOOK_SIZE, (1, 4, 4), generator=torch.Generator().manual_seed(2))
    prompt = prompt.transpose(1, 2)  # [1, Q, L] -> [1, L, Q]
    cached, engine = run_engine(model, pattern, 33, prompt=prompt, use_cache=True, num_samples=2)
    recomputed, _ = run_engine(model, pattern, 33, prompt=prompt, use_cache=False, num_samples=2)
    assert cached.shape == (2, 33, 4)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :4], prompt.expand(2, -1, -1))  # the prompt is continued, not replaced
    assert int(cached.min()) >= 0 and int(cached.max()) < CODEBOOK_SIZE  # no BOS, PAD or empty cell left
    extra = 3 if pattern == "delay" else 0
    assert engine.max_position <= 12 + extra  # no step ever attends beyond one window (BOS + rows)


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_prefill_layout_is_the_training_layout(transformer_module, pattern):
    """BOS at position 0, then the grid rows exactly as `build_sequence` lays out training inputs."""
    model = tiny_model(transformer_module)
    frames = torch.randint(0, CODEBOOK_SIZE, (2, 9, 4), generator=torch.Generator().manual_seed(4))  # [B, L, Q]
    settings = GenerationSettings(pattern=pattern, context_frames=40, num_samples=2)
    engine = TokenGenerator(model, settings, SamplingSettings(), None, None, "cpu")
    engine.codes = frames
    expected, _ = build_sequence(frames, pattern)  # [B, S, Q], S = L + extra
    engine.known = torch.ones(9, 4, dtype=torch.bool)
    rows = engine._rows(engine.plan_window(0, 9), 0, expected.shape[1] - 1)  # rows 0..S-2: positions 1..S-1
    assert torch.equal(expected[:, 1:], rows) and bool((expected[:, 0] == BOS).all())


@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_window_slide_keeps_context_minus_stride_frames(transformer_module, engine, monkeypatch):
    """Recorded prefills show each re-prefill starts with BOS and the last (context - stride) frames."""
    from pipeline import generation

    model = tiny_model(transformer_module, context_frames=12)
    prefills = []
    steps_class = generation.LeanSteps if engine == "lean" else generation.TransformersCacheSteps
    original = steps_class.prefill

    def recording_prefill(self, tokens):
        prefills.append(tokens.clone())
        return original(self, tokens)

    monkeypatch.setattr(steps_class, "prefill", recording_prefill)
    frames, _ = run_engine(model, "parallel", 30, context=12, stride=5, engine=engine)
    assert [int(p.shape[1]) for p in prefills] == [1, 8, 8, 8, 8]  # BOS, then BOS + 7 kept frames
    for prefill in prefills:
        assert bool((prefill[:, 0] == BOS).all())
    assert torch.equal(prefills[1][0, 1:], frames[0, 5:12])  # the window moved on by the stride


def test_seed_makes_sampling_reproducible(transformer_module):
    model = tiny_model(transformer_module)
    first, _ = run_engine(model, "delay", 20, temperature=1.0, num_samples=2, seed=5)
    again, _ = run_engine(model, "delay", 20, temperature=1.0, num_samples=2, seed=5)
    other, _ = run_engine(model, "delay", 20, temperature=1.0, num_samples=2, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # the pieces of a batch differ


# ---- collapse detector -----------------------------------------------------------------------
def forced_logits_model(transformer_module, peaked: bool):
    """A real tiny model whose heads ignore the input: flat logits (10 bits), or one token far ahead."""
    model = tiny_model(transformer_module)
    with torch.no_grad():
        model.heads.weight.zero_()  # the logits no longer depend on the input
        model.heads.bias.zero_()  # flat: every logit 0
        if peaked:  # token 7 of every codebook: logit 50, every other 0
            model.heads.bias.view(model.args.n_codebooks, -1)[:, 7] = 50.0
    return model


@pytest.mark.parametrize("peaked", [True, False])
def test_collapse_detector_fires_only_on_a_collapsing_model(transformer_module, peaked):
    settings = CollapseSettings(bits=1.0, window=10, boost=1.5, boost_frames=8, max_temperature=2.0)
    detector = CollapseDetector(settings, batch=2, n_codebooks=4, device="cpu")
    model = forced_logits_model(transformer_module, peaked)
    run_engine(model, "delay", 40, temperature=1.0, num_samples=2, detector=detector, context=40)
    if not peaked:
        assert detector.events == []
        return
    assert {event["sample"] for event in detector.events} == {0, 1}
    first = detector.events[0]
    assert first["frame"] == 9  # the first frame at which a full 10-row window exists
    assert first["codebooks"] == [0] and first["mean_entropy_bits"][0] < 1.0
    assert first["temperature"] == pytest.approx(1.5)
    assert sum(event["sample"] == 0 for event in detector.events) >= 3  # again once the window refills


def test_boost_is_capped_and_decays():
    settings = CollapseSettings(bits=1.0, window=2, boost=4.0, boost_frames=4, max_temperature=2.5)
    detector = CollapseDetector(settings, batch=1, n_codebooks=1, device="cpu")
    detector.boost_left = [4]
    assert float(detector.temperatures(1.0)[0]) == pytest.approx(2.5)  # 4.0 capped
    detector.boost_left = [2]
    assert float(detector.temperatures(1.0)[0]) == pytest.approx(2.5)  # 1 + 3 * 2/4 = 2.5
    detector.boost_left = [1]
    assert float(detector.temperatures(1.0)[0]) == pytest.approx(1.75)
    detector.boost_left = [0]
    assert float(detector.temperatures(1.0)[0]) == pytest.approx(1.0)


# ---- decoding --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_chunks(random_codec):
    num_samples = 2 * random_codec.chunk_stride + 3_200  # the last chunk holds 10 frames: a cheap decode
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, 3 * random_codec.chunk_frames),
                          generator=torch.Generator().manual_seed(3))
    scales = torch.tensor([0.05, 0.1, 0.07])
    return codes, scales, num_samples, random_codec.decode(codes, scales, num_samples)


@pytest.fixture(scope="module")
def plain_encodec_decode(random_codec):
    """Three chunks decoded by one whole-sequence `EncodecModel.decode` (transformers' own chunking and
    overlap-add, not the project's `decode_chunks` / `overlap_add`): the reference for chunked decoding."""
    chunk_frames = random_codec.chunk_frames
    codes = torch.randint(0, CODEBOOK_SIZE, (1, 4, 3 * chunk_frames), generator=torch.Generator().manual_seed(7))
    scales = torch.tensor([0.05, 0.1, 0.07])
    num_samples = 3 * random_codec.chunk_stride  # three chunks, the last one holding 149 real frames
    per_chunk = codes.view(1, 4, 3, chunk_frames).permute(2, 0, 1, 3)  # [1, Q, 3*F] -> [3, 1, Q, F]
    with torch.no_grad():
        audio = random_codec.model.decode(per_chunk, [scale.view(1, 1) for scale in scales],
                                          return_dict=True).audio_values  # [1, 2, S]
    return codes, scales, num_samples, audio[0, :, :num_samples]


@pytest.mark.parametrize("chunks_per_pass", [1, 2, 3, 5])
def test_chunked_decoding_equals_plain_encodec_decode(random_codec, plain_encodec_decode, chunks_per_pass):
    codes, scales, num_samples, reference = plain_encodec_decode
    chunked = decode_chunked(random_codec, codes, scales, num_samples, chunks_per_pass)
    assert chunked.shape == reference.shape == (2, num_samples)
    last_chunk_start = 2 * random_codec.chunk_stride  # up to here only full chunks contribute: exact
    peak = float(reference.abs().max())
    assert float((chunked - reference)[:, :last_chunk_start].abs().max()) < 1e-5 * peak
    # the plain decode saw all 150 frames of the last chunk, the piece has 149 real ones: the codec's
    # whole-chunk normalisation moves that chunk slightly, and its last frames' samples (the convolutions'
    # edge) more; a wrong scale, order or offset would move all of it by far more
    edge = num_samples - 10 * random_codec.hop_length
    assert float((chunked - reference)[:, last_chunk_start:edge].abs().max()) < 1e-2 * peak


def test_out_of_memory_falls_back_to_smaller_chunks_then_cpu(random_codec, three_chunks, monkeypatch):
    codes, scales, num_samples, single = three_chunks
    real_decode_chunks = random_codec.decode_chunks
    calls = []

    def flaky_decode_chunks(codes, scales, num_samples, first, stop):
        calls.append((random_codec.device, first, stop))
        if random_codec.device != "cpu":  # the "GPU" has no memory for even one chunk
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_decode_chunks(codes, scales, num_samples, first, stop)

    monkeypatch.setattr(random_codec, "decode_chunks", flaky_decode_chunks)
    monkeypatch.setattr(random_codec, "device", "cuda")
    monkeypatch.setattr(random_codec, "move_to", lambda device: setattr(random_codec, "device", device))
    notes = []
    wave = decode_chunked(random_codec, codes, scales, num_samples, 3, notes)
    assert float((wave - single).abs().max()) < 1e-4
    assert [call[2] - call[1] for call in calls[:3]] == [3, 1, 1]  # 3 chunks, then 3 // 2 = 1, then CPU
    assert "retrying with 1" in notes[0] and "falling back to the CPU" in notes[1]
    assert random_codec.device == "cpu"


def test_scales_come_from_prompt_then_median_then_one():
    scales, sources = chunk_scales(torch.tensor([0.2]), 3, 0.05, "checkpoint median")
    assert scales.tolist() == pytest.approx([0.2, 0.05, 0.05])
    assert sources == ["prompt", "checkpoint median", "checkpoint median"]
    scales, sources = chunk_scales(None, 2, None, "no manifest")
    assert scales.tolist() == [1.0, 1.0] and sources == ["default 1.0"] * 2


def test_frames_and_samples_round_trip(random_codec):
    for n_frames in (1, 75, 148, 149, 151, 299, 449):
        assert frames_for_samples(random_codec, samples_for_frames(random_codec, n_frames)) == n_frames
    for num_samples in (320, 48_000, 57_600, 480_000):
        frames = frames_for_samples(random_codec, num_samples)
        assert random_codec.n_chunks(num_samples) == math.ceil(frames / random_codec.chunk_frames)
