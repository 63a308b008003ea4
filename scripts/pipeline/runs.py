"""The run folder: where stage 4 writes a model and stage 5 writes its pieces, and how they are read.

    <root>/model_results/<model>/     stage 4: music_transformer_ep<N>.pt, last.pt, best.pt,
                                      metrics.jsonl, loss.png, loss_by_position.png,
                                      training_index.npz
    <root>/music_transformer/<label>/ stage 5: <piece>.{wav,th,png,json}

`<model>` is the artist's name (a one-artist model) or the `--name` of a joint model. Every rule of
the folder lives here: its paths, the epoch checkpoints, the best-then-last choice, and the one
reader of metrics.jsonl. Checkpoints are read with `weights_only=True`, never otherwise.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .cli import StageError, error_reason
from .files import atomic_write_text, is_temporary

LOG = logging.getLogger("pipeline.runs")

MODELS_DIR = "model_results"
PIECES_DIR = "music_transformer"
EPOCH_PREFIX = "music_transformer_ep"  # + "<N>.pt": a checkpoint at the end of epoch N
CHECKPOINT_PREFERENCE = ("best.pt", "last.pt")  # what generation uses when no checkpoint is named
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
POSITIONS_PLOT = "loss_by_position.png"  # valid NLL by the frame's position in its window
TRAINING_INDEX = "training_index.npz"  # the train split's token windows (pipeline.originality)
OUTPUT_PATTERNS = (f"{EPOCH_PREFIX}*.pt", "last.pt", "best.pt", METRICS_FILE, LOSS_PLOT, POSITIONS_PLOT,
                   TRAINING_INDEX)
BASELINE_RECORD = "baselines"  # the `record` field of metrics.jsonl's baseline line (epoch 0)


# ---- paths ------------------------------------------------------------------------------------
def model_dir(root: Path, model: str) -> Path:
    return Path(root) / MODELS_DIR / model


def pieces_dir(root: Path, label: str) -> Path:
    return Path(root) / PIECES_DIR / label


def epoch_checkpoint_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"{EPOCH_PREFIX}{epoch}.pt"


# ---- checkpoints ------------------------------------------------------------------------------
def epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch checkpoint in `folder` (temporaries are never listed)."""
    folder = Path(folder)
    found = [(path.stem[len(EPOCH_PREFIX):], path) for path in folder.glob(f"{EPOCH_PREFIX}*.pt")]
    return [(int(number), path) for number, path in found if number.isdigit() and not is_temporary(path)]


