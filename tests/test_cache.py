"""Attention sinks: the reference cache against an independent dense computation of the same
attention pattern, the exported graph against the reference, the cache updated in place and its
memory fixed by W (docs/cache.md)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FP16_TOL, assert_close, checkpoint_of, tiny_hf_mistral

from mistral_edge.contract import GraphInfo
from mistral_edge.errors import EdgeError
from mistral_edge.export.pipeline import DEFAULT_WINDOW, export_onnx, resolve_pool, resolve_sinks, resolve_window
from mistral_edge.model.reference import ReferenceModel, apply_rope, rms_norm, rope_tables
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig

W, S = 16, 3


def dense_logits(ck, tokens: list[int], window: int, sinks: int) -> torch.Tensor:
    """[T, V] logits of one sequence with full-sequence attention under the mask built here from
    positions alone (no cache, no slots): key k is seen by query q when k <= q and k is one of
    the first `sinks` positions or one of the last window - sinks ones."""
    c, w = ck.config, {k: v.float() for k, v in ck.weights.items()}
    T = len(tokens)
    q_pos, k_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (k_pos <= q_pos) & ((k_pos < sinks) | (q_pos - k_pos < window - sinks))
    cos, sin = rope_tables(torch.arange(T)[None], c.head_dim, c.rope_theta)
    h = F.embedding(torch.tensor([tokens]), w["tok_embeddings.weight"])
    for i in range(c.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], c.norm_eps)
        heads = [(x @ w[p + f"attention.{n}.weight"].T).view(1, T, -1, c.head_dim).transpose(1, 2)
                 for n in ("wq", "wk", "wv")]
        q, k = apply_rope(heads[0], cos, sin), apply_rope(heads[1], cos, sin)
        k, v = k.repeat_interleave(c.gqa_ratio, 1), heads[2].repeat_interleave(c.gqa_ratio, 1)
        scores = (q @ k.transpose(-1, -2) * c.head_dim ** -0.5).masked_fill(~mask, float("-inf"))
        h = h + (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, T, -1) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], c.norm_eps)
        h = h + (F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)) \
            @ w[p + "feed_forward.w2.weight"].T
    return (rms_norm(h, w["norm.weight"], c.norm_eps) @ w["output.weight"].T)[0]


@pytest.fixture(scope="module")
def ck():
    return checkpoint_of(tiny_hf_mistral(window=W))


def sequences(n: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 128, (length,), generator=g).tolist() for length in lengths]


def batched(a: list[int], b: list[int], chunk: int):
    """(tokens [2, chunk], valid lengths) feeding two rows of different lengths `chunk` at a time,
    the shorter one padded, then idle (no valid token)."""
    for s in range(0, len(a), chunk):
        pieces = [a[s:s + chunk], b[s:s + chunk]]
        tokens = np.zeros((2, chunk), np.int64)
        for i, p in enumerate(pieces):
            tokens[i, :len(p)] = p
        yield tokens, np.array([len(p) for p in pieces])


@pytest.mark.parametrize("sinks", [0, 1, S])
@pytest.mark.parametrize("chunk", [1, 5, W - S])
def test_reference_equals_the_dense_pattern_with_batch_and_padding(ck, sinks, chunk):
    """Two rows of different lengths (the shorter one padded, then idle) fed in chunks."""
    a, b = sequences(chunk, [4 * W + 3, 2 * W + 1])
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache(batch=2, window=W, sinks=sinks)
    got = [[], []]
    for tokens, valid in batched(a, b, chunk):
        logits = ref.forward(torch.from_numpy(tokens), cache, torch.from_numpy(valid))
        for i, n in enumerate(valid.tolist()):
            got[i].append(logits[i, :n])
    for seq, rows in zip((a, b), got):
        expected = dense_logits(ck, seq, W, sinks)
        assert torch.abs(torch.cat(rows) - expected).max() < 1e-4
    assert cache.pos.tolist() == [len(a), len(b)]


def test_sinks_change_what_is_seen_past_the_window(ck):
    """The oracle's oracle can fail: past W, the sink pattern differs from the plain window."""
    seq = sequences(0, [2 * W])[0]
    with_sinks, plain = dense_logits(ck, seq, W, S), dense_logits(ck, seq, W, 0)
    assert torch.abs(with_sinks[:W] - plain[:W]).max() < 1e-5
    assert torch.abs(with_sinks[W:] - plain[W:]).max() > 1e-2


