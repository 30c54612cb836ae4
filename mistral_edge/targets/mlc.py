"""MLC-LLM target: q4f16_1 weights in TVM tensor-cache shards plus `mlc-chat-config.json`.

mlc_llm cannot be installed here, so this writes, without it, the directory that
`mlc_llm convert_weight --quantization q4f16_1` followed by `mlc_llm gen_config`
produce for a Llama or Mistral model; `mlc_llm compile --device android` and
`mlc_llm package` take it from there. Tensors are read, quantized and written to the
32 MB shards one at a time. Formats follow MLC-LLM's GroupQuantize,
Llama/Mistral model definitions and gen_config, and TVM's `dump_tensor_cache`.

MLC's Llama/Mistral apply RoPE in rotate-half order to fused QKV rows taken from
Hugging Face's q/k/v_proj as they are, which is our canonical order: no permutation.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeError
from ..export.linear import row_blocks
from ..export.onnx_builder import release_free_memory
from ..model.checkpoint import Checkpoint
from ..model.weights import expected_shapes, output_weight

QUANTIZATION = "q4f16_1"
GROUP_SIZE = 32
MAX_INT = 7  # int4 symmetric: codes 0..14 store q + 7
PER_WORD = 8  # 4-bit codes per uint32, element r of a word in bits 4r..4r+3
SHARD_CAP_BYTES = 32 << 20  # dump_tensor_cache's shard_cap_mb=32
ENCODE_FORMAT = "f32-to-bf16"  # convert_weight's encode format, recorded on every tensor
CONFIG_VERSION = "0.1.0"  # MLC_CHAT_CONFIG_VERSION
MAX_BATCH_SIZE = 128  # gen_config's default
TOKENIZER_ORDER = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer_config.json")
MLC_GENERATION_DEFAULTS = {"temperature": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                           "repetition_penalty": 1.0, "top_p": 1.0}
SYSTEM_DEFAULT_IDS = {"pad_token_id": 0, "bos_token_id": 1}


def quantize_q4f16_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize an [out, in] weight as MLC's q4f16_1 does, in float16 arithmetic.

    Returns q_weight [out, 4*ceil(in/32)] uint32 and q_scale [out, ceil(in/32)] float16.
    An `in` that is not a multiple of 32 is padded: the last group's scale covers the
    real columns only and padded codes are 0. An all-zero group gets scale 0 and code 7
    (MLC divides 0 by 0 there; any code dequantizes to 0).
    """
    w16 = np.asarray(w, dtype=np.float16)
    n, k = w16.shape
    groups = -(-k // GROUP_SIZE)
    padded = np.zeros((n, groups * GROUP_SIZE), np.float16)
    padded[:, :k] = w16
    g = padded.reshape(n, groups, GROUP_SIZE)
    scale = np.abs(g).max(axis=-1) / np.float16(MAX_INT)
    safe = np.where(scale == 0, np.float16(1), scale)
    codes = np.rint(g / safe[..., None] + np.float16(MAX_INT))  # nearbyint, as TVM lowers round on CPU
    codes = np.clip(codes, 0, 2 * MAX_INT).astype(np.uint32).reshape(n, -1)
    codes[:, k:] = 0
    shifts = np.arange(PER_WORD, dtype=np.uint32) * 4
    q_weight = np.bitwise_or.reduce(codes.reshape(n, -1, PER_WORD) << shifts, axis=-1)
    return q_weight, scale.astype(np.float16)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _mlc_params(ckpt: Checkpoint, with_lm_head: bool) -> Iterator[tuple[str, np.ndarray]]:
    """MLC parameters in the model's export order, QKV and gate/up fused by row concatenation."""
    w = ckpt.weights

    def quantized(name: str, *parts: torch.Tensor) -> Iterator[tuple[str, np.ndarray]]:
        """One tensor at a time, in row blocks (q4f16_1 is per row), in float16 as MLC computes."""
        w16 = torch.cat([p.detach().to(torch.float16) for p in parts]).numpy()
        blocks = [quantize_q4f16_1(w16[r]) for r in row_blocks(*w16.shape)]
        del w16
        yield f"{name}.q_weight", np.concatenate([q for q, _ in blocks])
        yield f"{name}.q_scale", np.concatenate([s for _, s in blocks])

    yield from quantized("model.embed_tokens", w["tok_embeddings.weight"])
    for i in range(ckpt.config.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        yield from quantized(dst + "self_attn.qkv_proj", *(w[src + f"attention.{x}.weight"] for x in ("wq", "wk", "wv")))
        yield from quantized(dst + "self_attn.o_proj", w[src + "attention.wo.weight"])
        yield from quantized(dst + "mlp.gate_up_proj", w[src + "feed_forward.w1.weight"], w[src + "feed_forward.w3.weight"])
        yield from quantized(dst + "mlp.down_proj", w[src + "feed_forward.w2.weight"])
        yield dst + "input_layernorm.weight", _np(w[src + "attention_norm.weight"]).astype(np.float16)
        yield dst + "post_attention_layernorm.weight", _np(w[src + "ffn_norm.weight"]).astype(np.float16)
    yield "model.norm.weight", _np(w["norm.weight"]).astype(np.float16)
    if with_lm_head:
        yield from quantized("lm_head", output_weight(w))


class _ShardWriter:
    """TVM's tensor-cache sharding: records packed into shards of under 32 MB; one of at
    least half that size goes alone into its own shard, ahead of the pending one."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.shards: list[dict] = []
        self.pending = bytearray()
        self.pending_records: list[dict] = []

    def add(self, name: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr).tobytes()
        rec = {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "format": ENCODE_FORMAT,
               "nbytes": len(data)}
        if len(self.pending) + len(data) >= SHARD_CAP_BYTES:
            if 2 * len(data) >= SHARD_CAP_BYTES:
                self._commit(data, [{**rec, "byteOffset": 0}])
                return
            self.flush()
        self.pending_records.append({**rec, "byteOffset": len(self.pending)})
        self.pending += data

    def flush(self) -> None:
        if self.pending:
            self._commit(bytes(self.pending), self.pending_records)
            self.pending, self.pending_records = bytearray(), []

    def _commit(self, data: bytes, records: list[dict]) -> None:
        path = f"params_shard_{len(self.shards)}.bin"
        (self.out_dir / path).write_bytes(data)
        release_free_memory()
        self.shards.append({"dataPath": path, "format": "raw-shard", "nbytes": len(data), "records": records,
                            "md5sum": hashlib.md5(data).hexdigest()})


def _conv_template(ckpt: Checkpoint) -> dict:
    """MLC's registered template matching the checkpoint's chat format, with its own token ids."""
    cfg, template = ckpt.config, ckpt.chat_template or ""
    bos = [cfg.bos_id] if cfg.bos_id is not None else None
    if "<|im_start|>" in template:
        conv = {"name": "chatml",
                "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
                "system_message": "A conversation between a user and an LLM-based AI assistant. "
                                  "The assistant gives helpful and honest answers.",
                "system_prefix_token_ids": None, "add_role_after_system_message": True,
                "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
                "seps": ["<|im_end|>\n"], "role_content_sep": "\n", "role_empty_sep": "\n",
                "stop_str": ["<|im_end|>"]}
    elif "[INST]" in template:
        conv = {"name": "mistral_default", "system_template": "[INST] {system_message}",
                "system_message": "Always assist with care, respect, and truth. Respond with utmost utility "
                                  "yet securely. Avoid harmful, unethical, prejudiced, or negative content. "
                                  "Ensure replies promote fairness and positivity.",
                "system_prefix_token_ids": bos, "add_role_after_system_message": False,
                "roles": {"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"},
                "seps": [" "], "role_content_sep": " ", "role_empty_sep": "", "stop_str": ["</s>"]}
    else:  # plain completion
        conv = {"name": "LM", "system_template": "{system_message}", "system_message": "",
                "system_prefix_token_ids": bos, "add_role_after_system_message": True,
                "roles": {"user": "", "assistant": ""}, "seps": [""], "role_content_sep": "",
                "role_empty_sep": "", "stop_str": []}
    conv.update(role_templates={"user": "{user_message}", "assistant": "{assistant_message}",
                                "tool": "{tool_message}"},
                messages=[], stop_token_ids=list(cfg.eos_ids), strip_reasoning_in_history=False,
                function_string="", use_function_calling=False)
    order = ("name", "system_template", "system_message", "system_prefix_token_ids",
             "add_role_after_system_message", "roles", "role_templates", "messages", "seps",
             "role_content_sep", "role_empty_sep", "stop_str", "stop_token_ids",
             "strip_reasoning_in_history", "function_string", "use_function_calling")
    return {k: conv[k] for k in order if conv[k] is not None}  # Conversation.to_json_dict drops None


def _tokenizer_info(tokenizer_json: Path | None) -> dict:
    """What MLC's DetectTokenizerInfo reads off tokenizer.json (its defaults without one)."""
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False,
            "strip_space_in_decode": False}
    if tokenizer_json is None:
        return info
    try:
        tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeError(f"{tokenizer_json}: unreadable tokenizer.json ({e})") from None

    def parts(node: object, key: str) -> list[dict]:
        if not isinstance(node, dict):
            return []
        return (node.get(key) or []) if node.get("type") == "Sequence" else [node]

    decoders = parts(tok.get("decoder"), "decoders")
    if any(d.get("type") == "ByteLevel" for d in decoders):
        info["token_postproc_method"] = "byte_level"
    info["prepend_space_in_encode"] = any(
        n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in parts(tok.get("normalizer"), "normalizers"))
    info["strip_space_in_decode"] = any(
        d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1 and d.get("stop") == 0
        for d in decoders)
    return info


def _active_vocab_size(tokenizer_json: Path | None, vocab_size: int) -> int:
    """gen_config's len(tokenizer): the vocabulary with added tokens, else the model's."""
    if tokenizer_json is None:
        return vocab_size
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise EdgeError(f"{tokenizer_json}: cannot load tokenizer ({e})") from None


def _check_args(ckpt: Checkpoint, tokenizer_files: dict[str, Path], context_window: int,
                sliding_window: int | None, prefill_chunk: int) -> None:
    cfg = ckpt.config
    if cfg.dim % cfg.n_heads:
        raise EdgeError(f"MLC needs hidden size ({cfg.dim}) to be a multiple of the head count ({cfg.n_heads})")
    if sliding_window is not None and sliding_window <= 0:
        raise EdgeError(f"sliding window must be a positive integer, got {sliding_window}")
    if context_window <= 0 and not (context_window == -1 and sliding_window):
        raise EdgeError(f"context window must be a positive integer (or -1 with a sliding window), "
                        f"got {context_window}")
    if prefill_chunk <= 0:
        raise EdgeError(f"prefill chunk must be a positive integer, got {prefill_chunk}")
    for limit, what in ((context_window, "context window"), (sliding_window, "sliding window")):
        if limit is not None and limit > 0 and prefill_chunk > limit:
            raise EdgeError(f"prefill chunk ({prefill_chunk}) is larger than the {what} ({limit})")
    for name, path in tokenizer_files.items():
        if "/" in name or "\\" in name or not Path(path).is_file():
            raise EdgeError(f"tokenizer file {name!r} not found at {path}")


def _model_config(ckpt: Checkpoint, model_type: str, context_window: int, sliding_window: int | None,
                  prefill_chunk: int) -> dict:
    """`model_config` as MLC's LlamaConfig / MistralConfig.asdict() writes it (rope_theta
    becomes position_embedding_base)."""
    cfg = ckpt.config
    theta = int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta
    base = {"hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_attention_heads": cfg.n_heads,
            "num_hidden_layers": cfg.n_layers, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}
    if model_type == "mistral":
        return {**base, "position_embedding_base": theta, "num_key_value_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim, "context_window_size": context_window,
                "sliding_window_size": sliding_window, "prefill_chunk_size": prefill_chunk,
                "attention_sink_size": 0,  # plain sliding window, as our reference model computes
                "tensor_parallel_shards": 1, "max_batch_size": MAX_BATCH_SIZE}
    return {**base, "tie_word_embeddings": cfg.tied_embeddings, "position_embedding_base": theta,
            "rope_scaling": None, "context_window_size": context_window, "prefill_chunk_size": prefill_chunk,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "tensor_parallel_shards": 1,
            "pipeline_parallel_stages": 1, "max_batch_size": MAX_BATCH_SIZE, "disaggregation": False}


def write_mlc(checkpoint: Checkpoint, out_dir: Path, *, tokenizer_files: dict[str, Path], context_window: int,
              sliding_window: int | None, prefill_chunk: int) -> dict:
    """Write an MLC model directory (weights, tensor-cache.json, mlc-chat-config.json, tokenizer).

    A sliding window makes it MLC's "mistral" model (no attention sinks); without one
    it is "llama", which can tie the LM head to the embedding. `context_window` may be
    -1 with a sliding window: no limit on the sequence length, as MLC's Mistral default.
    """
    out_dir = Path(out_dir)
    _check_args(checkpoint, tokenizer_files, context_window, sliding_window, prefill_chunk)
    cfg = checkpoint.config
    model_type = "mistral" if sliding_window else "llama"

    shards = _ShardWriter(out_dir)
    n_tensors, param_bytes = 0, 0
    for name, arr in _mlc_params(checkpoint, with_lm_head=model_type == "mistral" or not cfg.tied_embeddings):
        shards.add(name, arr)
        n_tensors, param_bytes = n_tensors + 1, param_bytes + arr.nbytes
    shards.flush()
    bits_per_param = param_bytes * 8.0 / sum(math.prod(s) for _, s in expected_shapes(cfg))
    cache = {"metadata": {"ParamSize": n_tensors, "ParamBytes": float(param_bytes), "BitsPerParam": bits_per_param},
             "records": shards.shards}
    (out_dir / "tensor-cache.json").write_text(json.dumps(cache, indent=4))

    names = sorted(tokenizer_files, key=lambda n: (TOKENIZER_ORDER.index(n) if n in TOKENIZER_ORDER else 99, n))
    for name in names:
        shutil.copyfile(tokenizer_files[name], out_dir / name)
    tok_json = out_dir / "tokenizer.json" if "tokenizer.json" in tokenizer_files else None

    model_config = _model_config(checkpoint, model_type, context_window, sliding_window, prefill_chunk)
    eos = list(cfg.eos_ids)
    chat_config = {
        "version": CONFIG_VERSION, "model_type": model_type, "quantization": QUANTIZATION,
        "model_config": model_config, "vocab_size": cfg.vocab_size, "context_window_size": context_window,
        "sliding_window_size": model_config.get("sliding_window_size", -1), "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": model_config.get("attention_sink_size", -1), "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1, "active_vocab_size": _active_vocab_size(tok_json, cfg.vocab_size),
        **MLC_GENERATION_DEFAULTS, "tokenizer_files": names, "tokenizer_info": _tokenizer_info(tok_json),
        "conv_template": _conv_template(checkpoint), "pad_token_id": SYSTEM_DEFAULT_IDS["pad_token_id"],
        "bos_token_id": cfg.bos_id if cfg.bos_id is not None else SYSTEM_DEFAULT_IDS["bos_token_id"],
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "model_task": "chat", "embedding_metadata": None,
    }
    (out_dir / "mlc-chat-config.json").write_text(json.dumps(chat_config, indent=2))

    files = ["mlc-chat-config.json", "tensor-cache.json", *(s["dataPath"] for s in shards.shards), *names]
    return {"files": files, "model_type": model_type, "quantization": QUANTIZATION,
            "param_bytes": param_bytes, "bits_per_param": bits_per_param}
