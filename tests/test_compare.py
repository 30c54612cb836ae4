import csv
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import SPM_V1, TEST_TEXT, VALID_TEXT, W, checkpoint_of, chunked_logits, needs_wiki, tiny_hf_mistral
from mistral_edge.cli.main import app
from mistral_edge.quantize import calibrate
from mistral_edge.compare.quality import GridLogProbs, ReferenceStore, evaluate, kl_grid, kl_rows, log_softmax
from mistral_edge.compare.report import FIELDS
from mistral_edge.compare.run import CompareRequest, run_compare
from mistral_edge.compare import run as compare_run
from mistral_edge.compare.speed import SpeedJob, SpeedResult, SpeedTimeout, measure, timeout_for
from mistral_edge.compare.text import load_text, token_windows
from mistral_edge.compare.variants import export_code_sha256
from mistral_edge.errors import EdgeError
from mistral_edge.export.pipeline import export_onnx
from mistral_edge.model.bnb import check_bnb
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.selfgen import RANDOM_TOKENS, RANDOM_WINDOWS, random_calibration, sample_windows
from mistral_edge.quantize.spec import RandomTokens, SelfText
from mistral_edge.model.torch_session import TorchSession
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from mistral_edge.tokenizer import Tokenizer

CTX, CHUNK = 40, 8  # windows longer than W: the rolling cache wraps inside each window


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_mistral(window=W, vocab=32000)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf_model.save_pretrained(path)
    shutil.copy(SPM_V1, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def windows():
    text = TEST_TEXT.read_text()[:20000] if TEST_TEXT.is_file() else "The quick brown fox jumps. " * 400
    ids = Tokenizer.from_files({"tokenizer.model": SPM_V1}).encode(text, add_bos=False)
    return token_windows(ids, CTX, 3)


@pytest.fixture(scope="module")
def fp32_onnx(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(checkpoint_of(hf_model), parse_quant("fp32"), path, chunk=CHUNK)
    return path


def bnb_runs() -> bool:
    try:
        check_bnb("int8"), check_bnb("nf4")
    except EdgeError:
        return False
    return True


def store_for(windows, tmp_path):
    return ReferenceStore(tmp_path / "ref.u16", len(windows), CTX - 1, 32000)


# ---- protocol and metrics -------------------------------------------------------------------------


def test_perplexity_matches_transformers(hf_model, windows, fp32_onnx, tmp_path):
    """Perplexity of every token but each window's first, each window on its own: against
    transformers' sliding-window Mistral run on the whole window at once."""
    nll = 0.0
    with torch.no_grad():
        for tokens in windows:
            t = torch.as_tensor(tokens[None])
            logits = hf_model(t).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
    expected = math.exp(nll / (len(windows) * (CTX - 1)))
    model = ReferenceModel(checkpoint_of(hf_model).config, checkpoint_of(hf_model).weights)
    store = store_for(windows, tmp_path)
    torch_q = evaluate(TorchSession(model, W, CHUNK), windows, CHUNK, store, record=True)
    assert torch_q.scored_tokens == 3 * (CTX - 1)
    assert torch_q.perplexity == pytest.approx(expected, rel=1e-4)
    onnx_q = evaluate(DecoderSession(fp32_onnx, config=SessionConfig(threads=1)), windows, CHUNK, store)
    assert onnx_q.perplexity == pytest.approx(expected, rel=1e-4)
    assert onnx_q.kl_vs_fp32 < 1e-6 and onnx_q.top1_vs_fp32 == 1.0


def test_perplexity_is_split_at_the_window(hf_model, windows, tmp_path):
    """Predictions from positions < W against transformers' (every earlier token seen), those from
    positions >= W apart; sinks change only the latter; the two parts make the whole."""
    nll = np.zeros(CTX - 1)
    with torch.no_grad():
        for tokens in windows:
            t = torch.as_tensor(tokens[None])
            nll += torch.nn.functional.cross_entropy(hf_model(t).logits[0, :-1].double(), t[0, 1:],
                                                     reduction="none").numpy()
    model = ReferenceModel(checkpoint_of(hf_model).config, checkpoint_of(hf_model).weights)
    plain = evaluate(TorchSession(model, W, CHUNK), windows, CHUNK, store_for(windows, tmp_path), record=True)
    sinks = evaluate(TorchSession(model, W, CHUNK, sinks=2), windows, CHUNK, store_for(windows, tmp_path), record=True)
    assert plain.ppl_within_w == pytest.approx(math.exp(nll[:W].sum() / (3 * W)), rel=1e-4)
    assert plain.ppl_beyond_w == pytest.approx(math.exp(nll[W:].sum() / (3 * (CTX - 1 - W))), rel=1e-4)
    assert sinks.ppl_within_w == pytest.approx(plain.ppl_within_w, rel=1e-6)
    assert abs(sinks.ppl_beyond_w / plain.ppl_beyond_w - 1) > 1e-4
    n_in, n_out = 3 * W, 3 * (CTX - 1 - W)
    whole = math.exp((n_in * math.log(sinks.ppl_within_w) + n_out * math.log(sinks.ppl_beyond_w)) / (n_in + n_out))
    assert sinks.perplexity == pytest.approx(whole, rel=1e-9)
    full = evaluate(TorchSession(model, CTX, CHUNK), windows, CHUNK, store_for(windows, tmp_path), record=True)
    assert full.ppl_beyond_w is None


def test_fp32_against_itself_is_exact_and_repeats(windows, fp32_onnx, tmp_path):
    store = store_for(windows, tmp_path)
    first = evaluate(DecoderSession(fp32_onnx, config=SessionConfig(threads=1)), windows, CHUNK, store, record=True)
    assert (first.kl_vs_fp32, first.top1_vs_fp32) == (0.0, 1.0)
    again = evaluate(DecoderSession(fp32_onnx, config=SessionConfig(threads=2)), windows, CHUNK, store)
    assert again == first  # a fresh session, another thread count: bit-identical


def test_quantized_variant_kl_and_top1(hf_model, windows, fp32_onnx, tmp_path):
    """KL and top-1 of an int4 export against the stored fp32 reference, recomputed in float64."""
    store = store_for(windows, tmp_path)
    evaluate(DecoderSession(fp32_onnx, config=SessionConfig(threads=1)), windows, CHUNK, store, record=True)
    int4 = tmp_path / "int4.onnx"
    export_onnx(checkpoint_of(hf_model), parse_quant("int4-g32-rtn"), int4, chunk=CHUNK)
    q = evaluate(DecoderSession(int4, config=SessionConfig(threads=1)), windows, CHUNK, store)
    kl, agree = [], []
    for tokens, ref_session_logits in zip(windows, _all_logits(fp32_onnx, windows)):
        var = _all_logits(int4, tokens[None])[0]
        p, lq = torch.log_softmax(ref_session_logits.double(), -1), torch.log_softmax(var.double(), -1)
        kl.append((p.exp() * (p - lq)).sum(-1))
        agree.append(ref_session_logits.argmax(-1) == var.argmax(-1))
    assert q.kl_vs_fp32 == pytest.approx(float(torch.cat(kl).mean()), rel=1e-3)
    assert q.kl_vs_fp32 > 1e-4
    assert q.top1_vs_fp32 == pytest.approx(float(torch.cat(agree).double().mean()))


def _all_logits(model_path, windows):
    s = DecoderSession(model_path, config=SessionConfig(threads=1))
    out = []
    for tokens in windows:
        s.reset()
        out.append(torch.from_numpy(chunked_logits(s, np.asarray(tokens)[None], CHUNK)[0, :-1]))
    return out


def test_kl_on_the_log_prob_grid_is_exact_enough():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 32000, generator=g) * 3, torch.randn(6, 32000, generator=g) * 0.05
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax((a + b).double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum())
    p, q = (GridLogProbs.encode(log_softmax(x.float().numpy())) for x in (a, a + b))
    assert np.abs(p.decode() - lp.numpy()).max() < 5e-4
    assert kl_grid(p, q) == pytest.approx(exact, rel=1e-3)
    assert kl_grid(p, p) == 0.0
    assert kl_rows(lp.numpy(), lq.numpy()) == pytest.approx((lp.exp() * (lp - lq)).sum(-1).numpy(), rel=1e-9)


def test_token_windows():
    w = token_windows(list(range(100)), 30, 5)
    assert w.shape == (3, 30) and w.dtype == np.int64 and w[1, 0] == 30 and w[2, -1] == 89
    for args, msg in (((list(range(10)), 30, 1), "fewer than one window"), ((list(range(10)), 1, 1), "--ctx"),
                      ((list(range(10)), 5, 0), "--n-windows")):
        with pytest.raises(EdgeError, match=msg):
            token_windows(*args)


def test_peak_rss_is_the_fresh_process_own(fp32_onnx):
    """The speed worker reports its own peak, not the parent's (ru_maxrss survives fork and exec)."""
    ballast = np.ones(400 * 2**20, np.uint8)
    result = measure(SpeedJob("onnx", 1, CHUNK, list(range(1, 20)), [5, 6, 7], 1, model_path=str(fp32_onnx)))
    assert 20 * 2**20 < result.peak_rss_bytes < ballast.nbytes
    assert result.prefill_tok_s > 0 and result.decode_tok_s > 0


def test_hung_speed_worker_is_killed_at_its_timeout(tmp_path, monkeypatch):
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hang))
    job = SpeedJob("onnx", 1, CHUNK, [1, 2, 3], [4], 1, model_path="unused")
    start = time.monotonic()
    with pytest.raises(SpeedTimeout, match="killed after 1 s"):
        measure(job, timeout=1)
    assert time.monotonic() - start < 30


