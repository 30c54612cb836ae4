"""`WindowedGroupQueryAttention`: the one attention node of each decoder layer.

A model-local ONNX function of standard ops (opset 24), so any ONNX runtime executes it. It takes
the fused QKV projection, applies RoPE, updates the rolling cache and attends. Speed comes from:
- what depends only on positions and valid lengths (RoPE tables, slots, the mask, split sizes) is
  computed once per step in the main graph by `attention_plan` and shared by all layers;
- the softmax scale is folded into the query's RoPE tables, so no layer multiplies scores;
- the cache input may hold S <= W slots (a runtime grows it up to W as the sequence does, see
  docs/graph-contract.md), and attention reads all S in place: no per-step slice or copy;
- keys are never concatenated: scores against the cache and against the C entries the chunk
  overwrote are (a small concat), so no step copies the cache.
Order of work, so that past and present can share one buffer: (1) gather the entries the chunk
is about to overwrite, (2) scatter the chunk with TensorScatter (circular, slot = p mod W;
padding writes back the old entry), (3) attend over the updated slots plus the gathered entries.
Every read of the old cache happens before the write by data dependency, never by node order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from ..model.config import ModelConfig
from .onnx_builder import FLOAT, Activations, Builder

DOMAIN = "mistral_edge"
OP = "WindowedGroupQueryAttention"
PLAN_INPUTS = ("cos_q", "sin_q", "cos_k", "sin_k", "write_at", "gather_idx", "keep", "bias", "score_split")


@dataclass(frozen=True)
class AttentionPlan:
    """Per-step tensors shared by every layer (names in the main graph), in PLAN_INPUTS order."""

    cos_q: str  # [B, C, D/2] RoPE tables of the chunk's positions, times 1/sqrt(D) for queries
    sin_q: str
    cos_k: str  # [B, C, D/2] the same tables unscaled, for keys
    sin_k: str
    write_at: str  # [B] slot of the chunk's first token
    gather_idx: str  # [B, Hkv, C, D] slots the chunk overwrites
    keep: str  # [B, 1, C, 1] real (not padding) chunk tokens
    bias: str  # [B, 1, G*C, S+C] additive mask over (cache slots, overwritten entries)
    score_split: str  # [2] = (S, C)

    @property
    def inputs(self) -> list[str]:
        return [getattr(self, name) for name in PLAN_INPUTS]


def mask_value(act: Activations) -> float:
    """The additive bias of a hidden key: half the type's lowest finite value, so a masked score
    stays finite (a padding query, which sees no key, gets no NaN; -1e30 would be -inf in fp16)
    and far below any real score."""
    return float(np.finfo(act.np_type).min) / 2


def attention_plan(b: Builder, cfg: ModelConfig, window: int, cache: str, act: Activations) -> AttentionPlan:
    """Build the per-step tensors from the graph inputs `input_ids`, `positions`, `valid_lens` and
    the slot count S of the cache input `cache`. Tables and mask are computed in float32 (fp16
    cannot hold positions past 2048 exactly) and cast once to the activation type."""
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    as_act = lambda x: x if act.onnx_type == FLOAT else b.op("Cast", [x], to=act.onnx_type)  # noqa: E731
    positions, valid_lens = "positions", "valid_lens"
    w = b.const(window)
    c_dim = b.op("Shape", ["input_ids"], start=1, end=2)  # [1] = C
    j = b.op("Range", [b.const(0), b.op("Squeeze", [c_dim, i64(0)]), b.const(1)])  # [C]
    qpos = b.op("Add", [b.op("Unsqueeze", [positions, i64(1)]), j])  # [B, C]

    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    freqs = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [qpos], to=TensorProto.FLOAT), i64(2)]),
                         b.init("rope.inv_freq", inv_freq.astype(np.float32))])  # [B, C, D/2]
    cos, sin = b.op("Cos", [freqs]), b.op("Sin", [freqs])
    scale = b.const(1.0 / float(np.sqrt(d)), np.float32)
    cos_q, sin_q = as_act(b.op("Mul", [cos, scale])), as_act(b.op("Mul", [sin, scale]))
    cos_k, sin_k = as_act(cos), as_act(sin)

    is_valid = b.op("Less", [j, b.op("Unsqueeze", [valid_lens, i64(1)])])  # [B, C]
    slots = b.op("Unsqueeze", [b.op("Mod", [qpos, w]), i64(1, 3)])  # [B, 1, C, 1]
    bsz = b.op("Shape", [positions])
    idx = b.op("Expand", [slots, b.op("Concat", [bsz, i64(cfg.n_kv_heads), c_dim, i64(d)], axis=0)])
    keep = b.op("Unsqueeze", [is_valid, i64(1, 3)])
    write_at = b.op("Mod", [positions, w])
    seen = b.op("Add", [positions, valid_lens])  # [B]
    last = b.op("Unsqueeze", [b.op("Sub", [seen, b.const(1)]), i64(1)])  # [B, 1]
    n_slots = b.op("Shape", [cache], start=2, end=3)  # [1] = S
    slot_ids = b.op("Range", [b.const(0), b.op("Squeeze", [n_slots, i64(0)]), b.const(1)])
    p_cache = b.op("Sub", [last, b.op("Mod", [b.op("Sub", [last, slot_ids]), w])])  # [B, S]: < 0 is empty
    p_old = b.op("Where", [is_valid, b.op("Sub", [qpos, w]), b.const(-1)])  # [B, C]
    kpos = b.op("Unsqueeze", [b.op("Concat", [p_cache, p_old], axis=1), i64(1)])  # [B, 1, S+C]
    qcol = b.op("Unsqueeze", [qpos, i64(2)])  # [B, C, 1]
    visible = b.op("And", [b.op("And", [b.op("GreaterOrEqual", [kpos, b.const(0)]),
                                        b.op("LessOrEqual", [kpos, qcol])]),
                           b.op("Greater", [kpos, b.op("Sub", [qcol, w])])])
    bias = b.op("Where", [visible, b.const(0.0, np.float32), b.const(mask_value(act), np.float32)])
    bias = as_act(bias)  # [B, C, S+C]
    group = cfg.n_heads // cfg.n_kv_heads
    bias = b.op("Tile", [b.op("Unsqueeze", [bias, i64(1)]), i64(1, 1, group, 1)])  # query rows g-major
    split = b.op("Concat", [n_slots, c_dim], axis=0)
    return AttentionPlan(cos_q, sin_q, cos_k, sin_k, write_at, idx, keep, bias, split)


def attention_function(cfg: ModelConfig) -> FunctionProto:
    """Inputs: qkv [B, C, (Hq + 2 Hkv) D] (the fused projection, before RoPE), past_key,
    past_value [B, Hkv, S, D], then the plan tensors. Outputs: output [B, C, Hq D], present_key,
    present_value."""
    b = Builder("wgqa_")
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    p = AttentionPlan(*PLAN_INPUTS)

    heads = b.op("Transpose", [b.op("Reshape", ["qkv", i64(0, 0, hq + 2 * hkv, d)])], perm=[0, 2, 1, 3])
    q, k, v = b.op("Split", [heads, i64(hq, hkv, hkv)], n_out=3, axis=1)  # [B, H, C, D]
    q = b.op("RotaryEmbedding", [q, p.cos_q, p.sin_q])
    k = b.op("RotaryEmbedding", [k, p.cos_k, p.sin_k])

    def update(past: str, new: str, present: str) -> str:
        old = b.op("GatherElements", [past, p.gather_idx], axis=2)
        b.op("TensorScatter", [past, b.op("Where", [p.keep, new, old]), p.write_at], outputs=[present],
             mode="circular", axis=2)
        return old
    old_k = update("past_key", k, "present_key")
    old_v = update("past_value", v, "present_value")

    # queries grouped by kv head: [B, Hkv, G*C, D] (rows g-major), so each kv head is one GEMM
    qg = b.op("Reshape", [q, i64(0, hkv, -1, d)])
    s_cache = b.op("MatMul", [qg, b.op("Transpose", ["present_key"], perm=[0, 1, 3, 2])])
    s_old = b.op("MatMul", [qg, b.op("Transpose", [old_k], perm=[0, 1, 3, 2])])
    scores = b.op("Add", [b.op("Concat", [s_cache, s_old], axis=-1), p.bias])
    pr_cache, pr_old = b.op("Split", [b.op("Softmax", [scores], axis=-1), p.score_split], n_out=2, axis=-1)
    out = b.op("Add", [b.op("MatMul", [pr_cache, "present_value"]), b.op("MatMul", [pr_old, old_v])])
    out = b.op("Transpose", [b.op("Reshape", [out, i64(0, hq, -1, d)])], perm=[0, 2, 1, 3])  # [B, C, Hq, D]
    b.op("Reshape", [out, i64(0, 0, -1)], outputs=["output"])

    return helper.make_function(
        DOMAIN, OP, ["qkv", "past_key", "past_value", *PLAN_INPUTS], ["output", "present_key", "present_value"],
        b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )
