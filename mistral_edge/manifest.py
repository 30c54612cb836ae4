"""The bundle manifest (manifest.json) as typed frozen dataclasses, shared by the writer (targets/)
and the reader (runtime/); torch-free, so a device can check a bundle before running it.

`Manifest.from_json` validates the whole document: every field and nested field, its JSON type,
and the rules between them (chunk within the window, the model and tokenizer among the listed
files, file paths inside the bundle), raising one EdgeError line on the first defect, so no
reader meets a KeyError later. `manifest_sha256` is the sha256 of the canonical JSON of every
other field: a hand edit to settings, the chat template or eos ids no longer matches it, and
since the field covers the files' hashes too, this one value identifies the whole bundle
(docs/bundle-format.md, "Trust").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Union

from .contract import KV_CACHES
from .errors import EdgeError
from .model.config import ModelConfig

FORMAT_VERSION = 2
"""A reader refuses any other (version 1 bundles had no manifest_sha256: export again)."""
MANIFEST = "manifest.json"
TOOLKIT = "mistral-edge"
MAX_MANIFEST_BYTES = 16 << 20
"""Read no more than this: a real manifest, chat template included, is a few tens of kB."""
ACTIVATION_DTYPES = ("fp32", "fp16")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INT64 = 1 << 63

Scalar = Union[str, int, float, bool]
"""An onnxruntime option value as the target profiles write it."""


@dataclass(frozen=True)
class Toolkit:
    name: str
    version: str


@dataclass(frozen=True)
class Source:
    path: str  # path or Hub id of the checkpoint
    format: str  # hf | mistral | gguf
    sha256: str | None  # of the file, or of a directory's files; None for a Hub id


@dataclass(frozen=True)
class QuantInfo:
    spec: str  # the --quant spec, canonical form, or q4f16_1 (mlc)
    format: str  # nbits | qdq | integer | q4f16_1
    tensors: dict[str, str]  # scheme per tensor group, layer indices folded into '*'
    calibration: dict[str, str | int | float] | None = None  # export --calib: the text (name, sha256) and windows


@dataclass(frozen=True)
class RuntimeSettings:
    """How to open the model: execution providers in order of preference, their options, and
    onnxruntime session options (`intra_op_num_threads`, `session.*` config entries, others for apps)."""

    providers: tuple[str, ...]
    provider_options: dict[str, dict[str, Scalar]]
    session_options: dict[str, Scalar]
    converted_by: str | None = None  # a .ort model: the onnxruntime that wrote it (omitted otherwise)

    def __post_init__(self) -> None:
        threads = self.session_options.get("intra_op_num_threads", 0)
        if type(threads) is not int or not 0 <= threads <= 4096:
            raise EdgeError(f"session_options.intra_op_num_threads must be an integer from 0 to 4096, got {threads!r}")

    @property
    def threads(self) -> int:
        return self.session_options.get("intra_op_num_threads", 0)

    @property
    def config_entries(self) -> tuple[tuple[str, str], ...]:
        """The `session.*` options, as onnxruntime session config entries."""
        return tuple((k, _option_text(v)) for k, v in self.session_options.items() if k.startswith("session."))


def _option_text(value: Scalar) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class TokenizerInfo:
    file: str  # a listed file: tokenizer.json or tokenizer.model[.vN]
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None

    def __post_init__(self) -> None:
        if not (self.file == "tokenizer.json" or self.file.startswith("tokenizer.model")
                or self.file.endswith(".model")):
            raise EdgeError(f"file must be a tokenizer.json or a SentencePiece .model, got {self.file!r}")

    def check_ids(self, vocab_size: int) -> None:
        for token in (self.bos_id, *self.eos_ids):
            if token is not None and not 0 <= token < vocab_size:
                raise EdgeError(f"tokenizer token id {token} is outside the vocabulary (0 to {vocab_size - 1})")


@dataclass(frozen=True)
class GenerationDefaults:
    """What `generate` and `chat` use unless a flag says otherwise."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1: none

    def __post_init__(self) -> None:
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 0, ">= 0"),
                               ("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0")):
            if not ok:
                raise EdgeError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BudgetRecord:
    """targets/budget.py's MemoryBudget as recorded, with the device budget it was checked against."""

    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int
    device_usable_bytes: int | None  # None when no device budget was given

    def __post_init__(self) -> None:
        parts = (self.weight_bytes, self.kv_cache_bytes, self.activation_bytes, self.device_usable_bytes or 0)
        if min(parts) < 0 or self.total_bytes != sum(parts[:3]):
            raise EdgeError("byte counts must be >= 0 and total_bytes their sum")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated, inside the bundle
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_relpath(self.path)
        if self.bytes < 0 or not _SHA256.fullmatch(self.sha256):
            raise EdgeError(f"entry {self.path!r} needs bytes >= 0 and a 64-digit lowercase hex sha256")


