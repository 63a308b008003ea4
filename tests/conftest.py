"""Shared fixtures: the scripts folder on sys.path, a seeded random codec, synthetic audio."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# A suite started in the background (`nohup ... &`) inherits an ignored SIGINT; the Ctrl-C tests need
# Python's own handler, as in a terminal (a process that ignores SIGINT rightly goes on when sent one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def finished_files(folder: Path, suffix: str) -> list[Path]:
    """Files under a final name with `suffix`, at any depth below `folder` (never a temporary of an
    atomic write, whose hidden name a `*.pt` / `*.th` glob would also match)."""
    from pipeline.files import is_temporary

    return sorted(path for path in folder.rglob("*") if path.suffix == suffix and not is_temporary(path))


@pytest.fixture(autouse=True)
def seeded_random_generators():
    """Every test starts from the same random state: random data in a test is reproducible."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def random_codec():
    """The 48 kHz Encodec architecture with seeded random weights (built once per test session)."""
    from pipeline.codec import load_codec

    return load_codec("random:0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two spinning
    threads per process made those tests several times slower. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def stage5():
    """scripts/5_MusicPrediction.py imported as a module."""
    from pipeline.stages import load_stage

    return load_stage("5_MusicPrediction")


STAGE5_ARTIST = "demo"


@pytest.fixture
def in_process(stage5, random_codec, monkeypatch):
    """Stage 5's `main` in this process, through run_main's exit codes, with the session's random codec."""
    from pipeline.cli import run_main

    monkeypatch.setattr(stage5, "load_codec", lambda spec, device="cpu": random_codec)

    def run(root, *args):
        argv = ["--artist", STAGE5_ARTIST, "--root", str(root), "--log-level", "WARNING", *map(str, args)]
        return run_main(stage5.main, argv)

    return run


@pytest.fixture(scope="session")
def transformer_module():
    """scripts/4_Transformer.py imported as a module."""
    from pipeline.stages import load_stage

    return load_stage("4_Transformer")


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
