"""int8 weights, symmetric per output channel: W[n, :] ~= q[n, :] * scale[n]."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)