def prune_epochs(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` epoch checkpoints (0 keeps every one)."""
    if keep_last <= 0:
        return []
    removed = [path for _, path in sorted(epoch_checkpoints(folder))[:-keep_last]]
    for path in removed:
        path.unlink()
    return removed


def preferred_checkpoint(folder: Path) -> Path | None:
    """`best.pt`, else `last.pt`, else None."""
    return next((Path(folder) / name for name in CHECKPOINT_PREFERENCE if (Path(folder) / name).is_file()), None)


def held_checkpoints(folder: Path) -> str:
    """'it holds a.pt, b.pt' or 'it holds no checkpoint' (for error messages)."""
    folder = Path(folder)
    found = folder.glob("*.pt") if folder.is_dir() else []
    names = sorted(path.name for path in found if not is_temporary(path))
    return f"it holds {', '.join(names)}" if names else "it holds no checkpoint"


def find_checkpoint(root: Path, model: str, checkpoint: Path | None = None, epoch: int | None = None) -> Path:
    """`checkpoint` if given, else epoch `epoch`'s, else `best.pt`, else `last.pt` of the model's folder."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise StageError(f"checkpoint {checkpoint} does not exist")
        return Path(checkpoint)
    folder = model_dir(root, model)
    if epoch is not None:
        path = epoch_checkpoint_path(folder, epoch)
        if not path.is_file():
            raise StageError(f"no checkpoint for epoch {epoch}: {path} does not exist ({held_checkpoints(folder)})")
        return path
    found = preferred_checkpoint(folder)
    if found is None:
        raise StageError(f"no best.pt or last.pt in {folder} ({held_checkpoints(folder)}){elsewhere_hint(root, model)}: "
                         f"train it with scripts/4_Transformer.py --artist {model!r}, or pass --checkpoint / --epoch")
    return found


def elsewhere_hint(root: Path, model: str) -> str:
    """'; the demo's model is under demo_run/ (pass --root demo_run)' when a well-known root holds it."""
    for other in ("demo_run",):
        candidate = Path(root) / other
        if preferred_checkpoint(model_dir(candidate, model)) is not None:
            return f"; {candidate} holds one: pass --root {candidate}"
    return ""


def model_folders(root: Path) -> dict[str, Path]:
    """Model name -> its preferred checkpoint, for every folder of `<root>/model_results/` that holds one."""
    folder = Path(root) / MODELS_DIR
    found = {}
    for model in sorted(folder.iterdir()) if folder.is_dir() else []:
        if model.name.startswith(".") or not model.is_dir():
            continue
        checkpoint = preferred_checkpoint(model)
        if checkpoint is not None:
            found[model.name] = checkpoint
    return found


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP's `module.` and torch.compile's `_orig_mod.` prefixes (older checkpoints)."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key.replace("._orig_mod.", ".").replace(".module.", ".")] = value
    return cleaned


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A stage-4 checkpoint as a dict, read safely (weights_only) onto the CPU, prefixes stripped.

    `loaded_from` (in memory only) names the file for error messages. `mmap=True` leaves the
    weights on disk until they are touched (listing a checkpoint's facts)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise StageError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch raises many types for corrupt or unsafe pickles
        raise StageError(f"{path}: not a readable checkpoint ({error_reason(error)}); only weights_only-loadable "
                         "checkpoints are read") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise StageError(f"{path}: not a stage-4 checkpoint (no 'model' / 'model_args')")
    checkpoint["model"] = strip_prefixes(checkpoint["model"])
    checkpoint["loaded_from"] = str(path)
    return checkpoint


def checkpoint_artists(checkpoint: dict) -> list[str]:
    """The artist labels of a checkpoint (label ids are positions); a one-artist run's single artist."""
    return [str(a) for a in (checkpoint.get("artists") or [checkpoint.get("artist")]) if a is not None]


def clear_outputs(folder: Path) -> int:
    """Stage 4's --overwrite: remove its previous outputs in `folder` (and only those)."""
    removed = 0
    for pattern in OUTPUT_PATTERNS:
        for path in Path(folder).glob(pattern):
            path.unlink()
            removed += 1
    return removed


# ---- metrics.jsonl ----------------------------------------------------------------------------
def read_metrics(path: Path, log: logging.Logger = LOG) -> list[dict]:
    """The records of metrics.jsonl. The one rule: a line that is not a JSON object with an integer
    `epoch` (a hand edit, a cut file) is skipped with a warning, never a reason to stop."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            log.warning("%s:%d: skipping a line that is not JSON (%s)", path, number, error.msg)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            log.warning("%s:%d: skipping a line without an integer 'epoch'", path, number)
            continue
        records.append(record)
    return records


def write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), path)


def append_metrics(path: Path, record: dict) -> list[dict]:
    """Rewrite metrics.jsonl atomically with `record` replacing any line of the same or a later epoch."""
    records = [r for r in read_metrics(path) if r["epoch"] < record["epoch"]] + [record]
    write_metrics(path, records)
    return records


def baseline_record(records: list[dict]) -> dict | None:
    return next((r for r in records if r.get("record") == BASELINE_RECORD), None)


def epoch_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("record") != BASELINE_RECORD and "train_nll_bits_per_frame" in r]


def store_baselines(path: Path, baselines: dict) -> None:
    """Put the baseline line first in metrics.jsonl (once per run; a resumed run keeps the first)."""
    records = read_metrics(path)
    if baseline_record(records) is None:
        write_metrics(path, [{"epoch": 0, "record": BASELINE_RECORD, **baselines}, *records])


def best_epoch_record(records: list[dict]) -> dict | None:
    """The epoch record with the lowest valid NLL (the model `best.pt` holds); without validation, the last."""
    epochs = epoch_records(records)
    scored = [r for r in epochs if isinstance(r.get("valid_nll_bits_per_frame"), (int, float))]
    if scored:
        return min(scored, key=lambda r: r["valid_nll_bits_per_frame"])
    return epochs[-1] if epochs else None
