"""Chunked prefill, decoding, stop handling and streaming over a DecoderSession."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import EdgeError
from .sampling import Sampler, SamplingParams
from .session import DecoderSession


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()  # in addition to the tokenizer's EOS ids

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise EdgeError(f"max-new-tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise EdgeError("a stop string must be non-empty (an empty one would end every reply at once)")


class LogitsProcessor(Protocol):
    """A hook in the sampling loop, e.g. a grammar (runtime/constrain.py): it masks each step's
    logits before sampling and learns the token chosen; it lives for one generation."""

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V] with the tokens not allowed next at -inf."""

    def accept(self, token: int) -> bool:
        """Take the sampled token; False once the output is complete (generation then ends)."""


class Generator:
    """Generation for one conversation (batch 1): the session keeps its cache between calls,
    so a chat feeds only each turn's new tokens and may run past W (the cache rolls)."""

    def __init__(self, session: DecoderSession, tokenizer):
        if session.batch != 1:
            raise EdgeError("Generator needs a batch-1 session; use generate_batch for batches")
        self.session = session
        self.tokenizer = tokenizer

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Feed tokens chunk by chunk; returns the logits [V] after the last one."""
        if not ids:
            raise EdgeError("empty prompt")
        c = self.session.chunk
        for s in range(0, len(ids), c):
            logits = self.session.step(np.asarray([ids[s:s + c]], np.int64))
        return logits[0, -1]

    def stream_ids(self, prompt_ids: list[int], cfg: GenerationConfig,
                   history: list[int] | None = None, processor: LogitsProcessor | None = None) -> Iterator[int]:
        """Feed `prompt_ids`, then yield generated ids until EOS/stop token, the token budget or
        `processor`'s end. A yielded id is already in the cache. `history` (default: the prompt)
        feeds the repetition penalty."""
        stops = set(self.tokenizer.eos_ids) | set(cfg.stop_tokens)
        sampler = Sampler(cfg.sampling)
        history = list(prompt_ids if history is None else history)
        logits = self.prefill(prompt_ids)
        for _ in range(cfg.max_new_tokens):
            tok = sampler(logits if processor is None else processor(logits), history)
            if tok in stops:
                return
            history.append(tok)
            done = processor is not None and not processor.accept(tok)
            logits = self.session.step(np.asarray([[tok]], np.int64))[0, -1]
            yield tok
            if done:
                return

    def stream(self, prompt_ids: list[int], cfg: GenerationConfig, on_token=None,
               history: list[int] | None = None, processor: LogitsProcessor | None = None) -> Iterator[str]:
        """Yield text pieces as they become final; stops at a stop string (not included).
        `on_token(id)` sees every id that entered the cache."""
        from ..tokenizer import StreamDecoder

        decoder = StreamDecoder(self.tokenizer, continuation=processor is not None)
        hold = max((len(s) for s in cfg.stop_strings), default=1) - 1
        text, emitted = "", 0
        for tok in self.stream_ids(prompt_ids, cfg, history, processor):
            if on_token:
                on_token(tok)
            text += decoder.add(tok)
            # a stop string ends in the newest text, so it starts at or after `emitted`
            cut = min((i for i in (text.find(s, emitted) for s in cfg.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text += decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]


def generate_batch(session: DecoderSession, prompts: list[list[int]], cfg: GenerationConfig,
                   eos_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Generate for prompts of different lengths at once: shorter prompts sit out the
    chunks they have no tokens for (valid length 0), finished sequences stop advancing."""
    if session.batch != len(prompts):
        raise EdgeError(f"session batch {session.batch} does not match {len(prompts)} prompts")
    if any(not p for p in prompts):
        raise EdgeError("empty prompt")
    b, c = len(prompts), session.chunk
    last = np.zeros((b, session.vocab_size), np.float32)
    for s in range(0, max(map(len, prompts)), c):
        pieces = [p[s:s + c] for p in prompts]
        width = max(map(len, pieces))
        tokens = np.zeros((b, width), np.int64)
        for i, piece in enumerate(pieces):
            tokens[i, :len(piece)] = piece
        valid = np.array([len(p) for p in pieces])
        logits = session.step(tokens, valid)
        for i in np.nonzero(valid)[0]:
            last[i] = logits[i, -1]
    stops = set(eos_ids) | set(cfg.stop_tokens)
    samplers = [Sampler(cfg.sampling) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = np.ones(b, bool)
    for _ in range(cfg.max_new_tokens):
        step = np.zeros((b, 1), np.int64)
        for i in np.nonzero(active)[0]:
            tok = samplers[i](last[i], prompts[i] + out[i])
            if tok in stops:
                active[i] = False
            else:
                out[i].append(tok)
                step[i, 0] = tok
        if not active.any():
            break
        last = session.step(step, active.astype(np.int64))[:, -1].copy()
    return out
