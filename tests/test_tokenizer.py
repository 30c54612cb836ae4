"""Tokenizer and StreamDecoder against references: mistral-common for Mistral's SentencePiece model,
transformers' GGUF tokenizer for the demo model (SmolLM2, byte-level BPE)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
from helpers import SPM_V1
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from mistral_edge.errors import EdgeError
from mistral_edge.tokenizer import StreamDecoder, Tokenizer

TEXT = "Héllo wörld! Ça va? 你好，世界 🤖🎉 naïve — ok\n  indented\tx 👩‍👩‍👧 end"


@functools.cache
def smol_reference(basetemp: Path):
    """(transformers' tokenizer for the demo GGUF, the tokenizer.json it converts to), built once per
    session (test_chat.py shares it) under pytest's session temp directory."""
    from transformers import AutoTokenizer

    from mistral_edge.model.loaders.default import default_model_path

    path = default_model_path()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    out = basetemp / "smol-tokenizer" / "tokenizer.json"
    out.parent.mkdir()
    ref.backend_tokenizer.save(str(out))
    return ref, out


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    ref, path = smol_reference(tmp_path_factory.getbasetemp())
    return ref, Tokenizer.from_files({"tokenizer.json": path}, bos_id=ref.bos_token_id, eos_ids=(ref.eos_token_id,))


@pytest.fixture(scope="session")
def spm():
    return Tokenizer.from_files({"tokenizer.model": SPM_V1})


@pytest.fixture(scope="session")
def mistral_ref():
    return MistralTokenizer.from_file(str(SPM_V1)).instruct_tokenizer.tokenizer


def test_sentencepiece_matches_mistral_common(spm, mistral_ref):
    assert spm.kind == "sentencepiece" and spm.vocab_size == 32000
    assert (spm.bos_id, spm.eos_ids, spm.bos_token, spm.eos_token) == (1, (2,), "<s>", "</s>")
    for text in (TEXT, "Hello world", "  two leading spaces", ""):
        assert spm.encode(text) == mistral_ref.encode(text, bos=True, eos=False)
        assert spm.encode(text, add_bos=False) == mistral_ref.encode(text, bos=False, eos=False)
        assert spm.decode(spm.encode(text)) == text
    assert spm.token_to_id("<s>") == 1 and spm.token_to_id("▁world") == 1526
    assert spm.token_to_id("no-such-piece") is None and spm.id_to_token(2) == "</s>"


def test_demo_tokenizer_matches_transformers(smol):
    ref, tok = smol
    assert tok.kind == "tokenizers" and tok.vocab_size == len(ref) == 49152
    assert tok.bos_token == "<|im_start|>" and tok.eos_ids == (2,) and tok.eos_token == "<|im_end|>"
    # SmolLM2 adds no BOS (add_bos_token is false in the GGUF), so neither do we, even with add_bos.
    assert not tok.adds_bos
    for text in (TEXT, "Hello world", "  two leading spaces"):
        assert tok.encode(text) == ref(text).input_ids == tok.encode(text, add_bos=False)
        assert tok.decode(tok.encode(text)) == text == ref.decode(ref(text).input_ids)
    assert tok.decode([*tok.encode("hi"), 2]) == "hi"  # special tokens dropped
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("no-such-token") is None


def _bos_adding_json(tmp_path, bos_in_processor: bool):
    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    if bos_in_processor:
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path, hf


@pytest.mark.parametrize("bos_in_processor", [True, False])
def test_tokenizer_json_bos_follows_post_processor_once(tmp_path, bos_in_processor):
    path, hf = _bos_adding_json(tmp_path, bos_in_processor)
    tok = Tokenizer.from_files(tmp_path)  # a directory works too
    assert tok.adds_bos is bos_in_processor and tok.bos_id == (0 if bos_in_processor else None)
    assert tok.encode("hello world") == hf.encode("hello world").ids == ([0, 2, 3] if bos_in_processor else [2, 3])
    assert tok.encode("hello world", add_bos=False) == [2, 3]
    # The model config's bos_id is used, but only adds a BOS where the tokenizer's convention does.
    assert Tokenizer.from_files({"tokenizer.json": path}, bos_id=0).encode("hello") == hf.encode("hello").ids


def test_from_files_picks_and_rejects(tmp_path):
    shutil.copy(SPM_V1, tmp_path / "tokenizer.model.v1")
    tok = Tokenizer.from_files(tmp_path)
    assert tok.kind == "sentencepiece" and tok.path == tmp_path / "tokenizer.model.v1"
    assert Tokenizer.from_files(tmp_path, bos_id=5, eos_ids=[7, 8]).encode("a")[0] == 5
    _bos_adding_json(tmp_path, True)
    assert Tokenizer.from_files(tmp_path).kind == "tokenizers"  # tokenizer.json wins
    with pytest.raises(EdgeError, match="no tokenizer found"):
        Tokenizer.from_files({"config.json": tmp_path / "config.json"})
    with pytest.raises(EdgeError, match="not found"):
        Tokenizer.from_files({"tokenizer.model": tmp_path / "missing.model"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(EdgeError, match="unreadable tokenizer"):
        Tokenizer.from_files(tmp_path / "bad")


def _stream(tok, ids):
    dec = StreamDecoder(tok)
    return [dec.add(i) for i in ids]


@pytest.mark.parametrize("which", ["spm", "smol"])
def test_streaming_equals_full_decode(which, spm, smol):
    tok = spm if which == "spm" else smol[1]
    for text in (TEXT, "Été: 日本語のテキスト、😀😃😄 ok", "a\n\n  b  "):
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
    # The emoji really is split over byte tokens (each alone decodes to a replacement character),
    # and the decoder holds them back until the character is complete.
    ids = tok.encode("🤖", add_bos=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 2
    assert _stream(tok, ids) == [""] * (len(ids) - 1) + ["🤖"]


def test_streaming_keeps_sentencepiece_spaces(spm):
    ids = spm.encode("Hello big world")
    assert _stream(spm, ids) == ["", "Hello", " big", " world"]
    # Generated text continues a prompt: the first piece keeps its space when it follows other tokens.
    dec = StreamDecoder(spm)
    out = [dec.add(i) for i in spm.encode("x y", add_bos=False)]
    assert out == ["x", " y"]


def test_flush_returns_an_incomplete_tail(spm):
    ids = spm.encode("ok 🤖", add_bos=False)
    dec = StreamDecoder(spm)
    pieces = [dec.add(i) for i in ids[:-1]]
    assert "".join(pieces) == "ok " and dec.flush() == spm.decode(ids[:-1])[len("ok "):] and dec.flush() == ""
