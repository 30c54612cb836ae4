"""Target profiles: what `--target NAME` chooses, and named device memory budgets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import EdgeError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    quant: str  # default --quant
    fmt: str = "nbits"  # MatMulNBits (fast) or qdq (portable); MLC's own q4f16_1 for mlc
    accuracy_level: int = 4  # MatMulNBits: int8 compute on CPU
    activation_dtype: str = "fp32"  # hidden states and KV cache of the graph (--activations overrides)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: dict = field(default_factory=dict)
    session_options: dict = field(default_factory=dict)
    ort_format: bool = False  # also write model.ort for ORT mobile
    device_memory: str | None = None  # default budget when --device-memory is not given
    usable_fraction: float = 0.8  # share of device memory a model may take (the OS and app need the rest)
    note: str = ""

    @property
    def packs_weights(self) -> bool:
        """Whether its MatMulNBits run on ONNX Runtime's CPU provider, which repacks their weights at
        load (targets/budget.py::PACKED_BLOCK_BYTES): every ONNX target without CUDA."""
        return bool(self.providers) and "CUDAExecutionProvider" not in self.providers


TARGETS: dict[str, TargetProfile] = {p.name: p for p in (
    TargetProfile("cpu", "int4", session_options={"intra_op_num_threads": 0, "enable_cpu_mem_arena": True},
                  note="Laptops and desktops, x86-64 and arm64: ONNX Runtime CPU, int4 MatMulNBits with int8 compute."),
    TargetProfile("gpu", "int4", activation_dtype="fp16", providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                  provider_options={"CUDAExecutionProvider": {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}},
                  note="Desktop CUDA GPUs through onnxruntime-gpu, fp16 activations and KV cache (int4 MatMulNBits "
                       "has a CUDA kernel). PyTorch users: `mistral-edge generate --backend torch --quant int8|nf4` "
                       "(bitsandbytes)."),
    TargetProfile("jetson", "int4", activation_dtype="fp16",
                  providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                  provider_options={"TensorrtExecutionProvider": {"trt_fp16_enable": True, "trt_engine_cache_enable": True},
                                    "CUDAExecutionProvider": {"device_id": 0}},
                  device_memory="orin-nano-8gb", usable_fraction=0.6,
                  note="Jetson Orin, fp16 activations and KV cache: CPU and GPU share the board's memory, so the "
                       "budget is checked against it."),
    TargetProfile("android", "int4", providers=("XnnpackExecutionProvider", "CPUExecutionProvider"),
                  provider_options={"XnnpackExecutionProvider": {"intra_op_num_threads": 4}},
                  session_options={"session.intra_op.allow_spinning": "0"},
                  ort_format=True, device_memory="phone-4gb", usable_fraction=0.5,
                  note="onnxruntime-android (the full package: MatMulNBits is a contrib op). XNNPACK takes the "
                       "float ops it supports; the int4 MatMulNBits run on the CPU provider, so its intra-op "
                       "threads are left at the default, without spinning to spare the battery. NNAPI can be "
                       "added, but XNNPACK is the better default for LLM decode."),
    TargetProfile("ios", "int4", providers=("CoreMLExecutionProvider", "CPUExecutionProvider"),
                  provider_options={"CoreMLExecutionProvider": {"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndGPU"}},
                  ort_format=True, device_memory="phone-4gb", usable_fraction=0.5,
                  note="onnxruntime-objc / onnxruntime-c pods; CoreML takes the nodes it supports, the CPU EP the rest."),
    TargetProfile("mlc", "int4", fmt="q4f16_1", activation_dtype="fp16", providers=(),
                  note="MLC-LLM weights (q4f16_1) and mlc-chat-config.json for `mlc_llm compile` and `package`."),
)}

DEVICES = {  # named device profiles -> total memory in bytes
    "phone-4gb": 4 << 30,
    "phone-6gb": 6 << 30,
    "phone-8gb": 8 << 30,
    "orin-nano-4gb": 4 << 30,
    "orin-nano-8gb": 8 << 30,
    "orin-nx-16gb": 16 << 30,
    "laptop-8gb": 8 << 30,
    "laptop-16gb": 16 << 30,
}


MAX_MEMORY = 1 << 50
"""1 PiB: a bound past any device, below the float overflow of a 400-digit size."""


def get_target(name: str) -> TargetProfile:
    if name not in TARGETS:
        raise EdgeError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def parse_memory(text: str) -> int:
    """'8GB', '512MiB', '4g' or a named device profile -> bytes (GB and GiB both mean 2**30)."""
    if text.lower() in DEVICES:
        return DEVICES[text.lower()]
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise EdgeError(f"cannot read memory size {text!r}: use e.g. 8GB, 512MB or one of {', '.join(DEVICES)}")
    value = float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2) or " ")))
    if not 0 < value <= MAX_MEMORY:
        raise EdgeError(f"device memory must be positive and at most 1 PiB, got {text!r}")
    return int(value)
