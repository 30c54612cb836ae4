"""Build the decoder-step ONNX graph (the graph contract is in docs/graph-contract.md).

One call processes a chunk of C <= W tokens per sequence: embeddings, per layer
RMSNorm -> fused QKV -> RoPE -> WindowedGroupQueryAttention (which updates the
rolling cache) -> output projection -> RMSNorm -> fused gate/up -> SwiGLU -> down,
then the final norm and the LM head on the rows picked by `logits_index` only, so
decoding pays for one row of the vocabulary projection, evaluation for all.
Everything computes in the emitter's activation type (fp32 or fp16); logits are float32
either way, so sampling does not depend on it. The cache tensors have the cache type's dtypes
(contract.GraphInfo.cache_tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
from onnx import helper

from ..contract import GraphInfo, layer_cache_names
from ..model.config import ModelConfig
from ..model.weights import output_weight
from ..quantize.plan import head_shares_embedding
from .attention import DOMAIN, attention_function, attention_plan, op_name
from .linear import WeightEmitter
from .onnx_builder import FLOAT, INT64

OPSET = 24


def stack_rows(weights: Mapping[str, torch.Tensor], names: list[str], rows: list[int]) -> torch.Tensor:
    """The named [rows_i, K] tensors as one [sum(rows), K] (fused QKV, gate/up), each read into
    the result in turn, so that no two of them are alive beside it."""
    out, start = None, 0
    for name, n in zip(names, rows):
        t = weights[name]
        if out is None:
            out = t.new_empty((sum(rows), t.shape[1]))
        out[start:start + n] = t
        start += n
    return out


Progress = Callable[[int, int], None]
"""progress(done, total): called after the embedding, each layer and the head (total = layers + 2)."""


def build_decoder(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], window: int, chunk: int,
                  emitter: WeightEmitter, progress: Progress | None = None, sinks: int = 0,
                  kv_cache: str | None = None, pool: int = 0) -> onnx.ModelProto:
    """The graph, reading each weight from `weights` once, when its initializers are made (with a
    streaming builder nothing of a layer stays in memory after it); `sinks` of the W cache slots
    hold the first positions for ever and `pool` the most-attended keys that left the ring, `kv_cache`
    (default: the activation type) is how the cache stores keys and values (docs/cache.md)."""
    b, act = emitter.builder, emitter.activations
    steps = cfg.n_layers + 2
    progress = progress or (lambda done, total: None)
    c = cfg
    info = GraphInfo(c.n_layers, c.n_kv_heads, c.head_dim, window, chunk, c.vocab_size, act.name,
                     kv_cache or act.name, sinks, c.sliding_window or 0, pool)  # checks the cache type
    inputs = [
        helper.make_tensor_value_info("input_ids", INT64, ["batch", "chunk"]),
        helper.make_tensor_value_info("positions", INT64, ["batch"]),
        helper.make_tensor_value_info("valid_lens", INT64, ["batch"]),
        helper.make_tensor_value_info("logits_index", INT64, ["batch", "n_logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch", "n_logits", c.vocab_size])]
    for t in info.cache_tensors:
        shape = ["batch", c.n_kv_heads, t.fixed or "slots", t.width]  # slots <= W - sinks - pool
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        inputs.append(helper.make_tensor_value_info(f"past_{t.name}", elem, shape))
        outputs.append(helper.make_tensor_value_info(f"present_{t.name}", elem, shape))

    plan = attention_plan(b, c, window, "past_key.0", act, sinks, pool)  # per-step tensors shared by all layers

    def norm_weight(name: str) -> str:
        return b.init(name, weights[name].float().numpy().astype(act.np_type))

    def norm(x: str, name: str) -> str:
        return b.op("RMSNormalization", [x, norm_weight(name)], axis=-1, epsilon=c.norm_eps)

    def add_norm(h: str, delta: str, name: str) -> tuple[str, str]:
        """(RMSNorm(h + delta), h + delta): one SkipSimplifiedLayerNormalization on the ORT path."""
        if emitter.fmt == "qdq":  # standard ops only
            h = b.op("Add", [h, delta])
            return norm(h, name), h
        x, h_out = b.fresh("x"), b.fresh("residual")
        b.op("SkipSimplifiedLayerNormalization", [delta, h, norm_weight(name)],
             outputs=[x, "", "", h_out], domain="com.microsoft", epsilon=c.norm_eps)
        return x, h_out

    h = emitter.embedding("input_ids", "tok_embeddings", weights["tok_embeddings.weight"])
    x = norm(h, "layers.0.attention_norm.weight")
    progress(1, steps)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        wqkv = stack_rows(weights, [p + f"attention.{n}.weight" for n in ("wq", "wk", "wv")],
                          [c.n_heads * c.head_dim] + [c.n_kv_heads * c.head_dim] * 2)
        qkv = emitter.linear(x, p + "attention.wqkv", wqkv)
        del wqkv
        caches = layer_cache_names(i, sinks, info.kv_cache, pool)
        attn = b.op(op_name(sinks, info.kv_cache, pool), [qkv, *(f"past_{n}" for n in caches), *plan.inputs], domain=DOMAIN,
                    outputs=[b.fresh("attn"), *(f"present_{n}" for n in caches)], name=f"{p}attention")[0]
        x, h = add_norm(h, emitter.linear(attn, p + "attention.wo", weights[p + "attention.wo.weight"]),
                        p + "ffn_norm.weight")
        w13 = stack_rows(weights, [p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"], [c.hidden_dim] * 2)
        gate, up = b.op("Split", [emitter.linear(x, p + "feed_forward.w13", w13), b.const([c.hidden_dim] * 2)],
                        n_out=2, axis=-1)
        del w13
        gated = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        down = emitter.linear(gated, p + "feed_forward.w2", weights[p + "feed_forward.w2.weight"])
        if i + 1 < c.n_layers:
            x, h = add_norm(h, down, f"layers.{i + 1}.attention_norm.weight")
        else:
            h = b.op("Add", [h, down])
        progress(i + 2, steps)

    picked = b.op("GatherND", [h, b.op("Unsqueeze", ["logits_index", b.const([2])])], batch_dims=1)
    head_name = "tok_embeddings" if head_shares_embedding(c, emitter.plan) else "output"
    head_out = "logits" if act.onnx_type == FLOAT else None
    logits = emitter.linear(norm(picked, "norm.weight"), head_name, output_weight(weights), output=head_out)
    if head_out is None:
        b.op("Cast", [logits], to=FLOAT, outputs=["logits"])
    progress(steps, steps)

    graph = helper.make_graph(b.nodes, "mistral_edge_decoder", inputs, outputs, b.initializers)
    model = helper.make_model(
        graph, functions=[attention_function(c, sinks, info.kv_cache, act, pool)], producer_name="mistral-edge",
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1),
                       helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10
    helper.set_model_props(model, info.to_metadata())
    return model
