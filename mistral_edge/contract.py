"""The graph contract: what the exporter writes and every runtime relies on (docs/graph-contract.md).

Torch- and onnx-free, so the exporter (export/) and the on-device runtime (runtime/) share
it without either importing the other: the version, the input names, and `GraphInfo`,
the facts a runtime reads from the graph's metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import EdgeError

GRAPH_CONTRACT_VERSION = 3
"""The decoder-step interface version; a runtime refuses any other ("export again")."""
META_PREFIX = "mistral_edge."
"""Every metadata key the exporter writes starts with this."""
STEP_INPUTS = ("input_ids", "positions", "valid_lens", "logits_index")
"""The per-step inputs, in graph order; then past_key.{i} / past_value.{i} per layer."""
LOGITS = "logits"


def layer_cache_names(layer: int, sinks: int = 0) -> list[str]:
    """'key.i', 'value.i' (and 'sink_key.i', 'sink_value.i' with sinks): the graph has past_<name>
    inputs and present_<name> outputs."""
    kinds = ("key", "value") + (("sink_key", "sink_value") if sinks else ())
    return [f"{kind}.{layer}" for kind in kinds]


def cache_names(n_layers: int, sinks: int = 0) -> list[str]:
    """Every layer's `layer_cache_names`, in layer order."""
    return [name for i in range(n_layers) for name in layer_cache_names(i, sinks)]


def sink_names(n_layers: int) -> list[str]:
    return [name for name in cache_names(n_layers, 1) if name.startswith("sink_")]


@dataclass(frozen=True)
class GraphInfo:
    """What a runtime needs to know about an exported graph, stored as model metadata."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    window: int
    chunk: int
    vocab_size: int
    activation_dtype: str  # "fp32" | "fp16": hidden states and the KV cache
    sinks: int = 0  # attention sinks: cache slots holding positions 0..sinks-1 for ever (< window)
    trained_window: int = 0  # the model's own sliding window; 0: trained with full attention

    @property
    def ring(self) -> int:
        """Slots of the rolling part of the cache (W - sinks): the most a prefill chunk may hold."""
        return self.window - self.sinks

    @property
    def exact(self) -> bool:
        """Whether the cache computes the model's own attention at every length: a model trained
        with this very window and no sinks. Otherwise it is exact up to W tokens only."""
        return self.trained_window == self.window and not self.sinks

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
                low = 0 if f.name in ("sinks", "trained_window") else 1
                if not raw.isdigit() or int(raw) < low or len(raw) > 12:
                    raise EdgeError(f"{source}: graph metadata {f.name} is {raw!r}, expected an integer >= {low}")
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        if values["activation_dtype"] not in ("fp32", "fp16"):
            raise EdgeError(f"{source}: graph activation_dtype is {values['activation_dtype']!r}, expected fp32 or fp16")
        if values["sinks"] >= values["window"] or values["chunk"] > values["window"] - values["sinks"]:
            raise EdgeError(f"{source}: graph metadata sinks {values['sinks']} and chunk {values['chunk']} do not "
                            f"fit the window {values['window']}")
        return cls(**values)


def attention_note(trained_window: int | None, window: int | None, sinks: int = 0) -> tuple[str, str]:
    """(how the model was trained, what a W-slot cache with `sinks` computes), for `info` and `inspect`."""
    trained = f"sliding window of {trained_window}" if trained_window else "full attention (no window)"
    if window is None:
        return trained, "no window chosen: give --window"
    if trained_window == window and not sinks:
        return trained, f"W={window}: exact (the model's own window)"
    kept = f"{sinks} sinks + the last {window - sinks} tokens" if sinks else f"the last {window} tokens"
    return trained, f"W={window}: exact up to {window} tokens, an approximation past them ({kept})"


def graph_ops(model) -> list[str]:
    """'domain::op' for every op of an onnx.ModelProto, function bodies included."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in nodes})
