"""`load_checkpoint`: every model source the CLI accepts, as one canonical Checkpoint.

MODEL may be omitted (the embedded demo model), a Hugging Face directory, a
mistral-inference directory, a .gguf file, a pickle file next to its config, or a Hub id.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer

from ...errors import EdgeError, first_line
from ..checkpoint import Checkpoint
from . import gguf, hf, hub, mistral
from .default import load_default
from .tensor_files import PICKLE_SUFFIXES, require_trust


def load_checkpoint(spec: str | None, *, window: int | None = None, trust_pickle: bool = False) -> Checkpoint:
    """Load MODEL (see module docstring); `window` sets W, `trust_pickle` allows torch pickles."""
    ck = load_default() if spec is None else _load_spec(spec, trust_pickle)
    check_tokenizer(ck)
    ck.config = ck.config.with_window(window)
    return ck


def _load_spec(spec: str, trust_pickle: bool) -> Checkpoint:
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, trust_pickle)
    if hub.is_hub_id(spec) and not _names_local_path(spec):
        ck = _load_path(hub.download(spec), trust_pickle)
        ck.source = spec
        return ck
    raise EdgeError(f"{spec}: no such file or directory")


def _names_local_path(spec: str) -> bool:
    """`models/x` is a path when `models` exists here (or it starts like one: ./ ../ / ~), not a Hub id."""
    return spec.startswith(("./", "../", "/", "~")) or Path(Path(spec).parts[0]).exists()


def _load_path(path: Path, trust_pickle: bool = False) -> Checkpoint:
    """A local model: a directory, a .gguf file, or a pickle whose directory has the config."""
    if path.is_file() and path.suffix == ".gguf":
        return gguf.load(path)
    weights = None
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        require_trust(path, trust_pickle)
        path, weights = path.parent, path
    elif not path.is_dir():
        raise EdgeError(f"{path}: not a model; expected a directory, a .gguf file or a .bin/.pth/.pt pickle")
    hf_layout = (path / "config.json").is_file()
    # Mistral's Hub repos carry both layouts; the HF one brings tokenizer.json and the chat template.
    if (path / "params.json").is_file() and not (hf_layout and (weights or hf.has_weights(path))):
        return mistral.load(path, trust_pickle, weights)
    if hf_layout:
        return hf.load(path, trust_pickle, weights)
    raise EdgeError(f"{path}: no config.json (Hugging Face) or params.json (mistral-inference)")


def tokenizer_vocab_size(kind: str, path: Path) -> int:
    """Token count of a tokenizer.json (added tokens included) or a SentencePiece tokenizer.model."""
    try:
        if kind == "tokenizer.model":
            return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # both libraries raise bare RuntimeError/OSError/Exception on a bad file
        raise EdgeError(f"{path}: unreadable tokenizer ({first_line(e)})") from None


def check_tokenizer(ck: Checkpoint) -> None:
    """A tokenizer that can emit ids past the embedding table belongs to another model."""
    for kind, path in ck.tokenizer_files.items():
        n = tokenizer_vocab_size(kind, path)
        if n > ck.config.vocab_size:
            raise EdgeError(f"{path}: tokenizer has {n} tokens but the model's vocabulary is "
                            f"{ck.config.vocab_size}; it belongs to another model")
