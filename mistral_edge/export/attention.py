"""`WindowedGroupQueryAttention`: the one attention node of the decoder-step graph.

It is a custom op in the `mistral_edge` domain, shipped as a model-local ONNX
function whose body uses standard ops only, so any ONNX runtime executes it.

Inputs:  query [B, C, Hq*D], key [B, C, Hkv*D], value [B, C, Hkv*D] (query and key
         after RoPE), past_key / past_value [B, Hkv, W, D], positions [B] (absolute
         position of each sequence's first chunk token), valid_lens [B] (how many
         chunk tokens are real; the rest is padding).
Outputs: output [B, C, Hq*D], present_key / present_value [B, Hkv, W, D].

Order of work, chosen so the cache can be updated in place (past and present
bound to one buffer): (1) gather the entries the chunk is about to overwrite,
(2) scatter the chunk into the cache with TensorScatter (circular, slot = p mod W;
padding tokens write back the old entry, so they change nothing), (3) attend over
the updated cache plus the gathered old entries. Every read of the old cache
happens before the write through data dependencies, never by node order. Key
positions are recovered from slots: a query at p sees keys k with p - W < k <= p.
"""

from __future__ import annotations

from onnx import FunctionProto, helper

from .onnx_builder import Builder

DOMAIN = "mistral_edge"
OP = "WindowedGroupQueryAttention"
NEG = -1.0e30  # finite, so a query with no visible key (padding) gives no NaN


def attention_function() -> FunctionProto:
    b = Builder("wgqa_")
    q, k, v, past_k, past_v, pos, valid = "query", "key", "value", "past_key", "past_value", "positions", "valid_lens"
    i64 = lambda *vals: b.const(list(vals))  # noqa: E731

    kshape = b.op("Shape", [past_k])
    hkv, w, d = (b.op("Slice", [kshape, i64(i), i64(i + 1)]) for i in (1, 2, 3))
    qshape = b.op("Shape", [q])
    bsz, c = (b.op("Slice", [qshape, i64(i), i64(i + 1)]) for i in (0, 1))
    w_scalar = b.op("Squeeze", [w, i64(0)])

    # new keys/values as [B, Hkv, C, D]
    def heads_first(x):
        return b.op("Transpose", [b.op("Reshape", [x, b.op("Concat", [bsz, c, hkv, d], axis=0)])], perm=[0, 2, 1, 3])
    k_new, v_new = heads_first(k), heads_first(v)

    # absolute positions and slots of the chunk
    j = b.op("Range", [b.const(0), b.op("Squeeze", [c, i64(0)]), b.const(1)])  # [C]
    qpos = b.op("Add", [b.op("Unsqueeze", [pos, i64(1)]), j])  # [B, C]
    is_valid = b.op("Less", [j, b.op("Unsqueeze", [valid, i64(1)])])  # [B, C]
    slots = b.op("Mod", [qpos, w_scalar])
    idx = b.op("Expand", [b.op("Reshape", [slots, b.op("Concat", [bsz, i64(1), c, i64(1)], axis=0)]),
                          b.op("Concat", [bsz, hkv, c, d], axis=0)])
    keep = b.op("Reshape", [is_valid, b.op("Concat", [bsz, i64(1), c, i64(1)], axis=0)])
    write_at = b.op("Mod", [pos, w_scalar])

    def update(past, new, present_name):
        old = b.op("GatherElements", [past, idx], axis=2)
        upd = b.op("Where", [keep, new, old])
        b.op("TensorScatter", [past, upd, write_at], outputs=[present_name], mode="circular", axis=2)
        return old
    old_k = update(past_k, k_new, "present_key")
    old_v = update(past_v, v_new, "present_value")

    # positions held by the W slots after the write, then by the C gathered entries
    last = b.op("Sub", [b.op("Add", [pos, valid]), b.const(1)])
    last = b.op("Unsqueeze", [last, i64(1)])  # [B, 1]
    slot_ids = b.op("Range", [b.const(0), w_scalar, b.const(1)])
    p_cache = b.op("Sub", [last, b.op("Mod", [b.op("Sub", [last, slot_ids]), w_scalar])])
    p_old = b.op("Where", [is_valid, b.op("Sub", [qpos, w_scalar]), b.const(-1)])
    kpos = b.op("Unsqueeze", [b.op("Concat", [p_cache, p_old], axis=1), i64(1)])  # [B, 1, W+C]
    qcol = b.op("Unsqueeze", [qpos, i64(2)])  # [B, C, 1]
    visible = b.op("And", [b.op("And", [b.op("GreaterOrEqual", [kpos, b.const(0)]),
                                        b.op("LessOrEqual", [kpos, qcol])]),
                           b.op("Greater", [kpos, b.op("Sub", [qcol, w_scalar])])])
    bias = b.op("Where", [visible, b.const(0.0, "float32"), b.const(NEG, "float32")])  # [B, C, W+C]
    bias = b.op("Unsqueeze", [bias, i64(1, 2)])  # [B, 1, 1, C, W+C]

    # grouped-query attention: q as [B, Hkv, G, C, D] against keys [B, Hkv, 1, W+C, D]
    q5 = b.op("Transpose", [b.op("Reshape", [q, b.op("Concat", [bsz, c, hkv, i64(-1), d], axis=0)])],
              perm=[0, 2, 3, 1, 4])
    keys = b.op("Unsqueeze", [b.op("Concat", ["present_key", old_k], axis=2), i64(2)])
    vals = b.op("Unsqueeze", [b.op("Concat", ["present_value", old_v], axis=2), i64(2)])
    scale = b.op("Reciprocal", [b.op("Sqrt", [b.op("Cast", [d], to=1)])])
    scores = b.op("MatMul", [q5, b.op("Transpose", [keys], perm=[0, 1, 2, 4, 3])])
    probs = b.op("Softmax", [b.op("Add", [b.op("Mul", [scores, scale]), bias])], axis=-1)
    out = b.op("MatMul", [probs, vals])  # [B, Hkv, G, C, D]
    out = b.op("Transpose", [out], perm=[0, 3, 1, 2, 4])
    b.op("Reshape", [out, b.op("Concat", [bsz, c, i64(-1)], axis=0)], outputs=["output"])

    return helper.make_function(
        DOMAIN, OP, [q, k, v, past_k, past_v, pos, valid], ["output", "present_key", "present_value"],
        b.nodes, opset_imports=[helper.make_opsetid("", 24)],
    )
