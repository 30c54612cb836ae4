"""The canonical model configuration every loader produces and every stage consumes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import EdgeError

MAX_WINDOW = 2**24
"""The largest W accepted (16M tokens: past any model's context, far below index overflow)."""


def is_int(value: object) -> bool:
    """An integer that is not a bool (JSON `true` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def brief(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for one-line messages about values from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class ModelConfig:
    """Mistral-architecture hyper-parameters, validated whole on construction.

    `sliding_window` is W: a query at position p attends to key positions k with
    p - W < k <= p (W keys, itself included), the convention of transformers'
    Mistral. `None` means full causal attention (a Llama model); exports then need
    an explicit window because the cache must have a fixed size.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    tied_embeddings: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    max_position: int = 32768

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                     "max_position"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise EdgeError(f"invalid config: {name} must be a positive integer, got {brief(value)}")
        if self.n_heads % self.n_kv_heads:
            raise EdgeError(
                f"invalid config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise EdgeError(f"invalid config: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for name in ("norm_eps", "rope_theta"):
            if not _positive_number(getattr(self, name)):
                raise EdgeError(f"invalid config: {name} must be a positive number, got {brief(getattr(self, name))}")
        _check_window(self.sliding_window, "invalid config: sliding_window")
        if not isinstance(self.tied_embeddings, bool):
            raise EdgeError(f"invalid config: tied_embeddings must be true or false, got {brief(self.tied_embeddings)}")
        if not isinstance(self.eos_ids, tuple):
            raise EdgeError(f"invalid config: eos_ids must be a list of token ids, got {brief(self.eos_ids)}")
        for name, token in [("bos_id", self.bos_id), *(("eos_ids", t) for t in self.eos_ids)]:
            if token is not None and not (is_int(token) and 0 <= token < self.vocab_size):
                raise EdgeError(f"invalid config: {name} must be token ids below the vocabulary size "
                                f"{self.vocab_size}, got {brief(token)}")

    @classmethod
    def build(cls, where: str, *, n_kv_heads: int | None = None, head_dim: int | None = None,
              **fields) -> ModelConfig:
        """A config from a file's values (`where` names the file in errors); an absent `n_kv_heads` is
        `n_heads` and an absent `head_dim` is `dim // n_heads` (a 0 is refused, never replaced)."""
        dim, n_heads = fields.get("dim"), fields.get("n_heads")
        if head_dim is None:  # invalid dim or n_heads: __post_init__ names them before head_dim
            head_dim = dim // n_heads if is_int(dim) and is_int(n_heads) and n_heads > 0 else 2
        try:
            return cls(n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads, head_dim=head_dim, **fields)
        except EdgeError as e:
            raise EdgeError(f"{where}: {e}") from None

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads

    def with_window(self, window: int | None) -> "ModelConfig":
        """A copy with W set (`--window`); a window of 0 or less, or past MAX_WINDOW, is refused."""
        if window is None:
            return self
        _check_window(window, "--window")
        return dataclasses.replace(self, sliding_window=window)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: object) -> "ModelConfig":
        """The inverse of `to_dict` (a bundle manifest's copy); anything else is an EdgeError."""
        if not isinstance(d, dict):
            raise EdgeError(f"invalid config: expected an object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if "eos_ids" in kwargs:
            if not isinstance(kwargs["eos_ids"], list):
                raise EdgeError(f"invalid config: eos_ids must be a list of token ids, got {brief(kwargs['eos_ids'])}")
            kwargs["eos_ids"] = tuple(kwargs["eos_ids"])
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise EdgeError(f"invalid config: missing {missing[0]!r}")
        return cls(**kwargs)


def _check_window(window: object, what: str) -> None:
    if window is None:
        return
    if not is_int(window) or window <= 0:
        raise EdgeError(f"{what} must be a positive integer, got {brief(window)}")
    if window > MAX_WINDOW:
        raise EdgeError(f"{what} of {window} is past the largest supported window, {MAX_WINDOW}")
