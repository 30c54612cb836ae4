"""The reference model behind the runtime's session interface, for `--backend torch`, on a CPU or a CUDA device.

Also where the torch backend's choices are resolved once for every caller (generate, chat,
compare, the GPU benchmark): the device (a CUDA device asked for and absent is one error
line), the compute dtype, and the quantization of the layer linears.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeError
from .reference import ReferenceModel

DEVICES = ("cpu", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNQUANTIZED = "none"


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


class TorchSession:
    """A runtime.session.Session (as DecoderSession is) computed by the PyTorch reference, eagerly."""

    def __init__(self, model: ReferenceModel, window: int, chunk: int, batch: int = 1, sinks: int = 0):
        if not 0 < chunk <= window - sinks:
            raise EdgeError(f"chunk size must be between 1 and W - sinks = {window - sinks}, got {chunk}")
        self.model, self.window, self.chunk, self.batch, self.sinks = model, window, chunk, batch, sinks
        self.vocab_size = model.cfg.vocab_size
        self.cache = self.new_cache()

    def new_cache(self):
        return self.model.new_cache(self.batch, self.window, self.sinks)

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
