"""Atomic writes and root-confined paths: no partial file ever carries a final name."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path for `final_path`; rename it into place only if the block succeeds.

    The temporary is `<folder>/.<stem>.tmp-XXXX/<final name>`: a file under its final name inside
    a hidden, private folder beside the destination. So libraries that pick a format by extension
    (soundfile, matplotlib) still work, and no listing of the destination folder (`glob("*.pt")`,
    `glob("*.wav")`) can ever see a half-written file, even the one a SIGKILL leaves behind: those
    folders are removed by `remove_stale_temporaries`. The rename stays on one file system.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = None
    try:  # the set-up is inside too: a Ctrl-C while the empty file is made still removes the folder
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_path.stem[:80]}{TMP_MARK}", dir=final_path.parent))
        tmp_path = tmp_dir / final_path.name
        tmp_path.touch(mode=0o666)  # the usual mode (0666 less the umask), like any new file
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, final_path)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


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
    """True for the leftovers of an interrupted atomic write: a temporary folder or a file in one
    (and the `.<stem>.tmp-XXXX.<ext>` files that earlier versions wrote beside their destination)."""
    path = Path(path)
    return any(name.startswith(".") and TMP_MARK in name for name in (path.name, path.parent.name))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries an interrupted run left below `folder`; return how many."""
    count = 0
    folder = Path(folder)
    if folder.is_dir():
        for path in sorted(folder.rglob(f".*{TMP_MARK}*")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.is_file():
                path.unlink()
            else:
                continue  # inside a folder removed above
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
