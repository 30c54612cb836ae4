"""Microseconds per call of one linear, x [1, M, K] @ W.T, as each weight format emits it.

    python benchmarks/linear_speed.py                   # 576x1536 (the demo's w13 is 3072x576), M 1 and 128, 1 thread
    python benchmarks/linear_speed.py --shape 1536x576 --rows 1,16,128 --threads 2

Rows: int4 MatMulNBits (g32, symmetric) at accuracy levels 1 and 4, int8 MatMulNBits (the `nbits`
format: blocks of 16, groups of 64) at level 4, int8 com.microsoft.DynamicQuantizeMatMul (per-tensor
uint8 activations; not a format, the op ORT offers for this), and the `integer` format's int8
(per-row uint8 activations, MatMulInteger): every graph but DynamicQuantizeMatMul's is built by
export/linear.py's WeightEmitter itself. Also the error against x @ W.T on the same int8 weights
for a normal x with one outlier channel (x40) and one outlier row (x40), the cases that
separate per-tensor from per-row activation scales. Prints the CPU and MLAS's u8s8 path
(benchmarks/vs_peers.py cpu_facts). Medians of --calls; run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import Builder
from mistral_edge.quantize.int8 import quantize_int8
from mistral_edge.quantize.plan import TensorQuant
from vs_peers import cpu_facts


def session(builder: Builder, out: str, k: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(builder.nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def emitted(w: torch.Tensor, tq: TensorQuant, fmt: str, level: int, threads: int) -> ort.InferenceSession:
    b = Builder()
    out = WeightEmitter(b, {"w": tq}, fmt, level).linear("x", "w", w)
    return session(b, out, w.shape[1], threads)


def dynamic_quantize_matmul(w: torch.Tensor, threads: int) -> ort.InferenceSession:
    q8 = quantize_int8(w, group_size=w.shape[1])
    b = Builder()
    codes = b.init("w.q_t", q8.q.T.contiguous().numpy())
    scales = b.init("w.scales", q8.scales.reshape(-1).numpy())
    out = b.op("DynamicQuantizeMatMul", ["x", codes, scales], domain="com.microsoft")
    return session(b, out, w.shape[1], threads)


def median_us(sess: ort.InferenceSession, x: np.ndarray, calls: int) -> float:
    for _ in range(5):  # prepacking and first allocations
        sess.run(None, {"x": x})
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536x576", help="N x K of W")
    ap.add_argument("--rows", default="1,128", help="M values (tokens per call)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    n, k = map(int, args.shape.lower().split("x"))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    int4 = TensorQuant("int4", 32, "none")
    systems = {
        "int4 MatMulNBits lvl1": emitted(w, int4, "nbits", 1, args.threads),
        "int4 MatMulNBits lvl4": emitted(w, int4, "nbits", 4, args.threads),
        "int8 nbits (MatMulNBits lvl4)": emitted(w, TensorQuant("int8"), "nbits", 4, args.threads),
        "int8 DynamicQuantizeMatMul (per tensor)": dynamic_quantize_matmul(w, args.threads),
        "int8 integer (per row, MatMulInteger)": emitted(w, TensorQuant("int8"), "integer", 4, args.threads),
    }
    exact = quantize_int8(w, group_size=k).dequantize().numpy()
    print(cpu_facts())
    print(f"W {n}x{k}, {args.threads} thread(s), median of {args.calls} calls")
    rng = np.random.default_rng(0)
    for m in map(int, args.rows.split(",")):
        x = rng.standard_normal((1, m, k)).astype(np.float32)
        x[..., 7] *= 40
        x[:, 0] *= 40
        print(f"M = {m}")
        for name, sess in systems.items():
            y = sess.run(None, {"x": x})[0]
            ref = x @ exact.T
            err = float(np.abs(y - ref).max() / np.abs(ref).max()) if name.startswith("int8") else float("nan")
            print(f"  {name:42s} {median_us(sess, x, args.calls):9.0f} us   rel. error {err:.4f}")


if __name__ == "__main__":
    main()