def test_speed_timeout_scales_with_the_work():
    small = SpeedJob("onnx", 1, 8, list(range(16)), list(range(4)), 1)
    big = replace(small, runs=9, decode=list(range(40)))
    base = timeout_for(small, 0.0, 0)
    assert base == timeout_for(big, 0.0, 0) > 0  # start-up alone
    assert timeout_for(small, 0.01, 0) - base == pytest.approx(20 * 2 * (2 + 4) * 0.01)
    assert timeout_for(big, 0.01, 0) - base == pytest.approx(20 * 10 * (2 + 40) * 0.01)
    assert timeout_for(small, 0.0, 10**9) > base  # loading weights takes time too


def test_timed_out_speed_is_a_note_row(monkeypatch):
    """A hung worker costs its timeout and one log line; the row keeps its quality, speed empty."""
    from types import SimpleNamespace

    from rich.progress import Progress

    def hang(job, timeout):
        raise SpeedTimeout(f"speed worker killed after {timeout:.0f} s (its timeout)")

    monkeypatch.setattr(compare_run, "measure", hang)
    lines = []
    run = SimpleNamespace(chunk_step_s=0.0, progress=Progress(disable=True), log=lines.append, threads=1,
                          req=SimpleNamespace(ctx=CTX), windows=np.zeros((2, CTX)), text="t")
    job = SpeedJob("onnx", 1, CHUNK, [1, 2, 3], [4], 1, model_path="unused")
    assert compare_run._Run.speed(run, job, "int8", 0) is None
    assert len(lines) == 1 and "int8: speed worker killed after 120 s" in lines[0]
    quality = SimpleNamespace(perplexity=2.0, kl_vs_fp32=0.1, top1_vs_fp32=0.9, scored_tokens=10,
                              ppl_within_w=2.0, ppl_beyond_w=None)
    row = compare_run._Run.row(run, "int8", "onnx", 16, 0, quality, None, note="n", model_bits_per_weight=8.0,
                               size_bytes=1, weight_bytes=1, kv_cache_bytes=1)
    assert row.perplexity == 2.0 and row.decode_tok_s is None and row.peak_rss_bytes is None
    assert row.note == "n; speed not measured: the worker timed out"
    measured = compare_run._Run.row(run, "int8", "onnx", 16, 0, quality, SpeedResult(1.0, 2.0, 3), model_bits_per_weight=8.0,
                                    size_bytes=1, weight_bytes=1, kv_cache_bytes=1)
    assert (measured.decode_tok_s, measured.peak_rss_bytes, measured.note) == (2.0, 3, "")


