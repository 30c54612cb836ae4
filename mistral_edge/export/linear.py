"""Emit weight initializers and the ops that use them, per tensor precision.

fp32 / fp16: Gemm on the [N, K] table (in an fp32 graph, fp16 weights are cast up once, at
session start; an fp16 graph stores both as fp16).
int8 / int4, `nbits` format: ONNX Runtime's com.microsoft.MatMulNBits (the fast
CPU path; int8 is stored as 8-bit blocks of 16 that share their group's scale, one group
being a whole number of blocks or the whole row).
int8, `integer` format: the input quantized to uint8 per row (token), asymmetric, by standard ops,
then MatMulInteger on the [K, N] codes with one scale per output channel, corrected for the rows'
zero points by the codes' column sums (ONNX Runtime runs it on MLAS's u8s8 GEMM: AMX,
AVX512-VNNI, AVX2 or NEON as the CPU has; several times MatMulNBits for a 128-token chunk,
docs/kernel.md). Per row, not per tensor as com.microsoft.DynamicQuantizeMatMul quantizes: one
token's outliers would set the whole chunk's step (KL 0.21 against 0.02 on the demo model,
docs/kernel.md). fp32 graphs only. The embedding Gathers columns of the same codes, so a tied
head shares them; int4 keeps MatMulNBits.
int8, `qdq` format: blocked DequantizeLinear of the [N, K] table + Gemm transB (the table an embedding
shares); int4, `qdq`: blocked DequantizeLinear of the [K, N] table + MatMul. Runnable anywhere.
int4 with float zero points, either format: the symmetric int4 matmul plus
MatMul(MatMul(x, group-sum matrix), offsets), see quantize/int4.py.
The embedding is a Gather on the same storage, so a tied head and embedding
share one initializer; int4 rows are unpacked after the Gather with standard ops (BitwiseAnd,
BitShift, Cast, Sub, Mul: any runtime). Scales and float offsets are stored as fp16 and cast to
the graph's activation type (`Activations`) by a Cast on the initializer, which ONNX Runtime
folds at load; an int8 head's per-block scales are its group scales, expanded in the graph
(a Gather on initializers, folded too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import TensorProto

from ..errors import EdgeError
from ..quantize.int4 import Int4Weight, blocked_qdq, pack_matmul_nbits, quantize_int4
from ..quantize.int8 import Int8Weight, quantize_int8
from ..quantize.plan import TensorQuant
from ..quantize.spec import int8_group_size
from ..quantize.stats import error_stats_of
from .onnx_builder import ACTIVATIONS, FLOAT, Activations, Builder

FP32_TINY = float(np.finfo(np.float32).tiny)
"""The least step of a row's uint8 quantization (an all-zero row: its codes are all zero)."""
INT8_ZERO = 128  # MatMulNBits' implied zero point for 8 bits
BLOCK_ELEMENTS = 1 << 22
"""Quantization and error statistics run over row blocks of about this many weights (16 MiB in
float32): both are per row, so the results are the same, and a 7B matrix (up to 117M weights)
never has whole-matrix float temporaries."""


