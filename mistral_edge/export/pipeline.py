"""Checkpoint + quantization spec -> model.onnx, with a per-tensor error log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ..contract import GraphInfo, graph_ops
from ..errors import EdgeError
from ..model.checkpoint import Checkpoint
from ..quantize.plan import TensorQuant, quant_plan
from ..quantize.spec import QuantSpec
from .decoder import build_decoder
from .linear import WeightEmitter
from .onnx_builder import Builder, activation_type

DEFAULT_WINDOW = 1024
"""W for models without a sliding window (Llama layout): the cache must have a fixed size."""
DEFAULT_CHUNK = 128
FORMATS = ("nbits", "qdq")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    info: GraphInfo
    plan: dict[str, TensorQuant]
    errors: list  # (name, kind, shape, ErrorStats) per quantized tensor
    ops: tuple[str, ...]  # "domain::op" used by the graph (function bodies included)


def resolve_window(ck: Checkpoint, window: int | None, chunk: int | None) -> tuple[int, int]:
    w = window if window is not None else (ck.config.sliding_window or DEFAULT_WINDOW)
    if w <= 0:
        raise EdgeError(f"window must be a positive integer, got {w}")
    c = chunk if chunk is not None else min(DEFAULT_CHUNK, w)
    if not 0 < c <= w:
        raise EdgeError(f"chunk size must be between 1 and the window W={w}, got {c}")
    return w, c


def export_onnx(ck: Checkpoint, spec: QuantSpec, out_path: Path, *, window: int | None = None,
                chunk: int | None = None, fmt: str = "nbits", accuracy_level: int = 4,
                plan: dict[str, TensorQuant] | None = None, activations: str = "fp32") -> ExportResult:
    """Write the decoder-step graph to out_path (weights external when the model is large);
    `activations` ("fp32" or "fp16") is the type it computes in and caches keys and values in."""
    if fmt not in FORMATS:
        raise EdgeError(f"unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
    act = activation_type(activations)
    w, c = resolve_window(ck, window, chunk)
    plan = plan or quant_plan(ck.config, spec)
    emitter = WeightEmitter(Builder(), plan, fmt, accuracy_level, act)
    model = build_decoder(ck.config, ck.weights, w, c, emitter)
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    onnx.save(model, str(out_path), save_as_external_data=big, location=out_path.name + ".data")
    ops = graph_ops(model)
    cfg = ck.config
    info = GraphInfo(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, w, c, cfg.vocab_size, act.name)
    return ExportResult(out_path, info, plan, emitter.log, tuple(ops))
