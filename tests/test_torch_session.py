"""TorchSession's kv_cache: the torch backend storing keys and values as an exported bundle does."""

import numpy as np
import pytest
import torch

from mistral_edge.cli.generate import RunOptions, open_checkpoint
from mistral_edge.errors import EdgeError
from mistral_edge.export.pipeline import export_onnx
from mistral_edge.model.cache import STORAGE
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.model.torch_session import TorchSession
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from helpers import checkpoint_of, tiny_hf_mistral, write_tiny_hf_dir

W, SINKS, CHUNK = 16, 2, 5
STEPS = [(5, [5, 3]), (1, [1, 1]), (7, [7, 7]), (5, [5, 2]), (1, [1, 1]), (1, [1, 1])]
"""(chunk, valid lengths of 2 rows): padding, decode, and past W - sinks so the ring wraps."""


@pytest.fixture(scope="module")
def ck():
    return checkpoint_of(tiny_hf_mistral(window=W, vocab=128, dim=32, seed=3))


def run(session, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [session.step(rng.integers(0, 128, (2, c)), np.array(v), all_logits=True).copy() for c, v in STEPS]


def valid_rows(outs: list[np.ndarray]):
    for (_, valid), out in zip(STEPS, outs):
        for row, n in enumerate(valid):
            yield out[row, :n]


@pytest.mark.parametrize("kv_cache", ["int8", "fp16"])
def test_torch_session_stores_the_bundle_cache_type(ck, tmp_path, kv_cache):
    """A kv_cache session holds its cache in that type (int8: codes and fp16 scales), computes what
    the reference does over that cache, differs from the fp32-cache session (the storage is real,
    not a label), and agrees with the ONNX graph exported with the same --kv-cache."""
    model = ReferenceModel(ck.config, ck.weights)
    session = TorchSession(model, W, CHUNK, batch=2, sinks=SINKS, kv_cache=kv_cache)
    got = run(session)
    names = session.cache_names()
    stored = session.read_row(0, W)
    if kv_cache == "int8":
        assert session.cache_dtype == np.int8 and names[:4] == ["key.0", "value.0", "key_scale.0", "value_scale.0"]
        assert stored["key_scale.0"].dtype == np.float16 and stored["key_scale.0"].shape[-1] == 1
    else:
        assert session.cache_dtype == np.float16 and names[:2] == ["key.0", "value.0"]
    assert stored["key.0"].dtype == session.cache_dtype and len(names) == len(stored)

    cache = model.new_cache(2, W, SINKS, kv_cache)
    rng = np.random.default_rng(0)
    want = [model.forward(torch.as_tensor(rng.integers(0, 128, (2, c))), cache, torch.tensor(v)).numpy()
            for c, v in STEPS]
    for g, w in zip(valid_rows(got), valid_rows(want)):
        np.testing.assert_array_equal(g, w)

    plain = run(TorchSession(model, W, CHUNK, batch=2, sinks=SINKS))
    assert max(abs(g - p).max(initial=0) for g, p in zip(valid_rows(got), valid_rows(plain))) > 1e-6

    path = tmp_path / "m.onnx"
    export_onnx(ck, parse_quant("fp32"), path, window=W, chunk=CHUNK, sinks=SINKS, kv_cache=kv_cache)
    bundle = run(DecoderSession(path, batch=2, config=SessionConfig(threads=1, kernel="off")))
    for g, b in zip(valid_rows(got), valid_rows(bundle)):
        np.testing.assert_allclose(g, b, rtol=0, atol=1e-4)


def test_a_row_of_an_int8_cache_moves_with_its_scales(ck):
    """read_row / write_row carry the codes and their scales: a fresh session given row 1 of another
    continues that conversation (up to float rounding: the rows share their batched products with
    different neighbours)."""
    model = ReferenceModel(ck.config, ck.weights)
    a = TorchSession(model, W, CHUNK, batch=2, sinks=SINKS, kv_cache="int8")
    run(a)
    position = int(a.positions[1])
    b = TorchSession(model, W, CHUNK, batch=2, sinks=SINKS, kv_cache="int8")
    b.write_row(0, a.read_row(1, min(position, W)), position)
    token = np.array([[7], [9]])
    want = a.step(token[::-1].copy(), np.array([1, 1])).copy()[1]
    np.testing.assert_allclose(b.step(token, np.array([1, 0]))[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_cache", ["int8", "fp16", None])
def test_the_command_line_opens_the_torch_backend_with_its_kv_cache(tmp_path, kv_cache):
    """RunOptions' --kv-cache reaches the session `generate`, `chat` and `serve --model` open."""
    gen = open_checkpoint(RunOptions(model=str(write_tiny_hf_dir(tmp_path, W)), kv_cache=kv_cache))[0]
    assert gen.session.kv_cache == kv_cache
    assert gen.session.cache.store_dtype == (STORAGE[kv_cache] if kv_cache else torch.float32)
    assert len(gen.session.cache.k_scale) == (len(gen.session.cache.k) if kv_cache == "int8" else 0)


def test_unknown_kv_cache_is_one_error(ck):
    with pytest.raises(EdgeError, match="unknown KV cache type 'int4'"):
        TorchSession(ReferenceModel(ck.config, ck.weights), W, CHUNK, kv_cache="int4")
