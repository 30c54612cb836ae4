"""int8 weights, symmetric per output channel: W[n, :] ~= q[n, :] * scale[n]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4 import FP16_MAX, FP16_TINY

ROW_BLOCK_ELEMENTS = 1 << 22
"""Weights converted to float32 at once: a bf16 7B matrix is never upcast whole."""


@dataclass(frozen=True)
class Int8Weight:
    q: torch.Tensor
    """int8 [N, K], values in [-127, 127] (-128 unused, so the grid is symmetric)."""
    scale: torch.Tensor
    """float32 [N], each an fp16 value."""

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Round to nearest (half to even, as ONNX QuantizeLinear) with scale = row absmax / 127, rounded
    to fp16 (as every layout stores it; the codes are rounded for the stored scale)."""
    n, k = w.shape
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, k))
    for start in range(0, n, rows):
        block = w[start : start + rows].float()
        absmax = block.abs().amax(dim=1)
        s = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).clamp_(FP16_TINY, FP16_MAX).half().float()
        q[start : start + rows] = torch.round(block / s[:, None]).clamp_(-127, 127)
        scale[start : start + rows] = s
    return Int8Weight(q, scale)
