"""Write a self-contained target bundle atomically: build in a temp dir, then rename.

Layout: manifest.json, model.onnx (model.ort, ORT format, for android/ios; MLC's
weight shards and config for mlc), the tokenizer file, and README.md with the
target's integration note. The manifest is mistral_edge.manifest.Manifest, read back by
mistral_edge.runtime.bundle (docs/bundle-format.md).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .. import __version__
from ..contract import GRAPH_CONTRACT_VERSION
from ..errors import EdgeError, first_line
from ..export.pipeline import export_onnx, resolve_pool, resolve_sinks, resolve_window
from ..manifest import (FORMAT_VERSION, MANIFEST, TOOLKIT, BudgetRecord, FileEntry, GenerationDefaults, Manifest,
                        QuantInfo, RuntimeSettings, Source, TokenizerInfo, Toolkit)
from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..quantize.plan import TensorQuant, quant_plan, scheme_name
from ..quantize.spec import parse_quant
from ..runtime.bundle import is_bundle_dir, sha256_file
from .budget import MemoryBudget, estimate
from .mlc import GROUP_SIZE as MLC_GROUP_SIZE, QUANTIZATION as MLC_QUANTIZATION, write_mlc
from .profiles import DEVICES, TargetProfile, parse_memory
from .request import BundleRequest


_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{8}")
"""Our temp dirs beside --out: `.NAME.tmp-PID-XXXXXXXX` (the bundle being built) and `.NAME.old-PID-XXXXXXXX`
(the bundle being replaced); the pid of the export that made them tells a stale one."""


@contextmanager
def atomic_dir(out: Path, log: Callable[[str], None] = lambda _: None):
    """Yield a temp dir beside `out`; on success it replaces `out` whole, on failure it vanishes.

    Only a bundle (a directory whose manifest parses as ours) or an empty directory is replaced:
    pointing --out at a folder of other files must not delete them. SIGTERM, like Ctrl-C, removes
    the temp dir (the process then exits 143); the swap into place defers both signals. Temp dirs
    left by an export that was killed outright (SIGKILL) are removed first.
    """
    out = Path(os.path.abspath(out))
    parent = out.parent
    if os.path.lexists(out) and not _replaceable(out):
        raise EdgeError(f"{out} exists and is not a bundle (no mistral-edge manifest.json in it); refusing to replace "
                         "it (choose another --out)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, out.name, log)
        tmp = _temp_dir(out, "tmp")  # not mkdtemp: the bundle keeps the umask's permissions, not 0700
    except OSError as e:
        raise EdgeError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        with _Interrupts() as interrupts:
            yield tmp
            with interrupts.deferred():
                _swap(tmp, out)
    except OSError as e:  # a full disk, a quota, a read-only file system while writing
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise EdgeError(f"cannot write the bundle {out}: {e.strerror or first_line(e)}{where}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replaceable(out: Path) -> bool:
    try:
        return out.is_dir() and (not any(out.iterdir()) or is_bundle_dir(out))
    except OSError:  # unreadable: not known to be ours
        return False


def _swap(tmp: Path, out: Path) -> None:
    try:
        if out.exists():
            old = _temp_dir(out, "old")
            os.replace(out, old / "bundle")
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / "bundle", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise EdgeError(f"cannot move the new bundle to {out}: {e.strerror}") from None


def _temp_dir(out: Path, kind: str) -> Path:
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _remove_stale(parent: Path, name: str, log: Callable[[str], None]) -> None:
    """Remove our temp dirs for `name` whose export process is gone (a SIGKILL or power loss)."""
    if os.name != "posix":
        return
    for entry in os.scandir(parent):
        m = _TEMP.fullmatch(entry.name)
        if m and m["name"] == name and entry.is_dir(follow_symlinks=False) and not _alive(int(m["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            log(f"removed {entry.path}, left by an export (pid {m['pid']}) that was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: leave it
    return True


SIGTERM_EXIT = 128 + signal.SIGTERM


class _Interrupts:
    """While entered (in the main thread, where Python runs signal handlers): SIGTERM raises
    SystemExit(143) and SIGINT KeyboardInterrupt, exceptions the temp-dir cleanup sees; within
    `deferred()` both wait until the bundle is in place. A handler someone else set is left alone."""

    def __enter__(self) -> _Interrupts:
        self.saved, self.deferring, self.pending = {}, False, None
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(sig) is default:
                    self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.deferring:
            self.pending = signum
        else:
            _raise_for(signum)

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending is not None:
                _raise_for(self.pending)


def _raise_for(signum: int):
    if signum == signal.SIGTERM:
        raise SystemExit(SIGTERM_EXIT)
    raise KeyboardInterrupt


def request_budget(cfg: ModelConfig, plan: dict[str, TensorQuant], window: int, chunk: int,
                   req: BundleRequest, pool: int = 0) -> MemoryBudget:
    """The memory budget of `req`'s bundle as its manifest records it (the target's activations,
    weight format, cache type and weight packing; `pool`: the resolved pool)."""
    return estimate(cfg, plan, window, chunk, activations=req.activation_dtype, fmt=req.weight_format,
                    kv_cache=req.kv_cache_type, packed=req.target.packs_weights, pool=pool)


def check_budget(cfg: ModelConfig, plan: dict[str, TensorQuant], window: int, chunk: int,
                 req: BundleRequest, pool: int = 0) -> tuple[MemoryBudget, int | None]:
    """The memory budget and the device's usable bytes (None: no device given); raises before
    writing when the bundle cannot fit, naming the changes to the request that would fit."""
    budget = request_budget(cfg, plan, window, chunk, req, pool)
    spec = req.device_memory or req.target.device_memory
    if spec is None:
        return budget, None
    fraction = req.target.usable_fraction
    usable = int(parse_memory(spec) * fraction)
    if budget.total_bytes > usable:
        short = budget.total_bytes - usable
        raise EdgeError(
            f"bundle needs {_mb(budget.total_bytes)} (weights {_mb(budget.weight_bytes)}, KV cache "
            f"{_mb(budget.kv_cache_bytes)}, activations {_mb(budget.activation_bytes)}) but {spec} leaves "
            f"{_mb(usable)} ({fraction:.0%}) for the model on {req.target.name}: {_mb(short)} short; "
            + _what_fits(cfg, plan, window, chunk, req, spec, budget.total_bytes, usable, pool))
    return budget, usable


def _what_fits(cfg: ModelConfig, plan: dict[str, TensorQuant], window: int, chunk: int, req: BundleRequest,
               spec: str, total: int, usable: int, pool: int = 0) -> str:
    """Each single change to the request that fits: the smallest larger named device (of the same
    family when one fits), the largest smaller window, int4 linears when they are not int4 already."""
    hints = []
    fraction, current = req.target.usable_fraction, parse_memory(spec)
    family = spec.lower().rsplit("-", 1)[0] + "-" if spec.lower() in DEVICES else None
    devices = [(size, i, name) for i, (name, size) in enumerate(DEVICES.items())
               if size > current and int(size * fraction) >= total]
    if devices:
        same = [d for d in devices if family and d[2].startswith(family)]
        hints.append(f"--device-memory {min(same or devices)[2]}")

    def fits(w: int, p: dict[str, TensorQuant] = plan) -> bool:
        return request_budget(cfg, p, w, min(chunk, w), req, min(pool, w // 2)).total_bytes <= usable

    if window > 1 and fits(1):
        lo, hi = 1, window - 1  # the largest window that fits: the budget grows with W
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        hints.append(f"--window {lo} or less")
    if req.quant.bits != 4 and req.target.name != "mlc" and fits(window, quant_plan(cfg, parse_quant("int4"))):
        hints.append("--quant int4")
    if not hints:
        return "no single change (a named --device-memory profile, a smaller --window, --quant int4) makes it fit"
    return "it would fit with " + " or ".join(hints)


def source_hash(source: str) -> str | None:
    """sha256 of the checkpoint file, or of a directory's files in name order; None for a Hub id."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        import hashlib

        h = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
        return h.hexdigest()
    return None


