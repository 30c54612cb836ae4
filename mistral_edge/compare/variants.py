"""What `--quants` names, and the cpu-target bundles behind the ONNX rows.

A bundle in --out/bundles/<quant>-w<W> is reused when its manifest matches what
an export would write now (same source sha256, quant spec, window, sinks, KV cache type, chunk,
graph contract, toolkit version and weight bytes, i.e. the same per-tensor plan), its
files verify, and the sidecar <quant>-w<W>.code holds the sha256 of the code
that decides the weights' bytes (export/, quantize/): in a
development checkout that code changes without a version bump. A calibrated
variant is a model.onnx with its own plan and a variant.json recording what it
was built from (source, code, calibration text and settings), reused while that
record matches and the model's sha256 holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import EdgeError
from ..contract import GRAPH_CONTRACT_VERSION
from ..export.pipeline import export_onnx
from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..quantize.plan import TensorQuant, head_shares_embedding, quant_plan, tensor_shapes
from ..quantize.spec import QuantSpec, parse_quant
from ..runtime.bundle import MANIFEST, Bundle, sha256_file
from ..targets.budget import stored_bytes
from ..targets.bundle import atomic_dir, request_budget, write_bundle
from ..targets.request import BundleRequest
from ..targets.profiles import get_target
from ..quantize.calibrate import Calibrated

CALIBRATIONS = {"awq-gptq": "AWQ scales + GPTQ codes (act-order, static groups)",
                "gptq": "GPTQ codes (act-order, static groups)", "awq": ""}
"""int4 calibration suffixes (longest first) and their rows' notes (quantize/calibrate.py): AWQ scales
+ GPTQ; GPTQ alone; AWQ scales + activation-weighted search + int8 for the most sensitive linears
(its note counts them)."""
KV_SUFFIXES = {"kv8": "int8", "kv16": "fp16"}
"""A quant's `+kvN` suffix: the variant exports with that KV cache type (export --kv-cache)."""
FORMAT_SUFFIXES = ("qdq", "integer")
"""A quant's `+FORMAT` suffix: the variant exports in that weight format (export --format) instead of the cpu target's."""
TARGET = "cpu"
VARIANT_RECORD = "variant.json"


@dataclass(frozen=True)
class QuantChoice:
    spec: QuantSpec
    calibration: str | None = None
    """A CALIBRATIONS key, or None."""
    kv_cache: str | None = None
    """A KV_SUFFIXES value, or None: the target's activation type."""
    fmt: str | None = None
    """A FORMAT_SUFFIXES entry, or None: the cpu target's weight format."""

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def name(self) -> str:
        kv = next((f"+{suffix}" for suffix, kv in KV_SUFFIXES.items() if kv == self.kv_cache), "")
        fmt = f"+{self.fmt}" if self.fmt else ""
        return self.spec.name + (f"-{self.calibration}" if self.calibrated else "") + kv + fmt


def parse_quants(text: str) -> list[QuantChoice]:
    """'fp32,int8,int4-g32-awq,int4-gptq,int4+kv8,int8+integer+kv8' -> choices in order, duplicates
    (same canonical name) dropped."""
    choices: dict[str, QuantChoice] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        quant, *suffixes = item.split("+")
        kv, fmt = None, None
        for suffix in (s.lower() for s in suffixes):
            if suffix in KV_SUFFIXES and kv is None:
                kv = KV_SUFFIXES[suffix]
            elif suffix in FORMAT_SUFFIXES and fmt is None:
                fmt = suffix
            else:
                raise EdgeError(f"{item}: unknown suffix +{suffix}; expected {' or '.join('+' + s for s in KV_SUFFIXES)} "
                                f"(an int8 or fp16 KV cache) and/or {' or '.join('+' + f for f in FORMAT_SUFFIXES)} "
                                f"(a weight format), once each")
        calibration = next((c for c in CALIBRATIONS if quant.lower().endswith("-" + c)), None)
        spec = parse_quant(quant[: -len(calibration) - 1] if calibration else quant)
        if calibration and spec.bits != 4:
            raise EdgeError(f"{item}: calibration (-{calibration}) applies to int4 only")
        choice = QuantChoice(spec, calibration, kv, fmt)
        choices.setdefault(choice.name, choice)
    if not choices:
        raise EdgeError("--quants is empty; e.g. --quants fp32,fp16,int8,int4-g32,int4-g128")
    return list(choices.values())


def model_bits_per_weight(cfg: ModelConfig, plan: dict[str, TensorQuant], fmt: str = "nbits") -> float:
    """Stored bits per weight over the whole model (embedding, layers, head; scales and zero
    points included; a tied head stored once), as the bundle holds them in weight format `fmt`."""
    shapes = tensor_shapes(cfg)
    if head_shares_embedding(cfg, plan):
        shapes.pop("output")
    return 8 * stored_bytes(cfg, plan, fmt) / sum(n * k for n, k in shapes.values())


@dataclass(frozen=True)
class Built:
    """An exported variant, as the comparison needs it."""

    model_path: Path
    size_bytes: int  # every file of the bundle, manifest included
    weight_bytes: int
    kv_cache_bytes: int
    model_bits_per_weight: float
    reused: bool
    note: str = ""


