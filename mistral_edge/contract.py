"""The graph contract: what the exporter writes and every runtime relies on (docs/graph-contract.md).

Torch- and onnx-free, so the exporter (export/) and the on-device runtime (runtime/) share
it without either importing the other: the version, the input names, and `GraphInfo`,
the facts a runtime reads from the graph's metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import EdgeError

GRAPH_CONTRACT_VERSION = 5
"""The decoder-step interface version; a runtime refuses any other ("export again")."""
META_PREFIX = "mistral_edge."
"""Every metadata key the exporter writes starts with this."""
STEP_INPUTS = ("input_ids", "positions", "valid_lens", "logits_index")
"""The per-step inputs, in graph order; then past_<name> for every `cache_names` name."""
LOGITS = "logits"
KV_CACHES = ("fp32", "fp16", "int8")
"""Storage types of the KV cache (docs/cache.md): float32, float16, or int8 codes with one
float16 scale per slot and kv head."""
_FLOATS = {"fp32": "float32", "fp16": "float16"}


def check_kv_cache(kv_cache: str, activations: str, flag: str = "--activations") -> None:
    """The cache types a graph (or the torch backend, `flag` "--dtype") of `activations` may store:
    its own, fp16, or int8. An fp32 cache under 16-bit activations would store values that were never
    more than 16 bits."""
    if kv_cache not in KV_CACHES:
        raise EdgeError(f"unknown KV cache type {kv_cache!r}; expected one of {', '.join(KV_CACHES)}")
    if kv_cache == "fp32" and activations != "fp32":
        raise EdgeError(f"an fp32 KV cache needs fp32 activations ({activations} ones would be stored widened): "
                        f"use --kv-cache fp16 or int8, or {flag} fp32")


def layer_cache_names(layer: int, sinks: int = 0, kv_cache: str = "fp32", pool: int = 0) -> list[str]:
    """'key.i', 'value.i' (an int8 cache: then 'key_scale.i', 'value_scale.i'); with sinks the same
    again prefixed 'sink_'; with a pool 'mass.i' (what each ring slot's key has received), the key
    and value tensors again prefixed 'pool_', then 'pool_mass.i' and 'pool_pos.i'. The graph has
    past_<name> inputs and present_<name> outputs, and its attention node takes them in this order."""
    kinds = ["key", "value"] + (["key_scale", "value_scale"] if kv_cache == "int8" else [])
    names = kinds + ([f"sink_{kind}" for kind in kinds] if sinks else [])
    names += ["mass", *(f"pool_{kind}" for kind in kinds), "pool_mass", "pool_pos"] if pool else []
    return [f"{kind}.{layer}" for kind in names]


def cache_names(n_layers: int, sinks: int = 0, kv_cache: str = "fp32", pool: int = 0) -> list[str]:
    """Every layer's `layer_cache_names`, in layer order."""
    return [name for i in range(n_layers) for name in layer_cache_names(i, sinks, kv_cache, pool)]


def sink_names(n_layers: int, kv_cache: str = "fp32") -> list[str]:
    return [name for name in cache_names(n_layers, 1, kv_cache) if name.startswith("sink_")]


def is_scale(name: str) -> bool:
    """A cache tensor of int8 scales ([B, Hkv, slots, 1] float16)."""
    return name.split(".")[0].endswith("_scale")


def is_per_slot(name: str) -> bool:
    """A cache tensor of one number per slot ([B, Hkv, slots, 1]): an int8 scale, a mass, a pool position."""
    return is_scale(name) or name.split(".")[0] in ("mass", "pool_mass", "pool_pos")


def cache_dtype(name: str, kv_cache: str) -> str:
    """The numpy dtype name of cache tensor `name` in a `kv_cache` cache: a pool's masses are float32,
    its positions int64 (position + 1: 0 is an empty slot, as a zeroed buffer is)."""
    kind = name.split(".")[0]
    if kind in ("mass", "pool_mass"):
        return "float32"
    if kind == "pool_pos":
        return "int64"
    if kv_cache == "int8":
        return "float16" if is_scale(name) else "int8"
    return _FLOATS[kv_cache]


def fixed_slots(name: str, sinks: int, pool: int) -> int:
    """The slots of cache tensor `name` when they are allocated once (the sinks' S, the pool's P);
    0 for the ring's, which a runtime grows up to W - S - P."""
    return sinks if name.startswith("sink_") else pool if name.startswith("pool_") else 0


def slot_bytes(head_dim: int, kv_cache: str) -> int:
    """Bytes of one slot of one kv head, for keys or for values: D values (and an int8 slot's scale)."""
    return head_dim + 2 if kv_cache == "int8" else head_dim * {"fp32": 4, "fp16": 2}[kv_cache]


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor as a runtime allocates it: [B, Hkv, slots, width] of `dtype`."""

    name: str  # a cache_names name: past_<name> in, present_<name> out
    dtype: str  # numpy dtype name: float32, float16, int8 or int64
    fixed: int  # slots allocated once (the S sinks, the P of a pool); 0: the ring's, grown up to W - S - P
    width: int  # head_dim, or 1 (is_per_slot)


@dataclass(frozen=True)
class GraphInfo:
    """What a runtime needs to know about an exported graph, stored as model metadata."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    window: int
    chunk: int
    vocab_size: int
    activation_dtype: str  # "fp32" | "fp16": hidden states
    kv_cache: str  # one of KV_CACHES: how every cache tensor stores keys and values
    sinks: int = 0  # attention sinks: cache slots holding positions 0..sinks-1 for ever (< window)
    trained_window: int = 0  # the model's own sliding window; 0: trained with full attention
    pool: int = 0  # cache slots holding the most-attended keys that left the ring (docs/cache.md)

    def __post_init__(self) -> None:
        check_kv_cache(self.kv_cache, self.activation_dtype)

    @property
    def ring(self) -> int:
        """Slots of the rolling part of the cache (W - sinks - pool): the most a prefill chunk may hold."""
        return self.window - self.sinks - self.pool

    @property
    def cache_tensors(self) -> list[CacheTensor]:
        """Every cache tensor, in `cache_names` order."""
        return [CacheTensor(name, cache_dtype(name, self.kv_cache), fixed_slots(name, self.sinks, self.pool),
                            1 if is_per_slot(name) else self.head_dim)
                for name in cache_names(self.n_layers, self.sinks, self.kv_cache, self.pool)]

    @property
    def exact(self) -> bool:
        """Whether the cache computes the model's own attention at every length: a model trained
        with this very window and no sinks. Otherwise it is exact up to W tokens only."""
        return self.trained_window == self.window and not self.sinks and not self.pool

    def to_metadata(self) -> dict[str, str]:
        return {META_PREFIX + "graph_contract": str(GRAPH_CONTRACT_VERSION),
                **{META_PREFIX + k: str(v) for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "GraphInfo":
        """Read and check a graph's metadata; one EdgeError line for a wrong contract or a missing key."""
        contract = meta.get(META_PREFIX + "graph_contract")
        if contract != str(GRAPH_CONTRACT_VERSION):
            raise EdgeError(f"{source}: graph contract {contract}, this runtime runs version "
                            f"{GRAPH_CONTRACT_VERSION}; export the model again")
        values = {}
        for f in dataclasses.fields(cls):
            raw = meta.get(META_PREFIX + f.name)
            if raw is None:
                raise EdgeError(f"{source}: not a mistral-edge decoder graph (metadata {META_PREFIX}{f.name} missing)")
            if f.type == "int":
                low = 0 if f.name in ("sinks", "trained_window", "pool") else 1
                if not raw.isdigit() or int(raw) < low or len(raw) > 12:
                    raise EdgeError(f"{source}: graph metadata {f.name} is {raw!r}, expected an integer >= {low}")
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        if values["activation_dtype"] not in ("fp32", "fp16"):
            raise EdgeError(f"{source}: graph activation_dtype is {values['activation_dtype']!r}, expected fp32 or fp16")
        try:
            check_kv_cache(values["kv_cache"], values["activation_dtype"])
        except EdgeError as e:
            raise EdgeError(f"{source}: graph metadata kv_cache: {e}") from None
        ring = values["window"] - values["sinks"] - values["pool"]
        if ring < 1 or values["chunk"] > ring:
            raise EdgeError(f"{source}: graph metadata sinks {values['sinks']}, pool {values['pool']} and chunk "
                            f"{values['chunk']} do not fit the window {values['window']}")
        return cls(**values)


def ring_span(window: int, sinks: int = 0, pool: int = 0) -> str:
    """'the window W=..', and what the sinks and pool leave of it for a chunk, for error messages."""
    held = [f"{sinks} sinks"] * bool(sinks) + [f"pool of {pool}"] * bool(pool)
    return f"the window W={window}" + (f" minus its {' and '.join(held)}, {window - sinks - pool}" if held else "")


def attention_note(trained_window: int | None, window: int | None, sinks: int = 0, pool: int = 0) -> tuple[str, str]:
    """(how the model was trained, what a W-slot cache with `sinks` and `pool` computes), for `info` and `inspect`."""
    trained = f"sliding window of {trained_window}" if trained_window else "full attention (no window)"
    if window is None:
        return trained, "no window chosen: give --window"
    if trained_window == window and not sinks and not pool:
        return trained, f"W={window}: exact (the model's own window)"
    kept = [f"{sinks} sinks"] if sinks else []
    kept += [f"a pool of the {pool} most-attended older tokens"] if pool else []
    kept = " + ".join(kept + [f"the last {window - sinks - pool} tokens"])
    return trained, f"W={window}: exact up to {window} tokens, an approximation past them ({kept})"


def graph_ops(model) -> list[str]:
    """'domain::op' for every op of an onnx.ModelProto, function bodies included."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in nodes})
