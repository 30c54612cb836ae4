"""The per-tensor quantization plan: which precision each exported tensor gets.

One home for the rule every stage follows (exporter, budget, bundle manifest, compare):
a spec (what the user asked for) becomes a `TensorQuant` per planned tensor, the
tied-head rule says when the head shares the embedding's storage, and `scheme_name`
is the text a manifest shows for one tensor's scheme.

A mixed int4 spec (the default, `mzp`) is planned by measured sensitivity within a bit budget:
every int4 tensor gets float zero points; the embedding is int4 (a tied one follows the head,
so one table serves both); then the layer linears are moved to int8 in UPGRADE_ORDER, the order
of their measured next-token KL per added bit (docs/quantization.md), while the whole model stays
within TARGET_BITS stored bits per weight. The plan reads no text and no weights: it is the
same, and instant, for any model of a given shape. With calibration text the upgrades follow a
measured sensitivity instead (`quant_plan(..., sensitivity)`, from calibrate.calibrated_plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig
from .spec import DEFAULT_GROUP_SIZE, ZERO_POINTS, QuantSpec, bits_per_weight

if TYPE_CHECKING:
    from .int4 import Int4Weight

LAYER_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
"""The exported (fused) linears of each layer: QKV and gate/up are one matrix each."""
TARGET_BITS = 6.0
"""Stored bits per weight over the whole model that a mixed int4 plan spends (issue 12's budget)."""
INT4_SCALE_BITS = 8
"""A mixed plan's int4 scales: 8-bit codes on a per-row fp16 scale, zero points in sixteenths (4.5
bits per weight at g32 against 5.0 with fp16 ones; docs/quantization.md)."""
UPGRADE_ORDER = ("attention.wqkv", "feed_forward.w2")
"""The layer linears a mixed plan moves to int8, most KL saved per added bit first (measured on
the off-grid SmolLM2, docs/quantization.md: wqkv, which holds the value rows, then w2); within
one, the last layer first (there, the first layers cost the least KL)."""


@dataclass(frozen=True)
class TensorQuant:
    kind: str  # "fp32" | "fp16" | "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE
    zero_point: str = "int"  # int4: "none" (symmetric), "int" or "float"
    method: str = "rtn"
    scale_bits: int = 16
    """int4: 16 (fp16 scales and float offsets) or 8 (8-bit codes on an fp16 scale per row; quantize_int4)."""
    act_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)
    """int4: typical |x| per input channel from calibration; weights the rounding error (quantize_int4)."""
    codes: Int4Weight | None = field(default=None, compare=False, repr=False)
    """int4: an Int4Weight already chosen by calibration (GPTQ, quantize/gptq.py): exported as it is."""


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of every planned tensor (fused QKV and gate/up, as exported)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"tok_embeddings": (cfg.vocab_size, cfg.dim), "output": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv": (q + 2 * kv, cfg.dim), p + "attention.wo": (cfg.dim, q),
                       p + "feed_forward.w13": (2 * cfg.hidden_dim, cfg.dim),
                       p + "feed_forward.w2": (cfg.dim, cfg.hidden_dim)})
    return shapes


def quant_plan(cfg: ModelConfig, spec: QuantSpec, sensitivity: Mapping[str, float] | None = None) -> dict[str, TensorQuant]:
    """Precision per planned tensor: 'layers.{i}.{linear}' for LAYER_LINEARS, 'tok_embeddings', 'output'.
    `sensitivity` (a mixed int4 spec only): the measured KL each layer linear adds as int4
    (calibrate.int4_sensitivity); the int8 upgrades then follow it instead of UPGRADE_ORDER."""
    def tq(kind: str, name: str) -> TensorQuant:
        return int4_quant(spec, name) if kind == "int4" else TensorQuant(kind)

    plan = {name: tq(spec.linear, name) for name in (f"layers.{i}.{n}" for i in range(cfg.n_layers)
                                                     for n in LAYER_LINEARS)}
    plan["output"] = tq(spec.head, "output")
    plan["tok_embeddings"] = tq(spec.embedding or (spec.head if cfg.tied_embeddings else spec.linear),
                                "tok_embeddings")
    return _upgrade(cfg, plan, sensitivity) if budgeted(spec) else plan


def int4_quant(spec: QuantSpec, name: str) -> TensorQuant:
    """The int4 scheme the spec gives the planned tensor `name`."""
    return TensorQuant("int4", spec.group_size or DEFAULT_GROUP_SIZE, spec.zero_point_of(name), spec.method or "rtn",
                       INT4_SCALE_BITS if spec.zero_point == "mixed" else 16)


def budgeted(spec: QuantSpec) -> bool:
    """A mixed int4 spec (the default): planned within TARGET_BITS, int8 where it buys the most KL."""
    return spec.bits == 4 and spec.zero_point == "mixed"


def _upgrade(cfg: ModelConfig, plan: dict[str, TensorQuant],
             sensitivity: Mapping[str, float] | None) -> dict[str, TensorQuant]:
    """Move layer linears to int8, most KL per added bit first (by `sensitivity`, else in
    UPGRADE_ORDER), while the model stays within TARGET_BITS."""
    shapes = tensor_shapes(cfg)
    stored = {name: n * k * stored_bits(n, k, tq) for name, tq in plan.items() for n, k in [shapes[name]]}
    if head_shares_embedding(cfg, plan):
        stored.pop("output")
    budget = TARGET_BITS * sum(n * k for name, (n, k) in shapes.items() if name in stored) - sum(stored.values())
    int8 = TensorQuant("int8")
    extra = {name: n * k * stored_bits(n, k, int8) - stored[name] for name, (n, k) in shapes.items() if name in stored}
    if sensitivity is None:
        order = [f"layers.{i}.{linear}" for linear in UPGRADE_ORDER for i in reversed(range(cfg.n_layers))]
    else:
        order = sorted((name for name in sensitivity if name.startswith("layers.") and extra.get(name, 0) > 0),
                       key=lambda name: sensitivity[name] / extra[name], reverse=True)
    for name in order:
        if extra[name] <= budget:
            plan[name], budget = int8, budget - extra[name]
    return plan


def stored_bits(n: int, k: int, tq: TensorQuant) -> float:
    """Stored bits per weight of one [N, K] tensor (fp16 scales; the MatMulNBits layout)."""
    return bits_per_weight(tq.kind, n, k, tq.group_size, tq.zero_point, tq.scale_bits if tq.kind == "int4" else 16)


def head_shares_embedding(cfg: ModelConfig, plan: dict[str, TensorQuant]) -> bool:
    """A tied head is stored once, in the embedding's initializer, when both have the same precision."""
    return cfg.tied_embeddings and plan["output"] == plan["tok_embeddings"]


def scheme_name(tq: TensorQuant) -> str:
    """One tensor's scheme as the manifest shows it: 'int8', or e.g. 'int4-g32-fzp-search'."""
    if tq.kind != "int4":
        return tq.kind
    return f"int4-g{tq.group_size}-{ZERO_POINTS[tq.zero_point]}-{tq.method}" + ("-s8" if tq.scale_bits == 8 else "")
