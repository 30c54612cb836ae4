"""Self-reflection moderation: a score per category and a verdict read from them, an empty cache
after each check, the `moderate` exit codes, `--moderate` refusals, and the evaluation set's shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_bundle

from mistral_edge.chat_format import ChatFormat
from mistral_edge.cli.main import run
from mistral_edge.errors import EdgeError
from mistral_edge.runtime import moderate as moderation
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.runtime.moderate import (ACCEPTABLE, DEFAULT_REFUSAL, LABELS, Guard, Moderator, Verdict,
                                           calibrated)

EVAL = Path(__file__).parent.parent / "benchmarks" / "moderation" / "eval.jsonl"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("moderate") / "b"
    write_tiny_bundle(out)
    return out


@pytest.fixture(scope="module")
def opened(bundle):
    b = Bundle.open(bundle)
    return Generator(b.session(), b.tokenizer()), ChatFormat.from_manifest(b.manifest)


def test_a_score_per_category_and_the_verdict_is_their_argmax(opened):
    gen, fmt = opened
    v = Moderator(gen, fmt).classify("How do I kill a Linux process?")
    assert list(v.scores) == list(LABELS) and abs(sum(v.scores.values()) - 1) < 1e-9
    assert v.category == max(v.scores, key=v.scores.get) and v.acceptable == (v.category == ACCEPTABLE)


def test_scores_are_the_label_tokens_next_token_softmax(opened):
    gen, fmt = opened
    m = Moderator(gen, fmt)
    ids = fmt.encode(moderation.moderation_messages("hello"), gen.tokenizer)
    gen.session.reset()
    logits = np.asarray(gen.prefill(ids), np.float64)[m.label_ids]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose([m.classify("hello").scores[k] for k in LABELS], expected)


def test_classify_leaves_an_empty_cache(opened):
    """The same answer twice, and a generation afterwards equals one on a fresh cache."""
    gen, fmt = opened
    m = Moderator(gen, fmt)
    assert m.classify("a text") == m.classify("a text")
    cfg = GenerationConfig(max_new_tokens=5)
    gen.session.reset()
    fresh = list(gen.stream_ids([10, 11, 12], cfg))
    m.classify("another text", reply="a reply")
    assert list(gen.stream_ids([10, 11, 12], cfg)) == fresh


def test_calibration_divides_by_the_content_free_scores(opened):
    v = Verdict("illegal", {"acceptable": 0.2, "illegal": 0.4, "hateful": 0.2, "advice": 0.2})
    prior = Verdict("illegal", {"acceptable": 0.1, "illegal": 0.6, "hateful": 0.2, "advice": 0.1})
    c = calibrated(v, prior)
    assert c.category == "acceptable" and abs(sum(c.scores.values()) - 1) < 1e-9
    assert c.scores["acceptable"] == pytest.approx(c.scores["advice"])
    gen, fmt = opened
    m = Moderator(gen, fmt, calibrate=True)
    assert m.prior == Moderator(gen, fmt).classify(moderation.CONTENT_FREE)
    assert m.classify(moderation.CONTENT_FREE).scores == pytest.approx({k: 0.25 for k in LABELS})


def test_labels_sharing_a_first_token_are_refused(opened):
    gen, fmt = opened

    class SameFirst:
        def encode(self, text, add_bos=True):
            return [5, len(text)]

    class Gen:
        tokenizer, session = SameFirst(), gen.session

    with pytest.raises(EdgeError, match="share a first token"):
        Moderator(Gen(), fmt)


def _always(monkeypatch, category: str, seen: list | None = None):
    def classify(self, text, reply=None):
        if seen is not None:
            seen.append((text, reply))
        return Verdict(category, {k: float(k == category) for k in LABELS})
    monkeypatch.setattr(Moderator, "classify", classify)


def test_moderate_exit_status_follows_the_verdict(bundle, capsys, monkeypatch):
    assert run(["moderate", "--bundle", str(bundle), "--json", "some text"]) in (0, 3)
    real = json.loads(capsys.readouterr().out)
    assert set(real["scores"]) == set(LABELS) and real["verdict"] in LABELS
    for category, status in (("acceptable", 0), ("illegal", 3), ("hateful", 3), ("advice", 3)):
        _always(monkeypatch, category)
        assert run(["moderate", "--bundle", str(bundle), "text"]) == status
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"verdict: {category}" and len(out) == 1 + len(LABELS)


def test_generate_refuses_an_unacceptable_request_before_generating(bundle, capsys, monkeypatch):
    _always(monkeypatch, "illegal")
    monkeypatch.setattr(Generator, "stream", lambda *a, **k: pytest.fail("generated a refused request"))
    assert run(["generate", "--bundle", str(bundle), "--moderate", "input", "--refusal", "Not that.", "x"]) == 3
    assert capsys.readouterr().out == "Not that.\n"


def test_generate_output_moderation_sees_the_reply(bundle, capsys, monkeypatch):
    seen = []
    _always(monkeypatch, "hateful", seen)
    assert run(["generate", "--bundle", str(bundle), "--moderate", "output", "--max-new-tokens", "3", "hi"]) == 3
    assert capsys.readouterr().out == DEFAULT_REFUSAL + "\n"
    assert len(seen) == 1 and seen[0][0] == "hi" and seen[0][1] is not None  # the reply, not the request
    _always(monkeypatch, "acceptable")
    assert run(["generate", "--bundle", str(bundle), "--moderate", "both", "--max-new-tokens", "3", "hi"]) == 0
    assert run(["generate", "--bundle", str(bundle), "--max-new-tokens", "3", "hi"]) == 0
    plain_with, plain = capsys.readouterr().out.split("\n")[:2]
    assert plain_with == plain  # an acceptable reply comes out unchanged


def test_chat_keeps_a_refused_request_out_of_the_conversation(opened, monkeypatch):
    from mistral_edge.cli.generate import _guarded_turn
    from mistral_edge.runtime.chat import ChatEngine

    gen, fmt = opened
    engine = ChatEngine(gen, lambda messages: fmt.encode(messages, gen.tokenizer))
    _always(monkeypatch, "illegal")
    cfg = GenerationConfig(max_new_tokens=3)
    assert _guarded_turn(engine, Guard(Moderator(gen, fmt), "input", "No."), "bad", cfg) == "No."
    assert engine.messages == [] and engine.fed == []
    assert _guarded_turn(engine, Guard(Moderator(gen, fmt), "output", "No."), "ok?", cfg) == "No."
    assert engine.messages[-1] == {"role": "assistant", "content": "No."} and engine.fed == []


@pytest.mark.parametrize("args, message", [
    (["--moderate", "sideways"], "unknown --moderate 'sideways'; expected input, output, both"),
    (["--refusal", "No."], "--refusal applies with --moderate"),
])
def test_bad_moderation_options(tmp_path, capsys, args, message):
    assert run(["generate", "--bundle", str(tmp_path), *args, "hi"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_evaluation_set():
    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 200 and len({r["id"] for r in rows}) == len({r["text"] for r in rows}) == len(rows)
    counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    assert {r["label"] for r in rows} == set(LABELS) and min(counts.values()) >= 40
    assert abs(2 * counts[ACCEPTABLE] - len(rows)) <= 10  # about balanced, as the paper's set
    assert sum(bool(r.get("alarming")) for r in rows if r["label"] == ACCEPTABLE) >= 40


def test_moderation_works_with_a_template_that_refuses_a_system_turn(opened):
    """Mistral's own templates raise on a system message: the moderation prompt is one user turn."""
    gen, _ = opened
    strict = ChatFormat("{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                        "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    assert set(Moderator(gen, strict).classify("hello", reply="hi").scores) == set(LABELS)
