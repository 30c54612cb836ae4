"""Decode with the native attention kernel and with the function body, per cache type (docs/kernel.md).

Two measurements, each with every session in one process and rounds alternating them (figures are
medians over rounds, so a loaded machine slows all sessions alike):
- `--layer`: per-layer decode attention, one graph of N attention nodes with their own caches
  bound in place (kernels/layer_graph.py), plan tensors precomputed as the decoder shares them,
  demo shapes, for each `--kv-cache` type and `--slots` count (`--filled N`: N tokens of context
  in them, the rest empty, as in a ring not yet full); µs per node.
- bundles: decode tokens/s of whole bundles (e.g. the same export with `--kv-cache fp32` and with
  `--kv-cache int8`) after a short prompt and after a long one (past W, so attention reads every
  slot), with the kernel and, with `--body`, with the function body too.

    PYTHONPATH=$PWD python benchmarks/kernel_decode.py --layer --kv-cache fp32 fp16 int8 --threads 1
    PYTHONPATH=$PWD python benchmarks/kernel_decode.py /tmp/k-demo /tmp/k-demo-int8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort

from mistral_edge.contract import is_scale
from mistral_edge.kernels.layer_graph import Layer, bind
from mistral_edge.model.config import ModelConfig
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.session import _register_kernel

DEMO = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152)


def filled_caches(layer: Layer, slots: int, nodes: int, rng) -> dict[str, np.ndarray]:
    caches = {}
    for i in range(nodes):
        for name, a in layer.new_cache(1, slots, f".{i}").items():
            if a.dtype == np.int8:
                a[...] = rng.integers(-127, 128, a.shape)
            elif is_scale(name):
                a[...] = rng.uniform(0.01, 0.03, a.shape)
            else:
                a[...] = rng.standard_normal(a.shape)
            caches[name] = a
    return caches


def layer_runs(layer: Layer, slots: int, threads: int, nodes: int, rng, filled: int | None = None,
               against: str | None = None) -> dict:
    """Bound sessions of `nodes` nodes, by attention path ("native kernel (isa)" or "function body (...)",
    and "library PATH" for another build of the kernel, `against`). The decode token sits at position
    `filled` (the slots before it hold the context, those after it are empty and masked); by default
    the cache is full, or past the wrap for S = W."""
    if filled is not None:
        position = filled
    else:
        position = slots - 1 if slots < layer.window else 4 * layer.window + 7
    plan = layer.plan(np.array([position]), np.array([1]), 1, slots)
    width = (layer.cfg.n_heads + 2 * layer.cfg.n_kv_heads) * layer.cfg.head_dim
    qkv = rng.standard_normal((1, 1, width)).astype(np.float16 if layer.act == "fp16" else np.float32)
    runs = {}
    for kernel in ("on", "off") + ((against,) if against else ()):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        if kernel == against:
            so.register_custom_ops_library(against)
            label = f"library {against}"
        else:
            label = _register_kernel(so, kernel)
        sess = ort.InferenceSession(layer.attention_model(nodes), so, providers=["CPUExecutionProvider"])
        caches = filled_caches(layer, slots, nodes, rng)
        runs[label] = (sess, bind(sess, qkv, plan, caches, nodes), caches)
    return runs


def per_node_us(runs: dict, nodes: int, rounds: int, iters: int, clock) -> dict[str, float]:
    """Median µs per node of each run, the runs alternating every round."""
    per_node = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (sess, io, _) in runs.items():
            sess.run_with_iobinding(io)
            t = clock()
            for _ in range(iters):
                sess.run_with_iobinding(io)
            per_node[name].append((clock() - t) / iters / nodes * 1e6)
    return {name: float(np.median(v)) for name, v in per_node.items()}


def decode_rate(session, prompt: np.ndarray, steps: np.ndarray) -> float:
    session.reset()
    for s in range(0, prompt.size, session.chunk):
        session.step(prompt[None, s:s + session.chunk])
    t = time.perf_counter()
    for tok in steps:
        session.step(np.array([[tok]]))
    return steps.size / (time.perf_counter() - t)


def bundles(a: argparse.Namespace) -> None:
    sessions = {}
    for path in a.bundles:
        b = Bundle.open(path)
        for mode in ("on", "off") if a.body else ("on",):
            os.environ["MISTRAL_EDGE_KERNEL"] = mode
            s = b.session(threads=a.threads)
            sessions[f"{path} [{s.info.kv_cache} cache, {s.attention_path}]"] = s
    rng = np.random.default_rng(0)
    vocab = next(iter(sessions.values())).vocab_size
    for ctx in a.contexts:
        prompt, steps = rng.integers(0, vocab, ctx), rng.integers(0, vocab, a.tokens)
        rates = {name: [] for name in sessions}
        for _ in range(a.rounds):
            for name, s in sessions.items():
                rates[name].append(decode_rate(s, prompt, steps))
        base = float(np.median(next(iter(rates.values()))))
        for name, r in rates.items():
            m = float(np.median(r))
            print(f"context={ctx} threads={a.threads}: {name} {m:.1f} tok/s (range {min(r):.1f}-{max(r):.1f}), "
                  f"{m / base:.2f}x the first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1100], help="bundles: prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="bundles: decode steps timed per round")
    ap.add_argument("--body", action="store_true", help="bundles: the function-body path as well")
    ap.add_argument("--layer", action="store_true", help="per-layer attention instead of bundles")
    ap.add_argument("--kv-cache", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"])
    ap.add_argument("--activations", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--slots", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--filled", type=int, help="layer: tokens of context in the slots (default: all of them)")
    ap.add_argument("--against", metavar="LIB", help="layer: another build of the kernel library as well")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                    help="layer: cpu = the process's CPU time, robust on a loaded machine (meaningful with 1 thread)")
    a = ap.parse_args()
    if not a.layer:
        if not a.bundles:
            ap.error("name one or more bundles, or --layer")
        return bundles(a)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    kinds = [kv for kv in a.kv_cache if not (kv == "fp32" and a.activations == "fp16")]  # refused at export
    for slots in a.slots:
        runs = {(kv, label): run for kv in kinds
                for label, run in layer_runs(Layer(DEMO, a.window, a.activations, kv), slots, a.threads, a.nodes,
                                             rng, a.filled, a.against).items()}
        for (kv, label), us in per_node_us(runs, a.nodes, a.rounds, a.iters, clock).items():
            print(f"{a.activations} activations, slots={slots}, filled={a.filled or slots}, threads={a.threads}, "
                  f"{a.clock} clock: "
                  f"{kv} cache, {label}: {us:.1f} us")


if __name__ == "__main__":
    main()
