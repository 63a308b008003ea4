"""Stage 4: the model's semantics and the training engine, on tiny models and random tokens."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch

from helpers import TINY, assert_same_weights, finished_files, load, results, write_dataset
from pipeline import patterns, runs, train_data, trainer, training
from pipeline.cli import StageError, run_main
from pipeline.contract import BOS, PAD

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def tiny_model(stage4, q=4, context=40, dropout=0.0, **overrides):
    torch.manual_seed(0)
    return stage4.MusicTransformer(stage4.model_args_for("tiny", q, context, {"dropout": dropout, **overrides}))


# ---- the model ----------------------------------------------------------------------------------
def test_pad_in_any_codebook_masks_the_frame_and_leaves_earlier_outputs_alone(stage4):
    model = tiny_model(stage4).eval()
    tokens = torch.randint(0, 1024, (2, 12, 4))
    padded = tokens.clone()
    padded[0, 7, 2] = PAD  # only codebook 2 of frame 7
    mask = stage4.padding_mask(padded)
    assert mask.shape == (2, 12) and mask.dtype == torch.long
    assert mask[0, 7] == 0 and mask.sum() == 2 * 12 - 1
    with torch.no_grad():
        clean, _ = model(tokens)
        masked, _ = model(padded)
    assert clean.shape == (2, 12, 4, 1026)
    torch.testing.assert_close(masked[0, :7], clean[0, :7])  # causal: nothing before the PAD changes
    torch.testing.assert_close(masked[1], clean[1])
    assert not torch.allclose(masked[0, 8:], clean[0, 8:])  # later frames no longer see frame 7


def test_tied_heads_share_the_embedding_tables(stage4):
    model = tiny_model(stage4, tie_heads=True)
    tables = {table.weight.data_ptr() for table in model.embeddings}
    shaped_like_a_table = [name for name, p in model.named_parameters() if p.shape == (1026, model.args.d_embed)]
    assert shaped_like_a_table == [f"embeddings.{q}.weight" for q in range(4)]  # no separate head matrix
    tokens = torch.randint(0, 500, (1, 6, 4))  # rows 500.. never looked up: their gradient comes from the heads
    logits, _ = model(tokens)
    logits[..., 900].sum().backward()
    for table in model.embeddings:
        assert table.weight.data_ptr() in tables
        assert table.weight.grad[900].abs().sum() > 0
        assert table.weight.grad[700].abs().sum() == 0  # neither looked up nor in the loss


def test_untied_heads_are_one_linear_layer_whose_rows_belong_to_one_codebook_each(stage4):
    model = tiny_model(stage4).eval()
    assert not model.args.tie_heads and not hasattr(model, "head_proj")
    assert model.heads.weight.shape == (4 * 1026, model.args.d_model)
    hidden = torch.randn(2, 5, model.args.d_model)
    logits = model.logits(hidden)  # [2, 5, 4, 1026]
    for q in range(4):  # codebook q's logits come from rows q*V .. (q+1)*V - 1 only
        rows = slice(q * 1026, (q + 1) * 1026)
        expected = hidden @ model.heads.weight[rows].T + model.heads.bias[rows]
        torch.testing.assert_close(logits[:, :, q], expected)


def test_checkpoints_from_before_untied_heads_rebuild_the_seed_architecture(stage4):
    old_args = {"n_codebooks": 4, "d_embed": 16, "d_model": 32, "n_layer": 2, "n_head": 2, "n_positions": 40,
                "dropout": 0.0}  # no tie_heads / embed_init keys: written by the original's stage 4
    rebuilt = stage4.model_args_from(old_args, "old.pt")
    assert rebuilt.tie_heads and rebuilt.embed_init == "gpt2"
    assert not stage4.model_args_for("tiny", 4, 40).tie_heads  # new runs are untied


@pytest.mark.parametrize("embed_init, low, high", [("unit", 0.8, 1.2), ("match", 0.016, 0.024), ("gpt2", 0.002, 0.006)])
def test_embed_init_sets_the_scale_of_the_token_inputs(stage4, embed_init, low, high):
    model = tiny_model(stage4, embed_init=embed_init)
    inputs = model.embed(torch.randint(0, 1024, (4, 64, 4)))  # [4, 64, d_model]
    assert low < float(inputs.detach().std()) < high


@pytest.mark.parametrize("q", [2, 4])
def test_delay_shift_round_trips_and_every_token_is_a_target_once(stage4, q):
    frames = torch.randint(0, 1024, (3, 9, q))
    grid = patterns.delay_shift(frames, BOS)
    assert grid.shape == (3, 9 + q - 1, q)
    unshifted = torch.stack([grid[:, k:k + 9, k] for k in range(q)], dim=-1)  # codebook k back k steps
    assert torch.equal(unshifted, frames)
    for pattern in patterns.PATTERNS:
        inputs, targets = patterns.build_sequence(frames, pattern)
        steps = 9 + patterns.extra_steps(pattern, q)
        assert inputs.shape == targets.shape == (3, steps, q)
        assert torch.equal(inputs[:, 0], torch.full((3, q), BOS))
        assert (targets != PAD).sum() == frames.numel()
        assert torch.equal(torch.sort(targets[targets != PAD]).values, torch.sort(frames.flatten()).values)


def test_strip_prefixes(stage4):
    weights = {"module._orig_mod.embeddings.0.weight": 1, "_orig_mod.backbone.h.0.attn.c_attn.bias": 2,
               "head_proj.1.weight": 3, "backbone.module.ln_f.weight": 4}
    assert runs.strip_prefixes(weights) == {"embeddings.0.weight": 1, "backbone.h.0.attn.c_attn.bias": 2,
                                              "head_proj.1.weight": 3, "backbone.ln_f.weight": 4}


@pytest.mark.parametrize("pattern", ["parallel", "delay"])
def test_tiny_model_overfits_one_clip(stage4, pattern):
    torch.manual_seed(0)
    frames = torch.randint(0, 1024, (1, 24, 4))
    inputs, targets = patterns.build_sequence(frames, pattern)
    model = tiny_model(stage4, context=24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for _ in range(120):
        logits, _ = model(inputs)
        loss, nll_sums, counts = training.sequence_losses(logits, targets, 0.1)
        history.append(training.bits_per_frame(nll_sums, counts)[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[0] == pytest.approx(4 * 10.0, abs=2.0)  # ~log2(1024) bits per codebook at the start
    assert history[-1] < 0.25 * history[0]  # memorised: a quarter of the uniform NLL or less


# ---- data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100, 257])
def test_training_windows_cover_every_frame(stage4, length):
    rng = np.random.default_rng(length)
    seen_starts = set()
    for _ in range(5):
        starts = train_data.train_window_starts(length, 32, rng)
        assert len(starts) == train_data.windows_per_clip(length, 32)
        covered = np.zeros(length, dtype=bool)
        for start in starts:
            assert 0 <= start and (start + 32 <= length or (start == 0 and length < 32))
            covered[start:start + 32] = True
        assert covered.all()
        seen_starts.add(tuple(starts))
    if length > 64:
        assert len(seen_starts) > 1  # the offsets move between epochs


def test_store_batches_and_frame_dropout(stage4, tmp_path):
    manifest = write_dataset(tmp_path, lengths=(40, 20))
    entries = train_data.read_training_manifest(tmp_path, "A")
    data = train_data.load_dataset(entries)
    store = data.store
    assert store.codes.dtype == np.int16 and store.codes.shape == (60, 4) and store.codes.flags.c_contiguous
    assert data.token_contract["median_scale"] == 1.5 and data.token_contract["n_codebooks"] == 4
    clip1 = load(tmp_path / "encoded_tokens/A/clip_1.th")["codes"][0].T  # [T, Q]
    frames = train_data.gather_frames(store, np.array([[1, 0]]), 32)
    assert torch.equal(frames[0, :20], clip1) and (frames[0, 20:] == PAD).all()
    windows = np.array([[0, 0], [0, 8]])
    clean_in, clean_out = train_data.make_batch(store, windows, 32, "parallel")
    dropped_in, dropped_out = train_data.make_batch(store, windows, 32, "parallel", 0.5, np.random.default_rng(0))
    assert torch.equal(dropped_out, clean_out)  # targets keep every frame
    hidden = (dropped_in == PAD).all(-1)  # [B, S]
    assert 10 < hidden.sum() < 54 and not hidden[:, 0].any()  # whole frames, never the BOS
    assert torch.equal(dropped_in[~hidden], clean_in[~hidden])
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [entry["path"] for entry in entries] == [(tmp_path / line["audio"]).resolve() for line in lines]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist: run scripts/3_data_preparation.py"),
    ("empty", "is empty"),
    ("missing file", "token file encoded_tokens/A/clip_1.th does not exist"),
    ("mixed q", "mix codebooks"),
    ("mixed bandwidth", "mix bandwidth"),
    ("no train", "no usable clip has split 'train'"),
])
def test_bad_manifest_fails_at_start_up_with_its_reason(stage4, tmp_path, case, message):
    if case == "empty":
        (tmp_path / "metadata_clean_A.jsonl").write_text("\n")
    elif case == "missing file":
        write_dataset(tmp_path)
        (tmp_path / "encoded_tokens/A/clip_1.th").unlink()
    elif case == "mixed q":
        write_dataset(tmp_path, entry_overrides={1: {"codebooks": 8}})
    elif case == "mixed bandwidth":
        write_dataset(tmp_path, entry_overrides={1: {"bandwidth": 12.0}})
    elif case == "no train":
        write_dataset(tmp_path, lengths=(40, 40), valid=2)
    with pytest.raises(StageError, match=message):
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY])
    assert not (results(tmp_path) / "last.pt").exists()


def test_unreadable_token_file_is_named_and_skipped(stage4, tmp_path, capfd):
    write_dataset(tmp_path, lengths=(40, 40, 30))
    (tmp_path / "encoded_tokens/A/clip_1.th").write_bytes(b"not a torch file")
    status = stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"])
    assert status == 1  # finished, one item failed
    log = capfd.readouterr().err
    assert "skipping a token file" in log and "clip_1.th: not a readable token file" in log
    assert (results(tmp_path) / "music_transformer_ep1.pt").is_file()


# ---- the engine ------------------------------------------------------------------------------------
def test_checkpoint_layout_loads_with_weights_only_into_a_plain_model(stage4, tmp_path):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2", "--keep-last", "1"]) == 0
    folder = results(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "loss.png", "loss_by_position.png",
                                                        "metrics.jsonl", "music_transformer_ep2.pt",
                                                        "training_index.npz"]
    checkpoint = load(folder / "music_transformer_ep2.pt")
    for key in ("format", "model", "model_args", "token_contract", "artist", "optimizer", "scheduler", "scaler",
                "rng", "epoch", "step", "train_args", "best_nll_bits_per_frame", "best_nll_split", "metrics"):
        assert key in checkpoint, key
    assert checkpoint["format"] == 1 and checkpoint["epoch"] == 2 and checkpoint["artist"] == "A"
    assert checkpoint["token_contract"] == {"n_codebooks": 4, "bandwidth": 6.0, "codec": "random:0",
                                            "pattern": "delay", "frame_rate": 150, "sample_rate": 48000,
                                            "context_frames": 32, "median_scale": 2.0}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    model = stage4.MusicTransformer(stage4.ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    assert checkpoint["train_args"]["context_frames"] == 32 and isinstance(checkpoint["train_args"]["lr"], float)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    baselines, records = records[0], records[1:]  # the first line holds the unigram / bigram baselines
    assert baselines["record"] == "baselines" and baselines["scored_on"] == "valid" and baselines["epoch"] == 0
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["gain_over_bigram_bits_per_frame"] == pytest.approx(
        baselines["bigram_bits_per_frame"] - records[-1]["valid_nll_bits_per_frame"])
    for key in ("train_loss", "train_nll_bits_per_frame", "valid_nll_bits_per_frame", "valid_nll_bits_per_codebook",
                "lr", "frames_per_s", "elapsed_s"):
        assert key in records[-1], key
    assert len(records[-1]["valid_nll_bits_per_codebook"]) == 4
    assert math.isclose(sum(records[-1]["valid_nll_bits_per_codebook"]), records[-1]["valid_nll_bits_per_frame"])
    assert checkpoint["best_nll_bits_per_frame"] == min(r["valid_nll_bits_per_frame"] for r in records)
    assert checkpoint["best_nll_split"] == "valid"
    # a finished run is skipped; asked for more epochs, it says it finished and asks for --resume or --overwrite
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2"]) == 0
    with pytest.raises(StageError, match="already holds a run finished at epoch 2 .*--resume.*--overwrite"):
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3"])
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3", "--resume",
                        "--max-steps", "9"]) == 0
    with pytest.raises(StageError, match="already holds a run stopped at epoch 2 "):  # one step into epoch 3
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3"])


def test_both_patterns_train_and_report_comparable_nll(stage4, tmp_path):
    first, last = {}, {}
    for pattern in ("parallel", "delay"):
        root = tmp_path / pattern
        write_dataset(root, lengths=(64, 64, 40))
        args = ["--artist", "A", "--root", root, *TINY, "--pattern", pattern, "--epochs", "3", "--lr", "3e-3",
                "--warmup-frac", "0"]
        assert stage4.main(args) == 0
        records = [json.loads(line) for line in (results(root) / "metrics.jsonl").read_text().splitlines()][1:]
        first[pattern], last[pattern] = records[0], records[-1]
        assert records[-1]["train_nll_bits_per_frame"] < records[0]["train_nll_bits_per_frame"]
        assert load(results(root) / "last.pt")["token_contract"]["pattern"] == pattern
    # same tokens scored in the same units: both start near 4 codebooks x 10 bits
    for pattern in first:
        assert first[pattern]["frames"] == first["parallel"]["frames"]
        assert 30 < first[pattern]["valid_nll_bits_per_frame"] < 45


def state_after(stage4, root, *extra):
    status = stage4.main(["--artist", "A", "--root", root, *TINY, "--grad-accum", "2", "--epochs", "2",
                          "--dropout", "0.1", *extra])
    return status, load(results(root) / "last.pt")


@pytest.fixture(scope="module")
def straight(transformer_module, tmp_path_factory):
    """Two uninterrupted epochs: what every interrupted-and-resumed run must reproduce exactly."""
    root = tmp_path_factory.mktemp("straight")
    write_dataset(root, lengths=(70, 64, 40, 30))
    return on_one_thread(state_after, transformer_module, root)[1]


def on_one_thread(function, *args):
    """Module-scoped fixtures run outside the per-test one-thread fixture: pin the thread count here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def test_resume_gives_bit_identical_weights(stage4, tmp_path, straight):
    # 3 train clips -> 3 + 3 + 2 = 8 windows -> 4 micro-batches -> 2 optimizer steps an epoch
    for name in ("epoch", "mid"):
        write_dataset(tmp_path / name, lengths=(70, 64, 40, 30))
    assert straight["step"] == 4 and straight["epoch"] == 2
    status, halfway = state_after(stage4, tmp_path / "epoch", "--max-steps", "2")
    assert status == 0 and halfway["epoch"] == 1 and halfway["step"] == 2
    _, resumed = state_after(stage4, tmp_path / "epoch", "--resume")
    assert_same_weights(resumed["model"], straight["model"])
    status, mid = state_after(stage4, tmp_path / "mid", "--max-steps", "3")  # stops inside epoch 2
    assert (mid["epoch"], mid["epoch_batches_done"], mid["step"]) == (1, 2, 3)
    _, resumed = state_after(stage4, tmp_path / "mid", "--resume")
    assert_same_weights(resumed["model"], straight["model"])
    assert resumed["metrics"]["train_loss"] == pytest.approx(straight["metrics"]["train_loss"], rel=1e-9)
    assert resumed["optimizer"]["state"][0]["step"] == straight["optimizer"]["state"][0]["step"]


