"""Property test over the readers of untrusted files: a small valid checkpoint in each format, mutated and
cut at random (safetensors headers, GGUF headers and metadata, config/params/shard-index JSON), either loads
(every tensor then reads) or fails with one EdgeError of one line; never another exception, and never more
memory than a small file can justify."""

import json
import os
import shutil
import struct
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import save_gguf, save_mistral_inference, tiny_hf_mistral
from mistral_edge.errors import EdgeError
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.loaders.gguf_header import read_header

FUZZ = settings(max_examples=int(os.environ.get("MISTRAL_EDGE_FUZZ_EXAMPLES", 25)), deadline=timedelta(seconds=10),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_BOUND = 32 * 2**20
"""Python-level peak allocation per load: the valid files are a few kilobytes.

MISTRAL_EDGE_FUZZ_EXAMPLES sets the examples per test (25 in CI: seconds; thousands for a deep run)."""


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid")
    model = tiny_hf_mistral(n_heads=2, n_kv_heads=1, dim=16, layers=1, vocab=32, window=8)
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "sharded", max_shard_size="2KB")
    save_mistral_inference(model, root / "mi")
    (root / "gguf").mkdir()
    save_gguf(model, root / "gguf" / "m.gguf")
    return root


def load_or_fail_cleanly(spec: Path) -> None:
    tracemalloc.start()
    try:
        ck = load_checkpoint(str(spec))
        for name in ck.weights:
            ck.weights[name]
    except EdgeError as e:
        assert str(e) and "\n" not in str(e), repr(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB"


def mutated_copy(valid: Path, directory: str, file: str, data: bytes, scratch: Path) -> Path:
    target = scratch / directory
    shutil.copytree(valid / directory, target)
    (target / file).write_bytes(data)
    return target / file if file.endswith(".gguf") else target


# --- mutations ----------------------------------------------------------------------------------------

INTERESTING_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 16, 2**31 - 1, 2**32, 10**9, 2**62, 2**63, 2**64 - 1])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INTERESTING_INTS | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "I64", "MistralForCausalLM", "model.safetensors", "../x.safetensors"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(obj: dict, depth: int = 2) -> list[tuple[str, ...]]:
    out = []
    for key, value in obj.items():
        out.append((key,))
        if depth > 1 and isinstance(value, dict):
            out += [(key, *p) for p in _paths(value, depth - 1)]
    return out


@st.composite
def mutated_json(draw, obj: dict) -> dict:
    """`obj` with one to three values replaced, deleted or added (up to two levels down)."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(obj))) if obj else ("x",)
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return obj


@st.composite
def mutated_bytes(draw, data: bytes, region: int) -> bytes:
    """`data` with bytes or 8-byte integers overwritten within its first `region` bytes, and maybe cut."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, min(region, len(out)) - 1))
        if draw(st.booleans()):
            out[pos] = draw(st.integers(0, 255))
        else:
            out[pos:pos + 8] = struct.pack("<Q", draw(INTERESTING_INTS.filter(lambda n: 0 <= n < 2**64)))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def mutated_safetensors(draw, data: bytes) -> bytes:
    """A header whose JSON is mutated (dtypes, shapes, offsets), or raw bytes of the header mutated."""
    header, body = _safetensors_parts(data)
    if draw(st.booleans()):
        text = json.dumps(draw(mutated_json(header))).encode()
        return struct.pack("<Q", len(text)) + text + body
    return draw(mutated_bytes(data, 8 + len(json.dumps(header)) + 16))


# --- the properties -----------------------------------------------------------------------------------

def _first_shard(valid: Path) -> str:
    return sorted(p.name for p in (valid / "sharded").glob("model-*.safetensors"))[0]


@pytest.mark.parametrize("directory, file", [("hf", "config.json"), ("sharded", "model.safetensors.index.json"),
                                             ("mi", "params.json")])
@FUZZ
@given(data=st.data())
def test_json_files(valid, directory, file, data):
    original = (valid / directory / file).read_bytes()
    if data.draw(st.integers(0, 4)):
        new = json.dumps(data.draw(mutated_json(json.loads(original)))).encode()
    else:
        new = data.draw(mutated_bytes(original, len(original)))
    with tempfile.TemporaryDirectory() as scratch:
        load_or_fail_cleanly(mutated_copy(valid, directory, file, new, Path(scratch)))


@pytest.mark.parametrize("directory, file", [("hf", "model.safetensors"), ("sharded", None),
                                             ("mi", "consolidated.safetensors")])
@FUZZ
@given(data=st.data())
def test_safetensors_files(valid, directory, file, data):
    file = file or _first_shard(valid)
    new = data.draw(mutated_safetensors((valid / directory / file).read_bytes()))
    with tempfile.TemporaryDirectory() as scratch:
        load_or_fail_cleanly(mutated_copy(valid, directory, file, new, Path(scratch)))


@FUZZ
@given(data=st.data())
def test_gguf_files(valid, data):
    path = valid / "gguf" / "m.gguf"
    original = path.read_bytes()
    new = data.draw(mutated_bytes(original, read_header(path).data_offset + 64))
    with tempfile.TemporaryDirectory() as scratch:
        load_or_fail_cleanly(mutated_copy(valid, "gguf", "m.gguf", new, Path(scratch)))
