"""Write a self-contained target bundle atomically: build in a temp dir, then rename.

Layout: manifest.json, model.onnx (model.ort, ORT format, for android/ios; MLC's
weight shards and config for mlc), the tokenizer file, and README.md with the
target's integration note. The manifest format is read back by
mistral_edge.runtime.bundle (docs/bundle-format.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import EdgeError
from ..contract import GRAPH_CONTRACT_VERSION
from ..export.onnx_builder import activation_type
from ..export.pipeline import export_onnx, resolve_window
from ..model.checkpoint import Checkpoint
from ..quantize.plan import TensorQuant, quant_plan, scheme_name
from ..quantize.spec import QuantSpec
from ..runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from .budget import MemoryBudget, estimate
from .mlc import GROUP_SIZE as MLC_GROUP_SIZE, QUANTIZATION as MLC_QUANTIZATION, write_mlc
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
    activations: str | None = None  # "fp32" | "fp16": overrides the target's activation dtype

    def __post_init__(self) -> None:  # bad values fail before the model is loaded
        if self.device_memory is not None:
            parse_memory(self.device_memory)
        if self.activations is not None:
            activation_type(self.activations)

    @property
    def activation_dtype(self) -> str:
        return self.activations or self.target.activation_dtype


@contextmanager
def atomic_dir(out: Path):
    """Yield a temp dir beside `out`; on success it replaces `out` whole, on failure it vanishes.

    Only a bundle (a directory with a manifest) or an empty directory is replaced: pointing
    --out at a folder of other files must not delete them.
    """
    out = Path(os.path.abspath(out))
    parent = out.parent
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise EdgeError(f"{out} exists and is not a bundle; refusing to replace it (choose another --out)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()  # not mkdtemp: the bundle keeps the umask's permissions, not 0700
    except OSError as e:
        raise EdgeError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        yield tmp
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_budget(budget: MemoryBudget, req: BundleRequest) -> int | None:
    """Raise before writing when the bundle cannot fit the device; returns the usable bytes."""
    spec = req.device_memory or req.target.device_memory
    if spec is None:
        return None
    fraction = req.target.usable_fraction
    usable = int(parse_memory(spec) * fraction)
    if budget.total_bytes > usable:
        short = budget.total_bytes - usable
        raise EdgeError(
            f"bundle needs {_mb(budget.total_bytes)} (weights {_mb(budget.weight_bytes)}, KV cache "
            f"{_mb(budget.kv_cache_bytes)}, activations {_mb(budget.activation_bytes)}) but {spec} leaves "
            f"{_mb(usable)} ({fraction:.0%}) for the model on {req.target.name}: {_mb(short)} short; "
            f"try a smaller --quant (int4) or --window")
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


def _mlc_plan(ck: Checkpoint, req: BundleRequest) -> dict[str, TensorQuant]:
    """MLC quantizes every matrix, embedding and head included, as q4f16_1: nothing else is asked for."""
    if req.quant.bits != 4 or req.quant.group_size != MLC_GROUP_SIZE or req.fmt or \
            req.activation_dtype != req.target.activation_dtype:
        raise EdgeError(f"the mlc target writes MLC's {MLC_QUANTIZATION} (int4, groups of {MLC_GROUP_SIZE}, "
                        f"symmetric, fp16 activations) only: use --quant int4 (the default), no --format "
                        f"and no --activations fp32")
    return {name: TensorQuant("int4", MLC_GROUP_SIZE, "none", "rtn") for name in quant_plan(ck.config, req.quant)}


def write_bundle(ck: Checkpoint, req: BundleRequest, out: Path, log=print, progress=None) -> dict:
    """Export `ck` for `req.target` into `out`; returns the manifest. `log` gets one line per
    quantized tensor (its error), `progress(done, total)` is called as the export goes.

    Everything that can refuse the export (window, quant, tokenizer, memory budget, an
    --out that is not a bundle) is checked before the first byte is written.
    """
    target = req.target
    mlc = target.name == "mlc"
    window, chunk = resolve_window(ck, req.window, req.chunk)
    plan = _mlc_plan(ck, req) if mlc else quant_plan(ck.config, req.quant)
    budget = estimate(ck.config, plan, window, chunk, activations=req.activation_dtype, fmt=req.fmt or target.fmt)
    usable = check_budget(budget, req)
    tok_name = "tokenizer.json" if "tokenizer.json" in ck.tokenizer_files else next(iter(ck.tokenizer_files), None)
    if tok_name is None:
        raise EdgeError(f"{ck.source}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    if not Path(ck.tokenizer_files[tok_name]).is_file():
        raise EdgeError(f"{ck.tokenizer_files[tok_name]}: tokenizer file not found")
    fmt = MLC_QUANTIZATION if mlc else req.fmt or target.fmt
    with atomic_dir(out) as tmp:
        if mlc:
            write_mlc(ck, tmp, tokenizer_files={tok_name: ck.tokenizer_files[tok_name]},
                      context_window=max(window, ck.config.max_position),
                      sliding_window=window if ck.config.sliding_window else None, prefill_chunk=chunk)
            result, model_file = None, None
        else:
            result = export_onnx(ck, req.quant, tmp / "model.onnx", window=window, chunk=chunk,
                                 fmt=fmt, accuracy_level=target.accuracy_level, plan=plan,
                                 activations=req.activation_dtype, progress=progress)
            model_file = "model.onnx"
            for name, kind, shape, stats in result.errors:
                log(f"  {name:36s} {kind:5s} {str(list(shape)):14s} {stats}")
            if target.ort_format:
                model_file = _to_ort_format(tmp / "model.onnx")
            shutil.copyfile(ck.tokenizer_files[tok_name], tmp / tok_name)  # write_mlc copies its own
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
            "quant": {"spec": MLC_QUANTIZATION if mlc else req.quant.name, "format": fmt,
                      "tensors": _plan_groups(plan)},
            "activation_dtype": req.activation_dtype,
            "ops": list(result.ops) if result else [],
            "runtime": {"providers": list(target.providers), "provider_options": target.provider_options,
                        "session_options": target.session_options, **_converter(model_file)},
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


def _converter(model_file: str | None) -> dict:
    """An ORT-format file loads only in an onnxruntime at least as new as the one that wrote it."""
    if model_file is None or not model_file.endswith(".ort"):
        return {}
    import onnxruntime as ort

    return {"converted_by": f"onnxruntime {ort.__version__}"}


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
shape [1, n_kv_heads, W, head_dim], float16 when the manifest's `activation_dtype` is fp16,
else float32) and bind each `present_*` output to the same buffer as its `past_*` input; feed
the prompt in chunks of at most `chunk` tokens, then one token per step. Logits are float32
either way. Chat template and generation defaults are in the manifest.
"""