@pytest.mark.parametrize("activations", ["fp32", "fp16"])
@pytest.mark.parametrize("chunk", [1, 5, W - S])
def test_graph_with_sinks_matches_reference(ck, tmp_path, activations, chunk):
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=chunk, sinks=S,
                activations=activations)
    a, b = sequences(chunk + 1, [4 * W + 3, 3 * W - 2])
    session = DecoderSession(tmp_path / "m.onnx", batch=2)
    assert (session.sinks, session.ring) == (S, W - S)
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache(batch=2, window=W, sinks=S)
    for tokens, valid in batched(a, b, chunk):
        got = session.step(tokens, valid, all_logits=True)
        expected = ref.forward(torch.tensor(tokens), cache, torch.tensor(valid)).numpy()
        for i, n in enumerate(valid):
            if n:
                assert_close(got[i, :n], expected[i, :n], activations)
    assert session.positions.tolist() == [len(a), len(b)]


@pytest.mark.parametrize("kernel", ["off", "auto"])  # the function body, and the native kernel where built
def test_sink_cache_is_updated_in_place_and_memory_is_fixed_by_w(ck, tmp_path, capfd, kernel):
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4, sinks=S)
    session = DecoderSession(tmp_path / "m.onnx", config=SessionConfig(kernel=kernel))
    tokens = sequences(3, [5 * W])[0]
    session.step(np.array([tokens[:4]]))
    sinks = session._arrays["sink_key.0"].copy()
    assert abs(sinks).max() > 0  # the first chunk wrote the sinks
    for s in range(4, W, 4):
        session.step(np.array([tokens[s:s + 4]]))
    before = {k: v.data_ptr() for k, v in session.cache.items()}
    size = session.cache_bytes
    cfg = ck.config
    assert size == cfg.n_layers * 2 * cfg.n_kv_heads * W * cfg.head_dim * 4  # ring W - S plus S sinks
    for s in range(W, len(tokens), 4):
        session.step(np.array([tokens[s:s + 4]]))
        assert session.cache_bytes == size
    assert "in-place optimization not activated" not in capfd.readouterr().err
    assert {k: v.data_ptr() for k, v in session.cache.items()} == before
    np.testing.assert_array_equal(session._arrays["sink_key.0"], sinks)  # kept for ever
    session.reset()
    assert session.positions.tolist() == [0] and not session._arrays["sink_key.0"].any()


def test_sinks_default_and_bounds(ck):
    full = checkpoint_of(tiny_hf_mistral(window=W))
    full.config = full.config.__class__(**{**full.config.__dict__, "sliding_window": None})
    assert resolve_sinks(ck, None) == resolve_sinks(ck, None, 4096) == 0  # trained with a window: the ring is exact
    # trained without one: W / 16 within [4, 64] (docs/cache.md), W the export's or the default
    assert [resolve_sinks(full, None, w) for w in (16, 64, 128, 256, 1024, 2048, 8192)] == [4, 4, 8, 16, 64, 64, 64]
    assert resolve_sinks(full, None) == resolve_sinks(full, None, DEFAULT_WINDOW) == 64
    assert resolve_sinks(full, 2, 1024) == 2 and resolve_sinks(ck, 3) == 3  # as given
    assert resolve_window(ck, W, None, S) == (W, W - S)
    with pytest.raises(EdgeError, match="sinks must be between 0 and W - 1 = 15, got 16"):
        resolve_window(ck, W, None, W)
    with pytest.raises(EdgeError, match="chunk size must be between 1 and the window W=16 minus its 3 sinks, 13, got 14"):
        resolve_window(ck, W, 14, S)


def test_graph_metadata_sinks_and_trained_window(ck, tmp_path):
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4, sinks=S)
    info = DecoderSession(tmp_path / "m.onnx").info
    assert (info.sinks, info.trained_window, info.ring, info.exact) == (S, W, W - S, False)
    meta = info.to_metadata()
    assert GraphInfo.from_metadata({**meta, "mistral_edge.sinks": "0"}, "m").exact
    for bad in ("16", "-1", "x"):
        with pytest.raises(EdgeError, match="sinks"):
            GraphInfo.from_metadata({**meta, "mistral_edge.sinks": bad}, "m")
    with pytest.raises(EdgeError, match="graph contract 2, this runtime runs version 5; export the model again"):
        GraphInfo.from_metadata({**meta, "mistral_edge.graph_contract": "2"}, "m")


