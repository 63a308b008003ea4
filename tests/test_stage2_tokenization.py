"""Stage 2 (scripts/2_Tokenization.py): clips -> contract token files, with the seeded random codec."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from helpers import SCRIPTS, finished_files, run_script, sine_tone
from pipeline.contract import CHUNK_FRAMES, load_token_file
from pipeline.dist import DistInfo

ARTIST = "Band"
CONTRACT_KEYS = {"codes", "scales", "frame_rate", "chunk_frames", "sample_rate", "num_samples", "bandwidth",
                 "codec", "source", "format"}


def write_clip(root: Path, relative: str, seconds: float = 1.0, rate: int = 48_000, channels: int = 2,
               freq: float = 330.0) -> Path:
    """A clip below data_processed/<ARTIST>/ as stage 1 would write it."""
    path = root / "data_processed" / ARTIST / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, sine_tone(seconds, rate=rate, channels=channels, freq=freq), rate)
    return path


def tokenize(stage2, root, codec, **options):
    return stage2.tokenize_artist(root, ARTIST, codec=codec, log=logging.getLogger("test.stage2"), **options)


def token_path(root: Path, relative: str) -> Path:
    return (root / "encoded_tokens" / ARTIST / relative).with_suffix(".th")


def test_token_file_follows_the_contract_and_decodes_to_the_clip_length(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "album/song one_000.wav", seconds=1.05)  # not a whole number of chunks
    report = tokenize(stage2, tmp_path, random_codec, bandwidth=6.0)
    assert report.exit_code() == 0 and len(report.done) == 1

    saved = torch.load(token_path(tmp_path, "album/song one_000"), weights_only=True)
    assert set(saved) == CONTRACT_KEYS
    codes, scales = saved["codes"], saved["scales"]
    assert codes.dtype == torch.int16 and scales.dtype == torch.float32
    n_chunks = random_codec.n_chunks(int(1.05 * 48_000))
    assert n_chunks == 2
    assert list(codes.shape) == [1, 4, CHUNK_FRAMES * n_chunks]  # Q=4 at 6 kbps, T = 150 x n_chunks
    assert list(scales.shape) == [n_chunks] and bool((scales > 0).all())
    assert 0 <= int(codes.min()) and int(codes.max()) <= 1023
    assert len(torch.unique(codes)) > 20  # the random codec's codebooks are usable, not all zeros
    # the file holds only its own codes, not the whole batch's storage
    assert codes.untyped_storage().nbytes() == codes.numel() * 2
    assert saved["num_samples"] == int(1.05 * 48_000) and saved["sample_rate"] == 48_000
    assert saved["frame_rate"] == 150 and saved["chunk_frames"] == 150 and saved["format"] == 1
    assert saved["bandwidth"] == 6.0 and saved["codec"] == "random:0"
    assert saved["source"] == f"data_processed/{ARTIST}/album/song one_000.wav"

    token = load_token_file(token_path(tmp_path, "album/song one_000"))
    wave = random_codec.decode(token.codes, token.scales, token.num_samples)
    assert list(wave.shape) == [2, int(1.05 * 48_000)]


@pytest.mark.parametrize("bandwidth, q", [(3.0, 2), (12.0, 8)])
def test_bandwidth_sets_the_number_of_codebooks(stage2, random_codec, tmp_path, bandwidth, q):
    write_clip(tmp_path, "a_000.wav", seconds=0.5)
    tokenize(stage2, tmp_path, random_codec, bandwidth=bandwidth)
    token = load_token_file(token_path(tmp_path, "a_000"))
    assert token.n_codebooks == q and token.bandwidth == bandwidth


def test_batched_encoding_equals_one_clip_at_a_time(stage2, random_codec, tmp_path, monkeypatch):
    clips = [f"t{index}_000.wav" for index in range(3)] + ["long_000.wav"]
    for index, name in enumerate(clips):
        for root in (tmp_path / "batched", tmp_path / "single"):
            write_clip(root, name, seconds=0.6 if name.startswith("long") else 0.4, freq=200 + 150 * index)
    batch_sizes = []
    encode = random_codec.encode

    def counting_encode(wave, bandwidth):
        batch_sizes.append(wave.shape[0])
        return encode(wave, bandwidth)

    monkeypatch.setattr(random_codec, "encode", counting_encode)
    tokenize(stage2, tmp_path / "batched", random_codec, batch_size=8)
    assert sorted(batch_sizes) == [1, 3]  # the three equal clips in one pass, the longer one alone
    tokenize(stage2, tmp_path / "single", random_codec, batch_size=1)
    assert len(batch_sizes) == 2 + 4
    for name in clips:
        batched = load_token_file(token_path(tmp_path / "batched", name))
        single = load_token_file(token_path(tmp_path / "single", name))
        assert torch.equal(batched.codes, single.codes), name
        torch.testing.assert_close(batched.scales, single.scales)


def test_batches_hold_clips_of_one_length_only(stage2):
    lengths = [100, 200, 100, 100, 200, 300, 100]
    clips = [stage2.Clip(Path(f"{i}.wav"), Path(f"{i}.th"), f"{i}.wav", n) for i, n in enumerate(lengths)]
    batches = stage2.make_batches(clips, batch_size=3)
    assert sorted(clip.source for batch in batches for clip in batch) == sorted(clip.source for clip in clips)
    assert all(len({clip.num_samples for clip in batch}) == 1 and len(batch) <= 3 for batch in batches)
    assert [len(batch) for batch in batches] == [3, 1, 2, 1]


def test_rerun_skips_finished_files_and_overwrite_redoes_them(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "a_000.wav", seconds=0.5)
    write_clip(tmp_path, "a_001.wav", seconds=0.5)
    tokenize(stage2, tmp_path, random_codec)
    first = {name: token_path(tmp_path, name).stat().st_mtime_ns for name in ("a_000", "a_001")}
    leftover = tmp_path / "encoded_tokens" / ARTIST / ".a_002.tmp-xyz.th"  # an interrupted write
    leftover.write_bytes(b"partial")

    again = tokenize(stage2, tmp_path, random_codec)
    assert len(again.done) == 0 and len(again.skipped) == 2
    assert {name: token_path(tmp_path, name).stat().st_mtime_ns for name in first} == first
    assert not leftover.exists()

    redone = tokenize(stage2, tmp_path, random_codec, overwrite=True)
    assert len(redone.done) == 2 and len(redone.skipped) == 0
    assert all(token_path(tmp_path, name).stat().st_mtime_ns != first[name] for name in first)
    report = json.loads((tmp_path / "encoded_tokens" / ARTIST / "report.json").read_text())
    assert report["done"] == 2 and report["exit_status"] == 0


def test_an_interrupted_run_is_finished_by_the_next(stage2, random_codec, tmp_path, monkeypatch):
    for index in range(3):
        write_clip(tmp_path, f"t{index}_000.wav", seconds=0.3)
    real_save = torch.save
    calls = []

    def interrupted_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # Ctrl-C halfway through writing the second file
            path.write(b"half a file")  # save_token_file hands torch.save an open file
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        tokenize(stage2, tmp_path, random_codec, batch_size=1)
    monkeypatch.setattr(torch, "save", real_save)
    token_folder = tmp_path / "encoded_tokens" / ARTIST
    assert sorted(path.name for path in token_folder.iterdir()) == ["t0_000.th"]  # no partial file, no final name
    report = tokenize(stage2, tmp_path, random_codec, batch_size=1)
    assert len(report.skipped) == 1 and len(report.done) == 2
    outputs = sorted(path.name for path in (tmp_path / "encoded_tokens" / ARTIST).iterdir())
    assert outputs == ["report.json", "t0_000.th", "t1_000.th", "t2_000.th"]


def test_a_damaged_token_file_is_encoded_again(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "a_000.wav", seconds=0.5)
    token_path(tmp_path, "a_000").parent.mkdir(parents=True)
    token_path(tmp_path, "a_000").write_bytes(b"not a torch file")
    report = tokenize(stage2, tmp_path, random_codec)
    assert report.done == [f"data_processed/{ARTIST}/a_000.wav"]
    assert load_token_file(token_path(tmp_path, "a_000")).n_codebooks == 4


def test_bad_clips_are_named_and_good_ones_still_encoded(stage2, random_codec, tmp_path):
    write_clip(tmp_path, "good_000.wav", seconds=0.5)
    write_clip(tmp_path, "mono_000.wav", seconds=0.5, channels=1)
    write_clip(tmp_path, "slow_000.wav", seconds=0.5, rate=44_100)
    (tmp_path / "data_processed" / ARTIST / "text_000.wav").write_text("this is not audio")
    (tmp_path / "data_processed" / ARTIST / "empty_000.wav").write_bytes(b"")
    report = tokenize(stage2, tmp_path, random_codec)

    reasons = {Path(item["path"]).stem: item["reason"] for item in report.failed}
    assert set(reasons) == {"mono_000", "slow_000", "text_000", "empty_000"}
    assert "1 channel" in reasons["mono_000"]
    assert "44100 Hz" in reasons["slow_000"]
    assert "cannot read" in reasons["text_000"] and "cannot read" in reasons["empty_000"]
    assert report.exit_code() == 1
    assert token_path(tmp_path, "good_000").is_file()
    assert not token_path(tmp_path, "mono_000").exists()


def test_kept_file_from_other_settings_warns(stage2, random_codec, tmp_path, caplog):
    write_clip(tmp_path, "a_000.wav", seconds=0.5)
    tokenize(stage2, tmp_path, random_codec, bandwidth=3.0)
    with caplog.at_level(logging.WARNING):
        report = tokenize(stage2, tmp_path, random_codec, bandwidth=6.0)
    assert len(report.skipped) == 1
    assert "--overwrite" in caplog.text and "3 kbps" in caplog.text


def test_random_codec_logs_an_untrained_warning(stage2, random_codec, tmp_path, caplog):
    write_clip(tmp_path, "a_000.wav", seconds=0.5)
    with caplog.at_level(logging.WARNING):
        tokenize(stage2, tmp_path, random_codec)
    assert "UNTRAINED" in caplog.text


# ---- command line ---------------------------------------------------------------------------
def test_bandwidth_outside_the_four_is_refused_at_parsing(stage2, capsys):
    assert stage2.parse_args(["--artist", ARTIST, "--bandwidth", "24"]).bandwidth == 24.0
    assert stage2.parse_args(["--artist", ARTIST]).bandwidth == 6.0
    with pytest.raises(SystemExit) as exit_info:
        stage2.parse_args(["--artist", ARTIST, "--bandwidth", "5"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_batch_size_is_auto_or_a_positive_number(stage2, random_codec, capsys):
    assert stage2.parse_args(["--artist", ARTIST]).batch_size == "auto"
    assert stage2.parse_args(["--artist", ARTIST, "--batch-size", "16"]).batch_size == 16
    with pytest.raises(SystemExit):
        stage2.parse_args(["--artist", ARTIST, "--batch-size", "0"])
    assert stage2.resolve_batch_size("auto", random_codec) == 1  # on the CPU: batching measured slower
    assert stage2.resolve_batch_size(4, random_codec) == 4


def test_help_runs_as_a_script_and_shows_defaults():
    result = run_script("2_Tokenization.py", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for expected in ("--bandwidth", "(default: 6.0)", "--batch-size", "(default: auto)", "--device",
                     "facebook/encodec_48khz"):
        assert expected in result.stdout


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "missing codec path"])
def test_nothing_to_do_exits_2_with_a_clear_message(stage2, tmp_path, caplog, monkeypatch, case):
    # main's setup_logging would replace the root handlers (and with them caplog's)
    monkeypatch.setattr(stage2, "setup_logging", lambda level, stage: logging.getLogger("pipeline.stage2"))
    if case == "empty folder":
        (tmp_path / "data_processed" / ARTIST).mkdir(parents=True)
    if case == "missing codec path":
        write_clip(tmp_path, "a_000.wav", seconds=0.5)
    argv = ["--artist", ARTIST, "--root", str(tmp_path), "--device", "cpu",
            "--codec", str(tmp_path / "no such codec") if case == "missing codec path" else "random"]
    code = stage2.run_main(stage2.main, argv)
    assert code == 2
    expected = {"missing folder": "does not exist", "empty folder": "holds no .wav clips",
                "missing codec path": "does not exist"}[case]
    assert expected in caplog.text


def test_an_artist_whose_every_file_stage1_rejected_points_at_stage1s_report(tmp_path):
    """Stage 1 rejects both files (exit 2: nothing usable); stage 2 then names stage 1 as the cause,
    with the first reasons and the report's path, instead of "run stage 1 first"."""
    raw = tmp_path / "raw_audio" / ARTIST
    raw.mkdir(parents=True)
    (raw / "empty.wav").write_bytes(b"")
    (raw / "notes.flac").write_text("not audio at all")
    stage1 = run_script("1_audio_preprocessing.py", "--artist", ARTIST, "--root", tmp_path, timeout=300)
    report_path = tmp_path / "data_processed" / ARTIST / "report.json"
    report = json.loads(report_path.read_text())
    assert stage1.returncode == 2 and report["exit_status"] == 2, stage1.stderr
    assert report["done"] == 0 and len(report["failed"]) == 2
    assert "every one of the 2 audio files" in stage1.stderr

    stage2 = run_script("2_Tokenization.py", "--artist", ARTIST, "--root", tmp_path, "--codec", "random",
                        "--device", "cpu", timeout=300)
    assert stage2.returncode == 2
    message = " ".join(stage2.stderr.split())
    assert "stage 1 rejected every one of the 2 audio file(s)" in message
    assert "empty.wav: empty file (0 bytes)" in message and str(report_path) in message
    assert "run scripts/1_audio_preprocessing.py first" not in message


