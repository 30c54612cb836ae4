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

The cache may store keys and values in another type than the activations (docs/cache.md): fp16
under fp32 activations (same op names), or int8 codes with an fp16 scale per slot and kv head
(`...Int8Cache` ops, a scale tensor beside each cache tensor, written at the same slot by the same
ops). What the chunk attends to is always read back from what was stored, its own tokens too, so
every runtime agrees on the cache's content.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from ..contract import layer_cache_names
from ..model.config import ModelConfig
from .onnx_builder import ACTIVATIONS, FLOAT, FLOAT16, Activations, Builder

DOMAIN = "mistral_edge"
OP = "WindowedGroupQueryAttention"
SINK_OP = "SinkWindowedGroupQueryAttention"
INT8_SUFFIX = "Int8Cache"
"""The ops of an int8 cache (four more inputs and outputs: the scales) are OP / SINK_OP + this."""
PLAN_INPUTS = ("cos_q", "sin_q", "cos_k", "sin_k", "write_at", "gather_idx", "keep", "bias", "score_split")
SINK_PLAN_INPUTS = ("sink_src", "sink_new")


def op_name(sinks: int, kv_cache: str = "fp32") -> str:
    """The attention op's name: with sinks or not, and an int8 cache or a float one (fp32 or fp16
    caches share a name: the function's types follow its inputs)."""
    return (SINK_OP if sinks else OP) + (INT8_SUFFIX if kv_cache == "int8" else "")


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


class CacheStorage:
    """How the function body stores keys/values in the cache and reads them back (docs/cache.md):
    in the activation type as they are, cast to fp16, or as int8 codes with one fp16 scale per
    slot and kv head (s = fp16(max|x| / 127), 1 for an all-zero row; q = round-half-even(x / s)
    clipped to +-127; read back as q * s), quantized in float32."""

    def __init__(self, b: Builder, kv_cache: str, act: Activations):
        self.b, self.kv_cache, self.act = b, kv_cache, act

    @property
    def parts(self) -> tuple[str, ...]:
        """Suffixes of the cache tensors one kind (key, value) is stored in."""
        return ("", "_scale") if self.kv_cache == "int8" else ("",)

    def store(self, x: str) -> list[str]:
        """What the cache holds for the activation-type rows x [B, Hkv, C, D], one tensor per part."""
        b = self.b
        if self.kv_cache != "int8":
            return [x if self.kv_cache == self.act.name else b.op("Cast", [x], to=FLOAT16)]
        x32 = x if self.act.onnx_type == FLOAT else b.op("Cast", [x], to=FLOAT)
        amax = b.op("ReduceMax", [b.op("Abs", [x32]), b.const([-1])], keepdims=1)  # [B, Hkv, C, 1]
        # the Where in float32, then one Cast: ONNX Runtime's CPU provider has no float16 Where, and
        # around the casts it would insert it drops the fp16 rounding (Cast pairs fp32->fp16->fp32)
        scale = b.op("Cast", [b.op("Where", [b.op("Greater", [amax, b.const(0.0, np.float32)]),
                                             b.op("Div", [amax, b.const(127.0, np.float32)]),
                                             b.const(1.0, np.float32)])], to=FLOAT16)
        codes = b.op("Clip", [b.op("Round", [b.op("Div", [x32, b.op("Cast", [scale], to=FLOAT)])]),
                              b.const(-127.0, np.float32), b.const(127.0, np.float32)])
        return [b.op("Cast", [codes], to=TensorProto.INT8), scale]

    def load(self, stored: list[str]) -> str:
        """The activation-type values of what `store` wrote (an int8 product is exact in float32, and
        rounded once to fp16 either way)."""
        b = self.b
        if self.kv_cache == "int8":
            codes, scale = stored
            if self.act.onnx_type == FLOAT:
                scale = b.op("Cast", [scale], to=FLOAT)
            return b.op("Mul", [b.op("Cast", [codes], to=self.act.onnx_type), scale])
        return stored[0] if self.kv_cache == self.act.name else b.op("Cast", [stored[0]], to=self.act.onnx_type)


