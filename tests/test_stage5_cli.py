"""Stage 5 end to end: checkpoint -> tokens -> WAV/.th/.json/.png, prompts, skips and errors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import ARTIST, make_root, outputs, run_script, sine_tone
from pipeline.contract import CODEBOOK_SIZE, load_token_file
from pipeline.files import atomic_torch_save


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_script_writes_every_output_and_skips_finished_pieces(transformer_module, tmp_path):
    root = make_root(tmp_path, transformer_module, "delay")
    args = ("--artist", ARTIST, "--root", root, "--seconds", 1.2, "--num-samples", 2, "--seed", 3, "--threads", 1,
            "--repetition-penalty", 1.2)
    result = run_script("5_MusicPrediction.py", *args, check=True)
    assert "frame/s" in result.stderr  # the tqdm bar reports frames per second
    for name in ("sample_0", "sample_1"):
        files = outputs(root, name)
        wave, rate = sf.read(files[".wav"])
        assert rate == 48_000 and wave.shape == (57_600, 2)
        assert 0.0 < np.abs(wave).max() <= 10 ** (-1 / 20) + 1e-3  # normalised, never clipped
        tokens = load_token_file(files[".th"])
        assert tokens.codes.shape == (1, 4, 300) and tokens.scales.tolist() == pytest.approx([0.05, 0.05])
        assert tokens.num_samples == 57_600 and tokens.codec == "random:0"
        sidecar = json.loads(files[".json"].read_text())
        assert sidecar["seed"] == 3 and sidecar["parameters"]["repetition_penalty"] == 1.2
        assert sidecar["checkpoint"]["path"].endswith("best.pt") and sidecar["checkpoint"]["epoch"] == 2
        assert sidecar["frames"] == {"total": 182, "prompt": 0, "generated": 182}
        assert "UNTRAINED" in sidecar["warning"] and sidecar["codec"]["pretrained"] is False
        assert sidecar["codec"]["decoder"] == "fast"  # the restructured decoder on the CPU (docs/stage5.md)
        timings = sidecar["timings"]  # the real-time factor is the batch's audio over its wall time, audio ready
        wall = timings["generate_s"] + timings["decode_wait_s"]
        assert sidecar["real_time_factor"] == pytest.approx(2 * 1.2 / wall, rel=1e-2, abs=2e-3)
        assert sidecar["frames_per_second"] == pytest.approx(2 * 182 / timings["generate_s"], rel=1e-2, abs=0.02)
        assert timings["decode_s"] > 0 and sidecar["threads"]["decode_overlapped"] is True
        assert sidecar["audio_samples"] == 57_600 and sidecar["parameters"]["num_samples"] == 2
        assert "num_samples" not in sidecar  # one name, one meaning: pieces
        assert sidecar["window"]["engine"] == "lean"
        assert sidecar["collapse_events"] == []
        assert files[".png"].read_bytes()[:4] == b"\x89PNG"
    first = load_token_file(outputs(root, "sample_0")[".th"]).codes
    assert not torch.equal(first, load_token_file(outputs(root, "sample_1")[".th"]).codes)
    stamp = outputs(root, "sample_0")[".wav"].stat().st_mtime_ns
    again = run_script("5_MusicPrediction.py", *args, check=True)
    assert "already exist" in again.stderr
    assert outputs(root, "sample_0")[".wav"].stat().st_mtime_ns == stamp


def test_prompt_audio_is_encoded_like_training_and_continued(transformer_module, random_codec, in_process,
                                                             tmp_path):
    root = make_root(tmp_path, transformer_module, "parallel")
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, sine_tone(2.0, rate=44_100), 44_100)  # resampled and conditioned like stage 1
    assert in_process(root, "--prompt-audio", prompt, "--prompt-seconds", 0.5, "--seconds", 1.2,
                      "--no-cache", "--name", "cont") == 0
    tokens = load_token_file(outputs(root, "cont")[".th"])
    from pipeline.audio import load_conditioned

    wave = load_conditioned(prompt, max_seconds=0.5)  # [n, 2]
    expected_codes, expected_scales = random_codec.encode(torch.from_numpy(wave.T.copy()), 6.0)
    assert torch.equal(tokens.codes[:, :, :75], expected_codes[:, :, :75])  # 0.5 s = 75 frames, kept as is
    assert tokens.scales[0] == pytest.approx(float(expected_scales[0, 0]))  # the prompt's own scale
    assert tokens.scales[1] == pytest.approx(0.05)  # generated chunk: the checkpoint's median scale
    sidecar = json.loads(outputs(root, "cont")[".json"].read_text())
    assert sidecar["prompt"]["kind"] == "audio" and sidecar["frames"]["prompt"] == 75
    assert sidecar["window"]["kv_cache"] is False and sidecar["window"]["engine"] == "recompute"


def test_prompt_tokens_bare_tensor_and_q_mismatch(transformer_module, in_process, tmp_path, capsys):
    root = make_root(tmp_path, transformer_module, "delay", median_scale=None)
    prompt = torch.randint(0, CODEBOOK_SIZE, (1, 4, 200), dtype=torch.int16)
    torch.save(prompt, tmp_path / "prompt.th")
    assert in_process(root, "--prompt-tokens", tmp_path / "prompt.th", "--prompt-seconds", 0.5, "--seconds", 1.2,
                      "--temperature", 0, "--name", "greedy") == 0
    tokens = load_token_file(outputs(root, "greedy")[".th"])
    assert torch.equal(tokens.codes[:, :, :75], prompt[:, :, :75])
    sidecar = json.loads(outputs(root, "greedy")[".json"].read_text())
    assert sidecar["scale_sources"] == ["default 1.0", "default 1.0"]  # no scales anywhere: 1.0, with a warning
    assert sidecar["parameters"]["prompt_tokens"] == str(tmp_path / "prompt.th")
    assert "no scale for generated chunks" in capsys.readouterr().err
    torch.save(torch.zeros(1, 8, 150, dtype=torch.int16), tmp_path / "q8.th")
    assert in_process(root, "--prompt-tokens", tmp_path / "q8.th", "--name", "bad") == 2
    error = capsys.readouterr().err
    assert "q8.th: the prompt has Q = 8 codebooks" in error and "Q = 4" in error


def test_seed_tokens_still_works_for_one_release_with_a_warning(transformer_module, in_process, tmp_path, capsys):
    root = make_root(tmp_path, transformer_module, "delay")
    prompt = torch.randint(0, CODEBOOK_SIZE, (1, 4, 200), dtype=torch.int16)
    torch.save(prompt, tmp_path / "prompt.th")
    assert in_process(root, "--seed-tokens", tmp_path / "prompt.th", "--prompt-seconds", 0.5, "--seconds", 1.2,
                      "--temperature", 0, "--name", "old_spelling") == 0
    assert "--seed-tokens is deprecated" in capsys.readouterr().err
    tokens = load_token_file(outputs(root, "old_spelling")[".th"])
    assert torch.equal(tokens.codes[:, :, :75], prompt[:, :, :75])


def test_help_shows_each_default_once_and_hides_the_developer_options(stage5):
    help_text = stage5.build_parser().format_help()
    text = " ".join(help_text.split())
    assert "(default: best.pt, then last.pt)" in text and not re.search(r"\(default:[^)]*\) \(default:", text)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 10.0)" in text  # --seconds: a real default is still shown
    for hidden in ("--seed-tokens", "--engine", "--no-cache"):
        assert hidden not in text  # deprecated, or reference paths for tests and benchmarks (docs/stage5.md)
    sections = {section.split(":", 1)[0]: section for section in help_text.split("\n\n")}
    assert all(option in sections["prompt"] for option in ("--prompt-tokens", "--prompt-audio", "--prompt-seconds"))


def test_missing_checkpoint_and_bad_window_exit_2(transformer_module, in_process, tmp_path, capsys):
    assert in_process(tmp_path) == 2
    assert "4_Transformer.py" in capsys.readouterr().err
    folder = tmp_path / "model_results" / ARTIST
    folder.mkdir(parents=True)
    (folder / ".best.tmp-ab12.pt").write_bytes(b"x")  # an interrupted save's temporary
    (folder / "music_transformer_ep3.pt").write_bytes(b"x")
    assert in_process(tmp_path, "--epoch", 9) == 2
    error = capsys.readouterr().err
    assert "it holds music_transformer_ep3.pt" in error and ".best.tmp" not in error
    (folder / "music_transformer_ep3.pt").unlink()
    root = make_root(tmp_path, transformer_module, "parallel")
    assert in_process(root, "--context-frames", 500) == 2
    assert "exceeds" in capsys.readouterr().err
    # 121 frames still fit the 124 positions, but position 121 was never trained: refused, with the limit
    assert in_process(root, "--context-frames", 121) == 2
    assert "exceeds the training context of 120 frames" in capsys.readouterr().err
    assert in_process(root, "--context-frames", 50, "--stride-frames", 60) == 2
    assert "larger than the context" in capsys.readouterr().err


def test_collapse_events_reach_the_sidecar(transformer_module, in_process, tmp_path, capsys):
    """A checkpoint whose heads always favour one token collapses; the event is logged and in the JSON."""
    root = make_root(tmp_path, transformer_module, "parallel")
    path = root / "model_results" / ARTIST / "best.pt"
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["model"]
    state["heads.weight"].zero_()  # the logits no longer depend on the input
    state["heads.bias"].zero_()
    state["heads.bias"].view(4, -1)[:, 7] = 50.0  # token 7 of every codebook: logit 50 against 0
    atomic_torch_save(checkpoint, path)
    assert in_process(root, "--seconds", 1.2, "--seed", 1, "--collapse-bits", 1.0, "--collapse-window", 40,
                      "--boost-frames", 20, "--name", "stuck") == 0
    events = json.loads(outputs(root, "stuck")[".json"].read_text())["collapse_events"]
    assert len(events) >= 2 and events[0]["frame"] == 39 and events[0]["codebooks"] == [0, 1, 2, 3]
    assert all(bits < 1.0 for bits in events[0]["mean_entropy_bits"])
    assert "collapse in piece 0 at frame 39" in capsys.readouterr().err


def test_overlapped_decoding_writes_the_same_audio_as_decoding_at_the_end(transformer_module, in_process, tmp_path):
    root = make_root(tmp_path, transformer_module, "delay")
    common = ("--seconds", 2.2, "--seed", 4, "--num-samples", 2, "--decode-chunk-seconds", 1)
    assert in_process(root, *common, "--name", "overlapped") == 0
    assert in_process(root, *common, "--decode-at-end", "--name", "at_end") == 0
    for index in range(2):
        overlapped, _ = sf.read(outputs(root, f"overlapped_{index}")[".wav"])
        at_end, _ = sf.read(outputs(root, f"at_end_{index}")[".wav"])
        assert overlapped.shape == (105_600, 2) and np.array_equal(overlapped, at_end)
    sidecar = json.loads(outputs(root, "overlapped_0")[".json"].read_text())
    assert sidecar["threads"]["decode_overlapped"] is True
    assert json.loads(outputs(root, "at_end_0")[".json"].read_text())["threads"]["decode_overlapped"] is False


def test_bfloat16_generation_and_the_transformers_engine_run_end_to_end(transformer_module, in_process, tmp_path):
    """(The engines' tokens are compared on a model with spread logits in test_stage5_engine.py.)"""
    root = make_root(tmp_path, transformer_module, "delay")
    assert in_process(root, "--seconds", 1.2, "--seed", 2, "--dtype", "bfloat16", "--name", "bf16") == 0
    assert in_process(root, "--seconds", 1.2, "--seed", 2, "--temperature", 0, "--engine", "transformers",
                      "--name", "hf") == 0
    for name in ("bf16", "hf"):
        tokens = load_token_file(outputs(root, name)[".th"]).codes[:, :, :182]
        assert int(tokens.min()) >= 0 and int(tokens.max()) < CODEBOOK_SIZE
    assert json.loads(outputs(root, "bf16")[".json"].read_text())["parameters"]["dtype"] == "bfloat16"
    assert json.loads(outputs(root, "hf")[".json"].read_text())["window"]["engine"] == "transformers"
