"""The per-tensor quantization plan: which precision each exported tensor gets.

One home for the rule every stage follows (exporter, budget, bundle manifest, compare):
a spec (what the user asked for) becomes a `TensorQuant` per planned tensor, the
tied-head rule says when the head shares the embedding's storage, and `scheme_name`
is the text a manifest shows for one tensor's scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig
from .spec import DEFAULT_GROUP_SIZE, ZERO_POINTS, QuantSpec

if TYPE_CHECKING:
    from .int4 import Int4Weight

LAYER_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
"""The exported (fused) linears of each layer: QKV and gate/up are one matrix each."""


@dataclass(frozen=True)
class TensorQuant:
    kind: str  # "fp32" | "fp16" | "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE
    zero_point: str = "int"  # int4: "none" (symmetric), "int" or "float"
    method: str = "rtn"
    act_scale: torch.Tensor | None = field(default=None, compare=False, repr=False)
    """int4: typical |x| per input channel from calibration; weights the rounding error (quantize_int4)."""
    codes: Int4Weight | None = field(default=None, compare=False, repr=False)
    """int4: an Int4Weight already chosen by calibration (GPTQ, quantize/gptq.py): exported as it is."""


def quant_plan(cfg: ModelConfig, spec: QuantSpec) -> dict[str, TensorQuant]:
    """Precision per planned tensor: 'layers.{i}.{linear}' for LAYER_LINEARS, 'tok_embeddings', 'output'."""
    def tq(kind: str, name: str) -> TensorQuant:
        return TensorQuant(kind, spec.group_size or DEFAULT_GROUP_SIZE, spec.zero_point_of(name), spec.method or "rtn")

    plan = {name: tq(spec.linear, name) for name in (f"layers.{i}.{n}" for i in range(cfg.n_layers)
                                                       for n in LAYER_LINEARS)}
    plan["tok_embeddings"] = tq(spec.embedding, "tok_embeddings")
    plan["output"] = tq(spec.head, "output")
    return plan


def head_shares_embedding(cfg: ModelConfig, plan: dict[str, TensorQuant]) -> bool:
    """A tied head is stored once, in the embedding's initializer, when both have the same precision."""
    return cfg.tied_embeddings and plan["output"] == plan["tok_embeddings"]


def scheme_name(tq: TensorQuant) -> str:
    """One tensor's scheme as the manifest shows it: 'int8', or e.g. 'int4-g32-fzp-search'."""
    if tq.kind != "int4":
        return tq.kind
    return f"int4-g{tq.group_size}-{ZERO_POINTS[tq.zero_point]}-{tq.method}"
