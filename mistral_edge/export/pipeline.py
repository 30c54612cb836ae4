"""Checkpoint + quantization spec -> model.onnx (+ model.onnx.data), with a per-tensor error log.

The weights stream: each tensor is read from the checkpoint, quantized and written to the
external-data file in turn, so memory holds about one layer, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..contract import check_kv_cache, graph_ops, ring_span
from ..errors import EdgeError
from ..model.checkpoint import Checkpoint
from ..quantize.int4 import Int4Weight
from ..quantize.plan import TensorQuant, quant_plan
from ..quantize.spec import QuantSpec
from .decoder import Progress, build_decoder
from .linear import WeightEmitter
from .onnx_builder import Builder, ExternalData, activation_type, save_model

DEFAULT_WINDOW = 1024
"""W for models without a sliding window (Llama layout): the cache must have a fixed size."""
SINK_SHARE, MIN_SINKS, MAX_SINKS = 16, 4, 64
"""Attention sinks for a model trained without a window: W / SINK_SHARE within [MIN_SINKS, MAX_SINKS]
(docs/cache.md: 16 were the best of 4, 16 and 64 at W = 256, 64 at W = 1024; more was not measured);
0 for a model trained with one."""
POOL_SHARE = 2
"""The pool of a model trained without a window: W / POOL_SHARE slots (docs/cache.md: at W = 1024,
64 sinks and a pool of 512 are +2.80% over full attention against +4.77% for the sinks alone, at
W = 256 16 sinks and 128 +16.7% against +30.6%); 0 for a model trained with one."""
DEFAULT_CHUNK = 128
FORMATS = ("nbits", "qdq", "integer")
"""Weight formats (export/linear.py): MatMulNBits (ONNX Runtime, fast decode), DequantizeLinear
(portable), or int8 through MatMulInteger's u8s8 GEMM (ONNX Runtime, fast prefill; fp32 only)."""
INLINE_BELOW = 64 << 20
"""A model whose weights stay under this many bytes is written as one self-contained .onnx file."""


@dataclass(frozen=True)
class ExportResult:
    errors: list  # (name, kind, shape, ErrorStats) per quantized tensor
    ops: tuple[str, ...]  # "domain::op" used by the graph (function bodies included)


def check_format(fmt: str, activations: str) -> None:
    """A weight format the exporter has, with an activation type it can compute in."""
    if fmt not in FORMATS:
        raise EdgeError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "integer" and activations != "fp32":
        raise EdgeError(f"the integer format computes in fp32 (its per-token uint8 quantization of the activations "
                        f"is built in fp32, not {activations}): use --activations fp32 or another --format")


def resolve_sinks(ck: Checkpoint, sinks: int | None, window: int | None = None) -> int:
    """--sinks as given, else for a model trained with full attention (where the window is an
    approximation) W / SINK_SHARE within [MIN_SINKS, MAX_SINKS], W being `window` or DEFAULT_WINDOW,
    and 0 for one trained with a sliding window (where it is exact)."""
    if sinks is not None:
        return sinks
    if ck.config.sliding_window:
        return 0
    return min(MAX_SINKS, max(MIN_SINKS, (window if window is not None else DEFAULT_WINDOW) // SINK_SHARE))


def resolve_pool(ck: Checkpoint, pool: int | None, window: int | None = None, sinks: int = 0) -> int:
    """--pool as given, else W / POOL_SHARE for a model trained with full attention (W being `window`
    or DEFAULT_WINDOW; at most W - sinks - 1, so a ring remains) and 0 for one trained with a sliding window."""
    if pool is not None:
        return pool
    if ck.config.sliding_window:
        return 0
    w = window if window is not None else DEFAULT_WINDOW
    return max(0, min(w // POOL_SHARE, w - sinks - 1))


def resolve_window(ck: Checkpoint, window: int | None, chunk: int | None, sinks: int = 0,
                   pool: int = 0) -> tuple[int, int]:
    """(W, chunk): W the model's window or DEFAULT_WINDOW; the chunk fits the ring of W - sinks - pool slots
    (by default DEFAULT_CHUNK or the ring, and with a pool the largest such that divides W)."""
    w = window if window is not None else (ck.config.sliding_window or DEFAULT_WINDOW)
    if w <= 0:
        raise EdgeError(f"window must be a positive integer, got {w}")
    if not 0 <= sinks < w:
        raise EdgeError(f"sinks must be between 0 and W - 1 = {w - 1}, got {sinks}")
    if not 0 <= pool < w - sinks:
        raise EdgeError(f"pool must be between 0 and W - sinks - 1 = {w - sinks - 1}, got {pool}")
    ring = w - sinks - pool
    c = chunk if chunk is not None else min(DEFAULT_CHUNK, ring)
    while chunk is None and pool and w % c:  # a chunk that runs past W from below it would admit for
        c -= 1  # queries still within W: the largest that divides W keeps a prefill from 0 exact up to W
    if not 0 < c <= ring:
        raise EdgeError(f"chunk size must be between 1 and {ring_span(w, sinks, pool)}, got {c}")
    return w, c


def export_onnx(ck: Checkpoint, spec: QuantSpec, out_path: Path, *, window: int | None = None,
                chunk: int | None = None, fmt: str = "nbits", accuracy_level: int = 4,
                plan: dict[str, TensorQuant] | None = None, activations: str = "fp32",
                progress: Progress | None = None, sinks: int | None = None,
                kv_cache: str | None = None, pool: int | None = None,
                codes: Callable[[str], Int4Weight | None] | None = None) -> ExportResult:
    """Write the decoder-step graph to out_path, its weights to out_path + '.data' (folded into
    the .onnx when under INLINE_BELOW bytes); `activations` ("fp32" or "fp16") is the type it
    computes in, `kv_cache` (fp32, fp16 or int8; None: the activation type) the one its cache
    stores keys and values in; `sinks` None takes `resolve_sinks`' default; `pool` slots keep the
    most-attended keys that left the ring (docs/cache.md; None: `resolve_pool`'s default); `codes`: calibrated
    int4 codes by tensor name (WeightEmitter.codes)."""
    act = activation_type(activations)
    check_format(fmt, act.name)
    kv_cache = kv_cache or act.name
    check_kv_cache(kv_cache, act.name)
    s = resolve_sinks(ck, sinks, window)
    pool = resolve_pool(ck, pool, window, s)
    w, c = resolve_window(ck, window, chunk, s, pool)
    plan = plan or quant_plan(ck.config, spec)
    data = ExternalData(out_path.with_name(out_path.name + ".data"))
    try:
        emitter = WeightEmitter(Builder(data=data), plan, fmt, accuracy_level, act, codes=codes)
        model = build_decoder(ck.config, ck.weights, w, c, emitter, progress, s, kv_cache, pool)
    finally:
        data.close()
    save_model(model, out_path, data, INLINE_BELOW)
    return ExportResult(emitter.log, tuple(graph_ops(model)))