def test_no_clips_reason_reads_stage1s_report(stage2, tmp_path):
    folder = tmp_path / "data_processed" / ARTIST
    folder.mkdir(parents=True)
    assert "run scripts/1_audio_preprocessing.py first" in stage2.no_clips_reason(folder)  # no report
    many = {"done": 0, "skipped": 0, "failed": [{"path": f"f{i}.wav", "reason": f"reason {i}"} for i in range(5)]}
    (folder / "report.json").write_text(json.dumps(many))
    reason = stage2.no_clips_reason(folder)
    assert "reason 0; f1.wav: reason 1; f2.wav: reason 2; and 2 more" in reason and "reason 3" not in reason
    short = {"done": 2, "skipped": 0, "failed": [],
             "details": {"tracks": {"a.wav": {"clips": 0}, "b.wav": {"clips": 0}}}}
    (folder / "report.json").write_text(json.dumps(short))
    assert "processed 2 file(s)" in stage2.no_clips_reason(folder)
    assert "--pad-tail" in stage2.no_clips_reason(folder)
    removed = {"done": 1, "skipped": 0, "failed": [], "details": {"tracks": {"a.wav": {"clips": 3}}}}
    (folder / "report.json").write_text(json.dumps(removed))
    assert "lists 3: they were removed" in stage2.no_clips_reason(folder)


