"""Why llguidance: per-token cost of llguidance, xgrammar and outlines-core on this runtime's terms
(a tokenizer.json, numpy logits), replaying one fixed JSON reply token by token.

    pip install llguidance xgrammar outlines-core
    PYTHONPATH=$PWD python3 benchmarks/grammar_libraries.py TOKENIZER_JSON [--eos 2]

Each step computes the library's allowed-token set, applies it to a numpy logits row and
advances by the reply's next token (which must be allowed). Only llguidance is a dependency
(the `guard` extra); the other two are installed just to run this comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "ok": {"type": "boolean"}}}
REPLY = '{"name": "Ada Lovelace wrote the first program", "age": 36, "tags": ["math", "engines", "notes"], "ok": true}'


def masked(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Logits with the tokens a 32-bit-word bitmask forbids at -inf."""
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:logits.size].view(bool)
    return np.where(allowed, logits, np.float32(-np.inf))


def llguidance_steps(path: str, eos: int):
    import llguidance
    import llguidance.numpy as lln

    tok = llguidance.LLTokenizer(Path(path).read_text(encoding="utf-8"), eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)

    def start():
        return llguidance.LLMatcher(tok, grammar)

    def step(m, logits, t):
        lln.fill_next_token_bitmask(m, mask, 0)
        assert np.isfinite(masked(logits, mask[0])[t]) and m.consume_token(t)
    return start, step


def xgrammar_steps(path: str, eos: int):
    import tokenizers
    import xgrammar as xgr

    hf = tokenizers.Tokenizer.from_file(path)
    v = hf.get_vocab_size(with_added_tokens=True)
    info = xgr.TokenizerInfo([hf.id_to_token(i) for i in range(v)], vocab_type=xgr.VocabType.BYTE_LEVEL,
                             vocab_size=v, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    mask = xgr.allocate_token_bitmask(1, v)

    def step(m, logits, t):
        m.fill_next_token_bitmask(mask)
        assert np.isfinite(masked(logits, mask.numpy()[0])[t]) and m.accept_token(t)
    return (lambda: xgr.GrammarMatcher(compiled)), step


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    raw = printable + [b for b in range(256) if b not in printable]
    return {chr(c): b for b, c in zip(raw, chars)}


def outlines_steps(path: str, eos: int):
    import tokenizers
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    hf, dec = tokenizers.Tokenizer.from_file(path), _byte_decoder()
    vocab: dict[bytes, list[int]] = {}
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        piece = hf.id_to_token(i)
        if i != eos:
            key = bytes(dec[c] for c in piece) if all(c in dec for c in piece) else piece.encode()
            vocab.setdefault(key, []).append(i)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, vocab))

    def step(g, logits, t):
        allowed = np.asarray(g.get_tokens())
        row = np.full_like(logits, -np.inf)
        row[allowed] = logits[allowed]
        assert np.isfinite(row[t])
        g.advance(t)
    return (lambda: Guide(index)), step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizer")
    ap.add_argument("--eos", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(args.tokenizer)
    ids = hf.encode(REPLY, add_special_tokens=False).ids
    logits = np.random.default_rng(0).standard_normal(hf.get_vocab_size(with_added_tokens=True)).astype(np.float32)
    for name, make in (("llguidance", llguidance_steps), ("xgrammar", xgrammar_steps),
                       ("outlines-core", outlines_steps)):
        try:
            begin = time.perf_counter()
            start, step = make(args.tokenizer, args.eos)
            setup = time.perf_counter() - begin
        except ImportError as e:
            print(f"{name}: not installed ({e.name})", file=sys.stderr)
            continue
        best = float("inf")
        for _ in range(args.runs):
            state = start()
            t0 = time.perf_counter()
            for t in ids:
                step(state, logits, t)
            best = min(best, (time.perf_counter() - t0) / len(ids))
        print(f"{name:<14} setup {setup:6.2f} s   {best * 1e6:7.0f} us/token (best of {args.runs}, {len(ids)} tokens)")


if __name__ == "__main__":
    main()
