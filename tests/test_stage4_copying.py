"""Relative positions (RoPE, ALiBi) in the GPT-2 backbone and the in-context copy path: the model,
the lean decoder, generation, fitting, and what stage 4 writes."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from helpers import TINY, write_dataset
from pipeline import generation
from pipeline.contract import BOS, CODEBOOK_SIZE, PAD
from pipeline.copying import (CopyPath, HeldOut, copy_distribution, copy_distribution_last, copy_target_probs, fit,
                              fit_gate, fit_window_mask)
from pipeline.lean_decoder import LeanDecoder
from pipeline.positions import alibi_slopes, apply_rope, rope_tables
from pipeline.sampling import SamplingSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(transformer_module, positions: str, n_codebooks: int = 4, context: int = 40, n_artists: int = 0):
    torch.manual_seed(0)
    args = transformer_module.model_args_for("tiny", n_codebooks, context, {"positions": positions, "dropout": 0.0})
    args.n_artists = n_artists
    model = transformer_module.MusicTransformer(args).eval()
    with torch.no_grad():  # away from the init, so every layer matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def random_rows(batch: int, length: int, n_codebooks: int = 4) -> torch.Tensor:
    tokens = torch.randint(0, CODEBOOK_SIZE, (batch, length, n_codebooks))
    tokens[:, 0] = BOS
    return tokens


# ---- positions ---------------------------------------------------------------------------------------
def test_rope_rotation_keeps_norms_and_depends_only_on_the_distance():
    cos, sin = rope_tables(torch.arange(50), 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rotated = apply_rope(q.expand(1, 1, 50, 8), cos, sin)  # q at every position
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 50), atol=1e-5)
    keys = apply_rope(k.expand(1, 1, 50, 8), cos, sin)
    scores = (rotated[0, 0, :, None] * keys[0, 0, None, :]).sum(-1)  # [50, 50]
    assert torch.allclose(scores[10, 3], scores[40, 33], atol=1e-4)  # same distance, same score


def test_alibi_slopes_are_the_papers():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([4 ** -(i + 1) for i in range(4)])
    assert len(alibi_slopes(6)) == 6


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_the_lean_decoder_matches_the_full_forward(transformer_module, positions):
    model = tiny_model(transformer_module, positions)
    tokens = random_rows(2, 30)
    with torch.no_grad():
        full, _ = model(tokens)  # [2, 30, Q, V]
        decoder = LeanDecoder(model, 2, 44)
        steps = [decoder.prefill(tokens[:, :10])] + [decoder.step(tokens[:, t:t + 1]) for t in range(10, 30)]
        static = LeanDecoder(model, 2, 44)
        static.prefill(tokens[:, :10])
        fixed = []
        for t in range(10, 30):
            fixed.append(static.step_static(tokens[:, t:t + 1], torch.tensor([t])))
            static.length += 1
    assert (torch.stack(steps, 1) - full[:, 9:]).abs().max() < 1e-4
    assert (torch.stack(fixed, 1) - full[:, 10:]).abs().max() < 1e-4


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_relative_positions_do_not_see_where_the_window_starts(transformer_module, positions):
    model = tiny_model(transformer_module, positions)
    tokens = random_rows(2, 20)
    with torch.no_grad():
        at_zero, _ = model(tokens)
        shifted, _ = model(tokens, position_ids=torch.arange(7, 27).expand(2, -1))
    assert (at_zero - shifted).abs().max() < 1e-4


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_a_pad_frame_is_hidden_from_later_frames_with_relative_positions(transformer_module, positions):
    model = tiny_model(transformer_module, positions)
    tokens = random_rows(1, 12)
    padded = tokens.clone()
    padded[0, 5] = PAD
    other = padded.clone()
    other[0, 5, 0] = 7  # a different PAD frame: still PAD (any PAD codebook masks the frame)
    other[0, 5, 1:] = PAD
    with torch.no_grad():
        first, _ = model(padded)
        second, _ = model(other)
    assert torch.allclose(first[0, 6:], second[0, 6:], atol=1e-5)


def test_an_old_checkpoint_loads_with_learned_positions(transformer_module):
    saved = {key: value for key, value in vars(transformer_module.ModelArgs()).items() if key != "positions"}
    assert transformer_module.model_args_from(saved, "old.pt").positions == "learned"
    with pytest.raises(ValueError, match="positions"):
        transformer_module.MusicTransformer(transformer_module.ModelArgs(positions="sinusoid"))


def test_relative_positions_freeze_the_unused_position_table(transformer_module):
    model = tiny_model(transformer_module, "rope")
    model.prepare_training()
    assert not model.backbone.wpe.weight.requires_grad and not model.backbone.wte.weight.requires_grad
    learned = tiny_model(transformer_module, "learned")
    learned.prepare_training()
    assert learned.backbone.wpe.weight.requires_grad


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_cached_and_uncached_greedy_generation_agree(transformer_module, positions):
    model = tiny_model(transformer_module, positions, n_codebooks=2, context=24)
    pieces = {}
    for use_cache in (True, False):
        settings = generation.GenerationSettings(pattern="delay", context_frames=20, stride_frames=7,
                                                 use_cache=use_cache)
        frames, _ = generation.generate_frames(model, None, 45, settings, SamplingSettings(temperature=0), None,
                                               seed=0, device="cpu")
        pieces[use_cache] = frames
    assert torch.equal(pieces[True], pieces[False])
    with pytest.raises(ValueError, match="lean engine"):
        settings = generation.GenerationSettings(pattern="delay", context_frames=20, engine="transformers")
        generation.generate_frames(model, None, 25, settings, SamplingSettings(temperature=0), None, seed=0,
                                   device="cpu")


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_guided_steps_with_relative_positions_equal_two_separate_passes(transformer_module, positions):
    model = tiny_model(transformer_module, positions, n_artists=2)
    with torch.no_grad():
        model.artist_table.weight.normal_(std=1.0)  # labels that matter
    settings = generation.GenerationSettings(pattern="parallel", context_frames=30, stride_frames=10, num_samples=2,
                                             artist_weights=generation.label_weights(1, 2), cfg_coef=2.5)
    steps = generation.TokenGenerator(model, settings, SamplingSettings(), None, None, "cpu").make_steps(2)
    tokens, row = random_rows(2, 6), torch.randint(0, 1024, (2, 1, 4))
    with torch.inference_mode():
        guided = [steps.prefill(tokens), steps.step(row, 6)]
        logits = {label: model(torch.cat([tokens, row], dim=1),
                               artist=torch.tensor(generation.label_weights(label, 2)).expand(2, -1))[0]
                  for label in (1, 2)}  # the artist, then "no artist": [B, 7, Q, V]
    for index, position in enumerate((5, 6)):
        expected = logits[2][:, position] + 2.5 * (logits[1][:, position] - logits[2][:, position])
        assert torch.allclose(guided[index], expected, atol=1e-4)


# ---- the copy path ----------------------------------------------------------------------------------
def periodic_rows(period: int, length: int, n_codebooks: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A perfectly periodic piece as (inputs `[1, L, Q]` with BOS first, targets `[1, L, Q]`)."""
    motif = torch.randint(0, CODEBOOK_SIZE, (period, n_codebooks), generator=torch.Generator().manual_seed(seed))
    rows = motif[torch.arange(length) % period]  # [L, Q]
    return torch.cat([torch.full((1, n_codebooks), BOS), rows[:-1]]).unsqueeze(0), rows.unsqueeze(0)


