"""GPTQ (quantize/gptq.py) and its calibration pass (quantize/calibrate.py): the output error it
buys, the group layout it keeps, and the export of its codes."""

import numpy as np
import pytest
import torch

from helpers import W, checkpoint_of, tiny_hf_mistral
from mistral_edge.compare.variants import parse_quants
from mistral_edge.errors import EdgeError
from mistral_edge.export.decoder import build_decoder
from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.model.reference import ReferenceModel, rms_norm
from mistral_edge.quantize import calibrate, gptq
from mistral_edge.quantize.int4 import pack_matmul_nbits, quantize_int4
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession
from test_export import EXACT, run_chunks, unfuse

ZERO_POINTS = ["int", "float", "none"]


def layer_problem(n: int = 48, k: int = 96, rows: int = 512, seed: int = 0):
    """W [n, k] and correlated inputs X [rows, k] with a few large channels, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8
    return w, x


def output_error(x, w, q4) -> float:
    ref = x @ w.T
    return float((ref - x @ q4.dequantize().T).square().sum() / ref.square().sum())


@pytest.mark.parametrize("zero_point", ZERO_POINTS)
def test_gptq_output_error_below_rtn_and_search(zero_point):
    w, x = layer_problem()
    h = gptq.hessian(x)
    rtn = output_error(x, w, quantize_int4(w, 32, zero_point, "rtn"))
    search = output_error(x, w, quantize_int4(w, 32, zero_point, "search", act_scale=h.diagonal().sqrt()))
    for act_order in (True, False):
        err = output_error(x, w, gptq.gptq_int4(w, h, 32, zero_point, act_order=act_order))
        assert err < 0.6 * min(rtn, search), (err, rtn, search)  # measured: 0.3-0.45 x search here
        assert err < 0.004


def obq_reference(w, h, grid, order, damp):
    """Column by column in `order`, each rounded onto its static group's grid, with the error
    pushed onto the columns still open through the inverse Hessian of those columns, recomputed
    (Schur complement) after every step: the direct form GPTQ's Cholesky and lazy blocks reproduce."""
    w, k = w.clone().double(), w.shape[1]
    h = h.double() + damp * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h[order][:, order])
    w = w[:, order]
    s, z = grid.scales.double(), grid.zero_points.double()
    codes = torch.empty_like(w)
    for j in range(k):
        g = int(order[j]) // grid.group_size
        q = torch.clamp(torch.round(w[:, j] / s[:, g] + z[:, g]), 0, 15)
        codes[:, j] = q
        err = (w[:, j] - (q - z[:, g]) * s[:, g]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_matches_the_direct_column_by_column_solution(monkeypatch, act_order):
    monkeypatch.setattr(gptq, "BLOCK", 16)  # several lazy-update blocks over K = 96
    w, x = layer_problem()
    h = gptq.hessian(x)
    q4 = gptq.gptq_int4(w, h, 32, "int", act_order=act_order)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    expected = obq_reference(w, h, q4, order, gptq.DAMP)
    agree = float((q4.q[:, : w.shape[1]].float() == expected).float().mean())
    assert agree > 0.99  # float32 against float64: a rounding tie may go either way


@pytest.mark.parametrize("zero_point", ZERO_POINTS)
def test_static_groups_are_the_grid_fitted_before_the_pass(zero_point):
    """act-order rounds columns out of order, but every group keeps the scale and zero point fitted
    in K order, contiguous in K, so MatMulNBits (no g_idx) computes the same weight. K = 80 is not a
    multiple of 32: the padded tail keeps quantize_int4's padding codes."""
    w, x = layer_problem(k=80)
    h = gptq.hessian(x)
    q4 = gptq.gptq_int4(w, h, 32, zero_point, act_order=True)
    grid = quantize_int4(w, 32, zero_point, "search", act_scale=h.diagonal().sqrt())
    assert torch.equal(q4.scales, grid.scales) and torch.equal(q4.zero_points, grid.zero_points)
    assert q4.q.shape == grid.q.shape == (48, 96) and torch.equal(q4.q[:, 80:], grid.q[:, 80:])
    assert int(q4.q.max()) <= 15 and (q4.q[:, :80] != grid.q[:, :80]).any()  # error feedback moved codes
    if zero_point != "float":
        b, scales, zeros = pack_matmul_nbits(q4)
        unpacked = torch.stack([torch.as_tensor(b) & 15, torch.as_tensor(b) >> 4], -1).reshape(48, 96)
        assert torch.equal(unpacked, q4.q) and np.array_equal(scales, q4.scales.reshape(-1).numpy())


def test_diagonal_hessian_gives_nearest_rounding_on_the_grid():
    """Uncorrelated inputs: no column can absorb another's error, so GPTQ's codes are the search's."""
    w, _ = layer_problem()
    h = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
    q4 = gptq.gptq_int4(w, h, 32, "int", act_order=True)
    assert torch.equal(q4.q, quantize_int4(w, 32, "int", "search", act_scale=h.diagonal().sqrt()).q)


def test_dead_input_channels():
    w, x = layer_problem()
    x[:, 10] = 0  # a channel never active: its weight has no effect, and H is singular
    q4 = gptq.gptq_int4(w, gptq.hessian(x), 32, "int")
    assert torch.isfinite(q4.dequantize()).all()
    assert output_error(x, w, q4) < 0.004


# ---- the calibration pass and the export --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, dim=64))
    windows = np.random.default_rng(0).integers(0, ck.config.vocab_size, (3, 24))
    return ck, windows


def test_gptq_pass_quantizes_every_int4_linear_on_its_own_input(tiny):
    ck, windows = tiny
    # an explicit zero point: every linear int4, not re-planned; an int8 embedding: the head is a tensor of its own
    spec = parse_quant("int4-g32-fzp", head="int4", embedding="int8")
    cal = calibrate.calibrate_gptq(ck, spec, windows)
    int4 = [name for name, tq in cal.plan.items() if tq.kind == "int4"]
    assert "output" in int4 and all(cal.plan[name].codes is not None for name in int4)
    # layer 0's QKV input is the normed embedding, the same whatever is quantized
    x = rms_norm(ck.weights["tok_embeddings.weight"][torch.as_tensor(windows)],
                 ck.weights["layers.0.attention_norm.weight"], ck.config.norm_eps)
    wqkv = torch.cat([ck.weights[w] for w in calibrate.weights_of("layers.0.attention.wqkv")])
    tq = cal.plan["layers.0.attention.wqkv"]
    direct = gptq.gptq_int4(wqkv, gptq.hessian(x), 32, tq.zero_point, tq.method)
    assert torch.equal(tq.codes.q, direct.q)
    # layer 1's w2 input comes from the quantized model: fp32 layers before it give other codes
    fp32 = calibrate.gptq_codes(ck, {name: tq for name, tq in cal.plan.items()
                                     if name == "layers.1.feed_forward.w2"}, windows)
    assert not torch.equal(fp32["layers.1.feed_forward.w2"].q, cal.plan["layers.1.feed_forward.w2"].codes.q)


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_gptq_export_runs_with_its_codes(tiny, tmp_path, fmt):
    """The exported graph stores GPTQ's codes unchanged and computes what the reference model computes
    on their dequantized weights (accuracy_level 0: fp32 compute)."""
    ck, windows = tiny
    cal = calibrate.calibrate_gptq(ck, parse_quant("int4-g32"), windows, awq=True)
    emitter = WeightEmitter(Builder(), cal.plan, fmt, 0, ACTIVATIONS["fp32"], keep_dequantized=True)
    (tmp_path / "m.onnx").write_bytes(build_decoder(ck.config, cal.checkpoint.weights, W, 5, emitter)
                                      .SerializeToString())
    for name, tq in cal.plan.items():
        if tq.codes is not None:
            assert torch.equal(emitter.dequantized[name], tq.codes.dequantize())
    weights = {**cal.checkpoint.weights, **unfuse(ck.config, emitter.dequantized)}
    ref = ReferenceModel(ck.config, weights)
    tokens = torch.as_tensor(windows[:1, :20])
    expected = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=EXACT), tokens.numpy(), 5)
    assert np.abs(got - expected).max() < 1e-4


