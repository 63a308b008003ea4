"""Import a numbered stage script (their names start with a digit) as a module."""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
_IMPORTING = threading.RLock()  # a second thread must not see a module still being executed


def load_stage(script_stem: str):
    """`load_stage("4_Transformer")` imports scripts/4_Transformer.py once and returns the module."""
    module_name = "stage_" + script_stem.lower()
    with _IMPORTING:
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS_DIR / f"{script_stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # a failed import leaves no half-made module behind
            raise
        return module