def test_on_a_periodic_piece_the_copy_path_puts_its_mass_on_the_next_token():
    inputs, targets = periodic_rows(period=7, length=60)
    probs, bucket = copy_distribution(inputs, 4, 1.0)  # [1, 60, Q, V], [1, 60]
    right = probs.gather(-1, targets.unsqueeze(-1))[0, :, :, 0]  # [60, Q]
    assert right[7:].min() > 0.1 and right[12:].min() > 0.99  # from one period on it copies
    assert (bucket[0, 1:7] == 1).all()  # the first period matches nothing (a uniform guess among earlier rows)
    assert bucket[0, 0] == 0 and bucket[0, 30] == 4 * 4 + 1  # no earlier row / a full 4-row match


def test_one_step_of_the_copy_path_equals_the_whole_sequences_row():
    inputs = random_rows(2, 50)
    inputs[:, 25:] = inputs[:, 5:30]  # a repeat
    for n, beta in ((1, 1.0), (4, 0.5)):
        probs, bucket = copy_distribution(inputs, n, beta)
        for position in (1, 6, 30, 49):
            last, last_bucket = copy_distribution_last(inputs[:, :position + 1], n, beta)
            assert torch.allclose(last, probs[:, position], atol=1e-6)
            assert torch.equal(last_bucket, bucket[:, position])


