"""Serving against direct generation on one bundle: decode tok/s for one client, aggregate tok/s for
several concurrent clients, raw batched decode and prefill step costs, and time to first token on a late conversation turn
with and without the conversation cache.

    PYTHONPATH=$PWD python3 benchmarks/serve_bench.py --bundle /tmp/demo-cpu --threads 2
    PYTHONPATH=$PWD python3 benchmarks/serve_bench.py --bundle /tmp/demo-cpu --no-turns --before /tmp/old-src

Figures are medians of alternating rounds (direct, this server, the --before server in turn), with
the median of per-round ratios beside them ("paired"), so that load drifting hits every side alike.

The servers run as `mistral-edge serve` subprocesses on 127.0.0.1; every request is bounded in time.
Figures go to docs/serve.md with the machine's load (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import numpy as np

from mistral_edge.chat_format import ChatFormat
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.generate import GenerationConfig, Generator

TIMEOUT = 600
PROMPTS = ["Write a long story about a dragon who learns to cook.",
           "Explain in detail how a steam engine works.",
           "Describe a walk through a busy city market, with many details.",
           "Write a letter to a friend about your summer holidays."]


def _median(runs: list[float]) -> float:
    return float(np.median(runs))


def direct_decode(bundle: Bundle, threads: int, tokens: int, repeats: int) -> float:
    """Decode tok/s of Generator.stream, text included as `generate` prints it (first token to last),
    median of `repeats`."""
    tok = bundle.tokenizer()
    ids = ChatFormat.from_manifest(bundle.manifest).encode([{"role": "user", "content": PROMPTS[0]}], tok)
    gen = Generator(bundle.session(threads=threads), tok)
    rates = []
    for _ in range(repeats):
        gen.session.reset()
        stamps: list[float] = []
        cfg = GenerationConfig(max_new_tokens=tokens)
        for _ in gen.stream(ids, cfg, on_token=lambda _: stamps.append(time.perf_counter())):
            pass
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return _median(rates)


def batched_steps(bundle: Bundle, threads: int, batch: int, steps: int = 32, repeats: int = 3) -> dict:
    """Wall and process CPU seconds per decode step at batch 1 and at `batch` (rows at position 256),
    best of `repeats` interleaved; CPU time is less disturbed by other processes on a shared machine."""
    sessions = {b: bundle.session(threads=threads, batch=b) for b in (1, batch)}
    best: dict = {}
    for _ in range(repeats):
        for b, s in sessions.items():
            s.reset()
            s.step(np.ones((b, 128), np.int64))
            s.step(np.ones((b, 128), np.int64))
            one = np.ones((b, 1), np.int64)
            s.step(one)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                s.step(one)
            wall, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
            old = best.get(b, (wall, cpu))
            best[b] = (min(old[0], wall), min(old[1], cpu))
    return best


def prefill_steps(bundle: Bundle, threads: int, batch: int, lengths=(40, 128), repeats: int = 3) -> dict:
    """Wall seconds of one prefill step of P tokens from position 0, best of `repeats` interleaved: one
    prompt in a batch-1 session ("1xP"), `batch` prompts in one batch step ("BxP"), and one prompt beside
    batch - 1 rows that feed one token each ("BxP mixed": what a decoding row costs in a prefill step)."""
    sessions = {b: bundle.session(threads=threads, batch=b) for b in (1, batch)}
    shapes = [(f"{b}x{p}{' mixed' if mixed else ''}", b, p, [p] + [1 if mixed else p] * (b - 1))
              for p in lengths for b, mixed in ((1, False), (batch, False), (batch, True))]
    best: dict = {}
    for _ in range(repeats):
        for name, b, p, valid in shapes:
            s = sessions[b]
            s.reset()
            t0 = time.perf_counter()
            s.step(np.ones((b, p), np.int64), np.asarray(valid))
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


@contextmanager
def server(bundle: str, threads: int, *extra: str, source: str | None = None):
    """`mistral-edge serve` from this checkout, or from the source tree `source` (--before)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ if source is None else {**os.environ, "PYTHONPATH": source}
    proc = subprocess.Popen([sys.executable, "-c", "from mistral_edge.cli.main import main; main()", "serve",
                             "--bundle", bundle, "--port", str(port), "--threads", str(threads), *extra],
                            env=env, cwd=source, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def stream(url: str, path: str, body: dict) -> dict:
    """One streamed request: its text, token count, first-content and end times."""
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            piece = choice.get("text") or choice.get("delta", {}).get("content")
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    first = first or end  # a reply that was empty
    return {"text": "".join(text), "tokens": usage["completion_tokens"], "ttft": first - t0,
            "decode": (usage["completion_tokens"] - 1) / max(end - first, 1e-9), "wall": end - t0,
            "prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def served_decode(url: str, tokens: int) -> float:
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": tokens}
    return stream(url, "/v1/chat/completions", body)["decode"]


def concurrent(url: str, clients: int, tokens: int, run: int) -> float:
    """Aggregate tok/s of `clients` chats at once (all tokens over the wall time)."""
    bodies = [{"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (take {run}.{i})"}],
               "max_tokens": tokens} for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: stream(url, "/v1/chat/completions", b), bodies, timeout=TIMEOUT))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - t0)


