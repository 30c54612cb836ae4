"""Memory budget of a bundle, computed from the config and quant plan before anything is written."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..export.linear import int8_block
from ..export.onnx_builder import activation_type
from ..model.config import ModelConfig
from ..quantize.plan import TensorQuant, head_shares_embedding
from ..quantize.spec import bits_per_weight


@dataclass(frozen=True)
class MemoryBudget:
    weight_bytes: int
    """Resident weights: float tables and int8/int4 scales at the activation type (an fp32
    graph's fp16 tables are cast up at load; an fp16 graph stores fp32 ones as fp16)."""
    kv_cache_bytes: int
    """layers x 2 x batch x n_kv_heads x W x head_dim x (4 or 2, the activation type's bytes),
    whatever the sequence length."""
    activation_bytes: int
    """Estimate of one prefill chunk's working set, doubled for allocator slack."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of every planned tensor (fused QKV and gate/up, as exported)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"tok_embeddings": (cfg.vocab_size, cfg.dim), "output": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv": (q + 2 * kv, cfg.dim), p + "attention.wo": (cfg.dim, q),
                       p + "feed_forward.w13": (2 * cfg.hidden_dim, cfg.dim),
                       p + "feed_forward.w2": (cfg.dim, cfg.hidden_dim)})
    return shapes


def tensor_bytes(n: int, k: int, tq: TensorQuant, resident: bool = False, act_bytes: int = 4, fmt: str = "nbits",
                 gather: bool = False) -> int:
    """Stored (or with `resident`, loaded) bytes of an [N, K] tensor as export/linear.py lays it
    out in `fmt` ("nbits" or "qdq"), in a graph whose activation type has `act_bytes` bytes:
    scales have that type; a float table is stored at the narrower of its precision and that
    type, and resident at that type. `gather`: the embedding's layout (an nbits int8 table keeps
    one scale per row; a head's MatMulNBits repeats it per block)."""
    bits = bits_per_weight(tq.kind, n, k, tq.group_size, tq.zero_point, 8 * act_bytes)
    if tq.kind in ("fp32", "fp16"):
        bits = 8 * act_bytes if resident else min(bits, 8 * act_bytes)
    elif tq.kind == "int8" and fmt == "nbits":  # 8-bit blocks, K padded with the zero point
        blocks = math.ceil(k / int8_block(k))
        return n * blocks * int8_block(k) + n * (1 if gather else blocks) * act_bytes
    elif tq.kind == "int4" and fmt == "qdq":  # [K, N] codes at the real K, [groups, N] scales and zero points
        groups = math.ceil(k / tq.group_size)
        zeros = {"none": 0, "int": math.ceil(groups * n / 2), "float": groups * n * act_bytes}[tq.zero_point]
        return math.ceil(k * n / 2) + groups * n * act_bytes + zeros
    return int(n * k * bits / 8)


def estimate(cfg: ModelConfig, plan: dict[str, TensorQuant], window: int, chunk: int, batch: int = 1,
             activations: str = "fp32", fmt: str = "nbits") -> MemoryBudget:
    act = activation_type(activations).itemsize
    shapes = tensor_shapes(cfg)
    shared = head_shares_embedding(cfg, plan)
    if shared:
        shapes.pop("output")
    weights = sum(tensor_bytes(n, k, plan[name], True, act, fmt, gather=name == "tok_embeddings")
                  for name, (n, k) in shapes.items())
    if shared and fmt == "nbits" and plan["output"].kind == "int8":  # the head's per-block scales
        weights += cfg.vocab_size * math.ceil(cfg.dim / int8_block(cfg.dim)) * act
    weights += (2 * cfg.n_layers + 1) * cfg.dim * act + cfg.head_dim // 2 * 4  # norms, RoPE frequencies
    kv = cfg.n_layers * 2 * batch * cfg.n_kv_heads * window * cfg.head_dim * act
    weights += sum(k * math.ceil(k / g) * act for k, g in {  # group-sum matrices, one per (K, G) (export/linear.py)
        (k, plan[name].group_size) for name, (_, k) in shapes.items()
        if plan[name].kind == "int4" and plan[name].zero_point == "float"})
    c, q = batch * chunk, cfg.n_heads * cfg.head_dim
    floats = (4 * c * cfg.dim + c * (q + 2 * cfg.n_kv_heads * cfg.head_dim) + 2 * cfg.n_heads * c * (window + chunk)
              + 2 * batch * cfg.n_kv_heads * (window + chunk) * cfg.head_dim + 3 * c * cfg.hidden_dim
              + c * cfg.vocab_size)
    return MemoryBudget(weights, kv, 2 * floats * act)