def row_blocks(n: int, k: int) -> Iterator[slice]:
    rows = max(1, BLOCK_ELEMENTS // max(k, 1))
    return (slice(r, min(r + rows, n)) for r in range(0, n, rows))


@dataclass
class WeightEmitter:
    builder: Builder
    plan: dict[str, TensorQuant]
    """Precision per base tensor name (e.g. 'layers.0.attention.wqkv', 'output', 'tok_embeddings')."""
    fmt: str = "nbits"  # or "qdq", "integer" (export.pipeline.FORMATS)
    accuracy_level: int = 4
    activations: Activations = ACTIVATIONS["fp32"]
    codes: Callable[[str], Int4Weight | None] | None = None
    """Calibrated int4 codes by tensor name (GPTQ, `quantize.calibrate.LayerwiseGptq.codes`), asked for as each
    int4 tensor is emitted; None from it, or no callable: the plan's own fit."""
    keep_dequantized: bool = False
    """Tests only: keep in `dequantized` a float32 copy of every quantized tensor (a whole model's worth)."""
    log: list = field(default_factory=list)
    """(name, kind, shape, ErrorStats) per quantized tensor."""
    dequantized: dict = field(default_factory=dict)
    """name -> the weight the graph really computes with (quantized tensors only; keep_dequantized)."""
    _stored: dict[str, str] = field(default_factory=dict)
    """Initializers (and values computed from them) made so far, by name (tied head and embedding share)."""
    _int8_last: tuple[str, Int8Weight] | None = None
    """The int8 quantization of the tensor being emitted, shared by its several initializers and
    dropped when its call returns, so no int8 tensor outlives its own emission."""

    def _quant(self, name: str) -> TensorQuant:
        return self.plan.get(name, TensorQuant("fp32"))

    def _record(self, name: str, kind: str, w: torch.Tensor, dequantize: Callable[[slice], torch.Tensor]) -> None:
        """Log the error of `dequantize(rows)` against w[rows], computed over row blocks."""
        if any(entry[0] == name for entry in self.log):  # a tied head re-quantizes the embedding
            return
        blocks = list(row_blocks(*w.shape))
        self.log.append((name, kind, tuple(w.shape), error_stats_of((w[r], dequantize(r)) for r in blocks)))
        if self.keep_dequantized:
            self.dequantized[name] = torch.cat([dequantize(r) for r in blocks])

    def linear(self, x: str, name: str, w: torch.Tensor, output: str | None = None) -> str:
        """y = x @ w.T for w [N, K]."""
        try:
            return self._linear(x, name, w, output)
        finally:
            self._int8_last = None

    def embedding(self, ids: str, name: str, w: torch.Tensor) -> str:
        """Rows of the [V, dim] table; int8 rows are dequantized after the Gather."""
        try:
            return self._embedding(ids, name, w)
        finally:
            self._int8_last = None

    def _linear(self, x: str, name: str, w: torch.Tensor, output: str | None = None) -> str:
        b, tq = self.builder, self._quant(name)
        outs = [output] if output else None
        n, k = w.shape
        if tq.kind in ("fp32", "fp16"):
            return self._gemm_t(x, self._float(name, w, tq), n, k, outs)
        if tq.kind == "int8" and self.fmt == "integer":
            return self._int8_integer(x, name, w, outs)
        if tq.kind == "int8" and self.fmt == "nbits":
            packed, block = self._int8_nbits(name, w)
            scales = self._value(name + ".scales/blocks", lambda: b.op("Reshape", [b.op("Gather", [
                self._int8_scales(name, w), b.const(np.arange(0, k, block) // int8_group_size(k, self.fmt))],
                axis=1), b.const([-1])]))  # each block takes its group's scale
            return b.op("MatMulNBits", [x, packed, scales], outputs=outs, domain="com.microsoft",
                        K=k, N=n, bits=8, block_size=block, accuracy_level=self.accuracy_level)
        if tq.kind == "int8":  # the [N, K] table an embedding's Gather reads, so a tied head shares it
            table = b.op("DequantizeLinear", [self._int8_table(name, w), self._int8_scales(name, w)], axis=1,
                         block_size=int8_group_size(k, self.fmt))
            return self._gemm_t(x, table, n, k, outs)
        if tq.kind == "int4":
            q4 = self._q4(name, w, tq)
            if self.fmt == "qdq" and name + ".q4" in self._stored:  # a tied head on the embedding's rows
                return self._gemm_t(x, self._int4_gather(name, q4, None), n, k, outs)
            if q4.zero_point_kind != "float":
                return self._int4(x, name, q4, outs)
            sym, _ = q4.split_offset()
            sums = b.op("MatMul", [x, self._once(f"group_sum.k{k}.g{tq.group_size}",
                                                 lambda: self._act(_group_sum_matrix(k, tq.group_size)))])
            shift = b.op("MatMul", [sums, self._offsets(name, q4)])
            return b.op("Add", [self._int4(x, name, sym), shift], outputs=outs)
        raise EdgeError(f"unsupported precision {tq.kind!r} for {name}")

    def _int8_integer(self, x: str, name: str, w: torch.Tensor, outs: list[str] | None) -> str:
        """x @ W.T with each row of x rounded to uint8 over its own range (widened to hold 0, as
        DynamicQuantizeLinear's; zero point z, step s): s * (MatMulInteger(q, codes) - z * column
        sums) * the channel scales."""
        b = self.builder
        zero, top = self._fconst(0.0), self._fconst(255.0)
        axes = self._value("const/last-axis", lambda: b.const([-1]))
        lo = b.op("Min", [b.op("ReduceMin", [x, axes], keepdims=1), zero])
        hi = b.op("Max", [b.op("ReduceMax", [x, axes], keepdims=1), zero])
        step = b.op("Max", [b.op("Mul", [b.op("Sub", [hi, lo]), self._fconst(1 / 255)]), self._fconst(FP32_TINY)])
        z = b.op("Round", [b.op("Div", [b.op("Neg", [lo]), step])])
        q = b.op("Cast", [b.op("Clip", [b.op("Add", [b.op("Round", [b.op("Div", [x, step])]), z]), zero, top])],
                 to=TensorProto.UINT8)
        acc = b.op("Cast", [b.op("MatMulInteger", [q, self._int8_kn(name, w)])], to=FLOAT)
        sums = self._once(name + ".q_t.colsums", lambda: self._int8(name, w).q.sum(1, dtype=torch.int32).float().numpy())
        centred = b.op("Sub", [acc, b.op("Mul", [z, sums])])
        return b.op("Mul", [centred, b.op("Mul", [step, self._int8_scales(name, w)])], outputs=outs)

    def _fconst(self, value: float) -> str:
        """A float32 Constant, one per value in the graph."""
        return self._value(f"const/{value!r}", lambda: self.builder.const(value, np.float32))

    def _gemm_t(self, x: str, table: str, n: int, k: int, outs: list[str] | None) -> str:
        """x @ table.T for an [N, K] table: Gemm with transB on x flattened to 2-D."""
        b = self.builder
        flat = b.op("Gemm", [b.op("Reshape", [x, b.const([-1, k])]), table], transB=1)
        shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [x]), b.const([0]), b.const([-1])]),
                                b.const([n])], axis=0)
        return b.op("Reshape", [flat, shape], outputs=outs)

    def _int4(self, x: str, name: str, q4: Int4Weight, outs: list[str] | None = None) -> str:
        """x @ W.T for int4 W with integer (or no) zero points."""
        b, k, n, g = self.builder, q4.k, q4.n, q4.group_size
        if self.fmt != "qdq":  # MatMulNBits (the integer format keeps it for int4)
            ins = [x, *self._nbits(name, q4)]
            return b.op("MatMulNBits", ins, outputs=outs, domain="com.microsoft", K=k, N=n, bits=4,
                        block_size=g, accuracy_level=self.accuracy_level)
        q, _, zero = blocked_qdq(q4)
        ins = [b.init(name + ".q4_t", q), self._int4_scales(name, q4, transposed=True)]
        if zero is not None:
            ins.append(b.init(name + ".zero_points", zero))
        return b.op("MatMul", [x, b.op("DequantizeLinear", ins, axis=0, block_size=g)], outputs=outs)

    def _q4(self, name: str, w: torch.Tensor, tq: TensorQuant) -> Int4Weight:
        q4 = self.codes(name) if self.codes is not None else None
        q4 = q4 if q4 is not None else _int4_rows(w, tq)
        self._record(name, tq.kind, w, lambda r: q4.rows(r).dequantize())
        return q4

    def _nbits(self, name: str, q4: Int4Weight) -> list[str]:
        """MatMulNBits' B, scales and (integer zero points only) zero_points of q4's codes (float
        zero points: of the symmetric part); the layout an int4 embedding's Gather reads too."""
        packed, _, zeros = pack_matmul_nbits(q4.split_offset()[0] if q4.zero_point_kind == "float" else q4)
        ins = [self._once(name + ".q4", lambda: packed), self._int4_scales(name, q4)]
        return ins + ([self._once(name + ".zero_points", lambda: zeros)] if zeros is not None else [])

    def _int4_scales(self, name: str, q4: Int4Weight, transposed: bool = False) -> str:
        """q4's scales, [N * n_groups] as MatMulNBits reads them or [n_groups, N] (`transposed`, as
        the qdq path's DequantizeLinear does): fp16 initializers, or `_scale_grid`."""
        if q4.row_scales is None:
            scales = q4.scales.T.contiguous() if transposed else q4.scales.reshape(-1)
            return self._scales(name + ".scales", lambda: scales.numpy())
        b, grid = self.builder, self._scale_grid(name, q4)
        if transposed:
            return self._value(name + ".scales/t", lambda: self._to_act(b.op("Transpose", [grid], perm=[1, 0])))
        return self._value(name + ".scales/flat", lambda: self._to_act(b.op("Reshape", [grid, b.const([-1])])))

    def _scale_grid(self, name: str, q4: Int4Weight) -> str:
        """8-bit scales [N, n_groups] in float32: their uint8 codes times the fp16 row scales
        (Int4Weight.row_scales), by ops on initializers that ONNX Runtime folds at load (in float32,
        which its CPU provider has kernels for; an fp16 graph casts the result)."""
        b = self.builder
        return self._value(name + ".scales/grid", lambda: b.op("Mul", [
            b.op("Cast", [self._once(name + ".scale_codes", lambda: q4.scale_codes().numpy())], to=FLOAT),
            b.op("Unsqueeze", [b.op("Cast", [self._once(name + ".row_scales",
                                                         lambda: q4.row_scales.numpy().astype(np.float16))], to=FLOAT),
                               b.const([1])])]))

    def _to_act(self, value: str) -> str:
        """A float32 value at the activation type."""
        act = self.activations.onnx_type
        return value if act == FLOAT else self.builder.op("Cast", [value], to=act)

    def _offsets(self, name: str, q4: Int4Weight) -> str:
        """Float zero points' offsets s (8 - z), [n_groups, N] (as the offset MatMul reads them):
        fp16, or from the 8-bit scales and the zero points' sixteenths (uint8 codes), in float32."""
        if q4.row_scales is None:
            return self._scales(name + ".offsets", lambda: q4.split_offset()[1].T.contiguous().numpy())
        b = self.builder

        def offsets() -> str:
            z = b.op("Mul", [b.op("Cast", [self._once(name + ".zero_codes", lambda: q4.zero_codes().numpy())],
                                  to=FLOAT), b.const(1 / 16, np.float32)])
            shift = b.op("Sub", [b.const(8.0, np.float32), z])
            return self._to_act(b.op("Transpose", [b.op("Mul", [self._scale_grid(name, q4), shift])], perm=[1, 0]))
        return self._value(name + ".offsets/t", offsets)

    def _int4_gather(self, name: str, q4: Int4Weight, ids: str | None) -> str:
        """Rows `ids` ([B, C]; None: the whole [N, K] table) of int4 W, dequantized from the
        MatMulNBits layout with standard ops (Gather, BitwiseAnd, BitShift, Cast, Sub, Mul)."""
        b, n, k, g, groups = self.builder, q4.n, q4.k, q4.group_size, q4.n_groups
        inits = self._nbits(name, q4)
        lead = [0, 0] if ids is not None else [n]

        def rows(table: str, shape: list[int]) -> str:  # the table viewed as [N, *shape], rows selected
            table = b.op("Reshape", [table, b.const([n, *shape])])
            return b.op("Gather", [table, ids], axis=0) if ids is not None else table

        def nibbles(packed: str) -> str:  # uint8 [..., m] -> the codes [..., m, 2], low nibble first
            low = b.op("BitwiseAnd", [packed, b.const(15, np.uint8)])
            high = b.op("BitShift", [packed, b.const(4, np.uint8)], direction="RIGHT")
            return b.op("Concat", [b.op("Unsqueeze", [low, b.const([-1])]), b.op("Unsqueeze", [high, b.const([-1])])],
                        axis=-1)

        act = self.activations
        codes = b.op("Reshape", [nibbles(rows(inits[0], [groups, g // 2])), b.const([*lead, groups, g])])
        if len(inits) == 3:
            zeros = b.op("Reshape", [nibbles(rows(inits[2], [math.ceil(groups / 2)])), b.const([*lead, -1])])
            zeros = b.op("Slice", [zeros, b.const([0]), b.const([groups]), b.const([-1])])
        else:
            zeros = b.const(8, np.uint8)
        centred = b.op("Sub", [b.op("Cast", [codes], to=act.onnx_type),
                               b.op("Unsqueeze", [b.op("Cast", [zeros], to=act.onnx_type), b.const([-1])])])
        vals = b.op("Mul", [centred, b.op("Unsqueeze", [rows(inits[1], [groups]), b.const([-1])])])
        if q4.zero_point_kind == "float":
            offsets = b.op("Transpose", [self._offsets(name, q4)], perm=[1, 0])  # [N, groups]
            vals = b.op("Add", [vals, b.op("Unsqueeze", [rows(offsets, [groups]), b.const([-1])])])
        vals = b.op("Reshape", [vals, b.const([*lead, groups * g])])
        return vals if groups * g == k else b.op("Slice", [vals, b.const([0]), b.const([k]), b.const([-1])])

    def _embedding(self, ids: str, name: str, w: torch.Tensor) -> str:
        b, tq = self.builder, self._quant(name)
        if tq.kind in ("fp32", "fp16"):
            return b.op("Gather", [self._float(name, w, tq), ids], axis=0)
        if tq.kind == "int4":
            return self._int4_gather(name, self._q4(name, w, tq), ids)
        if tq.kind != "int8":
            raise EdgeError(f"unsupported precision {tq.kind!r} for the embedding {name}")
        if self.fmt == "integer":  # columns of the integer head's [K, N] codes, which a tied head shares
            cols = b.op("Gather", [self._int8_kn(name, w), ids], axis=1)  # [K, B, C]
            rows = b.op("Cast", [b.op("Transpose", [cols], perm=[1, 2, 0])], to=self.activations.onnx_type)
            scale = b.op("Unsqueeze", [b.op("Gather", [self._int8_scales(name, w), ids], axis=0), b.const([-1])])
            return b.op("Mul", [rows, scale])
        if self.fmt == "nbits":  # the same storage as an int8 MatMulNBits head, so a tied head shares it
            packed, _ = self._int8_nbits(name, w)
            rows = b.op("Gather", [packed, ids], axis=0)  # [B, C, blocks, block]
            rows = b.op("Reshape", [rows, b.const([0, 0, -1])])
            rows = b.op("Slice", [rows, b.const([0]), b.const([w.shape[1]]), b.const([2])])
            rows = b.op("Sub", [b.op("Cast", [rows], to=self.activations.onnx_type),
                                b.const(float(INT8_ZERO), self.activations.np_type)])
        else:
            rows = b.op("Cast", [b.op("Gather", [self._int8_table(name, w), ids], axis=0)],
                        to=self.activations.onnx_type)
        scale = b.op("Gather", [b.op("Gather", [self._int8_scales(name, w), ids], axis=0),  # each column: its group's
                                b.const(np.arange(w.shape[1]) // int8_group_size(w.shape[1], self.fmt))], axis=2)
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
                self._record(name, "fp16", w, lambda r: w[r].half().float())
            return w.detach().to(torch.float16 if half else torch.float32).contiguous().numpy()
        table = self._once(name + ".weight", make)
        return self.builder.op("Cast", [table], to=FLOAT) if half and self.activations.onnx_type == FLOAT else table

    def _int8(self, name: str, w: torch.Tensor) -> Int8Weight:
        if self._int8_last is None or self._int8_last[0] != name:
            self._int8_last = None
            q8 = quantize_int8(w, int8_group_size(w.shape[1], self.fmt))
            self._record(name, "int8", w, lambda r: Int8Weight(q8.q[r], q8.scales[r], q8.group_size).dequantize())
            self._int8_last = (name, q8)
        return self._int8_last[1]

    def _int8_table(self, name: str, w: torch.Tensor) -> str:
        """int8 [N, K] codes, as the qdq embedding's Gather and a qdq head's DequantizeLinear read them."""
        return self._once(name + ".q", lambda: self._int8(name, w).q.numpy())

    def _int8_kn(self, name: str, w: torch.Tensor) -> str:
        """int8 [K, N] codes, MatMulInteger's B in the integer format (whose embedding Gathers its columns)."""
        return self._once(name + ".q_t", lambda: self._int8(name, w).q.T.contiguous().numpy())

    def _int8_scales(self, name: str, w: torch.Tensor) -> str:
        """int8 scales [N, groups] (one group: per output channel); [N] in the integer format."""
        def make() -> np.ndarray:
            scales = self._int8(name, w).scales
            return (scales.reshape(-1) if self.fmt == "integer" else scales).numpy()
        return self._scales(name + ".scales", make)

    def _scales(self, init_name: str, make: Callable[[], np.ndarray]) -> str:
        """Scales (or float zero points' offsets) stored as fp16, the precision they were fitted
        at (quantize/), and cast to an fp32 graph's type by a Cast on the initializer, which ONNX
        Runtime folds when the session starts: resident at the activation type."""
        stored = self._once(init_name, lambda: make().astype(np.float16))
        if self.activations.onnx_type != FLOAT:
            return stored
        return self._value(init_name + "/cast", lambda: self.builder.op("Cast", [stored], to=FLOAT))

    def _value(self, key: str, make: Callable[[], str]) -> str:
        """A value computed once from initializers (a tied head and embedding share it)."""
        if key not in self._stored:
            self._stored[key] = make()
        return self._stored[key]

    def _once(self, init_name: str, make) -> str:
        """Add an initializer the first time it is asked for (tied head and embedding share)."""
        if init_name not in self._stored:
            self._stored[init_name] = self.builder.init(init_name, make())
        return self._stored[init_name]

    def _int8_nbits(self, name: str, w: torch.Tensor) -> tuple[str, int]:
        """int8 as MatMulNBits 8-bit blocks [N, blocks, block] (K padded with the zero point); the
        caller gives every block its group's scale (a group is a whole number of blocks, or the
        whole row: per-channel quantization), `int8_block`'s. Returns (initializer name, block size)."""
        n, k = w.shape
        block = int8_block(k, self.plan)
        blocks = math.ceil(k / block)
        group = int8_group_size(k, self.fmt)
        if group < k and group % block:
            raise ValueError(f"int8 groups of {group} columns do not fill MatMulNBits blocks of {block}")

        def pack() -> np.ndarray:  # q + 128 as a byte is q's two's-complement byte with its top bit flipped
            shifted = self._int8(name, w).q.view(torch.uint8) ^ INT8_ZERO
            if blocks * block == k:
                return shifted.view(n, blocks, block).numpy()
            packed = torch.full((n, blocks * block), INT8_ZERO, dtype=torch.uint8)
            packed[:, :k] = shifted
            return packed.view(n, blocks, block).numpy()
        return self._once(name + ".q8", pack), block


def int8_block(k: int, plan: dict[str, TensorQuant]) -> int:
    """MatMulNBits block size of the int8 tables with K columns in `plan` (see _int8_nbits). Accuracy
    level 4 quantizes activations per weight block, so where int8 is the model's precision blocks are
    16, the smallest: on the demo model 32 halved the KL to fp32 against 128 (0.0064 vs 0.0134), and
    16 took the off-grid model's from 0.0054 to 0.0048 against 32 (docs/quantization.md). Among int4
    tensors, whose error is the model's, an int8 table takes blocks of its group instead: ONNX Runtime
    holds some 12 bytes per block besides the codes, so blocks of 16 are resident at 14.2 bits per
    weight and blocks of 64 at 9.7 (Mistral 7B's default int4 bundle: 7.8 GiB resident for a 5.0 GiB
    file; docs/export-scale.md)."""
    group = int8_group_size(k)
    mixed = group < k and any(tq.kind == "int4" for tq in plan.values())
    return group if mixed else 16


def _int4_rows(w: torch.Tensor, tq: TensorQuant) -> Int4Weight:
    """quantize_int4 over row blocks (its fit is per row and group, so the result is the same),
    each written into the whole tensor's arrays; codes a calibration chose are taken as they are."""
    if tq.codes is not None:
        return tq.codes
    out = None
    for r in row_blocks(*w.shape):
        part = quantize_int4(w[r], tq.group_size, tq.zero_point, tq.method, tq.act_scale, tq.scale_bits)
        if out is None:
            n = w.shape[0]
            out = Int4Weight(part.q.new_empty((n, part.q.shape[1])), part.scales.new_empty((n, part.n_groups)),
                             part.zero_points.new_empty((n, part.n_groups)), part.group_size, part.k, part.zero_point_kind,
                             None if part.row_scales is None else part.row_scales.new_empty(n))
        out.q[r], out.scales[r], out.zero_points[r] = part.q, part.scales, part.zero_points
        if out.row_scales is not None:
            out.row_scales[r] = part.row_scales
    return out


def _group_sum_matrix(k: int, group_size: int) -> np.ndarray:
    """[K, n_groups] of 0/1: x @ it sums x over each group of K (the last group may be partial)."""
    return (np.arange(k)[:, None] // group_size == np.arange(math.ceil(k / group_size))).astype(np.float32)
