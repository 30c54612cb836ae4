"""What ONNX Runtime's CPU provider holds for one MatMulNBits weight, against what the file stores.

For each (bits, block size, accuracy level) a one-node graph of a Mistral-7B-sized w2 (N 4096, K 14336,
random codes, float32 scales, external data) is loaded in a fresh process; the process's anonymous
resident memory (RssAnon) before and after the session is created, per weight, is what the packed
weight costs (the external data file is mapped, so its pages are not anonymous). Also the time of
one decode-shaped call (one row, 2 threads, median of 30). targets/budget.py::PACKED_BLOCK_BYTES and
export/linear.py::int8_block come from this (docs/export-scale.md):

    python benchmarks/nbits_resident.py                          # the table
    python benchmarks/nbits_resident.py --configs 8:16:4,8:64:4  # bits:block:accuracy_level, ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N, K = 4096, 14336
CONFIGS = "8:16:4,8:32:4,8:64:4,8:128:4,4:16:4,4:32:4,4:64:4,4:32:0"


def write(path: Path, bits: int, block: int, level: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    blocks = K // block
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    s = rng.random(N * blocks, dtype=np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(q, "B"), numpy_helper.from_array(s, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure(path: Path) -> dict:
    """Runs in a fresh process: resident bytes the session adds, and the call time."""
    import onnxruntime as ort

    before = anon()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    held = anon() - before
    x = np.random.default_rng(1).random((1, K), dtype=np.float32)
    session.run(None, {"A": x})
    times = []
    for _ in range(30):
        start = time.perf_counter()
        session.run(None, {"A": x})
        times.append(time.perf_counter() - start)
    return {"held": held, "ms": 1e3 * statistics.median(times), "ort": ort.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=CONFIGS, help="bits:block:accuracy_level, comma-separated")
    args = ap.parse_args()
    print("| bits | block | accuracy level | stored bits/w | resident bits/w | resident bytes per block besides the codes "
          "| ms per call (1 row) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            bits, block, level = map(int, config.split(":"))
            path = Path(tmp) / f"m-{bits}-{block}-{level}.onnx"
            write(path, bits, block, level)
            stored = os.path.getsize(str(path) + ".data")
            r = subprocess.run([sys.executable, __file__, "_measure", str(path)], capture_output=True, text=True,
                               check=True)
            got = json.loads(r.stdout.strip().splitlines()[-1])
            per_block = (got["held"] - N * K * bits / 8) / (N * K / block)
            print(f"| {bits} | {block} | {level} | {stored * 8 / (N * K):.2f} | {got['held'] * 8 / (N * K):.2f} "
                  f"| {per_block:.1f} | {got['ms']:.2f} |", flush=True)
            os.remove(path)
            os.remove(str(path) + ".data")
    print(f"onnxruntime {got['ort']}, N {N}, K {K}, 2 threads")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
    else:
        main()
