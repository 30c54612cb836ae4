"""Read and verify a target bundle: manifest.json, the files it lists, and their sha256.

This is the reading side of the bundle format (targets/ writes it); it stays
torch-free so the on-device runtime can check a bundle before running it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..contract import graph_ops
from ..errors import EdgeError, first_line

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_FIELDS = {"toolkit": dict, "target": str, "source": dict, "config": dict, "window": int, "chunk": int,
           "graph_contract": int, "quant": dict, "activation_dtype": str, "ops": list, "runtime": dict,
           "tokenizer": dict, "generation": dict, "memory_budget": dict, "files": list}
"""Top-level manifest fields and their JSON types (`model` is a file name, or null for MLC)."""
_JSON_TYPES = {dict: "an object", str: "a string", int: "an integer", list: "an array"}


def read_manifest(bundle: Path) -> dict:
    """The parsed manifest; any defect in it is one EdgeError line, never a KeyError later."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise EdgeError(f"{bundle}: no such bundle directory")
    if not path.is_file():
        raise EdgeError(f"{bundle}: not a bundle (no {MANIFEST})")
    try:
        text = path.read_text()
    except OSError as e:
        raise EdgeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise EdgeError(f"{path}: not a manifest object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EdgeError(f"{path}: unsupported bundle format version {manifest.get('format_version')!r} "
                        f"(this toolkit reads version {FORMAT_VERSION})")
    for key, kind in {**_FIELDS, "model": str}.items():
        value = manifest.get(key, 0)
        if not isinstance(value, kind) and not (key == "model" and value is None):
            raise EdgeError(f"{path}: field {key!r} is missing or not {_JSON_TYPES[kind]}")
    for f in manifest["files"]:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("bytes"), int)
                and isinstance(f.get("sha256"), str)):
            raise EdgeError(f"{path}: malformed entry in 'files': {json.dumps(f)[:80]}")
        rel = Path(f["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise EdgeError(f"{path}: file {f['path']!r} lies outside the bundle")
    return manifest


def verify(bundle: Path) -> list[str]:
    """Every problem found, one line each; an empty list means the bundle is intact.

    Checks each listed file's presence, size and sha256, that no unlisted file
    sits beside them, and that the graph's metadata agrees with the manifest.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    problems = []
    listed = {f["path"] for f in manifest["files"]}
    for f in manifest["files"]:
        p = bundle / f["path"]
        if not p.is_file():
            problems.append(f"missing file {f['path']}")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']}: size {p.stat().st_size} bytes, manifest says {f['bytes']}")
        elif sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 mismatch (file changed since export)")
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"unlisted file {rel}")
    if not problems:
        problems += _check_graph(bundle, manifest)
    return problems


def _check_graph(bundle: Path, manifest: dict) -> list[str]:
    """Graph metadata and op list against the manifest. Without the onnx package (a phone
    install) the metadata is read through onnxruntime and the op list is not checked."""
    if manifest.get("model") is None:  # an MLC bundle has no ONNX graph
        return []
    path = bundle / manifest["model"]
    try:
        import onnx
    except ImportError:
        onnx = None
    if path.suffix == ".ort":  # ORT format: only onnxruntime reads it
        onnx = None
    try:
        if onnx is None:
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = session.get_modelmeta().custom_metadata_map
        else:
            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
    except Exception as e:  # a corrupt protobuf raises DecodeError, onnxruntime its own types
        return [f"{manifest['model']}: unreadable model ({first_line(e)})"]
    cfg = manifest["config"]
    expected = {"graph_contract": manifest["graph_contract"], "window": manifest["window"], "chunk": manifest["chunk"],
                "activation_dtype": manifest["activation_dtype"],
                **{k: cfg.get(k) for k in ("n_layers", "n_kv_heads", "head_dim", "vocab_size")}}
    problems = [f"graph {k} is {props.get('mistral_edge.' + k)!r}, manifest says {v!r}"
                for k, v in expected.items() if props.get("mistral_edge." + k) != str(v)]
    if onnx is None:
        return problems
    if graph_ops(model) != sorted(manifest["ops"]):
        problems.append("graph ops differ from the manifest's op list")
    return problems


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, check: bool = True) -> "Bundle":
        """Load a bundle; refuses one that fails verification unless check=False."""
        path = Path(path)
        manifest = read_manifest(path)
        if check:
            problems = verify(path)
            if problems:
                raise EdgeError(f"{path}: bundle failed verification: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                + "; run `mistral-edge verify` for details or pass --no-verify")
        return cls(path, manifest)

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]

    def session(self, threads: int = 0, chunk: int | None = None, batch: int = 1):
        """A DecoderSession with the manifest's runtime settings: its execution providers that this
        onnxruntime has (in the manifest's order, with their options), its intra-op threads unless
        `threads` is given, and its `session.*` config entries."""
        import onnxruntime as ort

        from .session import DecoderSession, SessionConfig

        if self.manifest["model"] is None:
            raise EdgeError(f"{self.path}: a {self.manifest['target']} bundle has no ONNX model to run here")
        rt = self.manifest["runtime"]
        have, options = set(ort.get_available_providers()), rt.get("provider_options", {})
        providers = tuple((p, options[p]) if options.get(p) else p for p in rt["providers"] if p in have)
        settings = rt.get("session_options", {})
        entries = tuple((k, str(v)) for k, v in settings.items() if k.startswith("session."))
        threads = threads or int(settings.get("intra_op_num_threads", 0))
        config = SessionConfig(threads, providers or ("CPUExecutionProvider",), chunk, entries)
        return DecoderSession(self.model_path, batch, config)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        tok = self.manifest["tokenizer"]
        return Tokenizer.from_files({tok["file"]: self.path / tok["file"]}, bos_id=tok.get("bos_id"),
                                    eos_ids=tuple(tok.get("eos_ids", ())))
