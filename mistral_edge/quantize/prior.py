"""A weight-only prior for the covariance of the residual stream, which GPTQ's Hessian is shrunk toward
when its inputs come from a few hundred random tokens (`--calib random`).

The stream is the embedding plus what every output projection and down projection has written to it, so
its covariance lies mostly in the span of those weights: the embedding's rows, and the columns of each
wo and w2 so far. With each part's W W^T scaled to unit mean diagonal (their inputs taken as isotropic)
and the sum weighted by the norm's gain, it is a full-rank estimate that 512 random tokens (rank at most
512, where Mistral 7B's K is 4096) cannot give: on the off-grid SmolLM2, 512 tokens shrunk toward it
round w13 as well as 2048 tokens alone (docs/quantization.md). Each part is estimated from a seeded
sample of its rows or columns, so at 7B widths it costs well under a second per layer.
"""

from __future__ import annotations

import torch

SAMPLED_ROWS = 4096
"""Embedding rows in the estimate (of the vocabulary's)."""
SAMPLED_COLUMNS = 1024
"""Columns of each writer in the estimate (Mistral 7B's w2 has 14336)."""


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / (float(m.diagonal().mean()) or 1.0)


class ResidualPrior:
    """The running estimate, fed each writer in execution order (`add`) and read before every linear
    that takes the normed stream (`of`)."""

    def __init__(self, embedding: torch.Tensor, seed: int = 0):
        self._gen = torch.Generator().manual_seed(seed)
        rows = embedding[self._sample(embedding.shape[0], SAMPLED_ROWS)].float()
        self.cov = _unit(rows.T @ rows)

    def _sample(self, n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=self._gen)[:k] if n > k else torch.arange(n)

    def add(self, w: torch.Tensor) -> None:
        """A linear y = x @ w.T that adds y to the stream (wo, w2)."""
        part = w[:, self._sample(w.shape[1], SAMPLED_COLUMNS)].float()
        self.cov += _unit(part @ part.T)

    def of(self, gain: torch.Tensor) -> torch.Tensor:
        """The prior for the input rms_norm(h) * gain, at unit mean diagonal."""
        g = gain.float()
        return _unit(self.cov * g[:, None] * g[None, :])