def test_snapshot_of_a_sink_cache_past_the_ring_resumes_exactly(ck, tmp_path):
    """serve's capture / save / load / restore carry the sinks, which the ring no longer holds."""
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4, sinks=S)
    state = snapshot_resumes(tmp_path / "m.onnx", tmp_path)
    assert state.cache["sink_key.0"].shape[1] == S and state.cache["key.0"].shape[1] == W - S


def snapshot_resumes(model, tmp_path):
    """Feed 2W tokens, capture row 0, save, load and restore it into row 1 of a batch-2 session, and
    check the next chunk's logits there against the uninterrupted session's; returns the state."""
    from mistral_edge.serve.snapshot import TokenHistory, capture, load, restore, save

    tokens = sequences(4, [3 * W + 2])[0]
    first, second = DecoderSession(model), DecoderSession(model, batch=2)
    for s in range(0, 2 * W, 4):
        first.step(np.array([tokens[s:s + 4]]))
    state = capture(first, 0, TokenHistory.of(tokens[:2 * W], W))
    save(tmp_path / "s.snap", state, first, "bundle")
    restore(second, 1, load(tmp_path / "s.snap", second, "bundle"))
    rest = np.array([tokens[2 * W:2 * W + 4]])
    want = first.step(rest, all_logits=True).copy()
    got = second.step(np.concatenate([rest, rest]), np.array([0, 4]), all_logits=True)[1:]
    assert np.abs(got - want).max() < 1e-5
    return state


def test_attention_note_says_whether_the_window_is_exact():
    from mistral_edge.contract import attention_note

    assert attention_note(4096, 4096) == ("sliding window of 4096", "W=4096: exact (the model's own window)")
    assert attention_note(None, 1024, 4) == (
        "full attention (no window)",
        "W=1024: exact up to 1024 tokens, an approximation past them (4 sinks + the last 1020 tokens)")
    assert attention_note(4096, 1024)[1] == "W=1024: exact up to 1024 tokens, an approximation past them (the last 1024 tokens)"
    assert attention_note(None, None)[1] == "no window chosen: give --window"


def test_inspect_shows_sinks_and_exactness(tmp_path, capsys):
    from helpers import write_tiny_bundle

    from mistral_edge.cli.bundle import inspect

    write_tiny_bundle(tmp_path / "b")
    inspect(tmp_path / "b")
    out = capsys.readouterr().out
    assert "sliding window of 16" in out and "W=16: exact (the model's own window)" in out
    assert any(line.split()[:4] == ["│", "sinks", "│", "0"] for line in out.splitlines())


