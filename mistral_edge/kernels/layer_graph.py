"""Attention nodes in a graph of their own, fed plan tensors computed beforehand: how the kernel's
tests and benchmarks (tests/test_kernel.py, benchmarks/kernel_decode.py) drive one op variant
without a whole decoder. Names and input order are the graph contract's (docs/kernel.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import FunctionProto, TensorProto, helper

from ..contract import cache_dtype, is_scale, layer_cache_names
from ..export.attention import DOMAIN, PLAN_INPUTS, SINK_PLAN_INPUTS, attention_function, attention_plan, op_name
from ..export.onnx_builder import ACTIVATIONS, Builder
from ..model.config import ModelConfig


@dataclass(frozen=True)
class Layer:
    """One attention node's shapes and types: activations fp32|fp16, kv_cache fp32|fp16|int8."""

    cfg: ModelConfig
    window: int
    act: str = "fp32"
    kv_cache: str = "fp32"
    sinks: int = 0

    @property
    def op(self) -> str:
        return op_name(self.sinks, self.kv_cache)

    @property
    def caches(self) -> list[str]:
        """Cache tensor names in the op's input order (past_X, present_X)."""
        return [name.split(".")[0] for name in layer_cache_names(0, self.sinks, self.kv_cache)]

    @property
    def plan_inputs(self) -> tuple[str, ...]:
        return PLAN_INPUTS + (SINK_PLAN_INPUTS if self.sinks else ())

    def cache_dtype(self, name: str) -> np.dtype:
        return np.dtype(cache_dtype(name, self.kv_cache))

    def new_cache(self, batch: int, slots: int, suffix: str = "") -> dict[str, np.ndarray]:
        """Zeroed buffers, as the runtime allocates them; `slots` ring slots, the sinks' own Ss."""
        out = {}
        for name in self.caches:
            n = self.sinks if name.startswith("sink_") else slots
            d = 1 if is_scale(name) else self.cfg.head_dim
            out[name + suffix] = np.zeros((batch, self.cfg.n_kv_heads, n, d), self.cache_dtype(name))
        return out

    def _tensor_type(self, name: str) -> int:
        if name in ("write_at", "gather_idx", "score_split", "sink_src"):
            return TensorProto.INT64
        if name in ("keep", "sink_new"):
            return TensorProto.BOOL
        return ACTIVATIONS[self.act].onnx_type

    def plan_model(self) -> bytes:
        """input_ids, positions, valid_lens and the cache's past_key -> the plan tensors."""
        b = Builder()
        ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "c"] if n == "input_ids" else ["b"])
               for n in ("input_ids", "positions", "valid_lens")]
        ins.append(helper.make_tensor_value_info(
            "past_key", helper.np_dtype_to_tensor_dtype(self.cache_dtype("key")),
            ["b", self.cfg.n_kv_heads, "s", self.cfg.head_dim]))
        plan = attention_plan(b, self.cfg, self.window, "past_key", ACTIVATIONS[self.act], self.sinks)
        outs = [helper.make_tensor_value_info(n, self._tensor_type(k), None)
                for n, k in zip(plan.inputs, self.plan_inputs)]
        g = helper.make_graph(b.nodes, "plan", ins, outs, b.initializers)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)], ir_version=10).SerializeToString()

    def plan(self, positions: np.ndarray, valid: np.ndarray, chunk: int, slots: int) -> dict[str, np.ndarray]:
        """The plan tensors of one step, by name."""
        sess = _plan_session(self)
        feeds = {"input_ids": np.zeros((len(positions), chunk), np.int64), "positions": np.asarray(positions, np.int64),
                 "valid_lens": np.asarray(valid, np.int64),
                 "past_key": np.zeros((len(positions), self.cfg.n_kv_heads, slots, self.cfg.head_dim),
                                      self.cache_dtype("key"))}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(self.plan_inputs, sess.run(names, feeds)))

    def function(self) -> FunctionProto:
        """The op's portable function body (export/attention.py)."""
        return attention_function(self.cfg, self.sinks, kv_cache=self.kv_cache, act=ACTIVATIONS[self.act])

    def attention_model(self, nodes: int = 1, body: bool = True) -> bytes:
        """`nodes` nodes sharing qkv and the plan, each with caches past_X.i / present_X.i and
        output.i. Without the function `body` only a registered kernel can run the graph."""
        width = (self.cfg.n_heads + 2 * self.cfg.n_kv_heads) * self.cfg.head_dim
        act = ACTIVATIONS[self.act].onnx_type
        ins = [helper.make_tensor_value_info("qkv", act, ["b", "c", width])]
        ins += [helper.make_tensor_value_info(n, self._tensor_type(n), None) for n in self.plan_inputs]
        outs, graph_nodes = [], []
        for i in range(nodes):
            for name in self.caches:
                elem = helper.np_dtype_to_tensor_dtype(self.cache_dtype(name))
                ins.append(helper.make_tensor_value_info(f"past_{name}.{i}", elem, None))
            outs.append(helper.make_tensor_value_info(f"output.{i}", act, None))
            outs += [helper.make_tensor_value_info(f"present_{n}.{i}", helper.np_dtype_to_tensor_dtype(
                self.cache_dtype(n)), None) for n in self.caches]
            graph_nodes.append(helper.make_node(
                self.op, ["qkv", *(f"past_{n}.{i}" for n in self.caches), *self.plan_inputs],
                [f"output.{i}", *(f"present_{n}.{i}" for n in self.caches)], domain=DOMAIN))
        g = helper.make_graph(graph_nodes, "attention", ins, outs)
        m = helper.make_model(g, functions=[self.function()] if body else [], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(DOMAIN, 1)])
        return m.SerializeToString()


def bind(session: ort.InferenceSession, qkv: np.ndarray, plan: dict[str, np.ndarray],
         caches: dict[str, np.ndarray], nodes: int = 1) -> ort.IOBinding:
    """An I/O binding with every cache's present bound to its past buffer, as the runtime binds
    them (the caller keeps `caches` alive; the kernel or TensorScatter updates them in place)."""
    io = session.io_binding()
    for i in range(nodes):  # first, so copy_outputs_to_cpu()[i] is output.i
        io.bind_output(f"output.{i}")
    io.bind_cpu_input("qkv", qkv)
    for name, value in plan.items():
        io.bind_cpu_input(name, value)
    for name, array in caches.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        io.bind_ortvalue_input("past_" + name, value)
        io.bind_ortvalue_output("present_" + name, value)
    return io


@functools.lru_cache(maxsize=16)
def _plan_session(layer: Layer) -> ort.InferenceSession:
    return ort.InferenceSession(layer.plan_model(), providers=["CPUExecutionProvider"])
