"""An off-grid evaluation model: the same function as a checkpoint, with weights on no 4-bit grid.

The demo model's weights come from a Q4_1 GGUF, so each sits exactly on a 4-bit grid, which
flatters any int4 scheme that can express that grid. Rotating the residual stream by a random
orthogonal Q (seeded) keeps the function and moves every weight off the grid:

- fold the RMSNorm gains into the linears that read the normed stream: attention_norm into the
  columns of wq/wk/wv, ffn_norm into w1/w3, the final norm into the head; the norms become ones
  (RMSNorm(h Q) = RMSNorm(h) Q for orthogonal Q, so only the gains stood in the way);
- embedding rows E Q; linears that read the stream W Q (wq, wk, wv, w1, w3, head); linears that
  write it Q^T W (wo, w2); the head is stored untied from the embedding.

Usage (writes a Hugging Face directory that every loader and export path takes):

    python -m mistral_edge.model.rotate OUT_DIR [--model MODEL] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import EdgeError
from .checkpoint import Checkpoint
from .loaders import hf, load_checkpoint
from .weights import output_weight

READS_ATTENTION_NORM = ("attention.wq", "attention.wk", "attention.wv")
READS_FFN_NORM = ("feed_forward.w1", "feed_forward.w3")
WRITES_STREAM = ("attention.wo", "feed_forward.w2")


def random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [dim, dim] float64 matrix, the same for the same seed."""
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))  # QR's sign convention would bias the distribution


def rotate_checkpoint(ck: Checkpoint, seed: int = 0) -> Checkpoint:
    """A copy of `ck` with its residual stream rotated (module docstring): float32 weights, untied
    head, all RMSNorm gains one. Each product is computed in float64, so fp32 logits equal the
    original's to float rounding."""
    cfg = ck.config
    q = random_orthogonal(cfg.dim, seed)
    w = ck.weights

    def reads(name: str, gain: str) -> torch.Tensor:  # a linear that reads the normed stream
        return ((w[name].double() * w[gain].double()) @ q).float()

    out = {"tok_embeddings.weight": (w["tok_embeddings.weight"].double() @ q).float(),
           "output.weight": ((output_weight(w).double() * w["norm.weight"].double()) @ q).float()}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for norm, readers in (("attention_norm", READS_ATTENTION_NORM), ("ffn_norm", READS_FFN_NORM)):
            out.update({f"{p}{linear}.weight": reads(f"{p}{linear}.weight", f"{p}{norm}.weight") for linear in readers})
        out.update({f"{p}{linear}.weight": (q.T @ w[f"{p}{linear}.weight"].double()).float()
                    for linear in WRITES_STREAM})
    out.update({name: torch.ones(cfg.dim) for name in w if name.endswith("norm.weight")})
    return dataclasses.replace(ck, config=dataclasses.replace(cfg, tied_embeddings=False), weights=out,
                               source=f"{ck.source} rotated (seed {seed})")


def hf_config(ck: Checkpoint) -> dict:
    """config.json for a checkpoint: Mistral with its sliding window, or Llama (full attention)."""
    c = ck.config
    eos = list(c.eos_ids)
    arch = ("MistralForCausalLM", "mistral") if c.sliding_window else ("LlamaForCausalLM", "llama")
    config = {
        "architectures": [arch[0]], "model_type": arch[1], "hidden_act": "silu",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tied_embeddings, "bos_token_id": c.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "max_position_embeddings": c.max_position,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if c.sliding_window:
        config["sliding_window"] = c.sliding_window
    return config


def check_new_dir(out: Path) -> Path:
    if out.exists():
        raise EdgeError(f"{out} already exists; choose a new directory")
    if not out.parent.is_dir():
        raise EdgeError(f"{out.parent}: no such directory")
    return out


def save_hf(ck: Checkpoint, out: Path) -> Path:
    """Write `ck` as a Hugging Face directory at `out` (config.json, model.safetensors in float32,
    its tokenizer files, chat_template.jinja), built in a temporary directory beside `out` and
    renamed into place, so a failed write leaves nothing at `out`. `out` must not exist."""
    out = check_new_dir(Path(out))
    to_hf = {canon: name for name, canon in hf._TOP_MAP.items()}
    to_hf.update({f"layers.{i}.{canon}": f"model.layers.{i}.{name}"
                  for i in range(ck.config.n_layers) for name, canon in hf._LAYER_MAP.items()})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0o22)
    os.umask(umask)
    try:
        save_file({to_hf[k]: v.float().contiguous() for k, v in ck.weights.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(ck), indent=2))
        for name, path in ck.tokenizer_files.items():
            shutil.copyfile(path, tmp / ("tokenizer.json" if name == "tokenizer.json" else "tokenizer.model"))
        if ck.chat_template:
            (tmp / "chat_template.jinja").write_text(ck.chat_template)
        for f in tmp.iterdir():  # mkdtemp's and safetensors' private modes -> the user's umask
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mistral_edge.model.rotate",
                                 description="Write a residual-stream-rotated (off-grid) copy of a checkpoint "
                                             "as a Hugging Face directory.")
    ap.add_argument("out", type=Path, help="the directory to create")
    ap.add_argument("--model", default=None, help="any MODEL the CLI takes (default: the demo model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        check_new_dir(args.out)  # before the minutes of loading
        save_hf(rotate_checkpoint(load_checkpoint(args.model), args.seed), args.out)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
