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

With attention sinks (S > 0, docs/cache.md) the op is `SinkWindowedGroupQueryAttention`: two more
cache tensors of S slots hold positions 0..S-1 for ever (written by a Where while p < S), the ring
keeps the last W - S positions, and one softmax runs over (ring, overwritten entries, sinks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from ..model.config import ModelConfig
from .onnx_builder import FLOAT, Activations, Builder

DOMAIN = "mistral_edge"
OP = "WindowedGroupQueryAttention"
SINK_OP = "SinkWindowedGroupQueryAttention"
PLAN_INPUTS = ("cos_q", "sin_q", "cos_k", "sin_k", "write_at", "gather_idx", "keep", "bias", "score_split")
SINK_PLAN_INPUTS = ("sink_src", "sink_new")


def op_name(sinks: int) -> str:
    return SINK_OP if sinks else OP


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
    bias: str  # [B, 1, G*C, S+C(+Ss)] additive mask over (ring slots, overwritten entries(, sinks))
    score_split: str  # [2] = (S, C), or [3] = (S, C, Ss) with sinks
    sink_src: str | None = None  # [B, Hkv, Ss, D] chunk index each sink slot would take (clamped)
    sink_new: str | None = None  # [B, 1, Ss, 1] sink slots this chunk writes

    @property
    def inputs(self) -> list[str]:
        names = PLAN_INPUTS + (SINK_PLAN_INPUTS if self.sink_src else ())
        return [getattr(self, name) for name in names]


def mask_value(act: Activations) -> float:
    """The additive bias of a hidden key: half the type's lowest finite value, so a masked score
    stays finite (a padding query, which sees no key, gets no NaN; -1e30 would be -inf in fp16)
    and far below any real score."""
    return float(np.finfo(act.np_type).min) / 2


def attention_plan(b: Builder, cfg: ModelConfig, window: int, cache: str, act: Activations,
                   sinks: int = 0) -> AttentionPlan:
    """Build the per-step tensors from the graph inputs `input_ids`, `positions`, `valid_lens` and
    the slot count S of the cache input `cache` (the ring of W - sinks slots). Tables and mask are
    computed in float32 (fp16 cannot hold positions past 2048 exactly) and cast once to the
    activation type."""
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    as_act = lambda x: x if act.onnx_type == FLOAT else b.op("Cast", [x], to=act.onnx_type)  # noqa: E731
    positions, valid_lens = "positions", "valid_lens"
    w = b.const(window - sinks)  # the ring's period
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
    visible = b.op("And", [b.op("And", [b.op("GreaterOrEqual", [kpos, b.const(sinks)]),  # p < S: a sink slot's
                                        b.op("LessOrEqual", [kpos, qcol])]),
                           b.op("Greater", [kpos, b.op("Sub", [qcol, w])])])
    split = b.op("Concat", [n_slots, c_dim], axis=0)
    sink_src = sink_new = None
    if sinks:
        sink_ids = b.const(list(range(sinks)))  # [Ss]: sink slot s holds position s
        visible = b.op("Concat", [visible, b.op("LessOrEqual", [sink_ids, qcol])], axis=2)
        split = b.op("Concat", [split, i64(sinks)], axis=0)
        src = b.op("Sub", [sink_ids, b.op("Unsqueeze", [positions, i64(1)])])  # [B, Ss] chunk index
        sink_new = b.op("Unsqueeze", [b.op("And", [b.op("GreaterOrEqual", [src, b.const(0)]),
                                                    b.op("Less", [src, b.op("Unsqueeze", [valid_lens, i64(1)])])]),
                                      i64(1, 3)])
        src = b.op("Unsqueeze", [b.op("Clip", [src, b.const(0), b.op("Sub", [b.op("Squeeze", [c_dim, i64(0)]),
                                                                              b.const(1)])]), i64(1, 3)])
        sink_src = b.op("Expand", [src, b.op("Concat", [bsz, i64(cfg.n_kv_heads, sinks, d)], axis=0)])
    bias = b.op("Where", [visible, b.const(0.0, np.float32), b.const(mask_value(act), np.float32)])
    bias = as_act(bias)  # [B, C, S+C(+Ss)]
    group = cfg.n_heads // cfg.n_kv_heads
    bias = b.op("Tile", [b.op("Unsqueeze", [bias, i64(1)]), i64(1, 1, group, 1)])  # query rows g-major
    return AttentionPlan(cos_q, sin_q, cos_k, sin_k, write_at, idx, keep, bias, split, sink_src, sink_new)


def attention_function(cfg: ModelConfig, sinks: int = 0) -> FunctionProto:
    """Inputs: qkv [B, C, (Hq + 2 Hkv) D] (the fused projection, before RoPE), past_key,
    past_value [B, Hkv, S, D] (with sinks, then past_sink_key, past_sink_value [B, Hkv, Ss, D]),
    then the plan tensors. Outputs: output [B, C, Hq D], present_key, present_value (and
    present_sink_key, present_sink_value)."""
    b = Builder("wgqa_")
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    p = AttentionPlan(*PLAN_INPUTS, *(SINK_PLAN_INPUTS if sinks else (None, None)))

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
    keys, values = [s_cache, s_old], ["present_value", old_v]
    if sinks:  # a sink slot takes the chunk token of its position, once
        for kind, new in (("key", k), ("value", v)):
            b.op("Where", [p.sink_new, b.op("GatherElements", [new, p.sink_src], axis=2), f"past_sink_{kind}"],
                 outputs=[f"present_sink_{kind}"])
        keys.append(b.op("MatMul", [qg, b.op("Transpose", ["present_sink_key"], perm=[0, 1, 3, 2])]))
        values.append("present_sink_value")
    scores = b.op("Add", [b.op("Concat", keys, axis=-1), p.bias])
    probs = b.op("Split", [b.op("Softmax", [scores], axis=-1), p.score_split], n_out=len(keys), axis=-1)
    out = functools.reduce(lambda x, y: b.op("Add", [x, y]), [b.op("MatMul", [pr, val]) for pr, val in zip(probs, values)])
    out = b.op("Transpose", [b.op("Reshape", [out, i64(0, hq, -1, d)])], perm=[0, 2, 1, 3])  # [B, C, Hq, D]
    b.op("Reshape", [out, i64(0, 0, -1)], outputs=["output"])

    caches = ["key", "value"] + (["sink_key", "sink_value"] if sinks else [])
    return helper.make_function(
        DOMAIN, op_name(sinks), ["qkv", *(f"past_{c}" for c in caches), *p.inputs],
        ["output", *(f"present_{c}" for c in caches)], b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )
