"""GGUF files (llama.cpp): Llama/Mistral tensors dequantized, tokenizer rebuilt as tokenizer.json.

llama.cpp's converter permutes wq/wk rows into interleaved RoPE pairs; we permute them
back. Tensors are read when asked for, each from its own bytes: float types keep their
dtype, quantized blocks become fp32 (gguf's numpy kernels). A GGUF has no tokenizer.json, only the vocabulary in
its metadata, so transformers' GGUF tokenizer converter writes one into a cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ...errors import EdgeError, first_line
from ..checkpoint import Checkpoint
from ..config import ModelConfig, brief
from ..weights import TensorMeta, Weights, interleaved_rope_rows, model_tensors, rename
from .gguf_header import Header, TensorInfo, read_header
from .untrusted import Fields

ARCHITECTURES = ("llama", "mistral")
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
_FLOAT_TYPES = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2")}

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


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{value:.7g}")


def _config(header: Header, meta: Fields, arch: str, path: Path) -> ModelConfig:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    scaling = meta.string(key("rope.scaling.type"), None)
    if scaling not in (None, "none") or "rope_freqs.weight" in header.tensors:
        raise EdgeError(f"{path}: unsupported RoPE scaling")
    vocab = meta.integer(key("vocab_size"), None)
    if vocab is None:
        tokens = header.metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else meta.integer(key("vocab_size"))
    eos = (meta.integer(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot"))
    return ModelConfig.build(
        str(path),
        dim=meta.integer(key("embedding_length")),
        n_layers=meta.integer(key("block_count")),
        n_heads=meta.integer(key("attention.head_count")),
        n_kv_heads=meta.integer(key("attention.head_count_kv"), None),
        head_dim=meta.integer(key("attention.key_length"), None),
        hidden_dim=meta.integer(key("feed_forward_length")),
        vocab_size=vocab,
        norm_eps=_decimal(meta.number(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=_decimal(meta.number(key("rope.freq_base"), 10000.0)),
        sliding_window=meta.integer(key("attention.sliding_window"), None),
        tied_embeddings="output.weight" not in header.tensors,
        bos_id=meta.integer("tokenizer.ggml.bos_token_id", None),
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        max_position=meta.integer(key("context_length"), 32768),
    )


def _read(path: Path, t: TensorInfo) -> torch.Tensor:
    """One tensor in torch order, read from its bytes alone: float types keep their dtype, blocks become fp32."""
    buf = bytearray(t.n_bytes)
    try:
        with open(path, "rb") as f:
            f.seek(t.offset)
            n = f.readinto(buf)
    except OSError as e:
        raise EdgeError(f"{path}: cannot read tensor {t.name!r} ({first_line(e)})") from None
    if n != t.n_bytes:
        raise EdgeError(f"{path}: tensor {t.name!r} is cut short; was the file modified while loading?")
    if t.ggml_type in _FLOAT_TYPES:
        data = np.frombuffer(buf, _FLOAT_TYPES[t.ggml_type])
    else:
        _, type_size = GGML_QUANT_SIZES[t.ggml_type]
        data = dequantize(np.frombuffer(buf, np.uint8).reshape(-1, type_size), t.ggml_type)
    return torch.from_numpy(data.reshape(t.shape))


def _weights(path: Path, header: Header, cfg: ModelConfig) -> Weights:
    """The model's tensors, read lazily, in rotate-half RoPE order; types are checked before any is read."""
    infos = {key: t for t in header.tensors.values() if (key := canonical_name(t.name))}
    entries = {key: (TensorMeta(t.shape, torch.float16 if t.ggml_type == Q.F16 else torch.float32),
                     partial(_read, path, t)) for key, t in infos.items()}
    weights = model_tensors(Weights(entries), cfg)
    for name in weights:
        t = infos[name]
        if t.ggml_type not in SUPPORTED_TYPES:
            names = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise EdgeError(f"tensor {t.name!r} is {t.ggml_type.name}; supported GGUF types: {names}")
    return interleaved_rope_rows(weights, cfg)


def _tokenizer_spec(meta: Fields, mapping: dict[str, str]) -> dict:
    """The tokenizer metadata transformers' converter reads (`mapping`: GGUF key -> its name), each value
    checked to be of its type."""
    spec = {}
    for key, name in mapping.items():
        key = f"tokenizer.{key}"
        if name in ("tokens", "merges"):
            spec[name] = meta.strings(key, None)
        elif name in ("scores", "token_type", "precompiled_charsmap"):
            spec[name] = meta.numbers(key, None)
        elif name.endswith("_id"):
            spec[name] = meta.integer(key, None)
        else:
            spec[name] = meta.boolean(key, None) if name == "add_prefix_space" else meta.string(key, None)
    return {name: value for name, value in spec.items() if value is not None}


def _tokenizer_json(path: Path, header: Header, meta: Fields, arch: str) -> Path:
    """tokenizer.json for the GGUF's vocabulary, cached under the hash of the metadata it comes from."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(header.data_offset)).hexdigest()
    target = cache_dir() / digest[:32] / "tokenizer.json"
    if target.is_file():
        return target
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # slow import: only on a cache miss
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    spec = _tokenizer_spec(meta, GGUF_TOKENIZER_MAPPING["tokenizer"])
    try:
        tokenizer, _ = convert_gguf_tokenizer(arch, spec)
    except Exception as e:  # transformers' converter raises anything (KeyError, IndexError, ...) on odd vocabularies
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
    header = read_header(path)
    meta = Fields(header.metadata, f"{path}: GGUF metadata")
    arch = meta.string("general.architecture")
    if arch not in ARCHITECTURES:
        raise EdgeError(f"{path}: unsupported GGUF architecture {brief(arch)}: "
                        f"expected one of {', '.join(ARCHITECTURES)}")
    cfg = _config(header, meta, arch, path)
    weights = _weights(path, header, cfg)
    has_vocab = "tokenizer.ggml.tokens" in header.metadata
    tokenizer = {"tokenizer.json": _tokenizer_json(path, header, meta, arch)} if has_vocab else {}
    return Checkpoint(cfg, weights, str(path), tokenizer, meta.string("tokenizer.chat_template", None), "gguf")
