"""Shared fixtures: the scripts folder on sys.path, a seeded random codec, synthetic audio."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO / "tests"))

from helpers import STAGE5_ARTIST  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# Tiny models on a shared 2-core machine: one thread each (a second one spin-waits for a busy core), and
# no stage spends time sampling how busy the machine is (pipeline.threads leaves a chosen count alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A suite started in the background (`nohup ... &`) inherits an ignored SIGINT; the Ctrl-C tests need
# Python's own handler, as in a terminal (a process that ignores SIGINT rightly goes on when sent one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def _stage_fixture(name: str, script_stem: str):
    """The session fixture `name`: scripts/<script_stem>.py imported as a module."""
    def fixture():
        from pipeline.stages import load_stage

        return load_stage(script_stem)

    fixture.__doc__ = f"scripts/{script_stem}.py imported as a module."
    return pytest.fixture(scope="session", name=name)(fixture)


stage1 = _stage_fixture("stage1", "1_audio_preprocessing")
stage2 = _stage_fixture("stage2", "2_Tokenization")
stage3 = _stage_fixture("stage3", "3_data_preparation")
stage5 = _stage_fixture("stage5", "5_MusicPrediction")
transformer_module = _stage_fixture("transformer_module", "4_Transformer")


@pytest.fixture
def in_process(stage5, random_codec, monkeypatch):
    """Stage 5's `main` in this process, through run_main's exit codes, with the session's random codec."""
    from pipeline.cli import run_main

    monkeypatch.setattr(stage5, "load_codec", lambda spec, device="cpu": random_codec)

    def run(root, *args):
        argv = ["--artist", STAGE5_ARTIST, "--root", str(root), "--log-level", "WARNING", *map(str, args)]
        return run_main(stage5.main, argv)

    return run


@pytest.fixture
def stage4(transformer_module):
    """scripts/4_Transformer.py (the name stage-4 tests use)."""
    return transformer_module
