"""Emit weight initializers and the ops that use them, per tensor precision.

fp32 / fp16: Gemm on the [N, K] table (in an fp32 graph, fp16 weights are cast up once, at
session start; an fp16 graph stores both as fp16).
int8 / int4, `nbits` format: ONNX Runtime's com.microsoft.MatMulNBits (the fast
CPU path; int8 per output channel is stored as 8-bit blocks that share their
row's scale, which is exactly per-channel quantization).
int8 / int4, `qdq` format: standard DequantizeLinear + MatMul, runnable anywhere.
int4 with float zero points, either format: the symmetric int4 matmul plus
MatMul(MatMul(x, group-sum matrix), offsets), see quantize/int4.py.
The embedding is a Gather on the same storage, so a tied head and embedding
share one initializer. Scales have the graph's activation type (`Activations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np
import torch

from ..errors import EdgeError
from ..quantize.int4 import Int4Weight, blocked_qdq, pack_matmul_nbits, quantize_int4
from ..quantize.int8 import Int8Weight, quantize_int8
from ..quantize.plan import TensorQuant
from ..quantize.stats import error_stats
from .onnx_builder import ACTIVATIONS, FLOAT, Activations, Builder

INT8_ZERO = 128  # MatMulNBits' implied zero point for 8 bits


@dataclass
class WeightEmitter:
    builder: Builder
    plan: dict[str, TensorQuant]
    """Precision per base tensor name (e.g. 'layers.0.attention.wqkv', 'output', 'tok_embeddings')."""
    fmt: str = "nbits"  # or "qdq"
    accuracy_level: int = 4
    activations: Activations = ACTIVATIONS["fp32"]
    log: list = field(default_factory=list)
    dequantized: dict = field(default_factory=dict)
    """name -> the weight the graph really computes with (quantized tensors only)."""
    _stored: dict = field(default_factory=dict)

    def _quant(self, name: str) -> TensorQuant:
        return self.plan.get(name, TensorQuant("fp32"))

    def _record(self, name: str, tq: TensorQuant, w: torch.Tensor, wq: torch.Tensor) -> None:
        self.log.append((name, tq.kind, tuple(w.shape), error_stats(w, wq)))
        self.dequantized[name] = wq

    def linear(self, x: str, name: str, w: torch.Tensor, output: str | None = None) -> str:
        """y = x @ w.T for w [N, K]."""
        b, tq = self.builder, self._quant(name)
        outs = [output] if output else None
        n, k = w.shape
        if tq.kind in ("fp32", "fp16"):  # Gemm with transB reads the [N, K] table an embedding shares
            flat = b.op("Gemm", [b.op("Reshape", [x, b.const([-1, k])]), self._float(name, w, tq)], transB=1)
            shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [x]), b.const([0]), b.const([-1])]),
                                    b.const([n])], axis=0)
            return b.op("Reshape", [flat, shape], outputs=outs)
        if tq.kind == "int8" and self.fmt == "nbits":
            packed, block = self._int8_nbits(name, w)
            blocks = math.ceil(k / block)
            scales = self._once(name + ".scales",
                                lambda: self._act(self._int8(name, w).scale.repeat_interleave(blocks).numpy()))
            return b.op("MatMulNBits", [x, packed, scales], outputs=outs, domain="com.microsoft",
                        K=k, N=n, bits=8, block_size=block, accuracy_level=self.accuracy_level)
        if tq.kind == "int8":
            q8 = self._int8(name, w)
            dq = b.op("DequantizeLinear", [b.init(name + ".q_t", q8.q.T.contiguous().numpy()),
                                           self._once(name + ".row_scale", lambda: self._act(q8.scale.numpy()))],
                                axis=1)
            return b.op("MatMul", [x, dq], outputs=outs)
        if tq.kind == "int4":
            q4 = quantize_int4(w, tq.group_size, tq.zero_point, tq.method, tq.act_scale)
            self._record(name, tq, w, q4.dequantize())
            if q4.zero_point_kind != "float":
                return self._int4(x, name, q4, outs)
            sym, offsets = q4.split_offset()
            sums = b.op("MatMul", [x, self._once(f"group_sum.k{k}.g{tq.group_size}",
                                                 lambda: self._act(_group_sum_matrix(k, tq.group_size)))])
            shift = b.op("MatMul", [sums, b.init(name + ".offsets", self._act(offsets.T.contiguous().numpy()))])
            return b.op("Add", [self._int4(x, name, sym), shift], outputs=outs)
        raise EdgeError(f"unsupported precision {tq.kind!r} for {name}")

    def _int4(self, x: str, name: str, q4: Int4Weight, outs: list[str] | None = None) -> str:
        """x @ W.T for int4 W with integer (or no) zero points."""
        b, k, n, g = self.builder, q4.k, q4.n, q4.group_size
        if self.fmt == "nbits":
            packed, scales, zeros = pack_matmul_nbits(q4)
            ins = [x, b.init(name + ".q4", packed), b.init(name + ".scales", self._act(scales))]
            if zeros is not None:
                ins.append(b.init(name + ".zero_points", zeros))
            return b.op("MatMulNBits", ins, outputs=outs, domain="com.microsoft", K=k, N=n, bits=4,
                        block_size=g, accuracy_level=self.accuracy_level)
        q, scale, zero = blocked_qdq(q4)
        ins = [b.init(name + ".q4_t", q), b.init(name + ".scales", self._act(scale))]
        if zero is not None:
            ins.append(b.init(name + ".zero_points", zero))
        return b.op("MatMul", [x, b.op("DequantizeLinear", ins, axis=0, block_size=g)], outputs=outs)

    def embedding(self, ids: str, name: str, w: torch.Tensor) -> str:
        """Rows of the [V, dim] table; int8 rows are dequantized after the Gather."""
        b, tq = self.builder, self._quant(name)
        if tq.kind in ("fp32", "fp16"):
            return b.op("Gather", [self._float(name, w, tq), ids], axis=0)
        if tq.kind != "int8":
            raise EdgeError(f"the embedding can be fp32, fp16 or int8, not {tq.kind}")
        if self.fmt == "nbits":  # the same storage as an int8 MatMulNBits head, so a tied head shares it
            packed, _ = self._int8_nbits(name, w)
            rows = b.op("Gather", [packed, ids], axis=0)  # [B, C, blocks, block]
            rows = b.op("Reshape", [rows, b.const([0, 0, -1])])
            rows = b.op("Slice", [rows, b.const([0]), b.const([w.shape[1]]), b.const([2])])
            rows = b.op("Sub", [b.op("Cast", [rows], to=self.activations.onnx_type),
                                b.const(float(INT8_ZERO), self.activations.np_type)])
        else:
            rows = b.op("Cast", [b.op("Gather", [b.init(name + ".q", self._int8(name, w).q.numpy()), ids], axis=0)],
                        to=self.activations.onnx_type)
        row_scale = self._once(name + ".row_scale", lambda: self._act(self._int8(name, w).scale.numpy()))
        scale = b.op("Unsqueeze", [b.op("Gather", [row_scale, ids], axis=0), b.const([2])])
        return b.op("Mul", [rows, scale])

    def _act(self, scales: np.ndarray) -> np.ndarray:
        return scales.astype(self.activations.np_type)

    def _float(self, name: str, w: torch.Tensor, tq: TensorQuant) -> str:
        """The [N, K] float table: fp16 when asked for or when the graph computes in fp16 (then
        fp32 weights are rounded too, and logged as fp16); an fp32 graph casts fp16 storage up
        once, when the session starts."""
        half = tq.kind == "fp16" or self.activations.name == "fp16"

        def make() -> np.ndarray:
            if half:
                self._record(name, TensorQuant("fp16"), w, w.half().float())
            return w.detach().to(torch.float16 if half else torch.float32).contiguous().numpy()
        table = self._once(name + ".weight", make)
        return self.builder.op("Cast", [table], to=FLOAT) if half and self.activations.onnx_type == FLOAT else table

    def _int8(self, name: str, w: torch.Tensor) -> Int8Weight:
        if name not in self._stored:
            q8 = quantize_int8(w)
            self._record(name, TensorQuant("int8"), w, q8.dequantize())
            self._stored[name] = q8
        return self._stored[name]

    def _once(self, init_name: str, make) -> str:
        """Add an initializer the first time it is asked for (tied head and embedding share)."""
        if init_name not in self._stored:
            self._stored[init_name] = self.builder.init(init_name, make())
        return self._stored[init_name]

    def _int8_nbits(self, name: str, w: torch.Tensor) -> tuple[str, int]:
        """int8 per channel as MatMulNBits 8-bit blocks [N, blocks, block] (K padded with the zero
        point); the caller gives every block of a row the row's scale, which is exactly
        per-channel quantization. Blocks of 32, because accuracy_level 4 quantizes activations
        per weight block: on the demo model 32 halves the KL to fp32 against 128 (0.0064 vs 0.0134).
        Returns (initializer name, block size)."""
        n, k = w.shape
        block = 32 if k >= 32 else 16
        blocks = math.ceil(k / block)

        def pack() -> np.ndarray:
            packed = torch.full((n, blocks * block), INT8_ZERO, dtype=torch.uint8)
            packed[:, :k] = (self._int8(name, w).q.to(torch.int16) + INT8_ZERO).to(torch.uint8)
            return packed.view(n, blocks, block).numpy()
        return self._once(name + ".q8", pack), block


def _group_sum_matrix(k: int, group_size: int) -> np.ndarray:
    """[K, n_groups] of 0/1: x @ it sums x over each group of K (the last group may be partial)."""
    return (np.arange(k)[:, None] // group_size == np.arange(math.ceil(k / group_size))).astype(np.float32)
