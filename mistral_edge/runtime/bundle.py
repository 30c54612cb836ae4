"""Read and verify a target bundle: manifest.json, the files it lists, and their sha256.

This is the reading side of the bundle format (targets/ writes it, mistral_edge/manifest.py
types it); it stays torch- and onnx-free so the on-device runtime can check a bundle before
running it. Every file the runtime opens is a listed, hashed, regular file inside the bundle:
paths are checked with symlinks resolved, and nothing that is not a regular file is opened
(a FIFO would block, a device could do anything).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..contract import GRAPH_CONTRACT_VERSION, GraphInfo, graph_ops
from ..errors import EdgeError, first_line
from ..manifest import FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, TOOLKIT, Manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "Bundle", "is_bundle_dir", "read_manifest", "sha256_file", "verify"]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def _sha256(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _show(rel: str) -> str:
    """A path from a hostile directory or manifest, printable on one line."""
    return rel if rel.isprintable() else ascii(rel)


def _open_listed(root: Path, rel: str):
    """A binary file object for `rel` under `root`, if it is a regular file inside the bundle once
    symlinks are resolved; else EdgeError (FileNotFoundError when absent). A non-regular file is
    refused from its stat, before any open; the open itself does not block and is re-checked."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / rel)
    if os.path.commonpath([real_root, real]) != real_root:
        raise EdgeError(f"{_show(rel)}: a symlink that leaves the bundle")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise EdgeError(f"{_show(rel)}: not a regular file")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat
        os.close(fd)
        raise EdgeError(f"{_show(rel)}: not a regular file")
    return os.fdopen(fd, "rb")


def read_manifest_json(bundle: Path):
    """manifest.json parsed, but not validated (a size limit, UTF-8, nesting and NaN checked)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise EdgeError(f"{bundle}: no such bundle directory")
    path = bundle / MANIFEST
    if not os.path.lexists(path):
        raise EdgeError(f"{bundle}: not a bundle (no {MANIFEST})")
    try:
        with _open_listed(bundle, MANIFEST) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except EdgeError as e:
        raise EdgeError(f"{bundle}: {e}") from None
    except OSError as e:
        raise EdgeError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise EdgeError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise EdgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise EdgeError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, a constant, an integer of more than 4300 digits
        raise EdgeError(f"{path}: invalid JSON ({first_line(e)})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_manifest(bundle: Path) -> Manifest:
    """The validated manifest; any defect in it is one EdgeError line, never a KeyError later."""
    return Manifest.from_json(read_manifest_json(bundle), str(Path(bundle) / MANIFEST))


def is_bundle_dir(path: Path) -> bool:
    """A directory whose manifest parses as one of ours, of any format version: safe to replace whole."""
    try:
        raw = read_manifest_json(path)
    except EdgeError:
        return False
    toolkit = raw.get("toolkit") if isinstance(raw, dict) else None
    return (isinstance(toolkit, dict) and toolkit.get("name") == TOOLKIT
            and type(raw.get("format_version")) is int)


def verify(bundle: Path) -> list[str]:
    """Every problem found, one line each; an empty list means the bundle is intact.

    Checks the manifest against its own digest, each listed file's presence, type, size and
    sha256, that nothing unlisted sits beside them, and that the graph's metadata agrees with
    the manifest.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    problems = []
    if manifest.edited:
        problems.append(f"{MANIFEST}: edited since export (its content no longer matches manifest_sha256)")
    for f in manifest.files:
        problems += _check_file(bundle, f.path, f.bytes, f.sha256)
    problems += _unlisted(bundle, {f.path for f in manifest.files})
    if not problems:
        problems += _check_graph(bundle, manifest)
    return problems


def _check_file(root: Path, rel: str, size: int, sha256: str) -> list[str]:
    try:
        with _open_listed(root, rel) as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                return [f"{_show(rel)}: size {actual} bytes, manifest says {size}"]
            digest = _sha256(f)
    except EdgeError as e:
        return [str(e)]
    except FileNotFoundError:
        return [f"missing file {_show(rel)}"]
    except OSError as e:
        return [f"{_show(rel)}: cannot read ({e.strerror})"]
    return [] if digest == sha256 else [f"{_show(rel)}: sha256 mismatch (file changed since export)"]


def _unlisted(root: Path, listed: set[str]) -> list[str]:
    """Entries that the manifest does not list: files, and symlinks (to a directory too) or other
    non-directories. os.walk does not enter a symlinked directory."""
    problems = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: problems.append(
                f"{_show(os.path.relpath(e.filename, root))}: cannot list ({e.strerror})")):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                try:
                    mode = os.lstat(full).st_mode
                except OSError:  # gone since the listing
                    continue
                if stat.S_ISDIR(mode) or rel in listed or rel == MANIFEST:
                    continue
                kind = "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "entry (not a regular file)"
                problems.append(f"unlisted {kind} {_show(rel)}")
    except RecursionError:  # os.walk recurses per level (Python < 3.12)
        problems.append("directories nested too deeply to list")
    return problems


def _check_graph(bundle: Path, manifest: Manifest) -> list[str]:
    """Graph metadata, external data and op list against the manifest. Without the onnx package
    (a phone install) the metadata is read through onnxruntime and the op list is not checked."""
    if manifest.model is None:  # an MLC bundle has no ONNX graph
        return []
    path = bundle / manifest.model
    onnx = None
    if path.suffix != ".ort":  # ORT format: only onnxruntime reads it
        try:
            import onnx
        except ImportError:
            pass
    try:
        if onnx is None:
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = session.get_modelmeta().custom_metadata_map
        else:
            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
    except Exception as e:  # a corrupt protobuf raises DecodeError, onnxruntime its own types
        return [f"{_show(manifest.model)}: unreadable model ({first_line(e)})"]
    try:
        info = GraphInfo.from_metadata(props, manifest.model)
    except EdgeError as e:
        return [str(e)]
    cfg = manifest.config
    expected = {"graph_contract": manifest.graph_contract, "window": manifest.window, "chunk": manifest.chunk,
                "sinks": manifest.sinks, "pool": manifest.pool, "kv_cache": manifest.kv_cache,
                "activation_dtype": manifest.activation_dtype, "n_layers": cfg.n_layers,
                "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}
    actual = {**dataclasses.asdict(info), "graph_contract": GRAPH_CONTRACT_VERSION}  # from_metadata checked it
    problems = [f"graph {k} is {str(actual[k])!r}, manifest says {v!r}" for k, v in expected.items() if actual[k] != v]
    if onnx is None:
        return problems
    listed = {f.path for f in manifest.files}
    for t in model.graph.initializer:
        location = {e.key: e.value for e in t.external_data}.get("location")
        if t.data_location == onnx.TensorProto.EXTERNAL and (
                location is None or (Path(manifest.model).parent / location).as_posix() not in listed):
            problems.append(f"graph reads external data {location!r}, which is not a listed file of the bundle")
            break
    if graph_ops(model) != sorted(manifest.ops):
        problems.append("graph ops differ from the manifest's op list")
    return problems


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, check: bool = True) -> Bundle:
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

    def file(self, rel: str) -> Path:
        """The path of a listed file, checked (even with check=False) to be a regular file inside the bundle."""
        try:
            _open_listed(self.path, rel).close()
        except FileNotFoundError:
            raise EdgeError(f"{self.path}: missing file {_show(rel)}") from None
        except OSError as e:
            raise EdgeError(f"{self.path}: {_show(rel)}: cannot read ({e.strerror})") from None
        except EdgeError as e:
            raise EdgeError(f"{self.path}: {e}") from None
        return self.path / rel

    @property
    def model_path(self) -> Path:
        if self.manifest.model is None:
            raise EdgeError(f"{self.path}: a {self.manifest.target} bundle has no ONNX model to run here")
        return self.file(self.manifest.model)

    def session(self, threads: int = 0, chunk: int | None = None, batch: int = 1):
        """A DecoderSession with the manifest's runtime settings: its execution providers that this
        onnxruntime has (in the manifest's order, with their options), its intra-op threads unless
        `threads` is given, and its `session.*` config entries."""
        import onnxruntime as ort

        from .session import DecoderSession, SessionConfig

        model = self.model_path
        rt = self.manifest.runtime
        have = set(ort.get_available_providers())
        providers = tuple((p, rt.provider_options[p]) if rt.provider_options.get(p) else p
                          for p in rt.providers if p in have)
        config = SessionConfig(threads or rt.threads, providers or ("CPUExecutionProvider",), chunk, rt.config_entries)
        return DecoderSession(model, batch, config)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        tok = self.manifest.tokenizer
        return Tokenizer.from_files({tok.file: self.file(tok.file)}, bos_id=tok.bos_id, eos_ids=tok.eos_ids)
