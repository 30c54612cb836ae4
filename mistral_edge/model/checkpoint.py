"""What every loader returns: one canonical model, whatever the source format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig
from .weights import Weights


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: Weights
    """Canonical name -> tensor, read from the file when accessed (see `Weights`); a plain dict of
    tensors given here is wrapped."""
    source: str
    """Path or Hub id the model came from (recorded in bundle manifests)."""
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    """Tokenizer files to ship: 'tokenizer.json' and/or 'tokenizer.model' mapped to their paths."""
    chat_template: str | None = None
    """The checkpoint's own Jinja chat template, when it has one."""
    source_format: str = ""
    """One of 'hf', 'mistral', 'gguf'."""

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Weights) and isinstance(self.weights, Mapping):
            self.weights = Weights.of(self.weights)

    @property
    def n_params(self) -> int:
        """From the tensors' headers: nothing is read."""
        return self.weights.n_params
