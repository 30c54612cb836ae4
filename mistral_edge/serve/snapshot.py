"""A conversation's whole decoder state, captured from a session row and saved at a bounded size.

A rolling cache holds at most W slots, so a conversation's state is the cache (min(tokens, W)
slots per layer), the token count, a bounded token tail (the last max(W, 64) tokens) and the
sampler's generator: the file stops growing once the conversation reaches max(W, 64) tokens,
however long it then runs. The history is identified by a hash
chain over fixed 64-token blocks, so whether a new request extends it can be checked without the
full token list, and the chain can be extended after a resume.

File layout: MAGIC, an 8-byte little-endian header length, the JSON header, the token tail
(int64), the cache arrays in contract.cache_names order, each in its own dtype (key.0, value.0,
key.1, ... each [Hkv, slots, D]; an int8 cache's key_scale.i, value_scale.i [Hkv, slots, 1]
float16 after each layer's codes; with attention sinks each layer's sink_ tensors [Hkv, sinks, .]
follow its ring; with a pool its mass [Hkv, slots, 1] and pool_ tensors [Hkv, pool, .]), then
the sha256 of everything before it. The header names what computed the
cache (its "bundle" field): a bundle's manifest sha256, or for the torch backend (`--model`)
model_identity's hash of the checkpoint's config and tensors; a file from another bundle or model,
or one whose checksum fails, is refused with one line.

This module reads these DecoderSession internals (to become a public method): `_arrays`
(the cache buffers by name), `_allocate(slots, keep)`, `positions`, `slots`, `window`, `n_layers`,
`cache_dtype`, `kv_cache`; a TorchSession's rows go through its `read_row` / `write_row`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..contract import cache_names, fixed_slots, is_scale
from ..errors import EdgeError
from ..runtime.bundle import MANIFEST, sha256_file
from ..runtime.sampling import Sampler, SamplingParams

MAGIC = b"MESNAP\x00\x01"
FORMAT = 1
BLOCK = 64
"""History hash chain block (tokens)."""
MAX_HEADER = 1 << 16
HEADER_PAD = 1024
"""The header is padded with spaces to a multiple of this, so counts of more digits keep the size."""


def bundle_identity(bundle) -> str:
    """A bundle's identity for snapshots: the sha256 of its manifest (which lists every file's sha256)."""
    return sha256_file(Path(bundle.path) / MANIFEST)


def _chain(anchor: bytes, ids: list[int]) -> bytes:
    for s in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
        anchor = hashlib.sha256(anchor + np.asarray(ids[s:s + BLOCK], "<i8").tobytes()).digest()
    return anchor


@dataclass(frozen=True)
class TokenHistory:
    """Every token a conversation fed, kept at a bounded size: `count`, the hash chain `anchor` over
    the first count - count % BLOCK tokens, and the last `keep` tokens (`tail`)."""

    count: int
    anchor: bytes
    tail: tuple[int, ...]
    keep: int

    @classmethod
    def of(cls, ids: list[int], keep: int) -> TokenHistory:
        return cls(0, b"", (), max(keep, BLOCK)).extend(ids)

    def extend(self, ids: list[int]) -> TokenHistory:
        ids = [int(i) for i in ids]
        pending = list(self.tail[len(self.tail) - self.count % BLOCK:]) if self.count % BLOCK else []
        run = pending + ids
        anchor = _chain(self.anchor, run)
        return TokenHistory(self.count + len(ids), anchor, tuple((list(self.tail) + ids)[-self.keep:]), self.keep)

    @property
    def complete(self) -> bool:
        """Whether `tail` is the whole history."""
        return len(self.tail) == self.count

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` this history shares: any length while the tail is the
        whole history, else all `count` or none (checked through the hash chain)."""
        if self.complete:
            n = 0
            for a, b in zip(self.tail, ids):
                if a != b:
                    break
                n += 1
            return n
        if len(ids) < self.count or tuple(ids[self.count - len(self.tail):self.count]) != self.tail:
            return 0
        return self.count if _chain(b"", list(ids[:self.count - self.count % BLOCK])) == self.anchor else 0


