"""The torch backend's device/dtype plumbing, captured steps over the static rolling cache, and the
weight-only int8/int4 linears. Everything runs on a CPU; the CUDA tests skip without a GPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import checkpoint_of, tiny_hf_mistral, write_tiny_hf_dir
from mistral_edge.cli.main import app
from mistral_edge.errors import EdgeError
from mistral_edge.model.cache import RollingKVCache
from mistral_edge.model.captured import CaptureConfig, CapturedSession, StaticRollingCache
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.model.torch_session import TorchSession, check_quant, quantize, resolve_device, resolve_dtype
from mistral_edge.model.weight_only import (Int4Linear, Int8Linear, dequantize_int4, int4_layout, quantize_int4,
                                            quantize_int8)
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.tokenizer import Tokenizer

W = 8
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.fixture(scope="module")
def ck():
    return checkpoint_of(tiny_hf_mistral(window=W, vocab=128, dim=64))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny"), W)


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    code = f"import sys; from mistral_edge.cli.main import main; sys.argv = ['mistral-edge', *{args!r}]; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# ---- device and dtype ----------------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("args", [["generate", "--backend", "torch", "--device", "cuda", "hi"],
                                  ["chat", "--device", "cuda"],
                                  ["compare", "--device", "cuda", "--text", "/nonexistent"]])
def test_cuda_asked_for_and_absent_is_one_line(args):
    r = run_cli(args)
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    assert r.returncode == 1 and r.stdout == ""  # compare's progress display leaves a blank line before it
    assert r.stderr.strip() == f"error: --device cuda: CUDA is not available ({why}; torch {torch.__version__})"


def test_device_and_dtype_choices():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(EdgeError, match="unknown --device 'tpu'; expected cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(EdgeError, match="unknown --dtype 'int8'; expected bf16, fp16, fp32"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(EdgeError, match="--quant int4-wo on CUDA computes in bf16"):
        check_quant("int4-wo", torch.device("cuda"), torch.float16)
    r = run_cli(["generate", "--bundle", "/nonexistent", "--device", "cpu", "--dtype", "bf16", "hi"])
    assert r.returncode == 1 and r.stderr == ("error: --device, --dtype cannot be used with --backend onnx: "
                                              "they apply to --backend torch\n")


def test_cli_generate_dtype_and_quant(model_dir):
    """--dtype bf16 and --quant int8-wo reach the model: the reply is the one the same model streams."""
    ck = load_checkpoint(str(model_dir))
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    model = ReferenceModel(ck.config, ck.weights, torch.bfloat16)
    quantize(model, "int8-wo")  # bf16 at K = 136 was garbage before INT8_K_MULTIPLE
    expected = "".join(Generator(TorchSession(model, W, W), tok).stream(tok.encode("Hello world"),
                                                                        GenerationConfig(max_new_tokens=8)))
    result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--dtype", "bf16", "--quant", "int8-wo",
                                      "--raw", "--max-new-tokens", "8", "Hello world"])
    assert result.exit_code == 0, result.output
    assert expected and result.output == expected + "\n"


# ---- the static cache and the captured steps -----------------------------------------------------


@pytest.mark.parametrize("sinks, kv_cache", [(0, None), (3, None), (0, "int8"), (3, "int8"), (3, "fp16")])
def test_static_write_equals_the_rolling_write(sinks, kv_cache):
    """Padding and sink slots included: the fixed-shape write leaves the cache exactly as RollingKVCache.write
    does, an int8 cache's scales too."""
    torch.manual_seed(0)
    ref, static = (cls(1, 3, 2, W, 4, sinks=sinks, kv_cache=kv_cache) for cls in (RollingKVCache, StaticRollingCache))
    for chunk, valid in [(5, [5, 3, 0]), (4, [4, 4, 2]), (1, [1, 0, 1]), (W - sinks, [W - sinks, 3, W - sinks])] * 2:
        k, v = torch.randn(3, 2, chunk, 4), torch.randn(3, 2, chunk, 4)
        n = torch.tensor(valid)
        for cache in (ref, static):
            cache.write(0, k, v, n)
            cache.advance(n)
        assert torch.equal(ref.k[0], static.k[0]) and torch.equal(ref.v[0], static.v[0])
        assert all(torch.equal(a, b) for a, b in zip(ref.k_scale + ref.v_scale, static.k_scale + static.v_scale))
        assert len(static.k_scale) == (kv_cache == "int8") and static.k[0].dtype == ref.store_dtype
        assert torch.equal(ref.pos, static.pos)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("compiled", [False, True])
