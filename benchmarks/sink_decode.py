"""Decode speed with attention sinks, and with a pool, against the plain ring (issue 14), paired in one process.

Cpu bundles of the demo model, identical but for `--sinks` (0 and S) and, with `--pool P`, one with S
sinks and a P-slot pool; each runs in its own DecoderSession with the same threads. A pooled graph
runs the function body (the native kernel keeps no pool), so with `--pool` the S-sink bundle also
runs under the function body (`--kernel off`), to tell the pool's cost from the kernel's. All are
fed the same context untimed, past W so that the ring has wrapped and sinks and pool are read every
step; then rounds alternate the sessions (the order reversed every other round), each timing
`--steps` decode steps continuing from where it stopped. Figures are medians of the rounds and the
median of per-round ratios, so load drifting hits every side alike.

    PYTHONPATH=$PWD python3 benchmarks/sink_decode.py --quant int4 --context 1100 --rounds 9   # the default S (64)
    PYTHONPATH=$PWD python3 benchmarks/sink_decode.py --quant int4 --context 1100 --rounds 9 --pool 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mistral_edge.compare.variants import prepare_bundle
from mistral_edge.export.pipeline import resolve_sinks, resolve_window
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from mistral_edge.targets.bundle import source_hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--sinks", type=int, help="S (default: the export's for the demo model at its W)")
    ap.add_argument("--pool", type=int, default=0, help="P: also time S sinks + a pool of P (default: none)")
    ap.add_argument("--context", type=int, default=1100, help="tokens fed before timing (past W: the ring has wrapped)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / ".work")
    args = ap.parse_args()

    ck = load_checkpoint(None)
    window, _ = resolve_window(ck, None, None)
    s = resolve_sinks(ck, args.sinks, window)
    variants = {"plain ring": (0, 0, None), f"{s} sinks": (s, 0, None)}  # (sinks, pool, kernel)
    if args.pool:
        variants[f"{s} sinks, function body"] = (s, 0, "off")
        variants[f"{s} sinks + pool {args.pool}"] = (s, args.pool, None)
    ids = np.random.default_rng(0).integers(100, 10000, args.context)
    sessions = {}
    for label, (sinks, pool, kernel) in variants.items():
        chunk = resolve_window(ck, window, None, sinks, pool)[1]
        out = args.work / (f"sinks-{args.quant}-s{sinks}" + (f"-p{pool}" if pool else ""))
        built = prepare_bundle(ck, parse_quant(args.quant), window, chunk, out, source_hash(ck.source),
                               log=lambda line: None, sinks=sinks, pool=pool)
        session = DecoderSession(built.model_path, 1, SessionConfig(threads=args.threads, kernel=kernel))
        for start in range(0, args.context, session.chunk):
            session.step(ids[None, start:min(start + session.chunk, args.context)])
        sessions[label] = session
        print(f"{label}: {built.model_path} ({session.attention_path}), {args.context} tokens fed", file=sys.stderr)

    token = np.asarray([[200]], np.int64)
    seconds: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(args.rounds):
        for label in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            session = sessions[label]
            t = time.perf_counter()
            for _ in range(args.steps):
                session.step(token)
            seconds[label].append(time.perf_counter() - t)
    print(f"load {os.getloadavg()[0]:.2f}; {args.quant}, W={window}, threads {args.threads}, "
          f"decode after {args.context}+ tokens, {args.rounds} rounds of {args.steps} steps")
    plain = seconds["plain ring"]
    for label, times in seconds.items():
        ratio = statistics.median(p / t for p, t in zip(plain, times))
        print(f"{label:32s} {args.steps / statistics.median(times):7.1f} tok/s   paired ratio to the plain ring {ratio:.3f}")


if __name__ == "__main__":
    main()