def sampler_state(sampler: Sampler) -> dict:
    return {"params": asdict(sampler.params), "rng": sampler.rng.bit_generator.state}


def restore_sampler(state: dict) -> Sampler:
    """The sampler a snapshot saved, its generator where it stopped."""
    try:
        sampler = Sampler(SamplingParams(**state["params"]))
        sampler.rng.bit_generator.state = state["rng"]
    except (TypeError, KeyError, ValueError, OverflowError) as e:
        raise EdgeError(f"snapshot sampler state is malformed ({e})") from None
    return sampler


@dataclass
class SessionState:
    """One conversation: its cache (name -> [Hkv, slots, D], slots = min(count, W)), history, sampler."""

    cache: dict[str, np.ndarray]
    history: TokenHistory
    sampler: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cache.values())

    def truncated(self, n: int, window: int) -> SessionState | None:
        """The state after only the first `n` tokens, or None when the ring has overwritten them
        (a history longer than W keeps only its last W tokens' slots)."""
        h = self.history
        if n == h.count:
            return self
        if h.count > window or self.cache["key.0"].shape[1] != h.count or not h.complete or not 0 < n < h.count:
            return None  # the ring (W - sinks - pool slots) no longer holds every token
        if "mass.0" in self.cache:
            return None  # a pool's masses hold what the later tokens' queries gave: not the first n's state
        return SessionState({k: a if k.startswith("sink_") else a[:, :n] for k, a in self.cache.items()},
                            TokenHistory.of(list(h.tail[:n]), h.keep), None)


def _names(session) -> list[str]:
    return cache_names(session.n_layers, session.sinks, session.kv_cache, session.pool)


def _form(session) -> tuple[dict[str, tuple[int, np.dtype]], dict]:
    """A session's cache tensors in file order, each with its last dimension and dtype (an int8
    cache's scales: 1, float16), and the header fields a snapshot must match. A TorchSession keeps
    its sinks, if any, in the first of its W slots: it has no sink tensors; its "dtype" is that of
    its keys and values (int8 for an int8 cache: codes, then scales, as a bundle's)."""
    if hasattr(session, "_arrays"):
        return {n: (session._arrays[n].shape[3], session._arrays[n].dtype) for n in _names(session)}, _layout(session)
    c = session.model.cfg
    dtype = np.dtype(session.cache_dtype)
    return {n: (1, np.dtype(np.float16)) if is_scale(n) else (c.head_dim, dtype) for n in session.cache_names()}, {
        "layers": c.n_layers, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "window": session.window,
        "sinks": session.sinks, "pool": 0, "dtype": dtype.name}


def capture(session, row: int, history: TokenHistory, sampler: Sampler | None = None) -> SessionState:
    """Copy row `row` of a session (whose position must be history.count) into a SessionState."""
    if int(session.positions[row]) != history.count:
        raise EdgeError(f"session row {row} is at position {int(session.positions[row])}, "
                        f"history has {history.count} tokens")
    if not hasattr(session, "_arrays"):  # a TorchSession: its cache keeps the sinks in its first slots
        cache = session.read_row(row, min(history.count, session.window))
    else:
        n = min(history.count, session.ring)
        cache = {name: session._arrays[name][row, :, :fixed_slots(name, session.sinks, session.pool) or n].copy()
                 for name in _names(session)}
    return SessionState(cache, history, sampler_state(sampler) if sampler else None)


def restore(session, row: int, state: SessionState) -> None:
    """Put a state into row `row` of a session; other rows keep theirs."""
    n = state.cache["key.0"].shape[1]
    if not hasattr(session, "_arrays"):
        return session.write_row(row, state.cache, state.history.count)
    if session.slots < n:
        session._allocate(n, keep=session.slots)
    for name in _names(session):
        a, saved = session._arrays[name], state.cache[name]
        a[row, :, :saved.shape[1]] = saved
        a[row, :, saved.shape[1]:] = 0
    session.positions[row] = state.history.count


