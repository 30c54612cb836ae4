"""GPTQ (quantize/gptq.py) and its calibration pass (quantize/calibrate.py): the output error it
buys, the group layout it keeps, and the export of its codes."""

import gc
import hashlib
import subprocess
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.overrides import TorchFunctionMode

from helpers import W, checkpoint_of, tiny_hf_mistral, write_tiny_hf_dir
from mistral_edge.compare.variants import parse_quants
from mistral_edge.errors import EdgeError
from mistral_edge.export.decoder import build_decoder
from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.model.reference import ReferenceModel, rms_norm
from mistral_edge.quantize import calibrate, gptq
from mistral_edge.quantize.int4 import pack_matmul_nbits, quantize_int4
from mistral_edge.quantize.int8 import quantize_int8
from mistral_edge.quantize.plan import quant_plan
from mistral_edge.quantize.selfgen import RANDOM_TOKENS, RANDOM_WINDOWS, check_memory, compute_dtype, random_calibration, sample_windows
from mistral_edge.quantize.spec import RandomTokens, SelfText, export_calibration, parse_calib, parse_quant
from mistral_edge.model.checkpoint import Checkpoint
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.session import DecoderSession
from mistral_edge.targets.bundle import write_bundle
from mistral_edge.targets.profiles import get_target
from mistral_edge.targets.request import BundleRequest
from mistral_edge.tokenizer import Tokenizer
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
    expected = obq_reference(w, h.blocks[0], q4, order, gptq.DAMP)
    agree = float((q4.q[:, : w.shape[1]].float() == expected).float().mean())
    assert agree > 0.99  # float32 against float64: a rounding tie may go either way


@pytest.mark.parametrize("k", [96, 601])
def test_inverse_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse(k):
    """U upper with U^T U = (H + damp)^-1, the factor the rounding reads its pushes from; K = 601
    takes the triangular inverse through uneven halves (its blocks stop at 256)."""
    _, x = layer_problem(k=k, rows=2 * k)
    h = gptq.hessian(x).blocks[0]
    u = gptq._inverse_factor(h, gptq.DAMP).double()
    dampened = h.double() + gptq.DAMP * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(dampened), upper=True)
    assert torch.equal(u, u.triu())
    assert float((u - expected).abs().max() / expected.abs().max()) < 1e-4


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
    h = gptq.Hessian([slice(0, 96)], [torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)])
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
    only_w2 = {name: tq for name, tq in cal.plan.items() if name == "layers.1.feed_forward.w2"}
    fp32 = calibrate.LayerwiseGptq(ck, only_w2, windows).all_codes()
    assert not torch.equal(fp32["layers.1.feed_forward.w2"].q, cal.plan["layers.1.feed_forward.w2"].codes.q)


class _WholeModelPass(TorchFunctionMode):
    """The oracle for the layer-by-layer pass: the reference model run whole over the windows, each
    planned weight in `x @ W.T` replaced by its quantized value when its first input arrives (int4:
    GPTQ codes on that input's Hessian)."""

    def __init__(self, model: ReferenceModel, plan: dict):
        super().__init__()
        self.model, self.plan, self.quantized, self.codes = model, plan, {}, {}
        parts = {name: ["output.weight"] if name == "output" else calibrate.weights_of(name)
                 for name in plan if name != "tok_embeddings"}
        self.names = {model.w[p].data_ptr(): (name, ps, p) for name, ps in parts.items() for p in ps}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__") and isinstance(args[1], torch.Tensor):
            hit = self.names.get(args[1].data_ptr())
            if hit is not None:
                name, parts, part = hit
                if part not in self.quantized:
                    tq, w = self.plan[name], torch.cat([self.model.w[p] for p in parts])
                    if tq.kind == "int4":
                        self.codes[name] = gptq.gptq_int4(w, gptq.hessian(args[0], tq.group_size), tq.group_size, tq.zero_point,
                                                          tq.method, scale_bits=tq.scale_bits)
                        w = self.codes[name].dequantize()
                    elif tq.kind == "int8":
                        w = quantize_int8(w).dequantize()
                    self.quantized.update(zip(parts, w.split([self.model.w[p].shape[0] for p in parts])))
                return func(args[0], self.quantized[part].T)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("quant, head", [("int4-g32-fzp", "int4"), ("int4", "int8")])
