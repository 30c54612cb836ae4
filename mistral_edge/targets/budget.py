"""Memory budget of a bundle, computed from the config and quant plan before anything is written."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..contract import slot_bytes
from ..export.linear import int8_block
from ..export.onnx_builder import activation_type
from ..model.config import ModelConfig
from ..quantize.plan import TensorQuant, head_shares_embedding, tensor_shapes
from ..quantize.spec import bits_per_weight, int8_groups


PACKED_BLOCK_BYTES = 4
"""What ONNX Runtime's CPU MatMulNBits holds per weight block beyond the codes and the folded float
scale this budget counts: its packed copy's block sum for int8 compute. Mistral 7B's default int4
bundle loads at 6.54 GiB of anonymous memory against 5.88 GiB counted without it, 6.55 with it
(docs/export-scale.md, 2026-12-02)."""


@dataclass(frozen=True)
class MemoryBudget:
    weight_bytes: int
    """Resident weights: float tables and int8/int4 scales at the activation type (an fp32
    graph's fp16 tables are cast up at load; an fp16 graph stores fp32 ones as fp16)."""
    kv_cache_bytes: int
    """layers x 2 (K, V) x batch x n_kv_heads x W x the bytes of one slot: head_dim x 4 (fp32 cache),
    x 2 (fp16), or head_dim + 2 (int8 codes and an fp16 scale), whatever the sequence length."""
    activation_bytes: int
    """Estimate of one prefill chunk's working set, doubled for allocator slack."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def tensor_bytes(n: int, k: int, tq: TensorQuant, plan: dict[str, TensorQuant], resident: bool = False,
                 act_bytes: int = 4, fmt: str = "nbits", gather: bool = False) -> int:
    """Stored (or with `resident`, loaded) bytes of an [N, K] tensor as export/linear.py lays it
    out in `fmt` ("nbits", "qdq" or "integer"), in a graph whose activation type has `act_bytes` bytes.
    Scales and float zero points' offsets are stored as fp16 and resident at the activation
    type (the graph casts them up; ONNX Runtime folds that at load); a float table is stored at
    the narrower of its precision and that type, and resident at that type. `gather`: the
    embedding's layout (int8 keeps one scale per row where a head's MatMulNBits expands it per
    block; int4 is the MatMulNBits layout in every format)."""
    scale = act_bytes if resident else 2
    if tq.kind in ("fp32", "fp16"):
        bits = 8 * act_bytes if resident else min(bits_per_weight(tq.kind, n, k), 8 * act_bytes)
        return int(n * k * bits / 8)
    if tq.kind == "int8":
        groups = int8_groups(k, fmt)
        if fmt == "integer":  # [K, N] codes, a scale and (a linear's: MatMulInteger) a float32 column sum per row
            return n * k + n * scale + (0 if gather else 4 * n)
        if fmt == "qdq":
            return n * k + n * groups * scale
        block = int8_block(k, plan)
        blocks = math.ceil(k / block)  # 8-bit blocks, K padded with the zero point
        return n * blocks * block + n * scale * (blocks if resident and not gather else groups)
    groups = math.ceil(k / tq.group_size)
    if tq.scale_bits == 8:  # uint8 scale codes (and zero points), an fp16 scale per row; folded at load
        scale, rows = (act_bytes, 0) if resident else (1, 2 * n)
    else:
        rows = 0
    if fmt == "qdq" and not gather:  # [K, N] codes at the real K, [groups, N] scales and zero points
        zeros = {"none": 0, "int": math.ceil(groups * n / 2), "float": groups * n * scale}[tq.zero_point]
        return math.ceil(k * n / 2) + groups * n * scale + zeros + rows
    zeros = {"none": 0, "int": n * math.ceil(groups / 2), "float": groups * n * scale}[tq.zero_point]
    return n * groups * tq.group_size // 2 + groups * n * scale + zeros + rows


def _nbits_blocks(k: int, tq: TensorQuant, plan: dict[str, TensorQuant]) -> int:
    """MatMulNBits blocks per row of an int8 or int4 [N, K] linear (export/linear.py)."""
    return math.ceil(k / (int8_block(k, plan) if tq.kind == "int8" else tq.group_size))


def stored_bytes(cfg: ModelConfig, plan: dict[str, TensorQuant], fmt: str = "nbits", activations: str = "fp32") -> int:
    """The planned tensors' bytes as the bundle stores them (a tied head stored once)."""
    act = activation_type(activations).itemsize
    shapes = tensor_shapes(cfg)
    if head_shares_embedding(cfg, plan):
        shapes.pop("output")
    return sum(tensor_bytes(n, k, plan[name], plan, False, act, fmt, gather=name == "tok_embeddings")
               for name, (n, k) in shapes.items()) + _tied_head_sums(cfg, plan, fmt)