def attention_function(cfg: ModelConfig, sinks: int = 0, kv_cache: str | None = None,
                       act: Activations = ACTIVATIONS["fp32"]) -> FunctionProto:
    """Inputs: qkv [B, C, (Hq + 2 Hkv) D] (the fused projection, before RoPE), the layer's cache
    tensors past_<kind> in contract.layer_cache_names order (past_key, past_value [B, Hkv, S, D];
    an int8 cache then past_key_scale, past_value_scale [B, Hkv, S, 1]; with sinks the same over
    Ss slots, prefixed sink_), then the plan tensors. Outputs: output [B, C, Hq D], then
    present_<kind> for each cache tensor, in the same order. `kv_cache` (default: the activation
    type `act`) is how the cache stores keys and values."""
    b = Builder("wgqa_")
    kv_cache = kv_cache or act.name
    store = CacheStorage(b, kv_cache, act)
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    p = AttentionPlan(*PLAN_INPUTS, *(SINK_PLAN_INPUTS if sinks else (None, None)))

    heads = b.op("Transpose", [b.op("Reshape", ["qkv", i64(0, 0, hq + 2 * hkv, d)])], perm=[0, 2, 1, 3])
    q, k, v = b.op("Split", [heads, i64(hq, hkv, hkv)], n_out=3, axis=1)  # [B, H, C, D]
    q = b.op("RotaryEmbedding", [q, p.cos_q, p.sin_q])
    k = b.op("RotaryEmbedding", [k, p.cos_k, p.sin_k])
    scale_idx = {p.gather_idx: None, p.sink_src: None}

    def index(idx: str, part: str) -> str:
        """An index over D for the codes, its first column for a scale ([..., 1])."""
        if part != "_scale":
            return idx
        if scale_idx[idx] is None:
            scale_idx[idx] = b.op("Slice", [idx, i64(0), i64(1), i64(3)])
        return scale_idx[idx]

    def update(kind: str, new: list[str]) -> str:
        """Gather the entries the chunk overwrites (returned, read back), then write the chunk."""
        old = []
        for part, x in zip(store.parts, new):
            past = f"past_{kind}{part}"
            old.append(b.op("GatherElements", [past, index(p.gather_idx, part)], axis=2))
            b.op("TensorScatter", [past, b.op("Where", [p.keep, x, old[-1]]), p.write_at],
                 outputs=[f"present_{kind}{part}"], mode="circular", axis=2)
        return store.load(old)
    new_k, new_v = store.store(k), store.store(v)
    old_k = update("key", new_k)
    old_v = update("value", new_v)
    present = lambda kind: store.load([f"present_{kind}{part}" for part in store.parts])  # noqa: E731

    # queries grouped by kv head: [B, Hkv, G*C, D] (rows g-major), so each kv head is one GEMM
    qg = b.op("Reshape", [q, i64(0, hkv, -1, d)])
    s_cache = b.op("MatMul", [qg, b.op("Transpose", [present("key")], perm=[0, 1, 3, 2])])
    s_old = b.op("MatMul", [qg, b.op("Transpose", [old_k], perm=[0, 1, 3, 2])])
    keys, values = [s_cache, s_old], [present("value"), old_v]
    if sinks:  # a sink slot takes the chunk token of its position, once
        for kind, new in (("key", new_k), ("value", new_v)):
            for part, x in zip(store.parts, new):
                b.op("Where", [p.sink_new, b.op("GatherElements", [x, index(p.sink_src, part)], axis=2),
                               f"past_sink_{kind}{part}"], outputs=[f"present_sink_{kind}{part}"])
        keys.append(b.op("MatMul", [qg, b.op("Transpose", [present("sink_key")], perm=[0, 1, 3, 2])]))
        values.append(present("sink_value"))
    scores = b.op("Add", [b.op("Concat", keys, axis=-1), p.bias])
    probs = b.op("Split", [b.op("Softmax", [scores], axis=-1), p.score_split], n_out=len(keys), axis=-1)
    out = functools.reduce(lambda x, y: b.op("Add", [x, y]), [b.op("MatMul", [pr, val]) for pr, val in zip(probs, values)])
    out = b.op("Transpose", [b.op("Reshape", [out, i64(0, hq, -1, d)])], perm=[0, 2, 1, 3])  # [B, C, Hq, D]
    b.op("Reshape", [out, i64(0, 0, -1)], outputs=["output"])

    caches = [name.split(".")[0] for name in layer_cache_names(0, sinks, kv_cache)]
    return helper.make_function(
        DOMAIN, op_name(sinks, kv_cache), ["qkv", *(f"past_{c}" for c in caches), *p.inputs],
        ["output", *(f"present_{c}" for c in caches)], b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )
