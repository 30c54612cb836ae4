"""Seconds of GPTQ (quantize/gptq.py) for one Mistral-7B-shaped layer, and the 32-layer extrapolation.

    python benchmarks/gptq_layer.py                       # 4096 calibration rows (compare's 8 x 512)
    python benchmarks/gptq_layer.py --rows 2048 --only w2 --threads 2

Random normal weights rounded to bf16 and random correlated inputs with a few large channels; the
zero points follow the default mixed spec (float for wqkv and w2). Per linear: the Hessian X^T X,
then gptq_int4 (its grid search, the factorisation of H^-1 and the column pass), in wall and
process CPU seconds. Excludes the calibration forward pass of the model itself. Run it on a quiet
machine (`uptime`).
"""

from __future__ import annotations

import argparse
import time

import torch

from mistral_edge.quantize.gptq import gptq_int4, hessian

LINEARS = {"wqkv": (6144, 4096, "float"), "wo": (4096, 4096, "int"), "w13": (28672, 4096, "int"),
           "w2": (4096, 14336, "float")}
N_LAYERS = 32


def timed(work):
    wall, cpu = time.perf_counter(), time.process_time()
    out = work()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096, help="calibration inputs (tokens)")
    ap.add_argument("--only", default=",".join(LINEARS), help="comma-separated linears")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    total_wall = total_cpu = 0.0
    for name in args.only.split(","):
        n, k, zero_point = LINEARS[name]
        w = torch.randn(n, k, generator=g).bfloat16().float()
        mix = torch.eye(k) + torch.randn(k, k, generator=g) / k**0.5
        x = torch.randn(args.rows, k, generator=g) @ mix
        x[:, :8] *= 20
        del mix
        h, h_wall, h_cpu = timed(lambda: hessian(x))
        _, q_wall, q_cpu = timed(lambda: gptq_int4(w, h, 32, zero_point))
        total_wall, total_cpu = total_wall + h_wall + q_wall, total_cpu + h_cpu + q_cpu
        print(f"{name} {n}x{k} ({zero_point} zero points): hessian {h_wall:.1f} s wall / {h_cpu:.1f} s CPU, "
              f"gptq {q_wall:.1f} s wall / {q_cpu:.1f} s CPU", flush=True)
    print(f"one layer: {total_wall:.1f} s wall / {total_cpu:.1f} s CPU; x{N_LAYERS} layers: "
          f"{N_LAYERS * total_wall / 60:.1f} min wall / {N_LAYERS * total_cpu / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
