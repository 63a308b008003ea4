"""pipeline.audio's streaming pieces that stage 1 stands on (and load_conditioned, which stage 5 uses)."""
from __future__ import annotations

import json

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from helpers import sine_tone
from pipeline import audio


def noise(seconds, rate, channels=2, level=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)


def test_k_weighting_matches_the_coefficients_printed_in_bs1770():
    shelf, highpass = audio.k_weighting_sos(48_000)
    np.testing.assert_allclose(shelf, [1.53512485958697, -2.69169618940638, 1.19839281085285,
                                       1.0, -1.69065929318241, 0.73248077421585], atol=1e-8)
    np.testing.assert_allclose(highpass, [1, -2, 1, 1, -1.99004745483398, 0.99007225036621], atol=1e-8)


@pytest.mark.parametrize("rate", [48_000, 44_100])
def test_streaming_loudness_agrees_with_pyloudnorm_and_with_itself(rate):
    wave = noise(6.3, rate, level=0.05)
    wave[: len(wave) // 3] *= 0.01  # a quiet third: the relative gate must act
    wave[:, 0] += sine_tone(6.3, rate, channels=1, freq=1000, amplitude=0.2)[:, 0]
    meter = audio.LoudnessMeter(rate)
    for start in range(0, len(wave), 7_777):  # blocks that straddle the 100 ms hops
        meter.add(wave[start:start + 7_777])
    streamed = meter.integrated()
    assert streamed == pytest.approx(audio.integrated_loudness(wave, rate), abs=1e-6)
    # pyloudnorm's RBJ filters differ slightly from BS.1770's printed coefficients
    assert streamed == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(wave.astype(np.float64)), abs=0.1)


def test_loudness_of_silence_and_of_too_short_audio_is_minus_infinity():
    assert audio.integrated_loudness(np.zeros((48_000, 2))) == float("-inf")
    assert audio.integrated_loudness(noise(0.3, 48_000)) == float("-inf")


@pytest.mark.parametrize("rate, channels", [(44_100, 2), (8_000, 1), (48_000, 6), (96_000, 2)])
def test_stream_stereo_equals_decoding_the_whole_file_at_once(tmp_path, rate, channels):
    path = tmp_path / "x.wav"
    sf.write(str(path), noise(4.0, rate, channels), rate, subtype="FLOAT")
    whole, file_rate = audio.read_audio(path)
    expected = audio.resample(audio.to_stereo(whole), file_rate)  # [m, 2] at 48 kHz
    blocks = list(audio.stream_stereo(path, block_frames=5_000))
    longest = max(len(block) for block in blocks)
    assert longest <= 5_000 * 48_000 / rate + 48_000  # bounded: a block plus the resampler's delay
    np.testing.assert_array_equal(np.concatenate(blocks), expected)


def test_downmix_rule_for_six_channels():
    matrix = audio.downmix_matrix(6)  # L R C LFE Ls Rs
    np.testing.assert_allclose(matrix, [[1, 0], [0, 1], [0.7071, 0.7071], [0, 0], [0.7071, 0], [0, 0.7071]],
                               atol=1e-4)
    mono = audio.to_stereo(np.arange(4, dtype=np.float32))
    assert mono.shape == (4, 2) and np.array_equal(mono[:, 0], mono[:, 1])


def test_a_downmix_beyond_float32_is_refused_without_an_overflow_warning(tmp_path):
    """Finite samples of ~3.4e38 on six channels sum past float32's range: the file is named and
    refused; the cast to float32 never runs (it used to warn "overflow encountered in cast")."""
    loud = np.full((1_000, 6), 3.4e38, dtype=np.float32)
    path = tmp_path / "loud surround.wav"
    sf.write(str(path), loud, 48_000, subtype="FLOAT")
    with np.errstate(all="raise"):
        with pytest.raises(audio.AudioDecodeError, match="loud surround.wav: .*6 channels are mixed to stereo"):
            list(audio.stream_stereo(path))
        with pytest.raises(audio.AudioDecodeError, match="overflow when its 6 channels"):
            audio.to_stereo(loud)
        quiet = audio.to_stereo(loud / 4)  # within range: mixed as always
    assert quiet.dtype == np.float32 and np.isfinite(quiet).all()


