"""The repository stands alone: no tracked file refers to a path outside it, its pins match the code."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import REPO

RELATIVE_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-][\w./-]*)")
FOREIGN_NAMES = re.compile(r"shared/(?:CONTRACT|NOTES)\.md|\bNOTES\.md\b|(?<![\w/])/(?:work|home|Users|root)/")
# Test inputs that are escapes on purpose (root confinement and artist-name tests), as written in
# the tests and in HARDENING.md's rows about them.
HOSTILE_INPUTS = {"../etc", "../../etc", "../../etc/passwd", "../elsewhere/encoded_tokens/A/clip_0.th",
                  "../elsewhere/"}


def tracked_text_files() -> list:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / name for name in listing.decode().split("\0") if name]
    texts = []
    for path in paths:
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary files hold no paths to follow
    return texts


def outside_references(path, text: str) -> list[str]:
    """Paths in `text` that leave the repository, and names of files that only exist outside it."""
    found = [match.group(0) for match in FOREIGN_NAMES.finditer(text)]
    for match in RELATIVE_PATH.finditer(text):
        relative = match.group(1).rstrip(".")
        if relative in HOSTILE_INPUTS or relative.startswith("../elsewhere"):
            continue
        target = (path.parent / relative).resolve()
        if target != REPO and REPO not in target.parents:
            found.append(relative)
    return found


def test_no_tracked_file_refers_outside_the_repository():
    this_file = Path(__file__).resolve()  # holds the bad examples of the test below, on purpose
    offenders = {str(path.relative_to(REPO)): refs for path, text in tracked_text_files()
                 if path != this_file and (refs := outside_references(path, text))}
    assert offenders == {}


def test_the_check_catches_what_it_is_for(tmp_path):
    module = REPO / "scripts" / "pipeline" / "example.py"
    shared = "/".join(["..", "shared"])  # built here, so this file itself names no outside path
    assert outside_references(module, f'"""See ../{shared}/CONTRACT.md."""') != []
    assert outside_references(module, f"# {shared}/NOTES.md: a finding") != []
    assert outside_references(REPO / "docs" / "x.md", "[a](../../outside.md)") == ["../../outside.md"]
    assert outside_references(REPO / "docs" / "x.md", "[b](../BENCHMARKS.md)") == []
    assert outside_references(REPO / "README.md", "cd /work/main && make") != []


def test_contract_doc_exists_and_is_cited_by_the_code():
    contract = (REPO / "docs" / "contract.md").read_text(encoding="utf-8")
    for section in ("## Folders", "## Token files", "## Manifest", "## Checkpoints", "## Command-line surface",
                    "## Exit codes"):
        assert section in contract
    assert "docs/contract.md" in (REPO / "scripts" / "pipeline" / "__init__.py").read_text(encoding="utf-8")


def test_requirements_pin_the_transformers_the_code_runs_on():
    from pipeline.requirements import MIN_TRANSFORMERS

    pins = (REPO / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(rf"^transformers>={re.escape(MIN_TRANSFORMERS)},", pins, re.MULTILINE), pins


@pytest.mark.parametrize("version, ok", [("5.24.0", True), ("5.30.1", True), ("5.18.0", False),
                                         ("5.17.2", False), ("4.57.0", False), ("5.24.0.dev0", True)])
def test_an_older_transformers_is_refused_with_a_clear_message(version, ok):
    from pipeline.requirements import TransformersTooOld, check_transformers

    if ok:
        check_transformers(version)
    else:
        with pytest.raises(TransformersTooOld, match=rf"transformers {re.escape(version)} is installed.*>= 5\.24"):
            check_transformers(version)


def test_the_model_refuses_an_older_transformers_before_using_it(transformer_module, monkeypatch):
    import transformers

    from pipeline.requirements import TransformersTooOld

    monkeypatch.setattr(transformers, "__version__", "5.18.0")  # takes past_key_values, not cache=
    with pytest.raises(TransformersTooOld, match="transformers 5.18.0 is installed.*pip install"):
        transformer_module.MusicTransformer(transformer_module.model_args_for("tiny", 4, 32))