@dataclass(frozen=True)
class Manifest:
    format_version: int
    toolkit: Toolkit
    target: str
    source: Source
    config: ModelConfig
    window: int  # W, the KV-cache slots
    chunk: int  # default prefill chunk C, 1 <= C <= W
    graph_contract: int
    model: str | None  # the model file, None for mlc
    quant: QuantInfo
    activation_dtype: str  # fp32 | fp16
    ops: tuple[str, ...]
    runtime: RuntimeSettings
    tokenizer: TokenizerInfo
    generation: GenerationDefaults
    memory_budget: BudgetRecord
    files: tuple[FileEntry, ...]  # every file but manifest.json, in path order
    sinks: int = 0  # of the W slots, how many hold the first positions for ever (docs/cache.md)
    kv_cache: str | None = None
    """The KV cache's storage (contract.KV_CACHES: fp32, fp16 or int8); None, in a manifest written before
    graph contract 4, reads as the activation type."""
    pool: int = 0  # of the W slots, how many keep the most-attended keys that left the ring (docs/cache.md)
    manifest_sha256: str | None = dataclasses.field(default=None, compare=False)
    """The digest as read from manifest.json; None for a manifest built in memory (to_json writes the true one)."""
    content_sha256: str | None = dataclasses.field(default=None, init=False, compare=False, repr=False)
    """The digest of what manifest.json holds, computed on read (over the JSON as parsed, so a value the
    types normalize, like 10000 for 10000.0, cannot hide an edit)."""

    def __post_init__(self) -> None:
        _check_version(self.format_version)
        if self.toolkit.name != TOOLKIT:
            raise EdgeError(f"written by {self.toolkit.name!r}, not {TOOLKIT}")
        if not 0 <= self.sinks < self.window:
            raise EdgeError(f"sinks {self.sinks} must be between 0 and the window {self.window} - 1")
        if not 0 <= self.pool < self.window - self.sinks:
            raise EdgeError(f"pool {self.pool} must be between 0 and the window {self.window} minus its sinks, minus 1")
        if not 0 < self.chunk <= self.window - self.sinks - self.pool:
            raise EdgeError(f"chunk {self.chunk} must be between 1 and the window {self.window} minus its sinks and pool")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise EdgeError(f"activation_dtype {self.activation_dtype!r}: expected one of {', '.join(ACTIVATION_DTYPES)}")
        if self.kv_cache is None:
            object.__setattr__(self, "kv_cache", self.activation_dtype)
        if self.kv_cache not in KV_CACHES:  # which types go together is the graph's to say (verify compares)
            raise EdgeError(f"kv_cache {self.kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths) or MANIFEST in paths:
            raise EdgeError("files lists a path twice, or manifest.json itself")
        self.tokenizer.check_ids(self.config.vocab_size)
        for role, name in (("model", self.model), ("tokenizer.file", self.tokenizer.file)):
            if name is not None and name not in paths:
                raise EdgeError(f"{role} {name!r} is not one of the listed (hashed) files")
        if self.manifest_sha256 is not None and not _SHA256.fullmatch(self.manifest_sha256):
            raise EdgeError("manifest_sha256 must be 64 lowercase hex digits")

    def digest(self) -> str:
        """manifest_sha256 of this manifest as to_json writes it."""
        return content_digest(self._body())

    @property
    def edited(self) -> bool:
        """The manifest read from a file no longer matches its own digest (edited since export)."""
        return self.manifest_sha256 is not None and self.manifest_sha256 != self.content_sha256

    def _body(self) -> dict:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.init and f.name != "manifest_sha256"}

    def to_json(self) -> dict:
        return {**self._body(), "manifest_sha256": self.digest()}

    @classmethod
    def from_json(cls, raw, source: str) -> Manifest:
        """Validate and type a parsed manifest.json; one EdgeError line (prefixed with `source`) on any defect."""
        try:
            if not isinstance(raw, dict):
                raise EdgeError("not a manifest object")
            _check_version(raw.get("format_version"))  # first: the clearest message for an old bundle
            if not isinstance(raw.get("manifest_sha256"), str):  # a manifest without it could say anything
                raise EdgeError("field 'manifest_sha256' is missing or not a string")
            manifest = _read(cls, raw, "")
        except EdgeError as e:
            raise EdgeError(f"{source}: {e}") from None
        object.__setattr__(manifest, "content_sha256", content_digest({k: v for k, v in raw.items() if k != "manifest_sha256"}))
        return manifest


