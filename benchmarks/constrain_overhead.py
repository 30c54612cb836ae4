"""What constrained decoding costs per token on a bundle: the grammar's share of decode time.

    PYTHONPATH=$PWD python3 benchmarks/constrain_overhead.py --bundle DIR [--tokens 128] [--runs 3]

The processor (mask, apply to the numpy logits, consume the token) is timed inside a real
constrained generation and set against that generation's time per token; the unconstrained
decode time per token is printed alongside. Target: the grammar costs at most 10% of a token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mistral_edge.cli.generate import RunOptions, open_run
from mistral_edge.runtime.constrain import Constraint
from mistral_edge.runtime.generate import GenerationConfig

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "year", "tags", "summary"],
          "properties": {"name": {"type": "string"}, "year": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}, "summary": {"type": "string"}}}
PROMPT = "Describe the novel Moby-Dick as JSON with its name, year, some tags and a long summary."


class Timed:
    """A processor whose calls are timed."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, logits):
        start = time.perf_counter()
        try:
            return self.inner(logits)
        finally:
            self.seconds += time.perf_counter() - start

    def accept(self, token):
        start = time.perf_counter()
        try:
            return self.inner.accept(token)
        finally:
            self.seconds += time.perf_counter() - start


def timed_run(gen, ids, cfg, processor=None) -> tuple[int, float]:
    gen.session.reset()
    start = time.perf_counter()
    n = sum(1 for _ in gen.stream_ids(ids, cfg, processor=processor))
    return n, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    gen, fmt, _ = open_run(RunOptions(bundle=args.bundle, threads=args.threads))
    ids = fmt.encode([{"role": "user", "content": PROMPT}], gen.tokenizer)
    cfg = GenerationConfig(max_new_tokens=args.tokens)
    constraint = Constraint.json_schema(SCHEMA)
    start = time.perf_counter()
    constraint.processor(gen.tokenizer, gen.session.vocab_size)
    print(f"llguidance tokenizer and matcher setup: {time.perf_counter() - start:.2f} s (once per tokenizer)")
    prefill = timed_run(gen, ids, GenerationConfig(max_new_tokens=0))[1]
    for run in range(args.runs):
        n_free, free = timed_run(gen, ids, cfg)
        timed = Timed(constraint.processor(gen.tokenizer, gen.session.vocab_size))
        n, total = timed_run(gen, ids, cfg, timed)
        per_token = (total - prefill) / n
        print(f"run {run + 1}: unconstrained {(free - prefill) / n_free * 1e3:.2f} ms/token ({n_free} tokens); "
              f"constrained {per_token * 1e3:.2f} ms/token ({n} tokens), of which the grammar "
              f"{timed.seconds / n * 1e3:.3f} ms = {timed.seconds / n / per_token:.1%}")


if __name__ == "__main__":
    main()
