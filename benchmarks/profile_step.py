"""Per-op time of decode steps (ONNX Runtime's profiler): our bundle, or ORT GenAI's model for comparison.

Decode steps after a prompt, the prompt's own run left out of the figures; prints, per step, the
whole run, each op type's kernel time and calls, and what lies outside the kernels. `--tokens N`
profiles steps of N tokens instead, each one run (prefill chunks; ours takes at most W - sinks).

    PYTHONPATH=$PWD python3 benchmarks/profile_step.py BUNDLE_DIR --threads 1
    PYTHONPATH=$PWD python3 benchmarks/profile_step.py GENAI_MODEL_DIR --genai --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.session import DecoderSession, SessionConfig


SessionOptions = ort.SessionOptions


def options(threads: int) -> ort.SessionOptions:
    so = SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling, so.profile_file_prefix = True, os.path.join(tempfile.mkdtemp(), "step")
    return so


def ours(path: Path, threads: int, prompt: int, steps: int, tokens: int) -> str:
    ort.SessionOptions = lambda: options(threads)  # DecoderSession builds its own options
    try:
        s = DecoderSession(Bundle.open(path).model_path, 1, SessionConfig(threads=threads))
    finally:
        ort.SessionOptions = SessionOptions
    print(f"attention: {s.attention_path}")
    s.step(np.arange(prompt, dtype=np.int64)[None] + 100)
    for _ in range(steps):
        s.step(np.full((1, tokens), 200, np.int64))
    return s.session.end_profiling()


def genai(path: Path, threads: int, prompt: int, steps: int, tokens: int) -> str:
    """ORT GenAI's model.onnx run directly, `tokens` tokens after a `prompt`-slot past (zeros: timing only)."""
    s = ort.InferenceSession(str(path / "model.onnx"), options(threads), providers=["CPUExecutionProvider"])
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {"input_ids": np.full((1, tokens), 200, np.int64),
             "attention_mask": np.ones((1, prompt + tokens), np.int64)}
    for i in s.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, decoder["num_key_value_heads"], prompt, decoder["head_size"]), np.float32)
    for _ in range(steps + 1):
        s.run(["logits"], feeds)
    return s.end_profiling()


def report(trace: str) -> None:
    events = json.load(open(trace))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    first_end = runs[0]["ts"] + runs[0]["dur"]
    steps, total = len(runs) - 1, sum(e["dur"] for e in runs[1:])
    time, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e["ts"] > first_end and e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    kernels = sum(time.values())
    print(f"{steps} steps: {total / steps:.0f} us a run, {kernels / steps:.0f} us in {sum(calls.values()) / steps:.0f} "
          f"kernel calls, {(total - kernels) / steps:.0f} us outside them")
    for op, t in time.most_common(15):
        print(f"  {op:36s} {t / steps:8.0f} us {calls[op] / steps:6.0f} calls {100 * t / kernels:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="our bundle directory, or with --genai an ORT GenAI model directory")
    ap.add_argument("--genai", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1, help="tokens a profiled step (1: decode)")
    args = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}, {args.threads} thread(s), {args.tokens} token(s) a step")
    report((genai if args.genai else ours)(args.model, args.threads, args.prompt, args.steps, args.tokens))


if __name__ == "__main__":
    main()
