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
    copy_path: dict | None = None  # the fitted in-context copy path (`pipeline.copying`); None: none was fitted

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
                       artists=checkpoint_artists(checkpoint), copy_path=checkpoint.get("copy_path"))


def check_contract(model_args: dict, contract: dict, path: Path) -> None:
    missing = [key for key in ("n_codebooks", "bandwidth", "codec", "pattern") if key not in contract]
    if missing:
        raise StageError(f"{path}: token_contract lacks {', '.join(missing)}")
    if int(contract["n_codebooks"]) != int(model_args.get("n_codebooks", -1)):
        raise StageError(f"{path}: token_contract says Q = {contract['n_codebooks']} codebooks, "
                         f"model_args says n_codebooks = {model_args.get('n_codebooks')}")
    if contract["pattern"] not in PATTERNS:
        raise StageError(f"{path}: unknown codebook pattern {contract['pattern']!r}")


# ---- starting a run from another run's weights (stage 4's --init-from) ----------------------------
def find_init_source(root: Path, source: str) -> Path:
    """`--init-from`: a checkpoint file, or the name of a model under `model_results/` (its best.pt, else last.pt)."""
    from .runs import find_checkpoint

    path = Path(source)
    if path.suffix == ".pt" or path.is_file():
        if not path.is_file():
            raise StageError(f"--init-from {source}: {path} does not exist")
        return path
    return find_checkpoint(root, source)


def initialise_from(source: dict, model: torch.nn.Module, artists: list[str]) -> str:
    """Load `source`'s weights into `model` (the same architecture but for its artist labels) and say how
    the labels were carried over.

    A joint source into a one-artist model: that artist's label embedding (or "no artist" when the
    source does not know it) is added to the input projection's bias, which is exactly what the joint
    model added at every position. Into a joint model: each artist the source knows keeps its row,
    "no artist" keeps its row, new artists start fresh."""
    state = dict(source["model"])
    source_table = state.pop("artist_table.weight", None)  # [n_source + 1, d_model] or None
    known = checkpoint_artists(source) if source_table is not None else []
    if model.args.n_artists == 0:
        note = "no artist labels in either model"
        if source_table is not None:
            row = known.index(artists[0]) if artists[0] in known else source_table.shape[0] - 1
            state["input_proj.bias"] = state["input_proj.bias"] + source_table[row]  # [d_model]
            note = (f"the source's label {artists[0]!r}" if artists[0] in known else "the source's 'no artist' label") \
                + " folded into the input bias"
    else:
        table = model.state_dict()["artist_table.weight"].clone()  # [n_artists + 1, d_model], fresh
        carried = []
        if source_table is not None:
            for label, name in enumerate(artists):
                if name in known:
                    table[label] = source_table[known.index(name)]
                    carried.append(name)
            table[-1] = source_table[-1]  # "no artist"
        state["artist_table.weight"] = table
        note = f"labels carried over: {', '.join(carried) or 'none'}; new labels start fresh"
    model_module().check_state_dict(model, state, source.get("loaded_from", "--init-from"))
    model.load_state_dict(state)
    return note
