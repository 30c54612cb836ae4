"""Property test over hostile manifests: random edits of a valid manifest.json (with its digest
rewritten or not), and random byte flips, given to read_manifest, verify, Bundle.open and inspect
give OK or one EdgeError line, never another exception. Small budget: a few seconds in CI."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import SPM_V1, checkpoint_of, tiny_hf_mistral
from mistral_edge.cli.bundle import inspect
from mistral_edge.errors import EdgeError
from mistral_edge.manifest import content_digest
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.bundle import Bundle, read_manifest, verify
from mistral_edge.targets.bundle import BundleRequest, write_bundle
from mistral_edge.targets.profiles import get_target

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    ck = checkpoint_of(tiny_hf_mistral(window=16, vocab=32000, dim=32))
    ck.tokenizer_files = {"tokenizer.model": SPM_V1}
    out = tmp_path_factory.mktemp("fuzz") / "b"
    write_bundle(ck, BundleRequest(get_target("cpu"), parse_quant("int8")), out, log=lambda _: None)
    original = json.loads((out / "manifest.json").read_text())
    assert verify(out) == []
    return out, original


def paths(value, prefix=()):
    """Every place in a JSON tree: key paths to each member and element."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def mutate(manifest: dict, data) -> dict:
    m = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(list(paths(m)) or [()]))
        if not where:
            break
        parent = m
        for key in where[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[where[-1]] = data.draw(JSON)
        elif op == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
        else:
            parent.append(data.draw(JSON))
    if data.draw(st.booleans()) and isinstance(m, dict) and "manifest_sha256" in m:  # as a forger would
        try:
            m["manifest_sha256"] = content_digest({k: v for k, v in m.items() if k != "manifest_sha256"})
        except EdgeError:  # NaN or infinity: no canonical form, leave the old digest
            pass
    return m


def one_line_or_ok(action) -> None:
    try:
        action()
    except EdgeError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_give_one_line_or_ok(bundle, data):
    path, original = bundle
    text = json.dumps(mutate(original, data))
    raw = text.encode()
    if data.draw(st.booleans()):
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), max_size=3))
        raw = bytearray(raw)
        for i, x in flips:
            raw[i] ^= x
        raw = bytes(raw)
    (path / "manifest.json").write_bytes(raw)
    one_line_or_ok(lambda: read_manifest(path))
    one_line_or_ok(lambda: verify(path))
    one_line_or_ok(lambda: Bundle.open(path).tokenizer())
    with contextlib.redirect_stdout(io.StringIO()):
        one_line_or_ok(lambda: inspect(path))


def test_the_digest_ignores_formatting(bundle):
    """manifest_sha256 covers the canonical JSON, not the bytes: re-indented and key-reordered, it verifies."""
    path, original = bundle
    (path / "manifest.json").write_text(json.dumps(dict(reversed(list(original.items()))), indent=1))
    assert verify(path) == []
