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

`--reprefill 256,512,768` adds, for each sink count S of `--sinks` and each L, a runtime policy
beside the cache ("context shift with re-computation"): whenever the W slots are full, rebuild
them from the S sinks and the last L tokens, re-prefilled at positions 0..S+L-1, then roll on for
W - S - L new tokens until they are full again. It asks whether restarting the layers on what
the cache keeps buys the consistency the re-computation bound shows (a rolling cache's keys were
computed over tokens its queries no longer see), and at what cost: L re-prefilled tokens per
W - S - L generated (the sinks' keys do not change, they see only each other at 0..S-1). Every
row also prints the whole-window PPL of all its predictions (compare's metric; those from
positions < W are full attention's) and both figures against full attention.

`--pool 128,192` adds, for each sink count S, each pool size P and each step size of
`--pool-chunk` (default 1: decode), the cache that keeps the P most-attended keys beside the
sinks and a ring of W - S - P (model/cache.py, docs/cache.md "A pool of the most-attended
keys"). It is computed here layer by layer, since what a layer keeps depends only on its own
attention: from the layer's scores over the whole sequence, as sets of positions, without the
cache's slots (`pool_visibility`; tests/test_cache.py checks it against ReferenceModel's cache).
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mistral_edge.compare.text import read_text, token_windows
from mistral_edge.model.cache import visible
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.reference import apply_rope, rms_norm, rope_tables
from mistral_edge.tokenizer import Tokenizer


def pool_visibility(scores: torch.Tensor, window: int, sinks: int, pool: int, group: int,
                    chunk: int = 1) -> torch.Tensor:
    """[Hkv, T, T] which key each query sees under the pooled cache fed `chunk` tokens a step, from
    one layer's causal scores [Hq, T, T] (scaled, -inf above the diagonal), kept as sets of positions:
    before a step, the keys its tokens push out of the ring of R = W - S - P compete with the pool's
    by mean attention received per query so far (free places first, then the pool's keys on a tie);
    the P best form the pool. A query sees the sinks, the pool and the last R positions."""
    heads, T = scores.shape[0] // group, scores.shape[1]
    ring, k = window - sinks - pool, torch.arange(T)
    seen = torch.zeros(heads, T, T, dtype=torch.bool)
    pooled, received = torch.zeros(heads, T, dtype=torch.bool), torch.zeros(heads, T)
    for start in range(0, T, chunk):
        q = torch.arange(start, min(start + chunk, T))
        leaving = q - ring
        leaving = leaving[leaving >= sinks]
        if len(leaving):
            members = k.expand(heads, T)[pooled].view(heads, -1)  # [Hkv, n] in position order
            cand = torch.cat([torch.full((heads, pool - members.shape[1]), -1), members,
                              leaving.expand(heads, -1)], 1)
            mean = (received / (start - k).clamp(min=1)).gather(1, cand.clamp(min=0))
            mean = torch.where(cand >= 0, mean, float("-inf"))
            best = cand.gather(1, torch.sort(mean, dim=1, descending=True, stable=True).indices[:, :pool])
            pooled = torch.zeros_like(pooled)
            held = torch.nonzero(best >= 0, as_tuple=True)  # not scatter with clamped -1s: they hit position 0
            pooled[held[0], best[held]] = True
        seen[:, q] = ((k[None] <= q[:, None]) & ((k[None] < sinks) | (k[None] > q[:, None] - ring)))[None] \
            | pooled[:, None]
        rows = scores[:, q].masked_fill(~seen[:, q].repeat_interleave(group, 0), float("-inf"))
        received += torch.softmax(rows, -1).view(heads, group, len(q), T).sum((1, 2))
    return seen


@torch.no_grad()
def token_nll(ck, w: dict, tokens: np.ndarray, window: int, sinks: int, rebase: bool,
              first: int = 0, pool: int = 0, chunk: int = 1) -> torch.Tensor:
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
        if pool:
            scores = (apply_rope(q, cos, sin) @ k.transpose(-1, -2))[0] * c.head_dim ** -0.5
            seen = pool_visibility(scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")), window, sinks,
                                   pool, c.gqa_ratio, chunk)
            out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v,
                                                 attn_mask=seen.repeat_interleave(c.gqa_ratio, 0)[None])
        elif rebase and sinks:
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


def reprefill_nll(ck, w: dict, tokens: np.ndarray, window: int, sinks: int, keep: int) -> torch.Tensor:
    """NLL of each prediction under the re-prefill policy: full attention until the W slots are
    full, then segments of W - S - L predictions, each one causal forward over the sinks, the L
    tokens before the segment and the segment (positions from 0), which is what the cache holds."""
    W, S, L, T = window, sinks, keep, len(tokens)
    if not (0 <= S and 0 <= L and S + L < W):
        raise SystemExit(f"--reprefill needs S + L < W (S={S}, L={L}, W={W})")
    parts, p = [token_nll(ck, w, tokens[:W + 1], W + 1, 0, False)[:W]], W
    while p < T - 1:  # the cache is full at p: rebuild it, then n new tokens fill it again
        n = min(W - S - L, T - 1 - p)
        parts.append(token_nll(ck, w, np.concatenate([tokens[:S], tokens[p - L:p + n + 1]]), S + L + n + 1, 0,
                               False, first=S + L))
        p += n
    return torch.cat(parts)[:T - 1]


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
    ap.add_argument("--reprefill", default="", metavar="L,...",
                    help="also the re-prefill policy for each sink count and each kept-token count L")
    ap.add_argument("--pool", default="", metavar="P,...",
                    help="also the cache with a pool of the P most-attended keys, for each sink count and P")
    ap.add_argument("--pool-chunk", default="1", metavar="C,...",
                    help="the pool rows' step sizes (1: decode; compare prefills min(128, W - S - P) a step)")
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
    rows = {name: partial(token_nll, ck, w, window=window, sinks=S, rebase=rb)
            for name, (window, S, rb) in patterns.items()}
    rows |= {f"W={W} S={S} re-prefill L={L}": partial(reprefill_nll, ck, w, window=W, sinks=S, keep=L)
             for S in sinks for L in (int(x) for x in args.reprefill.split(",") if x)}
    rows |= {f"W={W} S={S} pool P={P} C={C}": partial(token_nll, ck, w, window=W, sinks=S, rebase=False, pool=P, chunk=C)
             for S in sinks for P in (int(x) for x in args.pool.split(",") if x)
             for C in (int(x) for x in args.pool_chunk.split(","))}
    # interleaved over the windows, so that a run cut short still samples all of them
    sample = [(i, p) for p in range(W, args.ctx - 1, args.recompute) for i in range(len(windows))] \
        if args.recompute else []
    sampled, full = {}, None
    for name, row in rows.items():
        start = time.perf_counter()
        per_window = [row(t) for t in windows]
        nll, whole = torch.cat([n[W:] for n in per_window]).mean(), torch.cat(per_window).mean()
        full = full or (nll, whole)
        sampled[name] = torch.stack([per_window[i][p] for i, p in sample]) if sample else None
        print(f"{name:28s} PPL of predictions from positions >= {W}: {math.exp(nll):.3f} "
              f"({math.exp(nll - full[0]) - 1:+.2%}; {len(per_window) * (len(windows[0]) - 1 - W)} tokens), "
              f"all: {math.exp(whole):.3f} ({math.exp(whole - full[1]) - 1:+.2%}) "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    if sample:
        start, bound = time.perf_counter(), []
        for n, (i, p) in enumerate(sample, 1):  # its last W tokens and the target, attending to all of them
            bound.append(token_nll(ck, w, windows[i][p - W + 1:p + 2], W + 1, 0, False, first=W - 1)[0])
            if n % 16 == 0 or n == len(sample):
                print(f"every {args.recompute}th prediction from positions >= {W} ({n} of {len(sample)} tokens; "
                      f"re-computation {time.perf_counter() - start:.0f} s):", flush=True)
                for name, nll in sampled.items():
                    print(f"  {name:28s} PPL {math.exp(nll[:n].mean()):.3f}")
                print(f"  {f'W={W} re-computed':28s} PPL {math.exp(torch.stack(bound).mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
