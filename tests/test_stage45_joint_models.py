"""One model for several artists — the artist label embedding, condition dropout, balanced
window sampling, joint training (stage 4), and generation with a label, a blend and CFG (stage 5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BANDWIDTH, TINY, load, results, wait_for, write_dataset, write_tokens
from pipeline import train_data
from pipeline.cli import StageError, run_main
from pipeline.contract import save_token_file
from pipeline.dist import DistInfo
from pipeline.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def tiny_args(stage4, n_artists=0, q=4):
    return stage4.ModelArgs(n_codebooks=q, d_embed=8, d_model=32, n_layer=1, n_head=2, n_positions=40, dropout=0.0,
                            n_artists=n_artists)


def write_band_dataset(root, artist, low, high, lengths=(120, 90, 60), q=4, bandwidth=None):
    """An artist whose tokens are all drawn from codes low..high-1 (so a label can tell artists apart)."""
    lines = []
    for index, frames in enumerate(lengths):
        rel = f"encoded_tokens/{artist}/clip_{index}.th"
        token_file = write_tokens(root, rel, frames, q=q, seed=index, bandwidth=bandwidth)
        token_file.codes.remainder_(high - low).add_(low)
        save_token_file(token_file, root / rel)
        lines.append({"audio": rel, "duration": frames / 150, "sample_rate": 48000, "frames": frames, "codebooks": q,
                      "bandwidth": bandwidth or BANDWIDTH[q], "codec": "random:0",
                      "source": f"data_processed/{artist}/{index}.wav", "track": f"track{index}",
                      "split": "valid" if index == len(lengths) - 1 else "train", "median_scale": 1.0})
    (root / f"metadata_clean_{artist}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


# ---- the model ----------------------------------------------------------------------------------------
def test_an_unconditioned_model_has_exactly_the_old_architecture(stage4):
    plain = stage4.MusicTransformer(tiny_args(stage4))
    assert not any(key.startswith("artist_table") for key in plain.state_dict())
    conditioned = stage4.MusicTransformer(tiny_args(stage4, n_artists=2))
    extra = set(conditioned.state_dict()) - set(plain.state_dict())
    assert extra == {"artist_table.weight"} and conditioned.artist_table.weight.shape == (3, 32)
    assert float(conditioned.artist_table.weight.detach().std()) == pytest.approx(0.02, rel=0.5)
    tokens = torch.randint(0, 1024, (2, 5, 4))
    assert torch.equal(plain.embed(tokens), plain.embed(tokens, torch.tensor([0, 1])))  # a label is ignored


def test_old_model_args_without_n_artists_load_unconditioned(stage4):
    saved = {k: v for k, v in vars(tiny_args(stage4)).items() if k != "n_artists"}
    assert stage4.model_args_from(saved, "old.pt").n_artists == 0


def test_the_label_embedding_is_added_at_every_position(stage4):
    model = stage4.MusicTransformer(tiny_args(stage4, n_artists=2)).eval()
    tokens = torch.randint(0, 1024, (2, 6, 4))
    table = model.artist_table.weight.detach()
    with torch.no_grad():
        unlabelled = model.embed(tokens)  # None = "no artist"
        labelled = model.embed(tokens, torch.tensor([0, 1]))
    assert torch.allclose(unlabelled - model.embed(tokens, torch.tensor([2, 2])), torch.zeros(1), atol=0)
    for row, label in enumerate((0, 1)):
        shift = labelled[row] - unlabelled[row]  # [T, d]: the same at every position
        assert torch.allclose(shift, (table[label] - table[2]).expand_as(shift), atol=1e-6)


def test_blend_weights_mix_the_label_embeddings(stage4):
    model = stage4.MusicTransformer(tiny_args(stage4, n_artists=2)).eval()
    tokens = torch.randint(0, 1024, (1, 4, 4))
    with torch.no_grad():
        one_hot = model.embed(tokens, torch.tensor([[0.0, 1.0, 0.0]]))
        assert torch.allclose(one_hot, model.embed(tokens, torch.tensor([1])), atol=1e-6)
        half = model.embed(tokens, torch.tensor([[0.5, 0.5, 0.0]]))
        mean = (model.embed(tokens, torch.tensor([0])) + model.embed(tokens, torch.tensor([1]))) / 2
        assert torch.allclose(half, mean, atol=1e-6)
        with pytest.raises(ValueError, match="3 labels"):
            model.embed(tokens, torch.tensor([[0.5, 0.5]]))


def test_a_label_changes_the_logits_of_forward(stage4):
    model = stage4.MusicTransformer(tiny_args(stage4, n_artists=2)).eval()
    tokens = torch.randint(0, 1024, (1, 5, 4))
    with torch.no_grad():
        a, _ = model(tokens, artist=torch.tensor([0]))
        b, _ = model(tokens, artist=torch.tensor([1]))
        none, _ = model(tokens)
    assert not torch.allclose(a, b) and not torch.allclose(a, none)


# ---- sampling windows and condition dropout ------------------------------------------------------------------
def test_artist_shares_follow_frames_to_the_alpha():
    frames = np.array([900, 100])
    assert train_data.artist_shares(frames, 1.0) == pytest.approx([0.9, 0.1])
    assert train_data.artist_shares(frames, 0.0) == pytest.approx([0.5, 0.5])
    assert train_data.artist_shares(frames, 0.5) == pytest.approx([0.75, 0.25])
    assert train_data.split_count(10, np.array([0.75, 0.25])).tolist() in ([8, 2], [7, 3])
    assert int(train_data.split_count(7, np.array([0.2, 0.3, 0.5])).sum()) == 7


def two_artist_store(tmp_path):
    write_dataset(tmp_path, "Big", lengths=(320, 320, 320, 320, 64))
    write_dataset(tmp_path, "Small", lengths=(64, 64))
    entries, labels, manifests = train_data.read_artist_manifests(tmp_path, ["Big", "Small"])
    return train_data.load_dataset(entries, entry_labels=labels), manifests


def test_balanced_windows_give_a_small_artist_its_share(tmp_path):
    data, _ = two_artist_store(tmp_path)
    store, train = data.store, data.store.clips("train")
    natural = train_data.epoch_windows(store, train, 32, seed=0, epoch=0)
    for alpha, small_share in ((0.0, 0.5), (1.0, 64 / (4 * 320 + 64))):
        windows = train_data.balanced_epoch_windows(store, train, 32, seed=0, epoch=0, alpha=alpha)
        assert len(windows) == len(natural)  # the epoch's length (and the LR schedule) is unchanged
        share = float((store.clip_labels(windows[:, 0]) == 1).mean())
        assert share == pytest.approx(small_share, abs=1.5 / len(windows))
    again = train_data.balanced_epoch_windows(store, train, 32, seed=0, epoch=0, alpha=0.5)
    assert np.array_equal(again, train_data.balanced_epoch_windows(store, train, 32, seed=0, epoch=0, alpha=0.5))


def test_condition_dropout_replaces_labels_reproducibly(stage4, tmp_path):
    data, manifests = two_artist_store(tmp_path)
    args = {**stage4.TRAIN_DEFAULTS, "preset": "tiny", "context_frames": 32, "lr": 1e-3, "cond_dropout": 0.3}
    model = stage4.MusicTransformer(tiny_args(stage4, n_artists=2))
    trainer = Trainer(args, model, data, tmp_path / "out", "joint", DistInfo(), "cpu", artists=["Big", "Small"],
                      manifests=manifests)
    windows = np.stack([np.arange(len(data.store.lengths)).repeat(200), np.zeros(200 * len(data.store.lengths),
                                                                                 dtype=np.int64)], axis=1)
    labels = trainer.training_labels(windows, seed=7).numpy()
    owners = data.store.clip_labels(windows[:, 0])
    dropped = labels == 2
    assert dropped.mean() == pytest.approx(0.3, abs=0.05)
    assert np.array_equal(labels[~dropped], owners[~dropped])
    assert np.array_equal(labels, trainer.training_labels(windows, seed=7).numpy())
    assert not np.array_equal(labels, trainer.training_labels(windows, seed=8).numpy())
    trainer.args["cond_dropout"] = 0.0
    assert np.array_equal(trainer.training_labels(windows, seed=7).numpy(), owners)


# ---- stage 4's command line ----------------------------------------------------------------------------------
def test_two_artists_without_name_are_refused(stage4, tmp_path):
    write_dataset(tmp_path, "A")
    write_dataset(tmp_path, "B")
    assert run_main(stage4.main, ["--artist", "A", "--artist", "B", "--root", tmp_path, *TINY]) == 2
    with pytest.raises(StageError, match="--name is required"):
        stage4.main(["--artist", "A", "--artist", "B", "--root", tmp_path, *TINY])
    with pytest.raises(StageError, match="more than once"):
        stage4.main(["--artist", "A", "--artist", "A", "--name", "AA", "--root", tmp_path, *TINY])
    with pytest.raises(SystemExit):
        stage4.main(["--artist", "A", "--artist", "B", "--name", "../up", "--root", tmp_path, *TINY])


def test_a_manifest_of_another_bandwidth_is_named(stage4, tmp_path):
    write_dataset(tmp_path, "A", q=4)
    write_dataset(tmp_path, "B", q=8)
    with pytest.raises(StageError, match=r"metadata_clean_B\.jsonl.*'B' has 8 codebooks at 12.0 kbps"):
        stage4.main(["--artist", "A", "--artist", "B", "--name", "AB", "--root", tmp_path, *TINY])


def test_one_artist_keeps_the_old_run(stage4, tmp_path):
    write_dataset(tmp_path, "A")
    assert stage4.main(["--artist", "A", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    checkpoint = load(results(tmp_path, "A") / "last.pt")
    assert checkpoint["model_args"]["n_artists"] == 0 and checkpoint["artist"] == "A"
    assert checkpoint["artists"] == ["A"] and not any(k.startswith("artist_table") for k in checkpoint["model"])
    record = json.loads((results(tmp_path, "A") / "metrics.jsonl").read_text().splitlines()[-1])
    assert "valid_nll_by_artist" not in record


def test_a_joint_model_records_its_artists_and_scores_each(stage4, tmp_path):
    write_band_dataset(tmp_path, "Low", 0, 256)
    write_band_dataset(tmp_path, "High", 768, 1024, lengths=(60, 60, 40))
    status = stage4.main(["--artist", "Low", "--artist", "High", "--name", "Both", "--root", tmp_path, *TINY,
                          "--epochs", "4", "--cond-dropout", "0.3"])
    assert status == 0
    folder = results(tmp_path, "Both")
    checkpoint = load(folder / "last.pt")
    assert checkpoint["artists"] == ["Low", "High"] and checkpoint["artist"] == "Both"
    assert [p.split("/")[-1] for p in checkpoint["manifests"]] == ["metadata_clean_Low.jsonl",
                                                                    "metadata_clean_High.jsonl"]
    assert checkpoint["model_args"]["n_artists"] == 2 and checkpoint["train_args"]["cond_dropout"] == 0.3
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "baselines"  # the pooled baselines still come first
    last = lines[-1]
    assert set(last["valid_nll_by_artist"]) == {"Low", "High"} == set(last["valid_nll_no_artist_by_artist"])
    # each artist's codes live in their own quarter of the codebook: the label is worth bits
    for artist in ("Low", "High"):
        assert last["valid_nll_by_artist"][artist] < last["valid_nll_no_artist_by_artist"][artist]
    assert last["valid_nll_no_artist_bits_per_frame"] > last["valid_nll_bits_per_frame"]
    with pytest.raises(StageError, match="same --artist list"):
        stage4.main(["--artist", "High", "--artist", "Low", "--name", "Both", "--root", tmp_path, *TINY,
                     "--epochs", "5", "--resume"])


# ---- generation: CFG arithmetic and the guided engine ----------------------------------------------------------
def test_guidance_combines_the_two_halves_of_one_batch():
    from pipeline.generation import GuidedSteps

    class Fixed:
        name = "fixed"

        def prefill(self, tokens):
            self.rows = tokens.shape[0]
            return torch.stack([torch.full((2, 5), 2.0), torch.full((2, 5), 0.5)])  # [2B=2, Q, V]

    guided = GuidedSteps(Fixed(), 3.0)
    logits = guided.prefill(torch.zeros(1, 1, 2, dtype=torch.long))
    assert guided.inner.rows == 2  # conditioned and unconditioned rows in one call
    assert torch.allclose(logits, torch.full((1, 2, 5), 0.5 + 3.0 * (2.0 - 0.5)))
    assert torch.allclose(GuidedSteps(Fixed(), 1.0).prefill(torch.zeros(1, 1, 2, dtype=torch.long)),
                          torch.full((1, 2, 5), 2.0))  # coefficient 1: the conditioned logits


@pytest.mark.parametrize("engine", ["lean", "transformers"])
def test_the_guided_engine_equals_two_separate_passes(stage4, engine):
    from pipeline.generation import GenerationSettings, TokenGenerator, label_weights
    from pipeline.sampling import SamplingSettings

    torch.manual_seed(0)
    model = stage4.MusicTransformer(tiny_args(stage4, n_artists=2)).eval()
    with torch.no_grad():
        model.artist_table.weight.normal_(std=1.0)  # labels that matter
    weights = label_weights(1, 2)
    settings = GenerationSettings(pattern="parallel", context_frames=30, stride_frames=10, num_samples=2,
                                  engine=engine, artist_weights=weights, cfg_coef=2.5)
    generator = TokenGenerator(model, settings, SamplingSettings(), None, None, "cpu")
    steps = generator.make_steps(2)
    if engine == "lean":
        assert steps.inner.decoder.batch == 4  # one decoder of 2B rows: one batched step
    tokens = torch.randint(0, 1024, (2, 6, 4))
    row = torch.randint(0, 1024, (2, 1, 4))
    with torch.inference_mode():
        guided = [steps.prefill(tokens), steps.step(row, 6)]
        logits = {}
        for label in (1, 2):  # the artist, then "no artist"
            rows = torch.tensor(label_weights(label, 2)).expand(2, -1)
            own = model(torch.cat([tokens, row], dim=1), artist=rows)[0]  # [B, 7, Q, V]
            logits[label] = [own[:, 5], own[:, 6]]
    for index in range(2):
        expected = logits[2][index] + 2.5 * (logits[1][index] - logits[2][index])
        assert torch.allclose(guided[index], expected, atol=1e-4)


def test_an_unconditioned_model_ignores_labels_and_guidance(stage4):
    from pipeline.generation import GenerationSettings, generate_frames
    from pipeline.sampling import SamplingSettings

    torch.manual_seed(0)
    model = stage4.MusicTransformer(tiny_args(stage4)).eval()
    plain = GenerationSettings(pattern="delay", context_frames=30, stride_frames=10, num_samples=2)
    asked = GenerationSettings(pattern="delay", context_frames=30, stride_frames=10, num_samples=2,
                               artist_weights=(1.0, 0.0), cfg_coef=3.0)
    first, _ = generate_frames(model, None, 40, plain, SamplingSettings(), None, 5, "cpu")
    second, _ = generate_frames(model, None, 40, asked, SamplingSettings(), None, 5, "cpu")
    assert torch.equal(first, second)


def test_blend_weights_are_checked_and_normalised():
    from pipeline.generation import blend_weights

    assert blend_weights({"A": 3.0, "B": 1.0}, ["A", "B"]) == pytest.approx((0.75, 0.25, 0.0))
    assert blend_weights({"B": 2.0}, ["A", "B"]) == pytest.approx((0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="'C' is not one of the model's artists: A, B"):
        blend_weights({"C": 1.0}, ["A", "B"])
    with pytest.raises(ValueError, match=">= 0"):
        blend_weights({"A": -1.0, "B": 2.0}, ["A", "B"])
    with pytest.raises(ValueError, match="sum to 0"):
        blend_weights({"A": 0.0, "B": 0.0}, ["A", "B"])


# ---- stage 5 with a joint model trained by stage 4 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def joint_root(transformer_module, tmp_path_factory):
    """Two demo artists (codes 0..255 and 768..1023) trained into one model, model_results/Both/."""
    root = tmp_path_factory.mktemp("joint")
    write_band_dataset(root, "Low", 0, 256)
    write_band_dataset(root, "High", 768, 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = transformer_module.main(["--artist", "Low", "--artist", "High", "--name", "Both", "--root", root,
                                          *TINY, "--epochs", "30", "--lr", "1e-2", "--patience", "0"])  # all 30 epochs
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return root


@pytest.fixture
def stage5_run(stage5, random_codec, monkeypatch):
    monkeypatch.setattr(stage5, "load_codec", lambda spec, device="cpu": random_codec)

    def run(root, *args):
        argv = ["--root", str(root), "--log-level", "WARNING", "--seconds", "0.5", "--seed", "1", "--threads", "1",
                *map(str, args)]
        return run_main(stage5.main, argv)

    return run


def generated(root, label, name="sample"):
    folder = root / "music_transformer" / label
    from pipeline.contract import load_token_file

    tokens = load_token_file(folder / f"{name}.th")
    return tokens.codes[0, :, :70].long(), json.loads((folder / f"{name}.json").read_text())  # [Q, T] real frames


def test_a_joint_model_plays_each_artist_a_blend_and_guided(joint_root, stage5_run):
    last = joint_root / "model_results" / "Both" / "last.pt"  # best.pt is epoch 1: random tokens overfit
    for artist in ("Low", "High"):
        assert stage5_run(joint_root, "--model", "Both", "--artist", artist, "--checkpoint", last) == 0
    codes_low, sidecar = generated(joint_root, "Low")
    codes_high, _ = generated(joint_root, "High")
    assert sidecar["artist"] == "Low" and sidecar["conditioning"]["model"] == "Both"
    assert sidecar["conditioning"]["artists"] == ["Low", "High"] and sidecar["conditioning"]["label"] == "Low"
    assert sidecar["conditioning"]["cfg_coef"] == 3.0 and sidecar["conditioning"]["weights"] == [1.0, 0.0, 0.0]
    # the label steers: each artist's pieces lie mostly in its own quarter of the codebook
    low_share = {"Low": float((codes_low < 256).float().mean()), "High": float((codes_high < 256).float().mean())}
    high_share = {"Low": float((codes_low >= 768).float().mean()), "High": float((codes_high >= 768).float().mean())}
    assert low_share["Low"] > 0.8 and high_share["High"] > 0.8
    assert stage5_run(joint_root, "--model", "Both", "--blend", "Low=3,High=1", "--cfg-coef", "1", "--checkpoint",
                      last) == 0
    _, blend = generated(joint_root, "blend_Low-0.75_High-0.25")
    assert blend["conditioning"]["blend"] == {"Low": 0.75, "High": 0.25}
    assert blend["conditioning"]["weights"] == [0.75, 0.25, 0.0] and blend["conditioning"]["cfg_coef"] == 1.0
    assert blend["conditioning"]["label"] is None


def test_bad_artist_options_are_named(joint_root, stage5_run, capsys):
    assert stage5_run(joint_root, "--model", "Both", "--artist", "Nobody") == 2
    error = capsys.readouterr().err
    assert "'Nobody' is not one of the artists" in error and "Low, High" in error
    assert stage5_run(joint_root, "--model", "Both", "--blend", "Low=1,Nobody=1") == 2
    assert stage5_run(joint_root, "--model", "Both", "--artist", "Low", "--blend", "Low=1") == 2
    assert stage5_run(joint_root, "--blend", "Low=1") == 2  # a blend needs --model
    for blend in ("Low=-1,High=2", "Low=0,High=0", "Low"):
        with pytest.raises(SystemExit) as stopped:
            stage5_run(joint_root, "--model", "Both", "--blend", blend)
        assert stopped.value.code == 2
    assert not (joint_root / "music_transformer" / "Nobody").exists()


# ---- run_pipeline.sh --joint ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_pipeline_joint_trains_one_model_and_generates_per_artist(tmp_path):
    """Stages 4-5 of the loop with --joint (stages 1-3 are the same as without it; the e2e tests run them)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_pipeline.sh"
    root = tmp_path / "project"
    for artist in ("Low", "High"):
        write_dataset(root, artist, lengths=(120, 90, 60))
    result = subprocess.run(
        ["bash", str(script), "--stage", "4", "--root", str(root), "--seconds", "1", "--preset", "tiny",
         "--epochs", "1", "--context-frames", "32", "--device", "cpu", "--joint", "Both", "Low", "High"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (root / "model_results").iterdir()) == ["Both"]  # no per-artist models
    checkpoint = load(root / "model_results" / "Both" / "last.pt")
    assert checkpoint["artists"] == ["Low", "High"]
    for artist in checkpoint["artists"]:
        sidecar = json.loads((root / "music_transformer" / artist / "sample.json").read_text())
        assert sidecar["conditioning"]["model"] == "Both" and sidecar["conditioning"]["label"] == artist


def test_an_old_one_artist_checkpoint_generates_as_before(transformer_module, stage5_run, tmp_path):
    """A checkpoint written before labels existed (no n_artists, no artists): loads, ignores --cfg-coef."""
    from dataclasses import asdict

    from pipeline.files import atomic_torch_save

    torch.manual_seed(0)
    args = transformer_module.model_args_for("tiny", 4, 40)
    model = transformer_module.MusicTransformer(args)
    model_args = {k: v for k, v in asdict(args).items() if k != "n_artists"}
    contract = {"n_codebooks": 4, "bandwidth": 6.0, "codec": "random:0", "pattern": "delay", "frame_rate": 150,
                "sample_rate": 48000, "context_frames": 40, "median_scale": 0.05}
    atomic_torch_save({"format": 1, "model": model.state_dict(), "model_args": model_args,
                       "token_contract": contract, "artist": "Old", "epoch": 1, "step": 3},
                      tmp_path / "model_results" / "Old" / "best.pt")
    assert stage5_run(tmp_path, "--artist", "Old", "--name", "plain") == 0
    assert stage5_run(tmp_path, "--artist", "Old", "--name", "guided", "--cfg-coef", "3") == 0
    plain, sidecar = generated(tmp_path, "Old", "plain")
    guided, _ = generated(tmp_path, "Old", "guided")
    assert torch.equal(plain, guided)  # no labels: guidance is off whatever is asked
    assert sidecar["conditioning"] == {"model": "Old", "artists": ["Old"], "label": "Old", "blend": None,
                                       "weights": None, "cfg_coef": 1.0}
    assert stage5_run(tmp_path, "--model", "Old", "--blend", "Old=1") == 2  # a blend needs labels


def test_a_joint_run_stopped_mid_epoch_resumes_exactly(stage4, tmp_path):
    """Label dropout and balanced windows come from seeds: stop + resume == one straight run."""
    for root in (tmp_path / "straight", tmp_path / "stopped"):
        write_band_dataset(root, "Low", 0, 256)
        write_band_dataset(root, "High", 768, 1024, lengths=(60, 40, 40))
    common = ["--artist", "Low", "--artist", "High", "--name", "Both", *TINY, "--epochs", "2", "--dropout", "0.1"]
    assert stage4.main([*common, "--root", tmp_path / "straight"]) == 0
    assert stage4.main([*common, "--root", tmp_path / "stopped", "--max-steps", "3"]) == 0
    assert load(results(tmp_path / "stopped", "Both") / "last.pt")["epoch_batches_done"] > 0  # stopped mid-epoch
    assert stage4.main([*common, "--root", tmp_path / "stopped", "--resume"]) == 0
    straight = load(results(tmp_path / "straight", "Both") / "last.pt")["model"]
    resumed = load(results(tmp_path / "stopped", "Both") / "last.pt")["model"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_one_artist_with_a_name_goes_to_that_folder_unconditioned(stage4, tmp_path):
    write_dataset(tmp_path, "A")
    assert stage4.main(["--artist", "A", "--name", "Solo", "--root", tmp_path, *TINY, "--epochs", "1"]) == 0
    checkpoint = load(results(tmp_path, "Solo") / "last.pt")
    assert checkpoint["model_args"]["n_artists"] == 0 and checkpoint["artists"] == ["A"]
    assert not results(tmp_path, "A").exists()


def test_the_studio_plays_each_artist_a_blend_and_guidance_of_a_joint_model(joint_root, random_codec, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline import pieces
    from pipeline.studio import Studio, create_app

    monkeypatch.setattr(pieces, "load_codec", lambda spec, device="cpu": random_codec)
    studio = Studio(joint_root, allowed_hosts=("testserver",))  # the test client's Host
    try:
        with TestClient(create_app(studio)) as client:
            models = {model["name"]: model for model in client.get("/api/models").json()}
            assert models["Both"]["artists"] == ["Low", "High"] and models["Both"]["joint"]  # the checkpoint's order
            refused = {"unknown artist": ({"artist": "Mid"}, 404, "knows no artist 'Mid'"),
                       "unknown blend artist": ({"blend": {"Low": 1, "Mid": 1}}, 404, "knows no artist 'Mid'"),
                       "artist and blend": ({"artist": "Low", "blend": {"Low": 1}}, 422, "not both"),
                       "empty blend": ({"blend": {}}, 422, "name at least one"),
                       "negative weight": ({"blend": {"Low": -1, "High": 2}}, 422, "weights must be >= 0"),
                       "weights sum to 0": ({"blend": {"Low": 0, "High": 0}}, 422, "sum to 0"),
                       "negative guidance": ({"artist": "Low", "cfg_coef": -1}, 422, "cfg_coef")}
            for case, (settings, status, reason) in refused.items():
                response = client.post("/api/generate", json={"model": "Both", **settings})
                assert response.status_code == status and reason in response.json()["detail"], (case, response.text)
            jobs = {}
            for label, settings in (("High", {"artist": "High"}),
                                    ("blend_Low-0.25_High-0.75", {"blend": {"Low": 1, "High": 3}, "cfg_coef": 2})):
                response = client.post("/api/generate", json={"model": "Both", "seconds": 0.5, "seed": 1, **settings})
                assert response.status_code == 202, response.text
                jobs[label] = response.json()["job"]
            for label, job in jobs.items():
                status = wait_for(client, job)
                assert status["state"] == "done" and status["artist"] == label, status
                assert len(status["pieces"]) == 1 and status["pieces"][0].startswith(f"{label}:")
                sidecar = client.get(f"/api/pieces/{status['pieces'][0]}").json()
                jobs[label] = sidecar["conditioning"]
    finally:
        studio.close()
    assert jobs["High"]["model"] == "Both" and jobs["High"]["label"] == "High" and jobs["High"]["cfg_coef"] == 3.0
    blend = jobs["blend_Low-0.25_High-0.75"]
    assert blend["label"] is None and blend["blend"] == {"Low": 0.25, "High": 0.75}
    assert blend["weights"] == [0.25, 0.75, 0.0] and blend["cfg_coef"] == 2.0
    assert not (joint_root / "music_transformer" / "Mid").exists()
