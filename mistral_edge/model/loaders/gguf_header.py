"""A GGUF file's header (metadata and tensor list), read with every count and length checked against
the bytes left before anything is read or allocated for it.

gguf's own GGUFReader trusts the counts (an array claiming 2^62 items loops past the end of the
file without bound), so the header is read here and the `gguf` package serves only for its type
tables and dequantization kernels. Metadata values become Python values: int, float, bool, str (bytes
for a string that is not UTF-8) and lists of them, so a reader can check their types.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ...errors import EdgeError
from ..config import brief

VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_ARRAY_NESTING = 2

V = GGUFValueType
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_MIN_SIZE = {**{t: struct.calcsize("<" + f) for t, f in _SCALARS.items()}, V.STRING: 8, V.ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """In torch order, outermost first (GGUF lists dimensions innermost first)."""
    ggml_type: GGMLQuantizationType
    offset: int
    """Absolute byte offset of the data in the file."""
    n_bytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]
    tensors: dict[str, TensorInfo]
    data_offset: int


class _Corrupt(Exception):
    pass


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes):
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise _Corrupt(f"{n} bytes wanted at offset {self.pos}, {self.left()} left")
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def count(self, item_size: int, what: str) -> int:
        """A u64 count of items of at least `item_size` bytes each, which must fit in what is left."""
        n = self.unpack("Q")
        if n * item_size > self.left():
            raise _Corrupt(f"{what} claims {n} items, more than the {self.left()} bytes left hold")
        return n

    def string(self) -> str | bytes:
        raw = self.take(self.count(1, "a string"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def name(self, what: str) -> str:
        s = self.string()
        if isinstance(s, bytes):
            raise _Corrupt(f"a {what} is not UTF-8")
        return s

    def value(self, raw_type: int, depth: int = 0):
        try:
            kind = V(raw_type)
        except ValueError:
            raise _Corrupt(f"unknown metadata value type {raw_type}") from None
        if kind == V.STRING:
            return self.string()
        if kind != V.ARRAY:
            return self.unpack(_SCALARS[kind])
        item = self.unpack("I")
        try:
            item_kind = V(item)
        except ValueError:
            raise _Corrupt(f"unknown metadata array type {item}") from None
        n = self.count(_MIN_SIZE[item_kind], "an array")
        if item_kind in _SCALARS:  # read at once: n items of a fixed size
            fmt = _SCALARS[item_kind]
            return np.frombuffer(self.take(n * _MIN_SIZE[item_kind]), dtype="<" + fmt).tolist()
        if item_kind == V.ARRAY and depth >= MAX_ARRAY_NESTING:
            raise _Corrupt("metadata arrays nested too deeply")
        return [self.value(item, depth + 1) for _ in range(n)]


def _tensor(c: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
    name = c.name("tensor name")
    n_dims = c.unpack("I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Corrupt(f"tensor {brief(name)} has {n_dims} dimensions")
    dims = [c.unpack("Q") for _ in range(n_dims)]
    raw = c.unpack("I")
    try:
        kind = GGMLQuantizationType(raw)
        block, type_size = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {brief(name)} has unknown type {raw}") from None
    if min(dims) < 1 or dims[0] % block:
        raise _Corrupt(f"tensor {brief(name)} has dimensions {dims} (rows must be whole {block}-value blocks)")
    n_elements = 1
    for d in dims:
        n_elements *= d
    return name, tuple(reversed(dims)), kind, c.unpack("Q"), n_elements // block * type_size


def _parse(c: _Cursor, size: int) -> Header:
    version = c.unpack("I")
    if version not in VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
            raise EdgeError("big-endian GGUF files are not supported")
        raise EdgeError(f"GGUF version {version} is not supported (expected {' or '.join(map(str, VERSIONS))})")
    n_tensors, n_kv = c.unpack("Q"), c.unpack("Q")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > c.left():
        raise _Corrupt(f"{n_kv} metadata entries and {n_tensors} tensors do not fit in {c.left()} bytes")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = c.name("metadata key")
        if key in metadata:
            raise _Corrupt(f"metadata key {brief(key)} appears twice")
        metadata[key] = c.value(c.unpack("I"))
    infos = [_tensor(c) for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {brief(alignment)} is not a power of two")
    data_offset = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, kind, offset, n_bytes in infos:
        if name in tensors:
            raise _Corrupt(f"tensor {brief(name)} appears twice")
        if offset % alignment or data_offset + offset + n_bytes > size:
            raise _Corrupt(f"tensor {brief(name)} lies outside the file (offset {offset}, {n_bytes} bytes)")
        tensors[name] = TensorInfo(name, shape, kind, data_offset + offset, n_bytes)
    return Header(metadata, tensors, data_offset)


def read_header(path: Path) -> Header:
    """The header of the GGUF file at `path`; a file that is not one, or is cut short, is an EdgeError."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EdgeError(f"{path}: not a readable GGUF file (it does not start with 'GGUF')")
            size = f.seek(0, 2)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                c = _Cursor(buf)
                c.pos = 4
                try:
                    return _parse(c, size)
                except EdgeError as e:
                    raise EdgeError(f"{path}: {e}") from None
    except _Corrupt as e:
        raise EdgeError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    except (OSError, ValueError) as e:
        raise EdgeError(f"{path}: cannot read ({e})") from None
