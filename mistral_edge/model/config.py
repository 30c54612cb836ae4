"""The canonical model configuration every loader produces and every stage consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import EdgeError


@dataclass(frozen=True)
class ModelConfig:
    """Mistral-architecture hyper-parameters.

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
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise EdgeError(f"invalid config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise EdgeError(
                f"invalid config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise EdgeError(f"invalid config: sliding_window must be positive, got {self.sliding_window}")

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads

    def with_window(self, window: int | None) -> "ModelConfig":
        """A copy with W set (`--window`); a window of 0 or less is refused."""
        if window is None:
            return self
        if window <= 0:
            raise EdgeError(f"--window must be a positive integer, got {window}")
        return dataclasses.replace(self, sliding_window=window)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if "eos_ids" in kwargs:
            kwargs["eos_ids"] = tuple(kwargs["eos_ids"])
        return cls(**kwargs)
