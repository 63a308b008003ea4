"""Helpers the test modules share (fixtures live in conftest.py; no test module imports another)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from pipeline.contract import TokenFile, save_token_file  # noqa: E402
from pipeline.files import atomic_torch_save  # noqa: E402


# ---- files and processes ----------------------------------------------------------------------
def finished_files(folder: Path, suffix: str) -> list[Path]:
    """Files under a final name with `suffix`, at any depth below `folder` (never a temporary of an
    atomic write, whose hidden name a `*.pt` / `*.th` glob would also match)."""
    from pipeline.files import is_temporary

    return sorted(path for path in folder.rglob("*") if path.suffix == suffix and not is_temporary(path))


STAGE5_ARTIST = "demo"


def sine_tone(seconds: float, rate: int = 48_000, channels: int = 2, freq: float = 440.0,
              amplitude: float = 0.3) -> np.ndarray:
    """A deterministic `[n, channels]` float32 tone."""
    t = np.arange(int(round(seconds * rate))) / rate
    tone = amplitude * np.sin(2 * np.pi * freq * t)
    return np.repeat(tone[:, None], channels, axis=1).astype(np.float32)


def run_script(script: str, *args, cwd=None, check: bool = False, env=None, timeout: float = 600):
    """Run `scripts/<script>` in a subprocess; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


# ---- stage 4: token files, manifests, runs ------------------------------------------------------
BANDWIDTH = {2: 3.0, 4: 6.0, 8: 12.0}


TINY = ["--preset", "tiny", "--context-frames", "32", "--batch-size", "2", "--log-level", "WARNING"]


def write_tokens(root, rel, frames, q=4, seed=0, bandwidth=None):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1024, (1, q, frames), generator=generator, dtype=torch.int16)
    token_file = TokenFile(codes=codes, scales=torch.ones(1), num_samples=frames * 320,
                           bandwidth=bandwidth or BANDWIDTH[q], codec="random:0", chunk_frames=frames)
    save_token_file(token_file, root / rel)
    return token_file


def write_dataset(root, artist="A", lengths=(100, 70, 50), q=4, valid=1, entry_overrides=None):
    """Token files of the given lengths (the last `valid` in the valid split) and their manifest."""
    lines = []
    for index, frames in enumerate(lengths):
        rel = f"encoded_tokens/{artist}/clip_{index}.th"
        write_tokens(root, rel, frames, q=q, seed=index)
        line = {"audio": rel, "duration": frames / 150, "sample_rate": 48000, "frames": frames, "codebooks": q,
                "bandwidth": BANDWIDTH[q], "codec": "random:0", "source": f"data_processed/{artist}/{index}.wav",
                "track": f"track{index}", "split": "valid" if index >= len(lengths) - valid else "train",
                "median_scale": 1.0 + index}
        line.update((entry_overrides or {}).get(index, {}))
        lines.append(line)
    path = root / f"metadata_clean_{artist}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def results(root, artist="A"):
    return root / "model_results" / artist


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- stage 5: a project root with a hand-built checkpoint -----------------------------------------
ARTIST = STAGE5_ARTIST


def make_root(tmp_path, transformer_module, pattern, median_scale=0.05, context_frames=120):
    """A project root holding only a hand-built checkpoint (stage 5 needs no training data)."""
    torch.manual_seed(0)
    args = transformer_module.model_args_for("tiny", 4, context_frames)
    model = transformer_module.MusicTransformer(args)
    contract = {"n_codebooks": 4, "bandwidth": 6.0, "codec": "random:0", "pattern": pattern, "frame_rate": 150,
                "sample_rate": 48000, "context_frames": context_frames, "median_scale": median_scale}
    atomic_torch_save({"format": 1, "model": model.state_dict(), "model_args": asdict(args),
                       "token_contract": contract, "artist": ARTIST, "epoch": 2, "step": 9,
                       "optimizer": {"state": {}, "param_groups": []}},
                      tmp_path / "model_results" / ARTIST / "best.pt")
    return tmp_path


def outputs(root, name):
    folder = root / "music_transformer" / ARTIST
    return {suffix: folder / f"{name}{suffix}" for suffix in (".wav", ".th", ".json", ".png")}


def add_joint_model(root, transformer_module, name: str = "mix") -> None:
    """model_results/<name>/best.pt: an untrained tiny model with the labels Low and High, beside
    make_root's one-artist model."""
    checkpoint = torch.load(root / "model_results" / ARTIST / "best.pt", weights_only=True)
    args = transformer_module.model_args_from(checkpoint["model_args"], ARTIST)
    args.n_artists = 2
    torch.manual_seed(1)
    model = transformer_module.MusicTransformer(args)
    checkpoint.update(model=model.state_dict(), model_args=asdict(args), artist=name, artists=["Low", "High"])
    atomic_torch_save(checkpoint, root / "model_results" / name / "best.pt")


def wait_for(client, job: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    """Poll a studio job through its test client until it reaches one of `states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job}").json()
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job} still {status} after {timeout} s")
