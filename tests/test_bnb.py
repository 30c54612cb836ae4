"""bitsandbytes int8 / nf4 linears in the PyTorch reference (`--backend torch --quant`), and the clear
error when bitsandbytes cannot run. Tests that run bitsandbytes skip only when it is not importable."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import W, checkpoint_of, chunked_logits, tiny_hf_mistral, write_tiny_hf_dir
from mistral_edge.cli.main import app
from mistral_edge.compare.run import CompareRequest, run_compare
from mistral_edge.errors import EdgeError
from mistral_edge.model import bnb as bnb_mod
from mistral_edge.model.bnb import check_bnb, quantize_linears
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.model.torch_session import TorchSession
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.tokenizer import Tokenizer

try:
    import bitsandbytes
except ImportError:
    bitsandbytes = None
needs_bnb = pytest.mark.skipif(bitsandbytes is None, reason="bitsandbytes is not importable "
                                                            "(pip install 'mistral-edge[bnb]')")


@pytest.fixture(autouse=True)
def fresh_check():
    """check_bnb caches success; tests that break bitsandbytes must not see an earlier verdict."""
    check_bnb.cache_clear()
    yield
    check_bnb.cache_clear()


@pytest.fixture(scope="module")
def ck():
    # dim 64: attention linears [64, 64] take bitsandbytes' packed nf4 CPU kernel (where the CPU has
    # AVX512-BF16), the FFN's [136, 64] / [64, 136] do not: both nf4 paths run.
    return checkpoint_of(tiny_hf_mistral(window=W, vocab=128, dim=64))


def dequantized(model: ReferenceModel, quant: str) -> dict[str, torch.Tensor]:
    """The float weights the bitsandbytes modules hold (read before their first forward)."""
    F = bitsandbytes.functional
    if quant == "int8":
        return {k: F.int8_vectorwise_dequant(m.weight.data, m.weight.SCB) for k, m in model.linears.items()}
    return {k: F.dequantize_4bit(m.weight.data, m.weight.quant_state) for k, m in model.linears.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_bnb
@pytest.mark.parametrize("quant, vs_weights, vs_fp32, top1", [("int8", 0.03, 0.05, 0.9), ("nf4", 0.02, 0.3, 0.75)])
def test_bnb_logits_track_the_reference(ck, quant, vs_weights, vs_fp32, top1):
    """Over 40 tokens (the cache wraps at W=16, chunks of 8): the bnb model computes what its quantized
    weights say (int8 also rounds activations to int8, nf4 to bf16 in the packed kernel), and stays
    within the quantization's error of the fp32 reference."""
    before = {k: v.clone() for k, v in ck.weights.items()}
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    fp32 = ReferenceModel(ck.config, ck.weights)
    expected = fp32.prefill(tokens, fp32.new_cache(2), 8)

    model = ReferenceModel(ck.config, ck.weights)
    nbytes = quantize_linears(model, quant)
    assert len(model.linears) == 7 * ck.config.n_layers and not any(k.startswith("layers.") and w.ndim == 2
                                                                    for k, w in model.w.items())
    assert nbytes < ck.n_params * 4 / 2
    same_weights = ReferenceModel(ck.config, {**ck.weights, **dequantized(model, quant)})
    got = model.prefill(tokens, model.new_cache(2), 8)

    assert rel(got, same_weights.prefill(tokens, same_weights.new_cache(2), 8)) < vs_weights
    assert 1e-4 < rel(got, expected) < vs_fp32  # really quantized, within bounds
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= top1
    assert all(torch.equal(before[k], v) for k, v in ck.weights.items())  # the checkpoint is left intact


@needs_bnb
def test_bnb_session_decode_matches_prefill(ck):
    """Token-by-token decoding through TorchSession gives the logits of the chunked prefill."""
    model = ReferenceModel(ck.config, ck.weights)
    quantize_linears(model, "nf4")
    tokens = np.random.default_rng(0).integers(0, 128, (1, 24))
    session = TorchSession(model, W, 8)
    full = chunked_logits(session, tokens, 8)
    session.reset()
    steps = np.concatenate([session.step(tokens[:, i:i + 1]) for i in range(24)], 1)
    np.testing.assert_allclose(steps, full, atol=2e-2 * np.abs(full).max())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny"), W)


