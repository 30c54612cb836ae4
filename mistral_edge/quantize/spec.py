"""What the user asked for (`--quant int4-g128-sym`), parsed once into a typed spec."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
EMBEDDING_PRECISIONS = PRECISIONS
"""The embedding is a Gather on its table; int4 rows are unpacked after it (export/linear.py)."""
GROUP_SIZES = (16, 32, 64, 128)
INT4_METHODS = ("rtn", "search")
ZERO_POINTS = {"none": "sym", "int": "izp", "float": "fzp", "mixed": "mzp"}
"""int4 zero point per group -> its suffix: none (symmetric, 8 implied), integer 0..15, float, or
mixed: the plan's choice per tensor (quantize/plan.py: float zero points, int8 for the tensors
that cost the most KL per bit). Every tensor gets one of the first three, or int8."""
DEFAULT_GROUP_SIZE = 32
INT8_GROUP_SIZE: int | None = 64
"""int8 input columns per scale (quantize/int8.py); None: one scale per output channel (the whole row).
Groups of 64 (8.25 bits per weight) measured best within 8.3 bits (docs/quantization.md)."""
ROW_SCALE_FORMATS = ("integer",)
"""Weight formats whose int8 tensors take one scale per output channel whatever INT8_GROUP_SIZE:
the integer format's MatMulInteger output is scaled once per column of B (export/linear.py)."""
DEFAULT_ZERO_POINT = "mixed"
VALID_FORMS = "fp32, fp16, int8, int4[-g16|-g32|-g64|-g128][-mzp|-fzp|-izp|-sym][-rtn|-search] (e.g. int4-g128-sym)"


@dataclass(frozen=True)
class QuantSpec:
    """Precision of the linear layers, plus separate choices for embedding and head.

    `group_size`, `zero_point` (a ZERO_POINTS key) and `method` describe int4 linears
    (group_size and method are None otherwise; int8 is always symmetric per output channel).
    `embedding` / `head` are one of PRECISIONS; an int4 head or embedding uses
    `group_size` (or 32 when the linears are not int4). `embedding` or `head` None: the plan's
    choice (quantize/plan.py; a mixed int4 spec's plan may give them other group sizes, or int8).
    """

    bits: int
    group_size: int | None = None
    zero_point: str = "none"
    method: str | None = None
    embedding: str | None = "fp32"
    head: str | None = "fp32"

    @property
    def name(self) -> str:
        """The canonical text form (round-trips through parse_quant)."""
        if self.bits != 4:
            return {32: "fp32", 16: "fp16", 8: "int8"}[self.bits]
        return f"int4-g{self.group_size}-{ZERO_POINTS[self.zero_point]}-{self.method}"

    @property
    def linear(self) -> str:
        return {32: "fp32", 16: "fp16", 8: "int8", 4: "int4"}[self.bits]

    def zero_point_of(self, tensor: str) -> str:
        """The int4 zero point ("none", "int" or "float") of a planned tensor: a mixed spec's int4
        tensors all have float ones (which of them stay int4 is the plan's choice)."""
        return "float" if self.zero_point == "mixed" else self.zero_point


def bits_per_weight(
    precision: str, n: int, k: int, group_size: int = DEFAULT_GROUP_SIZE, zero_point: str = "int",
    scale_bits: int = 16, fmt: str = "nbits",
) -> float:
    """Storage bits per weight of an [n, k] matrix, counting scales and zero points.

    int8: one scale per INT8_GROUP_SIZE columns of a row (or per row; always per row in a
    ROW_SCALE_FORMATS `fmt`). int4: K padded to whole
    groups, one scale per group, plus the zero points: integer ones 4 bits, packed two per byte per
    row as MatMulNBits stores them; float ones as a per-group offset of `scale_bits`;
    symmetric int4 stores none (8 is implied). Scales are stored as fp16 (export/linear.py), or with
    `scale_bits` 8 as 8-bit codes plus an fp16 scale per row (float zero points: 8-bit too).
    """
    if precision in ("fp32", "fp16"):
        return {"fp32": 32.0, "fp16": 16.0}[precision]
    if precision == "int8":
        return (n * k * 8 + n * int8_groups(k, fmt) * scale_bits) / (n * k)
    if precision == "int4":
        groups = math.ceil(k / group_size)
        zero_bits = {"none": 0, "int": n * math.ceil(groups / 2) * 8, "float": n * groups * scale_bits}[zero_point]
        rows = n * 16 if scale_bits == 8 else 0  # 8-bit scales: the fp16 scale of each row
        return (n * groups * group_size * 4 + n * groups * scale_bits + zero_bits + rows) / (n * k)
    raise EdgeError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def int8_group_size(k: int, fmt: str = "nbits") -> int:
    """Columns per scale of an int8 table with K columns in weight format `fmt`: INT8_GROUP_SIZE, or
    the whole row (None, or a ROW_SCALE_FORMATS format)."""
    return k if fmt in ROW_SCALE_FORMATS else INT8_GROUP_SIZE or k


def int8_groups(k: int, fmt: str = "nbits") -> int:
    """Scales per row of an int8 [N, K] table (the last group may be partial)."""
    return math.ceil(k / int8_group_size(k, fmt))


def _default_head(bits: int) -> str | None:
    return {32: "fp32", 16: "fp16", 8: "int8"}.get(bits)


