"""The typed manifest on its own (torch-free): round trip, digest, defaults, strict types."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest

from mistral_edge.errors import EdgeError
from mistral_edge.manifest import (BudgetRecord, FileEntry, GenerationDefaults, Manifest, QuantInfo, RuntimeSettings,
                                   Source, TokenizerInfo, Toolkit)
from mistral_edge.model.config import ModelConfig

SHA = "ab" * 32


def manifest(**changes) -> Manifest:
    fields = dict(
        format_version=2, toolkit=Toolkit("mistral-edge", "0.0"), target="android",
        source=Source("model.gguf", "gguf", None),
        config=ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=72, vocab_size=100),
        window=16, chunk=8, graph_contract=2, model="model.ort", quant=QuantInfo("int8", "nbits", {"output": "int8"}),
        activation_dtype="fp32", ops=("ai.onnx::MatMul",),
        runtime=RuntimeSettings(("CPUExecutionProvider",), {}, {"session.intra_op.allow_spinning": False},
                                converted_by="onnxruntime 1.22"),
        tokenizer=TokenizerInfo("tokenizer.json", 1, (2,), "{{ messages }}"), generation=GenerationDefaults(),
        memory_budget=BudgetRecord(10, 20, 30, 60, None),
        files=(FileEntry("model.ort", 5, SHA), FileEntry("tokenizer.json", 7, SHA)))
    return Manifest(**{**fields, **changes})


def test_round_trip_and_digest():
    m = manifest()
    j = m.to_json()
    body = {k: v for k, v in j.items() if k != "manifest_sha256"}
    assert j["manifest_sha256"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    back = Manifest.from_json(json.loads(json.dumps(j, indent=2)), "m")
    assert back == m and not back.edited and back.to_json() == j
    assert j["runtime"]["converted_by"] == "onnxruntime 1.22"
    assert "converted_by" not in manifest(runtime=RuntimeSettings(("CPUExecutionProvider",), {}, {})).to_json()["runtime"]
    assert back.runtime.config_entries == (("session.intra_op.allow_spinning", "0"),)
    j["tokenizer"]["eos_ids"] = [3]
    assert Manifest.from_json(j, "m").edited


def test_generation_defaults_are_the_documented_ones():
    assert dataclasses.asdict(GenerationDefaults()) == {"max_new_tokens": 256, "temperature": 0.0, "top_k": 0,
                                                         "top_p": 1.0, "repetition_penalty": 1.0}


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest().window = 32


@pytest.mark.parametrize("changes, message", [
    ({"model": "other.onnx"}, "model 'other.onnx' is not one of the listed (hashed) files"),
    ({"chunk": 17}, "chunk 17 must be between 1 and the window 16"),
    ({"activation_dtype": "bf16"}, "activation_dtype 'bf16'"),
    ({"files": (FileEntry("model.ort", 5, SHA),) * 2}, "files lists a path twice"),
    ({"tokenizer": TokenizerInfo("tokenizer.json", 100, (2,), None)}, "token id 100 is outside the vocabulary"),
])
def test_rules_between_fields(changes, message):
    with pytest.raises(EdgeError, match=re.escape(message)):
        manifest(**changes)


@pytest.mark.parametrize("path", ["/abs", "a//b", "./a", "a/..", "a\\b", ""])
def test_file_paths_must_be_plain_and_relative(path):
    with pytest.raises(EdgeError, match="not a plain relative path"):
        FileEntry(path, 1, SHA)