def test_quants_take_the_calibration_suffixes():
    choices = parse_quants("int4-gptq,int4-g64-awq-gptq,int4-g32-awq,int4-g32-mzp-search-gptq")
    assert [(c.name, c.calibration) for c in choices] == [
        ("int4-g32-mzp-search-gptq", "gptq"), ("int4-g64-mzp-search-awq-gptq", "awq-gptq"),
        ("int4-g32-mzp-search-awq", "awq")]  # the last is the first's canonical name: dropped
    with pytest.raises(EdgeError, match="applies to int4 only"):
        parse_quants("int8-gptq")
    with pytest.raises(EdgeError, match="unknown quantization"):
        parse_quants("int4-gptq-awq")


def test_wide_matrices_run_in_segments_of_whole_groups(monkeypatch):
    """K above MAX_COLUMNS: each segment is GPTQ on its own block of H (here K = 96 in 3 x 32)."""
    w, x = layer_problem()
    h = gptq.hessian(x)
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 40)
    q4 = gptq.gptq_int4(w, h, 32, "int")
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 4096)
    for cols in (slice(0, 32), slice(32, 64), slice(64, 96)):
        alone = gptq.gptq_int4(w[:, cols], h[cols, cols], 32, "int")
        assert torch.equal(q4.q[:, cols], alone.q)
    assert output_error(x, w, q4) < 0.6 * output_error(x, w, quantize_int4(w, 32, "int", "rtn"))
