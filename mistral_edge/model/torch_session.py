"""The reference model behind the runtime's session interface, for `--backend torch`."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeError
from .reference import ReferenceModel


class TorchSession:
    """A runtime.session.Session (as DecoderSession is) computed by the PyTorch reference."""

    def __init__(self, model: ReferenceModel, window: int, chunk: int, batch: int = 1, sinks: int = 0):
        if not 0 < chunk <= window - sinks:
            raise EdgeError(f"chunk size must be between 1 and W - sinks = {window - sinks}, got {chunk}")
        self.model, self.window, self.chunk, self.batch, self.sinks = model, window, chunk, batch, sinks
        self.vocab_size = model.cfg.vocab_size
        self.cache = model.new_cache(batch, window, sinks)

    @property
    def positions(self) -> np.ndarray:
        return self.cache.pos.numpy()

    def reset(self) -> None:
        self.cache = self.model.new_cache(self.batch, self.window, self.sinks)

    def step(self, tokens: np.ndarray, valid_lens: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        valid = None if valid_lens is None else torch.as_tensor(np.asarray(valid_lens, np.int64))
        logits = self.model.forward(torch.as_tensor(tokens), self.cache, valid)
        if all_logits:
            return logits.numpy()
        last = (valid - 1).clamp(min=0) if valid is not None else torch.full((tokens.shape[0],), tokens.shape[1] - 1)
        return logits[torch.arange(tokens.shape[0]), last][:, None].numpy()
