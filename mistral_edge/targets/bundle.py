"""Write a self-contained target bundle atomically: build in a temp dir, then rename.

Layout: manifest.json, model.onnx (plus model.ort for mobile targets), the
tokenizer file, and README.md with the target's integration note. The manifest
format is read back by mistral_edge.runtime.bundle (docs/bundle-format.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import EdgeError
from ..export.decoder import GRAPH_CONTRACT_VERSION
from ..export.pipeline import export_onnx, quant_plan, resolve_window
from ..model.checkpoint import Checkpoint
from ..quantize.spec import QuantSpec
from ..runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from .budget import MemoryBudget, estimate
from .profiles import TargetProfile, parse_memory

GENERATION_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class BundleRequest:
    target: TargetProfile
    quant: QuantSpec
    window: int | None = None
    chunk: int | None = None
    device_memory: str | None = None  # overrides the target's default budget
    fmt: str | None = None  # overrides the target's weight format


@contextmanager
def atomic_dir(out: Path):
    """Yield a temp dir beside `out`; on success it replaces `out` whole, on failure it vanishes."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise EdgeError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "bundle")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_budget(budget: MemoryBudget, req: BundleRequest) -> int | None:
    """Raise before writing when the bundle cannot fit the device; returns the usable bytes."""
    spec = req.device_memory or req.target.device_memory
    if spec is None:
        return None
    usable = int(parse_memory(spec) * req.target.usable_fraction)
    if budget.total_bytes > usable:
        short = budget.total_bytes - usable
        raise EdgeError(
            f"bundle needs {_mb(budget.total_bytes)} (weights {_mb(budget.weight_bytes)}, KV cache "
            f"{_mb(budget.kv_cache_bytes)}, activations {_mb(budget.activation_bytes)}) but {spec} leaves "
            f"{_mb(usable)} for the model: {_mb(short)} short; try a smaller --quant (int4) or --window")
    return usable


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


def write_bundle(ck: Checkpoint, req: BundleRequest, out: Path, log=print) -> dict:
    """Export `ck` for `req.target` into `out`; returns the manifest."""
    target = req.target
    window, chunk = resolve_window(ck, req.window, req.chunk)
    plan = quant_plan(ck, req.quant)
    budget = estimate(ck.config, plan, window, chunk)
    usable = check_budget(budget, req)
    tok_name = "tokenizer.json" if "tokenizer.json" in ck.tokenizer_files else next(iter(ck.tokenizer_files), None)
    if tok_name is None:
        raise EdgeError(f"{ck.source}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    with atomic_dir(out) as tmp:
        if target.name == "mlc":
            from .mlc import write_mlc

            write_mlc(ck, tmp, tokenizer_files={tok_name: ck.tokenizer_files[tok_name]},
                      context_window=max(window, ck.config.max_position), sliding_window=ck.config.sliding_window,
                      prefill_chunk=chunk)
            result, model_file = None, None
        else:
            result = export_onnx(ck, req.quant, tmp / "model.onnx", window=window, chunk=chunk,
                                 fmt=req.fmt or target.fmt, accuracy_level=target.accuracy_level, plan=plan)
            model_file = "model.onnx"
            for name, kind, shape, stats in result.errors:
                log(f"  {name:36s} {kind:5s} {str(list(shape)):14s} {stats}")
            if target.ort_format:
                model_file = _to_ort_format(tmp / "model.onnx")
        shutil.copyfile(ck.tokenizer_files[tok_name], tmp / tok_name)
        (tmp / "README.md").write_text(_readme(ck, target, model_file, tok_name))
        manifest = {
            "format_version": FORMAT_VERSION,
            "toolkit": {"name": "mistral-edge", "version": __version__},
            "target": target.name,
            "source": {"path": ck.source, "format": ck.source_format, "sha256": source_hash(ck.source)},
            "config": ck.config.to_dict(),
            "window": window,
            "chunk": chunk,
            "graph_contract": GRAPH_CONTRACT_VERSION,
            "model": model_file,
            "quant": {"spec": req.quant.name, "format": req.fmt or target.fmt,
                      "tensors": _plan_groups(plan)},
            "activation_dtype": target.activation_dtype,
            "ops": list(result.ops) if result else [],
            "runtime": {"providers": list(target.providers), "provider_options": target.provider_options,
                        "session_options": target.session_options},
            "tokenizer": {"file": tok_name, "bos_id": ck.config.bos_id, "eos_ids": list(ck.config.eos_ids),
                          "chat_template": ck.chat_template},
            "generation": GENERATION_DEFAULTS,
            "memory_budget": {**budget.to_dict(), "device_usable_bytes": usable},
        }
        manifest["files"] = [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size,
                              "sha256": sha256_file(p)} for p in sorted(tmp.rglob("*")) if p.is_file()]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _plan_groups(plan: dict) -> dict:
    """Quant scheme per tensor group, e.g. {'layers.*.attention.wqkv': 'int4-g32-asym-search'}."""
    groups: dict[str, set] = {}
    for name, tq in plan.items():
        key = ".".join("*" if part.isdigit() else part for part in name.split("."))
        desc = tq.kind if tq.kind in ("fp32", "fp16", "int8") else \
            f"int4-g{tq.group_size}-{'sym' if tq.symmetric else 'asym'}-{tq.method}"
        groups.setdefault(key, set()).add(desc)
    return {k: "+".join(sorted(v)) for k, v in groups.items()}


def _to_ort_format(onnx_path: Path) -> str:
    """Convert to ORT format for the mobile packages; the .onnx is kept only as the .ort's source."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(onnx_path.with_suffix(".ort"))
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    onnx_path.unlink()
    return onnx_path.with_suffix(".ort").name


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _readme(ck: Checkpoint, target: TargetProfile, model_file: str | None, tok_name: str) -> str:
    return f"""# mistral-edge bundle: {target.name}

Source: {ck.source}
{target.note}

Files: `manifest.json` (config, window, quantization, memory budget, sha256 of every file),
{f'`{model_file}` (decoder-step graph, see the graph contract), ' if model_file else ''}`{tok_name}` (tokenizer).

Run it with the Python runtime: `mistral-edge generate --bundle . "Hello"`.
In an app: create an ONNX Runtime session with the providers and options listed under
`runtime` in the manifest, allocate the cache tensors once (`past_key.i` / `past_value.i`,
shape [1, n_kv_heads, W, head_dim]) and bind each `present_*` output to the same buffer
as its `past_*` input; feed the prompt in chunks of at most `chunk` tokens, then one token
per step. Chat template and generation defaults are in the manifest.
"""
