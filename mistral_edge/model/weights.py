"""Canonical weight names and shapes; loaders map their formats onto these.

Names follow mistral-inference (`layers.{i}.attention.wq.weight`, ...), with one
difference: wq and wk rows are in the Hugging Face "rotate-half" RoPE order, so a
head's first half of dimensions pairs with its second half. Loaders of
interleaved-pair formats (mistral-inference, GGUF) permute rows on the way in.
"""

from __future__ import annotations

import re

import torch

from ..errors import EdgeError
from .config import ModelConfig

LAYER_TENSORS = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {
        "attention_norm.weight": (cfg.dim,),
        "attention.wq.weight": (q, cfg.dim),
        "attention.wk.weight": (kv, cfg.dim),
        "attention.wv.weight": (kv, cfg.dim),
        "attention.wo.weight": (cfg.dim, q),
        "ffn_norm.weight": (cfg.dim,),
        "feed_forward.w1.weight": (cfg.hidden_dim, cfg.dim),
        "feed_forward.w2.weight": (cfg.dim, cfg.hidden_dim),
        "feed_forward.w3.weight": (cfg.hidden_dim, cfg.dim),
    }
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def validate(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Raise EdgeError naming the first missing or mis-shaped tensor."""
    for name, shape in expected_shapes(cfg).items():
        t = weights.get(name)
        if t is None:
            raise EdgeError(f"checkpoint is missing tensor {name!r}")
        if tuple(t.shape) != shape:
            raise EdgeError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def rename(name: str, top: dict[str, str], layer_re: re.Pattern, layer_map: dict[str, str],
           suffix: str = "") -> str | None:
    """Map a format's tensor name to the canonical one: `top` for whole-model tensors, and
    `layer_re` (groups: layer index, per-layer key of `layer_map`) for layer tensors; None
    for tensors that are not part of the model."""
    if name in top:
        return top[name]
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}{suffix}"
    return None


def output_weight(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head: `output.weight`, or the embedding when tied."""
    return weights.get("output.weight", weights["tok_embeddings.weight"])


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows from interleaved RoPE pairs (0,1),(2,3).. to rotate-half order."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (used to write mistral-inference fixtures)."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, 2, d // 2, inp).transpose(1, 2).reshape(out, inp)
