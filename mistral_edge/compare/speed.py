"""Prefill and decode speed, and peak memory, each variant measured in a fresh process.

A fresh process per variant keeps peak resident memory (`ru_maxrss`) from mixing
between variants: it counts what running that variant costs (interpreter,
onnxruntime, weights, cache, one prefill and decode), not the comparison's own
bookkeeping. Run as `python -m mistral_edge.compare.speed` with a JSON job on
stdin; prints one JSON line. Only numpy and the runtime are imported for an
ONNX job, so torch's own footprint is not counted against it.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SpeedJob:
    backend: str  # "onnx" or "torch"
    threads: int
    chunk: int
    prompt: list[int]
    decode: list[int]  # tokens fed one at a time after the prompt (teacher-forced: timing does not depend on them)
    runs: int
    model_path: str | None = None  # onnx
    model: str | None = None  # torch: MODEL as given to load_checkpoint (None: the demo model)
    trust_pickle: bool = False
    window: int | None = None
    dtype: str = "float32"  # torch compute dtype
    bnb: str | None = None  # torch: bitsandbytes quant of the layer linears (model/bnb.py)
    device: str = "cpu"  # torch: where the reference computes


@dataclass(frozen=True)
class SpeedResult:
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_bytes: int


def timed_run(session, prompt: np.ndarray, decode: np.ndarray) -> tuple[float, float]:
    """Seconds for the chunked prefill of `prompt` and for feeding `decode` one token per step."""
    session.reset()
    c = session.chunk
    t0 = time.perf_counter()
    for s in range(0, len(prompt), c):
        session.step(prompt[None, s:s + c])
    t1 = time.perf_counter()
    for tok in decode:
        session.step(np.asarray([[tok]], np.int64))
    return t1 - t0, time.perf_counter() - t1


def benchmark(session, prompt: list[int], decode: list[int], runs: int) -> tuple[float, float]:
    """Median prefill and decode tokens/s over `runs` runs, after one warm-up run."""
    p, d = np.asarray(prompt, np.int64), np.asarray(decode, np.int64)
    timed_run(session, p, d)
    times = [timed_run(session, p, d) for _ in range(runs)]
    return (len(p) / statistics.median(t for t, _ in times), len(d) / statistics.median(t for _, t in times))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc (VmHWM): ru_maxrss would carry
    over the parent's peak, because it survives fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: the working-set peak is the nearest equivalent
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def open_session(job: SpeedJob):
    if job.backend == "onnx":
        from ..runtime.session import DecoderSession, SessionConfig

        return DecoderSession(job.model_path, config=SessionConfig(threads=job.threads, chunk=job.chunk))
    import torch

    from ..model.captured import open_session as torch_session
    from ..model.loaders import load_checkpoint
    from ..model.reference import ReferenceModel
    from ..model.torch_session import UNQUANTIZED, quantize

    torch.set_num_threads(job.threads)
    ck = load_checkpoint(job.model, trust_pickle=job.trust_pickle)
    model = ReferenceModel(ck.config, ck.weights, getattr(torch, job.dtype), job.device)
    ck.weights.clear()  # the model holds its own (converted) copy
    quantize(model, job.bnb or UNQUANTIZED)
    return torch_session(model, job.window, job.chunk, job.bnb or UNQUANTIZED)


def run_job(job: SpeedJob) -> SpeedResult:
    session = open_session(job)
    prefill, decode = benchmark(session, job.prompt, job.decode, job.runs)
    return SpeedResult(prefill, decode, peak_rss_bytes())


START_S = 120.0
"""Seconds a worker may take to start (interpreter, onnxruntime or torch), before reading weights."""
LOAD_BYTES_PER_S = 50e6
"""The slowest weight loading allowed for (a slow disk, a torch checkpoint upcast on load)."""
STEP_SLACK = 20
"""How many times slower than the same model's quality pass a worker's step may run before the
worker is taken for hung: a decode step costs at most one prefill chunk step (both read every
weight once), and the fresh process has the same threads."""


class SpeedTimeout(Exception):
    """The worker ran past its timeout and was killed."""


def timeout_for(job: SpeedJob, chunk_step_s: float, weight_bytes: int) -> float:
    """Seconds `job` may run: start-up, loading `weight_bytes`, then its warm-up and timed runs (each
    the prompt's chunks and the decode steps) at STEP_SLACK times `chunk_step_s`, the seconds one
    chunk step took in this comparison's quality pass of the same variant."""
    steps = (job.runs + 1) * (math.ceil(len(job.prompt) / job.chunk) + len(job.decode))
    return START_S + weight_bytes / LOAD_BYTES_PER_S + STEP_SLACK * steps * chunk_step_s


def measure(job: SpeedJob, timeout: float | None = None) -> SpeedResult:
    """Run `job` in a fresh interpreter and return its result; past `timeout` seconds the worker
    is killed and SpeedTimeout raised."""
    from ..errors import EdgeError

    try:
        proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(asdict(job)), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise SpeedTimeout(f"speed worker killed after {timeout:.0f} s (its timeout)") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise EdgeError(f"speed benchmark failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return SpeedResult(**json.loads(proc.stdout.splitlines()[-1]))


if __name__ == "__main__":
    print(json.dumps(asdict(run_job(SpeedJob(**json.loads(sys.stdin.read()))))))