def test_layer_by_layer_pass_equals_the_whole_model_pass(tiny, quant, head):
    """The layer-by-layer pass (one layer's weights and the hidden states at a time) gives the codes
    the reference model run whole gives, with int8 linears (the mixed plan's) before them."""
    ck, windows = tiny
    windows = windows[:, :W]  # the whole model over the windows in one chunk (its cache holds at most W)
    plan = quant_plan(ck.config, parse_quant(quant, head=head, embedding="int8"))
    layerwise = calibrate.LayerwiseGptq(ck, plan, windows).all_codes()
    model = ReferenceModel(ck.config, ck.weights)
    whole = _WholeModelPass(model, plan)
    tokens = torch.as_tensor(windows)
    with torch.no_grad(), whole:
        model.prefill(tokens, model.new_cache(len(tokens), tokens.shape[1]), tokens.shape[1])
    assert set(layerwise) == set(whole.codes) == {name for name, tq in plan.items() if tq.kind == "int4"}
    if "layers.0.attention.wqkv" in layerwise:  # the same input in both: the same codes
        assert torch.equal(layerwise["layers.0.attention.wqkv"].q, whole.codes["layers.0.attention.wqkv"].q)
    for name, codes in layerwise.items():  # float summation order may move a rare tie
        assert float((codes.q == whole.codes[name].q).float().mean()) > 0.99, name


def test_layer_by_layer_codes_are_asked_for_in_execution_order(tiny):
    ck, windows = tiny
    plan = quant_plan(ck.config, parse_quant("int4-g32-fzp"))
    pass_ = calibrate.LayerwiseGptq(ck, plan, windows)
    assert pass_.codes("tok_embeddings") is None  # a Gather: no codes
    assert pass_.codes("layers.0.feed_forward.w13") is not None
    with pytest.raises(ValueError, match="went past it"):
        pass_.codes("layers.0.attention.wqkv")


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("lazy", [False, True])
def test_gptq_export_runs_with_its_codes(tiny, tmp_path, fmt, lazy):
    """The exported graph stores GPTQ's codes unchanged and computes what the reference model computes
    on their dequantized weights (accuracy_level 0: fp32 compute): codes in the plan (compare's
    calibrated rows, here on the AWQ-scaled model) or asked for tensor by tensor as the export goes
    (`export --calib`: WeightEmitter.codes, the layer-by-layer pass run alongside)."""
    ck, windows = tiny
    if lazy:
        plan = quant_plan(ck.config, parse_quant("int4-g32"))
        model, codes = ck, calibrate.LayerwiseGptq(ck, plan, windows).all_codes()
        emitter = WeightEmitter(Builder(), plan, fmt, 0, ACTIVATIONS["fp32"], keep_dequantized=True,
                                codes=calibrate.LayerwiseGptq(ck, plan, windows).codes)
    else:
        cal = calibrate.calibrate_gptq(ck, parse_quant("int4-g32"), windows, awq=True)
        model, codes = cal.checkpoint, {name: tq.codes for name, tq in cal.plan.items() if tq.codes is not None}
        emitter = WeightEmitter(Builder(), cal.plan, fmt, 0, ACTIVATIONS["fp32"], keep_dequantized=True)
    (tmp_path / "m.onnx").write_bytes(build_decoder(ck.config, model.weights, W, 5, emitter).SerializeToString())
    assert codes and all(torch.equal(emitter.dequantized[name], q4.dequantize()) for name, q4 in codes.items())
    weights = {**model.weights, **unfuse(ck.config, emitter.dequantized)}
    ref = ReferenceModel(ck.config, weights)
    tokens = torch.as_tensor(windows[:1, :20])
    expected = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=EXACT), tokens.numpy(), 5)
    assert np.abs(got - expected).max() < 1e-4


