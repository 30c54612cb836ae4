"""int8 weights, symmetric per output channel: W[n, :] ~= q[n, :] * scale[n]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_BLOCK_ELEMENTS = 1 << 22
"""Weights converted to float32 at once: a bf16 7B matrix is never upcast whole."""


@dataclass(frozen=True)
class Int8Weight:
    q: torch.Tensor
    """int8 [N, K], values in [-127, 127] (-128 unused, so the grid is symmetric)."""
    scale: torch.Tensor
    """float32 [N]."""

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Round to nearest (half to even, as ONNX QuantizeLinear) with scale = row absmax / 127."""
    n, k = w.shape
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, k))
    for start in range(0, n, rows):
        block = w[start : start + rows].float()
        absmax = block.abs().amax(dim=1)
        s = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        q[start : start + rows] = torch.round(block / s[:, None]).clamp_(-127, 127)
        scale[start : start + rows] = s
    return Int8Weight(q, scale)
