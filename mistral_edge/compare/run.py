"""`run_compare`: export or reuse every variant, measure each with the same protocol, return the rows.

Order matters: the fp32 ONNX variant at the largest W is measured first because
it is the reference every other row's KL and top-1 are computed against.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from .. import __version__
from ..errors import EdgeError
from ..contract import GRAPH_CONTRACT_VERSION
from ..export.pipeline import resolve_pool, resolve_sinks, resolve_window
from ..model.checkpoint import Checkpoint
from ..model.loaders import load_checkpoint
from ..quantize.selfgen import textless_calibration
from ..quantize.spec import Calibration, RandomTokens, SelfText, chooses_plan, parse_quant
from ..runtime.session import DecoderSession, SessionConfig
from ..targets.bundle import source_hash
from ..targets.request import check_window
from ..tokenizer import Tokenizer
from ..quantize import calibrate
from .quality import ReferenceStore, evaluate
from .report import Row
from .speed import SpeedJob, SpeedResult, SpeedTimeout, measure, timeout_for
from .text import EvalText, load_text, read_text, token_windows
from .variants import CALIBRATIONS, QuantChoice, export_code_sha256, parse_quants, prepare_bundle, prepare_calibrated

DEFAULT_QUANTS = "fp32,fp16,int8,int4-g32,int4-g128"
TORCH_ROWS = {"fp32": ("float32", None), "bf16": ("bfloat16", None),
              "bnb-int8": ("float32", "int8"), "bnb-nf4": ("float32", "nf4")}
"""PyTorch reference rows: compute dtype, and the bitsandbytes quant of the layer linears (None: unquantized)."""


@dataclass(frozen=True)
class CompareRequest:
    model: str | None = None
    quants: str = DEFAULT_QUANTS
    text: Path | None = None
    dataset: str | None = None
    windows: tuple[int, ...] = ()  # W sweep; empty: the model's own (or the export default)
    sinks: tuple[int, ...] = ()  # attention-sink sweep; empty: the export default (resolve_sinks)
    pools: tuple[int, ...] = ()  # pool sweep (docs/cache.md); empty: the export default (resolve_pool)
    ctx: int = 512
    n_windows: int = 32
    calib: Calibration | None = None  # SelfText, RandomTokens: no text (quantize/selfgen.py)
    threads: int = 0  # 0: one per physical core
    runs: int = 5
    out: Path = Path("compare")
    torch_rows: bool = True
    trust_pickle: bool = False
    prompt_tokens: int = 128
    decode_tokens: int = 64
    device: str = "cpu"  # where the torch rows compute


def resolve_threads(threads: int) -> int:
    if threads < 0:
        raise EdgeError(f"--threads must be >= 0 (0: one per physical core), got {threads}")
    if threads:
        return threads
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def check_request(req: CompareRequest) -> list[QuantChoice]:
    """Everything that can be refused before loading a model."""
    choices = parse_quants(req.quants)
    for w in req.windows:
        if w <= 0:
            raise EdgeError(f"--window must be a positive integer, got {w}")
        check_window(w, None)
    for s in req.sinks:
        check_window(min(req.windows, default=None), None, s)
    for p in req.pools:
        check_window(min(req.windows, default=None), None, min(req.sinks, default=None), p)
    check_out(req.out)
    if req.torch_rows:
        from ..model.torch_session import resolve_device  # torch: only for the torch rows

        resolve_device(req.device)
    if req.runs < 1:
        raise EdgeError(f"--runs must be a positive integer, got {req.runs}")
    if req.ctx < 2:
        raise EdgeError(f"--ctx must be at least 2 (one context token and one scored token), got {req.ctx}")
    if req.n_windows < 1:
        raise EdgeError(f"--n-windows must be a positive integer, got {req.n_windows}")
    resolve_threads(req.threads)
    return choices


def check_out(out: Path) -> None:
    """--out must be a directory, or not exist yet under one (it is created after the model loads)."""
    if out.exists() and not out.is_dir():
        raise EdgeError(f"--out {out} exists and is not a directory")
    parent = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise EdgeError(f"--out {out}: {parent} is not a directory")


def calibration_text(req: CompareRequest, evaluation: EvalText) -> EvalText | SelfText | RandomTokens:
    if isinstance(req.calib, (SelfText, RandomTokens)):
        return req.calib
    if req.calib is not None:
        calib = read_text(req.calib)
    elif req.text is None:
        calib = load_text(None, req.dataset, split="validation")
    else:
        raise EdgeError("calibrated quants (-awq, -gptq) need --calib FILE: separate text such as WikiText-2's "
                        "wiki.valid.tokens, never the evaluation text")
    if calib.sha256 == evaluation.sha256:
        raise EdgeError(f"--calib {calib.name} is the evaluation text; calibrate on separate text "
                        "(e.g. WikiText-2 valid when evaluating on test)")
    return calib


class _Run:
    """State shared by the measurements of one comparison."""

    def __init__(self, req: CompareRequest, ck: Checkpoint, ids: np.ndarray, evaluation: EvalText,
                 progress: Progress, log, scratch: Path):
        self.req, self.ck, self.progress, self.log = req, ck, progress, log
        self.text = evaluation.name
        self.threads = resolve_threads(req.threads)
        self.windows = token_windows(ids, req.ctx, req.n_windows)
        speed_ids = np.resize(ids, req.prompt_tokens + req.decode_tokens).tolist()
        self.prompt, self.decode = speed_ids[: req.prompt_tokens], speed_ids[req.prompt_tokens:]
        self.source_sha = source_hash(ck.source)
        self.reference = ReferenceStore(scratch / "reference.u16", len(self.windows), req.ctx - 1, ck.config.vocab_size)
        self.calib_ids: np.ndarray | None = None
        self.calib_sha: str | None = None
        self.chunk_step_s = 0.0  # seconds per chunk step of the latest quality pass (scales the speed timeout)

    def row(self, quant: str, backend: str, window: int, sinks: int, quality, speed: SpeedResult | None,
            note: str = "", pool: int = 0, **sizes) -> Row:
        """`speed` None: the speed worker timed out (the note says so)."""
        measured = {} if speed is None else asdict(speed)
        if speed is None:
            note = "; ".join(n for n in (note, "speed not measured: the worker timed out") if n)
        return Row(quant=quant, backend=backend, window=window, perplexity=quality.perplexity,
                   kl_vs_fp32=quality.kl_vs_fp32, top1_vs_fp32=quality.top1_vs_fp32,
                   prefill_tok_s=measured.get("prefill_tok_s"), decode_tok_s=measured.get("decode_tok_s"),
                   peak_rss_bytes=measured.get("peak_rss_bytes"), threads=self.threads, ctx=self.req.ctx,
                   n_windows=len(self.windows), scored_tokens=quality.scored_tokens, text=self.text, note=note,
                   sinks=sinks, pool=pool, ppl_within_w=quality.ppl_within_w, ppl_beyond_w=quality.ppl_beyond_w, **sizes)

    def quality(self, session, chunk: int, label: str, record: bool = False):
        task = self.progress.add_task(f"quality {label}", total=len(self.windows))
        start = time.perf_counter()
        try:
            return evaluate(session, self.windows, chunk, self.reference, record,
                            progress=lambda: self.progress.advance(task))
        finally:
            steps = self.windows.shape[0] * -(-self.windows.shape[1] // chunk)
            self.chunk_step_s = (time.perf_counter() - start) / steps
            self.progress.remove_task(task)

    def speed(self, job: SpeedJob, label: str, weight_bytes: int) -> SpeedResult | None:
        """The worker's result, or None (and one log line) when it ran past its timeout."""
        timeout = timeout_for(job, self.chunk_step_s, weight_bytes)
        task = self.progress.add_task(f"speed {label} ({job.runs} runs, fresh process)", total=None)
        try:
            return measure(job, timeout)
        except SpeedTimeout as e:
            self.log(f"{label}: {e}; its speed is not measured")
            return None
        finally:
            self.progress.remove_task(task)

    def calibration_key(self, choice: QuantChoice, window: int, chunk: int, sinks: int, pool: int) -> dict:
        return {"source": {"path": self.ck.source, "sha256": self.source_sha}, "quant": choice.name,
                "window": window, "chunk": chunk, "sinks": sinks, "pool": pool, "graph_contract": GRAPH_CONTRACT_VERSION, "toolkit": __version__,
                "code_sha256": export_code_sha256(),
                "calibration": {"method": choice.calibration, "text_sha256": self.calib_sha,
                                "windows": calibrate.CALIB_WINDOWS, "ctx": self.req.ctx, "alphas": list(calibrate.ALPHAS),
                                "sample_rows": calibrate.SAMPLE_ROWS, "int8_share": calibrate.INT8_SHARE,
                                "sensitivity_tokens": calibrate.SENSITIVITY_TOKENS, "gptq": calibrate.GPTQ_SETTINGS}}

    def calibrated(self, choice: QuantChoice) -> calibrate.Calibrated:
        task = self.progress.add_task(f"calibrating {choice.name}", total=None)
        try:
            if choice.calibration == "awq":
                cal = calibrate.calibrate_int4(self.ck, choice.spec, self.calib_ids)
            else:
                cal = calibrate.calibrate_gptq(self.ck, choice.spec, self.calib_ids, awq=choice.calibration == "awq-gptq",
                                               choose_plan=chooses_plan(self.req.calib),
                                               scope=calibrate.gptq_scope(self.req.calib))
        finally:
            self.progress.remove_task(task)
        if cal.alphas:
            self.log(f"{choice.name}: AWQ alpha mean {np.mean(list(cal.alphas.values())):.2f}; {len(cal.int8)} "
                     f"linears kept int8 (listed in variant.json)")
        return cal

    def onnx_row(self, choice: QuantChoice, window: int, sinks: int, pool: int, record: bool = False) -> Row:
        _, chunk = resolve_window(self.ck, window, None, sinks, pool)
        path = self.req.out / "bundles" / (f"{choice.name}-w{window}" + (f"-s{sinks}" if sinks else "")
                                           + (f"-p{pool}" if pool else ""))
        label = f"{choice.name} W={window}" + (f" S={sinks}" if sinks else "") + (f" P={pool}" if pool else "")
        task = self.progress.add_task(f"export {label}", total=None)
        try:
            if choice.calibrated:
                built = prepare_calibrated(self.ck, choice.spec, window, chunk, path,
                                           self.calibration_key(choice, window, chunk, sinks, pool),
                                           lambda: self.calibrated(choice), log=lambda line: None,
                                           note=CALIBRATIONS[choice.calibration], kv_cache=choice.kv_cache,
                                           fmt=choice.fmt, sinks=sinks, pool=pool)
            else:
                built = prepare_bundle(self.ck, choice.spec, window, chunk, path, self.source_sha,
                                       log=lambda line: None, sinks=sinks, kv_cache=choice.kv_cache,
                                       fmt=choice.fmt, pool=pool)
        finally:
            self.progress.remove_task(task)
        self.log(f"{'reused' if built.reused else 'exported'} {path}")
        session = DecoderSession(built.model_path, config=SessionConfig(threads=self.threads, chunk=chunk))
        quality = self.quality(session, chunk, label, record)
        del session
        speed = self.speed(SpeedJob("onnx", self.threads, chunk, self.prompt, self.decode, self.req.runs,
                                    model_path=str(built.model_path)), choice.name, built.weight_bytes)
        return self.row(choice.name, "onnx", window, sinks, quality, speed, pool=pool,
                        model_bits_per_weight=built.model_bits_per_weight,
                        size_bytes=built.size_bytes, weight_bytes=built.weight_bytes,
                        kv_cache_bytes=built.kv_cache_bytes, note=built.note)

    def torch_row(self, name: str, window: int, sinks: int) -> Row:
        """The PyTorch reference as TORCH_ROWS[name] says; a bitsandbytes row that cannot run here
        is a note with bitsandbytes' reason."""
        import torch

        from ..model.bnb import NOTES, check_bnb, quantize_linears
        from ..model.reference import ReferenceModel
        from ..model.torch_session import TorchSession

        dtype, bnb = TORCH_ROWS[name]
        backend = "torch" if bnb is None else "bitsandbytes"
        if bnb is not None:
            try:
                check_bnb(bnb, self.req.device)
            except EdgeError as e:
                self.log(f"{name} not measured: {e}")
                return Row.unmeasured(name, backend, str(e))
        _, chunk = resolve_window(self.ck, window, None, sinks)
        torch.set_num_threads(self.threads)
        model = ReferenceModel(self.ck.config, self.ck.weights, getattr(torch, dtype), self.req.device)
        size = torch.finfo(model.dtype).bits // 8
        weight_bytes = self.ck.n_params * size if bnb is None else quantize_linears(model, bnb)
        quality = self.quality(TorchSession(model, window, chunk, sinks=sinks), chunk, f"PyTorch {name}")
        del model
        speed = self.speed(SpeedJob("torch", self.threads, chunk, self.prompt, self.decode, self.req.runs,
                                    model=self.req.model, trust_pickle=self.req.trust_pickle, window=window,
                                    dtype=dtype, bnb=bnb, device=self.req.device), f"PyTorch {name}",
                           self.ck.n_params * 4)  # the worker loads the checkpoint as fp32 first
        return self.row(name, backend, window, sinks, quality, speed,
                        model_bits_per_weight=8 * weight_bytes / self.ck.n_params,
                        size_bytes=None, weight_bytes=weight_bytes,
                        kv_cache_bytes=self.ck.config.kv_bytes_per_token(size) * window,
                        note=NOTES.get(bnb, ""))


