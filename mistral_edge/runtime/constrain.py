"""Grammar-constrained decoding: the reply must match a JSON schema, a regular expression or
one of a few strings.

The grammar library is llguidance (the `guard` extra), chosen over xgrammar and outlines-core by
measured cost per token on this runtime (docs/guardrails.md); it reads a tokenizer.json as is,
needs no torch, and works on numpy logits. A `Constraint` is the checked grammar, built once;
`processor()` gives the per-generation state the Generator's sampling loop calls.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeError, first_line
from ..tokenizer import Tokenizer

MISSING = "constrained output needs llguidance: pip install 'mistral-edge[guard]'"
MAX_SCHEMA_BYTES = 1 << 20
"""A schema file larger than this is refused before it is read (schemas are hand-written, small)."""
MAX_CHOICES, MAX_PATTERN = 256, 4096
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON is written on one line, `{"a": 1, "b": [2, 3]}`: no whitespace for the model to wander in."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise EdgeError(MISSING) from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A grammar in llguidance's serialized form, already validated; `what` names it in messages."""

    grammar: str
    what: str

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        """Replies that parse as JSON and validate against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise EdgeError(f"the JSON schema is not valid JSON ({first_line(e)})") from None
        if not isinstance(schema, dict):
            raise EdgeError(f"a JSON schema must be an object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise EdgeError(f"invalid JSON schema: {_brief(e)}") from None
        return cls._checked(grammar, "the JSON schema")

    @classmethod
    def schema_file(cls, path: Path) -> Constraint:
        try:
            if path.stat().st_size > MAX_SCHEMA_BYTES:
                raise EdgeError(f"{path}: a JSON schema over {MAX_SCHEMA_BYTES} bytes is refused")
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise EdgeError(f"{path}: {e.strerror or type(e).__name__}") from None
        except UnicodeDecodeError:
            raise EdgeError(f"{path}: not UTF-8 text") from None
        try:
            return cls.json_schema(text)
        except EdgeError as e:
            raise EdgeError(f"{path}: {e}") from None

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Replies that match `pattern` as a whole (Rust regex syntax, no look-around or back-references)."""
        if not isinstance(pattern, str) or not pattern:
            raise EdgeError("the regular expression is empty")
        if len(pattern) > MAX_PATTERN:
            raise EdgeError(f"a regular expression over {MAX_PATTERN} characters is refused")
        return cls._checked(_llguidance().LLMatcher.grammar_from_regex(pattern), "the regular expression")

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """Replies that are exactly one of `options`."""
        options = list(options)
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise EdgeError("choices must be non-empty strings, at least one")
        if len(options) > MAX_CHOICES:
            raise EdgeError(f"at most {MAX_CHOICES} choices, got {len(options)}")
        alternatives = " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return cls._checked(_llguidance().LLMatcher.grammar_from_lark(f"start: {alternatives}"), "the choices")

    @classmethod
    def response_format(cls, spec: dict) -> Constraint | None:
        """An OpenAI `response_format`: {'type': 'text'} (no constraint), {'type': 'json_object'} or
        {'type': 'json_schema', 'json_schema': {'schema': {...}, ...}}."""
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_schema({"type": "object"})
        if kind == "json_schema":
            inner = spec.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner:
                raise EdgeError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
            return cls.json_schema(inner["schema"])
        raise EdgeError(f"unknown response_format type {kind!r}; expected text, json_object or json_schema")

    @classmethod
    def _checked(cls, grammar: str, what: str) -> Constraint:
        """llguidance reports a bad grammar as text, never by raising: turn it into one line."""
        error = _llguidance().LLMatcher.validate_grammar(grammar)
        if error:
            raise EdgeError(f"invalid {what.removeprefix('the ')}: {_brief(error)}")
        return cls(grammar, what)

    def processor(self, tokenizer: Tokenizer, vocab_size: int) -> GrammarProcessor:
        """Fresh state for one generation over logits of `vocab_size` (the model's, which may pad
        the tokenizer's vocabulary)."""
        return GrammarProcessor(self, _ll_tokenizer(tokenizer, vocab_size))


def _brief(message) -> str:
    """llguidance's multi-line messages (the detail is on the later lines) as one bounded line."""
    line = " ".join(str(message).split())
    return line if len(line) <= 300 else line[:297] + "..."


class GrammarProcessor:
    """runtime/generate.py's LogitsProcessor for one Constraint: masks what the grammar forbids next."""

    def __init__(self, constraint: Constraint, ll_tokenizer):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(ll_tokenizer, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise EdgeError(f"invalid {constraint.what.removeprefix('the ')}: {_brief(self.matcher.get_error())}")
        self.what = constraint.what
        self.mask = llg.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        self._fill = llg.numpy.fill_next_token_bitmask

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        self._fill(self.matcher, self.mask, 0)
        if self.matcher.is_error():
            raise EdgeError(f"constrained decoding failed: {_brief(self.matcher.get_error())}")
        allowed = np.unpackbits(self.mask[0].view(np.uint8), bitorder="little")[:logits.shape[-1]].view(bool)
        return np.where(allowed, logits, np.float32(-np.inf))

    def accept(self, token: int) -> bool:
        if not self.matcher.consume_token(token):
            raise EdgeError(f"constrained decoding failed: {_brief(self.matcher.get_error())}")
        return not self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole match (False when the token budget cut it short)."""
        return self.matcher.is_accepting()


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""llguidance's view of each Tokenizer, by vocabulary size: building one takes about a second."""


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    cached = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in cached:
        llg = _llguidance()
        eos = list(tokenizer.eos_ids) or None
        try:
            if tokenizer.kind == "tokenizers":
                cached[vocab_size] = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=eos)
            else:
                cached[vocab_size] = llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceBytes(tokenizer)),
                                                     n_vocab=vocab_size, eos_token=eos)
        except (ValueError, RuntimeError) as e:
            raise EdgeError(f"llguidance cannot use this tokenizer: {first_line(e)}") from None
    return cached[vocab_size]


class _SentencePieceBytes:
    """A SentencePiece vocabulary as llguidance wants it: each piece's bytes ('▁' is a space,
    '<0xNN>' one byte), control and unknown pieces marked special (a 0xFF prefix, llguidance's mark)."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp
        self.eos_token_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(sp.get_piece_size()) if _special(sp, i)]
        self.tokens = [_piece_bytes(sp, i) for i in range(sp.get_piece_size())]
        self._sp = sp
        self._mark = sp.encode(_MARK)

    def __call__(self, text: str) -> list[int]:
        """Ids whose bytes are exactly `text`'s: SentencePiece adds a space in front of a sequence,
        so encode after a marker piece and drop it; bytes in, as llguidance tries first, are refused."""
        if not isinstance(text, str):
            raise TypeError("text, not bytes")
        ids = self._sp.encode(_MARK + text)
        if ids[:len(self._mark)] == self._mark:
            return ids[len(self._mark):]
        return [self._sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


_MARK = "\n"
"""A piece that does not merge with what follows (checked on every call)."""


def _special(sp, i: int) -> bool:
    return sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)


def _piece_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if _special(sp, i):
        return b"\xff" + piece.encode("utf-8")
    if sp.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
