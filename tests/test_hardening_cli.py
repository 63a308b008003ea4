"""Cross-cutting hardening: every stage refuses bad artist names at parsing and explains every option."""
from __future__ import annotations

import pytest

from conftest import run_script

STAGES = ["1_audio_preprocessing.py", "2_Tokenization.py", "3_data_preparation.py", "4_Transformer.py",
          "5_MusicPrediction.py"]


@pytest.mark.parametrize("script", STAGES)
@pytest.mark.parametrize("artist, reason", [
    ("..", "'..'"), ("a/b", "one folder name"), ("", "empty"), ("/etc", "one folder name"),
])
def test_bad_artist_is_refused_at_parsing(tmp_path, script, artist, reason):
    result = run_script(script, "--artist", artist, "--root", tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    assert reason in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused artist"


@pytest.mark.parametrize("script", STAGES)
def test_help_explains_every_option(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    assert "--artist" in result.stdout and "--root" in result.stdout and "--overwrite" in result.stdout
    assert "(default:" in result.stdout
