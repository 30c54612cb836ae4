"""The MLC target against MLC-LLM's formats: tensor-cache shards, q4f16_1 layout, mlc-chat-config.

Expected names, shapes and config fields are written out here from MLC-LLM's Llama /
Mistral definitions and GroupQuantize, and the quantization is checked against a
float64 reference, so nothing below reuses the writer's own code to judge it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import checkpoint_of, tiny_hf_mistral
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from mistral_edge.errors import EdgeError
from mistral_edge.targets import mlc

DIM, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, WINDOW = 64, 4, 2, 16, 2, 128, 16
HIDDEN = 2 * DIM + 8  # the fixture's intermediate size, 136: not a multiple of 32, so groups are padded

# Fields without a default in MLC's MLCChatConfig, and every field LlamaConfig / MistralConfig.asdict() writes.
CHAT_REQUIRED = {"model_type", "quantization", "model_config", "vocab_size", "context_window_size",
                 "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
                 "conv_template"}
MISTRAL_FIELDS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps",
                  "vocab_size", "position_embedding_base", "num_key_value_heads", "head_dim", "context_window_size",
                  "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
                  "max_batch_size"}
LLAMA_FIELDS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps",
                "vocab_size", "tie_word_embeddings", "position_embedding_base", "rope_scaling",
                "context_window_size", "prefill_chunk_size", "num_key_value_heads", "head_dim",
                "tensor_parallel_shards", "pipeline_parallel_stages", "max_batch_size", "disaggregation"}


# --- readers of the format, as MLC's and TVM's loaders read it (test-only) --------------------------

def dequantize_q4f16_1(q_weight: np.ndarray, q_scale: np.ndarray, in_features: int | None = None) -> np.ndarray:
    """(code - 7) * scale in float16, MLC's dequantize; `in_features` drops group padding."""
    n = q_weight.shape[0]
    shifts = np.arange(mlc.PER_WORD, dtype=np.uint32) * 4
    codes = ((q_weight[..., None] >> shifts) & 0xF).reshape(n, -1).astype(np.float16)
    scale = np.repeat(q_scale.astype(np.float16), mlc.GROUP_SIZE, axis=1)
    out = (codes - np.float16(mlc.MAX_INT)) * scale
    return out if in_features is None else out[:, :in_features]


