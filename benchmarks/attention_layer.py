"""Per-layer decode attention: the native kernel against the function body (docs/kernel.md).

One graph of N `WindowedGroupQueryAttention` nodes, each with its own cache bound in place as the
runtime binds it, fed plan tensors computed once beforehand (the decoder shares them across
layers), so the time per node is attention alone. Sessions with and without the kernel alternate
within each round; the figure is the median over rounds of the per-node mean.

    PYTHONPATH=$PWD python benchmarks/attention_layer.py --slots 256 1024 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from mistral_edge.export.attention import DOMAIN, OP, PLAN_INPUTS, attention_function, attention_plan
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.model.config import ModelConfig
from mistral_edge.runtime.session import _register_kernel

DEMO = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152)


def plan_type(name: str, act) -> int:
    return {"write_at": TensorProto.INT64, "gather_idx": TensorProto.INT64, "score_split": TensorProto.INT64,
            "keep": TensorProto.BOOL}.get(name, act.onnx_type)


def plan_model(cfg: ModelConfig, window: int, act) -> tuple[bytes, list[str]]:
    b = Builder()
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "c"] if n == "input_ids" else ["b"])
           for n in ("input_ids", "positions", "valid_lens")]
    ins.append(helper.make_tensor_value_info("past_key", act.onnx_type, ["b", cfg.n_kv_heads, "s", cfg.head_dim]))
    plan = attention_plan(b, cfg, window, "past_key", act)
    outs = [helper.make_tensor_value_info(n, plan_type(k, act), None) for n, k in zip(plan.inputs, PLAN_INPUTS)]
    g = helper.make_graph(b.nodes, "plan", ins, outs, b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    return m.SerializeToString(), plan.inputs


def attention_model(cfg: ModelConfig, n: int, act) -> bytes:
    cache = ["b", cfg.n_kv_heads, "s", cfg.head_dim]
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    ins = [helper.make_tensor_value_info("qkv", act.onnx_type, ["b", "c", width])]
    ins += [helper.make_tensor_value_info(name, plan_type(name, act), None) for name in PLAN_INPUTS]
    outs, nodes = [], []
    for i in range(n):
        ins += [helper.make_tensor_value_info(f"past_{k}.{i}", act.onnx_type, cache) for k in ("key", "value")]
        outs += [helper.make_tensor_value_info(f"{k}.{i}", act.onnx_type, None)
                 for k in ("output", "present_key", "present_value")]
        nodes.append(helper.make_node(OP, ["qkv", f"past_key.{i}", f"past_value.{i}", *PLAN_INPUTS],
                                      [f"output.{i}", f"present_key.{i}", f"present_value.{i}"], domain=DOMAIN))
    g = helper.make_graph(nodes, "attention", ins, outs)
    m = helper.make_model(g, functions=[attention_function(cfg)], ir_version=10,
                          opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(DOMAIN, 1)])
    return m.SerializeToString()


def session(model: bytes, threads: int, kernel: str) -> tuple[ort.InferenceSession, str]:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    path = _register_kernel(so, kernel)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]), path


def bench(cfg: ModelConfig, window: int, slots: int, threads: int, nodes: int, rounds: int, iters: int,
          act_name: str, clock) -> dict[str, float]:
    act = ACTIVATIONS[act_name]
    rng = np.random.default_rng(0)
    position = slots - 1 if slots < window else 4 * window + 7  # a full cache, or one long past the wrap
    plan_bytes, names = plan_model(cfg, window, act)
    plan_sess = ort.InferenceSession(plan_bytes, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "positions": np.array([position]),
             "valid_lens": np.array([1]), "past_key": np.zeros((1, cfg.n_kv_heads, slots, cfg.head_dim), act.np_type)}
    plan = dict(zip(PLAN_INPUTS, plan_sess.run(names, feeds)))
    model = attention_model(cfg, nodes, act)
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    runs = {}
    for kernel in ("on", "off"):
        sess, label = session(model, threads, kernel)
        io = sess.io_binding()
        keep = [rng.standard_normal((1, 1, width)).astype(act.np_type)]
        io.bind_cpu_input("qkv", keep[0])
        for name, value in plan.items():
            io.bind_cpu_input(name, value)
        for i in range(nodes):
            for k in ("key", "value"):
                a = rng.standard_normal((1, cfg.n_kv_heads, slots, cfg.head_dim)).astype(act.np_type)
                v = ort.OrtValue.ortvalue_from_numpy(a)
                keep += [a, v]
                io.bind_ortvalue_input(f"past_{k}.{i}", v)
                io.bind_ortvalue_output(f"present_{k}.{i}", v)
            io.bind_output(f"output.{i}")
        runs[kernel] = (sess, io, label, keep)
    per_node = {k: [] for k in runs}
    for _ in range(rounds):
        for kernel, (sess, io, _, _) in runs.items():  # alternate the two paths every round
            sess.run_with_iobinding(io)
            t = clock()
            for _ in range(iters):
                sess.run_with_iobinding(io)
            per_node[kernel].append((clock() - t) / iters / nodes * 1e6)
    return {runs[k][2]: float(np.median(v)) for k, v in per_node.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--activations", choices=sorted(ACTIVATIONS), default="fp32")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time, robust on a loaded machine (meaningful with 1 thread)")
    a = ap.parse_args()
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    for threads in a.threads:
        for slots in a.slots:
            r = bench(DEMO, a.window, slots, threads, a.nodes, a.rounds, a.iters, a.activations, clock)
            (nk, native), (_, body) = r.items()
            print(f"{a.activations} {a.clock} slots={slots} threads={threads}: {nk} {native:.1f} us, "
                  f"function body {body:.1f} us, speedup {body / native:.2f}x")


if __name__ == "__main__":
    main()
