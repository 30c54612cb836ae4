"""int8 weights, symmetric, one scale per group of G input columns of a row (spec.INT8_GROUP_SIZE;
None: the whole row): W[n, k] ~= q[n, k] * scales[n, k // G], scale = the group's absmax / 127
rounded to fp16 (every layout stores it so; the codes are the nearest ones for the stored scale).
Measurements (groups of 64 against one scale per row; clipping the scale, which did not help):
docs/quantization.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import spec
from .int4 import FP16_MAX, FP16_TINY

ROW_BLOCK_ELEMENTS = 1 << 22
"""Weights converted to float32 at once: a bf16 7B matrix is never upcast whole."""


@dataclass(frozen=True)
class Int8Weight:
    q: torch.Tensor
    """int8 [N, K], values in [-127, 127] (-128 unused, so the grid is symmetric)."""
    scales: torch.Tensor
    """float32 [N, ceil(K / group_size)], each an fp16 value."""
    group_size: int
    """Columns per scale (the last group may be partial)."""

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.repeat_interleave(self.group_size, dim=1)[:, : self.q.shape[1]]


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> Int8Weight:
    """Round to nearest (half to even, as ONNX QuantizeLinear) on each group's absmax / 127;
    `group_size` None: spec.INT8_GROUP_SIZE. Rows are converted to float32 ROW_BLOCK_ELEMENTS at a time."""
    n, k = w.shape
    g = group_size or spec.int8_group_size(k)
    groups = math.ceil(k / g)
    q, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, groups)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, k))
    for start in range(0, n, rows):
        block = torch.nn.functional.pad(w[start : start + rows].float(), (0, groups * g - k)).view(-1, groups, g)
        absmax = block.abs().amax(-1)
        s = torch.where(absmax > 0, absmax / 127, 1.0).clamp_(FP16_TINY, FP16_MAX).half().float()
        q[start : start + rows] = torch.round(block / s[..., None]).clamp_(-127, 127).view(len(block), -1)[:, :k]
        scales[start : start + rows] = s
    return Int8Weight(q, scales, g)