def _check_version(version) -> None:
    if version != FORMAT_VERSION or type(version) is not int:
        raise EdgeError(f"unsupported bundle format version {repr(version)[:24]} "
                        f"(this toolkit reads version {FORMAT_VERSION}; export the model again)")


def content_digest(body: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of a manifest without its manifest_sha256."""
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError:  # read manifests have no NaN (the parser refuses it); a config in memory might
        raise EdgeError("a manifest value is NaN or infinite") from None
    return hashlib.sha256(text.encode()).hexdigest()


def check_relpath(path: str) -> None:
    """A listed path: relative, '/'-separated, no '.', '..' or empty parts, names the OS accepts."""
    parts = path.split("/")
    if (path.startswith("/") or "\\" in path or "\0" in path or len(path) > 1024
            or any(p in ("", ".", "..") for p in parts)):
        raise EdgeError(f"file {path!r} lies outside the bundle or is not a plain relative path")
    if any(len(p.encode()) > 255 for p in parts):
        raise EdgeError(f"file {path[:40]!r}...: a name longer than 255 bytes")


OMITTED_WHEN_NONE = ("converted_by", "calibration")
"""Optional fields left out of the JSON when unset (a bundle written without them reads the same)."""


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.name in OMITTED_WHEN_NONE and getattr(value, f.name) is None)}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


class _Mismatch(Exception):
    """The JSON value has the wrong type for this field (a Union tries its next member)."""


def _read(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`: a dataclass (fields typed by annotation), a Union,
    tuple[X, ...], dict[str, X], or a scalar; strict (a bool is not an int, no unknown keys)."""
    try:
        return _read_one(tp, value, where)
    except _Mismatch:
        raise EdgeError(f"field {where or 'manifest'!r} is missing or not {_describe(tp)}") from None


def _read_one(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        for key in value:
            if key not in fields:
                raise EdgeError(f"field {_join(where, _safe(key))!r} is not part of bundle format {FORMAT_VERSION}")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _read(hints[name], value[name], _join(where, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise EdgeError(f"field {_join(where, name)!r} is missing or not {_describe(hints[name])}")
        try:
            return tp(**kwargs)
        except EdgeError as e:
            raise EdgeError(f"{where}: {e}" if where else str(e)) from None
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _read_one(arg, value, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch
        return tuple(_read(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_safe(k): _read(args[1], v, _join(where, _safe(k))) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if tp in (bool, str) and type(value) is tp:
        return _safe(value) if tp is str else value
    if tp is int and type(value) is int:
        if not -_INT64 < value < _INT64:
            raise EdgeError(f"field {where!r} is out of range ({str(value)[:20]}...)")
        return value
    if tp is float and type(value) in (int, float):
        if not math.isfinite(value):
            raise EdgeError(f"field {where!r} is not a finite number")
        return float(value)
    raise _Mismatch


def _safe(text: str) -> str:
    """A string that can be printed and used as a path: no lone surrogates (JSON allows '\\ud800')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeError(f"string {text[:40]!r} is not valid Unicode") from None
    return text


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "an object"
    if origin is tuple:
        return "an array"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}[tp]