def read_mlc_params(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of an MLC directory, read through tensor-cache.json as TVM's loader does."""
    model_dir = Path(model_dir)
    try:
        cache = json.loads((model_dir / "tensor-cache.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeError(f"{model_dir}: no readable tensor-cache.json ({e})") from None
    params = {}
    for shard in cache["records"]:
        data = (model_dir / shard["dataPath"]).read_bytes()
        if shard["format"] != "raw-shard" or shard["nbytes"] != len(data):
            raise EdgeError(f"{shard['dataPath']}: corrupt shard (format {shard['format']!r}, "
                            f"{len(data)} bytes, index says {shard['nbytes']})")
        for rec in shard["records"]:
            start, end = rec["byteOffset"], rec["byteOffset"] + rec["nbytes"]
            if end > len(data):
                raise EdgeError(f"{rec['name']}: bytes {start}..{end} lie outside {shard['dataPath']}")
            if rec["dtype"] == "float32" and rec["format"] == mlc.ENCODE_FORMAT:  # stored as bfloat16 halves
                raw = np.frombuffer(data[start:end], np.uint16).astype(np.uint32) << 16
                arr = raw.view(np.float32)
            else:
                arr = np.frombuffer(data[start:end], np.dtype(rec["dtype"]))
            if arr.size != math.prod(rec["shape"]):
                raise EdgeError(f"{rec['name']}: {rec['nbytes']} bytes do not hold shape {rec['shape']}")
            params[rec["name"]] = arr.reshape(rec["shape"])
    return params


def _write(tmp_path, tied=False, window=WINDOW, **kw):
    model = tiny_hf_mistral(n_heads=HEADS, n_kv_heads=KV_HEADS, dim=DIM, layers=LAYERS, vocab=VOCAB,
                            window=WINDOW, tied=tied)
    ckpt = checkpoint_of(model)
    args = {"tokenizer_files": {}, "context_window": 256, "sliding_window": window, "prefill_chunk": 8, **kw}
    summary = mlc.write_mlc(ckpt, tmp_path, **args)
    return model, ckpt, summary


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlc")
    model, ckpt, summary = _write(out)
    return out, model, ckpt, summary


def _quantized(name, out, inp):
    groups = math.ceil(inp / 32)
    return [(f"{name}.q_weight", (out, 4 * groups), "uint32"), (f"{name}.q_scale", (out, groups), "float16")]


def _expected_params(lm_head: bool):
    """MLC's q4f16_1 Llama/Mistral parameters in export order: (name, shape, dtype)."""
    params = _quantized("model.embed_tokens", VOCAB, DIM)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        params += _quantized(p + "self_attn.qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM)
        params += _quantized(p + "self_attn.o_proj", DIM, HEADS * HEAD_DIM)
        params += _quantized(p + "mlp.gate_up_proj", 2 * HIDDEN, DIM)
        params += _quantized(p + "mlp.down_proj", DIM, HIDDEN)
        params += [(p + "input_layernorm.weight", (DIM,), "float16"),
                   (p + "post_attention_layernorm.weight", (DIM,), "float16")]
    params.append(("model.norm.weight", (DIM,), "float16"))
    return params + (_quantized("lm_head", VOCAB, DIM) if lm_head else [])


def _records(out):
    return [r for shard in json.loads((out / "tensor-cache.json").read_text())["records"] for r in shard["records"]]


def test_parameters_have_mlc_names_shapes_and_dtypes(mistral_dir):
    out, *_ = mistral_dir
    got = [(r["name"], tuple(r["shape"]), r["dtype"]) for r in _records(out)]
    assert got == _expected_params(lm_head=True)
    params = read_mlc_params(out)
    assert {n: (a.shape, str(a.dtype)) for n, a in params.items()} == {
        n: (s, d) for n, s, d in _expected_params(lm_head=True)}


def test_tensor_cache_index_is_consistent(mistral_dir):
    out, _, ckpt, summary = mistral_dir
    cache = json.loads((out / "tensor-cache.json").read_text())
    total = 0
    for shard in cache["records"]:
        data = (out / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        offset = 0
        for rec in shard["records"]:  # packed back to back, inside the file
            assert rec["byteOffset"] == offset
            assert rec["nbytes"] == math.prod(rec["shape"]) * np.dtype(rec["dtype"]).itemsize
            assert rec["format"] == "f32-to-bf16"  # convert_weight's encode format, on every record
            offset += rec["nbytes"]
        assert offset == len(data)
        total += offset
    meta = cache["metadata"]
    assert meta["ParamSize"] == len(_expected_params(lm_head=True))
    assert meta["ParamBytes"] == total == summary["param_bytes"]
    assert meta["BitsPerParam"] == pytest.approx(total * 8 / ckpt.n_params)
    assert 4 < meta["BitsPerParam"] < 6  # int4 codes plus one fp16 scale per 32, fp16 norms
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir())


def _unpack(q_weight):
    """Column j of a row is the 4-bit code at bits 4*(j % 8) of word j // 8."""
    cols = np.arange(q_weight.shape[1] * 8)
    return (q_weight[:, cols // 8] >> (4 * (cols % 8)).astype(np.uint32)) & 0xF


def _check_against_reference(q_weight, q_scale, w):
    w16 = w.astype(np.float16).astype(np.float64)
    n, k = w.shape
    groups = math.ceil(k / 32)
    padded = np.zeros((n, groups * 32))
    padded[:, :k] = w16
    scale = np.abs(padded.reshape(n, groups, 32)).max(-1) / 7
    np.testing.assert_allclose(q_scale.astype(np.float64), scale, rtol=1e-3)

    x = w16 / np.repeat(scale, 32, axis=1)[:, :k]
    ref = np.round(x)  # symmetric int4 in -7..7
    codes = _unpack(q_weight).astype(np.int64)
    assert (codes[:, k:] == 0).all() and codes.max() <= 14
    near_tie = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-2  # float16 arithmetic may round these either way
    assert near_tie.mean() < 0.05
    diff = codes[:, :k] - 7 - ref
    assert (diff[~near_tie] == 0).all() and (np.abs(diff) <= 1).all()

    deq = dequantize_q4f16_1(q_weight, q_scale, in_features=k).astype(np.float64)
    expect = ref * np.repeat(scale, 32, axis=1)[:, :k]
    np.testing.assert_allclose(deq[~near_tie], expect[~near_tie], rtol=2e-3, atol=1e-6)
    step = np.repeat(scale, 32, axis=1)[:, :k]
    assert (np.abs(deq - w) <= 0.5 * step * 1.02 + 1e-3 * np.abs(w)).all()  # within int4 rounding of the source


def test_q4f16_1_matches_reference_quantization_of_hf_weights(mistral_dir):
    """Fused QKV = q, k, v rows and gate_up = gate, up rows, straight from HF (rotate-half RoPE order)."""
    out, model, _, _ = mistral_dir
    hf = {n: t.detach().numpy() for n, t in model.state_dict().items()}
    params = read_mlc_params(out)
    sources = {"model.embed_tokens": hf["model.embed_tokens.weight"], "lm_head": hf["lm_head.weight"]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sources[p + "self_attn.qkv_proj"] = np.concatenate(
            [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        sources[p + "self_attn.o_proj"] = hf[p + "self_attn.o_proj.weight"]
        sources[p + "mlp.gate_up_proj"] = np.concatenate([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        sources[p + "mlp.down_proj"] = hf[p + "mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(params[p + f"{norm}.weight"], hf[p + f"{norm}.weight"].astype(np.float16))
    np.testing.assert_array_equal(params["model.norm.weight"], hf["model.norm.weight"].astype(np.float16))
    for name, w in sources.items():
        _check_against_reference(params[f"{name}.q_weight"], params[f"{name}.q_scale"], w)


def test_zero_group_and_packing_order():
    w = np.zeros((2, 40), np.float32)
    w[0, :8] = np.arange(-3, 5) * 0.5  # max |w| = 2, scale 2/7
    q_weight, q_scale = mlc.quantize_q4f16_1(w)
    assert q_weight.shape == (2, 8) and q_scale.shape == (2, 2)
    # codes of -1.5..2.0 at scale 2/7 are round(w*3.5)+7 = 2, 4, 5, 7, 9, 10, 12, 14: nibble r holds column r
    assert q_weight[0, 0] == sum(c << (4 * r) for r, c in enumerate([2, 4, 5, 7, 9, 10, 12, 14]))
    assert q_scale[1, 0] == 0 and q_weight[1, 0] == 0x77777777  # all-zero group: code 7, dequantizes to 0
    assert q_weight[0, 5] == 0  # columns 40.. are padding: code 0
    np.testing.assert_array_equal(dequantize_q4f16_1(q_weight, q_scale, in_features=40)[1], 0)


def test_mistral_chat_config(mistral_dir):
    out, _, ckpt, _ = mistral_dir
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert CHAT_REQUIRED <= cfg.keys()
    assert cfg["version"] == "0.1.0" and cfg["model_type"] == "mistral" and cfg["quantization"] == "q4f16_1"
    mc = cfg["model_config"]
    assert mc.keys() == MISTRAL_FIELDS
    assert mc == {
        "hidden_size": DIM, "intermediate_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "rms_norm_eps": ckpt.config.norm_eps, "vocab_size": VOCAB, "position_embedding_base": 10000,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "context_window_size": 256,
        "sliding_window_size": WINDOW, "prefill_chunk_size": 8, "attention_sink_size": 0,
        "tensor_parallel_shards": 1, "max_batch_size": 128}
    assert (cfg["vocab_size"], cfg["context_window_size"], cfg["sliding_window_size"]) == (VOCAB, 256, WINDOW)
    assert (cfg["prefill_chunk_size"], cfg["attention_sink_size"], cfg["tensor_parallel_shards"]) == (8, 0, 1)
    assert (cfg["temperature"], cfg["top_p"], cfg["repetition_penalty"]) == (1.0, 1.0, 1.0)
    assert cfg["bos_token_id"] == ckpt.config.bos_id and cfg["eos_token_id"] == ckpt.config.eos_ids[0]
    conv = cfg["conv_template"]
    assert conv["name"] == "LM" and 1 <= len(conv["seps"]) <= 2 and "user" in conv["roles"]
    assert conv["stop_token_ids"] == list(ckpt.config.eos_ids)
    assert cfg["tokenizer_files"] == [] and cfg["tokenizer_info"]["token_postproc_method"] == "byte_fallback"


def test_tied_llama_without_window(tmp_path):
    _, ckpt, summary = _write(tmp_path, tied=True, window=None, context_window=512, prefill_chunk=64)
    cfg = json.loads((tmp_path / "mlc-chat-config.json").read_text())
    assert cfg["model_type"] == summary["model_type"] == "llama"
    assert cfg["model_config"].keys() == LLAMA_FIELDS
    assert cfg["model_config"]["tie_word_embeddings"] is True
    assert (cfg["sliding_window_size"], cfg["attention_sink_size"], cfg["context_window_size"]) == (-1, -1, 512)
    got = [(r["name"], tuple(r["shape"]), r["dtype"]) for r in _records(tmp_path)]
    assert got == _expected_params(lm_head=False)  # MLC's Llama reuses the embedding as the LM head


def test_tied_mistral_gets_its_own_lm_head(tmp_path):
    """MLC's Mistral cannot tie, so the embedding is written again as lm_head."""
    _write(tmp_path, tied=True)
    params = read_mlc_params(tmp_path)
    np.testing.assert_array_equal(params["lm_head.q_weight"], params["model.embed_tokens.q_weight"])


def test_small_shard_cap_splits_like_tvm(tmp_path, mistral_dir, monkeypatch):
    """Under a 3000-byte cap: small records pack in order into shards under the cap; a record
    of half the cap or more that does not fit the pending shard is written alone, ahead of it."""
    cap = 3000
    monkeypatch.setattr(mlc, "SHARD_CAP_BYTES", cap)
    _write(tmp_path)
    shards = json.loads((tmp_path / "tensor-cache.json").read_text())["records"]
    assert [s["dataPath"] for s in shards] == [f"params_shard_{i}.bin" for i in range(len(shards))]
    alone = [s for s in shards if len(s["records"]) == 1 and 2 * s["nbytes"] >= cap]
    packed = [s for s in shards if s not in alone]
    assert len(alone) > 3 and len(packed) > 1
    assert all(s["nbytes"] < cap for s in packed)
    order = [name for name, _, _ in _expected_params(lm_head=True)]
    alone_names = [s["records"][0]["name"] for s in alone]
    packed_names = [r["name"] for s in packed for r in s["records"]]
    assert alone_names == [n for n in order if n in alone_names]
    assert packed_names == [n for n in order if n not in alone_names]
    assert "model.embed_tokens.q_weight" in alone_names  # 4096 bytes: larger than a shard
    reference = read_mlc_params(mistral_dir[0])
    params = read_mlc_params(tmp_path)
    assert params.keys() == reference.keys()
    for name, arr in reference.items():
        np.testing.assert_array_equal(params[name], arr)


def _byte_level_tokenizer(path):
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(path))


def _sentencepiece_style_tokenizer(path):
    tok = Tokenizer(models.BPE(vocab={"\u2581a": 0, "b": 1}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(path))


@pytest.mark.parametrize("make, info", [
    (_byte_level_tokenizer, ("byte_level", False, False)),
    (_sentencepiece_style_tokenizer, ("byte_fallback", True, True)),
])
def test_tokenizer_files_and_info(tmp_path, make, info):
    src = tmp_path / "src"
    src.mkdir()
    make(src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    model = tiny_hf_mistral(n_heads=HEADS, n_kv_heads=KV_HEADS, dim=DIM, layers=1, vocab=VOCAB, window=WINDOW)
    ckpt = checkpoint_of(model)
    ckpt.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    files = {"tokenizer_config.json": src / "tokenizer_config.json", "tokenizer.json": src / "tokenizer.json"}
    mlc.write_mlc(ckpt, out, tokenizer_files=files, context_window=64, sliding_window=WINDOW, prefill_chunk=16)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert cfg["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ti = cfg["tokenizer_info"]
    assert (ti["token_postproc_method"], ti["prepend_space_in_encode"], ti["strip_space_in_decode"]) == info
    assert cfg["active_vocab_size"] == Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(True)
    assert cfg["conv_template"]["name"] == "chatml" and cfg["conv_template"]["stop_str"] == ["<|im_end|>"]


@pytest.mark.parametrize("kw, message", [
    ({"prefill_chunk": 32}, "larger than the sliding window"),
    ({"context_window": 0}, "context window"),
    ({"context_window": -1, "sliding_window": None}, "context window"),
    ({"sliding_window": -4}, "sliding window"),
    ({"prefill_chunk": 0}, "prefill chunk"),
    ({"tokenizer_files": {"tokenizer.json": "/nonexistent/tokenizer.json"}}, "not found"),
])
def test_bad_arguments_raise_edge_error(tmp_path, kw, message):
    with pytest.raises(EdgeError, match=message):
        _write(tmp_path, **kw)
    assert not any(tmp_path.iterdir())  # refused before writing anything
