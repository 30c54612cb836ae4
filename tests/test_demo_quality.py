"""int8 and int4 exports of the real demo model against its fp32 export, on WikiText-2 test text.

Thresholds come from measurement (see the comments), with headroom for ORT's int8-compute kernels.
"""


import numpy as np
import pytest
from helpers import TEST_TEXT, chunked_logits

from mistral_edge.export.pipeline import export_onnx
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from mistral_edge.tokenizer import Tokenizer

CTX, WINDOWS = 256, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not TEST_TEXT.exists():
        pytest.skip(f"WikiText-2 not found at {TEST_TEXT}")
    ck = load_checkpoint(None)
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    ids = tok.encode(TEST_TEXT.read_text(encoding="utf-8")[:20000], add_bos=False)
    windows = [ids[i * CTX:(i + 1) * CTX] for i in range(WINDOWS)]
    return ck, windows, tmp_path_factory.mktemp("demo")


def log_probs(path, windows):
    session = DecoderSession(path, config=SessionConfig(threads=2, chunk=128))
    out = []
    for w in windows:
        session.reset()
        logits = chunked_logits(session, np.array([w]), 128)[0]
        z = logits - logits.max(-1, keepdims=True)
        out.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def fp32(demo):
    ck, windows, tmp = demo
    export_onnx(ck, parse_quant("fp32"), tmp / "fp32.onnx", window=512)
    return log_probs(tmp / "fp32.onnx", windows)


# Measured on these 2 x 256 tokens (ORT 1.32, MatMulNBits accuracy_level 4, i.e. int8 activations):
# int8 top-1 0.947, KL 0.0066, NLL -0.1%; int4 (the default: g32, mixed zero points, search, int8 head)
# top-1 0.871, KL 0.073, NLL +0.6%; int4 with float zero points everywhere top-1 0.959, KL 0.0045,
# NLL +0.08% (the demo's weights are Q4_1, which float zero points fit exactly); int4 with integer
# zero points top-1 0.754, KL 0.250, NLL +3.6%.
# The bounds leave room for kernel differences between CPUs, and fail on a real regression
# (RTN int4 with an int4 head, or a broken scale or offset layout, lands far outside them).
@pytest.mark.parametrize("quant,min_top1,max_kl,max_nll_rise", [("int8", 0.92, 0.015, 0.005),
                                                                 ("int4", 0.82, 0.12, 0.015),
                                                                 ("int4-g32-fzp", 0.92, 0.015, 0.005),
                                                                 ("int4-g32-izp", 0.70, 0.35, 0.05)])
def test_quantized_demo_tracks_fp32(demo, fp32, quant, min_top1, max_kl, max_nll_rise):
    ck, windows, tmp = demo
    export_onnx(ck, parse_quant(quant), tmp / f"{quant}.onnx", window=512)
    lp = log_probs(tmp / f"{quant}.onnx", windows)
    top1 = (lp.argmax(-1) == fp32.argmax(-1)).mean()
    kl = (np.exp(fp32) * (fp32 - lp)).sum(-1).mean()
    targets = np.concatenate([w[1:] for w in windows])
    scored = np.concatenate([np.arange(i * CTX, (i + 1) * CTX - 1) for i in range(len(windows))])
    nll, nll_ref = -lp[scored, targets].mean(), -fp32[scored, targets].mean()
    print(f"{quant}: top1 {top1:.4f} kl {kl:.4f} nll {nll:.4f} (fp32 {nll_ref:.4f})")
    assert top1 >= min_top1 and kl <= max_kl
    assert nll <= nll_ref * (1 + max_nll_rise)