def test_captured_steps_equal_eager_past_the_window_with_one_capture_each(ck, compiled):
    """A 13-token prompt in chunks of 4 (the last padded), then 3W decode steps: every logit equals the
    eager reference's, and each chunk size was captured (compiled) once, never again as positions
    grow past W and wrap the cache three times."""
    torch._dynamo.reset()
    model = ReferenceModel(ck.config, ck.weights)
    backend = CountingBackend()
    session = CapturedSession(model, W, 4, config=CaptureConfig(sizes=(1, 4), compile=backend if compiled else None))
    eager = TorchSession(model, W, 4)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 128, (1, 13))
    for _ in range(2):  # the second time after reset(): the captured buffers are cleared in place
        for s in range(0, 13, 4):
            np.testing.assert_allclose(session.step(prompt[:, s:s + 4], all_logits=True),
                                       eager.step(prompt[:, s:s + 4], all_logits=True), atol=1e-5)
        for tok in rng.integers(0, 128, 3 * W):
            np.testing.assert_allclose(session.step(np.array([[tok]])), eager.step(np.array([[tok]])), atol=1e-5)
        assert session.positions.tolist() == eager.positions.tolist() == [13 + 3 * W]
        session.reset(), eager.reset()
    assert session.captures == 2
    assert backend.graphs == (2 if compiled else 0)


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_captured_batch_with_ragged_valid_lengths(ck, kv_cache):
    model = ReferenceModel(ck.config, ck.weights)
    session = CapturedSession(model, W, 4, batch=2, config=CaptureConfig(sizes=(1, 4)), kv_cache=kv_cache)
    eager = TorchSession(model, W, 4, 2, kv_cache=kv_cache)
    tokens = np.random.default_rng(1).integers(0, 128, (2, 4))
    for valid in ([4, 2], [3, 4], [1, 1]):
        np.testing.assert_allclose(session.step(tokens, np.array(valid)), eager.step(tokens, np.array(valid)),
                                   atol=1e-5)
    assert session.positions.tolist() == eager.positions.tolist() == [8, 7]
    assert session.cache.store_dtype == eager.cache.store_dtype and len(session.cache.k_scale) == len(eager.cache.k_scale)


# ---- weight-only int8 / int4 ----------------------------------------------------------------------


def test_int8_quantization_and_kernel():
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(5, 256)
    q, scale = quantize_int8(w)
    deq = q.float() * scale[:, None]
    assert q.dtype == torch.int8 and (w - deq).abs().le(scale[:, None] / 2 + 1e-6).all()
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]:
        layer = Int8Linear(w, dtype)
        out = layer(x.to(dtype)[None]).float()
        ref = x.to(dtype).float() @ deq.T
        assert out.shape == (1, 5, 96) and (out[0] - ref).abs().max() <= tol * ref.abs().max()
        layer.fused = True  # the gpt-fast form computes the same product
        assert (layer(x.to(dtype)[None]).float()[0] - ref).abs().max() <= tol * ref.abs().max()


