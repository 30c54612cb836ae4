"""bitsandbytes int8 (LLM.int8) and nf4 linears in the PyTorch reference: `--backend torch --quant int8|nf4`.

For users who stay in PyTorch: every layer linear of the reference becomes a
bitsandbytes module (Linear8bitLt / Linear4bit) that quantizes its weight when
moved to the device and multiplies with bitsandbytes' own kernels. Embedding,
norms and head keep the model's dtype, as transformers' bitsandbytes integration
leaves the LM head alone. This sits in model/, not quantize/: quantize/ makes the
integer tensors the ONNX exporter lays out, while bitsandbytes weights exist only
inside its modules, i.e. only as a way of running the reference.

bitsandbytes is an optional extra (`pip install 'mistral-edge[bnb]'`); every
failure to import or run it becomes one EdgeError line with bitsandbytes' reason.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..errors import EdgeError, first_line
from .reference import ReferenceModel
from .weight_only import swap_linears

BNB_QUANTS = ("int8", "nf4")
INT8_THRESHOLD = 6.0
"""LLM.int8's outlier threshold (the paper's and transformers' default): input columns holding
any |x| above it are multiplied in floating point, the rest in int8."""
NF4_BLOCKSIZE = 64
NOTES = {"int8": f"bitsandbytes LLM.int8 (threshold {INT8_THRESHOLD:g}); embedding and head unquantized",
         "nf4": f"bitsandbytes nf4 (blocks of {NF4_BLOCKSIZE}, double-quantized scales); embedding and head unquantized"}

# Two warnings bitsandbytes logs are noise for our users: the fp16 cast of int8 inputs is how
# LLM.int8 works (logged on every matmul), and the optional fused 4-bit CPU kernel is a Hub
# download (`kernels` package) that this offline toolkit never makes.
for _name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def bnb_linear(weight: torch.Tensor, quant: str, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """One [N, K] weight as a bitsandbytes module on `device` in inference mode, computing in `dtype`.

    Inference mode matters: in training mode bitsandbytes' CPU int8 path dequantizes the
    weight and skips LLM.int8's int8 matmul, and its 4-bit CPU path skips the packed kernel.
    That packed kernel (AVX512-BF16 CPUs) needs N in tiles of 32 rows and K in whole blocks;
    other layers keep the unpacked path (bitsandbytes 0.50 fails on them instead of falling back).
    The int8 weight is quantized here, as Int8Params would on a move from the CPU: a weight already
    on the GPU (the GPU benchmark's) would otherwise stay unquantized.
    """
    import bitsandbytes as bnb

    n, k = weight.shape
    if quant == "int8":
        module = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        module = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE,
                                          compress_statistics=True)
        if n % 32 or k % NF4_BLOCKSIZE:
            module.support_avx512bf16_for_cpu = False
    return module.to(device).eval()


@functools.cache
def check_bnb(quant: str, device: str = "cpu") -> None:
    """Raise EdgeError, with bitsandbytes' own reason, unless `quant` runs here: quantizes and
    multiplies a small layer once, so a missing package or kernel shows before a model loads."""
    if quant not in BNB_QUANTS:
        raise EdgeError(f"unknown bitsandbytes quant {quant!r}; expected {' or '.join(BNB_QUANTS)}")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a native library that fails to load
        raise EdgeError(f"bitsandbytes int8/nf4 needs the bitsandbytes package (pip install "
                        f"'mistral-edge[bnb]'): {type(e).__name__}: {first_line(e)}") from None
    try:
        with torch.no_grad():
            out = bnb_linear(torch.randn(64, 64, device=device), quant, torch.float32, device)(
                torch.randn(1, 2, 64, device=device))
        if not torch.isfinite(out).all():
            raise ValueError("non-finite output on a test layer")
    except Exception as e:
        raise EdgeError(f"bitsandbytes {quant} needs a working {device} backend: {type(e).__name__}: {first_line(e)}") from None


def quantize_linears(model: ReferenceModel, quant: str) -> int:
    """Swap every layer linear of `model` for a bitsandbytes `quant` module, one at a time, dropping
    the model's float weight as it goes (freed then, unless the caller still holds it).

    Returns the bytes of the weights the model now holds: its float tensors (a tied head once)
    plus the modules' state as bitsandbytes saves it (quantized weight, scales). Read here, before
    any forward: the 4-bit CPU modules repack their weight on first use, and state_dict() unpacks it.
    """
    check_bnb(quant, model.device.type)
    return swap_linears(model, lambda w: bnb_linear(w, quant, model.dtype, model.device.type))
