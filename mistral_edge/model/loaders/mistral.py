"""mistral-inference directories: params.json + consolidated.safetensors, Mistral's own layout.

The tensor names already are the canonical ones; only wq/wk differ, their rows being
in Meta's interleaved RoPE order, which we turn into rotate-half order.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import EdgeError
from ..checkpoint import Checkpoint
from ..config import ModelConfig, brief
from ..weights import interleaved_rope_rows, model_tensors
from .tensor_files import PICKLE_SUFFIXES, open_tensors
from .untrusted import Fields, read_json_object

_SENTENCEPIECE = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1")


def config_from_params(p: dict, where: str = "params.json") -> ModelConfig:
    f = Fields(p, where)
    if p.get("moe"):
        raise EdgeError("unsupported model: mixture-of-experts (params.json has 'moe')")
    if p.get("vision_encoder"):
        raise EdgeError("unsupported model: vision encoder (params.json has 'vision_encoder')")
    if isinstance(p.get("sliding_window"), list):
        raise EdgeError(f"{where}: sliding_window {brief(p['sliding_window'])} "
                        "(only one window for all layers is supported)")
    return ModelConfig.build(
        where,
        dim=f.integer("dim"),
        n_layers=f.integer("n_layers"),
        n_heads=f.integer("n_heads"),
        n_kv_heads=f.integer("n_kv_heads", None),
        head_dim=f.integer("head_dim", None),
        hidden_dim=f.integer("hidden_dim"),
        vocab_size=f.integer("vocab_size"),
        norm_eps=f.number("norm_eps", 1e-5),
        rope_theta=f.number("rope_theta", 10000.0),
        sliding_window=f.integer("sliding_window", None),
        tied_embeddings=f.boolean("tied_embeddings", False),
        max_position=f.integer("max_seq_len", 32768),
    )


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated*.safetensors")) or sorted(
        f for f in path.glob("consolidated*") if f.suffix in PICKLE_SUFFIXES)
    if not files:
        raise EdgeError(f"{path}: no consolidated.safetensors")
    if len(files) > 1:
        raise EdgeError(f"{path}: model-parallel shards ({files[0].name}, {files[1].name}, ...) are not supported")
    return files


def _tokenizer_files(path: Path) -> dict[str, Path]:
    for name in _SENTENCEPIECE:
        if (path / name).is_file():
            return {"tokenizer.model": path / name}
    if any(path.glob("tekken*.json")):
        raise EdgeError(f"{path}: Tekken tokenizers (tekken.json) are not supported; "
                        "use a model with a SentencePiece tokenizer.model or its Hugging Face layout")
    return {}


def load(path: Path, trust_pickle: bool = False, weights: Path | None = None) -> Checkpoint:
    cfg = config_from_params(read_json_object(path / "params.json"), str(path / "params.json"))
    state = model_tensors(open_tensors([weights] if weights else _weight_files(path), trust_pickle), cfg)
    return Checkpoint(cfg, interleaved_rope_rows(state, cfg), str(path), _tokenizer_files(path), None, "mistral")
