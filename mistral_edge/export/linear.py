"""Emit weight initializers and the ops that use them, per tensor precision.

fp32 / fp16: plain MatMul (fp16 weights are cast up once, at session start).
int8 / int4, `nbits` format: ONNX Runtime's com.microsoft.MatMulNBits (the fast
CPU path; int8 per output channel is stored as 8-bit blocks that share their
row's scale, which is exactly per-channel quantization).
int8 / int4, `qdq` format: standard DequantizeLinear + MatMul, runnable anywhere.
The embedding is a Gather on the same storage, so a tied head and embedding
share one initializer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .onnx_builder import FLOAT, Builder


@dataclass(frozen=True)
class TensorQuant:
    kind: str  # "fp32" | "fp16" | "int8" | "int4"
    group_size: int = 32
    symmetric: bool = False
    method: str = "rtn"


@dataclass
class WeightEmitter:
    builder: Builder
    plan: dict[str, TensorQuant]
    """Precision per base tensor name (e.g. 'layers.0.attention.wqkv', 'output', 'tok_embeddings')."""
    fmt: str = "nbits"  # or "qdq"
    accuracy_level: int = 4
    log: list = field(default_factory=list)
    _stored: dict = field(default_factory=dict)

    def _quant(self, name: str) -> TensorQuant:
        return self.plan.get(name, TensorQuant("fp32"))

    def linear(self, x: str, name: str, w: torch.Tensor, output: str | None = None) -> str:
        """y = x @ w.T for w [N, K]."""
        b, tq = self.builder, self._quant(name)
        outs = [output] if output else None
        n, k = w.shape
        if tq.kind in ("fp32", "fp16"):
            wt = self._stored.get(name) or b.init(name + ".weight_t", _float(w.T, tq.kind))
            self._stored[name] = wt
            if tq.kind == "fp16":
                wt = b.op("Cast", [wt], to=FLOAT)
            return b.op("MatMul", [x, wt], outputs=outs)
        raise NotImplementedError(tq.kind)

    def embedding(self, ids: str, name: str, w: torch.Tensor) -> str:
        b, tq = self.builder, self._quant(name)
        if tq.kind in ("fp32", "fp16"):
            table = b.init(name + ".weight", _float(w, tq.kind))
            rows = b.op("Gather", [table, ids], axis=0)
            return b.op("Cast", [rows], to=FLOAT) if tq.kind == "fp16" else rows
        raise NotImplementedError(tq.kind)


def _float(w: torch.Tensor, kind: str) -> np.ndarray:
    return w.detach().to(torch.float16 if kind == "fp16" else torch.float32).contiguous().numpy()
