"""Next-token selection from logits: greedy, or sampled with temperature, top-k, top-p and a repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = _number("temperature", self.temperature)
        if not (t == 0 or MIN_DIVISOR <= t < math.inf):
            raise EdgeError(f"temperature must be 0 (greedy) or a finite number >= {MIN_DIVISOR}, got {t}")
        if _integer("top-k", self.top_k) < 0:
            raise EdgeError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < _number("top-p", self.top_p) <= 1:
            raise EdgeError(f"top-p must be in (0, 1], got {self.top_p}")
        if not MIN_DIVISOR <= _number("repetition penalty", self.repetition_penalty) < math.inf:
            raise EdgeError(f"repetition penalty must be a finite number >= {MIN_DIVISOR}, got {self.repetition_penalty}")
        if self.seed is not None and _integer("seed", self.seed) < 0:
            raise EdgeError(f"seed must be >= 0, got {self.seed}")


MIN_DIVISOR = 1e-3
"""The least temperature and repetition penalty (both divide logits): below it a logit can
overflow float64 (a subnormal gives inf - inf = NaN), and the distribution is one-hot anyway."""


def _number(what: str, value) -> float:
    """`value` if it is a real number (NaN fails every range check after); a bundle's defaults are untrusted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeError(f"{what} must be a number, got {value!r}")
    return value


def _integer(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgeError(f"{what} must be an integer, got {value!r}")
    return value


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        """Pick a token from one row of logits [V]; `history` feeds the repetition penalty (CTRL-style)."""
        p = self.params
        if p.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        order = np.argsort(-scaled)
        if p.top_k:
            order = order[: p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