def _tied_head_sums(cfg: ModelConfig, plan: dict[str, TensorQuant], fmt: str) -> int:
    """The column sums an integer-format int8 head adds to the embedding's table it shares."""
    shared = head_shares_embedding(cfg, plan) and plan["output"].kind == "int8"
    return 4 * cfg.vocab_size if shared and fmt == "integer" else 0


def kv_cache_bytes(cfg: ModelConfig, window: int, kv_cache: str, batch: int = 1, pool: int = 0) -> int:
    """The cache of W slots (sinks and pool included) per sequence, keys and values, in every layer;
    with a pool, also a float32 mass per slot (the sinks have none: a bound) and an int64 position
    per pool slot."""
    pooled = 4 * window + 8 * pool if pool else 0
    return cfg.n_layers * batch * cfg.n_kv_heads * (2 * window * slot_bytes(cfg.head_dim, kv_cache) + pooled)


def estimate(cfg: ModelConfig, plan: dict[str, TensorQuant], window: int, chunk: int, batch: int = 1,
             activations: str = "fp32", fmt: str = "nbits", stored: bool = False,
             kv_cache: str | None = None, packed: bool = False, pool: int = 0) -> MemoryBudget:
    """The budget; `stored`: weight bytes as the file stores them instead of as loaded; `kv_cache`:
    the cache's storage (default: the activation type); `pool`: the W slots' pool (it adds masses
    and positions); `packed`: MatMulNBits runs on ONNX Runtime's
    CPU provider, which holds PACKED_BLOCK_BYTES more per weight block."""
    act = activation_type(activations).itemsize
    shapes = tensor_shapes(cfg)
    shared = head_shares_embedding(cfg, plan)
    if shared:
        shapes.pop("output")
    weights = sum(tensor_bytes(n, k, plan[name], plan, not stored, act, fmt, gather=name == "tok_embeddings")
                  for name, (n, k) in shapes.items()) + _tied_head_sums(cfg, plan, fmt)
    if shared and fmt == "nbits" and plan["output"].kind == "int8" and not stored:  # the head's per-block scales
        weights += cfg.vocab_size * math.ceil(cfg.dim / int8_block(cfg.dim, plan)) * act
    weights += (2 * cfg.n_layers + 1) * cfg.dim * act + cfg.head_dim // 2 * 4  # norms, RoPE frequencies
    if packed and fmt == "nbits" and not stored:
        weights += PACKED_BLOCK_BYTES * sum(n * _nbits_blocks(k, plan[name], plan) for name, (n, k) in shapes.items()
                                            if name != "tok_embeddings" and plan[name].kind in ("int8", "int4"))
        if shared and plan["output"].kind in ("int8", "int4"):  # the tied head's MatMulNBits on the table
            weights += PACKED_BLOCK_BYTES * cfg.vocab_size * _nbits_blocks(cfg.dim, plan["output"], plan)
    kv = kv_cache_bytes(cfg, window, kv_cache or activations, batch, pool)
    summed = [name for name in shapes if name != "tok_embeddings"]  # the Gather needs no group sums
    if shared and fmt != "qdq":
        summed.append("output")  # the tied head's MatMulNBits (qdq: it unpacks the embedding's rows)
    weights += sum(k * math.ceil(k / g) * act for k, g in {  # group-sum matrices, one per (K, G) (export/linear.py)
        (shapes.get(name, shapes.get("tok_embeddings"))[1], plan[name].group_size) for name in summed
        if plan[name].kind == "int4" and plan[name].zero_point == "float"})
    c, q = batch * chunk, cfg.n_heads * cfg.head_dim
    floats = (4 * c * cfg.dim + c * (q + 2 * cfg.n_kv_heads * cfg.head_dim) + 2 * cfg.n_heads * c * (window + chunk)
              + 2 * batch * cfg.n_kv_heads * (window + chunk) * cfg.head_dim + 3 * c * cfg.hidden_dim
              + c * cfg.vocab_size)
    return MemoryBudget(weights, kv, 2 * floats * act)
