"""The shared pipeline package: contract, token files, atomic writes, CLI checks, codec adapter."""
from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from pipeline import cli, contract, files
from pipeline.codec import CodecUnavailable, load_codec
from pipeline.contract import TokenFile, TokenFileError, load_token_file, save_token_file


# ---- artist names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Muldjord", "The Band 2", "a.b_c-d"])
def test_artist_name_accepts_plain_folder_names(name):
    assert cli.artist_name(name) == name


@pytest.mark.parametrize("name", ["", "  ", "..", "a/b", "/abs", "a\\b", "x..y", "semi;colon", "ü"])
def test_artist_name_refuses_paths_and_odd_characters(name):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.artist_name(name)


def test_parser_refuses_bad_artist_with_exit_2(capsys):
    parser = cli.make_parser("x")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--artist", "../etc"])
    assert exit_info.value.code == 2
    assert "must be one folder name" in capsys.readouterr().err


def test_number_types_refuse_out_of_range():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float("nan")
    assert cli.fraction("0.25") == 0.25


# ---- atomic writes and root confinement ----------------------------------------------------------
def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []
    files.atomic_write_json({"a": 1}, target)
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask, "not mkstemp's private 0600"


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".x.tmp-123.wav").write_bytes(b"junk")  # an earlier version's leftover
    (tmp_path / "keep.wav").write_bytes(b"ok")
    assert files.remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.wav"]


def test_a_write_cut_by_sigkill_is_invisible_to_listings_and_removed_later(tmp_path):
    """What SIGKILL inside atomic_path leaves: a hidden folder holding the half-written file."""
    target = tmp_path / "last.pt"
    writer = files.atomic_path(target)
    tmp = writer.__enter__()  # entered and never left: the process died mid-write
    tmp.write_bytes(b"half a checkpoint")
    assert tmp.suffix == ".pt" and tmp.name == "last.pt"  # format-by-extension libraries still work
    top_level = [path for path in tmp_path.iterdir() if path.suffix == ".pt"]
    anywhere = [path for path in tmp_path.rglob("*") if path.suffix == ".pt"]
    assert top_level == [] and anywhere == [tmp]  # a listing of the folder never sees it
    assert files.is_temporary(tmp) and files.is_temporary(tmp.parent) and not files.is_temporary(target)
    (tmp_path / "keep.pt").write_bytes(b"whole")
    assert files.remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_atomic_path_keeps_the_extension_for_format_guessing_libraries(tmp_path):
    import soundfile as sf

    for name in ("clip.wav", "clip.flac"):
        with files.atomic_path(tmp_path / name) as tmp:
            sf.write(tmp, np.zeros((480, 2), dtype=np.float32), 48_000)  # no format=: from the name
        assert sf.info(tmp_path / name).format == name.rsplit(".", 1)[1].upper()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.flac", "clip.wav"]


def test_resolve_inside_refuses_escapes(tmp_path):
    assert files.resolve_inside(tmp_path, "a/b.th") == (tmp_path / "a/b.th").resolve()
    with pytest.raises(files.PathEscapesRoot):
        files.resolve_inside(tmp_path, "../../etc/passwd")
    with pytest.raises(files.PathEscapesRoot):
        files.resolve_inside(tmp_path, "/etc/passwd")
    assert files.resolve_inside(tmp_path, "/etc/passwd", allow_outside=True) == files.Path("/etc/passwd")


# ---- token files ---------------------------------------------------------------------------------
def _token_file(q=4, chunks=2):
    codes = torch.randint(0, 1024, (1, q, 150 * chunks), dtype=torch.int16)
    return TokenFile(codes=codes, scales=torch.rand(chunks) + 0.1, num_samples=90_000,
                     bandwidth=contract.bandwidth_for_q(q), codec="random:0", source="data_processed/a/x_000.wav")


def test_token_file_round_trip(tmp_path):
    original = _token_file()
    save_token_file(original, tmp_path / "t.th")
    raw = torch.load(tmp_path / "t.th", weights_only=True)
    assert raw["codes"].dtype == torch.int16 and raw["format"] == contract.TOKEN_FORMAT
    loaded = load_token_file(tmp_path / "t.th")
    assert torch.equal(loaded.codes, original.codes)
    assert torch.allclose(loaded.scales, original.scales)
    assert (loaded.num_samples, loaded.bandwidth, loaded.n_codebooks) == (90_000, 6.0, 4)


def test_bare_tensor_token_file_is_accepted(tmp_path):
    torch.save(torch.randint(0, 1024, (1, 8, 300)), tmp_path / "old.th")
    loaded = load_token_file(tmp_path / "old.th")
    assert loaded.scales is None and loaded.bandwidth == 12.0 and loaded.n_frames == 300