def test_explicit_lr_on_resume_takes_effect(stage4, tmp_path):
    write_dataset(tmp_path / "a", lengths=(70, 64, 40, 30))
    write_dataset(tmp_path / "b", lengths=(70, 64, 40, 30))
    state_after(stage4, tmp_path / "a", "--max-steps", "2")
    _, plain = state_after(stage4, tmp_path / "a", "--resume")
    state_after(stage4, tmp_path / "b", "--max-steps", "2")
    _, slower = state_after(stage4, tmp_path / "b", "--resume", "--lr", "3e-4")  # tiny's default peak: 3e-3
    assert slower["metrics"]["lr"] == pytest.approx(plain["metrics"]["lr"] / 10)
    assert slower["train_args"]["lr"] == 3e-4
    with pytest.raises(StageError, match="--pattern parallel differs"):
        state_after(stage4, tmp_path / "b", "--resume", "--pattern", "parallel", "--epochs", "3")


def test_signal_saves_a_resumable_checkpoint(stage4, tmp_path, monkeypatch, straight):
    write_dataset(tmp_path / "stopped", lengths=(70, 64, 40, 30))
    real_step, calls = trainer.Trainer.micro_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # first micro-batch of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "micro_step", interrupted_step)
    status, stopped = state_after(stage4, tmp_path / "stopped")
    assert status == 130 and (stopped["epoch"], stopped["epoch_batches_done"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(trainer.Trainer, "micro_step", real_step)
    _, resumed = state_after(stage4, tmp_path / "stopped", "--resume")
    assert_same_weights(resumed["model"], straight["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(stage4, tmp_path, monkeypatch, capfd):
    write_dataset(tmp_path, lengths=(70, 64, 40, 30))
    real_losses, calls = training.sequence_losses, []

    def poisoned(logits, targets, label_smoothing=0.0):
        loss, nll, counts = real_losses(logits, targets, label_smoothing)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:  # epoch 2
                loss = loss * float("nan")
        return loss, nll, counts

    monkeypatch.setattr(trainer, "sequence_losses", poisoned)
    status = run_main(stage4.main, ["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3"])
    assert status == 1  # a started run that failed; 2 is for bad usage
    assert re.search("training diverged: the loss became NaN.*epoch 2.*last good checkpoint", capfd.readouterr().err)
    last = load(results(tmp_path) / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_data_is_read_once(stage4, tmp_path, monkeypatch):
    write_dataset(tmp_path, lengths=(70, 64, 40))
    reads = []
    real_load = train_data.load_token_file
    monkeypatch.setattr(train_data, "load_token_file", lambda path: reads.append(path) or real_load(path))
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2"]) == 0
    assert len(reads) == 3


def test_parameter_groups_and_schedule(stage4):
    model = tiny_model(stage4)
    model.backbone.wte.requires_grad_(False)
    decay, no_decay = training.parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and not names[id(p)].startswith("embeddings.") and "wpe" not in names[id(p)]
               for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embeddings.0.weight", "backbone.wpe.weight",
                                                          "backbone.ln_f.weight", "input_proj.bias"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    schedule = training.WarmupCosine(warmup_steps=4, total_steps=20, min_factor=0.1)
    assert schedule(0) == 0.25 and schedule(3) == 1.0
    assert schedule(20) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert all(schedule(s) >= schedule(s + 1) for s in range(4, 30))


def test_epoch_totals_pack_into_the_checkpoints_layout_and_back():
    totals = trainer.EpochTotals.zeros(2, "cpu")
    for loss, nll, counts in ((1.5, [3.0, 4.0], [10.0, 10.0]), (0.5, [1.0, 2.0], [6.0, 5.0])):
        totals.add(torch.tensor(loss), torch.tensor(nll), torch.tensor(counts))
    totals.seconds = 2.5
    packed = totals.pack()  # [loss, micro-batches, frames, nll (Q), counts (Q), seconds]
    assert packed.dtype == torch.float64 and packed.tolist() == [2.0, 2.0, 16.0, 4.0, 6.0, 16.0, 15.0, 2.5]
    again = trainer.EpochTotals.unpack(packed, "cpu")
    assert again.pack().tolist() == packed.tolist() and again.mean_loss() == 1.0
    again.add(torch.tensor(1.0), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert packed.tolist()[0] == 2.0  # unpacked totals are copies: adding leaves the packed tensor alone



# ---- what a validation records: positions, the best count model, the early stop ----------------
def test_bucket_sums_place_each_cell_at_its_frames_position():
    buckets = training.position_buckets(32)  # context 32: [0, 10), [10, 32)
    assert buckets == [(0, 10), (10, 32)]
    assert training.position_buckets(1500)[-1] == (750, 1500)
    nll = torch.ones(1, 34, 3)  # [B, S, Q]: delay over 32 frames and Q = 3 -> S = 34 rows
    weights = torch.ones(1, 34, 3)
    offsets = patterns.codebook_offsets("delay", 3)
    sums = training.bucket_sums(nll, weights, offsets, buckets)  # [2, K]
    # each codebook sees frames -offset .. 33 - offset; only frames 0..31 fall in a bucket
    in_first = sum(len([f for f in range(-q, 34 - q) if 0 <= f < 10]) for q in range(3))
    in_second = sum(len([f for f in range(-q, 34 - q) if 10 <= f < 32]) for q in range(3))
    assert sums.tolist() == [[in_first, in_second], [in_first, in_second]]
    record = training.bits_by_position(sums, buckets, 3)
    assert list(record) == ["0-10", "10-32"] and record["0-10"] == pytest.approx(3 / math.log(2))


def test_every_validation_records_the_positions_and_the_gain_over_the_best_count_model(stage4, tmp_path):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    baselines, epoch = [json.loads(line) for line in (results(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert baselines["best_count_bits_per_frame"] == min(baselines["unigram_bits_per_frame"],
                                                         baselines["interpolated_bigram_bits_per_frame"])
    assert epoch["gain_over_best_count_bits_per_frame"] == pytest.approx(
        baselines["best_count_bits_per_frame"] - epoch["valid_nll_bits_per_frame"])
    assert list(epoch["valid_nll_by_position"]) == ["0-10", "10-32"]
    assert all(math.isfinite(bits) and bits > 0 for bits in epoch["valid_nll_by_position"].values())
    assert (results(tmp_path) / "loss_by_position.png").is_file()


@pytest.mark.slow
def test_patience_stops_a_run_that_stopped_improving_and_best_pt_keeps_the_best(stage4, tmp_path, capfd):
    write_dataset(tmp_path, lengths=(200, 200, 60))  # random tokens: memorised, never generalised
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY[:-2], "--epochs", "30", "--patience", "2",
                        "--lr", "1e-2"]) == 0
    log = capfd.readouterr().err
    records = [json.loads(line) for line in (results(tmp_path) / "metrics.jsonl").read_text().splitlines()][1:]
    best = min(records, key=lambda r: r["valid_nll_bits_per_frame"])
    assert len(records) < 30 and records[-1]["epoch"] == best["epoch"] + 2
    assert "stopping early" in log and "started to overfit" in log
    assert load(results(tmp_path) / "best.pt")["epoch"] == best["epoch"]


@pytest.mark.parametrize("is_main", [True, False])
def test_the_overfitting_warning_comes_once_and_from_rank_0_only(is_main, caplog):
    """Under torchrun every rank validates; only rank 0 may say the model overfits (once)."""
    import logging
    from types import SimpleNamespace

    run = SimpleNamespace(overfit_reported=False, info=SimpleNamespace(is_main=is_main),
                          progress=SimpleNamespace(best_split="valid", best_nll=10.0, best_epoch=2, epoch=4),
                          log=logging.getLogger("test.overfit"))
    with caplog.at_level("WARNING", logger="test.overfit"):
        for valid in (10.2, 10.4):
            trainer.Trainer._report_overfitting(run, {"valid_nll_bits_per_frame": valid,
                                                      "train_nll_bits_per_frame": 7.0})
    assert caplog.text.count("started to overfit") == (1 if is_main else 0)
    assert "--preset tiny --lr 1e-2" in caplog.text or not is_main


def test_max_steps_inside_an_epoch_validates_before_it_stops(stage4, stopped_run):
    records = [json.loads(line) for line in (results(stopped_run) / "metrics.jsonl").read_text().splitlines()]
    partial = records[-1]
    assert partial["partial_epoch"] and partial["epoch"] == 1 and partial["step"] == 1
    assert partial["valid_nll_bits_per_frame"] > 0 and partial["valid_nll_by_position"]
    best, last = load(results(stopped_run) / "best.pt"), load(results(stopped_run) / "last.pt")
    assert best["step"] == last["step"] == 1 and last["epoch_batches_done"] > 0  # still resumable mid-epoch

@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_write_one_loadable_checkpoint(stage4, tmp_path):
    import subprocess
    import sys

    from conftest import SCRIPTS

    write_dataset(tmp_path, lengths=(100, 100, 100, 60))  # 3 x 4 = 12 training windows of 32 frames
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPTS / "4_Transformer.py"), "--artist", "A", "--root", str(tmp_path), *TINY, "--epochs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = results(tmp_path)
    assert [p.name for p in finished_files(folder, ".pt")] == ["best.pt", "last.pt", "music_transformer_ep1.pt"]
    assert not list(folder.glob(".*tmp-*"))
    checkpoint = load(folder / "music_transformer_ep1.pt")
    assert checkpoint["step"] == 3  # each rank trained its 6 windows in 3 batches of 2, not all 12
    assert checkpoint["metrics"]["frames"] == 12 * 32  # but every window was trained once, across the ranks
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 wrote: the baselines and one epoch
    model = stage4.MusicTransformer(stage4.ModelArgs(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])


def torchrun_stage4(root, *extra):
    import subprocess
    import sys

    from conftest import SCRIPTS

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPTS / "4_Transformer.py"), "--artist", "A", "--root", str(root), *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return load(results(root) / "last.pt")


@pytest.mark.slow
def test_ddp_mid_epoch_save_then_resume_counts_every_rank_once(stage4, tmp_path):
    """2 gloo ranks stop one step into the epoch, save, and resume: the epoch's metrics equal a straight run's."""
    for name in ("straight", "stopped"):
        write_dataset(tmp_path / name, lengths=(100, 100, 100, 60))  # 12 windows: 3 micro-batches per rank
    straight = torchrun_stage4(tmp_path / "straight", "--epochs", "1")
    stopped = torchrun_stage4(tmp_path / "stopped", "--epochs", "1", "--max-steps", "1")
    assert (stopped["epoch"], stopped["epoch_batches_done"]) == (0, 1)
    assert stopped["epoch_totals"][2] == 2 * 2 * 32  # frames so far: one batch of 2 windows on each rank
    resumed = torchrun_stage4(tmp_path / "stopped", "--epochs", "1", "--resume")
    assert resumed["metrics"]["frames"] == straight["metrics"]["frames"] == 12 * 32
    assert resumed["metrics"]["train_loss"] == pytest.approx(straight["metrics"]["train_loss"], rel=1e-6)
    assert resumed["metrics"]["train_nll_bits_per_frame"] == pytest.approx(
        straight["metrics"]["train_nll_bits_per_frame"], rel=1e-6)


def test_grad_checkpointing_gives_the_same_gradients(stage4):
    tokens = torch.randint(0, 1024, (2, 16, 4))
    inputs, targets = patterns.build_sequence(tokens, "parallel")
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(stage4).train()  # dropout 0: the recomputed forward matches
        if checkpointing:
            model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        logits, _ = model(inputs)
        training.sequence_losses(logits, targets, 0.1)[0].backward()
        gradients.append(model.embeddings[1].weight.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


def test_overwrite_starts_over(stage4, tmp_path):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2"]) == 0
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1", "--overwrite"]) == 0
    folder = results(tmp_path)
    assert not (folder / "music_transformer_ep2.pt").exists()
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # the baselines and one epoch
    assert load(folder / "last.pt")["epoch"] == 1


def test_leftover_micro_batches_still_make_an_optimizer_step(stage4, tmp_path):
    write_dataset(tmp_path, lengths=(70, 70, 70, 30))  # 3 x 3 = 9 windows -> 5 micro-batches of 2
    args = ["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1", "--grad-accum", "2"]
    assert stage4.main(args) == 0
    checkpoint = load(results(tmp_path) / "last.pt")
    assert checkpoint["step"] == 3  # 2 + 2 + the leftover 1
    assert checkpoint["scheduler"]["last_epoch"] == 3  # the schedule counts optimizer steps
    assert checkpoint["metrics"]["frames"] == 9 * 32


# ---- options on --resume, the best-NLL bookkeeping, damaged outputs --------------------------------
# Every training option, given again with --resume with a value the first run did not use: applied
# (the checkpoint records it) or refused with a message naming it. The first run stops one optimizer
# step into epoch 1 (mid-epoch), so batch geometry cannot change; model options never can.
RESUME_CASES = {
    "preset": ("small", "refused"), "d_embed": ("8", "refused"), "d_model": ("64", "refused"),
    "n_layer": ("1", "refused"), "n_head": ("4", "refused"), "pattern": ("parallel", "refused"),
    "context_frames": ("16", "refused"), "tie_heads": (None, "refused"), "embed_init": ("unit", "refused"),
    "batch_size": ("1", "refused"), "grad_accum": ("1", "refused"),
    "dropout": ("0.2", 0.2), "epochs": ("3", 3), "lr": ("0.001", 0.001), "min_lr_frac": ("0.5", 0.5),
    "warmup_frac": ("0.5", 0.5), "weight_decay": ("0.05", 0.05), "max_grad_norm": ("0.5", 0.5),
    "label_smoothing": ("0.2", 0.2), "frame_dropout": ("0.1", 0.1), "seed": ("3", 3), "keep_last": ("2", 2),
    "max_steps": ("2", 2), "patience": ("7", 7), "device": ("cpu", "cpu"), "grad_checkpointing": (None, True),
    "compile": (None, True), "artist_alpha": ("0.3", 0.3), "cond_dropout": ("0.1", 0.1),
    "init_from": ("Other", "refused"), "positions": ("alibi", "refused"), "copy_path": ("off", "off"),
}


def test_every_training_option_has_a_resume_case(stage4):
    assert set(RESUME_CASES) == set(stage4.TRAIN_DEFAULTS)


@pytest.fixture(scope="module")
def stopped_run(transformer_module, tmp_path_factory):
    """A run stopped one optimizer step into epoch 1 (--max-steps 1), to resume with other options."""
    root = tmp_path_factory.mktemp("stopped")
    write_dataset(root, lengths=(70, 64, 40, 30))
    assert on_one_thread(state_after, transformer_module, root, "--max-steps", "1")[0] == 0
    return root


@pytest.mark.parametrize("key", sorted(RESUME_CASES))
def test_an_option_given_with_resume_is_applied_or_refused(stage4, stopped_run, tmp_path, monkeypatch, key):
    shutil.copytree(stopped_run, tmp_path / "run")
    value, expected = RESUME_CASES[key]
    option = [f"--{key.replace('_', '-')}"] + ([] if value is None else [value])
    if key == "compile":  # compiling a model takes minutes on a CPU: the option is what is checked here
        monkeypatch.setattr(torch, "compile", lambda module: module)
    extra = [] if key == "max_steps" else ["--max-steps", "2"]
    if expected == "refused":
        with pytest.raises(StageError, match=re.escape(option[0]) + " .*differs"):
            state_after(stage4, tmp_path / "run", "--resume", *extra, *option)
        return
    status, resumed = state_after(stage4, tmp_path / "run", "--resume", *extra, *option)
    assert status == 0 and resumed["step"] == 2
    assert resumed["train_args"][key] == expected
    schedule = resumed["scheduler"]["lr_lambdas"][0]  # the WarmupCosine's fields, as LambdaLR saves them
    total_steps = resumed["scheduler"]["lr_lambdas"][0]["total_steps"]
    effect = {"dropout": lambda: resumed["model_args"]["dropout"],
              "min_lr_frac": lambda: schedule["min_factor"],
              "warmup_frac": lambda: schedule["warmup_steps"] / total_steps,
              "weight_decay": lambda: resumed["optimizer"]["param_groups"][0]["weight_decay"],
              "epochs": lambda: total_steps / 2}  # two optimizer steps an epoch
    if key in effect:
        assert effect[key]() == pytest.approx(expected)


def test_resume_keeps_the_checkpoints_schedule_when_no_option_is_given_again(stage4, stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / "run")
    _, resumed = state_after(stage4, tmp_path / "run", "--resume", "--max-steps", "2")
    assert resumed["scheduler"]["lr_lambdas"][0]["min_factor"] == stage4.TRAIN_DEFAULTS["min_lr_frac"]
    assert resumed["optimizer"]["param_groups"][0]["weight_decay"] == stage4.TRAIN_DEFAULTS["weight_decay"]


def test_without_a_valid_split_the_best_nll_says_it_is_the_training_nll(stage4, tmp_path):
    write_dataset(tmp_path, lengths=(40, 40), valid=0)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2"]) == 0
    best = load(results(tmp_path) / "best.pt")
    records = [json.loads(line) for line in (results(tmp_path) / "metrics.jsonl").read_text().splitlines()][1:]
    assert best["best_nll_split"] == "train" and records[-1]["valid_nll_bits_per_frame"] is None
    assert best["best_nll_bits_per_frame"] == min(r["train_nll_bits_per_frame"] for r in records)


def test_a_hand_damaged_metrics_file_is_skipped_line_by_line(stage4, tmp_path, capfd):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    metrics = results(tmp_path) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 7, "train_lo\n[1, 2]\n{"no": "epoch"}\n')
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2", "--resume"]) == 0
    log = capfd.readouterr().err
    # line 1 holds the baselines, line 2 epoch 1; lines 3-5 are the damage
    assert "metrics.jsonl:3: skipping a line that is not JSON" in log and "metrics.jsonl:5: skipping" in log
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1, 2]
    assert [p.name for p in finished_files(results(tmp_path), ".pt")] == [
        "best.pt", "last.pt", "music_transformer_ep2.pt"]  # --keep-last 1: the newest epoch checkpoint only


def test_resume_without_last_pt_names_the_epoch_checkpoints_to_resume_from(stage4, tmp_path):
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "2", "--keep-last", "0"]) == 0
    folder = results(tmp_path)
    (folder / "last.pt").unlink()
    with pytest.raises(StageError) as refused:
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3", "--resume"])
    message = str(refused.value)
    assert "last.pt does not exist" in message
    assert message.index(f"--resume {folder / 'music_transformer_ep2.pt'}") < message.index("ep1.pt")
    for path in finished_files(folder, ".pt"):
        path.unlink()
    with pytest.raises(StageError, match="holds no epoch checkpoint either"):
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "3", "--resume"])


# ---- checkpoints written before the engine moved into the package ----------------------------------
def test_a_checkpoint_of_the_earlier_code_loads_and_generates_the_same_greedy_tokens():
    """tests/fixtures/stage4_tiny.pt was trained by stage 4 before its engine moved into pipeline/,
    with the greedy frames it generated then (tests/fixtures/make_stage4_checkpoint.py)."""
    from conftest import REPO
    from pipeline.generation import GenerationSettings, generate_frames
    from pipeline.sampling import SamplingSettings
    from pipeline.model_io import load_model

    fixtures = REPO / "tests" / "fixtures"
    expected = json.loads((fixtures / "stage4_tiny_greedy.json").read_text())
    loaded = load_model(fixtures / "stage4_tiny.pt", "cpu")
    assert (loaded.n_codebooks, loaded.pattern, loaded.epoch, loaded.step) == (2, "delay", 0, 2)
    assert loaded.model.args.positions == "learned" and loaded.copy_path is None  # written before either existed
    frames, _ = generate_frames(loaded.model, None, expected["total_frames"],
                                GenerationSettings(**expected["generation"]), SamplingSettings(temperature=0.0),
                                None, expected["seed"], "cpu")
    assert frames[0].tolist() == expected["frames"]


# ---- --init-from: starting from another run's weights ---------------------------------------------
def test_a_joint_models_weights_start_a_one_artist_model_that_plays_like_its_label(stage4):
    from pipeline.model_io import initialise_from

    joint = tiny_model(stage4, n_artists=2)
    torch.nn.init.normal_(joint.artist_table.weight, std=0.5)  # labels that matter
    source = {"model": joint.state_dict(), "artists": ["A", "B"], "loaded_from": "joint.pt"}
    tokens = torch.randint(0, 1024, (2, 20, 4))
    for artist, label in (("B", 1), ("C", 2)):  # C: unknown to the joint model -> its "no artist" row
        single = tiny_model(stage4)
        note = initialise_from(source, single, [artist])
        assert "folded into the input bias" in note
        expected, _ = joint(tokens, artist=torch.full((2,), label))
        got, _ = single(tokens)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    both = tiny_model(stage4, n_artists=3)  # a new joint model: A and B keep their rows, D starts fresh
    note = initialise_from(source, both, ["B", "D", "A"])
    assert torch.equal(both.artist_table.weight[0], joint.artist_table.weight[1])
    assert torch.equal(both.artist_table.weight[2], joint.artist_table.weight[0])
    assert torch.equal(both.artist_table.weight[3], joint.artist_table.weight[2])  # "no artist"
    assert "B, A" in note


def test_init_from_a_model_name_trains_on_from_its_weights_and_records_it(stage4, tmp_path, capfd):
    write_dataset(tmp_path, "A")
    write_dataset(tmp_path, "B")
    assert stage4.main(["--artist", "A", "--artist", "B", "--name", "Both", "--root", tmp_path, *TINY,
                        "--epochs", "1"]) == 0
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY[:-2], "--epochs", "1", "--init-from", "Both",
                        "--preset", "small"]) == 0  # the source's size wins over --preset
    log = capfd.readouterr().err
    assert "starting from the weights of" in log and "Both" in log and "folded into the input bias" in log
    checkpoint = load(results(tmp_path) / "last.pt")
    assert checkpoint["train_args"]["init_from"] == "Both" and checkpoint["train_args"]["preset"] == "tiny"
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--resume", "--epochs", "2"]) == 0
    with pytest.raises(StageError, match="no best.pt or last.pt"):
        stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--init-from", "nothing_here", "--overwrite"])


