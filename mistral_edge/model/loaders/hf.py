"""Hugging Face directories: config.json + (sharded) safetensors, Mistral or Llama."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ...errors import EdgeError
from ..checkpoint import Checkpoint
from ..config import ModelConfig, brief
from ..weights import model_tensors, rename
from .tensor_files import open_tensors
from .untrusted import Fields, read_json_object, read_text

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


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    f = Fields(cfg, where)
    archs = f.strings("architectures", [])
    arch = archs[0] if archs else "?"
    if arch not in ARCHITECTURES:
        raise EdgeError(f"unsupported architecture {brief(arch)}: expected one of {', '.join(ARCHITECTURES)}")
    if f.boolean("attention_bias", False) or f.boolean("mlp_bias", False):
        raise EdgeError("unsupported model: attention or MLP biases (a Mistral-architecture model has none)")
    rope = {key: Fields(f.mapping(key, {}), f"{where}: {key}") for key in ("rope_scaling", "rope_parameters")}
    for key, scaling in rope.items():  # transformers 5 keeps the scaling type in rope_parameters
        if (scaling.string("rope_type", None) or scaling.string("type", None)) not in (None, "default"):
            raise EdgeError(f"unsupported {key} {brief(scaling.values)}")
    theta = f.number("rope_theta", None)
    if theta is None:
        theta = rope["rope_parameters"].number("rope_theta", 10000.0)
    return ModelConfig.build(
        where,
        dim=f.integer("hidden_size"),
        n_layers=f.integer("num_hidden_layers"),
        n_heads=f.integer("num_attention_heads"),
        n_kv_heads=f.integer("num_key_value_heads", None),
        head_dim=f.integer("head_dim", None),
        hidden_dim=f.integer("intermediate_size"),
        vocab_size=f.integer("vocab_size"),
        norm_eps=f.number("rms_norm_eps", 1e-5),
        rope_theta=theta,
        sliding_window=f.integer("sliding_window", None) if arch == "MistralForCausalLM" else None,
        tied_embeddings=f.boolean("tie_word_embeddings", False),
        bos_id=f.integer("bos_token_id", None),
        eos_ids=f.token_ids("eos_token_id") if "eos_token_id" in cfg else (2,),
        max_position=f.integer("max_position_embeddings", 32768),
    )


def load_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise EdgeError(f"{path}: no config.json")
    return config_from_hf(read_json_object(f), str(f))


_WEIGHT_LAYOUTS = (  # (single file, shard index, shard suffix), safetensors before pickles
    ("model.safetensors", "model.safetensors.index.json", ".safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"),
)


def has_weights(path: Path) -> bool:
    return any((path / name).is_file() for layout in _WEIGHT_LAYOUTS for name in layout[:2])


def _shards(path: Path, index: Path, suffix: str) -> list[Path]:
    """The files a shard index names: plain relative paths inside `path`, of the index's kind."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise EdgeError(f"{index}: not a valid shard index (weight_map must map tensor names to file names)")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        name = PurePosixPath(s)
        if name.is_absolute() or ".." in name.parts or any(c in s for c in "\\\0") or not s.endswith(suffix):
            raise EdgeError(f"{index} names {brief(s)}: a shard must be a {suffix} file inside the model directory")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise EdgeError(f"{index} lists {missing[0][:200]}, which is missing")
    return [path / s for s in shards]


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: one file or the shards its index lists."""
    for single, index, suffix in _WEIGHT_LAYOUTS:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            return _shards(path, path / index, suffix)
    raise EdgeError(f"{path}: no model.safetensors or model.safetensors.index.json")


def tokenizer_files(path: Path) -> dict[str, Path]:
    return {name: path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()}


def chat_template(path: Path) -> str | None:
    """The template transformers would use: chat_template.jinja, else tokenizer_config.json's."""
    if (path / "chat_template.jinja").is_file():
        return read_text(path / "chat_template.jinja")
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return None
    template = read_json_object(f).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise EdgeError(f"{f}: chat_template must be a string or a list of {{name, template}} objects")
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif template is not None and not isinstance(template, str):
        raise EdgeError(f"{f}: chat_template must be a string or a list of {{name, template}} objects, "
                        f"got {brief(template)}")
    return template


def load(path: Path, trust_pickle: bool = False, weights: Path | None = None) -> Checkpoint:
    """A Hugging Face directory; `weights` overrides the weight file (a pickle the user named)."""
    cfg = load_config(path)
    state = open_tensors([weights] if weights else weight_files(path), trust_pickle).renamed(canonical_name)
    return Checkpoint(cfg, model_tensors(state, cfg), str(path), tokenizer_files(path), chat_template(path), "hf")
