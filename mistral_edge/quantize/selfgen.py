"""Calibration windows without a text file: `--calib self` (the model's own samples) and
`--calib random` (seeded random tokens).

GPTQ needs the inputs each linear sees on text like the one the model will read; a model's own
samples from BOS are such text (LLM-QAT's data-free generation), with no file to trust or license.
On the off-grid SmolLM2 they buy nearly all that WikiText-2 valid does (docs/quantization.md).
Sampling runs the whole model, in bfloat16 when the checkpoint stores 16-bit weights (Mistral 7B:
14.5 GB, no copy of the file's tensors) and in float32 otherwise; it is refused where that does not
fit in memory. Random tokens cost nothing to make and buy a little over half as much: the covariance
of a linear's input is largely the model's own, whatever the tokens.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import EdgeError
from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from .calibrate import CALIB_WINDOWS, RANDOM_SCOPE
from .spec import RANDOM, SELF, RandomTokens, SelfText

RANDOM_WINDOWS, RANDOM_TOKENS = 4, 128
"""`--calib random`'s windows: 512 tokens, whose Hessians quantize/prior.py's estimate completes
(calibrate.RANDOM_SCOPE). On the off-grid SmolLM2, next-token KL as int4 0.063 with 4 x 128 or 2 x 256,
0.067 with 1 x 512; without the prior 0.068 needed 4 x 512 (docs/quantization.md). At 7B the pass's
forward costs about 3.5 s per layer per 1000 tokens on 2 cores."""
MEMORY_SHARE = 0.8
"""Of the memory available when sampling starts, the share the model may take."""
SAMPLING_THREADS = 1
"""A decode step is hundreds of small ops, each a barrier for torch's threads: the demo model sampled
at 0.10 s a step on one thread and 4.2 s on two while another process held a core (0.067 s on two
idle cores), 2026-12-02."""


def compute_dtype(ck: Checkpoint) -> torch.dtype:
    """bfloat16 where every weight is stored in 16 bits, else float32: a property of the checkpoint,
    so the same model samples the same windows on any machine."""
    metas = [ck.weights.meta(name) for name in ck.weights]
    return torch.bfloat16 if all(m.dtype in (torch.bfloat16, torch.float16) for m in metas) else torch.float32


def check_memory(ck: Checkpoint, dtype: torch.dtype, available: int | None = None) -> None:
    """Sampling holds every weight in `dtype`: refuse in one line where that would not fit."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = ck.n_params * dtype.itemsize
    if need > MEMORY_SHARE * available:
        name = str(dtype).removeprefix("torch.")
        raise EdgeError(f"--calib self samples from the whole model in {name} ({need / 2**30:.1f} GiB), more than "
                        f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available here: pass a calibration "
                        f"text instead (--calib FILE)")


@torch.no_grad()
def sample_windows(ck: Checkpoint, n: int, tokens: int, text: SelfText) -> np.ndarray:
    """[n, tokens] token ids: n sequences sampled together after BOS (BOS itself left out), at the
    text's temperature from the model's full distribution, seeded: the same model gives the same ids
    (up to the machine's float rounding)."""
    from ..model.reference import ReferenceModel

    if ck.config.bos_id is None:
        raise EdgeError("--calib self starts each sample at the model's BOS token, and this model has none: "
                        "pass a calibration text instead (--calib FILE)")
    dtype = compute_dtype(ck)
    check_memory(ck, dtype)
    model = ReferenceModel(ck.config, ck.weights, dtype)
    cache = model.new_cache(n, tokens + 1)
    generator = torch.Generator().manual_seed(text.seed)
    x = torch.full((n, 1), ck.config.bos_id, dtype=torch.long)
    out = torch.empty((n, tokens), dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(SAMPLING_THREADS)
    try:
        for t in range(tokens):
            probs = torch.softmax(model.forward(x, cache)[:, -1] / text.temperature, -1)  # float32 logits
            x = torch.multinomial(probs, 1, generator=generator)
            out[:, t] = x[:, 0]
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


def self_calibration(ck: Checkpoint, text: SelfText, n: int, tokens: int) -> tuple[np.ndarray, dict]:
    """The sampled windows and the manifest's record of them (what reproduces them, and their sha256)."""
    windows = sample_windows(ck, n, tokens, text)
    record = {"method": "gptq", "text": SELF, "seed": text.seed, "temperature": text.temperature,
              "dtype": str(compute_dtype(ck)).removeprefix("torch."),
              "sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(), "windows": n,
              "tokens_per_window": tokens}
    return windows, record


def random_calibration(cfg: ModelConfig, text: RandomTokens, n: int, tokens: int) -> tuple[np.ndarray, dict]:
    """[n, tokens] ids drawn uniformly from the vocabulary (seeded), each window after the model's BOS
    where it has one, as every prompt starts; and the manifest's record of them."""
    windows = np.random.default_rng(text.seed).integers(0, cfg.vocab_size, (n, tokens), dtype=np.int64)
    if cfg.bos_id is not None:
        windows[:, 0] = cfg.bos_id
    record = {"method": "gptq", "text": RANDOM, "seed": text.seed,
              "sha256": hashlib.sha256(windows.astype("<i8").tobytes()).hexdigest(), "windows": n,
              "tokens_per_window": tokens, "linears": ",".join(RANDOM_SCOPE.linears), "prior": RANDOM_SCOPE.prior}
    return windows, record


def textless_calibration(ck: Checkpoint, calib: SelfText | RandomTokens, tokens: int) -> tuple[np.ndarray, dict]:
    """The windows that `--calib self` (CALIB_WINDOWS of `tokens` ids) or `--calib random` (RANDOM_WINDOWS
    of RANDOM_TOKENS) names, and the manifest's record of them."""
    if isinstance(calib, SelfText):
        return self_calibration(ck, calib, CALIB_WINDOWS, tokens)
    return random_calibration(ck.config, calib, RANDOM_WINDOWS, RANDOM_TOKENS)
