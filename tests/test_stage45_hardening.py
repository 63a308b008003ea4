"""Hardening of stages 4 and 5: bad input, untrusted files and interruptions.

Cases already shown elsewhere are not repeated here; HARDENING.md maps every case to
its test. Subprocess tests poll until work is under way, then signal; they run with one thread.
"""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import ARTIST, SCRIPTS, TINY, assert_same_weights, load, make_root, outputs, results, write_dataset
from pipeline.cli import run_main
from pipeline.files import atomic_torch_save, is_temporary

SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
TRAIN = [*TINY, "--grad-accum", "2", "--dropout", "0.1", "--epochs", "3"]  # 2 optimizer steps an epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stage4(transformer_module):
    return transformer_module


def run4(stage4, root, *args) -> int:
    """Stage 4 in this process with the real exit-status handling (StageError -> 2)."""
    return run_main(stage4.main, ["--artist", "A", "--root", str(root), *map(str, args)])


# ---- untrusted pickles -------------------------------------------------------------------------
class CreatesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a downloaded file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path, marker) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"model": CreatesMarker(marker), "codes": CreatesMarker(marker)}, handle)


def test_the_malicious_file_really_runs_code_without_weights_only(tmp_path):
    """The control: if a loader ever dropped weights_only=True, the other tests' markers would appear."""
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception):  # torch then complains about the magic number, after running the code
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_stage4_refuses_a_malicious_checkpoint_on_resume(stage4, tmp_path, capfd):
    write_dataset(tmp_path, lengths=(40, 30))
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "evil.pt", marker)
    assert run4(stage4, tmp_path, *TINY, "--resume", tmp_path / "evil.pt") == 2
    error = capfd.readouterr().err
    assert "evil.pt: not a readable checkpoint" in error and "weights_only" in error
    assert not marker.exists() and not results(tmp_path).exists()


def test_stage4_skips_a_malicious_token_file_named_in_the_manifest(stage4, tmp_path, capfd):
    write_dataset(tmp_path, lengths=(40, 30, 30))
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "encoded_tokens/A/clip_1.th", marker)
    assert run4(stage4, tmp_path, *TINY, "--epochs", "1") == 1  # the good clips still train
    assert "clip_1.th: not a readable token file" in capfd.readouterr().err
    assert not marker.exists()
    assert load(results(tmp_path) / "last.pt")["epoch"] == 1


def test_stage5_refuses_a_malicious_checkpoint_and_prompt_tokens(stage5, transformer_module, in_process, tmp_path,
                                                                capsys):
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "evil.pt", marker)
    write_malicious(tmp_path / "evil.th", marker)
    assert in_process(tmp_path, "--checkpoint", tmp_path / "evil.pt") == 2
    assert "evil.pt: not a readable checkpoint (Weights only load failed" in capsys.readouterr().err
    root = make_root(tmp_path, transformer_module, "parallel")
    assert in_process(root, "--prompt-tokens", tmp_path / "evil.th") == 2
    assert "evil.th: not a readable token file" in capsys.readouterr().err
    assert not marker.exists() and not (root / "music_transformer").exists()


# ---- stage 4: bad input --------------------------------------------------------------------------
def test_stage4_manifest_line_that_is_not_json_exits_2(stage4, tmp_path, capfd):
    manifest = write_dataset(tmp_path, lengths=(40, 30))
    with open(manifest, "a") as handle:
        handle.write("{this is not json\n")
    assert run4(stage4, tmp_path, *TINY) == 2
    assert "metadata_clean_A.jsonl:3: not valid JSON" in capfd.readouterr().err
    assert not results(tmp_path).exists()


def test_stage4_manifest_path_outside_the_root_needs_the_flag(stage4, tmp_path, capfd):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    manifest = write_dataset(root, lengths=(40, 30, 30))
    write_dataset(elsewhere, lengths=(50,), valid=0)
    lines = manifest.read_text().splitlines()
    outside = lines[0].replace("encoded_tokens/A/clip_0.th", "../elsewhere/encoded_tokens/A/clip_0.th")
    for escaping in ("../../etc/passwd", "/etc/passwd"):
        manifest.write_text("\n".join([*lines, lines[0].replace("encoded_tokens/A/clip_0.th", escaping)]) + "\n")
        assert run4(stage4, root, *TINY) == 2
        error = capfd.readouterr().err
        assert f"metadata_clean_A.jsonl:4: path '{escaping}' points outside the project root" in error
        assert "--allow-outside-root" in error
    manifest.write_text("\n".join([*lines, outside]) + "\n")
    assert run4(stage4, root, *TINY, "--epochs", "1") == 2  # a trusted folder is still refused without the flag
    assert run4(stage4, root, *TINY, "--epochs", "1", "--allow-outside-root") == 0
    # windows of 32: the 40-frame clip_0 two, the 30-frame clip_1 one, the 50-frame outside clip two
    assert load(results(root) / "last.pt")["metrics"]["frames"] == 64 + 30 + 64
    assert "--allow-outside-root" in stage4.build_parser().format_help()


