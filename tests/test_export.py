"""The exported decoder-step graph equals the reference model, for every quant level and format."""

import numpy as np
import pytest
import torch

from mistral_edge.errors import EdgeError
from mistral_edge.export.decoder import unfuse
from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import Builder
from mistral_edge.export.decoder import build_decoder
from mistral_edge.export.pipeline import export_onnx, quant_plan, resolve_window
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from helpers import checkpoint_of, tiny_hf_mistral

W = 16


def run_chunks(session: DecoderSession, tokens: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([session.step(tokens[:, s:s + chunk], all_logits=True).copy()
                           for s in range(0, tokens.shape[1], chunk)], 1)


def tokens_for(ck, n, seed=0):
    return torch.randint(0, ck.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("chunk", [1, 5, W])
def test_fp32_graph_matches_reference(tmp_path, kv_heads, chunk):
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=kv_heads, window=W))
    tokens = tokens_for(ck, 4 * W + 3)
    ref = ReferenceModel(ck.config, ck.weights)
    expected = ref.prefill(tokens, ref.new_cache(), chunk).numpy()
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=chunk)
    got = run_chunks(DecoderSession(tmp_path / "m.onnx"), tokens.numpy(), chunk)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4-g32", "int4-g64-sym-rtn", "int4-g128"])
def test_quantized_graph_matches_reference_on_its_weights(tmp_path, quant, fmt, tied):
    """The graph computes exactly with the dequantized weights (accuracy_level 0: fp32 compute)."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    spec = parse_quant(quant)
    emitter = WeightEmitter(Builder(), quant_plan(ck, spec), fmt, accuracy_level=0)
    model = build_decoder(ck.config, ck.weights, W, 5, emitter)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    weights = {**ck.weights, **unfuse(ck.config, emitter.dequantized)}
    assert emitter.dequantized, "a quantized export must record what it quantized"
    ref = ReferenceModel(ck.config, weights)
    tokens = tokens_for(ck, 4 * W)
    expected = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    # ORT turns DequantizeLinear+MatMul into MatMulNBits with int8 compute unless told not to
    exact = SessionConfig(entries=(("session.qdq_matmulnbits_accuracy_level", "0"),))
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=exact), tokens.numpy(), 5)
    assert np.abs(got - expected).max() < 1e-4


def test_batch_of_two_different_lengths(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=6)
    a, b = tokens_for(ck, 3 * W + 5, 1)[0].tolist(), tokens_for(ck, 2 * W + 1, 2)[0].tolist()
    session = DecoderSession(tmp_path / "m.onnx", batch=2)
    last = {}
    for s in range(0, len(a), 6):
        pieces = [a[s:s + 6], b[s:s + 6]]
        tokens = np.zeros((2, 6), np.int64)
        for i, p in enumerate(pieces):
            tokens[i, :len(p)] = p
        valid = np.array([len(p) for p in pieces])
        logits = session.step(tokens, valid)
        for i in np.nonzero(valid)[0]:
            last[i] = logits[i, 0].copy()
    ref = ReferenceModel(ck.config, ck.weights)
    for i, seq in enumerate((a, b)):
        expected = ref.prefill(torch.tensor([seq]), ref.new_cache(), 6)[0, -1].numpy()
        assert np.abs(last[i] - expected).max() < 1e-4
    # the shorter row stopped advancing when its tokens ran out
    assert session.positions.tolist() == [len(a), len(b)]


def test_cache_is_updated_in_place_without_copies(tmp_path, capfd):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4)
    session = DecoderSession(tmp_path / "m.onnx")
    tokens = tokens_for(ck, 3 * W).numpy()
    run_chunks(session, tokens[:, :W], 4)  # the cache has grown to its final W slots
    before = {k: v.data_ptr() for k, v in session.cache.items()}
    first = session.cache["key.0"].numpy().copy()
    run_chunks(session, tokens[:, W:], 4)
    session.step(np.array([[3]]))
    err = capfd.readouterr().err
    assert "in-place optimization not activated" not in err
    assert {k: v.data_ptr() for k, v in session.cache.items()} == before
    assert not np.array_equal(session.cache["key.0"].numpy(), first)  # the bound buffer itself changed
    cfg = ck.config
    assert session.cache_bytes == cfg.n_layers * 2 * 1 * cfg.n_kv_heads * W * cfg.head_dim * 4


def test_cache_grows_to_the_window_with_the_same_logits(tmp_path, monkeypatch):
    """A session whose cache starts small and grows gives the logits of one that starts at W slots."""
    from mistral_edge.runtime import session as session_mod

    window = 40
    ck = checkpoint_of(tiny_hf_mistral(window=window))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=window, chunk=5)
    tokens = tokens_for(ck, 3 * window).numpy()
    monkeypatch.setattr(session_mod, "GROW", window)
    full = DecoderSession(tmp_path / "m.onnx")
    monkeypatch.setattr(session_mod, "GROW", 16)
    growing = DecoderSession(tmp_path / "m.onnx")
    assert growing.slots == 0
    sizes = []
    for s in range(0, tokens.shape[1], 5):
        a, b = full.step(tokens[:, s:s + 5]).copy(), growing.step(tokens[:, s:s + 5])
        assert np.abs(a - b).max() < 1e-5
        sizes.append(growing.slots)
    assert full.slots == window and sorted(set(sizes)) == [16, 32, window]
    growing.reset()
    assert growing.slots == 0 and growing.positions.tolist() == [0]


def test_unbound_cache_would_copy(tmp_path, capfd):
    """The in-place test above can fail: plain run() without shared buffers makes ORT copy."""
    import onnxruntime as ort

    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4)
    s = ort.InferenceSession(str(tmp_path / "m.onnx"))
    cfg = ck.config
    feeds = {"input_ids": np.array([[1]]), "positions": np.array([0]), "valid_lens": np.array([1]),
             "logits_index": np.array([[0]])}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, cfg.n_kv_heads, W, cfg.head_dim), np.float32)
    s.run(None, feeds)
    assert "in-place optimization not activated" in capfd.readouterr().err


@pytest.mark.parametrize("window,chunk,message", [
    (0, None, "window must be a positive integer"),
    (-4, None, "window must be a positive integer"),
    (16, 0, "chunk size must be between 1 and the window"),
    (16, -1, "chunk size must be between 1 and the window"),
    (16, 17, "chunk size must be between 1 and the window"),
])
def test_bad_window_or_chunk(window, chunk, message):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    with pytest.raises(EdgeError, match=message):
        resolve_window(ck, window, chunk)


def test_runtime_chunk_override_checked(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4)
    assert DecoderSession(tmp_path / "m.onnx", config=SessionConfig(chunk=8)).chunk == 8
    with pytest.raises(EdgeError, match="chunk size must be between 1 and the window W=16"):
        DecoderSession(tmp_path / "m.onnx", config=SessionConfig(chunk=17))
    with pytest.raises(EdgeError, match="chunk of 17 tokens"):
        DecoderSession(tmp_path / "m.onnx").step(np.zeros((1, 17), np.int64))


def test_unknown_weight_format(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    with pytest.raises(EdgeError, match="unknown weight format"):
        export_onnx(ck, parse_quant("int8"), tmp_path / "m.onnx", fmt="zip")
