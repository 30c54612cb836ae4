"""`WindowedGroupQueryAttention`: the one attention node of the decoder-step graph.

A model-local ONNX function of standard ops (opset 24). Speed comes from three choices:
- what depends only on positions and valid lengths (slots, the mask) is computed once per step
  in the main graph by `attention_plan` and shared by all layers, not recomputed 30 times;
- attention reads only the L filled slots (L = min(W, tokens seen)): before the cache wraps,
  a decode step no longer streams the empty rest of the W slots;
- keys are never concatenated: scores against the cache and against the C entries the chunk
  overwrote are (a small concat), so no step copies the cache.
Order of work, so that past and present can share one buffer: (1) gather the entries the chunk
is about to overwrite, (2) scatter the chunk with TensorScatter (circular, slot = p mod W;
padding writes back the old entry), (3) attend over the updated slots plus the gathered entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, helper

from .onnx_builder import Builder

DOMAIN = "mistral_edge"
OP = "WindowedGroupQueryAttention"
NEG = -1.0e30  # finite, so a query with no visible key (padding) gives no NaN


@dataclass(frozen=True)
class AttentionPlan:
    """Per-step tensors shared by every layer (names in the main graph)."""

    write_at: str  # [B] slot of the chunk's first token
    gather_idx: str  # [B, Hkv, C, D] slots the chunk overwrites
    keep: str  # [B, 1, C, 1] real (not padding) chunk tokens
    bias: str  # [B, 1, G*C, L+C] additive mask over (filled cache slots, overwritten entries)
    n_slots: str  # [1] L = filled slots (min(W, longest sequence)): attention reads only those


def attention_plan(b: Builder, positions: str, valid_lens: str, n_chunk: str, n_heads: int, n_kv_heads: int,
                   head_dim: int, window: int) -> AttentionPlan:
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    w = b.const(window)
    j = b.op("Range", [b.const(0), n_chunk, b.const(1)])  # [C]
    qpos = b.op("Add", [b.op("Unsqueeze", [positions, i64(1)]), j])  # [B, C]
    is_valid = b.op("Less", [j, b.op("Unsqueeze", [valid_lens, i64(1)])])  # [B, C]
    slots = b.op("Unsqueeze", [b.op("Mod", [qpos, w]), i64(1, 3)])  # [B, 1, C, 1]
    bsz = b.op("Shape", [positions])
    idx = b.op("Expand", [slots, b.op("Concat", [bsz, i64(n_kv_heads), b.op("Shape", [j]), i64(head_dim)], axis=0)])
    keep = b.op("Unsqueeze", [is_valid, i64(1, 3)])
    write_at = b.op("Mod", [positions, w])
    seen = b.op("Add", [positions, valid_lens])  # [B]
    last = b.op("Unsqueeze", [b.op("Sub", [seen, b.const(1)]), i64(1)])  # [B, 1]
    n_slots = b.op("Min", [b.op("ReduceMax", [seen], keepdims=1), b.const([window])])  # [1]
    slot_ids = b.op("Range", [b.const(0), b.op("Squeeze", [n_slots, i64(0)]), b.const(1)])
    p_cache = b.op("Sub", [last, b.op("Mod", [b.op("Sub", [last, slot_ids]), w])])  # [B, L]
    p_old = b.op("Where", [is_valid, b.op("Sub", [qpos, w]), b.const(-1)])  # [B, C]
    kpos = b.op("Unsqueeze", [b.op("Concat", [p_cache, p_old], axis=1), i64(1)])  # [B, 1, L+C]
    qcol = b.op("Unsqueeze", [qpos, i64(2)])  # [B, C, 1]
    visible = b.op("And", [b.op("And", [b.op("GreaterOrEqual", [kpos, b.const(0)]),
                                        b.op("LessOrEqual", [kpos, qcol])]),
                           b.op("Greater", [kpos, b.op("Sub", [qcol, w])])])
    bias = b.op("Where", [visible, b.const(0.0, np.float32), b.const(NEG, np.float32)])  # [B, C, L+C]
    bias = b.op("Tile", [b.op("Unsqueeze", [bias, i64(1)]), i64(1, 1, n_heads // n_kv_heads, 1)])  # query rows g-major
    return AttentionPlan(write_at, idx, keep, bias, n_slots)


def attention_function(n_heads: int, n_kv_heads: int, head_dim: int) -> FunctionProto:
    b = Builder("wgqa_")
    q, k, v, past_k, past_v = "query", "key", "value", "past_key", "past_value"
    write_at, idx, keep, bias, n_slots = "write_at", "gather_idx", "keep", "bias", "n_slots"
    g, d, hkv = n_heads // n_kv_heads, head_dim, n_kv_heads
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731

    def heads_first(x):  # [B, C, Hkv*D] -> [B, Hkv, C, D]
        return b.op("Transpose", [b.op("Reshape", [x, i64(0, 0, hkv, d)])], perm=[0, 2, 1, 3])

    def update(past, new, present_name):
        old = b.op("GatherElements", [past, idx], axis=2)
        b.op("TensorScatter", [past, b.op("Where", [keep, new, old]), write_at], outputs=[present_name],
             mode="circular", axis=2)
        return old
    old_k = update(past_k, heads_first(k), "present_key")
    old_v = update(past_v, heads_first(v), "present_value")

    # queries grouped by kv head: [B, Hkv, G*C, D] (rows g-major), so each kv head is one GEMM
    q4 = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [q, i64(0, 0, hkv, g, d)])], perm=[0, 2, 3, 1, 4]),
                          i64(0, 0, -1, d)])
    scale = b.const(1.0 / float(np.sqrt(d)), np.float32)
    filled = [i64(0), n_slots, i64(2)]
    k_cache = b.op("Slice", ["present_key"] + filled)
    v_cache = b.op("Slice", ["present_value"] + filled)
    s_cache = b.op("MatMul", [q4, b.op("Transpose", [k_cache], perm=[0, 1, 3, 2])])
    s_old = b.op("MatMul", [q4, b.op("Transpose", [old_k], perm=[0, 1, 3, 2])])
    scores = b.op("Add", [b.op("Mul", [b.op("Concat", [s_cache, s_old], axis=-1), scale]), bias])
    p_cache, p_old = b.op("Split", [b.op("Softmax", [scores], axis=-1), b.op("Concat", [
        n_slots, b.op("Shape", [old_k], start=2, end=3)], axis=0)], n_out=2, axis=-1)
    out = b.op("Add", [b.op("MatMul", [p_cache, v_cache]), b.op("MatMul", [p_old, old_v])])
    out = b.op("Transpose", [b.op("Reshape", [out, i64(0, 0, g, -1, d)])], perm=[0, 3, 1, 2, 4])
    b.op("Reshape", [out, i64(0, 0, -1)], outputs=["output"])

    return helper.make_function(
        DOMAIN, OP, [q, k, v, past_k, past_v, write_at, idx, keep, bias, n_slots], ["output", "present_key", "present_value"],
        b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )
