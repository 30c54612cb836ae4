"""Weight files as `Weights`: safetensors read lazily (headers now, each tensor when asked for), torch
pickles (only with the user's trust) eagerly."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ...errors import EdgeError, first_line
from ..weights import TensorMeta, Weights

PICKLE_SUFFIXES = (".bin", ".pth", ".pt")

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def require_trust(path: Path, trust_pickle: bool) -> None:
    """Pickles can run code when unpickled, so loading one is the user's explicit decision."""
    if not trust_pickle:
        raise EdgeError(f"{path} is a pickle checkpoint, which can run code when loaded; "
                        "pass --trust-pickle if you trust where it came from")


def _unreadable(f: Path, e: Exception) -> EdgeError:
    return EdgeError(f"{f}: unreadable safetensors file, truncated or corrupt ({first_line(e)})")


def _read_safetensors(f: Path, name: str) -> torch.Tensor:
    """One tensor; the file is opened for it alone, so no mapping of the whole file outlives the read."""
    try:
        with safe_open(f, framework="pt") as h:
            return h.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise _unreadable(f, e) from None


def _safetensors_weights(f: Path) -> Weights:
    """Names, shapes and dtypes from the header (which safetensors checks covers the file exactly)."""
    entries = {}
    try:
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                part = h.get_slice(name)
                dtype = _DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise EdgeError(f"{f}: tensor {name!r} has dtype {part.get_dtype()}, which is not supported")
                entries[name] = (TensorMeta(tuple(part.get_shape()), dtype), partial(_read_safetensors, f, name))
    except (SafetensorError, OSError) as e:
        raise _unreadable(f, e) from None
    return Weights(entries)


def _pickle_weights(f: Path, trust_pickle: bool) -> Weights:
    require_trust(f, trust_pickle)
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise EdgeError(f"{f}: cannot load pickle checkpoint ({first_line(e)})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                            for k, t in obj.items()):
        raise EdgeError(f"{f}: pickle does not hold a flat dict of tensors")
    return Weights.of(obj)


def open_tensors(files: list[Path], trust_pickle: bool) -> Weights:
    """Every tensor of the files under its stored name; a name stored in two files is refused."""
    return Weights.union((f.name, _safetensors_weights(f) if f.suffix == ".safetensors"
                          else _pickle_weights(f, trust_pickle)) for f in files)
