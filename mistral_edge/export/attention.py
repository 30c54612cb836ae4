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

With a pool of P slots (docs/cache.md "A pool of the most-attended keys") the op is
`Pool...`-prefixed (`PoolSinkWindowedGroupQueryAttention` with sinks too): the ring is W - S - P
slots, every ring slot records the attention mass its key has received (`mass`), and the pool's
tensors hold P keys and values per kv head, their masses and positions (+ 1: 0 is empty). Before
attending, the C entries the chunk overwrites compete with the pool's by mean mass per query
(TopK, ties to the pool); each losing pool slot takes a winner (paired in slot order by CumSum
ranks), and a winner's ring copy is masked for this chunk. The softmax runs over (ring,
overwritten entries, sinks, pool), and its probabilities, summed per key over the real queries,
are added to the masses.

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
POOL_PREFIX = "Pool"
INT8_SUFFIX = "Int8Cache"
"""The ops of an int8 cache (four more inputs and outputs: the scales) are OP / SINK_OP + this."""
PLAN_INPUTS = ("cos_q", "sin_q", "cos_k", "sin_k", "write_at", "gather_idx", "keep", "bias", "score_split")
SINK_PLAN_INPUTS = ("sink_src", "sink_new")
POOL_PLAN_INPUTS = ("query_weight", "old_pos", "age_base", "written")


def op_name(sinks: int, kv_cache: str = "fp32", pool: int = 0) -> str:
    """The attention op's name: with a pool or not, with sinks or not, and an int8 cache or a float
    one (fp32 or fp16 caches share a name: the function's types follow its inputs)."""
    return (POOL_PREFIX if pool else "") + (SINK_OP if sinks else OP) + (INT8_SUFFIX if kv_cache == "int8" else "")


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
    score_split: str  # (S, C), then Ss with sinks, then P with a pool
    sink_src: str | None = None  # [B, Hkv, Ss, D] chunk index each sink slot would take (clamped)
    sink_new: str | None = None  # [B, 1, Ss, 1] sink slots this chunk writes
    query_weight: str | None = None  # [B, 1, 1, G*C] float32: 1 for a real query row, 0 for padding
    old_pos: str | None = None  # [B, 1, C, 1] position + 1 of each overwritten entry that may enter the pool, else 0
    age_base: str | None = None  # [B, 1, 1, 1] float32 positions + 1: a key at p has been seen by age_base - (p + 1) queries
    written: str | None = None  # [B, 1, S, 1] the ring slots the chunk's real tokens write

    @property
    def inputs(self) -> list[str]:
        names = PLAN_INPUTS + (SINK_PLAN_INPUTS if self.sink_src else ()) + (POOL_PLAN_INPUTS if self.old_pos else ())
        return [getattr(self, name) for name in names]


def mask_value(act: Activations) -> float:
    """The additive bias of a hidden key: half the type's lowest finite value, so a masked score
    stays finite (a padding query, which sees no key, gets no NaN; -1e30 would be -inf in fp16)
    and far below any real score."""
    return float(np.finfo(act.np_type).min) / 2