def load_sink_positions():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sink_positions.py"
    spec = importlib.util.spec_from_file_location("sink_positions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_sink_positions_reprefill_scores_what_the_policy_runs_through_a_real_cache(ck):
    """benchmarks/sink_positions.py's dense re-prefill rows against the policy run token by token:
    a fresh cache rebuilt from the sinks and the last L tokens by a chunked prefill whenever it is full."""
    bench = load_sink_positions()
    T, L = 64, 6
    t = np.asarray(sequences(7, [T])[0])
    w = {k: v.float() for k, v in ck.weights.items()}
    dense = bench.reprefill_nll(ck, w, t, W, S, L)
    ref = ReferenceModel(ck.config, ck.weights)
    cache, held, step, rebuilds = ref.new_cache(window=W), 0, [], []
    for p in range(T - 1):
        if held == W:
            cache = ref.new_cache(window=W)
            ref.prefill(torch.as_tensor(np.concatenate([t[:S], t[p - L:p]]))[None], cache, chunk=4)
            held, rebuilds = S + L, rebuilds + [p]
        logits = ref.forward(torch.as_tensor(t[p:p + 1])[None], cache)
        held += 1
        step.append(-torch.log_softmax(logits[0, -1].float(), -1)[t[p + 1]])
    assert rebuilds == list(range(W, T - 1, W - S - L))
    torch.testing.assert_close(dense, torch.stack(step), atol=1e-4, rtol=1e-4)
    full = bench.token_nll(ck, w, t, T, 0, False)
    torch.testing.assert_close(dense[:W], full[:W], atol=1e-4, rtol=1e-4)
    assert (dense[W:] - full[W:]).abs().max() > 1e-2  # past W the policy sees less than everything


P = 5


@pytest.fixture(scope="module")
def sharp():
    """The tiny model with queries scaled up, so that some keys draw far more attention than others
    and the pool's choice is not the ring's order (checked below)."""
    model = tiny_hf_mistral(window=W)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
    return checkpoint_of(model)


def pooled_positions(cache, layer: int, sinks: int = S) -> torch.Tensor:
    return cache.slot_positions(layer)[:, :, sinks:sinks + P]


@pytest.mark.parametrize("chunk,sinks", [(1, S), (4, S), (1, 0)])
def test_pool_cache_equals_the_dense_policy(sharp, chunk, sinks):
    """ReferenceModel's pooled cache fed `chunk` tokens a step against benchmarks/sink_positions.py's
    dense computation of the same policy from each layer's whole-sequence scores (sets of positions,
    no slots); without sinks, position 0 is a candidate like any other."""
    bench = load_sink_positions()
    T = 64
    t = np.asarray(sequences(11, [T])[0])
    w = {k: v.float() for k, v in sharp.weights.items()}
    dense = bench.token_nll(sharp, w, t, W, sinks, False, pool=P, chunk=chunk)
    ref = ReferenceModel(sharp.config, sharp.weights)
    cache = ref.new_cache(window=W, sinks=sinks, pool=P)
    logits = ref.prefill(torch.as_tensor(t)[None], cache, chunk=chunk)
    step = -torch.log_softmax(logits[0, :-1], -1)[torch.arange(T - 1), torch.as_tensor(t[1:])]
    torch.testing.assert_close(step, dense, atol=1e-4, rtol=1e-4)
    full, sinks_only = bench.token_nll(sharp, w, t, T, 0, False), bench.token_nll(sharp, w, t, W, sinks, False)
    torch.testing.assert_close(dense[:W], full[:W], atol=1e-4, rtol=1e-4)  # nothing dropped before W keys
    assert (dense[W:] - sinks_only[W:]).abs().max() > 1e-2
    # the pool kept older keys than some it dropped: a choice by attention, not the ring's order
    ring_start = T - (W - sinks - P)
    kept = [pooled_positions(cache, i, sinks) for i in range(sharp.config.n_layers)]
    assert all(((k >= sinks) & (k < ring_start)).all() for k in kept)
    assert any((k.amin(-1) < ring_start - P).any() for k in kept)


@pytest.mark.parametrize("chunk,kv_cache", [(1, None), (4, None), (4, "int8")])
def test_pool_cache_batch_and_padding_hold_w_distinct_keys(sharp, chunk, kv_cache):
    """Two rows of different lengths, padded, give each row's own logits; every kv head holds
    W distinct keys (sinks, pool and ring never hold a key twice); an int8 cache's pool holds
    the codes and scales its keys had in the ring."""
    ref = ReferenceModel(sharp.config, sharp.weights)
    a, b = sequences(12, [50, 37])
    cache = ref.new_cache(batch=2, window=W, sinks=S, pool=P, kv_cache=kv_cache)
    outs = [ref.forward(torch.as_tensor(tokens), cache, torch.as_tensor(valid)) for tokens, valid in batched(a, b, chunk)]
    got = torch.cat(outs, 1)
    for row, seq in enumerate((a, b)):
        alone = ref.prefill(torch.tensor([seq]), ref.new_cache(window=W, sinks=S, pool=P, kv_cache=kv_cache), chunk)[0]
        torch.testing.assert_close(got[row, :len(seq)], alone, atol=1e-4, rtol=1e-4)
    for i in range(sharp.config.n_layers):
        held = cache.slot_positions(i)
        for row, seq in enumerate((a, b)):
            for h in range(held.shape[1]):
                keys = held[row, h][held[row, h] >= 0]
                assert len(keys) == W and len(set(keys.tolist())) == W and keys.max() == len(seq) - 1
    assert cache.nbytes == ref.new_cache(batch=2, window=W, sinks=S, pool=P, kv_cache=kv_cache).nbytes  # fixed by W
    if kv_cache == "int8":  # the pool moved each key's scale with its codes: close to the float cache
        fp32 = ref.prefill(torch.tensor([a]), ref.new_cache(window=W, sinks=S, pool=P), chunk)[0]
        assert (got[0, :len(a)] - fp32).abs().max() < 0.05  # 0.004 here; 0.31 with the scales left behind


def test_pool_bounds(sharp):
    ref = ReferenceModel(sharp.config, sharp.weights)
    with pytest.raises(ValueError, match="sinks \\+ pool"):
        ref.new_cache(window=W, sinks=S, pool=W - S)
    with pytest.raises(EdgeError, match="ring of 4 slots"):
        ref.forward(torch.zeros((1, 5), dtype=torch.long), ref.new_cache(window=W, sinks=S, pool=W - S - 4))


def pooled_export(ck, path, chunk: int, kv_cache: str | None = None, activations: str = "fp32", sinks: int = S):
    export_onnx(ck, parse_quant("fp32"), path, window=W, chunk=chunk, sinks=sinks, pool=P, kv_cache=kv_cache,
                activations=activations)
    return path


POOL_CASES = [(1, None, "fp32", S), (4, None, "fp32", S), (W - S - P, None, "fp32", S), (4, "int8", "fp32", S),
              (4, None, "fp16", S), (4, "int8", "fp16", S), (4, "fp16", "fp32", S), (4, None, "fp32", 0)]


@pytest.mark.parametrize("kernel", ["off", "auto"])  # the function body, and the native kernel where built
@pytest.mark.parametrize("chunk,kv_cache,activations,sinks", POOL_CASES)
def test_graph_with_a_pool_matches_reference(sharp, tmp_path, chunk, kv_cache, activations, sinks, kernel):
    """The pooled graph against ReferenceModel's pooled cache, two rows of different lengths padded:
    the same logits, and every layer's pool holds the same positions in the same slots."""
    from mistral_edge import kernels

    model = pooled_export(sharp, tmp_path / "m.onnx", chunk, kv_cache, activations, sinks)
    session = DecoderSession(model, batch=2, config=SessionConfig(kernel=kernel))
    assert (session.pool, session.ring) == (P, W - sinks - P)
    native = session.attention_path.startswith("native kernel")
    assert native == (kernel == "auto" and sinks > 0 and kernels.unavailable_reason() is None), session.attention_path
    ref = ReferenceModel(sharp.config, sharp.weights)
    cache = ref.new_cache(batch=2, window=W, sinks=sinks, pool=P, kv_cache=kv_cache)
    a, b = sequences(12, [50, 37])
    before = kernels.calls() if native else 0
    steps = 0
    for tokens, valid in batched(a, b, chunk):
        got = session.step(tokens, valid, all_logits=True)
        steps += 1
        expected = ref.forward(torch.tensor(tokens), cache, torch.tensor(valid)).numpy()
        for i, n in enumerate(valid):
            if n:
                assert_close(got[i, :n], expected[i, :n], activations)
        for layer in range(sharp.config.n_layers):
            np.testing.assert_array_equal(session._arrays[f"pool_pos.{layer}"][..., 0] - 1, cache.pool_pos[layer].numpy())
    assert (cache.pool_pos[0] >= 0).all()  # the pools filled
    if native:
        assert kernels.calls() - before == steps * sharp.config.n_layers  # every node ran natively


@pytest.mark.parametrize("kernel", ["off", "auto"])
def test_pool_cache_is_updated_in_place_and_memory_is_fixed_by_w(sharp, tmp_path, capfd, kernel):
    session = DecoderSession(pooled_export(sharp, tmp_path / "m.onnx", 4), config=SessionConfig(kernel=kernel))
    tokens = sequences(3, [5 * W])[0]
    for s in range(0, W, 4):
        session.step(np.array([tokens[s:s + 4]]))
    before = {k: v.data_ptr() for k, v in session.cache.items()}
    cfg = sharp.config
    size = cfg.n_layers * cfg.n_kv_heads * (2 * W * cfg.head_dim * 4 + 4 * (W - S) + 8 * P)  # K, V; masses; positions
    assert session.cache_bytes == size
    pools = []
    for s in range(W, len(tokens), 4):
        session.step(np.array([tokens[s:s + 4]]))
        assert session.cache_bytes == size
        pools.append(session._arrays["pool_key.0"].copy())
    assert "in-place optimization not activated" not in capfd.readouterr().err
    assert {k: v.data_ptr() for k, v in session.cache.items()} == before
    assert any((x != y).any() for x, y in zip(pools, pools[1:]))  # keys entered the pool in place
    session.reset()
    assert session.positions.tolist() == [0] and not session._arrays["pool_pos.0"].any()


def test_the_default_chunk_keeps_a_pooled_prefill_exact_up_to_w(sharp):
    """A chunk that runs past W from below it admits for all its queries at once, some still within W:
    the default chunk of a pooled cache divides W, so a prefill from 0 attends as full attention up to W."""
    chunk = resolve_window(sharp, W, None, S, P)[1]
    assert chunk == W - S - P == 8 and W % chunk == 0 and resolve_window(sharp, 20, None, S, P)[1] == 10
    ref = ReferenceModel(sharp.config, sharp.weights)
    seq = sequences(13, [W + 2])[0]
    full = dense_logits(sharp, seq, W + 2, 0)[:W]
    for c, exact in ((chunk, True), (6, False)):  # 6: the third chunk runs from 12 to 18
        got = ref.prefill(torch.tensor([seq]), ref.new_cache(window=W, sinks=S, pool=P), c)[0, :W]
        assert ((got - full).abs().max() < 1e-4) == exact


def test_a_pool_without_sinks_runs_the_function_body(sharp, tmp_path):
    from mistral_edge import kernels

    if kernels.unavailable_reason():
        pytest.skip(kernels.unavailable_reason())
    model = pooled_export(sharp, tmp_path / "m.onnx", 4, sinks=0)
    with pytest.raises(EdgeError, match="^the native kernel keeps a pool only beside attention sinks$"):
        DecoderSession(model, config=SessionConfig(kernel="on"))


def test_graph_metadata_and_bounds_of_a_pool(sharp, tmp_path):
    from mistral_edge.contract import attention_note

    info = DecoderSession(pooled_export(sharp, tmp_path / "m.onnx", 4)).info
    assert (info.sinks, info.pool, info.ring, info.exact) == (S, P, W - S - P, False)
    meta = info.to_metadata()
    for bad in ("13", "-1", "x"):  # 13: no ring left beside 3 sinks
        with pytest.raises(EdgeError, match="pool"):
            GraphInfo.from_metadata({**meta, "mistral_edge.pool": bad}, "m")
    with pytest.raises(EdgeError, match="pool must be between 0 and W - sinks - 1 = 12, got 13"):
        resolve_window(sharp, W, None, S, W - S)
    with pytest.raises(EdgeError, match="chunk size must be between 1 and the window W=16 minus its 3 sinks and pool of 5, 8, got 9"):
        resolve_window(sharp, W, 9, S, P)
    full = checkpoint_of(tiny_hf_mistral(window=W))
    full.config = full.config.__class__(**{**full.config.__dict__, "sliding_window": None})
    assert resolve_pool(sharp, None, W, S) == 0  # trained with a window: the ring is exact
    # trained without one: W / 2 (docs/cache.md), a ring left beside the sinks
    assert [resolve_pool(full, None, w, resolve_sinks(full, None, w)) for w in (8, 16, 256, 1024)] == [3, 8, 128, 512]
    assert resolve_pool(full, None) == 512 and resolve_pool(full, 3, 16) == 3  # the default W; as given
    assert attention_note(None, 1024, 64, 512)[1] == ("W=1024: exact up to 1024 tokens, an approximation past them "
                                                      "(64 sinks + a pool of the 512 most-attended older tokens + "
                                                      "the last 448 tokens)")


def test_snapshot_of_a_pooled_cache_past_the_ring_resumes_exactly(sharp, tmp_path):
    """serve's capture / save / load / restore carry the pool and the masses; a pooled state is never truncated."""
    from mistral_edge.serve.snapshot import TokenHistory, capture

    model = pooled_export(sharp, tmp_path / "m.onnx", 4)
    state = snapshot_resumes(model, tmp_path)
    assert state.cache["pool_key.0"].shape[1] == P and state.cache["mass.0"].shape[1] == W - S - P
    tokens = sequences(4, [6])[0]
    short = DecoderSession(model)
    short.step(np.array([tokens]))
    assert capture(short, 0, TokenHistory.of(tokens[:6], W)).truncated(4, W) is None
