"""Run the decoder-step graph with a preallocated rolling cache bound in place.

The cache (one [B, Hkv, W, D] OrtValue per layer for keys and one for values) is
allocated once; each past_* input and its present_* output are bound to the same
buffer, so ONNX Runtime's TensorScatter updates it in place and no step copies
it. Decode steps reuse preallocated input and logits buffers, so a step
allocates nothing on the Python side either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import EdgeError


@dataclass(frozen=True)
class SessionConfig:
    threads: int = 0  # 0: onnxruntime's default (all physical cores)
    providers: tuple = ("CPUExecutionProvider",)  # names, or (name, options) pairs
    chunk: int | None = None  # prefill chunk; default: the export's
    entries: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries


class _Slot:
    """Preallocated numpy inputs (shared with OrtValues) and logits for one chunk shape."""

    def __init__(self, batch: int, chunk: int, n_logits: int, vocab: int):
        self.input_ids = np.zeros((batch, chunk), np.int64)
        self.positions = np.zeros(batch, np.int64)
        self.valid_lens = np.zeros(batch, np.int64)
        self.logits_index = np.zeros((batch, n_logits), np.int64)
        self.logits = np.zeros((batch, n_logits, vocab), np.float32)
        self.binding = None  # set by DecoderSession once bound
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(getattr(self, name))
                       for name in ("input_ids", "positions", "valid_lens", "logits_index", "logits")}


class DecoderSession:
    def __init__(self, model_path: str | Path, batch: int = 1, config: SessionConfig = SessionConfig()):
        so = ort.SessionOptions()
        so.intra_op_num_threads = config.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in config.entries:
            so.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=list(config.providers))
        except Exception as e:  # onnxruntime raises several types for unreadable models
            raise EdgeError(f"cannot load {model_path}: {str(e).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.n_layers = int(meta["mistral_edge.n_layers"])
            self.window = int(meta["mistral_edge.window"])
            self.vocab_size = int(meta["mistral_edge.vocab_size"])
            n_kv, head_dim = int(meta["mistral_edge.n_kv_heads"]), int(meta["mistral_edge.head_dim"])
            export_chunk = int(meta["mistral_edge.chunk"])
        except KeyError as e:
            raise EdgeError(f"{model_path}: not a mistral-edge decoder graph (metadata {e.args[0]} missing)") from None
        self.chunk = config.chunk or export_chunk
        if not 0 < self.chunk <= self.window:
            raise EdgeError(f"chunk size must be between 1 and the window W={self.window}, got {self.chunk}")
        self.batch = batch
        self.cache = {
            f"{kind}.{i}": ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, n_kv, self.window, head_dim), np.float32))
            for i in range(self.n_layers) for kind in ("key", "value")
        }
        self.positions = np.zeros(batch, np.int64)
        self._slots: dict[tuple[int, int], _Slot] = {}

    @property
    def cache_bytes(self) -> int:
        return sum(v.numpy().nbytes for v in self.cache.values())

    def reset(self) -> None:
        for v in self.cache.values():
            v.update_inplace(np.zeros(v.shape(), np.float32))
        self.positions[:] = 0

    def _slot(self, chunk: int, n_logits: int) -> _Slot:
        key = (chunk, n_logits)
        if key not in self._slots:
            slot = _Slot(self.batch, chunk, n_logits, self.vocab_size)
            binding = self.session.io_binding()
            for name, value in slot.values.items():
                if name == "logits":
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            for name, value in self.cache.items():
                binding.bind_ortvalue_input("past_" + name, value)
                binding.bind_ortvalue_output("present_" + name, value)
            slot.binding = binding
            self._slots[key] = slot
        return self._slots[key]

    def step(self, tokens: np.ndarray, valid_lens: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        """Feed a [B, C] chunk (C <= W); returns logits [B, C, V] or, by default, [B, 1, V] of each
        sequence's last valid token. Sequences advance by their valid length. The returned array is
        a reused buffer: copy it to keep it past the next step."""
        batch, chunk = tokens.shape
        if batch != self.batch:
            raise EdgeError(f"session was created for batch {self.batch}, got {batch}")
        if not 0 < chunk <= self.window:
            raise EdgeError(f"chunk of {chunk} tokens: must be between 1 and the window W={self.window}")
        valid = np.full(batch, chunk, np.int64) if valid_lens is None else np.asarray(valid_lens, np.int64)
        slot = self._slot(chunk, chunk if all_logits else 1)
        slot.input_ids[...] = tokens
        slot.positions[...] = self.positions
        slot.valid_lens[...] = valid
        slot.logits_index[...] = np.arange(chunk) if all_logits else np.maximum(valid - 1, 0)[:, None]
        self.session.run_with_iobinding(slot.binding)
        self.positions += valid
        return slot.logits
