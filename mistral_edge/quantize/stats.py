"""How far a quantized tensor is from the original: one line per tensor in the export log."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


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
    return error_stats_of([(w, wq)])


def error_stats_of(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> ErrorStats:
    """The stats of a tensor given as (w, wq) row blocks, so that no float64 copy of a large
    matrix is ever whole."""
    err = ref = max_abs = 0.0
    for w, wq in blocks:
        w, d = w.double(), wq.double() - w.double()
        err, ref = err + float((d * d).sum()), ref + float((w * w).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    rel = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    snr = math.inf if err == 0 else (10 * math.log10(ref / err) if ref > 0 else -math.inf)
    return ErrorStats(rel, max_abs, snr)
