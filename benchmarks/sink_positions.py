"""Attention sinks: keys at their absolute RoPE positions against StreamingLLM's re-based positions.

A dense computation on the demo model (no cache): every query sees the first S positions and the
last W - S ones. "Re-based" scores the sinks as StreamingLLM does once the cache is full, with the
query at position min(p, W - 1) (its place in the cache), so a sink is never further than W from
it; the ring's keys keep their distances either way. Prints the perplexity of the predictions made
from positions >= W (docs/cache.md has the figures):

    python benchmarks/sink_positions.py WIKI_TEST_FILE --ctx 2048 --n-windows 2 --window 256 --sinks 4

`--sinks 4,16,64` scores each sink count (absolute positions), `--rebase` the counts also scored
re-based (default: all of them; `--rebase ""`: none). `--recompute STRIDE` adds every STRIDE-th of
those predictions made afresh from exactly its last W tokens (the model restarted on them,
positions from 0: the "sliding window with re-computation" of the StreamingLLM paper), with every
row re-scored on the same sample of predictions; the sample runs across the windows, position by
position, and its figures are printed every 16 predictions, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mistral_edge.compare.text import read_text, token_windows
from mistral_edge.model.cache import visible
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.reference import apply_rope, rms_norm, rope_tables
from mistral_edge.tokenizer import Tokenizer


@torch.no_grad()
def token_nll(ck, w: dict, tokens: np.ndarray, window: int, sinks: int, rebase: bool,
              first: int = 0) -> torch.Tensor:
    """NLL of each prediction from position `first` on (the head runs on those rows only)."""
    c, T = ck.config, len(tokens)
    pos = torch.arange(T)
    cos, sin = rope_tables(pos[None], c.head_dim, c.rope_theta)
    cos_in_cache, sin_in_cache = rope_tables(pos.clamp(max=window - 1)[None], c.head_dim, c.rope_theta)
    mask = visible(pos[None, :], pos[:, None], window, sinks)
    sink_cols = (pos[None, :] < sinks).expand(T, T)
    h = F.embedding(torch.as_tensor(tokens)[None], w["tok_embeddings.weight"])
    for i in range(c.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], c.norm_eps)
        q, k, v = [(x @ w[p + f"attention.{n}.weight"].T).view(1, T, -1, c.head_dim).transpose(1, 2)
                   for n in ("wq", "wk", "wv")]
        k = apply_rope(k, cos, sin).repeat_interleave(c.gqa_ratio, 1)
        v = v.repeat_interleave(c.gqa_ratio, 1)
        if rebase and sinks:
            scores = torch.where(sink_cols, apply_rope(q, cos_in_cache, sin_in_cache) @ k.transpose(-1, -2),
                                 apply_rope(q, cos, sin) @ k.transpose(-1, -2))
            out = torch.softmax((scores * c.head_dim ** -0.5).masked_fill(~mask, float("-inf")), -1) @ v
        else:  # the same attention, in PyTorch's fused kernel (several times faster at 4096 tokens)
            causal = window >= T and not sinks
            out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, attn_mask=None if causal else mask,
                                                 is_causal=causal)
        h = h + out.transpose(1, 2).reshape(1, T, -1) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], c.norm_eps)
        h = h + (F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)) \
            @ w[p + "feed_forward.w2.weight"].T
    head = w.get("output.weight", w["tok_embeddings.weight"])
    logp = torch.log_softmax(rms_norm(h[0, first:-1], w["norm.weight"], c.norm_eps) @ head.T, -1)
    return -logp[torch.arange(T - 1 - first), torch.as_tensor(tokens[first + 1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("text", type=Path)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--n-windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", default="4", help="comma-separated sink counts, each a row at absolute positions")
    ap.add_argument("--rebase", default=None, help="sink counts also scored at re-based positions (default: --sinks)")
    ap.add_argument("--recompute", type=int, default=0, metavar="STRIDE",
                    help="also the re-computation bound on every STRIDE-th prediction (0: off)")
    args = ap.parse_args()
    ck = load_checkpoint(None)
    w = {k: v.float() for k, v in ck.weights.items()}
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    ids = np.asarray(tok.encode(read_text(args.text).text, add_bos=False))
    windows = token_windows(ids, args.ctx, args.n_windows)
    W = args.window
    sinks = [int(x) for x in args.sinks.split(",")]
    rebase = sinks if args.rebase is None else [int(x) for x in args.rebase.split(",") if x]
    patterns = {"full attention": (args.ctx, 0, False), f"W={W}": (W, 0, False)}
    patterns |= {f"W={W} S={S} absolute": (W, S, False) for S in sinks if S}
    patterns |= {f"W={W} S={S} re-based": (W, S, True) for S in rebase if S}
    # interleaved over the windows, so that a run cut short still samples all of them
    sample = [(i, p) for p in range(W, args.ctx - 1, args.recompute) for i in range(len(windows))] \
        if args.recompute else []
    sampled = {}
    for name, (window, S, rb) in patterns.items():
        start = time.perf_counter()
        per_window = [token_nll(ck, w, t, window, S, rb) for t in windows]
        nll = torch.cat([n[W:] for n in per_window])
        sampled[name] = torch.stack([per_window[i][p] for i, p in sample]) if sample else None
        print(f"{name:24s} PPL of predictions from positions >= {W}: {math.exp(nll.mean()):.3f} "
              f"({len(nll)} tokens, {time.perf_counter() - start:.0f} s)", flush=True)
    if sample:
        start, bound = time.perf_counter(), []
        for n, (i, p) in enumerate(sample, 1):  # its last W tokens and the target, attending to all of them
            bound.append(token_nll(ck, w, windows[i][p - W + 1:p + 2], W + 1, 0, False, first=W - 1)[0])
            if n % 16 == 0 or n == len(sample):
                print(f"every {args.recompute}th prediction from positions >= {W} ({n} of {len(sample)} tokens; "
                      f"re-computation {time.perf_counter() - start:.0f} s):", flush=True)
                for name, nll in sampled.items():
                    print(f"  {name:24s} PPL {math.exp(nll[:n].mean()):.3f}")
                print(f"  {f'W={W} re-computed':24s} PPL {math.exp(torch.stack(bound).mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