def _mlc_plan(ck: Checkpoint, req: BundleRequest) -> dict[str, TensorQuant]:
    """MLC quantizes every matrix, embedding and head included, as q4f16_1 (BundleRequest refused anything else)."""
    return {name: TensorQuant("int4", MLC_GROUP_SIZE, "none", "rtn") for name in quant_plan(ck.config, req.quant)}


def write_bundle(ck: Checkpoint, req: BundleRequest, out: Path, log=print, progress=None,
                 tensor_log=None) -> Manifest:
    """Export `ck` for `req.target` into `out`; returns the manifest. `log` gets what a person should
    see (e.g. a stale temp dir removed), `tensor_log` one line per quantized tensor (its error),
    `progress(done, total)` is called as the export goes.

    Everything that can refuse the export (window, quant, tokenizer, memory budget, an
    --out that is not a bundle) is checked before the first byte is written.
    """
    target = req.target
    mlc = target.name == "mlc"
    sinks = 0 if mlc else resolve_sinks(ck, req.sinks, req.window)
    pool = 0 if mlc else resolve_pool(ck, req.pool, req.window, sinks)
    window, chunk = resolve_window(ck, req.window, req.chunk, sinks, pool)
    plan = _mlc_plan(ck, req) if mlc else quant_plan(ck.config, req.quant)
    budget, usable = check_budget(ck.config, plan, window, chunk, req, pool)
    tok_name = "tokenizer.json" if "tokenizer.json" in ck.tokenizer_files else next(iter(ck.tokenizer_files), None)
    if tok_name is None:
        raise EdgeError(f"{ck.source}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    if not Path(ck.tokenizer_files[tok_name]).is_file():
        raise EdgeError(f"{ck.tokenizer_files[tok_name]}: tokenizer file not found")
    tokenizer = TokenizerInfo(tok_name, ck.config.bos_id, ck.config.eos_ids, ck.chat_template)
    tokenizer.check_ids(ck.config.vocab_size)
    fmt = req.weight_format
    codes, calibration, plan = _calibration(ck, req, plan, log)
    if calibration is not None:  # the calibrated plan spends the same bits on other tensors
        budget, usable = check_budget(ck.config, plan, window, chunk, req, pool)
    with atomic_dir(out, log) as tmp:
        if mlc:
            write_mlc(ck, tmp, tokenizer_files={tok_name: ck.tokenizer_files[tok_name]},
                      context_window=max(window, ck.config.max_position),
                      sliding_window=window if ck.config.sliding_window else None, prefill_chunk=chunk)
            result, model_file = None, None
        else:
            result = export_onnx(ck, req.quant, tmp / "model.onnx", window=window, chunk=chunk,
                                 fmt=fmt, accuracy_level=target.accuracy_level, plan=plan,
                                 activations=req.activation_dtype, progress=progress, sinks=sinks,
                                 kv_cache=req.kv_cache_type, pool=pool, codes=codes)
            model_file = "model.onnx"
            for name, kind, shape, stats in result.errors if tensor_log else ():
                tensor_log(f"  {name:36s} {kind:5s} {str(list(shape)):14s} {stats}")
            if target.ort_format:
                model_file = _to_ort_format(tmp / "model.onnx")
            shutil.copyfile(ck.tokenizer_files[tok_name], tmp / tok_name)  # write_mlc copies its own
        (tmp / "README.md").write_text(_readme(ck, target, model_file, tok_name))
        manifest = Manifest(
            format_version=FORMAT_VERSION, toolkit=Toolkit(TOOLKIT, __version__), target=target.name,
            source=Source(ck.source, ck.source_format, source_hash(ck.source)), config=ck.config,
            window=window, chunk=chunk, graph_contract=GRAPH_CONTRACT_VERSION, model=model_file,
            quant=QuantInfo(MLC_QUANTIZATION if mlc else req.quant.name, fmt, _plan_groups(plan), calibration),
            activation_dtype=req.activation_dtype, ops=tuple(result.ops) if result else (),
            runtime=RuntimeSettings(target.providers, target.provider_options, target.session_options,
                                    _converter(model_file)),
            tokenizer=tokenizer, generation=GenerationDefaults(),
            memory_budget=BudgetRecord(**budget.to_dict(), device_usable_bytes=usable),
            files=tuple(FileEntry(p.relative_to(tmp).as_posix(), p.stat().st_size, sha256_file(p))
                        for p in sorted(tmp.rglob("*")) if p.is_file()), sinks=sinks, kv_cache=req.kv_cache_type,
            pool=pool)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def _calibration(ck: Checkpoint, req: BundleRequest, plan: dict[str, TensorQuant], log=print):
    """With --calib: GPTQ codes by tensor name (computed layer by layer as the export asks for them),
    the manifest's record of the text and the calibrated plan (calibrate.calibrated_plan, where
    spec.chooses_plan; else `plan`); else (None, None, plan). The text is read and checked here, before
    anything is written."""
    if req.calib is None:
        return None, None, plan
    from ..quantize.calibrate import (CALIB_TOKENS, CALIB_WINDOWS, LayerwiseGptq, calibrated_plan, calibration_windows,
                                      gptq_scope)
    from ..quantize.selfgen import textless_calibration
    from ..quantize.spec import RandomTokens, SelfText, chooses_plan
    from ..tokenizer import Tokenizer

    if isinstance(req.calib, (SelfText, RandomTokens)):
        if isinstance(req.calib, SelfText):
            log(f"sampling {CALIB_WINDOWS} x {CALIB_TOKENS} calibration tokens from the model (--calib self)")
        windows, record = textless_calibration(ck, req.calib, CALIB_TOKENS)
    else:
        tokenizer = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
        windows, record = calibration_windows(req.calib, tokenizer)
    if chooses_plan(req.calib):
        plan = calibrated_plan(ck, req.quant, windows)
    return LayerwiseGptq(ck, plan, windows, scope=gptq_scope(req.calib)).codes, record, plan


def _plan_groups(plan: dict) -> dict:
    """Quant scheme per tensor group, e.g. {'layers.*.attention.wqkv': 'int4-g32-fzp-search'}."""
    groups: dict[str, set] = {}
    for name, tq in plan.items():
        key = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups.setdefault(key, set()).add(scheme_name(tq))
    return {k: "+".join(sorted(v)) for k, v in groups.items()}


ORT_FORMAT_MAX_BYTES = (2 << 30) - (64 << 20)
"""An ORT-format file is one flatbuffer (32-bit offsets: under 2 GiB, initializers inline)."""


def _to_ort_format(onnx_path: Path) -> str:
    """Convert to ORT format for the mobile packages; the .onnx and its .data are kept only as the
    .ort's source. The converter holds the whole model in memory and its output is one flatbuffer,
    so a model past ORT_FORMAT_MAX_BYTES stays ONNX with external data (mapped, not copied, by the
    full onnxruntime-android / -ios packages, which load .onnx files too)."""
    import onnxruntime as ort

    data = onnx_path.with_name(onnx_path.name + ".data")
    if onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0) > ORT_FORMAT_MAX_BYTES:
        return onnx_path.name
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(onnx_path.with_suffix(".ort"))
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    onnx_path.unlink()
    data.unlink(missing_ok=True)
    return onnx_path.with_suffix(".ort").name


