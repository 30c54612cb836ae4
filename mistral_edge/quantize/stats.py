"""How far a quantized tensor is from the original: one line per tensor in the export log."""

from __future__ import annotations

import math
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
    w, d = w.double(), wq.double() - w.double()
    err, ref = float((d * d).sum()), float((w * w).sum())
    rel = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    snr = math.inf if err == 0 else (10 * math.log10(ref / err) if ref > 0 else -math.inf)
    return ErrorStats(rel, float(d.abs().max()) if d.numel() else 0.0, snr)
