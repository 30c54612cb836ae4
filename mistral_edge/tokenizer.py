"""One tokenizer API over a tokenizer.json (HF `tokenizers`) or a SentencePiece model, plus streaming
detokenization. Torch-free: the on-device runtime uses it, so the backends are imported lazily.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import EdgeError, first_line


class Tokenizer:
    """`encode(text, add_bos=True)` prepends `bos_id` exactly when the tokenizer's own convention does
    (a SentencePiece model: whenever it has a BOS; a tokenizer.json: when its post-processor adds one),
    and never twice; no other special tokens are added. `decode` drops special tokens."""

    kind: str  # 'sentencepiece' or 'tokenizers'

    def __init__(self, path: Path, bos_id: int | None, eos_ids: tuple[int, ...], adds_bos: bool):
        self.path = path
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.adds_bos = adds_bos and bos_id is not None

    @classmethod
    def from_files(cls, files: dict[str, Path] | Path | str, bos_id: int | None = None,
                   eos_ids: Iterable[int] = ()) -> Tokenizer:
        """From a checkpoint's `tokenizer_files` ({'tokenizer.json' | 'tokenizer.model[.vN]': path}) or a
        directory holding them; tokenizer.json wins when both are there. `bos_id`/`eos_ids` (the model
        config's) override what the file says."""
        if not isinstance(files, dict):
            d = Path(files)
            names = ["tokenizer.json", "tokenizer.model", *sorted(p.name for p in d.glob("tokenizer.model.v*"))[::-1]]
            files = {n: d / n for n in names if (d / n).is_file()}
        name = "tokenizer.json" if "tokenizer.json" in files else next(
            (n for n in files if n.startswith("tokenizer.model") or n.endswith(".model")), None)
        if name is None:
            raise EdgeError(f"no tokenizer found (expected tokenizer.json or tokenizer.model), got {sorted(files)}")
        path = Path(files[name])
        if not path.is_file():
            raise EdgeError(f"{path}: tokenizer file not found")
        impl = _HFTokenizer if name.endswith(".json") else _SentencePieceTokenizer
        try:
            return impl.load(path, bos_id, tuple(eos_ids))
        except EdgeError:
            raise
        except Exception as e:  # the backends raise anything from OSError to RuntimeError on a bad file
            raise EdgeError(f"{path}: unreadable tokenizer ({first_line(e)})") from None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id, *ids] if add_bos and self.adds_bos else ids

    def token_text(self, token_id: int | None) -> str:
        """The token's vocabulary entry ('' for None), e.g. for a chat template's `bos_token`."""
        return "" if token_id is None else self.id_to_token(token_id) or ""

    @property
    def bos_token(self) -> str:
        return self.token_text(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.token_text(self.eos_ids[0] if self.eos_ids else None)

    # Backend-specific.
    vocab_size: int

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_continuation(self, ids: Iterable[int]) -> str:
        """`ids` decoded as text that continues other text: a leading space is kept (a grammar's match
        may begin with one). A tokenizer.json's decode already keeps it."""
        return self.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError


class _SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    @classmethod
    def load(cls, path: Path, bos_id: int | None, eos_ids: tuple[int, ...]) -> Tokenizer:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if bos_id is None and sp.bos_id() >= 0:
            bos_id = sp.bos_id()
        if not eos_ids and sp.eos_id() >= 0:
            eos_ids = (sp.eos_id(),)
        tok = cls(path, bos_id, eos_ids, adds_bos=True)
        tok.sp, tok.vocab_size = sp, sp.get_piece_size()
        return tok

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_continuation(self, ids: Iterable[int]) -> str:
        # SentencePiece drops the leading space of the first piece it decodes: decode after a prefix.
        prefix = self.sp.encode("a")
        return self.sp.decode(prefix + [int(i) for i in ids])[len(self.sp.decode(prefix)):]

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None


class _HFTokenizer(Tokenizer):
    kind = "tokenizers"

    @classmethod
    def load(cls, path: Path, bos_id: int | None, eos_ids: tuple[int, ...]) -> Tokenizer:
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(str(path))
        # Does the post-processor put a special token in front? That token is its BOS.
        plain, full = (hf.encode("a", add_special_tokens=s).ids for s in (False, True))
        adds_bos = len(full) > len(plain) and full[1:len(plain) + 1] == plain
        if adds_bos and bos_id is None:
            bos_id = full[0]
        tok = cls(path, bos_id, eos_ids, adds_bos)
        tok.hf, tok.vocab_size = hf, hf.get_vocab_size(with_added_tokens=True)
        return tok

    def _encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)


class StreamDecoder:
    """Turns ids fed one at a time into text pieces whose concatenation is `decode(all ids)`.

    Decoding token by token is wrong twice over: a character may span several byte tokens (byte
    fallback, byte-level BPE), and SentencePiece drops the leading space of whatever sequence it
    decodes first. So each step decodes the window since the last emitted boundary with and without
    the new id and returns the difference, holding it back while it ends in an incomplete character
    (U+FFFD). The window stays a few tokens long, so a step costs O(1) in the text length.
    """

    def __init__(self, tokenizer: Tokenizer, continuation: bool = False):
        """`continuation`: keep a reply's leading space (`Tokenizer.decode_continuation`), as a grammar
        that matched it needs."""
        self.decode = tokenizer.decode_continuation if continuation else tokenizer.decode
        self.ids: list[int] = []
        self.start = 0  # window start: a token boundary where decoding is known to be clean
        self.done = 0  # ids before this have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.decode(self.ids[self.start:self.done])
        text = self.decode(self.ids[self.start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.start, self.done = self.done, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD), at the end of a stream."""
        before = self.decode(self.ids[self.start:self.done])
        text = self.decode(self.ids[self.start:])
        self.start = self.done = len(self.ids)
        return text[len(before):]