def test_plots_are_redrawn_at_most_every_interval_and_once_more_at_the_end(stage4, tmp_path, monkeypatch):
    """Short epochs do not redraw loss.png each time (a drawing costs ~0.3 s); the last drawing shows every epoch."""
    drawn = []
    monkeypatch.setattr(trainer, "plot_losses", lambda records, path: drawn.append(len(runs.epoch_records(records))))
    monkeypatch.setattr(trainer, "PLOT_INTERVAL_S", 3600.0)
    write_dataset(tmp_path)
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "4"]) == 0
    assert drawn == [1, 4]  # the first epoch at once, then the run's end
    monkeypatch.setattr(trainer, "PLOT_INTERVAL_S", 0.0)
    drawn.clear()
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "6", "--patience", "0", "--resume"]) == 0
    assert drawn == [5, 6]  # every epoch when the interval allows, nothing drawn twice


def test_the_positions_plot_and_log_keep_frame_order_after_metrics_jsonl_sorts_the_keys(tmp_path, monkeypatch):
    """metrics.jsonl writes keys sorted as text ("150-300" before "50-150"); the plot must not follow that order."""
    by_position = json.loads(json.dumps({"0-10": 3.0, "10-50": 2.5, "50-150": 2.0, "150-300": 1.5}, sort_keys=True))
    assert list(by_position) == ["0-10", "10-50", "150-300", "50-150"]
    assert [bucket for bucket, _ in training.in_position_order(by_position)] == ["0-10", "10-50", "50-150", "150-300"]
    drawn = []
    monkeypatch.setattr(training, "_save_figure", lambda figure, axis, *rest: drawn.extend(axis.lines))
    training.plot_positions([{"epoch": 1, "train_nll_bits_per_frame": 2.0, "valid_nll_bits_per_frame": 2.0,
                              "valid_nll_by_position": by_position}],
                            tmp_path / "positions.png")
    assert list(drawn[0].get_xdata()) == ["0-10", "10-50", "50-150", "150-300"]
    assert list(drawn[0].get_ydata()) == [3.0, 2.5, 2.0, 1.5]