def test_stage4_clips_shorter_than_the_context_train_with_padding(stage4, tmp_path):
    write_dataset(tmp_path, lengths=(10, 7, 5, 3))  # every clip far below the 32-frame context
    assert run4(stage4, tmp_path, *TINY, "--epochs", "2") == 0
    checkpoint = load(results(tmp_path) / "last.pt")
    metrics = checkpoint["metrics"]
    assert metrics["frames"] == 10 + 7 + 5  # PAD frames are never targets
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["valid_nll_bits_per_frame"])
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_stage4_context_beyond_the_models_positions_exits_2(stage4, tmp_path, capfd):
    write_dataset(tmp_path, lengths=(40, 30))
    assert run4(stage4, tmp_path, *TINY, "--epochs", "1") == 0  # n_positions = 32 + Q = 36
    assert run4(stage4, tmp_path, *TINY, "--epochs", "2", "--resume", "--context-frames", "64") == 2
    assert "--context-frames 64 differs from the checkpoint's 32" in capfd.readouterr().err
    last = results(tmp_path) / "last.pt"
    checkpoint = load(last)
    checkpoint["train_args"]["context_frames"] = 64  # a checkpoint whose saved window outgrows its model
    atomic_torch_save(checkpoint, tmp_path / "edited.pt")
    assert run4(stage4, tmp_path, "--epochs", "2", "--log-level", "WARNING", "--resume", tmp_path / "edited.pt") == 2
    assert "edited.pt has only 36" in capfd.readouterr().err
    assert load(last)["epoch"] == 1  # nothing was overwritten


@pytest.mark.parametrize("change, message", [
    ("weights", "weights do not match the model its model_args describe"),
    ("unknown key", "model_args has keys this model does not take: n_experts"),
])
def test_stage4_resume_from_another_architecture_exits_2(stage4, tmp_path, capfd, change, message):
    write_dataset(tmp_path, lengths=(40, 30))
    foreign = load_foreign_checkpoint(stage4, tmp_path)
    if change == "weights":  # the arguments say tiny, the weights are twice as wide
        torch.manual_seed(0)
        wide = stage4.MusicTransformer(stage4.model_args_for("tiny", 4, 32, {"d_model": 64}))
        foreign["model"] = wide.state_dict()
    else:
        foreign["model_args"]["n_experts"] = 8
    atomic_torch_save(foreign, tmp_path / "foreign.pt")
    assert run4(stage4, tmp_path, *TINY, "--epochs", "2", "--resume", tmp_path / "foreign.pt") == 2
    error = capfd.readouterr().err
    assert f"foreign.pt: {message}" in error
    if change == "weights":
        assert "shape mismatches" in error and "[64" in error
    assert not (results(tmp_path) / "last.pt").exists()


def load_foreign_checkpoint(stage4, tmp_path) -> dict:
    """A real one-epoch checkpoint, trained in another root."""
    write_dataset(tmp_path / "other", lengths=(40, 30))
    assert run4(stage4, tmp_path / "other", *TINY, "--epochs", "1") == 0
    return load(results(tmp_path / "other") / "last.pt")


# ---- stage 4: interruptions --------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight(transformer_module, tmp_path_factory):
    """Three uninterrupted epochs: what every interrupted run must reproduce once resumed."""
    root = tmp_path_factory.mktemp("straight")
    write_dataset(root, lengths=(70, 64, 40, 30))
    assert run4(transformer_module, root, *TRAIN) == 0
    return load(results(root) / "last.pt")


def start_training(root, log_path) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPTS / "4_Transformer.py"), "--artist", "A", "--root", str(root), *TRAIN]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env=SUBPROCESS_ENV)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_no_partial_files(folder) -> None:
    """No temporary is left, and every file under a final name is complete (loads with weights_only)."""
    assert not [path.name for path in folder.rglob("*") if is_temporary(path)]
    for path in final_checkpoints(folder):
        load(path)