@needs_bnb
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_cli_generate_with_bnb(model_dir, quant):
    """`generate --backend torch --quant Q` streams the greedy reply of the bitsandbytes model."""
    from mistral_edge.model.loaders import load_checkpoint

    result = CliRunner().invoke(app, ["generate", "--backend", "torch", "--model", str(model_dir), "--quant", quant,
                                      "--raw", "--max-new-tokens", "8", "Hello world"])
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(str(model_dir))
    model = ReferenceModel(ck.config, ck.weights)
    quantize_linears(model, quant)
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    gen = Generator(TorchSession(model, W, W), tok)
    expected = "".join(gen.stream(tok.encode("Hello world"), GenerationConfig(max_new_tokens=8)))
    assert expected and result.output == expected + "\n"


# ---- when bitsandbytes cannot run: one clear line (these run with or without bitsandbytes) ----------


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import sys; from mistral_edge.cli.main import main; sys.argv = ['mistral-edge', *{args!r}]; main()"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_cli_without_bitsandbytes_says_so(tmp_path):
    blocker = tmp_path / "block" / "bitsandbytes"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_cli(["generate", "--backend", "torch", "--quant", "nf4", "hi"], env)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: bitsandbytes int8/nf4 needs the bitsandbytes package (pip install 'mistral-edge[bnb]'): "
        "ImportError: bitsandbytes is not installed here"]


def test_bnb_without_a_backend_says_why(monkeypatch):
    """A bitsandbytes that imports but cannot quantize or multiply here (no kernel for the device)."""
    def broken(*args):
        raise RuntimeError("no kernel for this device\nsecond line of bitsandbytes' message")

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(bnb_mod, "bnb_linear", broken)
    with pytest.raises(EdgeError) as e:
        check_bnb("nf4")
    assert str(e.value) == "bitsandbytes nf4 needs a working cpu backend: RuntimeError: no kernel for this device"


def test_bad_quant_choices():
    with pytest.raises(EdgeError, match="unknown bitsandbytes quant 'int4'"):
        check_bnb("int4")
    r = run_cli(["generate", "--backend", "torch", "--quant", "int4", "hi"])
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown --quant 'int4' for the torch backend; " \
                                                     "expected none, int8, nf4, int8-wo, int4-wo"
    r = run_cli(["generate", "--bundle", "/nonexistent", "--quant", "int8", "hi"])
    assert r.returncode == 1 and r.stderr.strip() == "error: --quant applies to --backend torch; " \
                                                     "a bundle's quantization is chosen at export"


def test_compare_notes_bnb_rows_it_cannot_run(monkeypatch, model_dir, tmp_path):
    from mistral_edge.compare import run as compare_run
    from mistral_edge.compare.speed import SpeedResult

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    # the rows' speed (a worker process each; tests/test_compare.py measures it) is not what this checks
    monkeypatch.setattr(compare_run, "measure", lambda job, timeout: SpeedResult(1.0, 1.0, 1))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    lines = []
    rows = run_compare(CompareRequest(model=str(model_dir), quants="fp32", text=text, ctx=24, n_windows=1,
                                      threads=1, runs=1, out=tmp_path / "out"), log=lines.append)
    assert [(r.quant, r.backend) for r in rows] == [("fp32", "onnx"), ("fp32", "torch"), ("bf16", "torch"),
                                                    ("bnb-int8", "bitsandbytes"), ("bnb-nf4", "bitsandbytes")]
    for r in rows[3:]:
        assert r.perplexity is None and r.note.startswith("bitsandbytes int8/nf4 needs the bitsandbytes package")
        assert any(line.startswith(f"{r.quant} not measured: bitsandbytes") for line in lines)