@pytest.fixture(scope="module")
def calib_model(tmp_path_factory):
    """A tiny Mistral directory with a SentencePiece tokenizer, and a text of more than 8 x 512 tokens."""
    root = tmp_path_factory.mktemp("calib")
    words = np.random.default_rng(0).choice("the river ran north past old stone mills and".split(), 6000)
    (root / "calib.txt").write_text(" ".join(words) + "\n")
    return load_checkpoint(str(write_tiny_hf_dir(root / "model", W))), root / "calib.txt"


def test_export_calib_writes_the_gptq_codes_and_records_the_text(calib_model, tmp_path):
    ck, text = calib_model
    spec = parse_quant("int4-g32-fzp")  # every layer linear int4
    manifest = write_bundle(ck, BundleRequest(get_target("cpu"), spec, calib=text), tmp_path / "b", log=print)
    record = {"method": "gptq", "text": "calib.txt", "sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
              "windows": 8, "tokens_per_window": 512}
    assert manifest.quant.calibration == record
    assert Bundle.open(tmp_path / "b").manifest.quant.calibration == record
    tokenizer = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    windows, _ = calibrate.calibration_windows(text, tokenizer)
    codes = calibrate.LayerwiseGptq(ck, quant_plan(ck.config, spec), windows).all_codes()
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.initializer}
    assert len(codes) == 4 * ck.config.n_layers
    for name, q4 in codes.items():  # MatMulNBits holds the symmetric part of the float zero points' split
        assert np.array_equal(stored[name + ".q4"], pack_matmul_nbits(q4.split_offset()[0])[0]), name
    plain = write_bundle(ck, BundleRequest(get_target("cpu"), spec), tmp_path / "plain", log=print)
    assert plain.quant.calibration is None
    rtn = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "plain" / "model.onnx")).graph.initializer}
    assert not np.array_equal(rtn["layers.1.feed_forward.w2.q4"], stored["layers.1.feed_forward.w2.q4"])


def test_self_calibration_samples_the_models_own_text_seeded(calib_model):
    """--calib self: each window is the model's own continuation of BOS, sampled token by token at
    temperature 1; checked against sampling from full-prefix forwards (no incremental cache)."""
    ck = calib_model[0]
    got = sample_windows(ck, 2, 12, SelfText(seed=3))
    ref = ReferenceModel(ck.config, ck.weights)
    generator = torch.Generator().manual_seed(3)
    seqs = torch.full((2, 1), ck.config.bos_id, dtype=torch.long)
    for _ in range(12):
        logits = ref.prefill(seqs, ref.new_cache(2, 16), seqs.shape[1])[:, -1]
        seqs = torch.cat([seqs, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], 1)
    assert np.array_equal(got, seqs[:, 1:].numpy())
    assert np.array_equal(sample_windows(ck, 2, 12, SelfText(seed=3)), got)
    assert not np.array_equal(sample_windows(ck, 2, 12, SelfText(seed=4)), got)


def test_export_calib_self_records_the_samples_and_writes_their_gptq_codes(calib_model, tmp_path):
    ck = calib_model[0]
    spec = parse_quant("int4-g32-fzp")
    manifest = write_bundle(ck, BundleRequest(get_target("cpu"), spec, calib=parse_calib("self")), tmp_path / "b",
                            log=print)
    windows = sample_windows(ck, 8, 512, SelfText())
    assert manifest.quant.calibration == {
        "method": "gptq", "text": "self", "seed": 0, "temperature": 1.0, "dtype": "float32", "windows": 8,
        "tokens_per_window": 512,
        "sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest()}
    assert Bundle.open(tmp_path / "b").manifest.quant.calibration == manifest.quant.calibration
    codes = calibrate.LayerwiseGptq(ck, quant_plan(ck.config, spec), windows).all_codes()
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.initializer}
    for name, q4 in codes.items():
        assert np.array_equal(stored[name + ".q4"], pack_matmul_nbits(q4.split_offset()[0])[0]), name


