"""What every loader returns: one canonical model, whatever the source format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    source: str
    """Path or Hub id the model came from (recorded in bundle manifests)."""
    tokenizer_files: dict[str, Path] = field(default_factory=dict)
    """Tokenizer files to ship: 'tokenizer.json' and/or 'tokenizer.model' mapped to their paths."""
    chat_template: str | None = None
    """The checkpoint's own Jinja chat template, when it has one."""
    source_format: str = ""
    """One of 'hf', 'mistral', 'gguf'."""

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.weights.values())
