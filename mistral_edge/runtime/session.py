"""Run the decoder-step graph with a rolling cache bound in place.

The cache is one [B, Hkv, S, D] buffer per layer for keys and one for values (an int8 cache:
int8 codes, plus one [B, Hkv, S, 1] float16 buffer of scales beside each); each
past_* input and its present_* output are bound to the same buffer, so ONNX Runtime's
TensorScatter updates it in place and no step copies it. Under the portable function body,
which reads all S slots, S grows with the sequence in steps of GROW slots up to the window W
and then stays there (a rolling buffer of W slots; W - sinks - pool with attention sinks or a
pool, whose own buffers are allocated once), so a short sequence does not pay for W. The native kernel
never reads a slot not yet written, so there the whole ring is allocated at the first step
(zero pages: resident only once written) and kept across resets: growing cost as much
resident memory again as the cache, in the malloc heap (docs/cache.md). Every cache tensor
has the dtype the graph's contract gives it (contract.GraphInfo.cache_tensors), checked
against the graph's declared inputs. Decode
steps reuse preallocated input and logits buffers, so a step allocates nothing on the
Python side either.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contract import GraphInfo, ring_span
from ..errors import EdgeError, first_line


@dataclass(frozen=True)
class SessionConfig:
    threads: int = 0  # 0: onnxruntime's default (all physical cores)
    providers: tuple = ("CPUExecutionProvider",)  # names, or (name, options) pairs
    chunk: int | None = None  # prefill chunk; default: the export's
    entries: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries
    kernel: str | None = None  # native attention kernel: "auto", "on" (required) or "off"; None: $MISTRAL_EDGE_KERNEL or auto


KERNEL_MODES = ("auto", "on", "off")
FUNCTION_BODY = "function body"
NATIVE_CACHES = (("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "fp16"), ("fp32", "int8"), ("fp16", "int8"))
"""(activation type, cache type) of the graphs the native library has a kernel for (kernels/wgqa.cc);
a graph of another pair finds no kernel of its types or op name and runs its function body."""
LIBRARY_OPS = ("WindowedGroupQueryAttention", "SinkWindowedGroupQueryAttention",
               "WindowedGroupQueryAttentionInt8Cache", "SinkWindowedGroupQueryAttentionInt8Cache",
               "PoolSinkWindowedGroupQueryAttention", "PoolSinkWindowedGroupQueryAttentionInt8Cache")
"""The op names the native library registers (kernels/wgqa.cc, domain mistral_edge)."""
_LIBRARY_REFUSAL = re.compile(r"of operator \((\w+)\)|implementation for (\w+)\(")
"""ONNX Runtime's words when the library is why a graph does not load: a node of one of its op names
with types it has no kernel for (a type error, or no implementation); the op name is group 1 or 2."""


def _kernel_mode(mode: str | None) -> str:
    return (mode or os.environ.get("MISTRAL_EDGE_KERNEL") or "auto").lower()


def _register_kernel(so: ort.SessionOptions, mode: str | None, providers: tuple = ("CPUExecutionProvider",)) -> str:
    """Register the native WindowedGroupQueryAttention library on `so` as `mode` asks; returns the
    attention path the session will run ("native kernel (isa)" or "function body (why)"). The
    kernel is a CPU one: with another provider first, registering it would pull attention off
    that device, so "auto" leaves the function body there."""
    mode = _kernel_mode(mode)
    if mode not in KERNEL_MODES:
        raise EdgeError(f"MISTRAL_EDGE_KERNEL / kernel must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    if mode == "off":
        return f"{FUNCTION_BODY} (native kernel turned off)"
    first = providers[0] if providers else "CPUExecutionProvider"
    first = first if isinstance(first, str) else first[0]
    if mode == "auto" and first != "CPUExecutionProvider":
        return f"{FUNCTION_BODY} (the native kernel is for the CPU provider, not {first})"
    from .. import kernels  # ctypes only: the runtime stays torch-free

    reason = kernels.unavailable_reason()
    if reason is None:
        try:
            so.register_custom_ops_library(str(kernels.library_path()))
            return f"native kernel ({kernels.isa()})"
        except Exception as e:  # onnxruntime's Fail (not a RuntimeError) for a library it cannot load
            reason = f"native kernel failed to load: {first_line(e)}"
    if mode == "on":
        raise EdgeError(reason)
    return f"{FUNCTION_BODY} ({reason})"


def _options(config: SessionConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in config.entries:
        so.add_session_config_entry(key, value)
    return so


class _LibraryRefused(Exception):
    """ONNX Runtime refused a graph because of the native library registered beside it."""


def _open(model_path: str | Path, so: ort.SessionOptions, providers: tuple,
          library: bool = False) -> ort.InferenceSession:
    """The loaded graph. With the native `library` registered on `so`, a refusal that is the
    library's raises _LibraryRefused (the caller loads the graph again without it); any other
    failure (a corrupt, hostile or foreign file) is one EdgeError line, never retried."""
    try:
        return ort.InferenceSession(str(model_path), so, providers=list(providers))
    except Exception as e:  # onnxruntime raises several types for unreadable models
        refused = _LIBRARY_REFUSAL.search(str(e)) if library else None
        if refused and (refused[1] or refused[2]) in LIBRARY_OPS:
            raise _LibraryRefused from None
        raise EdgeError(f"cannot load {model_path}: {first_line(e)}") from None


def _kernel_covers(path: str, info: GraphInfo, mode: str | None, loaded: bool = True) -> str:
    """The attention path `_register_kernel` chose, unless the library has no kernel for this graph's
    (activation, cache) types (NATIVE_CACHES; `loaded` False: the graph only loaded without the
    library) or has a pool without sinks (the library keeps a pool beside sinks only: that op name
    is not the library's): then the function body runs, and "on" (which requires the kernel) refuses."""
    pair = (info.activation_dtype, info.kv_cache)
    pool_alone = info.pool and not info.sinks
    if not path.startswith("native kernel") or (loaded and pair in NATIVE_CACHES and not pool_alone):
        return path
    why = ("the native kernel keeps a pool only beside attention sinks" if pool_alone
           else f"the native kernel has no variant for {pair[0]} activations with an {pair[1]} cache")
    if _kernel_mode(mode) == "on":
        raise EdgeError(why)
    return f"{FUNCTION_BODY} ({why})"


@runtime_checkable
class Session(Protocol):
    """What the generation loop needs of a decoder: DecoderSession (ONNX Runtime) and
    model.torch_session.TorchSession (the PyTorch reference) both have it."""

    batch: int
    window: int  # W, the KV-cache slots
    chunk: int  # the prefill chunk
    vocab_size: int

    @property
    def positions(self) -> np.ndarray:
        """[B] tokens each sequence has taken so far."""

    def step(self, tokens: np.ndarray, valid_lens: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        """Feed a [B, C] chunk; logits [B, C, V], or [B, 1, V] of each sequence's last valid token."""

    def reset(self) -> None:
        """Forget every sequence: positions back to 0."""


class _StepBuffers:
    """The I/O buffers of one step shape: preallocated numpy inputs (shared with OrtValues), logits, their binding."""

    def __init__(self, batch: int, chunk: int, n_logits: int, vocab: int):
        self.input_ids = np.zeros((batch, chunk), np.int64)
        self.positions = np.zeros(batch, np.int64)
        self.valid_lens = np.zeros(batch, np.int64)
        self.logits_index = np.zeros((batch, n_logits), np.int64)
        self.logits = np.zeros((batch, n_logits, vocab), np.float32)
        self.binding = None  # set by DecoderSession once bound
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(getattr(self, name))
                       for name in ("input_ids", "positions", "valid_lens", "logits_index", "logits")}


GROW = 64
"""Under the function body, cache slots are added in steps of this many: attention reads at most
GROW - 1 empty slots, and growing copies the cache about W / GROW times in all."""
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)", "int64": "tensor(int64)"}