def attention_plan(b: Builder, cfg: ModelConfig, window: int, cache: str, act: Activations,
                   sinks: int = 0, pool: int = 0) -> AttentionPlan:
    """Build the per-step tensors from the graph inputs `input_ids`, `positions`, `valid_lens` and
    the slot count S of the cache input `cache` (the ring of W - sinks - pool slots). Tables and mask are
    computed in float32 (fp16 cannot hold positions past 2048 exactly) and cast once to the
    activation type."""
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    as_act = lambda x: x if act.onnx_type == FLOAT else b.op("Cast", [x], to=act.onnx_type)  # noqa: E731
    positions, valid_lens = "positions", "valid_lens"
    w = b.const(window - sinks - pool)  # the ring's period
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
    pooled = {}
    if pool:
        split = b.op("Concat", [split, i64(pool)], axis=0)
        rows = b.op("Unsqueeze", [b.op("Cast", [is_valid], to=TensorProto.FLOAT), i64(1, 2)])  # [B, 1, 1, C]
        pooled["query_weight"] = b.op("Tile", [rows, i64(1, 1, 1, group)])
        p_left = b.op("Sub", [qpos, w])  # the position each chunk token pushes out of the ring
        enters = b.op("And", [is_valid, b.op("GreaterOrEqual", [p_left, b.const(sinks)])])  # not a sink's copy
        pooled["old_pos"] = b.op("Unsqueeze", [b.op("Where", [enters, b.op("Add", [p_left, b.const(1)]), b.const(0)]),
                                               i64(1, 3)])
        pooled["age_base"] = b.op("Reshape", [b.op("Cast", [b.op("Add", [positions, b.const(1)])], to=TensorProto.FLOAT),
                                              i64(-1, 1, 1, 1)])
        ahead = b.op("Mod", [b.op("Sub", [slot_ids, b.op("Unsqueeze", [positions, i64(1)])]), w])  # [B, S]
        pooled["written"] = b.op("Unsqueeze", [b.op("Less", [ahead, b.op("Unsqueeze", [valid_lens, i64(1)])]), i64(1, 3)])
    return AttentionPlan(cos_q, sin_q, cos_k, sin_k, write_at, idx, keep, bias, split, sink_src, sink_new, **pooled)


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
                       act: Activations = ACTIVATIONS["fp32"], pool: int = 0) -> FunctionProto:
    """Inputs: qkv [B, C, (Hq + 2 Hkv) D] (the fused projection, before RoPE), the layer's cache
    tensors past_<kind> in contract.layer_cache_names order (past_key, past_value [B, Hkv, S, D];
    an int8 cache then past_key_scale, past_value_scale [B, Hkv, S, 1]; with sinks the same over
    Ss slots, prefixed sink_; with a pool past_mass [B, Hkv, S, 1], the key/value tensors over P
    slots prefixed pool_, past_pool_mass and past_pool_pos [B, Hkv, P, 1]), then the plan tensors.
    Outputs: output [B, C, Hq D], then present_<kind> for each cache tensor, in the same order.
    `kv_cache` (default: the activation type `act`) is how the cache stores keys and values."""
    b = Builder("wgqa_")
    kv_cache = kv_cache or act.name
    store = CacheStorage(b, kv_cache, act)
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    p = AttentionPlan(*PLAN_INPUTS, *(SINK_PLAN_INPUTS if sinks else (None, None)),
                      *(POOL_PLAN_INPUTS if pool else (None, None, None)))

    heads = b.op("Transpose", [b.op("Reshape", ["qkv", i64(0, 0, hq + 2 * hkv, d)])], perm=[0, 2, 1, 3])
    q, k, v = b.op("Split", [heads, i64(hq, hkv, hkv)], n_out=3, axis=1)  # [B, H, C, D]
    q = b.op("RotaryEmbedding", [q, p.cos_q, p.sin_q])
    k = b.op("RotaryEmbedding", [k, p.cos_k, p.sin_k])
    scale_idx = {p.gather_idx: None, p.sink_src: None}

    def index(idx: str, part: str) -> str:
        """An index over D for the codes, its first column for a one-per-slot tensor ([..., 1])."""
        if part == "":
            return idx
        if scale_idx[idx] is None:
            scale_idx[idx] = b.op("Slice", [idx, i64(0), i64(1), i64(3)])
        return scale_idx[idx]

    def update(kind: str, new: list[str]) -> list[str]:
        """Gather the entries the chunk overwrites (returned as stored), then write the chunk."""
        old = []
        for part, x in zip(store.parts, new):
            past = f"past_{kind}{part}"
            old.append(b.op("GatherElements", [past, index(p.gather_idx, part)], axis=2))
            b.op("TensorScatter", [past, b.op("Where", [p.keep, x, old[-1]]), p.write_at],
                 outputs=[f"present_{kind}{part}"], mode="circular", axis=2)
        return old
    new_k, new_v = store.store(k), store.store(v)
    old = {"key": update("key", new_k), "value": update("value", new_v)}
    present = lambda kind: store.load([f"present_{kind}{part}" for part in store.parts])  # noqa: E731

    # queries grouped by kv head: [B, Hkv, G*C, D] (rows g-major), so each kv head is one GEMM
    qg = b.op("Reshape", [q, i64(0, hkv, -1, d)])
    scores_of = lambda keys: b.op("MatMul", [qg, b.op("Transpose", [keys], perm=[0, 1, 3, 2])])  # noqa: E731
    s_old = scores_of(store.load(old["key"]))
    if pool:
        old_mass = b.op("GatherElements", ["past_mass", index(p.gather_idx, "_mass")], axis=2)  # [B, Hkv, C, 1]
        hidden, pool_bias = admit(b, p, old, old_mass, pool, d, act)
        s_old = b.op("Add", [s_old, hidden])
    keys, values = [scores_of(present("key")), s_old], [present("value"), store.load(old["value"])]
    if sinks:  # a sink slot takes the chunk token of its position, once
        for kind, new in (("key", new_k), ("value", new_v)):
            for part, x in zip(store.parts, new):
                b.op("Where", [p.sink_new, b.op("GatherElements", [x, index(p.sink_src, part)], axis=2),
                               f"past_sink_{kind}{part}"], outputs=[f"present_sink_{kind}{part}"])
        keys.append(scores_of(present("sink_key")))
        values.append(present("sink_value"))
    scores = b.op("Add", [b.op("Concat", keys, axis=-1), p.bias])
    if pool:  # no shared mask: every held pool key is older than the ring, so every query sees it
        scores = b.op("Concat", [scores, b.op("Add", [scores_of(present("pool_key")), pool_bias])], axis=-1)
        keys.append(None)
        values.append(present("pool_value"))
    probs = b.op("Split", [b.op("Softmax", [scores], axis=-1), p.score_split], n_out=len(keys), axis=-1)
    out = functools.reduce(lambda x, y: b.op("Add", [x, y]), [b.op("MatMul", [pr, val]) for pr, val in zip(probs, values)])
    out = b.op("Transpose", [b.op("Reshape", [out, i64(0, hq, -1, d)])], perm=[0, 2, 1, 3])  # [B, C, Hq, D]
    b.op("Reshape", [out, i64(0, 0, -1)], outputs=["output"])
    if pool:
        def received(pr: str) -> str:
            """[B, Hkv, slots, 1]: the mass the real queries gave each key of one score group."""
            pr = pr if act.onnx_type == FLOAT else b.op("Cast", [pr], to=FLOAT)
            return b.op("Transpose", [b.op("MatMul", [p.query_weight, pr])], perm=[0, 1, 3, 2])
        b.op("Add", ["admitted_pool_mass", received(probs[-1])], outputs=["present_pool_mass"])
        kept = b.op("Where", [p.written, b.const(0.0, np.float32), "past_mass"])  # the chunk's own keys start at 0
        b.op("Add", [kept, received(probs[0])], outputs=["present_mass"])

    caches = [name.split(".")[0] for name in layer_cache_names(0, sinks, kv_cache, pool)]
    return helper.make_function(
        DOMAIN, op_name(sinks, kv_cache, pool), ["qkv", *(f"past_{c}" for c in caches), *p.inputs],
        ["output", *(f"present_{c}" for c in caches)], b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )


def admit(b: Builder, p: AttentionPlan, old: dict[str, list[str]], old_mass: str, pool: int, head_dim: int,
          act: Activations) -> tuple[str, str]:
    """Write present_pool_* (but the mass, left as `admitted_pool_mass` for the step's own to be added):
    the P keys with the highest mean mass among the pool's and the overwritten entries (`old`: their
    stored parts by kind; `old_mass` [B, Hkv, C, 1]). Returns the additive masks of the winners' ring
    copies [B, Hkv, 1, C] and of the empty pool slots [B, Hkv, 1, P]."""
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731
    mask = b.const(mask_value(act), act.np_type)
    zero = b.const(0.0, act.np_type)
    old_pos = b.op("Expand", [p.old_pos, b.op("Shape", [old_mass])])
    cand_pos = b.op("Concat", ["past_pool_pos", old_pos], axis=2)  # [B, Hkv, P + C, 1]
    seen = b.op("Max", [b.op("Sub", [p.age_base, b.op("Cast", [cand_pos], to=FLOAT)]), b.const(1.0, np.float32)])
    mean = b.op("Where", [b.op("Greater", [cand_pos, b.const(0)]),
                          b.op("Div", [b.op("Concat", ["past_pool_mass", old_mass], axis=2), seen]),
                          b.const(-np.inf, np.float32)])
    best = b.op("TopK", [mean, i64(pool)], n_out=2, axis=2, largest=1, sorted=1)[1]  # ties: the lower index
    kept = b.op("ScatterElements", [b.op("ConstantOfShape", [b.op("Shape", [mean])], value=helper.make_tensor(
        "", TensorProto.INT64, [1], [0])), best, b.op("ConstantOfShape", [b.op("Shape", [best])], value=helper.make_tensor(
            "", TensorProto.INT64, [1], [1]))], axis=2)  # [B, Hkv, P + C, 1]: 1 for the P kept
    left, won = b.op("Split", [kept, b.op("Concat", [i64(pool), b.op("Shape", [old_mass], start=2, end=3)], axis=0)],
                     n_out=2, axis=2)
    lost, winner = b.op("Equal", [left, b.const(0)]), b.op("Equal", [won, b.const(1)])  # [B, Hkv, P | C, 1]
    # the k-th losing pool slot (in slot order) takes the k-th winner (in chunk order)
    lost_rank = b.op("Where", [lost, b.op("CumSum", [b.op("Sub", [b.const(1), left]), b.const(2)]), b.const(-1)])
    won_rank = b.op("Where", [winner, b.op("CumSum", [won, b.const(2)]), b.const(-2)])
    pairs = b.op("Equal", [lost_rank, b.op("Transpose", [won_rank], perm=[0, 1, 3, 2])])  # [B, Hkv, P, C]
    src = b.op("ArgMax", [b.op("Cast", [pairs], to=TensorProto.INT32)], axis=3, keepdims=1)  # [B, Hkv, P, 1]
    src_row = b.op("Expand", [src, i64(1, 1, 1, head_dim)])  # the same over D, for keys' and values' rows

    def take(stored: str, past: str, out: str) -> None:
        """Pool slot l of `out`: `stored`[src[l]] where l lost, else `past`[l]."""
        idx = src if past.endswith(("_scale", "_pos", "_mass")) else src_row
        b.op("Where", [lost, b.op("GatherElements", [stored, idx], axis=2), past], outputs=[out])

    for kind, parts in old.items():
        for part, stored in zip(("", "_scale"), parts):
            take(stored, f"past_pool_{kind}{part}", f"present_pool_{kind}{part}")
    take(old_pos, "past_pool_pos", "present_pool_pos")
    take(old_mass, "past_pool_mass", "admitted_pool_mass")
    hidden = b.op("Transpose", [b.op("Where", [winner, mask, zero])], perm=[0, 1, 3, 2])
    pool_bias = b.op("Transpose", [b.op("Where", [b.op("Greater", ["present_pool_pos", b.const(0)]), zero, mask])],
                     perm=[0, 1, 3, 2])
    return hidden, pool_bias