def test_the_traced_mixing_equals_the_eager_one_at_every_window_length():
    """Stage 5 on a CPU mixes from one TorchScript trace of the copy side, whatever the window's length."""
    copy_path = CopyPath(n=4, beta=0.5, gate=[0.0] + [0.05 * b for b in range(1, 18)])
    rows = torch.randint(0, 8, (2, 60, 4), generator=torch.Generator().manual_seed(3))  # [B, P, Q]: many matches
    logits = torch.randn(2, 4, CODEBOOK_SIZE + 2, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        for length in (2, 3, 17, 60):
            eager = copy_path.mix(logits, rows[:, :length])
            traced = copy_path.mix(logits, rows[:, :length], traced=True)
            assert float((traced - eager).abs().max()) <= 1e-6
    assert len(copy_path.__dict__["_traced"]) == 1  # one trace for every length
    assert float((eager - torch.log_softmax(logits[..., :CODEBOOK_SIZE], -1)).abs().max()) > 0.1  # it mixed


def test_the_targets_probabilities_are_those_of_the_whole_distribution():
    """Fitting reads only each target's copy probability (no 1024-way distribution): the same numbers."""
    inputs = random_rows(3, 60)
    inputs[:, 30:] = inputs[:, 3:33]  # a repeat
    targets = torch.cat([inputs[:, 1:], torch.randint(0, CODEBOOK_SIZE, (3, 1, 4))], dim=1)
    targets[0, :4, 1:] = PAD
    for config, (picked, bucket) in copy_target_probs(inputs, targets).items():
        probs, expected_bucket = copy_distribution(inputs, *config)
        safe = torch.where(targets < CODEBOOK_SIZE, targets, torch.zeros_like(targets))
        expected = probs.gather(-1, safe.unsqueeze(-1))[..., 0]
        scored = targets < CODEBOOK_SIZE
        assert torch.allclose(picked[scored], expected[scored], atol=1e-5), config
        assert torch.equal(bucket, expected_bucket)


def test_the_gate_opens_where_copying_pays_and_stays_shut_where_it_does_not():
    rng = np.random.default_rng(0)
    n = 4000
    model = np.full(n, 1 / 64)  # a model at the unigram
    buckets = np.repeat([1, 9], n // 2)  # bucket 1: no match (copy is noise), bucket 9: a full match
    copy = np.where(buckets == 9, np.where(rng.random(n) < 0.95, 1.0, 0.0), rng.random(n) * 1e-3)
    gate = fit_gate(model, copy, buckets, 10)
    assert gate[1] == 0.0 and 0.9 < gate[9] < 0.99
    assert gate[0] == 0.0  # never fitted: no earlier row


def test_the_fitted_mixture_is_no_worse_than_the_model_on_random_tokens_and_far_better_on_loops():
    torch.manual_seed(0)
    held_out = HeldOut(n_codebooks=4)
    for _ in range(4):  # random tokens, the model uniform: nothing to copy
        tokens = random_rows(4, 80)
        held_out.add(tokens, torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1), torch.zeros(4, 80, 4, 1026))
    noise = fit(held_out)
    assert noise.mixed_bits <= noise.model_bits + 0.05, noise
    loops = HeldOut(n_codebooks=4)
    for seed in range(4):
        inputs, targets = periodic_rows(period=9 + seed, length=80, seed=seed)
        loops.add(inputs, targets, torch.zeros(1, 80, 4, 1026))
    looped = fit(loops)
    assert looped.model_bits == pytest.approx(40.0, abs=0.01)  # 4 codebooks x 10 bits
    assert looped.mixed_bits < 10, looped
    assert looped.copy_path.active and CopyPath.from_record(looped.copy_path.as_record()) == looped.copy_path


def test_a_new_validation_refits_on_the_same_tokens_with_new_model_probabilities():
    inputs, targets = periodic_rows(period=9, length=80)
    held_out = HeldOut(n_codebooks=4)
    held_out.add(inputs, targets, torch.zeros(1, 80, 4, 1026))  # a model that knows nothing: copying pays
    assert fit(held_out).copy_path.active
    held_out.new_validation()
    held_out.add_model(torch.ones(1, 80, 4), targets)  # a model that is always right: copying cannot help
    refit = fit(held_out)
    assert refit.model_bits == pytest.approx(0.0, abs=1e-6) and refit.mixed_bits == pytest.approx(0.0, abs=1e-3)


def test_fits_use_at_most_32_windows_spread_over_the_split():
    assert fit_window_mask(5).all()
    mask = fit_window_mask(100)
    chosen = np.flatnonzero(mask)
    assert len(chosen) == 32 and chosen[0] == 0 and chosen[-1] == 99 and np.diff(chosen).max() <= 4
    assert not fit_window_mask(0).any()


def test_fitting_32_windows_of_300_frames_is_cheap():
    """The bound that keeps validation fast: the token side once (copy probabilities of 32 windows),
    then each fit in well under a second (measured 0.2 s on the loaded 2-core machine)."""
    held_out = HeldOut(n_codebooks=4)
    for seed in range(4):
        inputs, targets = periodic_rows(period=23 + seed, length=301, seed=seed)
        held_out.add_tokens(inputs.expand(8, -1, -1), targets.expand(8, -1, -1))
        held_out.add_model(torch.full((8, 301, 4), 1 / 1024), targets.expand(8, -1, -1))
    started = time.perf_counter()
    result = fit(held_out)
    assert time.perf_counter() - started < 2.0
    assert result.windows == 32 and result.mixed_bits < 5


def test_generation_with_the_copy_path_continues_a_loop(transformer_module):
    """A model that knows nothing (uniform), with a copy path that trusts full matches: greedy
    generation continues the prompt's loop, with every engine."""
    model = tiny_model(transformer_module, "learned", n_codebooks=2, context=40)
    with torch.no_grad():
        model.heads.weight.zero_()
        model.heads.bias.zero_()
    motif = torch.randint(0, CODEBOOK_SIZE, (6, 2), generator=torch.Generator().manual_seed(3))
    prompt = motif[torch.arange(14) % 6].unsqueeze(0)  # [1, 14, 2]: two periods and a bit
    copy_path = CopyPath(n=2, beta=1.0, gate=[0.0] * 5 + [0.9]).as_record()  # only a 2-row full match: bucket 5
    results = []
    for use_cache in (True, False):
        settings = generation.GenerationSettings(pattern="delay", context_frames=30, stride_frames=10,
                                                 use_cache=use_cache, copy_path=copy_path)
        frames, _ = generation.generate_frames(model, prompt, 50, settings, SamplingSettings(temperature=0), None,
                                               seed=0, device="cpu")
        results.append(frames)
    expected = motif[torch.arange(50) % 6]
    assert torch.equal(results[0][0], expected) and torch.equal(results[1][0], expected)


def test_a_copy_path_whose_gate_is_shut_changes_nothing(transformer_module):
    model = tiny_model(transformer_module, "learned", n_codebooks=2, context=30)
    pieces = []
    for copy_path in (None, CopyPath(n=2, beta=1.0, gate=[0.0] * 6).as_record()):
        settings = generation.GenerationSettings(pattern="delay", context_frames=24, stride_frames=8,
                                                 copy_path=copy_path)
        frames, _ = generation.generate_frames(model, None, 40, settings, SamplingSettings(temperature=0), None,
                                               seed=0, device="cpu")
        pieces.append(frames)
    assert torch.equal(pieces[0], pieces[1])


# ---- what stage 4 writes ------------------------------------------------------------------------------
def run_lines(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_stage4_fits_the_copy_path_when_the_valid_nll_improves_and_best_pt_carries_it(stage4, tmp_path):
    write_dataset(tmp_path, lengths=(90, 80, 70, 60))
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "4", "--keep-last", "0",
                        "--lr", "3e-2"]) == 0
    folder = tmp_path / "model_results" / "A"
    epochs = [line for line in run_lines(folder) if "train_loss" in line]
    best = float("inf")
    for line in epochs:
        improved = line["valid_nll_bits_per_frame"] < best
        best = min(best, line["valid_nll_bits_per_frame"])
        assert ("valid_nll_copy_path_bits_per_frame" in line) == improved, line["epoch"]
        if improved:
            assert line["copy_path_windows"] == 2 and line["copy_path"]["n"] in (1, 2, 4, 8)  # 60 valid frames / 32
    fitted = [line for line in epochs if "copy_path" in line]
    assert 0 < len(fitted) < len(epochs)  # the high LR overfits: some epochs do not improve
    best_pt = torch.load(folder / "best.pt", weights_only=False)
    assert best_pt["copy_path"] == fitted[-1]["copy_path"]
    last_pt = torch.load(folder / "last.pt", weights_only=False)
    assert last_pt["copy_path"] == fitted[-1]["copy_path"]  # the latest fit, also after epochs without one
    from pipeline.model_io import load_model

    assert load_model(folder / "best.pt").copy_path == fitted[-1]["copy_path"]


def test_copy_path_off_fits_nothing_and_writes_none(stage4, tmp_path):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1", "--copy-path", "off"]) == 0
    folder = tmp_path / "model_results" / "A"
    assert all("copy_path" not in line for line in run_lines(folder))
    assert torch.load(folder / "best.pt", weights_only=False)["copy_path"] is None


def test_a_rope_run_trains_resumes_and_refuses_other_positions(stage4, tmp_path):
    from pipeline.cli import StageError

    write_dataset(tmp_path)
    base = ["--artist", "A", "--root", tmp_path, *TINY]
    assert stage4.main([*base, "--epochs", "1", "--positions", "rope"]) == 0
    checkpoint = torch.load(tmp_path / "model_results" / "A" / "last.pt", weights_only=False)
    assert checkpoint["model_args"]["positions"] == "rope" and checkpoint["train_args"]["positions"] == "rope"
    assert stage4.main([*base, "--epochs", "2", "--resume"]) == 0  # keeps rope without being told
    with pytest.raises(StageError, match="--positions learned differs"):
        stage4.main([*base, "--epochs", "3", "--resume", "--positions", "learned"])
