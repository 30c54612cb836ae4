"""A tiny helper over onnx.helper: unique names, initializers, and nodes in one place."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeError


class Builder:
    """Accumulates nodes and initializers of one graph (or one function body)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self._prefix = prefix

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
