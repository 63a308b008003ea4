"""Reading and validating `metadata_clean_<artist>.jsonl` (docs/contract.md, 'Manifest')."""
from __future__ import annotations

import json
from pathlib import Path

from .files import PathEscapesRoot, resolve_inside

REQUIRED_KEYS = ("audio", "duration", "sample_rate")


class ManifestError(ValueError):
    """A manifest that is missing, empty or malformed; the message names the file and line."""


def manifest_path(root: str | Path, artist: str) -> Path:
    return Path(root) / f"metadata_clean_{artist}.jsonl"


def read_manifest(path: str | Path, root: str | Path, allow_outside_root: bool = False) -> list[dict]:
    """Parse and check every line; each entry gains `path`, the resolved `.th` file, and
    `variant_paths`, its shifted variants' resolved files (empty when it lists none).

    Raises ManifestError naming the file (and line) for: missing file, empty manifest, a line that
    is not a JSON object, missing required keys, a path escaping the root, a missing token file
    (a variant's too), `variants` that is not a list of paths.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: run scripts/3_data_preparation.py first")
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            entries.append(_parse_line(line, f"{path}:{number}", root, allow_outside_root))
    if not entries:
        raise ManifestError(f"manifest {path} is empty: no token files were prepared for this artist")
    return entries


def _parse_line(line: str, where: str, root, allow_outside_root: bool) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        entry["path"] = resolve_inside(root, entry["audio"], allow_outside=allow_outside_root)
    except PathEscapesRoot as error:
        raise ManifestError(f"{where}: {error} (refused; pass --allow-outside-root to trust it)") from None
    if not entry["path"].is_file():
        raise ManifestError(f"{where}: token file {entry['audio']} does not exist")
    entry["variant_paths"] = _variant_paths(entry.get("variants", []), where, root, allow_outside_root)
    return entry


def _variant_paths(variants, where: str, root, allow_outside_root: bool) -> list:
    """The resolved files of an entry's `variants` (stage 2's shifted encodings of the same clip)."""
    if not isinstance(variants, list) or not all(isinstance(variant, str) for variant in variants):
        raise ManifestError(f"{where}: 'variants' must be a list of token file paths")
    paths = []
    for variant in variants:
        try:
            path = resolve_inside(root, variant, allow_outside=allow_outside_root)
        except PathEscapesRoot as error:
            raise ManifestError(f"{where}: {error} (refused; pass --allow-outside-root to trust it)") from None
        if not path.is_file():
            raise ManifestError(f"{where}: variant token file {variant} does not exist; re-run "
                                "scripts/3_data_preparation.py to list the variants there are")
        paths.append(path)
    return paths


def check_uniform(entries: list[dict], keys=("codebooks", "bandwidth"), where: str = "manifest") -> None:
    """All entries must agree on Q and bandwidth (one model consumes them all)."""
    for key in keys:
        values = {entry.get(key) for entry in entries if key in entry}
        if len(values) > 1:
            raise ManifestError(f"{where}: entries mix {key} values {sorted(values, key=str)}; "
                                "re-tokenize the artist with one --bandwidth")


# ---- writing (stage 3) ------------------------------------------------------------------------
MANIFEST_KEYS = ("audio", "duration", "sample_rate", "frames", "codebooks", "bandwidth", "codec", "source",
                 "track", "split", "median_scale")  # and `variants`, only in an entry that has some
SPLITS = ("train", "valid")


def write_manifest(entries: list[dict], path: str | Path) -> None:
    """Write one JSON object a line, atomically; every entry must carry the contract's keys."""
    from .files import atomic_write_text

    lines = []
    for number, entry in enumerate(entries, start=1):
        missing = [key for key in MANIFEST_KEYS if key not in entry]
        if missing:
            raise ManifestError(f"manifest entry {number} ({entry.get('audio', '?')}) lacks {', '.join(missing)}")
        lines.append(json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n")
    atomic_write_text("".join(lines), path)