def test_int4_quantization_and_kernel():
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(5, 256)
    assert int4_layout(96, 256) == (128, 8) and int4_layout(192, 576) == (64, 4) and int4_layout(24, 256) is None
    q, sz = quantize_int4(w, 64)
    deq = dequantize_int4(q, sz, 64)
    assert sz.shape == (4, 96, 2) and int(q.min()) >= 0 and int(q.max()) <= 15
    step = sz[..., 0].T.repeat_interleave(64, 1)  # [N, K] scale of each weight's group
    assert (w - deq).abs().le(step / 2 + 1e-6).all()
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]:
        out = Int4Linear(w, dtype, 64, 8)(x.to(dtype)[None]).float()
        ref = x.to(dtype).float() @ dequantize_int4(q, sz.to(dtype), 64).T
        assert (out[0] - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("quant, top1, float_linears", [
    ("int8-wo", 0.95, {"feed_forward.w2.weight"}),  # K = 136: see INT8_K_MULTIPLE
    ("int4-wo", 0.6, {"feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"}),  # N or K = 136
])
def test_weight_only_model_tracks_fp32(ck, quant, top1, float_linears):
    tokens = np.random.default_rng(2).integers(0, 128, (1, 16))
    full = TorchSession(ReferenceModel(ck.config, ck.weights), W, W)
    expected = np.concatenate([full.step(tokens[:, s:s + W], all_logits=True) for s in (0, W)], 1)
    model = ReferenceModel(ck.config, ck.weights)
    fp32_bytes = quantize(ReferenceModel(ck.config, ck.weights), "none")
    nbytes = quantize(model, quant)
    floats = {k.split(".", 2)[2] for k, w in model.w.items() if k.startswith("layers.") and w.ndim == 2}
    assert floats == float_linears
    assert nbytes < fp32_bytes - sum(m.weight.numel() for m in model.linears.values())  # 4 B a weight saved, at least 1
    quantized = TorchSession(model, W, W)
    got = np.concatenate([quantized.step(tokens[:, s:s + W], all_logits=True) for s in (0, W)], 1)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= top1


# ---- on a GPU -------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_graph_equals_eager_with_one_capture(ck):
    model = ReferenceModel(ck.config, ck.weights, torch.bfloat16, "cuda")
    session, eager = CapturedSession(model, W, 4, config=CaptureConfig(sizes=(1, 4))), TorchSession(model, W, 4)
    tokens = np.random.default_rng(0).integers(0, 128, 3 * W + 4)
    np.testing.assert_allclose(session.step(tokens[None, :4]), eager.step(tokens[None, :4]), atol=2e-2)
    for tok in tokens[4:]:
        np.testing.assert_allclose(session.step(np.array([[tok]])), eager.step(np.array([[tok]])), atol=2e-2)
    assert session.captures == 2 and all(s.graph is not None for s in session.steps.values())


@needs_cuda
@pytest.mark.parametrize("quant", ["int8-wo", "int4-wo"])
def test_cuda_weight_only_kernels_match_dequantized(quant):
    torch.manual_seed(0)
    w, x = torch.randn(256, 512, device="cuda"), torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    if quant == "int8-wo":
        q, scale = quantize_int8(w)
        deq, layer = q.float() * scale[:, None], Int8Linear(w, torch.bfloat16)
    else:
        q, sz = quantize_int4(w, 128)
        deq, layer = dequantize_int4(q, sz.bfloat16(), 128), Int4Linear(w, torch.bfloat16, 128, 8)
    ref = x.float() @ deq.T
    assert (layer(x).float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.slow  # inductor compiles the tiny model's two step shapes: about 3 minutes on a busy 2-core machine
def test_cli_generate_compiled_equals_eager(model_dir):
    """--compile (inductor on a CPU, then the same static-buffer steps) streams the eager reply, 20 tokens
    past W = 8, so the compiled cache write wraps."""
    args = ["generate", "--model", str(model_dir), "--raw", "--max-new-tokens", "20", "Hello world"]
    eager, compiled = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--compile"])
    assert eager.exit_code == compiled.exit_code == 0
    assert len(eager.output) > 20 and compiled.output == eager.output
