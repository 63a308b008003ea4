"""Atomic writes and root-confined paths: no partial file ever carries a final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    The temporary name starts with '.' and contains '.tmp-' so scanners skip it, and keeps the
    final suffix so libraries that pick a format by extension (soundfile) still work.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.stem[:80]}{TMP_MARK}", suffix=final_path.suffix,
                                    dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(data: bytes, final_path: str | Path) -> None:
    with atomic_path(final_path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, final_path: str | Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), final_path)


def atomic_write_json(obj, final_path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", final_path)


def atomic_torch_save(obj, final_path: str | Path) -> None:
    """torch.save through a temporary file. It gets an open file, not the temporary's name: given a
    name, torch stores it inside the archive, so two runs would write different bytes for the same data."""
    import torch

    with atomic_path(final_path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def is_temporary(path: str | Path) -> bool:
    """True for the leftovers of an interrupted atomic write."""
    return TMP_MARK in Path(path).name


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries an interrupted run left below `folder`; return how many."""
    count = 0
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.rglob(f"*{TMP_MARK}*"):
            if path.is_file():
                path.unlink()
                count += 1
    return count


class PathEscapesRoot(ValueError):
    """A path from a manifest or checkpoint that points outside the project root."""


def resolve_inside(root: str | Path, relative: str | Path, allow_outside: bool = False) -> Path:
    """Resolve `relative` against `root` and refuse it if it leaves the root (unless allowed)."""
    root = Path(root).resolve()
    candidate = Path(relative)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not allow_outside and path != root and root not in path.parents:
        raise PathEscapesRoot(f"path {str(relative)!r} points outside the project root {root}")
    return path
