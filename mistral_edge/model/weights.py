"""Canonical weight names and shapes, and `Weights`: the checkpoint's tensors, read when asked for.

Names follow mistral-inference (`layers.{i}.attention.wq.weight`, ...), with one
difference: wq and wk rows are in the Hugging Face "rotate-half" RoPE order, so a
head's first half of dimensions pairs with its second half. Loaders of
interleaved-pair formats (mistral-inference, GGUF) permute rows on the way in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import NamedTuple

import torch

from ..errors import EdgeError
from .config import ModelConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""What a model tensor may be stored as (quantized checkpoints other than GGUF are not read)."""


class TensorMeta(NamedTuple):
    """A tensor without its data: enough to validate a checkpoint and size an export."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


Read = Callable[[], torch.Tensor]


class Weights(Mapping[str, torch.Tensor]):
    """Name -> tensor, each read from the checkpoint's file when it is asked for.

    Nothing is cached, so an export can hold one tensor at a time and whoever keeps a tensor
    holds the only copy; reading the same name twice reads the file twice. `meta(name)` gives
    the shape and dtype without reading anything. `clear()` forgets every tensor, as
    `dict.clear` does. Tensors keep the file's dtype (GGUF blocks are dequantized to fp32).
    """

    def __init__(self, entries: dict[str, tuple[TensorMeta, Read]]):
        self._entries = entries

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Weights:
        """Tensors already in memory (pickles, test fixtures)."""
        return cls({name: (TensorMeta(tuple(t.shape), t.dtype), partial(_same, t)) for name, t in tensors.items()})

    @classmethod
    def union(cls, parts: Iterable[tuple[str, Weights]]) -> Weights:
        """The tensors of several files, each labelled for messages; a name stored twice is refused."""
        entries: dict[str, tuple[TensorMeta, Read]] = {}
        origin: dict[str, str] = {}
        for label, part in parts:
            for name, entry in part._entries.items():
                if name in entries:
                    raise EdgeError(f"tensor {name!r} is stored twice, in {origin[name]} and {label}")
                entries[name], origin[name] = entry, label
        return cls(entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name][0]

    def __getitem__(self, name: str) -> torch.Tensor:
        meta, read = self._entries[name]
        t = read()
        if tuple(t.shape) != meta.shape or t.dtype != meta.dtype:  # the file changed since it was opened
            raise EdgeError(f"tensor {name!r} reads as {tuple(t.shape)} {t.dtype}, its header said "
                            f"{meta.shape} {meta.dtype}; was the checkpoint modified while loading?")
        return t

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @property
    def n_params(self) -> int:
        return sum(meta.numel for meta, _ in self._entries.values())

    def renamed(self, rename: Callable[[str], str | None]) -> Weights:
        """The tensors `rename` maps to a name (None: dropped), under their new names."""
        out: dict[str, tuple[TensorMeta, Read]] = {}
        for name, entry in self._entries.items():
            key = rename(name)
            if key is not None:
                if key in out:
                    raise EdgeError(f"checkpoint has two tensors for {key!r} (the second is {name!r})")
                out[key] = entry
        return Weights(out)

    def select(self, names: Iterable[str]) -> Weights:
        return Weights({name: self._entries[name] for name in names})

    def mapped(self, fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Weights:
        """A view whose tensors named in `fns` go through them when read (shape and dtype kept)."""
        out = dict(self._entries)
        for name, fn in fns.items():
            meta, read = out[name]
            out[name] = (meta, partial(_through, fn, read))
        return Weights(out)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _through(fn: Callable[[torch.Tensor], torch.Tensor], read: Read) -> torch.Tensor:
    return fn(read())


_LAYER_SHAPES = {
    "attention_norm.weight": lambda c, q, kv: (c.dim,),
    "attention.wq.weight": lambda c, q, kv: (q, c.dim),
    "attention.wk.weight": lambda c, q, kv: (kv, c.dim),
    "attention.wv.weight": lambda c, q, kv: (kv, c.dim),
    "attention.wo.weight": lambda c, q, kv: (c.dim, q),
    "ffn_norm.weight": lambda c, q, kv: (c.dim,),
    "feed_forward.w1.weight": lambda c, q, kv: (c.hidden_dim, c.dim),
    "feed_forward.w2.weight": lambda c, q, kv: (c.dim, c.hidden_dim),
    "feed_forward.w3.weight": lambda c, q, kv: (c.hidden_dim, c.dim),
}


def expected_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the model has, in checkpoint order, one at a time: the config's
    counts come from an untrusted file, so nothing is built for them before `validate` checks them."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    yield "tok_embeddings.weight", (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        for key, shape in _LAYER_SHAPES.items():
            yield f"layers.{i}.{key}", shape(cfg, q, kv)
    yield "norm.weight", (cfg.dim,)
    if not cfg.tied_embeddings:
        yield "output.weight", (cfg.vocab_size, cfg.dim)


def validate(weights: Weights, cfg: ModelConfig) -> None:
    """Raise EdgeError naming the first missing, mis-shaped or non-float tensor, from metadata alone.

    The walk stops at the first tensor the file lacks, so a config claiming 10^9 layers costs
    no more than the tensors the file holds."""
    for name, shape in expected_shapes(cfg):
        if name not in weights:
            layer = re.match(r"layers\.(\d+)\.", name)
            if layer and not any(n.startswith(layer.group(0)) for n in weights):
                raise EdgeError(f"checkpoint has tensors for {layer.group(1)} layers but its config says "
                                f"{cfg.n_layers} (missing tensor {name!r})")
            raise EdgeError(f"checkpoint is missing tensor {name!r}")
        meta = weights.meta(name)
        if meta.shape != shape:
            raise EdgeError(f"tensor {name!r} has shape {meta.shape}, expected {shape}")
        if meta.dtype not in FLOAT_DTYPES:
            raise EdgeError(f"tensor {name!r} is {str(meta.dtype).removeprefix('torch.')}; "
                            "expected float16, bfloat16, float32 or float64")


def model_tensors(weights: Weights, cfg: ModelConfig) -> Weights:
    """Validate, then keep only the tensors the model uses (a tied model's saved lm_head goes)."""
    validate(weights, cfg)
    return weights.select(name for name, _ in expected_shapes(cfg))


def rename(name: str, top: dict[str, str], layer_re: re.Pattern, layer_map: dict[str, str],
           suffix: str = "") -> str | None:
    """Map a format's tensor name to the canonical one: `top` for whole-model tensors, and
    `layer_re` (groups: layer index, per-layer key of `layer_map`) for layer tensors; None
    for tensors that are not part of the model."""
    if name in top:
        return top[name]
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}{suffix}"
    return None


def output_weight(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The LM head: `output.weight`, or the embedding when tied (only the one used is read)."""
    return weights["output.weight"] if "output.weight" in weights else weights["tok_embeddings.weight"]


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows from interleaved RoPE pairs (0,1),(2,3).. to rotate-half order."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (used to write mistral-inference fixtures)."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, 2, d // 2, inp).transpose(1, 2).reshape(out, inp)


def _to_half(n_heads: int, w: torch.Tensor) -> torch.Tensor:
    return interleaved_to_half(w, n_heads).contiguous()


def interleaved_rope_rows(weights: Weights, cfg: ModelConfig) -> Weights:
    """`weights` of a format that stores wq/wk rows in interleaved pairs, read in rotate-half order."""
    fns = {}
    for i in range(cfg.n_layers):  # bounded: `weights` passed `validate`
        fns[f"layers.{i}.attention.wq.weight"] = partial(_to_half, cfg.n_heads)
        fns[f"layers.{i}.attention.wk.weight"] = partial(_to_half, cfg.n_kv_heads)
    return weights.mapped(fns)