def _layout(session) -> dict:
    a = session._arrays["key.0"]
    return {"layers": session.n_layers, "kv_heads": a.shape[1], "head_dim": a.shape[3],
            "window": session.window, "sinks": session.sinks, "pool": session.pool,
            "dtype": np.dtype(session.cache_dtype).name}


def save(path: str | Path, state: SessionState, session, identity: str) -> int:
    """Write `state` atomically (a temporary file beside `path`, then a rename); returns its bytes."""
    path = Path(path)
    h = state.history
    slots = state.cache["key.0"].shape[1]
    tensors, layout = _form(session)
    header = {"format": FORMAT, "bundle": identity, **layout, "count": h.count, "slots": slots,
              "anchor": h.anchor.hex(), "keep": h.keep, "tail": len(h.tail), "sampler": state.sampler}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % HEADER_PAD)
    digest = hashlib.sha256()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as e:
        raise EdgeError(f"cannot write snapshot {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (MAGIC, struct.pack("<Q", len(blob)), blob, np.asarray(h.tail, "<i8").tobytes(),
                         *(np.ascontiguousarray(state.cache[n]).tobytes() for n in tensors)):
                digest.update(part)
                f.write(part)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise EdgeError(f"cannot write snapshot {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load(path: str | Path, session, identity: str) -> SessionState:
    """Read a snapshot for `session`'s bundle or model (`identity`: bundle_identity or
    model.torch_session.model_identity); a foreign, damaged or malformed file is one EdgeError."""
    path = Path(path)
    tensors, layout = _form(session)
    source = "bundle" if hasattr(session, "_arrays") else "model"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise EdgeError(f"{path}: not a mistral-edge session snapshot")
            (n_header,) = struct.unpack("<Q", head[len(MAGIC):])
            if n_header > MAX_HEADER:
                raise EdgeError(f"{path}: damaged snapshot (header of {n_header} bytes)")
            blob = f.read(n_header)
            header = _parse_header(path, blob)
            if header["bundle"] != identity:
                raise EdgeError(f"{path}: snapshot belongs to another {source} (identity "
                                f"{str(header['bundle'])[:12]}..., this {source}'s is {identity[:12]}...)")
            if {k: header.get(k) for k in layout} != layout:
                raise EdgeError(f"{path}: snapshot cache layout does not match this {source}'s cache")
            count, slots, keep, n_tail = header["count"], header["slots"], header["keep"], header["tail"]
            window = layout["window"]
            sinks = layout["sinks"] if any(n.startswith("sink_") for n in tensors) else 0
            ring = window - sinks - layout["pool"]
            if not (slots == min(count, ring) and BLOCK <= keep <= max(window, BLOCK)
                    and n_tail == min(count, keep)):
                raise EdgeError(f"{path}: damaged snapshot (inconsistent counts)")
            shapes = {n: (layout["kv_heads"], fixed_slots(n, sinks, layout["pool"]) or slots, last)
                      for n, (last, _) in tensors.items()}
            body = 8 * n_tail + sum(int(np.prod(s)) * tensors[n][1].itemsize for n, s in shapes.items())
            if size != len(head) + n_header + body + 32:
                raise EdgeError(f"{path}: damaged snapshot (size {size} bytes, header implies "
                                f"{len(head) + n_header + body + 32})")
            data = f.read(body)
            checksum = f.read(32)
    except OSError as e:
        raise EdgeError(f"{path}: cannot read snapshot ({e.strerror})") from None
    if hashlib.sha256(head + blob + data).digest() != checksum:
        raise EdgeError(f"{path}: damaged snapshot (checksum mismatch)")
    tail = np.frombuffer(data, "<i8", n_tail)
    if n_tail and not (0 <= tail.min() and tail.max() < session.vocab_size):
        raise EdgeError(f"{path}: damaged snapshot (token ids outside the vocabulary)")
    tail = tuple(int(i) for i in tail)
    cache, start = {}, 8 * n_tail
    for name, shape in shapes.items():
        dtype, n = tensors[name][1], int(np.prod(shape))
        cache[name] = np.frombuffer(data, dtype.newbyteorder("<"), n, start).reshape(shape).astype(dtype)
        start += n * dtype.itemsize
    history = TokenHistory(count, bytes.fromhex(header["anchor"]), tail, keep)
    return SessionState(cache, history, header["sampler"])


_HEADER_TYPES = {"format": int, "bundle": str, "layers": int, "kv_heads": int, "head_dim": int, "window": int,
                 "sinks": int, "pool": int,
                 "dtype": str, "count": int, "slots": int, "anchor": str, "keep": int, "tail": int}


def _parse_header(path: Path, blob: bytes) -> dict:
    try:
        header = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgeError(f"{path}: damaged snapshot (unreadable header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise EdgeError(f"{path}: unsupported snapshot format {found!r}")
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(header.get(key), kind) or (kind is int and header[key] < 0):
            raise EdgeError(f"{path}: damaged snapshot (header field {key!r})")
    if not (header["sampler"] is None or isinstance(header["sampler"], dict)):
        raise EdgeError(f"{path}: damaged snapshot (header field 'sampler')")
    try:
        anchor = bytes.fromhex(header["anchor"])
    except ValueError:
        anchor = b"?"
    if len(anchor) not in (0, 32):
        raise EdgeError(f"{path}: damaged snapshot (header field 'anchor')")
    return header


def save_session(path: str | Path, identity: str, session, fed: list[int], sampler: Sampler | None = None) -> int:
    """`chat --save`: a batch-1 session that has taken the tokens `fed`."""
    state = capture(session, 0, TokenHistory.of(fed, session.window), sampler)
    return save(path, state, session, identity)


def resume_session(path: str | Path, identity: str, session) -> SessionState:
    """`chat --resume`: load a snapshot into a batch-1 session; returns it (history, sampler)."""
    state = load(path, session, identity)
    restore(session, 0, state)
    return state


_MARKS = ("alpha", "omega")
"""Two stand-in replies: what follows them in a rendered conversation is the template's text for the next turns."""


def continuation(fmt, tokenizer, messages: list[dict]) -> list[int]:
    """The tokens `messages` add after an assistant reply already in the cache (the end of that
    reply's turn included): the common tail of the same conversation after two different replies."""
    base = [{"role": "user", "content": "x"}]
    a, b = (fmt.encode([*base, {"role": "assistant", "content": m}, *messages], tokenizer) for m in _MARKS)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def resume_chat(path: str | Path, identity: str, engine, fmt) -> TokenHistory:
    """`chat --resume`: load a snapshot into a ChatEngine's session and make its next turns feed only
    their own tokens (the saved messages are not kept: the cache is the conversation). Sets the
    engine's `messages`, `fed` and `encode_messages`; returns the resumed history for save_chat."""
    state = resume_session(path, identity, engine.generator.session)
    prefix = list(state.history.tail)
    tokenizer = engine.generator.tokenizer
    engine.messages, engine.fed = [], prefix
    engine.encode_messages = lambda messages: prefix + continuation(fmt, tokenizer, messages)
    return state.history


def save_chat(path: str | Path, identity: str, engine, resumed: TokenHistory | None = None) -> int:
    """`chat --save`: a ChatEngine's conversation; `resumed` is what resume_chat returned, if it ran."""
    session = engine.generator.session
    if resumed is None:
        history = TokenHistory.of(engine.fed, session.window)
    else:
        history = resumed.extend(engine.fed[len(resumed.tail):])
    return save(path, capture(session, 0, history), session, identity)
