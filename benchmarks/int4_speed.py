"""Seconds to int4-quantize one Mistral-7B-sized matrix (random normal weights rounded to bf16).

    python benchmarks/int4_speed.py                      # 4096 x 14336 (w2), search, g32, int + float zero points
    python benchmarks/int4_speed.py --shape 576x1536 --zero-points none,int,float --threads 1

Prints wall and process CPU seconds per quantize_int4 call and the extrapolation to a whole
Mistral 7B int4 export (32 layers of wqkv 6144x4096, wo 4096x4096, w13 28672x4096, w2 4096x14336;
the head and embedding are int8 by default). Run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import time

import torch

from mistral_edge.quantize.int4 import quantize_int4

LAYER_ELEMENTS = 6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336
N_LAYERS = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--zero-points", default="int,float")
    ap.add_argument("--method", default="search")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--act-scale", action="store_true", help="weight the error per input channel (calibrated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = map(int, args.shape.lower().split("x"))
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    act = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5 if args.act_scale else None
    for zp in args.zero_points.split(","):
        quantize_int4(w[:64], args.group_size, zp, args.method, act)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        quantize_int4(w, args.group_size, zp, args.method, act)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        whole = wall * N_LAYERS * LAYER_ELEMENTS / (n * k) / 60
        print(f"{n}x{k} g{args.group_size} {zp:5s} {args.method}: {wall:.2f} s wall, {cpu:.2f} s cpu "
              f"({args.threads} threads); a 7B export's layers at this rate: {whole:.1f} min")


if __name__ == "__main__":
    main()