def conversation(url: str, opening: str, turns: int, reply_tokens: int) -> list[dict]:
    """Messages for turn `turns` (the last user message unanswered), built with the server's replies."""
    messages = [{"role": "user", "content": opening}]
    for t in range(turns - 1):
        r = stream(url, "/v1/chat/completions", {"messages": messages, "max_tokens": reply_tokens})
        messages += [{"role": "assistant", "content": r["text"]},
                     {"role": "user", "content": f"Tell me more, part {t + 2}."}]
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--steps-only", action="store_true", help="measure only the raw batched step")
    ap.add_argument("--no-turns", action="store_true", help="skip the time-to-first-token conversations")
    ap.add_argument("--before", metavar="SRC", help="also serve from this source tree (e.g. a `git archive` of "
                    "an older revision), alternately with this one, for before/after figures")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    report = {"uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}

    steps = batched_steps(bundle, args.threads, args.clients)
    report["step_wall_cpu_s"] = {str(b): [round(t, 5) for t in s] for b, s in steps.items()}
    report["batch_step_speedup_wall"] = round(args.clients * steps[1][0] / steps[args.clients][0], 2)
    report["batch_step_speedup_cpu"] = round(args.clients * steps[1][1] / steps[args.clients][1], 2)
    prefill = prefill_steps(bundle, args.threads, args.clients)
    report["prefill_step_s"] = {k: round(t, 4) for k, t in prefill.items()}
    report["batched_prefill_speedup"] = {p: round(args.clients * prefill[f"1x{p}"] / prefill[f"{args.clients}x{p}"], 2)
                                         for p in (40, 128)}
    if args.steps_only:
        return print(json.dumps(report, indent=1))

    with ExitStack() as stack:
        urls = {"served": stack.enter_context(server(args.bundle, args.threads, "--batch", str(args.clients)))}
        if args.before:
            urls["before"] = stack.enter_context(server(args.bundle, args.threads, "--batch", str(args.clients),
                                                        source=args.before))
        runs: dict[str, list[float]] = {}
        loads = []
        for r in range(args.repeats):  # alternating rounds, so load changes hit every side alike
            loads.append(round(os.getloadavg()[0], 2))
            runs.setdefault("direct", []).append(direct_decode(bundle, args.threads, args.tokens, 1))
            for name, url in urls.items():
                runs.setdefault(name, []).append(served_decode(url, args.tokens))
                runs.setdefault(f"{name}_1_client", []).append(concurrent(url, 1, args.tokens, r))
                runs.setdefault(f"{name}_{args.clients}_clients", []).append(concurrent(url, args.clients, args.tokens, r))
        report["rounds"] = {k: [round(x, 2) for x in v] for k, v in runs.items()}
        report["load_1min_at_each_round"] = loads
        direct = _median(runs["direct"])
        report["direct_decode_tok_s"] = round(direct, 2)
        for name in urls:
            report[f"{name}_decode_tok_s"] = round(_median(runs[name]), 2)
            report[f"{name}_cost_pct"] = round(100 * (1 - _median(runs[name]) / direct), 1)
            # per round, against that round's direct run: less sensitive to load drifting between rounds
            report[f"{name}_cost_pct_paired"] = round(100 * (1 - _median(
                [s / d for s, d in zip(runs[name], runs["direct"])])), 1)
            one, many = _median(runs[f"{name}_1_client"]), _median(runs[f"{name}_{args.clients}_clients"])
            report[f"{name}_concurrency_speedup"] = round(many / one, 2)
            report[f"{name}_concurrency_speedup_paired"] = round(_median(
                [m / o for m, o in zip(runs[f"{name}_{args.clients}_clients"], runs[f"{name}_1_client"])]), 2)
            health = httpx.get(urls[name] + "/health", timeout=30).json()  # how the engine served them
            report[f"{name}_engine"] = {k: health.get(k) for k in ("batched_steps", "batched_prefills")}
        if args.no_turns:
            report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            return print(json.dumps(report, indent=1))
        url = urls["served"]
        late = [conversation(url, f"{p} Keep it short.", args.turns, 48) for p in PROMPTS[:2]]
        reuse = [stream(url, "/v1/chat/completions", {"messages": m, "max_tokens": 8}) for m in late]
    with server(args.bundle, args.threads, "--cache-mib", "0") as url:
        fresh = [stream(url, "/v1/chat/completions", {"messages": m, "max_tokens": 8}) for m in late]
    report["turn"] = args.turns
    report["prompt_tokens_at_turn"] = [r["prompt"] for r in reuse]
    report["cached_tokens_at_turn"] = [r["cached"] for r in reuse]
    report["ttft_reuse_s"] = [round(r["ttft"], 3) for r in reuse]
    report["ttft_no_reuse_s"] = [round(r["ttft"], 3) for r in fresh]
    median = lambda runs: float(np.median([r["ttft"] for r in runs]))  # noqa: E731
    report["ttft_ratio"] = round(median(reuse) / median(fresh), 3)
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
