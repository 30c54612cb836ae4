"""How far a quantized tensor is from the original: one line per tensor in the export log."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ROW_BLOCK_ELEMENTS = 1 << 22
"""Weights compared at once: a 7B matrix in float64 would double the export's peak memory."""


@dataclass(frozen=True)
class ErrorStats:
    rel_fro: float
    """||W - Wq||_F / ||W||_F."""
    max_abs: float
    snr_db: float
    """10 log10(||W||^2 / ||W - Wq||^2); inf when exact."""

    def __str__(self) -> str:
        return f"rel {self.rel_fro:.4f}  max {self.max_abs:.3g}  snr {self.snr_db:.1f} dB"


def error_stats(w: torch.Tensor, wq: torch.Tensor) -> ErrorStats:
    """The stats of a whole tensor, compared ROW_BLOCK_ELEMENTS weights at a time."""
    w, wq = w.reshape(len(w), -1) if w.dim() > 1 else w.reshape(1, -1), wq.reshape(w.shape)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    return error_stats_of(zip(w.split(rows), wq.split(rows)))


def error_stats_of(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> ErrorStats:
    """The stats of a tensor given as (w, wq) row blocks, each compared in float32 while the sums
    accumulate in float64, so that no float64 copy of a large matrix is ever made."""
    err = ref = max_abs = 0.0
    for a, b in blocks:
        a = a.float()
        d = b.float() - a
        err += float((d * d).sum(dtype=torch.float64))
        ref += float((a * a).sum(dtype=torch.float64))
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    rel = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    snr = math.inf if err == 0 else (10 * math.log10(ref / err) if ref > 0 else -math.inf)
    return ErrorStats(rel, max_abs, snr)