def test_export_calib_random_keeps_the_plan_and_writes_the_gptq_codes_of_seeded_random_windows(calib_model, tmp_path,
                                                                                              monkeypatch):
    """--calib random: windows of ids drawn uniformly after BOS, the same for a seed; GPTQ codes on them
    (RANDOM_SCOPE: w13's Hessian shrunk toward the residual prior) for the default plan's w13, the search's
    codes for its other int4 tensors, whose int8 upgrades stay quant_plan's (no sensitivity pass)."""
    ck = calib_model[0]
    cfg = ck.config
    windows, record = random_calibration(cfg, RandomTokens(), RANDOM_WINDOWS, RANDOM_TOKENS)
    assert windows.shape == (RANDOM_WINDOWS, RANDOM_TOKENS) and (windows[:, 0] == cfg.bos_id).all()
    body = windows[:, 1:]  # uniform over the vocabulary: few repeats, its whole range
    assert len(np.unique(body)) > 0.9 * body.size and body.min() < cfg.vocab_size // 20 and body.max() >= 0.95 * cfg.vocab_size
    assert 0 <= body.min() and body.max() < cfg.vocab_size
    assert np.array_equal(random_calibration(cfg, RandomTokens(), RANDOM_WINDOWS, RANDOM_TOKENS)[0], windows)
    assert not np.array_equal(random_calibration(cfg, RandomTokens(seed=1), RANDOM_WINDOWS, RANDOM_TOKENS)[0], windows)
    assert parse_calib("random") == RandomTokens() and parse_calib("./random") == Path("random")

    spec = parse_quant("int4")  # the budgeted default: its int8 upgrades are what a calibrated plan would choose
    monkeypatch.setattr(calibrate, "calibrated_plan", lambda *args: pytest.fail("a sensitivity pass on random tokens"))
    manifest = write_bundle(ck, BundleRequest(get_target("cpu"), spec, calib=parse_calib("random")), tmp_path / "b",
                            log=print)
    assert manifest.quant.calibration == record == {
        "method": "gptq", "text": "random", "seed": 0, "windows": RANDOM_WINDOWS, "tokens_per_window": RANDOM_TOKENS,
        "sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(), "linears": "feed_forward.w13",
        "prior": calibrate.RANDOM_SCOPE.prior}
    plan = quant_plan(cfg, spec)
    codes = calibrate.LayerwiseGptq(ck, plan, windows, scope=calibrate.RANDOM_SCOPE).all_codes()
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.initializer}
    assert {name[:-3] for name in stored if name.endswith(".q4")} - {"tok_embeddings"} == set(codes)
    assert set(codes) == {name for name, tq in plan.items() if tq.kind == "int4" and name.startswith("layers.")}
    for name, q4 in codes.items():
        assert np.array_equal(stored[name + ".q4"], pack_matmul_nbits(q4.split_offset()[0])[0]), name
    unshrunk = calibrate.LayerwiseGptq(ck, plan, windows, scope=calibrate.GptqScope(("feed_forward.w13",))).all_codes()
    for name, q4 in codes.items():
        tq = plan[name]
        search = quantize_int4(calibrate._fused(ck.weights, name), tq.group_size, tq.zero_point, tq.method,
                               scale_bits=tq.scale_bits)
        if name.endswith("w13"):  # GPTQ, and on a Hessian the prior changed
            assert not torch.equal(q4.q, search.q) and not torch.equal(q4.q, unshrunk[name].q), name
        else:
            assert torch.equal(q4.q, search.q) and torch.equal(q4.scales, search.scales), name


