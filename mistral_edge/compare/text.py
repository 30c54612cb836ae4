"""Evaluation and calibration text: a UTF-8 file or WikiText-2 through `datasets`, cut into token windows.

The whole text is tokenized once, without BOS, and windows are consecutive
non-overlapping slices of that one token stream (the common fixed-length
perplexity protocol), so every variant sees exactly the same token ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeError, first_line

DATASETS = {"wikitext-2": ("wikitext", "wikitext-2-v1")}
"""--dataset name -> (datasets path, config). wikitext-2-v1 is the tokenized form of wiki.*.tokens."""
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class EvalText:
    name: str
    """Where it came from: a path or 'wikitext-2:test'."""
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_text(path: Path) -> EvalText:
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise EdgeError(f"{path}: the text is empty")
    return EvalText(str(path), text)


def load_text(path: Path | None, dataset: str | None, split: str = "test") -> EvalText:
    """--text FILE, else --dataset (default wikitext-2), which needs `datasets` and the network."""
    if path is not None and dataset is not None:
        raise EdgeError("give --text or --dataset, not both")
    if path is not None:
        return read_text(path)
    name = dataset or "wikitext-2"
    if name not in DATASETS:
        raise EdgeError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)} or --text FILE")
    hint = "pass --text FILE (any UTF-8 text, e.g. WikiText-2's wiki.test.tokens)"
    if dataset is None:
        hint = f"no --text given and {name} cannot be downloaded: " + hint
    if not online():
        raise EdgeError(f"offline: cannot download {name} (no network, or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                        f"set); {hint}")
    if importlib.util.find_spec("datasets") is None:
        raise EdgeError(f"--dataset {name} needs the `datasets` package (pip install datasets); or {hint}")
    import datasets

    try:
        rows = datasets.load_dataset(*DATASETS[name], split=split)["text"]
    except Exception as e:  # network, hub and cache errors come in many types
        reason = first_line(e)
        raise EdgeError(f"cannot load {name} ({reason}); {hint}") from None
    return EvalText(f"{name}:{split}", "".join(rows))


def online(timeout: float = 2.0) -> bool:
    """False when the user said offline or the Hub does not answer within `timeout` seconds."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def token_windows(ids: np.ndarray | list[int], ctx: int, n_windows: int) -> np.ndarray:
    """The first `n_windows` non-overlapping windows of `ctx` tokens, int64 [N, ctx] (fewer if the
    text is shorter; at least one full window is required)."""
    if ctx < 2:
        raise EdgeError(f"--ctx must be at least 2 (one context token and one scored token), got {ctx}")
    if n_windows < 1:
        raise EdgeError(f"--n-windows must be a positive integer, got {n_windows}")
    ids = np.asarray(ids, np.int64)
    n = min(n_windows, len(ids) // ctx)
    if n == 0:
        raise EdgeError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    return ids[: n * ctx].reshape(n, ctx)
