"""Library versions the code needs beyond what `pip` can express at import time.

`requirements.txt` pins the same ranges; these checks turn an older installed library into one
clear message instead of an AttributeError deep inside a forward pass.
"""
from __future__ import annotations

from .cli import StageError

# GPT2Model(..., cache=...) and its output's `.cache` exist from transformers 5.24; 5.17 and 5.18 take
# `past_key_values`: the KV cache passed as `cache=` silently vanished into **kwargs.
MIN_TRANSFORMERS = "5.24"


class TransformersTooOld(StageError):
    """The installed transformers lacks an API the model uses (exit 2 with the message)."""


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers older than MIN_TRANSFORMERS (the installed one unless `version` is given)."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        raise TransformersTooOld(
            f"transformers {version} is installed, but the model needs transformers >= {MIN_TRANSFORMERS} "
            f"(GPT2Model's `cache=` argument): pip install 'transformers>={MIN_TRANSFORMERS},<6' "
            "(or pip install -r requirements.txt)")


# Modules the stages import, in requirements.txt's order (import name, pip name).
REQUIRED_MODULES = (("torch", "torch"), ("transformers", "transformers"), ("huggingface_hub", "huggingface_hub"),
                    ("safetensors", "safetensors"), ("numpy", "numpy"), ("scipy", "scipy"),
                    ("soundfile", "soundfile"), ("soxr", "soxr"), ("pyloudnorm", "pyloudnorm"), ("tqdm", "tqdm"),
                    ("matplotlib", "matplotlib"))


def missing_requirements() -> list[str]:
    """Problems that stop the pipeline under this interpreter: missing modules, too old a transformers.
    Fast: finds the modules without importing them (torch alone takes seconds to import)."""
    import importlib.metadata
    import importlib.util

    problems = [f"module '{name}' is not importable (pip install {package})"
                for name, package in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if not problems:
        try:
            check_transformers(importlib.metadata.version("transformers"))
        except TransformersTooOld as error:
            problems.append(str(error))
    return problems


def main() -> int:
    """`python -m pipeline.requirements`: exit 0 when every requirement is met, else 2 naming each problem."""
    import sys

    problems = missing_requirements()
    for problem in problems:
        print(f"{sys.executable}: {problem}", file=sys.stderr)
    if problems:
        print("install the requirements for this interpreter: "
              f"{sys.executable} -m pip install -r requirements.txt", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
