"""The reference model behind the runtime's session interface, for `--backend torch`, on a CPU or a CUDA device.

Also where the torch backend's choices are resolved once for every caller (generate, chat,
compare, the GPU benchmark): the device (a CUDA device asked for and absent is one error
line), the compute dtype, and the quantization of the layer linears.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import torch

from .. import contract
from ..errors import EdgeError
from .reference import ReferenceModel

DEVICES = ("cpu", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNQUANTIZED = "none"
HOST_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int8: np.int8}
"""The numpy type of a cache row's host copy (session snapshots) per compute dtype: numpy has no bfloat16,
so a bf16 cache travels as its bit patterns."""
IDENTITY_BYTES = 64
"""Leading bytes of each tensor that model_identity hashes, beside every name, shape and dtype."""


def resolve_device(name: str) -> torch.device:
    """`name` as a torch device, refused in one line when it cannot compute here."""
    if name not in DEVICES:
        raise EdgeError(f"unknown --device {name!r}; expected {' or '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise EdgeError(f"--device cuda: CUDA is not available ({why}; torch {torch.__version__})")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: `name`, or bf16 on a GPU and fp32 on a CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EdgeError(f"unknown --dtype {name!r}; expected {', '.join(DTYPES)}")
    return DTYPES[name]


def check_kv_cache(kv_cache: str | None, dtype: torch.dtype) -> None:
    """Refuse a KV cache type the torch backend cannot store for a `dtype` compute, before any model
    loads, as an export does."""
    if kv_cache is not None:
        contract.check_kv_cache(kv_cache, next(k for k, v in DTYPES.items() if v == dtype), "--dtype")


def torch_quants() -> tuple[str, ...]:
    from .bnb import BNB_QUANTS
    from .weight_only import WO_QUANTS

    return (UNQUANTIZED, *BNB_QUANTS, *WO_QUANTS)


def check_quant(quant: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quant that cannot run on `device` in `dtype` before any model loads."""
    from .bnb import BNB_QUANTS, check_bnb
    from .weight_only import check_weight_only

    if quant not in torch_quants():
        raise EdgeError(f"unknown --quant {quant!r} for the torch backend; expected {', '.join(torch_quants())}")
    if quant in BNB_QUANTS:
        check_bnb(quant, device.type)
    elif quant != UNQUANTIZED:
        check_weight_only(quant, device, dtype)


def quantize(model: ReferenceModel, quant: str) -> int:
    """Quantize `model`'s layer linears as `quant` says; returns the bytes of the weights it now holds."""
    from .bnb import BNB_QUANTS, quantize_linears
    from .weight_only import model_bytes, quantize_weight_only

    if quant in BNB_QUANTS:
        return quantize_linears(model, quant)
    if quant != UNQUANTIZED:
        return quantize_weight_only(model, quant)
    return model_bytes(model)


def model_identity(model: ReferenceModel) -> str:
    """A model's identity for session snapshots (a cache is only valid for the model that computed it):
    the sha256 of its config, compute dtype, and every tensor's name, shape, dtype and first bytes,
    the quantized linears' tensors included. Hashing only leading bytes keeps it cheap for a 7B;
    two checkpoints that differ in none of them are taken for one."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    tensors = [*model.w.items(), *((f"{name}:{type(m).__name__}.{key}", t) for name, m in model.linears.items()
                                    for key, t in m.state_dict().items())]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        lead = t.detach().reshape(-1)[:max(1, IDENTITY_BYTES // t.element_size())]
        h.update(lead.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TorchSession:
    """A runtime.session.Session (as DecoderSession is) computed by the PyTorch reference, eagerly."""

    def __init__(self, model: ReferenceModel, window: int, chunk: int, batch: int = 1, sinks: int = 0,
                 kv_cache: str | None = None):
        """`kv_cache` (fp32, fp16 or int8; None: the compute dtype) stores keys and values as a bundle
        exported with `--kv-cache` does (model/cache.py emulates its storage), so both backends can
        run the same cache type."""
        if not 0 < chunk <= window - sinks:
            raise EdgeError(f"chunk size must be between 1 and W - sinks = {window - sinks}, got {chunk}")
        check_kv_cache(kv_cache, model.dtype)
        self.model, self.window, self.chunk, self.batch, self.sinks = model, window, chunk, batch, sinks
        self.kv_cache = kv_cache
        self.vocab_size = model.cfg.vocab_size
        self.cache = self.new_cache()

    def new_cache(self):
        return self.model.new_cache(self.batch, self.window, self.sinks, self.kv_cache)

    @property
    def positions(self) -> np.ndarray:
        return self.cache.pos.cpu().numpy()

    def reset(self) -> None:
        self.cache = self.new_cache()

    def run(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, C, V] of one chunk (on the model's device)."""
        return self.model.forward(tokens, self.cache, valid)

    def step(self, tokens: np.ndarray, valid_lens: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        dev = self.model.device
        valid = None if valid_lens is None else torch.as_tensor(np.asarray(valid_lens, np.int64)).to(dev)
        logits = self.run(torch.as_tensor(tokens).to(dev), valid)
        if all_logits:
            return logits.cpu().numpy()
        B, C = tokens.shape
        last = (valid - 1).clamp(min=0) if valid is not None else torch.full((B,), C - 1, device=dev)
        return logits[torch.arange(B, device=dev), last][:, None].cpu().numpy()

    # --- a row's cache as host arrays (serve/snapshot.py: moving, caching and saving conversations) ---

    @property
    def cache_dtype(self) -> np.dtype:
        """Of keys and values (an int8 cache: of the codes; its scales are float16)."""
        return np.dtype(HOST_TYPES[self.cache.store_dtype])

    def cache_names(self) -> list[str]:
        """The cache tensors' names: key.i, value.i per layer, then key_scale.i, value_scale.i for an
        int8 cache (the sinks, if any, are the first W slots' first ones)."""
        kinds = ("key", "value") + (("key_scale", "value_scale") if self.cache.k_scale else ())
        return [f"{kind}.{i}" for i in range(len(self.cache.k)) for kind in kinds]

    def _tensors(self) -> list[torch.Tensor]:
        c = self.cache
        return [t for layer in zip(c.k, c.v, *((c.k_scale, c.v_scale) if c.k_scale else ())) for t in layer]

    def read_row(self, row: int, slots: int) -> dict[str, np.ndarray]:
        """Host copies of row `row`'s first `slots` cache slots by name, [Hkv, slots, D] each, in cache_dtype."""
        return {name: (t[row, :, :slots].view(torch.int16) if t.dtype == torch.bfloat16 else t[row, :, :slots])
                .cpu().numpy().copy()
                for name, t in zip(self.cache_names(), self._tensors())}

    def write_row(self, row: int, arrays: dict[str, np.ndarray], position: int) -> None:
        """Make row `row` hold `arrays` (read_row's) in its first slots, nothing after them, at `position`;
        the other rows keep theirs."""
        for name, t in zip(self.cache_names(), self._tensors()):
            saved = torch.from_numpy(np.ascontiguousarray(arrays[name]))
            if t.dtype == torch.bfloat16:
                saved = saved.view(torch.bfloat16)
            t[row] = 0
            t[row, :, :saved.shape[1]] = saved.to(t)
        self.cache.pos[row] = position