def test_cli_names_a_bad_clip_and_exits_1(stage2, random_codec, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(stage2, "setup_logging", lambda level, stage: logging.getLogger("pipeline.stage2"))
    monkeypatch.setattr(stage2, "load_codec", lambda spec, device: random_codec)  # built once per session
    write_clip(tmp_path, "good_000.wav", seconds=0.5)
    write_clip(tmp_path, "mono_000.wav", seconds=0.5, channels=1)
    code = stage2.run_main(stage2.main, ["--artist", ARTIST, "--root", str(tmp_path), "--codec", "random",
                                         "--device", "cpu"])
    assert code == 1
    assert "mono_000.wav: has 1 channel(s), expected 2" in caplog.text
    report = json.loads((tmp_path / "encoded_tokens" / ARTIST / "report.json").read_text())
    assert report["done"] == 1 and report["failed"][0]["path"].endswith("mono_000.wav")
    assert token_path(tmp_path, "good_000").is_file()


# ---- torchrun -------------------------------------------------------------------------------
def test_rank_shares_cover_every_clip_once(stage2, random_codec, tmp_path):
    """In-process check of the sharding: three ranks, each a disjoint share, together everything."""
    for index in range(5):
        write_clip(tmp_path, f"t{index}_000.wav", seconds=0.3)
    shares = []
    for rank in range(3):
        report = tokenize(stage2, tmp_path, random_codec, info=DistInfo(rank=rank, world_size=3))
        shares.append(set(report.done))
    assert sum(len(share) for share in shares) == 5 and len(set().union(*shares)) == 5
    merged = json.loads((tmp_path / "encoded_tokens" / ARTIST / "report.json").read_text())
    assert merged["done"] == 5 and merged["details"]["world_size"] == 3


@pytest.mark.slow
def test_torchrun_two_ranks_encode_every_clip_exactly_once(tmp_path):
    for index in range(5):
        write_clip(tmp_path, f"album/t{index}_000.wav", seconds=0.3, freq=200 + 100 * index)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(SCRIPTS / "2_Tokenization.py"),
                             "--artist", ARTIST, "--root", str(tmp_path), "--codec", "random", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    token_dir = tmp_path / "encoded_tokens" / ARTIST
    written = [json.loads((token_dir / f"report.rank{rank}.json").read_text())["written"] for rank in (0, 1)]
    assert len(written[0]) + len(written[1]) == 5
    assert set(written[0]).isdisjoint(written[1])
    assert len(finished_files(token_dir, ".th")) == 5
    merged = json.loads((token_dir / "report.json").read_text())
    assert merged["done"] == 5 and merged["exit_status"] == 0
