"""GGUF files (llama.cpp): Llama/Mistral tensors dequantized, tokenizer rebuilt as tokenizer.json.

llama.cpp's converter permutes wq/wk rows into interleaved RoPE pairs; we permute them
back. Float tensors keep their dtype; quantized blocks become fp32 (whole tensors at a
time with gguf's numpy kernels). A GGUF has no tokenizer.json, only the vocabulary in
its metadata, so transformers' GGUF tokenizer converter writes one into a cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from ...errors import EdgeError, first_line
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..weights import interleaved_to_half, rename
from .hf import model_tensors

ARCHITECTURES = ("llama", "mistral")
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

_TOP_MAP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
_LAYER_MAP = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def canonical_name(gguf_name: str) -> str | None:
    return rename(gguf_name, _TOP_MAP, _LAYER_RE, _LAYER_MAP, suffix=".weight")


def cache_dir() -> Path:
    """$MISTRAL_EDGE_CACHE, else ~/.cache/mistral_edge (or under $XDG_CACHE_HOME)."""
    if os.environ.get("MISTRAL_EDGE_CACHE"):
        return Path(os.environ["MISTRAL_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mistral_edge"


def _meta(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{value:.7g}")


def _config(reader: GGUFReader, arch: str, path: Path) -> ModelConfig:
    def need(key: str):
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise EdgeError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    scaling = _meta(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise EdgeError(f"{path}: unsupported RoPE scaling")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _meta(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else need("vocab_size"))
    dim, n_heads = need("embedding_length"), need("attention.head_count")
    eos = [_meta(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    return ModelConfig(
        dim=dim,
        n_layers=need("block_count"),
        n_heads=n_heads,
        n_kv_heads=_meta(reader, f"{arch}.attention.head_count_kv") or n_heads,
        head_dim=_meta(reader, f"{arch}.attention.key_length") or dim // n_heads,
        hidden_dim=need("feed_forward_length"),
        vocab_size=vocab,
        norm_eps=_decimal(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_decimal(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        sliding_window=_meta(reader, f"{arch}.attention.sliding_window"),
        tied_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        max_position=_meta(reader, f"{arch}.context_length", 32768),
    )


def _tensor(t: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor in torch order (GGUF's `ne` lists dimensions innermost first)."""
    if t.tensor_type not in SUPPORTED_TYPES:
        names = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise EdgeError(f"tensor {t.name!r} is {t.tensor_type.name}; supported GGUF types: {names}")
    data = t.data if t.tensor_type in (Q.F32, Q.F16) else dequantize(t.data, t.tensor_type)
    data = data.reshape(tuple(int(n) for n in reversed(t.shape)))
    return torch.from_numpy(data if data.flags.writeable else np.array(data))


def _weights(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = model_tensors({name: _tensor(t) for t in reader.tensors if (name := canonical_name(t.name))}, cfg)
    for i in range(cfg.n_layers):
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = interleaved_to_half(state[key], heads).contiguous()
    return state


def _tokenizer_json(path: Path, reader: GGUFReader, arch: str) -> Path:
    """tokenizer.json for the GGUF's vocabulary, cached under the hash of the metadata it comes from."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(reader.data_offset)).hexdigest()
    target = cache_dir() / digest[:32] / "tokenizer.json"
    if target.is_file():
        return target
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # slow import: only on a cache miss
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    spec = {name: _meta(reader, f"tokenizer.{key}") for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in reader.fields}
    try:
        tokenizer, _ = convert_gguf_tokenizer(arch, spec)
    except (ValueError, KeyError) as e:
        raise EdgeError(f"{path}: cannot rebuild its tokenizer ({first_line(e)})") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
            tmp.write(tokenizer.to_str())
        os.replace(tmp.name, target)  # atomic: a concurrent load sees the whole file or none
    except OSError as e:
        raise EdgeError(f"cannot write the tokenizer cache ({first_line(e)}); "
                        "set MISTRAL_EDGE_CACHE to a writable directory") from None
    return target


def load(path: Path) -> Checkpoint:
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader fails with assorted errors (ValueError, IndexError, ...) on bad input
        raise EdgeError(f"{path}: not a readable GGUF file, truncated or corrupt ({first_line(e)})") from None
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise EdgeError(f"{path}: unsupported GGUF architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    cfg = _config(reader, arch, path)
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    tokenizer = {"tokenizer.json": _tokenizer_json(path, reader, arch)} if has_vocab else {}
    template = _meta(reader, "tokenizer.chat_template")
    return Checkpoint(cfg, _weights(reader, cfg), str(path), tokenizer, template, "gguf")
