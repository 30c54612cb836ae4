"""What `serve` opens its sessions from: one loaded model, however many sessions it needs.

The engine has two sessions (batch 1 and batch B) and `--moderate` a third; each is a twin of
one loaded session, with a cache of its own, so the weights are in memory once whichever backend
serves (a bundle's DecoderSession.with_batch; a TorchSession on the same ReferenceModel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class OneModel:
    """An engine source (`tokenizer()`, `session(threads=, batch=)`) over one model, loaded by
    `load` on the first session (so a server loads it after binding its port) and never again."""

    tokenizer: Callable[[], object]
    load: Callable[[], object]  # the model's first session: its threads are every twin's
    twin: Callable[[object, int], object]  # (that session, batch) -> a session of its own on the same model
    _base: object = field(default=None, init=False, repr=False)

    def session(self, threads: int = 0, batch: int = 1):
        """A fresh session of `batch` rows; `threads` were given to `load`."""
        if self._base is None:
            self._base = self.load()
        return self.twin(self._base, batch)


def bundle_source(bundle, threads: int = 0) -> OneModel:
    """A runtime Bundle's model, loaded once with `threads` (0: the manifest's)."""
    return OneModel(bundle.tokenizer, lambda: bundle.session(threads=threads), lambda s, batch: s.with_batch(batch))


def reference_source(session, tokenizer) -> OneModel:
    """A checkpoint on the PyTorch reference: `session` (a TorchSession) and its model."""
    from ..model.torch_session import TorchSession

    return OneModel(lambda: tokenizer, lambda: session,
                    lambda s, batch: TorchSession(s.model, s.window, s.chunk, batch, sinks=s.sinks,
                                                           kv_cache=s.kv_cache))