def test_awq_scales_keep_the_fp32_function_and_record_inputs(hf_model, windows):
    ck = checkpoint_of(hf_model)
    inputs = calibrate.collect_inputs(ck, windows)
    # Layer 0's q/k/v input is the RMS-normed embedding: recompute its mean |x| directly.
    h = ck.weights["tok_embeddings.weight"][torch.as_tensor(windows.reshape(-1))]
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ck.config.norm_eps) \
        * ck.weights["layers.0.attention_norm.weight"]
    assert torch.allclose(inputs["layers.0.attention.wqkv"].mean_abs, normed.abs().mean(0), rtol=1e-5)
    assert inputs["layers.1.feed_forward.w2"].rows == windows.size and len(inputs) == 4 * ck.config.n_layers
    scaled, act, alphas = calibrate.awq_scales(ck, parse_quant("int4-g32"), inputs)
    assert any(a > 0 for a in alphas.values())  # some linear did get scaled
    ref, new = (ReferenceModel(c.config, c.weights) for c in (ck, scaled))
    t = torch.as_tensor(windows[:1])
    a, b = (m.prefill(t, m.new_cache(1, W), W) for m in (ref, new))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_calibrated_plan(hf_model, windows):
    ck = checkpoint_of(hf_model)
    cal = calibrate.calibrate_int4(ck, parse_quant("int4-g32"), windows, int8_share=0.3)
    linears = {n: tq for n, tq in cal.plan.items() if n.startswith("layers.")}
    int8 = [n for n, tq in linears.items() if tq.kind == "int8"]
    assert int8 and sorted(int8) == sorted(cal.int8)
    assert all(tq.act_scale is not None for tq in linears.values() if tq.kind == "int4")
    size = {n: sum(ck.weights[w].numel() for w in calibrate.weights_of(n)) for n in linears}
    assert sum(size[n] for n in int8) <= 0.3 * sum(size.values())