def _precision(role: str, value: str | None, default: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return default
    if value not in allowed:
        raise EdgeError(f"unsupported {role} precision {value!r}; expected one of {', '.join(allowed)}")
    return value


def parse_quant(
    text: str, group_size: int | None = None, head: str | None = None, embedding: str | None = None
) -> QuantSpec:
    """Parse a CLI quantization spec; `group_size` (e.g. from --group-size) must agree with any -gNN.

    Defaults: int4 groups of 32, mixed zero points, method "search"; head int8 for int8 linears
    and the linears' own float type for float ones; embedding same as head; under int4 linears both
    the plan's choice (None)."""
    base, *suffixes = text.strip().lower().split("-")
    bits = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}.get(base)
    if bits is None or (bits != 4 and suffixes):
        raise EdgeError(f"unknown quantization {text!r}; valid forms: {VALID_FORMS}")
    if bits != 4 and group_size is not None:
        raise EdgeError(f"a group size applies to int4 only, not {base}")
    text_group, zero_point, method = None, None, None
    zero_points = {suffix: kind for kind, suffix in ZERO_POINTS.items()}
    for s in suffixes:
        if s.startswith("g") and s[1:].isascii() and s[1:].isdigit() and text_group is None:
            text_group = int(s[1:])
        elif s in zero_points and zero_point is None:
            zero_point = zero_points[s]
        elif s in INT4_METHODS and method is None:
            method = s
        else:
            raise EdgeError(f"unknown quantization {text!r}; valid forms: {VALID_FORMS}")
    if text_group is not None and group_size is not None and text_group != group_size:
        raise EdgeError(f"group size {group_size} contradicts {text!r}")
    head = _precision("head", head, _default_head(bits), PRECISIONS)
    embedding = _precision("embedding", embedding, None if bits == 4 else head, EMBEDDING_PRECISIONS)
    if bits != 4:
        return QuantSpec(bits=bits, embedding=embedding, head=head)
    g = next((size for size in (text_group, group_size) if size is not None), DEFAULT_GROUP_SIZE)
    if g not in GROUP_SIZES:
        raise EdgeError(f"unsupported int4 group size {g}; expected one of {', '.join(map(str, GROUP_SIZES))}")
    return QuantSpec(4, g, zero_point or DEFAULT_ZERO_POINT, method or "search", embedding, head)


SELF = "self"
"""The `--calib` value that asks for the model's own text (a file of that name: `--calib ./self`)."""


@dataclass(frozen=True)
class SelfText:
    """Calibration windows sampled from the model: each window its own sequence after BOS."""

    seed: int = 0
    temperature: float = 1.0

    def __str__(self) -> str:
        return SELF


RANDOM = "random"
"""The `--calib` value that asks for seeded random tokens (a file of that name: `--calib ./random`)."""


@dataclass(frozen=True)
class RandomTokens:
    """Calibration windows of token ids drawn uniformly from the vocabulary after BOS (seeded): no text,
    no sampling. What GPTQ needs most from a text, the covariance of each linear's input, is largely the
    model's own: on the off-grid SmolLM2 these windows buy half of what WikiText-2 valid does (int4 KL
    0.106 -> 0.072 against 0.040; docs/quantization.md)."""

    seed: int = 0

    def __str__(self) -> str:
        return RANDOM


Calibration = Path | SelfText | RandomTokens
"""What `--calib` names: a text file, the model's own samples, or random tokens."""


def parse_calib(value: str | None) -> Calibration | None:
    """A `--calib` value: None, `SelfText()` for "self", `RandomTokens()` for "random", else the text file's Path."""
    if value is None:
        return None
    return {SELF: SelfText(), RANDOM: RandomTokens()}.get(value) or Path(value)


NO_CALIBRATION = "none"
"""The `export --calib` value for the search's codes alone (a file of that name: `--calib ./none`)."""


def budgeted(spec: QuantSpec) -> bool:
    """A mixed int4 spec (the default): planned within TARGET_BITS, each tensor's rung where it buys the most KL."""
    return spec.bits == 4 and spec.zero_point == "mixed"


def export_calibration(value: str | None, spec: QuantSpec, target: str) -> Calibration | None:
    """`export --calib`: parse_calib's value, None for "none", and when not given random tokens for a budgeted
    int4 spec on an ONNX target (GPTQ on w13 with quantize/prior.py: on the off-grid SmolLM2 +5.6% instead of
    +11.9%, Mistral 7B's export 542 s instead of 178 on 2 cores; docs/quantization.md), else None."""
    if value is None:
        return RandomTokens() if budgeted(spec) and target != "mlc" else None
    return None if value == NO_CALIBRATION else parse_calib(value)


def chooses_plan(calib: Calibration) -> bool:
    """Whether the calibration also picks the plan's int8 upgrades (calibrate.calibrated_plan): not for
    random tokens, whose sensitivities were not measured, and at 7B that pass is the export's longest."""
    return not isinstance(calib, RandomTokens)


def check_calibration(text: Calibration, spec: QuantSpec, target: str) -> None:
    """--calib before any model is read: a text file (or no text: the model's own or random tokens,
    quantize/selfgen.py), for int4 tensors (GPTQ) on an ONNX target."""
    if spec.bits != 4:
        raise EdgeError(f"--calib calibrates int4 tensors (GPTQ); --quant {spec.name} has none")
    if target == "mlc":
        raise EdgeError("the mlc target writes MLC's own q4f16_1 weights: --calib does not apply to it")
    if isinstance(text, Path) and not text.is_file():
        raise EdgeError(f"--calib {text}: no such text file")
