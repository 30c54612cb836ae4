"""Fixtures shared by tests: tiny random Mistral models in the formats users bring."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

from mistral_edge.model.checkpoint import Checkpoint
from mistral_edge.model.loaders.hf import canonical_name, config_from_hf
from mistral_edge.model.weights import Weights, half_to_interleaved


W = 16
"""The window of the tiny fixtures: small, so a few dozen tokens wrap the rolling cache."""
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
"""WikiText-2 beside the checkout (../shared/data): evaluate on the test split, calibrate on valid."""
TEST_TEXT, VALID_TEXT = WIKI / "wiki.test.tokens", WIKI / "wiki.valid.tokens"
needs_wiki = pytest.mark.skipif(not TEST_TEXT.is_file(), reason="WikiText-2 not in ../shared/data")


def chunked_logits(session, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """[B, T, V] logits of every position, the [B, T] tokens fed `chunk` at a time (any Session)."""
    return np.concatenate([session.step(tokens[:, s:s + chunk], all_logits=True).copy()
                           for s in range(0, tokens.shape[1], chunk)], 1)


def tiny_hf_mistral(n_heads: int = 4, n_kv_heads: int = 2, window: int = 16, vocab: int = 128,
                    dim: int = 32, layers: int = 2, seed: int = 0, tied: bool = False) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim + 8, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=dim // n_heads,
        sliding_window=window, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=tied, attn_implementation="eager",
    )
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so attention patterns matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def checkpoint_of(model: MistralForCausalLM) -> Checkpoint:
    cfg = config_from_hf({**model.config.to_dict(), "architectures": ["MistralForCausalLM"]})
    return Checkpoint(cfg, Weights.of(model.state_dict()).renamed(canonical_name), source="fixture", source_format="hf")



def write_tiny_hf_dir(path: Path, window: int) -> Path:
    """A tiny Mistral Hugging Face directory with a SentencePiece tokenizer (for --model paths)."""
    tiny_hf_mistral(window=window, vocab=32000, dim=64).save_pretrained(path)
    shutil.copy(SPM_V1, path / "tokenizer.model")
    return path


def write_tiny_bundle(out: Path) -> Checkpoint:
    """The fp32 cpu bundle most runtime tests share: the tiny Mistral (W, vocabulary 32000) with
    mistral-common's SentencePiece tokenizer, chunk 5. Returns the checkpoint it was made from."""
    from mistral_edge.quantize.spec import parse_quant
    from mistral_edge.targets.bundle import write_bundle
    from mistral_edge.targets.profiles import get_target
    from mistral_edge.targets.request import BundleRequest

    ck = checkpoint_of(tiny_hf_mistral(window=W, vocab=32000, dim=32))
    ck.tokenizer_files = {"tokenizer.model": SPM_V1}
    write_bundle(ck, BundleRequest(get_target("cpu"), parse_quant("fp32"), chunk=5), out, log=lambda _: None)
    return ck

FP16_TOL = 0.005
"""fp16 graphs: max |logit error| relative to the largest |logit| (measured on the fixtures: at
most 0.0013 against the reference on the same weights)."""


def assert_close(got, expected, activations: str, fp32_tol: float = 1e-4, fp16_tol: float = FP16_TOL,
                 top1: float = 0.98) -> None:
    """fp32 graphs equal the expected logits to float rounding; fp16 ones to `fp16_tol` of the
    logit scale, with the same top token at `top1` of positions or more (near-ties may flip)."""
    err = abs(got - expected).max()
    if activations == "fp32":
        assert err < fp32_tol
    else:
        assert err < fp16_tol * abs(expected).max()
        agree = (got.argmax(-1) == expected.argmax(-1)).mean()
        assert agree >= top1, f"top-1 agreement {agree:.3f}"


# --- Checkpoints on disk in the layouts users bring (tests/test_loaders.py) ---------------------

SPM_V1 = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
"""mistral-common's bundled Mistral 7B SentencePiece tokenizer (32000 pieces)."""


def save_mistral_inference(model: MistralForCausalLM, path: Path) -> Path:
    """Mistral's own layout: params.json + consolidated.safetensors with wq/wk rows interleaved."""
    ck = checkpoint_of(model)
    c = ck.config
    weights = dict(ck.weights)
    for i in range(c.n_layers):
        for name, heads in (("wq", c.n_heads), ("wk", c.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            weights[key] = half_to_interleaved(weights[key], heads)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "consolidated.safetensors")
    params = {"dim": c.dim, "n_layers": c.n_layers, "head_dim": c.head_dim, "hidden_dim": c.hidden_dim,
              "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "norm_eps": c.norm_eps, "vocab_size": c.vocab_size,
              "rope_theta": c.rope_theta, "sliding_window": c.sliding_window}
    (path / "params.json").write_text(json.dumps(params))
    return path


# llama.cpp's convert_hf_to_gguf.py names, written out here rather than taken from the loader.
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up"}


def _gguf_name(hf_name: str) -> tuple[str, str]:
    """(tensor kind like 'attn_q', full GGUF name like 'blk.0.attn_q.weight')."""
    if hf_name in _GGUF_TOP:
        kind = _GGUF_TOP[hf_name]
        return kind, f"{kind}.weight"
    _, _, i, rest = hf_name.split(".", 3)
    kind = _GGUF_LAYER[rest.removesuffix(".weight")]
    return kind, f"blk.{i}.{kind}.weight"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved RoPE pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_spm_vocab(writer: gguf.GGUFWriter, spm_path: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    T = gguf.TokenType

    def kind(i: int) -> int:
        return (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
                else T.UNUSED if sp.is_unused(i) else T.NORMAL)

    n = sp.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([kind(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())


def save_gguf(model, path: Path, qtypes: dict | None = None, spm: Path | None = None,
              chat_template: str | None = None, arch: str = "llama", metadata: dict | None = None,
              endianess=gguf.GGUFEndian.LITTLE) -> dict[str, torch.Tensor]:
    """Write a tiny HF Llama/Mistral as llama.cpp would; returns its state dict as stored.

    `qtypes` maps a tensor kind ('attn_q', 'ffn_down', 'token_embd', ...) to its GGML type
    (default F32). The returned tensors are quantized and dequantized back, in HF row order:
    blocks run along rows and the wq/wk permutation only moves whole rows, so quantizing
    before or after it gives the same values. `metadata` replaces or adds keys, each as
    (value, GGUFValueType) or (value, ARRAY, item type), for files that lie about themselves.
    """
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if spm is None:
        writer.add_vocab_size(cfg.vocab_size)
    else:
        _write_spm_vocab(writer, spm)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    Q = gguf.GGMLQuantizationType
    stored = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        kind, gguf_name = _gguf_name(name)
        w = t.float().numpy()
        if kind in ("attn_q", "attn_k"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
        qtype = (qtypes or {}).get(kind, Q.F32)
        if qtype in (Q.F32, Q.F16):
            data = w.astype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor(gguf_name, data)
        else:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(gguf.quants.quantize(t.float().numpy(), qtype), qtype)
        stored[name] = torch.from_numpy(np.array(back, dtype=np.float32))
    for key, (value, *types) in (metadata or {}).items():
        writer.kv_data[0][key] = gguf.GGUFValue(value, *types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
