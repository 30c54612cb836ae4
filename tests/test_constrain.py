"""Constrained output: every reply of a random-weight model parses and validates under the
constraint (property tests over random schemas from docs/guardrails.md's subset), for a
SentencePiece and a byte-level BPE tokenizer; bad constraints are one `error:` line."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jsonschema
import numpy as np
import pytest
from helpers import SPM_V1, checkpoint_of, tiny_hf_mistral
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_edge.cli.main import run
from mistral_edge.errors import EdgeError
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.constrain import MISSING, Constraint
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.runtime.sampling import SamplingParams
from mistral_edge.targets.bundle import BundleRequest, write_bundle
from mistral_edge.targets.profiles import get_target

pytest.importorskip("llguidance")

BPE_VOCAB = 400


def _bpe_tokenizer(path):
    """A byte-level BPE tokenizer.json (every byte spellable), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ['{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "none": null}'] * 20
    tok.train_from_iterator(text + ["the quick brown fox jumps over the lazy dog 0123456789"] * 20, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def bundle(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        ck = checkpoint_of(tiny_hf_mistral(window=16, vocab=32000, dim=32))
        ck.tokenizer_files = {"tokenizer.model": SPM_V1}
    else:
        ck = checkpoint_of(tiny_hf_mistral(window=16, vocab=BPE_VOCAB, dim=32))
        ck.tokenizer_files = {"tokenizer.json": _bpe_tokenizer(root / "tokenizer.json")}
        ck.config = dataclasses.replace(ck.config, bos_id=0, eos_ids=(1,))
    write_bundle(ck, BundleRequest(get_target("cpu"), parse_quant("fp32"), chunk=5), root / "b", log=lambda _: None)
    return root / "b"


@pytest.fixture(scope="module")
def generator(bundle):
    b = Bundle.open(bundle)
    return Generator(b.session(), b.tokenizer())


def constrained(gen: Generator, constraint: Constraint, seed: int, budget: int = 400) -> str:
    """A sampled reply (temperature 1: random weights wander wherever the grammar lets them, so
    every pattern and schema here bounds its length)."""
    gen.session.reset()
    processor = constraint.processor(gen.tokenizer, gen.session.vocab_size)
    cfg = GenerationConfig(max_new_tokens=budget, sampling=SamplingParams(temperature=1.0, seed=seed))
    text = "".join(gen.stream(gen.tokenizer.encode("hello"), cfg, processor=processor))
    assert processor.complete, f"budget ran out: {text!r}"
    return text


# ---- the documented schema subset (docs/guardrails.md) ---------------------------------------------

NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=5)
LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.one_of(st.text(alphabet="xyz ", min_size=1, max_size=4), st.integers(-9, 9)),
             min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
)


def _object(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req),
                         "additionalProperties": False}))


SCHEMAS = st.recursive(LEAVES, lambda children: st.one_of(
    st.tuples(children, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}),
    _object(children)), max_leaves=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_every_constrained_reply_parses_and_validates(generator, schema, seed):
    text = constrained(generator, Constraint.json_schema(schema), seed)
    jsonschema.validate(json.loads(text), schema)


PATTERNS = st.sampled_from([r"[0-9]{1,4}", r"(yes|no)", r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)", r"-?[0-9]{1,4}\.[0-9]{2}",
                            r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=PATTERNS, seed=st.integers(0, 2**16))
def test_regex_replies_match_whole(generator, pattern, seed):
    assert re.fullmatch(pattern, constrained(generator, Constraint.regex(pattern), seed, budget=60))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.text(alphabet="abc xyz", min_size=1, max_size=8), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_choice_replies_are_one_of_the_options(generator, options, seed):
    """Options may begin with a space: a SentencePiece reply under a grammar keeps its leading one."""
    assert constrained(generator, Constraint.choice(options), seed, budget=60) in options


@pytest.mark.parametrize("seed", range(3))
def test_a_leading_space_of_the_match_is_kept(generator, seed):
    """SentencePiece decoding drops the first piece's leading space; a grammar's reply keeps it."""
    assert constrained(generator, Constraint.choice([" yes", " no"]), seed, budget=60) in (" yes", " no")
    assert re.fullmatch(r" [0-9]{2}", constrained(generator, Constraint.regex(r" [0-9]{2}"), seed, budget=60))


def test_the_hook_masks_every_step_and_ends_generation(generator):
    """A processor that allows one token and ends after three: exactly those three come out."""
    class Only:
        def __init__(self):
            self.seen = []

        def __call__(self, logits):
            masked = np.full_like(logits, -np.inf)
            masked[7] = 0.0
            return masked

        def accept(self, token):
            self.seen.append(token)
            return len(self.seen) < 3

    generator.session.reset()
    only = Only()
    got = list(generator.stream_ids([5, 6], GenerationConfig(max_new_tokens=10), processor=only))
    assert got == [7, 7, 7] and only.seen == got


def test_response_format():
    assert Constraint.response_format({"type": "text"}) is None
    assert Constraint.response_format({"type": "json_object"}).what == "the JSON schema"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert Constraint.response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) \
        == Constraint.json_schema(schema)
    with pytest.raises(EdgeError, match="unknown response_format type 'xml'"):
        Constraint.response_format({"type": "xml"})


# ---- bad constraints: one error line, before any model opens ----------------------------------------

@pytest.mark.parametrize("schema, message", [
    ('{"type": "foo"}', "invalid JSON schema"),
    ('{"type": 3}', "invalid JSON schema"),
    ('{"type": "string", "pattern": "(unclosed"}', "invalid JSON schema"),
    ('{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}', "invalid JSON schema"),
    ('[1, 2]', "a JSON schema must be an object"),
    ('{"type": ', "the JSON schema is not valid JSON"),
])
def test_invalid_schema_is_one_error_line(tmp_path, capsys, monkeypatch, schema, message):
    monkeypatch.setattr(Bundle, "open", lambda *a, **k: pytest.fail("opened a bundle"))
    path = tmp_path / "s.json"
    path.write_text(schema)
    assert run(["generate", "--bundle", str(tmp_path), "--json-schema", str(path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--regex", "(ab"], "invalid regular expression"),
    (["--regex", ""], "the regular expression is empty"),
    (["--choice", "a,,b"], "choices must be non-empty strings"),
    (["--regex", "a", "--choice", "b"], "--regex and --choice cannot be combined"),
    (["--json-schema", "/nonexistent/s.json"], "/nonexistent/s.json: No such file or directory"),
])
def test_invalid_constraint_options(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(Bundle, "open", lambda *a, **k: pytest.fail("opened a bundle"))
    assert run(["generate", "--bundle", str(tmp_path), *args, "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(EdgeError) as e:
        Constraint.regex("a+")
    assert str(e.value) == MISSING


def test_cli_constrained_reply_and_a_cut_short_one(bundle, capsys):
    assert run(["generate", "--bundle", str(bundle), "--choice", "red,green", "--temperature", "1", "hi"]) == 0
    assert capsys.readouterr().out in ("red\n", "green\n")
    assert run(["generate", "--bundle", str(bundle), "--regex", "[a-z]{20}", "--max-new-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == "error: the reply reached --max-new-tokens before it completed the regular expression\n"
