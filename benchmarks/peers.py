"""The systems vs_peers.py measures, each behind the same three calls, and the worker that runs one.

Every system runs in its own worker process (`python peers.py SYSTEM MODEL ...`), so thread
pools never share a process and the Optimum peer can run from its own virtual environment.
A worker reads JSON commands on stdin and answers one JSON line each; with --memory it
instead generates once and reports its peak resident memory. This module imports only numpy
at the top: everything a system needs is imported inside its own function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Runner:
    """A loaded model. Greedy decoding: prefill and step return the argmax next token."""

    reset: Callable[[int], None]  # fresh state for a sequence of up to n tokens (not timed)
    prefill: Callable[[list[int]], int]  # feed the whole prompt
    step: Callable[[int], int]  # feed one token


def ours(model: str, threads: int, chunk: int | None, n_ctx: int) -> Runner:
    """mistral-edge: a cpu bundle run by DecoderSession (rolling cache of W slots, IO-bound)."""
    from mistral_edge.runtime.bundle import Bundle
    from mistral_edge.runtime.generate import Generator
    from mistral_edge.runtime.session import DecoderSession, SessionConfig

    bundle = Bundle.open(model, check=False)  # verification loads the graph with onnx: not part of serving
    session = DecoderSession(bundle.model_path, batch=1, config=SessionConfig(threads=threads, chunk=chunk))
    gen = Generator(session, tokenizer=None)
    one = np.zeros((1, 1), np.int64)

    def step(tok: int) -> int:
        one[0, 0] = tok
        return int(session.step(one)[0, -1].argmax())

    return Runner(lambda n: session.reset(), lambda ids: int(gen.prefill(ids).argmax()), step)


def llama_cpp(model: str, threads: int, chunk: int | None, n_ctx: int, repack: bool = True) -> Runner:
    """llama.cpp through llama-cpp-python, the GGUF as shipped; its KV cache holds n_ctx tokens.
    `repack` False sets llama_model_params.use_extra_bufts = False (no weight repacking, no extra
    CPU buffer types), which the Llama class does not expose: its default params are wrapped."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    defaults = lib.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = repack
        return params

    lib.llama_model_default_params = model_params
    llm = Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=chunk or 512, verbose=False)

    n_vocab = llm.n_vocab()

    def run(ids: list[int]) -> int:
        llm.eval(ids)  # keeps no logits unless logits_all: read the last row from the context
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    return Runner(lambda n: llm.reset(), run, lambda tok: run([tok]))


GENAI_APPEND = 1024
"""ORT GenAI takes a long prompt in appends of at most this many tokens (its attention over one
8192-token append would need [heads, 8192, 8192] scores); prompts up to 1024 go in one append."""


def ort_genai(model: str, threads: int, chunk: int | None, n_ctx: int) -> Runner:
    """ONNX Runtime GenAI with its model builder's int4 CPU model; greedy search runs in C++."""
    import onnxruntime_genai as og

    config = og.Config(model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    og_model = og.Model(config)
    state: dict = {}

    def reset(n: int) -> None:
        params = og.GeneratorParams(og_model)
        # min_length keeps EOS from ending the run early: every system generates the same count
        params.set_search_options(do_sample=False, max_length=n, min_length=n)
        state["gen"] = og.Generator(og_model, params)

    def prefill(ids: list[int]) -> int:
        for s in range(0, len(ids), GENAI_APPEND):
            state["gen"].append_tokens(ids[s:s + GENAI_APPEND])
        return step(-1)

    def step(tok: int) -> int:  # the generator already holds the token it picked last
        gen = state["gen"]
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    return Runner(reset, prefill, step)


def optimum(model: str, threads: int, chunk: int | None, n_ctx: int) -> Runner:
    """The standard Hugging Face ONNX export (Optimum's ORTModelForCausalLM): its cache grows."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    lm = ORTModelForCausalLM.from_pretrained(model, session_options=so, use_cache=True, use_io_binding=False)
    state: dict = {}

    def run(ids: list[int]) -> int:
        past, n = state.get("past"), state.get("n", 0)
        out = lm(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, n + len(ids), dtype=torch.int64),
                 past_key_values=past, use_cache=True)
        state["past"], state["n"] = out.past_key_values, n + len(ids)
        return int(out.logits[0, -1].argmax())

    return Runner(lambda n: state.clear(), run, lambda tok: run([tok]))


SYSTEMS = {"ours": ours, "llama.cpp": llama_cpp, "ort-genai": ort_genai, "optimum": optimum}


def decode(runner: Runner, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds for n greedy steps after the prompt (the prefill is not timed)."""
    runner.reset(len(prompt) + n + 1)
    tok = runner.prefill(prompt)
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n):
        tok = runner.step(tok)
        out.append(tok)
    return time.perf_counter() - t0, out


def prefill(runner: Runner, prompt: list[int]) -> float:
    """Seconds from a fresh state to the first generated token."""
    runner.reset(len(prompt) + 1)
    t0 = time.perf_counter()
    runner.prefill(prompt)
    return time.perf_counter() - t0


def rss(field: str = "VmHWM") -> int:
    """Bytes of this process's peak (VmHWM) or current (VmRSS) resident set. Not getrusage: its
    ru_maxrss survives exec, so a worker would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def serve(runner: Runner) -> None:
    """Answer commands until stdin closes: {"prefill": ids}, {"decode": ids, "n": N}, or for decode
    at long context {"context": ids, "reserve": R} (a fresh state fed `ids`, room for R more tokens;
    the seconds are the whole prefill's) then any number of {"steps": N} (N timed greedy steps from
    where the previous command left the state)."""
    print(json.dumps({"ready": True}), flush=True)
    last = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if "prefill" in cmd:
            reply = {"seconds": prefill(runner, cmd["prefill"])}
        elif "context" in cmd:
            runner.reset(len(cmd["context"]) + cmd["reserve"])
            t0 = time.perf_counter()
            last = runner.prefill(cmd["context"])
            reply = {"seconds": time.perf_counter() - t0}
        elif "steps" in cmd:
            t0 = time.perf_counter()
            for _ in range(cmd["steps"]):
                last = runner.step(last)
            reply = {"seconds": time.perf_counter() - t0}
        else:
            seconds, tokens = decode(runner, cmd["decode"], cmd["n"])
            reply = {"seconds": seconds, "tokens": tokens}
        print(json.dumps(reply), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("system", choices=SYSTEMS)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (ours) or batch (llama.cpp)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context the peer allocates for")
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp: no weight repacking (use_extra_bufts = False)")
    ap.add_argument("--omp-wait", choices=("active", "passive"), default=None,
                    help="OMP_WAIT_POLICY for an OpenMP build (llama.cpp's): passive threads sleep "
                         "instead of spinning between ops, which wins on a busy machine")
    ap.add_argument("--memory", type=int, default=0, metavar="N",
                    help="generate N tokens after the prompt read from stdin, report peak RSS, exit")
    args = ap.parse_args()
    if args.omp_wait:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait.upper()  # read when the system's libraries load, below
    extra = {"repack": not args.no_repack} if args.system == "llama.cpp" else {}
    runner = SYSTEMS[args.system](args.model, args.threads, args.chunk, args.n_ctx, **extra)
    if not args.memory:
        return serve(runner)
    prompt = json.loads(sys.stdin.readline())
    loaded = rss("VmRSS")
    seconds, _ = decode(runner, prompt, args.memory)
    print(json.dumps({"peak_rss": rss(), "loaded_rss": loaded, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
