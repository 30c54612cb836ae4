"""Hugging Face directories: config.json + (sharded) safetensors, Mistral or Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import EdgeError
from ..config import ModelConfig

ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")

_LAYER_MAP = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def canonical_name(hf_name: str) -> str | None:
    """Map a transformers parameter name to the canonical one (None: not part of the model)."""
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def config_from_hf(cfg: dict) -> ModelConfig:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise EdgeError(f"unsupported architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    scaling = cfg.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise EdgeError(f"unsupported rope_scaling {scaling!r}")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id", 2)
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return ModelConfig(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            hidden_dim=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            sliding_window=cfg.get("sliding_window") if arch == "MistralForCausalLM" else None,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            max_position=int(cfg.get("max_position_embeddings", 32768)),
        )
    except KeyError as e:
        raise EdgeError(f"config.json is missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise EdgeError(f"config.json has an invalid value: {e}") from None


def canonical_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        key = canonical_name(name)
        if key is not None:
            out[key] = t
    return out


def load_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise EdgeError(f"{path}: no config.json")
    try:
        return config_from_hf(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise EdgeError(f"{f}: invalid JSON ({e.msg} at line {e.lineno})") from None