class _Stopped(BaseException):
    """SIGTERM or SIGINT, raised where the comparison is, so that every cleanup on the way out runs
    (not an Exception: nothing on the way may take it for a failure to note and go on from)."""


@contextmanager
def _stopped_by_signals(fired: list[int]):
    """While entered in the main thread (where Python runs handlers): the first SIGTERM or SIGINT
    is appended to `fired` and raises _Stopped; later ones are ignored, so that the cleanup it sets
    off runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if not fired:
            fired.append(signum)
            raise _Stopped(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_compare(req: CompareRequest, progress: Progress | None = None, log=print) -> list[Row]:
    """Measure every variant of `req` (see the package docstring for the protocol). SIGTERM or
    SIGINT stops it as one EdgeError, once its scratch files are gone (a speed worker is killed, a
    bundle being written removed; bundles it finished stay in OUT/bundles for the next run)."""
    choices = check_request(req)
    fired: list[int] = []
    try:
        with _stopped_by_signals(fired):
            return _compare(req, choices, progress or Progress(disable=True), log)
    except BaseException:
        if not fired:  # whatever came out after a signal is the signal's (a library may turn _Stopped into its own
            raise      # error: safetensors' get_tensor gave a ValueError)
        raise EdgeError(f"compare stopped by {signal.Signals(fired[0]).name}: its scratch files are removed, the "
                        f"bundles it finished are kept in {req.out / 'bundles'}") from None


def _compare(req: CompareRequest, choices: list[QuantChoice], progress: Progress, log) -> list[Row]:
    evaluation = load_text(req.text, req.dataset)
    calib = calibration_text(req, evaluation) if any(c.calibrated for c in choices) else None
    task = progress.add_task(f"loading {req.model or 'the embedded demo model'}", total=None)
    ck = load_checkpoint(req.model, trust_pickle=req.trust_pickle)
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    progress.update(task, description=f"tokenizing {evaluation.name}")
    ids = np.asarray(tok.encode(evaluation.text, add_bos=False), np.int64)
    req.out.mkdir(parents=True, exist_ok=True)  # the reference scratch file is large: keep it off /tmp (tmpfs)
    with tempfile.TemporaryDirectory(prefix=".reference-", dir=req.out) as scratch:
        run = _Run(req, ck, ids, evaluation, progress, log, Path(scratch))
        if isinstance(calib, (SelfText, RandomTokens)):
            if isinstance(calib, SelfText):
                progress.update(task, description=f"sampling {calibrate.CALIB_WINDOWS} calibration windows "
                                                  "from the model")
            run.calib_ids, record = textless_calibration(ck, calib, req.ctx)
            run.calib_sha = record["sha256"]
        elif calib is not None:
            progress.update(task, description=f"tokenizing {calib.name}")
            run.calib_ids = token_windows(tok.encode(calib.text, add_bos=False), req.ctx, calibrate.CALIB_WINDOWS)
            run.calib_sha = calib.sha256
        progress.remove_task(task)

        windows = sorted({resolve_window(ck, w, None)[0] for w in req.windows} or {resolve_window(ck, None, None)[0]})
        if req.sinks and max(req.sinks) >= windows[0]:
            raise EdgeError(f"--sinks {max(req.sinks)} must be below every window (W={windows[0]})")
        cells = [(w, s, p) for w in windows for s in (sorted(set(req.sinks)) or [resolve_sinks(ck, None, w)])
                 for p in sorted(set(req.pools)) or [resolve_pool(ck, None, w, s)]]
        for w, s, p in cells:
            if s + p >= w:
                raise EdgeError(f"--pool {p} with {s} sinks leaves no ring in the window W={w}")
        top = next(cell for cell in cells if cell[0] == windows[-1])  # the largest W, fewest sinks and pool: the reference
        reference = QuantChoice(parse_quant("fp32"))
        rows = [run.onnx_row(reference, *top, record=True)]
        for window, s, p in cells:
            for choice in choices:
                if (choice, window, s, p) != (reference, *top):
                    rows.append(run.onnx_row(choice, window, s, p))
        if req.torch_rows:
            rows += [run.torch_row(name, *top[:2]) for name in TORCH_ROWS]
        return rows
