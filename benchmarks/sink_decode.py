"""Decode speed with attention sinks against the plain ring (issue 14: within 3%), paired in one process.

Two cpu bundles of the demo model, identical but for `--sinks` (0 and S), each in its own
DecoderSession with the same threads. Both are fed the same context untimed, past W so that the
ring has wrapped and the sink slots are read every step; then rounds alternate the two sessions,
each timing `--steps` decode steps continuing from where it stopped. Figures are medians of the
rounds and the median of per-round ratios, so load drifting hits both sides alike.

    PYTHONPATH=$PWD python3 benchmarks/sink_decode.py --quant int4 --context 1100 --rounds 9   # the default S (64)
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
    ap.add_argument("--context", type=int, default=1100, help="tokens fed before timing (past W: the ring has wrapped)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / ".work")
    args = ap.parse_args()

    ck = load_checkpoint(None)
    window, chunk = resolve_window(ck, None, None)
    args.sinks = resolve_sinks(ck, args.sinks, window)
    sessions = {}
    for sinks in (0, args.sinks):
        out = args.work / f"sinks-{args.quant}-s{sinks}"
        built = prepare_bundle(ck, parse_quant(args.quant), window, chunk, out, source_hash(ck.source),
                               log=lambda line: None, sinks=sinks)
        s = DecoderSession(built.model_path, 1, SessionConfig(threads=args.threads))
        ids = np.random.default_rng(0).integers(100, 10000, args.context + args.rounds * args.steps + 8)
        for start in range(0, args.context, s.chunk):
            s.step(ids[None, start:min(start + s.chunk, args.context)])
        sessions[sinks] = s
        print(f"sinks={sinks}: {built.model_path} ({s.attention_path}), {args.context} tokens fed", file=sys.stderr)

    token = np.asarray([[200]], np.int64)
    seconds: dict[int, list[float]] = {k: [] for k in sessions}
    for r in range(args.rounds):
        for sinks in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            s = sessions[sinks]
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step(token)
            seconds[sinks].append(time.perf_counter() - t)
    plain, sink = seconds[0], seconds[args.sinks]
    tps = {k: args.steps / statistics.median(v) for k, v in seconds.items()}
    ratio = statistics.median(p / s for p, s in zip(plain, sink))
    print(f"load {os.getloadavg()[0]:.2f}; {args.quant}, W={window}, threads {args.threads}, "
          f"decode after {args.context}+ tokens, {args.rounds} rounds of {args.steps} steps")
    print(f"plain ring {tps[0]:.1f} tok/s, {args.sinks} sinks {tps[args.sinks]:.1f} tok/s, "
          f"paired ratio sinks/plain {ratio:.3f}")


if __name__ == "__main__":
    main()
