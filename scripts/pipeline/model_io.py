"""Load a stage-4 checkpoint into a ready model: for generation, the studio, benchmarks and tests.

The model class lives in the training script (`scripts/4_Transformer.py`); this module is the one
place in the package that imports it (through `stages.load_stage`). Everything else asks for a
`LoadedModel` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import StageError
from .patterns import PATTERNS, extra_steps
from .runs import checkpoint_artists, read_checkpoint
from .stages import load_stage


def model_module():
    """scripts/4_Transformer.py as a module (`MusicTransformer`, `ModelArgs`, `model_args_from`, ...)."""
    return load_stage("4_Transformer")


@dataclass
class LoadedModel:
    """A rebuilt model in eval mode, with what generation needs from its checkpoint."""

    model: torch.nn.Module
    path: Path
    model_args: dict
    contract: dict  # the checkpoint's token_contract: codec, bandwidth, n_codebooks, pattern, context_frames
    epoch: int | None
    step: int | None
    artists: list = field(default_factory=list)  # the checkpoint's artists (label ids: positions)

    @property
    def n_artists(self) -> int:
        """Artist labels the model knows (0: unconditioned)."""
        return int(self.model_args.get("n_artists", 0))

    @property
    def n_codebooks(self) -> int:
        return int(self.model_args["n_codebooks"])

    @property
    def pattern(self) -> str:
        return self.contract["pattern"]

    @property
    def max_context_frames(self) -> int:
        """The longest window the model was trained on (and its positions allow)."""
        limit = int(self.model_args["n_positions"]) - extra_steps(self.pattern, self.n_codebooks)
        return min(int(self.contract.get("context_frames") or limit), limit)


def load_model(path: Path, device: str = "cpu") -> LoadedModel:
    """Rebuild the model from the checkpoint's constructor arguments; only the weights go to `device`."""
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint, Path(path), device)


def model_from_checkpoint(checkpoint: dict, path: Path, device: str = "cpu") -> LoadedModel:
    if "token_contract" not in checkpoint:
        raise StageError(f"{path}: not a stage-4 checkpoint, missing token_contract")
    model_args, contract = dict(checkpoint["model_args"]), dict(checkpoint["token_contract"])
    check_contract(model_args, contract, path)
    stage4 = model_module()
    model = stage4.MusicTransformer(stage4.model_args_from(model_args, path))
    stage4.check_state_dict(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return LoadedModel(model=model, path=Path(path), model_args=model_args, contract=contract,
                       epoch=checkpoint.get("epoch"), step=checkpoint.get("step"),
                       artists=checkpoint_artists(checkpoint))


def check_contract(model_args: dict, contract: dict, path: Path) -> None:
    missing = [key for key in ("n_codebooks", "bandwidth", "codec", "pattern") if key not in contract]
    if missing:
        raise StageError(f"{path}: token_contract lacks {', '.join(missing)}")
    if int(contract["n_codebooks"]) != int(model_args.get("n_codebooks", -1)):
        raise StageError(f"{path}: token_contract says Q = {contract['n_codebooks']} codebooks, "
                         f"model_args says n_codebooks = {model_args.get('n_codebooks')}")
    if contract["pattern"] not in PATTERNS:
        raise StageError(f"{path}: unknown codebook pattern {contract['pattern']!r}")