def final_checkpoints(folder) -> list:
    """The checkpoints under a final name: `.pt` files of the folder that are no temporary."""
    return sorted(path for path in folder.iterdir() if path.suffix == ".pt" and not is_temporary(path))


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM], ids=["SIGTERM"])  # SIGINT: test_stage4.py
def test_stage4_signal_in_a_subprocess_then_resume_matches_a_straight_run(stage4, tmp_path, straight,
                                                                          signal_number):
    write_dataset(tmp_path, lengths=(70, 64, 40, 30))
    log_path = tmp_path / "stderr.txt"
    process = start_training(tmp_path, log_path)
    wait_for(lambda: "epoch 2/3" in log_path.read_text(), process, "epoch 2 began")
    process.send_signal(signal_number)
    assert process.wait(timeout=120) == 130
    log = log_path.read_text()
    assert f"{signal.Signals(signal_number).name} received: saving a resumable checkpoint" in log
    folder = results(tmp_path)
    assert_no_partial_files(folder)
    assert load(folder / "last.pt")["step"] < straight["step"]
    assert run4(stage4, tmp_path, *TRAIN, "--resume") == 0
    assert_same_weights(load(folder / "last.pt")["model"], straight["model"])


def test_stage4_leftover_of_an_interrupted_checkpoint_write_is_ignored(stage4, tmp_path, straight):
    """What SIGKILL inside atomic_torch_save leaves: the intact previous last.pt and a cut temporary."""
    write_dataset(tmp_path, lengths=(70, 64, 40, 30))
    assert run4(stage4, tmp_path, *TRAIN, "--max-steps", "2") == 0  # epoch 1 done, last.pt written
    folder = results(tmp_path)
    whole = (folder / "last.pt").read_bytes()
    leftover = folder / ".last.tmp-k1ll3d" / "last.pt"  # atomic_path's temporary folder and file
    leftover.parent.mkdir()
    leftover.write_bytes(whole[:len(whole) // 3])
    assert is_temporary(leftover) and leftover not in final_checkpoints(folder)  # never listed as a checkpoint
    assert run4(stage4, tmp_path, *TRAIN, "--resume") == 0
    assert not leftover.parent.exists()
    assert_no_partial_files(folder)
    assert_same_weights(load(folder / "last.pt")["model"], straight["model"])


@pytest.mark.slow
def test_stage4_sigkill_at_a_random_moment_then_resume(stage4, tmp_path, straight):
    write_dataset(tmp_path, lengths=(70, 64, 40, 30))
    folder = results(tmp_path)
    process = start_training(tmp_path, tmp_path / "stderr.txt")
    wait_for(lambda: (folder / "last.pt").is_file(), process, "the first checkpoint")
    delay = random.SystemRandom().uniform(0.0, 0.6)  # not the seeded generator: a new moment every run
    time.sleep(delay)
    process.kill()
    process.wait(timeout=60)
    for path in final_checkpoints(folder):  # every file under a final name is whole, whenever the kill came
        load(path)
    assert run4(stage4, tmp_path, *TRAIN, "--resume") == 0, f"killed {delay:.3f} s after the first checkpoint"
    assert_no_partial_files(folder)
    assert_same_weights(load(folder / "last.pt")["model"], straight["model"])


# ---- stage 5: bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"hello, not audio" * 40, "cannot decode")],
                         ids=["empty", "text"])
def test_stage5_prompt_audio_that_cannot_be_decoded_exits_2(transformer_module, in_process, tmp_path, capsys,
                                                            content, reason):
    root = make_root(tmp_path, transformer_module, "parallel")
    (tmp_path / "prompt.wav").write_bytes(content)
    assert in_process(root, "--prompt-audio", tmp_path / "prompt.wav") == 2
    assert f"prompt.wav: {reason}" in capsys.readouterr().err
    assert not (root / "music_transformer").exists()


def test_stage5_top_k_above_the_vocabulary_is_clamped_and_help_documents_it(stage5):
    from pipeline.sampling import SamplingSettings, sample_tokens

    logits = torch.randn(50, 4, 1024, generator=torch.Generator().manual_seed(0))  # the codes: BOS and PAD cut off
    hot = torch.full((50,), 1.5)
    drawn = [sample_tokens(logits, hot, SamplingSettings(top_k=k), torch.Generator().manual_seed(1))
             for k in (0, 1024, 100_000)]
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])
    assert stage5.build_parser().parse_args(["--artist", "a", "--top-k", "100000"]).top_k == 100_000
    help_text = " ".join(stage5.build_parser().format_help().split())
    assert "0 = greedy" in help_text and "clamped" in help_text


