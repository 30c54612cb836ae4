"""Hugging Face directories: config.json + (sharded) safetensors, Mistral or Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...errors import EdgeError, first_line
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..weights import expected_shapes, rename, validate

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
    return rename(hf_name, _TOP_MAP, _LAYER_RE, _LAYER_MAP)


def config_from_hf(cfg: dict) -> ModelConfig:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise EdgeError(f"unsupported architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise EdgeError("unsupported model: attention or MLP biases (a Mistral-architecture model has none)")
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


def read_json_object(f: Path) -> dict:
    """A config file's JSON object, or a one-line EdgeError."""
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EdgeError(f"{f}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise EdgeError(f"{f}: expected a JSON object")
    return data


def load_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise EdgeError(f"{path}: no config.json")
    return config_from_hf(read_json_object(f))


PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
_WEIGHT_LAYOUTS = (  # (single file, shard index), safetensors before pickles
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def require_trust(path: Path, trust_pickle: bool) -> None:
    """Pickles can run code when unpickled, so loading one is the user's explicit decision."""
    if not trust_pickle:
        raise EdgeError(f"{path} is a pickle checkpoint, which can run code when loaded; "
                        "pass --trust-pickle if you trust where it came from")


def read_tensors(files: list[Path], trust_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of safetensors files and (with trust) torch pickles, merged into one dict."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise EdgeError(f"{f}: unreadable safetensors file, truncated or corrupt ({first_line(e)})") from None
            continue
        require_trust(f, trust_pickle)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise EdgeError(f"{f}: cannot load pickle checkpoint ({first_line(e)})") from None
        if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
            raise EdgeError(f"{f}: pickle does not hold a flat dict of tensors")
        state.update(obj)
    return state


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for layout in _WEIGHT_LAYOUTS for name in layout)


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: one file or the shards its index lists."""
    for single, index in _WEIGHT_LAYOUTS:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise EdgeError(f"{path / index}: not a valid shard index") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise EdgeError(f"{path / index} lists {missing[0]}, which is missing")
            return [path / s for s in shards]
    raise EdgeError(f"{path}: no model.safetensors or model.safetensors.index.json")


def model_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Validate, then keep only the tensors the model uses (a tied model's saved lm_head goes)."""
    validate(state, cfg)
    return {name: state[name] for name in expected_shapes(cfg)}


def tokenizer_files(path: Path) -> dict[str, Path]:
    return {name: path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()}


def chat_template(path: Path) -> str | None:
    """The template transformers would use: chat_template.jinja, else tokenizer_config.json's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return None
    try:
        template = json.loads(f.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise EdgeError(f"{f}: not a valid JSON object") from None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load(path: Path, trust_pickle: bool = False, weights: Path | None = None) -> Checkpoint:
    """A Hugging Face directory; `weights` overrides the weight file (a pickle the user named)."""
    cfg = load_config(path)
    state = canonical_weights(read_tensors([weights] if weights else weight_files(path), trust_pickle))
    return Checkpoint(cfg, model_tensors(state, cfg), str(path), tokenizer_files(path), chat_template(path), "hf")