class DecoderSession:
    def __init__(self, model_path: str | Path, batch: int = 1, config: SessionConfig = SessionConfig()):
        so = _options(config)
        path = _register_kernel(so, config.kernel, config.providers)
        try:  # a library that failed to register is not registered: _register_kernel said why
            self.session = _open(model_path, so, config.providers, library=path.startswith("native kernel"))
            fits = True
        except _LibraryRefused:
            self.session = _open(model_path, _options(config), config.providers)
            fits = False
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = info = GraphInfo.from_metadata(meta, str(model_path))
        self.attention_path = _kernel_covers(path, info, config.kernel, fits)
        self.n_layers, self.window, self.vocab_size = info.n_layers, info.window, info.vocab_size
        self.sinks, self.pool, self.ring = info.sinks, info.pool, info.ring
        self.chunk = config.chunk or info.chunk
        if not 0 < self.chunk <= self.ring:
            raise EdgeError(f"chunk size must be between 1 and {self._span}, got {self.chunk}")
        self.kv_cache = info.kv_cache
        declared = {i.name: i.type for i in self.session.get_inputs()}
        for t in info.cache_tensors:
            if declared.get("past_" + t.name) != ORT_TYPES[t.dtype]:
                raise EdgeError(f"{model_path}: cache input past_{t.name} is {declared.get('past_' + t.name)}, "
                                f"a {info.kv_cache} cache needs {ORT_TYPES[t.dtype]}")
        self._tensors = {t.name: t for t in info.cache_tensors}
        self.cache_dtype = np.dtype(self._tensors["key.0"].dtype)  # of keys and values (int8: codes)
        self._rows(batch)

    def with_batch(self, batch: int) -> DecoderSession:
        """A session of `batch` rows on this one's loaded graph and weights, with a cache, buffers and
        positions of its own: no second copy of the model (ONNX Runtime runs one graph from several
        threads at once, so the two may step in different threads). serve's sessions share one model so."""
        twin = copy.copy(self)
        twin._rows(batch)
        return twin

    def _rows(self, batch: int) -> None:
        """Empty state for `batch` sequences: positions, step buffers, the cache (sinks and pool: once)."""
        self.batch = batch
        self.positions = np.zeros(batch, np.int64)
        self._buffers: dict[tuple[int, int], _StepBuffers] = {}
        self._arrays: dict[str, np.ndarray] = {}  # the cache buffers; self.cache holds OrtValues over them
        self.cache: dict[str, ort.OrtValue] = {}
        for t in self._tensors.values():
            if t.fixed:
                self._arrays[t.name] = np.zeros((batch, self.info.n_kv_heads, t.fixed, t.width), t.dtype)
                self.cache[t.name] = ort.OrtValue.ortvalue_from_numpy(self._arrays[t.name])
        self._allocate(0)

    @property
    def _span(self) -> str:
        return ring_span(self.window, self.sinks, self.pool)

    @property
    def slots(self) -> int:
        """Ring slots S currently allocated (<= W - sinks - pool)."""
        return self._arrays["key.0"].shape[2]

    @property
    def cache_bytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def _allocate(self, slots: int, keep: int = 0) -> None:
        """(Re)allocate every cache buffer with `slots` slots, keeping the first `keep` of the old one.

        Buffers are numpy arrays, freed when dropped (onnxruntime-allocated ones bought no speed,
        docs/graph-contract.md), zeroed (empty slots are masked, but 0 * NaN would still poison the
        weighted sum), and replaced a layer at a time, so growing holds at most one extra buffer."""
        for t in self._tensors.values():
            if t.fixed:
                continue
            a = np.zeros((self.batch, self.info.n_kv_heads, slots, t.width), t.dtype)
            if keep:
                a[:, :, :keep] = self._arrays[t.name][:, :, :keep]
            self._arrays[t.name] = a  # drops this layer's old buffer
            self.cache[t.name] = ort.OrtValue.ortvalue_from_numpy(a)
        for buffers in self._buffers.values():
            self._bind_cache(buffers.binding)

    def _reserve(self, tokens: int) -> None:
        """Make room for sequences of `tokens` tokens: S >= min(ring, tokens), so no write wraps early."""
        need = min(self.ring, tokens)
        if need > self.slots:
            step = self.ring if self._whole_ring else -(-need // GROW) * GROW
            self._allocate(min(self.ring, step), keep=self.slots)

    @property
    def _whole_ring(self) -> bool:
        """Whether the cache is allocated whole: the native kernel reads only the slots written."""
        return self.attention_path.startswith("native kernel")

    def reset(self) -> None:
        whole, written = self._whole_ring, min(self.slots, int(self.positions.max()))
        self.positions[:] = 0
        for t in self._tensors.values():
            if t.fixed:
                self._arrays[t.name][...] = 0
            elif whole:  # kept: zero what was written, touching no other page
                self._arrays[t.name][:, :, :written] = 0
        if not whole:
            self._allocate(0)

    def _bind_cache(self, binding) -> None:
        for name, value in self.cache.items():
            binding.bind_ortvalue_input("past_" + name, value)
            binding.bind_ortvalue_output("present_" + name, value)

    def _buffers_for(self, chunk: int, n_logits: int) -> _StepBuffers:
        key = (chunk, n_logits)
        if key not in self._buffers:
            buffers = _StepBuffers(self.batch, chunk, n_logits, self.vocab_size)
            binding = self.session.io_binding()
            for name, value in buffers.values.items():
                if name == "logits":
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            self._bind_cache(binding)
            buffers.binding = binding
            self._buffers[key] = buffers
        return self._buffers[key]

    def step(self, tokens: np.ndarray, valid_lens: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        """Feed a [B, C] chunk (C <= the ring); returns logits [B, C, V] or, by default, [B, 1, V] of each
        sequence's last valid token. Sequences advance by their valid length. The returned array is
        a reused buffer: copy it to keep it past the next step."""
        batch, chunk = tokens.shape
        if batch != self.batch:
            raise EdgeError(f"session was created for batch {self.batch}, got {batch}")
        if not 0 < chunk <= self.ring:
            raise EdgeError(f"chunk of {chunk} tokens: must be between 1 and {self._span}")
        valid = np.full(batch, chunk, np.int64) if valid_lens is None else np.asarray(valid_lens, np.int64)
        self._reserve(int(self.positions.max()) + chunk)
        io = self._buffers_for(chunk, chunk if all_logits else 1)
        io.input_ids[...] = tokens
        io.positions[...] = self.positions
        io.valid_lens[...] = valid
        io.logits_index[...] = np.arange(chunk) if all_logits else np.maximum(valid - 1, 0)[:, None]
        self.session.run_with_iobinding(io.binding)
        self.positions += valid
        return io.logits