@pytest.mark.parametrize("codes, message", [
    (torch.full((1, 4, 150), 1024), "leaves 0..1023"),
    (torch.zeros(1, 4, 150), "dtype"),
    (torch.zeros(4, 150, dtype=torch.long), "expected [1, Q, T]"),
    (torch.zeros(1, 3, 150, dtype=torch.long), "3 codebooks"),
])
def test_bad_codes_are_refused_with_reason(tmp_path, codes, message):
    torch.save({"codes": codes}, tmp_path / "bad.th")
    with pytest.raises(TokenFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_token_file(tmp_path / "bad.th")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.th", "wb") as handle:
        pickle.dump({"codes": _Exploit(str(marker))}, handle)
    with pytest.raises(TokenFileError, match="evil.th"):
        load_token_file(tmp_path / "evil.th")
    assert not marker.exists()


# ---- codec adapter -------------------------------------------------------------------------------
def test_codec_facts(random_codec):
    assert (random_codec.sample_rate, random_codec.frame_rate, random_codec.chunk_frames) == (48_000, 150, 150)
    assert [random_codec.n_codebooks(b) for b in (3, 6, 12, 24)] == [2, 4, 8, 16]
    with pytest.raises(ValueError, match="unknown bandwidth"):
        random_codec.n_codebooks(5)
    assert not random_codec.pretrained and random_codec.name == "random:0"


def test_encode_decode_shapes_and_ranges(random_codec):
    num_samples = int(48_000 * 2.3)
    wave = 0.1 * torch.randn(2, 2, num_samples, generator=torch.Generator().manual_seed(0))
    codes, scales = random_codec.encode(wave, 6.0)
    n_chunks = random_codec.n_chunks(num_samples)
    assert n_chunks == 3
    assert codes.shape == (2, 4, 150 * n_chunks) and codes.dtype == torch.int16
    assert 0 <= int(codes.min()) and int(codes.max()) <= 1023
    assert len(torch.unique(codes[0, 0])) > 20, "a usable random codec spreads its codes"
    assert scales.shape == (2, n_chunks) and bool((scales > 0).all())
    decoded = random_codec.decode(codes[:1], scales[0], num_samples)
    assert decoded.shape == (2, num_samples)
    assert torch.isfinite(decoded).all()


def test_batched_encoding_equals_single(random_codec):
    wave = 0.1 * torch.randn(2, 2, 60_000, generator=torch.Generator().manual_seed(1))
    codes, scales = random_codec.encode(wave, 3.0)
    single_codes, single_scales = random_codec.encode(wave[1], 3.0)
    assert torch.equal(codes[1:], single_codes)
    assert torch.allclose(scales[1:], single_scales)


def test_decode_matches_transformers_reference(random_codec):
    num_samples = 100_000
    wave = 0.1 * torch.randn(1, 2, num_samples, generator=torch.Generator().manual_seed(2))
    codes, scales = random_codec.encode(wave, 6.0)
    n_chunks = scales.shape[1]
    stacked = codes.reshape(1, 4, n_chunks, 150).permute(2, 0, 1, 3).long()  # [1,Q,T] -> [n_chunks,1,Q,150]
    pad = 150 - random_codec.last_chunk_frames(num_samples)
    with torch.no_grad():
        reference = random_codec.model.decode(stacked, [s.view(1, 1) for s in scales[0]],
                                              last_frame_pad_length=pad, return_dict=True).audio_values
    ours = random_codec.decode(codes, scales[0], num_samples)
    assert (ours - reference[0, :, :num_samples]).abs().max() < 1e-5


def test_random_codec_is_seeded():
    wave = 0.1 * torch.randn(1, 2, 48_000, generator=torch.Generator().manual_seed(3))
    a = load_codec("random:5").encode(wave, 6.0)[0]
    b = load_codec("random:5").encode(wave, 6.0)[0]
    assert torch.equal(a, b)


def test_missing_codec_folder_says_how_to_get_weights(tmp_path):
    with pytest.raises(CodecUnavailable, match="does not exist"):
        load_codec(str(tmp_path / "nope" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecUnavailable, match="config.json"):
        load_codec(str(tmp_path / "empty"))


def test_saved_codec_folder_loads(tmp_path, random_codec):
    random_codec.model.save_pretrained(tmp_path / "codec")
    loaded = load_codec(str(tmp_path / "codec"))
    assert loaded.pretrained and loaded.name == str(tmp_path / "codec")
    wave = 0.1 * torch.randn(1, 2, 48_000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded.encode(wave, 6.0)[0], random_codec.encode(wave, 6.0)[0])


def test_uncached_hub_id_offline_fails_with_help(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CodecUnavailable, match="--codec random"):
        load_codec("facebook/encodec_48khz_not_cached")


def test_probe_says_what_can_be_loaded_without_waiting(tmp_path, monkeypatch):
    from pipeline.codec import probe

    assert probe("random:3") == "random"
    (tmp_path / "saved").mkdir()
    assert probe(str(tmp_path / "saved")) == "unavailable"  # a folder without config.json
    (tmp_path / "saved" / "config.json").write_text("{}")
    assert probe(str(tmp_path / "saved")) == "local"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert probe("facebook/encodec_48khz_not_cached") == "unavailable"