def export_code_sha256() -> str:
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*(package / "export").glob("*.py"), *(package / "quantize").glob("*.py"),
                     ]):
        h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def expected_manifest(ck: Checkpoint, req: BundleRequest, source_sha256: str | None) -> dict:
    """The manifest entries that decide whether an existing bundle is `req` (window, chunk and sinks resolved)."""
    return {"target": TARGET, "source": {"path": ck.source, "sha256": source_sha256}, "quant": req.quant.name,
            "window": req.window, "sinks": req.sinks, "pool": req.pool or 0, "kv_cache": req.kv_cache_type, "chunk": req.chunk,
            "format": req.weight_format, "graph_contract": GRAPH_CONTRACT_VERSION, "toolkit": __version__,
            "weight_bytes": request_budget(ck.config, quant_plan(ck.config, req.quant), req.window, req.chunk,
                                           req, req.pool or 0).weight_bytes}


def _manifest_entries(m: dict) -> dict:
    return {"target": m.get("target"), "source": {k: m.get("source", {}).get(k) for k in ("path", "sha256")},
            "quant": m.get("quant", {}).get("spec"), "window": m.get("window"), "sinks": m.get("sinks"),
            "pool": m.get("pool", 0),
            "kv_cache": m.get("kv_cache"), "chunk": m.get("chunk"), "format": m.get("quant", {}).get("format"),
            "graph_contract": m.get("graph_contract"), "toolkit": m.get("toolkit", {}).get("version"),
            "weight_bytes": m.get("memory_budget", {}).get("weight_bytes")}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_bundle(ck: Checkpoint, spec: QuantSpec, window: int, chunk: int, path: Path,
                   source_sha256: str | None, log=print, sinks: int = 0, kv_cache: str | None = None,
                   fmt: str | None = None, pool: int = 0) -> Built:
    """The cpu-target bundle at `path` (in weight format `fmt`, None: the target's): reused if its
    manifest matches and its files verify, else exported."""
    req = BundleRequest(get_target(TARGET), spec, window, chunk, sinks=sinks, kv_cache=kv_cache, fmt=fmt, pool=pool)
    expected = expected_manifest(ck, req, source_sha256)
    code, stamp = export_code_sha256(), path.with_name(path.name + ".code")
    try:
        bundle, reused = Bundle.open(path), True
        if _manifest_entries(bundle.manifest.to_json()) != expected or stamp.read_text() != code:
            raise EdgeError("stale")
    except (EdgeError, OSError):
        stamp.unlink(missing_ok=True)
        if path.exists() and not (path / MANIFEST).is_file():
            shutil.rmtree(path)  # ours (bundles/ belongs to compare), but not a bundle: write_bundle would refuse it
        write_bundle(ck, req, path, log=log)
        stamp.write_text(code)
        bundle, reused = Bundle.open(path), False
    budget = bundle.manifest.memory_budget
    return Built(bundle.model_path, _dir_bytes(path), budget.weight_bytes, budget.kv_cache_bytes,
                 model_bits_per_weight(ck.config, quant_plan(ck.config, spec), req.weight_format), reused)


def prepare_calibrated(ck: Checkpoint, spec: QuantSpec, window: int, chunk: int, path: Path, key: dict,
                       calibrate: Callable[[], Calibrated], log=print, note: str = "",
                       kv_cache: str | None = None, fmt: str | None = None, sinks: int = 0, pool: int = 0) -> Built:
    """A calibrated int4 export at `path` (model.onnx + variant.json): not a target bundle, since its
    per-tensor plan (activation scales, int8 linears) is its own; reused while `key` (which names
    the KV cache type, the weight format, sinks and pool too) matches; `fmt` None: the cpu target's format."""
    record_path = path / VARIANT_RECORD
    try:
        record = json.loads(record_path.read_text())
        if record["key"] != key or sha256_file(path / "model.onnx") != record["model_sha256"]:
            raise ValueError("stale")
        reused = True
    except (OSError, ValueError, KeyError):
        cal = calibrate()
        target = get_target(TARGET)
        fmt = fmt or target.fmt
        if path.exists():
            shutil.rmtree(path)
        with atomic_dir(path) as tmp:
            export_onnx(cal.checkpoint, spec, tmp / "model.onnx", window=window, chunk=chunk, fmt=fmt,
                        accuracy_level=target.accuracy_level, plan=cal.plan, kv_cache=kv_cache, sinks=sinks, pool=pool)
            budget = request_budget(ck.config, cal.plan, window, chunk,
                                    BundleRequest(target, spec, window, chunk, kv_cache=kv_cache, fmt=fmt, pool=pool), pool)
            record = {"key": key, "model_sha256": sha256_file(tmp / "model.onnx"), "memory_budget": budget.to_dict(),
                      "bits_per_weight": model_bits_per_weight(ck.config, cal.plan, fmt), "int8": list(cal.int8),
                      "awq_alpha": cal.alphas}
            (tmp / VARIANT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        reused = False
    note = note or f"AWQ scales + activation-weighted int4 search; {len(record['int8'])} most sensitive linears int8"
    return Built(path / "model.onnx", _dir_bytes(path), record["memory_budget"]["weight_bytes"],
                 record["memory_budget"]["kv_cache_bytes"], record["bits_per_weight"], reused, note)