def _converter(model_file: str | None) -> str | None:
    """An ORT-format file loads only in an onnxruntime at least as new as the one that wrote it."""
    if model_file is None or not model_file.endswith(".ort"):
        return None
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _readme(ck: Checkpoint, target: TargetProfile, model_file: str | None, tok_name: str) -> str:
    head = f"""# mistral-edge bundle: {target.name}

Source: {ck.source}
{target.note}
"""
    if model_file is None:
        return head + f"""
Files: `manifest.json` (sha256 of every file, memory budget), `mlc-chat-config.json`,
`tensor-cache.json` and `params_shard_*.bin` ({MLC_QUANTIZATION} weights), `{tok_name}`.

On a machine with MLC-LLM (and its Android NDK / Xcode setup), build the model library:

    mlc_llm compile ./mlc-chat-config.json --device android -o lib/model-android.tar   # or --device iphone

then list this directory as a `model` (absolute path) in the app's `mlc-package-config.json`
and run `mlc_llm package` there. This bundle was not run through MLC-LLM when it was written:
see docs/bundle-format.md.
"""
    return head + f"""
Files: `manifest.json` (config, window, quantization, memory budget, sha256 of every file),
`{model_file}` (decoder-step graph, see the graph contract), `{tok_name}` (tokenizer).

Run it with the Python runtime: `mistral-edge generate --bundle . "Hello"`.
In an app: create an ONNX Runtime session with the providers and options listed under
`runtime` in the manifest, allocate the cache tensors once (`past_key.i` / `past_value.i`,
shape [1, n_kv_heads, W, head_dim], of the manifest's `kv_cache` type: float32, float16, or
int8 with `past_key_scale.i` / `past_value_scale.i` [1, n_kv_heads, W, 1] float16 beside them;
the graph's inputs list them all) and bind each `present_*` output to the same buffer as its `past_*` input; feed
the prompt in chunks of at most `chunk` tokens, then one token per step. Logits are float32
either way. Chat template and generation defaults are in the manifest.
"""