# ---- the command --------------------------------------------------------------------------------


@needs_wiki
def test_compare_writes_table_json_csv_png_and_reuses_bundles(model_dir, tmp_path, monkeypatch):
    req = CompareRequest(model=str(model_dir), quants="fp32,int8,int4-g32,int4-g32-awq", text=TEST_TEXT,
                         calib=VALID_TEXT, ctx=CTX, n_windows=3, threads=1, runs=1, out=tmp_path)
    result = CliRunner().invoke(app, ["compare", str(model_dir), "--quants", req.quants, "--text", str(TEST_TEXT),
                                      "--calib", str(VALID_TEXT), "--ctx", str(CTX), "--n-windows", "3",
                                      "--threads", "1", "--runs", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "int4-g32-mzp-search-awq" in result.output and "bitsandbytes" in result.output
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["quant"], r["backend"]) for r in rows] == [
        ("fp32", "onnx"), ("int8", "onnx"), ("int4-g32-mzp-search", "onnx"), ("int4-g32-mzp-search-awq", "onnx"),
        ("fp32", "torch"), ("bf16", "torch"), ("bnb-int8", "bitsandbytes"), ("bnb-nf4", "bitsandbytes")]
    measured = rows[:6]
    for r in measured:
        assert list(r) == FIELDS
        for key in ("perplexity", "kl_vs_fp32", "top1_vs_fp32", "prefill_tok_s", "decode_tok_s", "model_bits_per_weight"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["quant"], key)
        assert r["peak_rss_bytes"] > 10 * 2**20 and r["threads"] == 1 and r["scored_tokens"] == 3 * (CTX - 1)
        assert r["kv_cache_bytes"] == 2 * 2 * 2 * W * 8 * (2 if r["quant"] == "bf16" else 4)
    fp32, int8, int4, awq, torch32, bf16 = measured
    assert (fp32["kl_vs_fp32"], fp32["top1_vs_fp32"], fp32["model_bits_per_weight"]) == (0.0, 1.0, 32.0)
    assert 8 < int8["model_bits_per_weight"] < 9.5 and 4.5 < int4["model_bits_per_weight"] < int8["model_bits_per_weight"]
    assert int4["model_bits_per_weight"] <= awq["model_bits_per_weight"] < int8["model_bits_per_weight"] and awq["kl_vs_fp32"] > 0
    assert fp32["size_bytes"] > int8["size_bytes"] > int4["size_bytes"] and torch32["size_bytes"] is None
    assert torch32["kl_vs_fp32"] < 1e-5 and torch32["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-4)
    bnb_int8, bnb_nf4 = rows[6:]
    assert bnb_int8["note"].startswith("bitsandbytes") and bnb_nf4["note"].startswith("bitsandbytes")
    if not bnb_runs():  # a note saying why (tests/test_bnb.py checks it)
        assert bnb_int8["perplexity"] is None and bnb_nf4["perplexity"] is None
    else:  # measured like the torch rows: LLM.int8 close to fp32, nf4 further off, both smaller
        assert 0 < bnb_int8["kl_vs_fp32"] < bnb_nf4["kl_vs_fp32"] and bnb_int8["top1_vs_fp32"] > 0.9
        assert torch32["weight_bytes"] > bnb_int8["weight_bytes"] and bnb_nf4["decode_tok_s"] > 0
        assert bnb_int8["kv_cache_bytes"] == torch32["kv_cache_bytes"] and bnb_nf4["peak_rss_bytes"] > 10 * 2**20
    with open(tmp_path / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == FIELDS and len(table) == len(rows)
    assert float(table[1]["perplexity"]) == int8["perplexity"]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "bundles" / f"int4-g32-mzp-search-awq-w{W}" / "variant.json").read_text())
    assert record["key"]["calibration"]["text_sha256"] and "int8" in awq["note"]
    assert record["bits_per_weight"] == awq["model_bits_per_weight"]

    # A second run reuses every bundle and repeats every quality number exactly (its speed, measured
    # above, is not what it checks: a worker process per row would only add their start-up).
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "bundles").glob("*/model.onnx")}
    monkeypatch.setattr(compare_run, "measure", lambda job, timeout: SpeedResult(1.0, 1.0, 1))
    again = run_compare(replace(req, torch_rows=False), log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 4
    for old, new in zip(measured, again):
        assert (old["perplexity"], old["kl_vs_fp32"], old["top1_vs_fp32"]) == \
            (new.perplexity, new.kl_vs_fp32, new.top1_vs_fp32)


@needs_wiki
def test_window_sweep(model_dir, tmp_path):
    rows = run_compare(CompareRequest(model=str(model_dir), quants="int8", text=TEST_TEXT, windows=(8, 32),
                                      ctx=CTX, n_windows=2, threads=1, runs=1, out=tmp_path, torch_rows=False),
                       log=lambda line: None)
    assert [(r.quant, r.window) for r in rows] == [("fp32", 32), ("int8", 8), ("int8", 32)]
    assert rows[1].kv_cache_bytes * 4 == rows[2].kv_cache_bytes
    assert rows[1].kl_vs_fp32 > rows[2].kl_vs_fp32  # W=8 < ctx: a shorter context than the reference's

    # A bundle built by other export code (its .code stamp differs) is exported again; the rest are reused.
    bundles = tmp_path / "bundles"
    (bundles / "int8-w8.code").write_text("other code")
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in bundles.glob("*/model.onnx")}
    run_compare(CompareRequest(model=str(model_dir), quants="int8", text=TEST_TEXT, windows=(8, 32), ctx=CTX,
                               n_windows=1, threads=1, runs=1, out=tmp_path, torch_rows=False), log=lambda line: None)
    changed = {p.parent.name for p in bundles.glob("*/model.onnx") if p.stat().st_mtime_ns != stamps[p.parent.name]}
    assert changed == {"int8-w8"} and (bundles / "int8-w8.code").read_text() == export_code_sha256()


