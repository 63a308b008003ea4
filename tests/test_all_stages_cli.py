"""Cross-cutting hardening: every stage refuses bad artist names at parsing and explains every option.

In-process (each script's `main(argv)`), so 25 cases cost one import per script; one subprocess
case checks the real command line.
"""
from __future__ import annotations

import pytest

from helpers import run_script
from pipeline.stages import load_stage

STAGES = ["1_audio_preprocessing", "2_Tokenization", "3_data_preparation", "4_Transformer", "5_MusicPrediction"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("artist, reason", [
    ("..", "'..'"), ("a/b", "one folder name"), ("", "empty"), ("/etc", "one folder name"),
])
def test_bad_artist_is_refused_at_parsing(tmp_path, capsys, stage, artist, reason):
    with pytest.raises(SystemExit) as exit_info:
        load_stage(stage).main(["--artist", artist, "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused artist"


@pytest.mark.parametrize("stage", STAGES)
def test_help_explains_every_option(capsys, stage):
    with pytest.raises(SystemExit) as exit_info:
        load_stage(stage).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--artist" in text and "--root" in text and "--overwrite" in text and "(default:" in text
    assert not options_without_help(text)


def options_without_help(help_text: str) -> list[str]:
    """Option lines of argparse's --help with no description beside or below them."""
    lines = help_text.splitlines()
    bare = []
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if indent != 2 or not stripped.startswith("-"):  # argparse indents option lines by two
            continue
        described_beside = "  " in stripped
        following = lines[index + 1] if index + 1 < len(lines) else ""
        described_below = following.strip() and len(following) - len(following.lstrip()) > indent \
            and not following.lstrip().startswith("-")
        if not (described_beside or described_below):
            bare.append(stripped)
    return bare


def test_options_without_help_finds_a_bare_option():
    text = "options:\n  -h, --help  show this help\n  --bare\n  --ok N      does things\n"
    assert options_without_help(text) == ["--bare"]

def test_bad_artist_on_the_real_command_line(tmp_path):
    result = run_script("3_data_preparation.py", "--artist", "../../etc", "--root", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "one folder name" in result.stderr
