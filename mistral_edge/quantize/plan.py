"""The per-tensor quantization plan: which precision each exported tensor gets.

One home for the rule every stage follows (exporter, budget, bundle manifest, compare):
a spec (what the user asked for) becomes a `TensorQuant` per planned tensor, the
tied-head rule says when the head shares the embedding's storage, and `scheme_name`
is the text a manifest shows for one tensor's scheme.

A mixed int4 spec (`mzp`) is planned within a bit budget: every int4 tensor has float zero points
and 8-bit scales, and the whole model stays within TARGET_BITS stored bits per weight. The default
(`int4`, g32) moves layer linears to int8 in UPGRADE_ORDER, the order of their measured KL per added
bit. `int4-g16` gives each planned tensor (the layer linears, and the head and an untied embedding
unless the user fixed them) one rung of RUNGS (int4 in groups of 128, 64, 32 or 16, or int8), most
estimated KL saved per added stored bit first: a tensor's weights x its role's measured KL per
weight at g32 (ROLE_SENSITIVITY, doubled in the first and last eighth of the layers) x the rung's
squared error relative to g32's (RUNG_ERROR): on Gaussian-like weights the relative error is a
property of the rung, the sensitivity one of the role and the depth (docs/quantization.md). Either
plan reads no text and no weights: it is the same, and instant, for any model of a given shape.
With calibration text the int8 upgrades follow a measured sensitivity instead
(`quant_plan(..., sensitivity)`, from calibrate.calibrated_plan), from the spec's group size.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig
from .spec import DEFAULT_GROUP_SIZE, ZERO_POINTS, QuantSpec, bits_per_weight, budgeted

if TYPE_CHECKING:
    from .int4 import Int4Weight

LAYER_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
"""The exported (fused) linears of each layer: QKV and gate/up are one matrix each."""
TARGET_BITS = 6.0
"""Stored bits per weight over the whole model that a mixed int4 plan spends (issue 12's budget)."""
INT4_SCALE_BITS = 8
"""A mixed plan's int4 scales: 8-bit codes on a per-row fp16 scale, zero points in sixteenths (4 + 16 / G
bits per weight: 4.5 at g32 against 5.0 with fp16 ones; docs/quantization.md)."""
UPGRADE_ORDER = ("attention.wqkv", "feed_forward.w2")
"""The default (`int4`, g32) plan's int8 upgrades, most KL saved per added bit first (measured on the
off-grid SmolLM2, docs/quantization.md: wqkv, which holds the value rows, then w2); within one, the
last layer first."""
LADDER_GROUP_SIZE = 16
"""`int4-g16` (mixed zero points): the plan picks each tensor's rung of RUNGS, groups down to 16. Not the
default: a g16 fit breaks a grid the weights already sit on (the demo's Q4_1 layers: +2.05% against
+0.48%), and g16 tensors are resident at 8 bits per weight in an fp32 graph (docs/quantization.md)."""
RUNGS: tuple[int | str, ...] = (128, 64, 32, 16, "int8")
"""A mixed plan's choices per tensor: int4 group sizes (no larger than the tensor's K), then int8."""
RUNG_ERROR: dict[int | str, float] = {128: 1.61, 64: 1.34, 32: 1.0, 16: 0.665, "int8": 0.0067}
"""Squared weight error of each rung relative to int4 g32's (search, float zero points, 8-bit scales),
measured on the off-grid SmolLM2: the same for every one of its tensors within 3% (docs/quantization.md)."""
ROLE_SENSITIVITY = {"tok_embeddings": 0.2, "output": 1.5, "attention.wqkv": 7.9, "attention.wo": 0.9,
                    "feed_forward.w13": 1.5, "feed_forward.w2": 2.5}
"""Next-token KL per million weights (x 1e-3) that a role adds as int4 g32, measured one role at a time on
the off-grid SmolLM2 (docs/quantization.md; wqkv holds the value rows, 14x w2's per weight). Only the
ratios matter; within a role and depth, ties go to the last layer first."""
EDGE_SHARE, EDGE_FACTOR = 1 / 8, 2.0
"""The first and last eighth of the layers count double: measured on the off-grid SmolLM2 (the last
layers' w13 cost the most per weight; docs/quantization.md), and the layers llama.cpp's k-quant mixes
also give more bits."""


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
    `sensitivity` (a mixed int4 spec only): the measured KL each layer linear adds as int4 g32
    (calibrate.int4_sensitivity); the int8 upgrades then follow it (the head int8, the embedding int4 g32)."""
    def tq(kind: str, name: str) -> TensorQuant:
        return int4_quant(spec, name) if kind == "int4" else TensorQuant(kind)

    plan = {name: tq(spec.linear, name) for name in (f"layers.{i}.{n}" for i in range(cfg.n_layers)
                                                     for n in LAYER_LINEARS)}
    plan["output"] = tq(spec.head or "int8", "output")
    plan["tok_embeddings"] = tq(spec.embedding or (plan["output"].kind if cfg.tied_embeddings else spec.linear),
                                "tok_embeddings")
    if not budgeted(spec):
        return plan
    shapes = tensor_shapes(cfg)
    if sensitivity is not None:  # per weight, so that the moves compare as KL per bit
        return _choose(cfg, plan, {name: kl / (shapes[name][0] * shapes[name][1]) for name, kl in sensitivity.items()
                                   if name in plan and name.startswith("layers.")}, (spec.group_size, "int8"))
    if spec.group_size != LADDER_GROUP_SIZE:  # int8 upgrades in UPGRADE_ORDER, from the spec's group size
        ranks = {f"layers.{i}.{linear}": 1e3 ** -rank for rank, linear in enumerate(UPGRADE_ORDER)
                 for i in range(cfg.n_layers)}
        return _choose(cfg, plan, ranks, (spec.group_size, "int8"))
    free = [name for name in plan if name.startswith("layers.")]
    if spec.head is None and (spec.embedding is None or not cfg.tied_embeddings):
        free.append("output")  # a tied embedding follows it (one table serves both)
    if spec.embedding is None and not cfg.tied_embeddings:
        free.append("tok_embeddings")
    return _choose(cfg, plan, {name: prior_sensitivity(cfg, name) for name in free}, RUNGS)


def prior_sensitivity(cfg: ModelConfig, name: str) -> float:
    """The data-free estimate of a planned tensor's KL per weight at int4 g32: its role's, doubled in
    the first and last EDGE_SHARE of the layers; a tied head also stands for the embedding."""
    if not name.startswith("layers."):
        tied = name == "output" and cfg.tied_embeddings
        return ROLE_SENSITIVITY[name] + (ROLE_SENSITIVITY["tok_embeddings"] if tied else 0)
    _, layer, role = name.split(".", 2)
    edge = max(1, int(cfg.n_layers * EDGE_SHARE))
    return ROLE_SENSITIVITY[role] * (EDGE_FACTOR if not edge <= int(layer) < cfg.n_layers - edge else 1.0)


def int4_quant(spec: QuantSpec, name: str) -> TensorQuant:
    """The int4 scheme the spec gives the planned tensor `name`."""
    return TensorQuant("int4", spec.group_size or DEFAULT_GROUP_SIZE, spec.zero_point_of(name), spec.method or "rtn",
                       INT4_SCALE_BITS if spec.zero_point == "mixed" else 16)


def _choose(cfg: ModelConfig, plan: dict[str, TensorQuant], sensitivity: Mapping[str, float],
            rungs: tuple[int | str, ...]) -> dict[str, TensorQuant]:
    """Each tensor of `sensitivity` (KL per weight at g32, up to a common factor) on one of `rungs`:
    all start on their cheapest rung, then the move with the most estimated KL saved per added bit
    that fits goes first, while the model stays within TARGET_BITS. A tied embedding follows the head."""
    shapes, int4 = tensor_shapes(cfg), next(tq for tq in plan.values() if tq.kind == "int4")

    def quant(rung: int | str) -> TensorQuant:
        return TensorQuant("int8") if rung == "int8" else replace(int4, group_size=rung)

    choices = {name: sorted(((shapes[name][0] * shapes[name][1] * stored_bits(*shapes[name], quant(r)), r)
                             for r in rungs if r == "int8" or r <= shapes[name][1]), key=lambda c: c[0])
               for name in sensitivity}
    at = {name: 0 for name in choices}  # index of each tensor's current rung in its choices
    for name in choices:
        plan[name] = quant(choices[name][0][1])
    tied = head_shares_embedding(cfg, plan) or (cfg.tied_embeddings and "output" in choices)
    if tied:
        plan["tok_embeddings"] = plan["output"]
    counted = [name for name in shapes if not (tied and name == "output")]
    budget = TARGET_BITS * sum(n * k for name, (n, k) in shapes.items() if name in counted) - sum(
        n * k * stored_bits(n, k, plan[name]) for name, (n, k) in shapes.items() if name in counted)
    layer = {name: int(name.split(".")[1]) if name.startswith("layers.") else cfg.n_layers for name in choices}

    def kl(name: str, i: int) -> float:
        return sensitivity[name] * shapes[name][0] * shapes[name][1] * RUNG_ERROR.get(choices[name][i][1], 1.0)

    def best_move(name: str) -> tuple | None:
        """The tensor's move that fits with the most KL saved per bit (ties: the last layer first)."""
        i, here = at[name], choices[name][at[name]][0]
        moves = [((kl(name, i) - kl(name, j)) / (bits - here), layer[name], name, j)
                 for j, (bits, _) in enumerate(choices[name])
                 if j > i and 0 < bits - here <= budget and kl(name, j) < kl(name, i)]
        return max(moves, default=None)

    # lazy greedy: the budget only shrinks, so a tensor's best move can only get worse; re-checked when popped
    heap = [(-move[0], -move[1], name, move[3], at[name]) for name in choices if (move := best_move(name))]
    heapq.heapify(heap)
    while heap:
        _, _, name, j, frm = heapq.heappop(heap)
        if frm != at[name]:
            continue
        added = choices[name][j][0] - choices[name][frm][0]
        if added <= budget:
            budget -= added
            at[name], plan[name] = j, quant(choices[name][j][1])
            if tied and name == "output":
                plan["tok_embeddings"] = plan["output"]
        if move := best_move(name):
            heapq.heappush(heap, (-move[0], -move[1], name, move[3], at[name]))
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