def test_offline_without_text_says_so(monkeypatch, model_dir, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = CliRunner().invoke(app, ["compare", str(model_dir), "--out", str(tmp_path)])
    assert isinstance(result.exception, EdgeError)
    message = str(result.exception)
    assert message.startswith("offline: cannot download wikitext-2") and "--text FILE" in message
    with pytest.raises(EdgeError, match="offline"):
        load_text(None, "wikitext-2")


@needs_wiki
@pytest.mark.parametrize("calib", ["self", "random"])
def test_compare_calib_self_or_random_calibrates_without_a_text(model_dir, tmp_path, monkeypatch, calib):
    """`--calib self` / `--calib random`: the -gptq row's codes come from the model's own samples or from
    seeded random tokens (their sha256 keys the bundle), and the row is scored like any other."""
    monkeypatch.setattr(compare_run, "measure", lambda job, timeout: SpeedResult(1.0, 1.0, 1))
    result = CliRunner().invoke(app, ["compare", str(model_dir), "--quants", "fp32,int4-g32-gptq", "--text",
                                      str(TEST_TEXT), "--calib", calib, "--ctx", str(CTX), "--n-windows", "2",
                                      "--threads", "1", "--runs", "1", "--no-torch-rows", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    fp32, gptq = json.loads((tmp_path / "compare.json").read_text())
    assert gptq["quant"] == "int4-g32-mzp-search-gptq" and 0 < gptq["kl_vs_fp32"] < 1
    record = json.loads((tmp_path / "bundles" / f"int4-g32-mzp-search-gptq-w{W}" / "variant.json").read_text())
    ck = load_checkpoint(str(model_dir))
    ids = (sample_windows(ck, calibrate.CALIB_WINDOWS, CTX, SelfText()) if calib == "self"
           else random_calibration(ck.config, RandomTokens(), RANDOM_WINDOWS, RANDOM_TOKENS)[0])
    assert record["key"]["calibration"]["text_sha256"] == hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()


TEXT = Path("text.txt")  # stands for a small UTF-8 file written in tmp_path


@pytest.mark.parametrize("kwargs, message", [
    ({"quants": "fp32,int3"}, "unknown quantization 'int3'"),
    ({"quants": " , "}, "--quants is empty"),
    ({"quants": "int8-awq"}, "applies to int4 only"),
    ({"quants": "int4-awq"}, "need --calib FILE"),
    ({"quants": "int4-awq", "calib": TEXT}, "is the evaluation text"),
    ({"windows": (0,)}, "--window must be a positive integer, got 0"),
    ({"runs": 0}, "--runs must be a positive integer"),
    ({"ctx": 1}, "--ctx must be at least 2"),
    ({"threads": -1}, "--threads must be >= 0"),
    ({"text": Path("nonexistent.txt")}, "no such text file"),
    ({"text": Path("empty.txt")}, "the text is empty"),
    ({"text": Path("latin1.txt")}, "not UTF-8 text"),
    ({"text": None, "dataset": "ptb"}, "unknown dataset 'ptb'"),
    ({"dataset": "wikitext-2"}, "--text or --dataset, not both"),
])
def test_bad_inputs_fail_before_loading_the_model(kwargs, message, tmp_path):
    (tmp_path / TEXT).write_text("Some evaluation text.\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    paths = {k: tmp_path / v if isinstance(v, Path) else v for k, v in {"text": TEXT, **kwargs}.items()}
    with pytest.raises(EdgeError, match=re.escape(message)):
        run_compare(CompareRequest(model=str(tmp_path / "not-loaded"), **paths))


@pytest.mark.parametrize("out", ["a-file", "a-file/below"])
def test_out_that_cannot_be_a_directory_fails_before_loading(tmp_path, out):
    (tmp_path / TEXT).write_text("Some evaluation text.\n")
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(EdgeError, match="is not a directory"):
        run_compare(CompareRequest(model=str(tmp_path / "not-loaded"), text=tmp_path / TEXT, out=tmp_path / out))
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_window_past_the_bound_fails_before_loading(tmp_path):
    (tmp_path / TEXT).write_text("Some evaluation text.\n")
    with pytest.raises(EdgeError, match="window must be an integer between 1 and"):
        run_compare(CompareRequest(model=str(tmp_path / "not-loaded"), text=tmp_path / TEXT, windows=(2**40,)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_removes_the_scratch_files_and_exits_in_one_line(model_dir, tmp_path, sig):
    """`compare` signalled once its reference scratch directory exists (it is then exporting or
    measuring): that directory and any half-written bundle go, and it exits 1 with one error line."""
    (tmp_path / TEXT).write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from mistral_edge.cli.main import main; main()", "compare",
                             str(model_dir), "--quants", "int8", "--text", str(tmp_path / TEXT), "--out", str(out),
                             "--ctx", str(CTX), "--n-windows", "1", "--runs", "1", "--threads", "1", "--no-torch-rows"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(p.name.startswith(".reference-") for p in out.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no scratch"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert proc.returncode == 1 and errors == [stderr.splitlines()[-1]], stderr
    assert errors[0].startswith(f"error: compare stopped by {sig.name}: its scratch files are removed")
    assert [p.name for p in out.iterdir()] in ([], ["bundles"])
    assert not [p for p in out.rglob(".*")], list(out.rglob("*"))  # no scratch, no bundle temp dir


def test_cli_window_options(model_dir, tmp_path):
    (tmp_path / TEXT).write_text("Some evaluation text.\n")
    for args, message in ((["--window", "0"], "--window must be a positive integer"),
                          (["--windows", "256,x"], "comma-separated integers"),
                          (["--window", "16", "--windows", "8,16"], "not both")):
        result = CliRunner().invoke(app, ["compare", str(model_dir), "--text", str(tmp_path / TEXT), *args])
        assert isinstance(result.exception, EdgeError) and message in str(result.exception), result.output


# ---- the real demo model ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_wiki
def test_demo_model_fp32_and_int8(tmp_path):
    rows = run_compare(CompareRequest(quants="fp32,int8", text=TEST_TEXT, n_windows=2, runs=1, threads=1,
                                      out=tmp_path, torch_rows=False), log=lambda line: None)
    fp32, int8 = rows
    assert 15 < fp32.perplexity < 40 and (fp32.kl_vs_fp32, fp32.top1_vs_fp32) == (0.0, 1.0)
    assert abs(int8.perplexity / fp32.perplexity - 1) < 0.02
    assert 0 < int8.kl_vs_fp32 < 0.02 and int8.top1_vs_fp32 > 0.9
    assert int8.size_bytes < fp32.size_bytes / 3 and fp32.kv_cache_bytes == int8.kv_cache_bytes


def test_quant_format_suffixes():
    """`+qdq` / `+integer` export a variant in that weight format, beside a `+kvN` suffix in either order."""
    from mistral_edge.compare.variants import parse_quants

    choices = parse_quants("int8,int8+integer,int8+kv8+integer,int8+INTEGER+kv8,int4+qdq")
    assert [c.name for c in choices] == ["int8", "int8+integer", "int8+kv8+integer", "int4-g32-mzp-search+qdq"]
    assert [(c.fmt, c.kv_cache) for c in choices] == [(None, None), ("integer", None), ("integer", "int8"), ("qdq", None)]
    for bad in ("int8+integer+qdq", "int8+nbits", "int8+kv8+kv16"):
        with pytest.raises(EdgeError, match=r"unknown suffix \+\w+; expected \+kv8 or \+kv16 .* \+qdq or \+integer"):
            parse_quants(bad)
