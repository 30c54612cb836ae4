"""End-to-end decode tokens/s of a bundle with the native attention kernel and with the function
body (docs/kernel.md): both sessions live in one process, rounds alternate them, figures are
medians over rounds. Decode runs after a short prompt and after a long one (past W, so attention
reads every slot).

    PYTHONPATH=$PWD python benchmarks/kernel_decode.py /tmp/k-demo --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mistral_edge.runtime.bundle import Bundle


def decode_rate(session, prompt: np.ndarray, steps: np.ndarray) -> float:
    session.reset()
    for s in range(0, prompt.size, session.chunk):
        session.step(prompt[None, s:s + session.chunk])
    t = time.perf_counter()
    for tok in steps:
        session.step(np.array([[tok]]))
    return steps.size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1100])
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    b = Bundle.open(a.bundle)
    sessions = {}
    for mode in ("on", "off"):
        os.environ["MISTRAL_EDGE_KERNEL"] = mode
        sessions[mode] = b.session(threads=a.threads)
    rng = np.random.default_rng(0)
    vocab = sessions["on"].vocab_size
    for ctx in a.contexts:
        prompt, steps = rng.integers(0, vocab, ctx), rng.integers(0, vocab, a.tokens)
        rates = {mode: [] for mode in sessions}
        for _ in range(a.rounds):
            for mode, s in sessions.items():
                rates[mode].append(decode_rate(s, prompt, steps))
        on, off = (float(np.median(rates[m])) for m in ("on", "off"))
        print(f"context={ctx} threads={a.threads}: {sessions['on'].attention_path} {on:.1f} tok/s, "
              f"{sessions['off'].attention_path} {off:.1f} tok/s, ratio {on / off:.2f}x")


if __name__ == "__main__":
    main()