def test_hessian_shrunk_toward_the_inputs_covariance_rounds_better_on_few_inputs():
    """With fewer calibration rows than input channels H is rank-deficient; shrunk toward the inputs' true
    covariance (a stand-in for quantize/prior.py's estimate), GPTQ's output error on held-out inputs falls.
    A shrink that did nothing (or used the wrong blocks) leaves it where it was."""
    w, x = layer_problem(n=64, k=128, rows=4096, seed=3)
    few, held_out = x[:48], x[2048:]
    cov = x[:2048].T @ x[:2048] / 2048
    prior = cov / cov.diagonal().mean()
    h = gptq.hessian(few, 32)
    shrunk = h.shrunk(prior, 1.0)
    assert torch.allclose(shrunk.blocks[0], h.blocks[0] + float(h.diagonal().mean()) * prior)
    plain = output_error(held_out, w, gptq.gptq_int4(w, h, 32, "float"))
    better = output_error(held_out, w, gptq.gptq_int4(w, shrunk, 32, "float"))
    assert better < 0.8 * plain, (better, plain)


def test_residual_prior_sums_the_writers_at_unit_diagonal_and_samples_them_seeded(monkeypatch):
    """ResidualPrior against an independent computation: unit(E^T E) + unit(W W^T) per writer, weighted by the
    norm's gain; with sampling, the same seed gives the same estimate and it tracks the exact one."""
    from mistral_edge.quantize import prior as prior_mod

    g = torch.Generator().manual_seed(0)
    emb, wo, w2 = torch.randn(300, 16, generator=g), torch.randn(16, 12, generator=g), torch.randn(16, 40, generator=g)
    gain = torch.rand(16, generator=g) + 0.5
    unit = lambda m: m / m.diagonal().mean()
    p = prior_mod.ResidualPrior(emb)
    p.add(wo)
    p.add(w2)
    expected = unit((unit(emb.T @ emb) + unit(wo @ wo.T) + unit(w2 @ w2.T)) * torch.outer(gain, gain))
    assert torch.allclose(p.of(gain), expected, atol=1e-5)
    assert p.of(gain).diagonal().mean().item() == pytest.approx(1.0)

    monkeypatch.setattr(prior_mod, "SAMPLED_ROWS", 200)
    monkeypatch.setattr(prior_mod, "SAMPLED_COLUMNS", 30)

    def sampled():
        s = prior_mod.ResidualPrior(emb)
        s.add(wo)
        s.add(w2)
        return s.of(gain)

    a, b = sampled(), sampled()
    assert torch.equal(a, b) and not torch.allclose(a, expected, atol=1e-3)
    assert float((a - expected).norm() / expected.norm()) < 0.2