def test_cut_files_are_refused_with_their_reason(tmp_path):
    ogg = tmp_path / "whole.ogg"
    sf.write(str(ogg), sine_tone(3.0), 48_000, format="OGG", subtype="VORBIS")
    assert audio.ogg_is_complete(ogg)
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(ogg.read_bytes()[: int(ogg.stat().st_size * 0.9)])
    assert not audio.ogg_is_complete(cut)
    with pytest.raises(audio.AudioDecodeError, match="truncated Ogg"):
        list(audio.stream_stereo(cut))
    mp3 = tmp_path / "whole.mp3"
    sf.write(str(mp3), sine_tone(3.0), 48_000, format="MP3")
    cut_mp3 = tmp_path / "cut.mp3"
    cut_mp3.write_bytes(mp3.read_bytes()[: int(mp3.stat().st_size * 0.6)])
    with pytest.raises(audio.AudioDecodeError, match="truncated: decoded"):
        list(audio.stream_stereo(cut_mp3))
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.full((1_000, 2), np.nan, dtype=np.float32), 48_000, subtype="FLOAT")
    with pytest.raises(audio.AudioDecodeError, match="NaN"):
        list(audio.stream_stereo(nan))


def test_load_conditioned_keeps_its_contract(tmp_path):
    path = tmp_path / "prompt.flac"
    sf.write(str(path), noise(3.0, 44_100, channels=1), 44_100)
    wave = audio.load_conditioned(path, target_lufs=-20.0, max_seconds=1.5)
    assert wave.dtype == np.float32 and wave.shape == (72_000, 2)
    assert audio.integrated_loudness(wave) == pytest.approx(-20.0, abs=0.05)
    assert np.abs(wave).max() <= 10 ** (audio.PEAK_CEILING_DBFS / 20) + 1e-6
    with pytest.raises(audio.AudioDecodeError, match="prompt.txt"):
        (tmp_path / "prompt.txt").write_text("no")
        audio.load_conditioned(tmp_path / "prompt.txt")


def test_a_long_track_streamed_in_blocks_gives_the_clips_of_a_one_shot_computation(tmp_path):
    """40 s at 44.1 kHz crosses ~27 decode blocks; the clips must equal whole-array processing."""
    from pipeline.stages import load_stage

    stage1 = load_stage("1_audio_preprocessing")
    raw = tmp_path / "raw_audio" / "A"
    raw.mkdir(parents=True)
    source = noise(40.0, 44_100, level=0.05, seed=7)
    sf.write(str(raw / "long.wav"), source, 44_100, subtype="FLOAT")
    assert stage1.main(["--artist", "A", "--root", str(tmp_path), "--clip-seconds", "1"]) == 0
    wave = audio.resample(source, 44_100)  # [1_920_000, 2] at 48 kHz, all at once
    gain = audio.normalisation_gain(audio.integrated_loudness(wave), float(np.abs(wave).max()), -20.0)
    report = json.loads((tmp_path / "data_processed" / "A" / "report.json").read_text())
    assert report["details"]["tracks"]["long.wav"]["gain_db"] == pytest.approx(20 * np.log10(gain), abs=0.006)
    for index in (0, 17, 39):
        expected = wave[index * 48_000:(index + 1) * 48_000] * np.float32(gain)
        stage1.apply_fades(expected, 48_000, 960)
        written = sf.read(str(tmp_path / "data_processed" / "A" / f"long_{index:03d}.wav"), dtype="int16")[0]
        assert np.abs(written.astype(np.int32) - stage1.quantise(expected.copy())).max() <= 1
