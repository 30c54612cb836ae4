"""A tiny helper over onnx.helper: unique names, initializers, and nodes in one place.

Initializers can stream: with an `ExternalData` file, each one's bytes go to disk as it is
made and the graph keeps only a reference, so a model is never held in memory whole (ONNX's
protobuf limit is 2 GB; a 7B model is 4 GB at int4).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeError

EXTERNAL_MIN_BYTES = 1024
"""Initializers of at least this size go to the external-data file (onnx's own default threshold)."""
ALIGN = 64 << 10
"""Offset of every external tensor: a multiple of the page size (4 KiB) and of Windows' allocation
granularity (64 KiB), so ONNX Runtime can map each tensor straight from the file."""


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim). Quantizing one tensor frees
    many temporaries of a few MiB, below glibc's mmap threshold, so they come from the heap and
    fragment it: measured on a 7B-wide layer, the resident set after each layer grew by 0.3-0.4
    GiB without this (docs/export-scale.md)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ExternalData:
    """The graph's external-data file, written tensor by tensor (docs: onnx's ExternalData.md)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.size = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Append `array`'s bytes (at an aligned offset) and return a TensorProto that refers to them."""
        if array.dtype.itemsize == 1 and array.dtype.name in ("int4", "uint4"):  # packed two per byte by onnx
            t = numpy_helper.from_array(array, name)
            data = memoryview(t.raw_data)
            t.ClearField("raw_data")
        else:
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape)
            data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset = -(-self.size // ALIGN) * ALIGN
        self._file.write(b"\0" * (offset - self.size))
        self._file.write(data)
        self.size = offset + data.nbytes
        release_free_memory()  # the previous tensors' temporaries
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(data.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        self._file.close()


def save_model(model: onnx.ModelProto, path: Path, data: ExternalData, inline_below: int) -> None:
    """Write the graph beside its (closed) external-data file; a model whose data file stays under
    `inline_below` bytes is folded back into one self-contained .onnx file."""
    path = Path(path)
    if data.size < inline_below:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        os.unlink(data.path)
    onnx.save(model, str(path))


class Builder:
    """Accumulates nodes and initializers of one graph (or one function body); with `data`,
    initializers of EXTERNAL_MIN_BYTES or more are streamed to that file."""

    def __init__(self, prefix: str = "", data: ExternalData | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self._prefix = prefix
        self._data = data

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{self._prefix}{hint}_{self._counter}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        outs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name or self.fresh(op_type),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        if self._data is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            self.initializers.append(self._data.add(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node (usable in function bodies, which have no initializers)."""
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(arr, self.fresh("c")))


FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64


@dataclass(frozen=True)
class Activations:
    """The float type a graph computes in: hidden states, norms, attention, KV cache, scales."""

    name: str  # "fp32" | "fp16", the manifest's activation_dtype
    onnx_type: int
    np_type: type

    @property
    def itemsize(self) -> int:
        return np.dtype(self.np_type).itemsize


ACTIVATIONS = {a.name: a for a in (Activations("fp32", FLOAT, np.float32), Activations("fp16", FLOAT16, np.float16))}


def activation_type(name: str) -> Activations:
    if name not in ACTIVATIONS:
        raise EdgeError(f"unknown activation dtype {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