def test_calib_self_refuses_a_model_that_does_not_fit_and_a_file_named_self_is_a_file(calib_model, tmp_path):
    ck = calib_model[0]
    with pytest.raises(EdgeError, match=r"samples from the whole model in float32 .* pass a calibration text"):
        check_memory(ck, torch.float32, available=ck.n_params * 4)
    check_memory(ck, torch.float32, available=ck.n_params * 8)
    with pytest.raises(EdgeError, match=r"in bfloat16 \(0.0 GiB\)"):
        check_memory(ck, torch.bfloat16, available=ck.n_params * 2)
    assert compute_dtype(ck) == torch.float32  # the fixture's weights: float32
    half = Checkpoint(ck.config, {name: ck.weights[name].to(torch.bfloat16) for name in ck.weights}, "bf16")
    assert compute_dtype(half) == torch.bfloat16
    assert parse_calib("self") == SelfText() and parse_calib("./self") == Path("self") and parse_calib(None) is None
    r = subprocess.run([sys.executable, "-m", "mistral_edge.cli.main", "export", ck.source, "--quant", "int8",
                        "--calib", "self", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: --calib calibrates int4 tensors (GPTQ); --quant int8 has none"
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("quant, text, message", [
    ("int8", "calib.txt", "--calib calibrates int4 tensors (GPTQ); --quant int8 has none"),
    ("int4", "missing.txt", "no such text file"),
    ("int4", "short.txt", "tokens, fewer than the 4096 that calibration needs (8 windows of 512)"),
    ("int4", "latin1.txt", "not UTF-8 text"),
])
def test_export_calib_refuses_in_one_line_and_writes_nothing(calib_model, tmp_path, quant, text, message):
    _, good = calib_model
    (tmp_path / "calib.txt").write_bytes(good.read_bytes())
    (tmp_path / "short.txt").write_text("the river ran north\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 3000)
    model = calib_model[0].source
    r = subprocess.run([sys.executable, "-m", "mistral_edge.cli.main", "export", model, "--quant", quant,
                        "--calib", str(tmp_path / text), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "b").exists()


def test_export_calibrates_the_default_int4_on_random_tokens_unless_told_none(calib_model, tmp_path):
    """`mistral-edge export` with no --calib: random-token GPTQ for a budgeted int4 spec on an ONNX target
    (its manifest says so), none for other specs and mlc; `--calib none` gives the search's codes."""
    int4 = parse_quant("int4")
    assert export_calibration(None, int4, "cpu") == export_calibration(None, parse_quant("int4-g16"), "android") == RandomTokens()
    assert export_calibration(None, parse_quant("int8"), "cpu") is None
    assert export_calibration(None, parse_quant("int4-g32-izp"), "cpu") is None  # one scheme for every tensor: no plan
    assert export_calibration(None, int4, "mlc") is None
    assert export_calibration("none", int4, "cpu") is None and export_calibration("./none", int4, "cpu") == Path("none")
    assert export_calibration("self", int4, "cpu") == SelfText()
    model = calib_model[0].source
    for calib, out in ((None, "default"), ("none", "plain")):
        r = subprocess.run([sys.executable, "-m", "mistral_edge.cli.main", "export", model, "--out", str(tmp_path / out)]
                           + (["--calib", calib] if calib else []), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    default = Bundle.open(tmp_path / "default").manifest.quant
    assert default.calibration["text"] == "random" and default.calibration["linears"] == "feed_forward.w13"
    assert Bundle.open(tmp_path / "plain").manifest.quant.calibration is None


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
    """K above MAX_COLUMNS: each segment is GPTQ on its own block of H (here K = 96 in 3 x 32), and
    the Hessian forms those blocks alone, each the block of the whole X^T X / rows."""
    w, x = layer_problem()
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 40)
    h = gptq.hessian(x)
    q4 = gptq.gptq_int4(w, h, 32, "int")
    with pytest.raises(ValueError, match="does not fit"):
        gptq.gptq_int4(w, h, 64, "int")  # groups of 64 split K = 96 as 64 + 32
    monkeypatch.setattr(gptq, "MAX_COLUMNS", 4096)
    whole = x.T @ x / len(x)
    assert h.segments == [slice(0, 32), slice(32, 64), slice(64, 96)]
    for cols, block in zip(h.segments, h.blocks):
        assert torch.allclose(block, whole[cols, cols], rtol=1e-5, atol=1e-4)
        alone = gptq.gptq_int4(w[:, cols], gptq.hessian(x[:, cols]), 32, "int")
        assert torch.equal(q4.q[:, cols], alone.q)
    assert output_error(x, w, q4) < 0.6 * output_error(x, w, quantize_int4(w, 32, "int", "rtn"))


def test_layer_by_layer_pass_holds_no_weights_between_linears(tiny):
    """Memory: each weight is read from the checkpoint when its linear is reached and dropped once
    quantized, so at every step the pass holds at most the current linear's weights (a whole-model
    pass would hold every one of them: 28 GiB in float32 for 7B)."""
    ck, windows = tiny
    alive = weakref.WeakValueDictionary()

    class Reads(Mapping):
        def __getitem__(self, name):
            t = ck.weights[name].clone()
            alive[f"{name}#{len(alive)}"] = t
            return t

        def __iter__(self):
            return iter(ck.weights)

        def __len__(self):
            return len(ck.weights)

    plan = quant_plan(ck.config, parse_quant("int4-g32-fzp"))
    pass_ = calibrate.LayerwiseGptq(ck, plan, windows)
    pass_.weights = Reads()  # read when the pass reaches them (a Checkpoint would wrap, and read, them all)
    steps = 0
    for name, codes in pass_._steps:
        gc.collect()
        held = {key.split("#")[0] for key in alive.keys()}
        assert held <= set(calibrate.weights_of(name) if name != "output" else ["output.weight"]), (name, held)
        steps += 1
    assert steps == 4 * ck.config.n_layers


def test_sensitivity_estimate_follows_the_measured_kl():
    """calibrate.int4_sensitivity (one forward, a backward recomputed layer by layer) estimates the KL
    each layer linear adds alone as int4: on a tiny model it ranks the linears as the KL measured
    by swapping each one in does, and its total is of the measured size."""
    ck = checkpoint_of(tiny_hf_mistral(dim=64, layers=3, vocab=256))
    windows = np.random.default_rng(0).integers(0, ck.config.vocab_size, (4, 64))
    tq = quant_plan(ck.config, parse_quant("int4-g32-fzp"))["layers.0.attention.wo"]
    estimate = calibrate.int4_sensitivity(ck, tq, windows)
    tokens = torch.as_tensor(windows)

    def logp(weights):
        model = ReferenceModel(ck.config, weights)
        return torch.log_softmax(model.prefill(tokens, model.new_cache(len(tokens), tokens.shape[1]), tokens.shape[1]), -1)

    ref = logp(ck.weights)
    measured = {}
    for name in estimate:
        swapped = {p: quantize_int4(ck.weights[p], 32, "float", "search").dequantize() for p in calibrate.weights_of(name)}
        measured[name] = float((ref.exp() * (ref - logp({**ck.weights, **swapped}))).sum(-1).mean())
    assert set(estimate) == {n for n in quant_plan(ck.config, parse_quant("int4-g32-fzp")) if n.startswith("layers.")}
    names = sorted(estimate)
    rank = lambda d: np.argsort(np.argsort([d[n] for n in names]))
    assert np.corrcoef(rank(estimate), rank(measured))[0, 1] > 0.5, (estimate, measured)
    assert 0.3 < sum(estimate.values()) / sum(measured.values()) < 3


def _activation_bytes(shape: tuple[int, int]) -> int:
    """Bytes of the distinct storages of live tensors shaped [B, T, ...] (the pass's activations)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and tuple(obj.shape[:2]) == shape:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def test_layer_by_layer_pass_holds_one_hidden_state_and_the_smaller_end_of_the_linear(tiny):
    """Memory (the `export --calib` defect held ~1.2 GiB after its steps at 7B widths): while the
    export stores a linear's codes, the pass holds one hidden state, the rope tables, the tokens and
    the smaller of that linear's input and output (w2: its output); not the layer's input once
    attention has added to it, nor the outputs before it (gate/up: 2 x hidden per token)."""
    ck, windows = tiny
    c = ck.config
    plan = quant_plan(c, parse_quant("int4-g32-fzp"))
    ends = {"attention.wqkv": (c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim),
            "attention.wo": (c.n_heads * c.head_dim, c.dim), "feed_forward.w13": (c.dim, 2 * c.hidden_dim),
            "feed_forward.w2": (c.hidden_dim, c.dim)}
    assert c.hidden_dim > c.dim  # so that w2's bound is below its input
    for name, _ in calibrate.LayerwiseGptq(ck, plan, windows)._steps:
        gc.collect()
        bound = 4 * windows.size * (c.dim + 2 * c.head_dim + min(ends[name.split(".", 2)[2]])) + 8 * windows.size
        assert _activation_bytes(windows.shape) <= bound, name
