"""mistral-inference directories: params.json + consolidated.safetensors, Mistral's own layout.

The tensor names already are the canonical ones; only wq/wk differ, their rows being
in Meta's interleaved RoPE order, which we turn into rotate-half order.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import EdgeError
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..weights import interleaved_to_half
from .hf import PICKLE_SUFFIXES, model_tensors, read_json_object, read_tensors

_SENTENCEPIECE = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1")


def config_from_params(p: dict) -> ModelConfig:
    if p.get("moe"):
        raise EdgeError("unsupported model: mixture-of-experts (params.json has 'moe')")
    if p.get("vision_encoder"):
        raise EdgeError("unsupported model: vision encoder (params.json has 'vision_encoder')")
    try:
        window = p.get("sliding_window")
        if window is not None and not isinstance(window, int):
            raise ValueError(f"sliding_window {window!r} (only one window for all layers is supported)")
        return ModelConfig(
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=int(p["n_heads"]),
            n_kv_heads=int(p.get("n_kv_heads") or p["n_heads"]),
            head_dim=int(p.get("head_dim") or int(p["dim"]) // int(p["n_heads"])),
            hidden_dim=int(p["hidden_dim"]),
            vocab_size=int(p["vocab_size"]),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            sliding_window=window,
            tied_embeddings=bool(p.get("tied_embeddings", False)),
            max_position=int(p.get("max_seq_len", 32768)),
        )
    except KeyError as e:
        raise EdgeError(f"params.json is missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise EdgeError(f"params.json has an invalid value: {e}") from None


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
    cfg = config_from_params(read_json_object(path / "params.json"))
    state = model_tensors(read_tensors([weights] if weights else _weight_files(path), trust_pickle), cfg)
    for i in range(cfg.n_layers):
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = interleaved_to_half(state[key], heads).contiguous()
    return Checkpoint(cfg, state, str(path), _tokenizer_files(path), None, "mistral")
