"""Perplexity, KL(fp32 || variant) and top-1 agreement over the same token windows.

Each window is evaluated from an empty cache with chunked prefill in all-logits
mode; position t's logits predict token t + 1, so every token but the first is
scored. The fp32 reference is evaluated first and its next-token
log-probabilities are kept in a scratch file as 16-bit codes on a per-position
linear grid from the row's minimum to its maximum (as llama.cpp's KL base file
does: 32 windows x 511 positions x 49152 tokens is 1.6 GB, too much for memory,
cheap on disk), with its exact top-1 ids in memory. The grid step is ~5e-4 nats
(fp16 would be 8e-3 at log p = -10, where a flat distribution puts its mass).
KL is computed between the two distributions after putting both variants'
log-probabilities on their own grid and renormalizing: this moves KL by ~1e-8
nats, and two runs of the same logits give exactly 0. Perplexity and top-1 use
the fp32 logits unrounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROWS = 64  # positions per KL block: bounds the float32 temporaries to a few of [64, V]


@dataclass(frozen=True)
class Quality:
    perplexity: float
    kl_vs_fp32: float
    top1_vs_fp32: float
    scored_tokens: int
    ppl_within_w: float | None = None  # predictions from positions < W
    ppl_beyond_w: float | None = None  # from positions >= W: None when every window is within W


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities over the last axis (sums in float64)."""
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    z -= lse
    return z


@dataclass(frozen=True)
class GridLogProbs:
    """Log-probabilities [P, V] as uint16 codes: logp ~= low + code * step, per position."""

    codes: np.ndarray
    low: np.ndarray  # float32 [P]
    step: np.ndarray  # float32 [P]

    @classmethod
    def encode(cls, logp: np.ndarray) -> "GridLogProbs":
        low = logp.min(-1)
        step = np.maximum(logp.max(-1) - low, 1e-30) / 65535
        codes = np.rint((logp - low[:, None]) / step[:, None]).clip(0, 65535).astype(np.uint16)
        return cls(codes, low, step.astype(np.float32))

    def decode(self, rows: slice = slice(None)) -> np.ndarray:
        return self.low[rows, None] + self.codes[rows].astype(np.float32) * self.step[rows, None]


def kl_rows(ref: np.ndarray, var: np.ndarray) -> np.ndarray:
    """KL(p || q) per row for log-probabilities [P, V], each renormalized (float64 [P])."""
    p = np.exp(ref)
    zp = p.sum(-1, dtype=np.float64)
    zq = np.exp(var).sum(-1, dtype=np.float64)
    cross = (p * (ref - var)).sum(-1, dtype=np.float64)
    return cross / zp - np.log(zp) + np.log(zq)


def kl_grid(ref: GridLogProbs, var: GridLogProbs) -> float:
    """Sum over positions of KL between two gridded log-probability arrays, ROWS positions at a time."""
    return sum(float(kl_rows(ref.decode(slice(s, s + ROWS)), var.decode(slice(s, s + ROWS))).sum())
               for s in range(0, len(ref.codes), ROWS))


class ReferenceStore:
    """The reference's gridded next-token log-probabilities per window in a scratch file, and its top-1 ids."""

    def __init__(self, path: Path, n_windows: int, positions: int, vocab: int):
        self.path, self.shape = Path(path), (positions, vocab)
        self.top1 = np.full((n_windows, positions), -1, np.int64)
        self.low = np.zeros((n_windows, positions), np.float32)
        self.step = np.zeros((n_windows, positions), np.float32)
        self._bytes = positions * vocab * 2
        self.path.write_bytes(b"")

    def put(self, i: int, logp: GridLogProbs, top1: np.ndarray) -> None:
        with open(self.path, "r+b") as f:
            f.seek(i * self._bytes)
            f.write(np.ascontiguousarray(logp.codes).tobytes())
        self.low[i], self.step[i], self.top1[i] = logp.low, logp.step, top1

    def get(self, i: int) -> tuple[GridLogProbs, np.ndarray]:
        if self.top1[i, 0] < 0:
            raise RuntimeError(f"reference window {i} was never stored")
        codes = np.fromfile(self.path, np.uint16, count=self.shape[0] * self.shape[1], offset=i * self._bytes)
        return GridLogProbs(codes.reshape(self.shape), self.low[i], self.step[i]), self.top1[i]


def window_logits(session, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """All-position logits [T, V] of one window fed from an empty cache in chunks of `chunk`."""
    session.reset()
    parts = [session.step(tokens[None, s:s + chunk], all_logits=True)[0].copy()
             for s in range(0, len(tokens), chunk)]
    return np.concatenate(parts)


def evaluate(session, windows: np.ndarray, chunk: int, reference: ReferenceStore, record: bool = False,
             progress: Callable[[], None] | None = None) -> Quality:
    """Score `windows` [N, T] with `session` (DecoderSession or TorchSession). With `record`, this
    session is the reference: its log-probabilities are stored first (so its KL is exactly 0).
    Perplexity is also split at the session's window W: predictions made from positions < W saw
    every earlier token, those from positions >= W only what the cache kept."""
    nll, kl, agree = 0.0, 0.0, 0
    split = min(session.window, windows.shape[1] - 1)
    nll_beyond = 0.0
    for i, tokens in enumerate(windows):
        logits = window_logits(session, tokens, chunk)[:-1]
        top1 = logits.argmax(-1)
        logp = log_softmax(logits)
        del logits
        token_nll = -logp[np.arange(len(logp)), tokens[1:]].astype(np.float64)
        nll += float(token_nll.sum())
        nll_beyond += float(token_nll[split:].sum())
        grid = GridLogProbs.encode(logp)
        del logp
        if record:
            reference.put(i, grid, top1)
        ref, ref_top1 = reference.get(i)
        kl += kl_grid(ref, grid)
        agree += int((top1 == ref_top1).sum())
        if progress:
            progress()
    n = windows.shape[0] * (windows.shape[1] - 1)
    n_beyond = windows.shape[0] * (windows.shape[1] - 1 - split)
    within = math.exp((nll - nll_beyond) / (n - n_beyond))
    return Quality(math.exp(nll / n), kl / n, agree / n, n, within,
                   math.exp(nll_beyond / n_beyond) if n_beyond else None)
