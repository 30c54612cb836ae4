"""One int4 linear (M = 1) in each graph form of float zero points, timed in ONNX Runtime (issue 13).

Forms: MatMulNBits alone (no zero points; with uint8 ones), today's correction (MatMulNBits on the
symmetric codes + MatMul(MatMul(x, group-sum), offsets) + Add), the same with Gemm taking the
MatMulNBits result as C, with ReduceSum group sums, with the offsets as 32 more K columns of the
same MatMulNBits, and MatMulNBits' own float zero_points input. Random weights: timing only.
Medians of alternating rounds.

    python benchmarks/zero_point_forms.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, G = 576, 1536, 32
BLOCKS = K // G


def nbits(x: str, out: str, b: str = "B", s: str = "S", k: int = K, zp: str | None = None):
    return helper.make_node("MatMulNBits", [x, b, s] + ([zp] if zp else []), [out], domain="com.microsoft",
                            K=k, N=N, bits=4, block_size=G, accuracy_level=4)


def forms() -> dict[str, tuple[list, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    k2 = K + G
    w = {"B": rng.integers(0, 255, (N, BLOCKS, G // 2), dtype=np.uint8),
         "S": (rng.random(N * BLOCKS) * 0.01).astype(np.float32),
         "Zu8": rng.integers(0, 255, N * ((BLOCKS + 1) // 2), dtype=np.uint8),
         "Zf": (rng.random(N * BLOCKS) * 15).astype(np.float32),
         "Gsum": np.eye(BLOCKS, dtype=np.float32)[np.arange(K) // G],
         "O": (rng.random((BLOCKS, N)) * 0.01).astype(np.float32),
         "B2": rng.integers(0, 255, (N, k2 // G, G // 2), dtype=np.uint8),
         "S2": (rng.random(N * (k2 // G)) * 0.01).astype(np.float32),
         "Z2": rng.integers(0, 255, N * ((k2 // G + 1) // 2), dtype=np.uint8),
         "shape": np.array([-1, BLOCKS, G], np.int64), "axes": np.array([-1], np.int64),
         "pads": np.array([0, 0, 0, G - BLOCKS], np.int64)}
    mm = lambda a, b, out: helper.make_node("MatMul", [a, b], [out])  # noqa: E731
    add = helper.make_node("Add", ["y0", "c"], ["y"])
    return {
        "MatMulNBits, no zero points": ([nbits("x", "y")], w),
        "MatMulNBits, uint8 zero points": ([nbits("x", "y", zp="Zu8")], w),
        "correction: MatMul, MatMul, Add (today)": ([nbits("x", "y0"), mm("x", "Gsum", "s"), mm("s", "O", "c"), add], w),
        "correction: MatMul, Gemm with C": ([nbits("x", "y0"), mm("x", "Gsum", "s"),
                                             helper.make_node("Gemm", ["s", "O", "y0"], ["y"])], w),
        "correction: ReduceSum, MatMul, Add": ([nbits("x", "y0"), helper.make_node("Reshape", ["x", "shape"], ["r"]),
                                                helper.make_node("ReduceSum", ["r", "axes"], ["s"], keepdims=0),
                                                mm("s", "O", "c"), add], w),
        "correction: offsets as 32 more K columns": ([mm("x", "Gsum", "s"), helper.make_node("Pad", ["s", "pads"], ["p"]),
                                                      helper.make_node("Concat", ["x", "p"], ["xa"], axis=-1),
                                                      nbits("xa", "y", "B2", "S2", K + G, "Z2")], w),
        "MatMulNBits, float zero_points input": ([nbits("x", "y", zp="Zf")], w),
    }


def session(nodes: list, weights: dict[str, np.ndarray], threads: int) -> ort.InferenceSession:
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "form", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(a, name) for name, a in weights.items() if name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    sessions = {name: session(nodes, w, args.threads) for name, (nodes, w) in forms().items()}
    x = {"x": np.random.default_rng(1).random((1, K), dtype=np.float32)}
    for s in sessions.values():
        for _ in range(20):
            s.run(None, x)
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            calls = args.calls if "float zero_points" not in name else max(1, args.calls // 50)
            t = time.perf_counter()
            for _ in range(calls):
                s.run(None, x)
            seconds[name].append((time.perf_counter() - t) / calls)
    print(f"K={K} N={N} M=1, g{G}, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}")
    for name, v in seconds.items():
        print(f"  {name:44s} {statistics.median(v) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
