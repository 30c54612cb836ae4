"""Reading what a model's files say without trusting them: bounded sizes, strict UTF-8 and JSON,
and values of exactly the type expected (a bool is not an integer, a string is not a list).

Every failure is an EdgeError of one line naming the file and the key.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ...errors import EdgeError, first_line
from ..config import brief, is_int

MAX_TEXT_BYTES = 64 * 2**20
"""Config files, shard indexes, tokenizer configs and chat templates: kilobytes to a few megabytes."""

_MISSING = object()


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A regular file's UTF-8 text, at most `limit` bytes (a FIFO or device is refused, never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise EdgeError(f"{path}: cannot open ({first_line(e)})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EdgeError(f"{path}: not a regular file")
        try:  # sized from fstat: read(limit) would allocate the whole limit up front
            data = f.read(min(info.st_size, limit) + 1)
        except OSError as e:
            raise EdgeError(f"{path}: cannot read ({first_line(e)})") from None
    if len(data) > limit:
        raise EdgeError(f"{path}: larger than {limit // 2**20} MiB, too large for a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_json(path: Path) -> object:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise EdgeError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal of more digits than Python converts
        raise EdgeError(f"{path}: invalid JSON ({first_line(e)})") from None


def read_json_object(path: Path) -> dict:
    """A config file's JSON object, or a one-line EdgeError."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise EdgeError(f"{path}: expected a JSON object")
    return data


class Fields:
    """Typed reads of one file's key -> value pairs (a JSON object, GGUF metadata).

    A key that is absent or null takes `default`; with no default it is an error, as is a value
    of another type. `where` names the file in messages."""

    def __init__(self, values: Mapping[str, object], where: str):
        self.values, self.where = values, where

    def _get(self, key: str, default: object, ok, what: str):
        value = self.values.get(key)
        if value is None:
            if default is _MISSING:
                raise EdgeError(f"{self.where} is missing key {key!r}")
            return default
        if not ok(value):
            raise EdgeError(f"{self.where}: {key} must be {what}, got {brief(value)}")
        return value

    def integer(self, key: str, default: object = _MISSING):
        return self._get(key, default, is_int, "an integer")

    def number(self, key: str, default: object = _MISSING):
        value = self._get(key, default, lambda v: is_int(v) or isinstance(v, float), "a number")
        return value if value is None else float(value)

    def string(self, key: str, default: object = _MISSING):
        return self._get(key, default, lambda v: isinstance(v, str), "a string")

    def boolean(self, key: str, default: object = _MISSING):
        return self._get(key, default, lambda v: isinstance(v, bool), "true or false")

    def mapping(self, key: str, default: object = _MISSING):
        return self._get(key, default, lambda v: isinstance(v, dict), "an object")

    def strings(self, key: str, default: object = _MISSING):
        return self._get(key, default, lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                         "a list of strings")

    def numbers(self, key: str, default: object = _MISSING):
        return self._get(key, default, lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v),
                         "a list of numbers")

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One id or a list of them (HF's eos_token_id), as a tuple; absent: ()."""
        value = self._get(key, (), lambda v: is_int(v) or (isinstance(v, list) and all(map(is_int, v))),
                          "a token id or a list of them")
        return tuple(value) if isinstance(value, list) else (value,) if is_int(value) else value