def test_stage5_median_scale_never_reads_a_manifest_path_outside_the_root(tmp_path):
    from pipeline.pieces import median_scale_for

    manifest = tmp_path / f"metadata_clean_{ARTIST}.jsonl"
    manifest.write_text('{"audio": "../../etc/passwd", "duration": 1, "sample_rate": 48000, "median_scale": 9}\n')
    scale, source = median_scale_for({"median_scale": None}, tmp_path, ARTIST)
    assert scale is None and "points outside the project root" in source


def test_stage5_codec_folder_named_by_a_checkpoint_must_be_inside_the_root(tmp_path):
    from pipeline.pieces import checked_codec_spec
    from pipeline.request import GenerationRefused

    root, outside = tmp_path / "root", tmp_path / "codec"
    (root / "codecs/mine").mkdir(parents=True)
    outside.mkdir()
    loaded = SimpleNamespace(path=root / "best.pt", contract={"codec": str(outside)})
    with pytest.raises(GenerationRefused, match=f"names the codec folder {outside}, outside the project root.*--codec"):
        checked_codec_spec(loaded, root)
    for inside in (str(root / "codecs/mine"), "random:0", "facebook/encodec_48khz"):
        loaded.contract["codec"] = inside
        assert checked_codec_spec(loaded, root) == inside


# ---- stage 5: interruptions ---------------------------------------------------------------------------
GENERATE = ["--seconds", "2", "--seed", "5", "--threads", "1", "--name", "piece"]


@pytest.fixture(scope="module")
def reference_piece(stage5, transformer_module, random_codec, tmp_path_factory):
    """The tokens of an uninterrupted run: what a re-run after any interruption must reproduce."""
    root = make_root(tmp_path_factory.mktemp("reference"), transformer_module, "parallel")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage5, "load_codec", lambda spec, device="cpu": random_codec)
        assert run_main(stage5.main, ["--artist", ARTIST, "--root", str(root), "--log-level", "WARNING",
                                      *GENERATE]) == 0
    return load(outputs(root, "piece")[".th"])["codes"]


@pytest.mark.slow
def test_stage5_sigterm_in_a_subprocess_then_a_rerun_matches(transformer_module, in_process, reference_piece,
                                                              tmp_path):
    root = make_root(tmp_path, transformer_module, "parallel")
    log_path = tmp_path / "stderr.txt"
    command = [sys.executable, str(SCRIPTS / "5_MusicPrediction.py"), "--artist", ARTIST, "--root", str(root),
               *GENERATE]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env=SUBPROCESS_ENV)
    wait_for(lambda: "generating:" in log_path.read_text(), process, "generation began")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130, log_path.read_text()
    assert "interrupted; finished outputs are kept" in log_path.read_text()
    assert not any(path.exists() for path in outputs(root, "piece").values())
    assert not list(root.rglob("*.tmp-*"))
    assert in_process(root, *GENERATE) == 0
    assert torch.equal(load(outputs(root, "piece")[".th"])["codes"], reference_piece)


def test_stage5_sigint_while_writing_then_a_rerun_redoes_the_piece(transformer_module, in_process, reference_piece,
                                                                   tmp_path, monkeypatch):
    from pipeline import pieces

    root = make_root(tmp_path, transformer_module, "parallel")
    real_spectrogram = pieces.write_spectrogram

    def ctrl_c_while_plotting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the WAV and tokens are written, the plot and JSON are not
        return real_spectrogram(*args, **kwargs)

    monkeypatch.setattr(pieces, "write_spectrogram", ctrl_c_while_plotting)
    assert in_process(root, *GENERATE) == 130
    files = outputs(root, "piece")
    assert sf.read(files[".wav"])[0].shape == (2 * 48_000, 2)  # under its final name only once complete
    assert not files[".png"].exists() and not files[".json"].exists()  # so the piece is not finished
    assert not list(root.rglob("*.tmp-*"))
    monkeypatch.setattr(pieces, "write_spectrogram", real_spectrogram)
    assert in_process(root, *GENERATE) == 0  # the JSON is missing: the piece is redone, not skipped
    assert files[".json"].is_file() and files[".png"].is_file()
    assert torch.equal(load(files[".th"])["codes"], reference_piece)
