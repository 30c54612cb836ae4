"""Calibrated int4: `-awq` (three uses of calibration text below, all in the fp32 reference model)
and `-gptq` / `-awq-gptq` (error-feedback rounding, quantize/gptq.py, after the AWQ scales or not).

1. AWQ scales. A few input channels carry much larger activations than the rest,
   so rounding errors on their weights cost more. For each layer linear, with m
   the mean |x| per input channel, the weight's columns are multiplied by
   s = m^alpha (normalised so max*min = 1) and the input divided by s, alpha in
   [0, 1] chosen to minimise ||x W^T - x Q(W s)^T / s||^2 on sampled inputs
   (Q: round-to-nearest int4; alpha 0 is plain RTN). The 1/s is folded into the
   op that produces the input, so the scaled model is the original in fp32:
   wq/wk/wv: attention_norm / s; w1/w3: ffn_norm / s; w2: w3 rows / s (its input
   is silu(w1 x) * (w3 x)); wo: wv rows / s, s shared by the query heads of one
   KV head (GQA). Row scaling leaves a row's int4 error unchanged (scale and zero
   point follow it), so the four searches do not interact.
2. Activation-weighted rounding: the export's int4 search weights each input
   channel's error by (m / s)^2 (TensorQuant.act_scale -> quantize_int4).
3. Mixed precision: the linears whose int4 costs the most next-token KL per
   parameter (one linear at a time in int4, on calibration tokens) stay int8,
   up to INT8_SHARE of the layer linears' parameters.

Activations are recorded at the input of every matmul whose right operand is a
known weight (a TorchFunctionMode: the reference model is not modified).

GPTQ (`LayerwiseGptq`, behind `calibrate_gptq` and `export --calib`) runs layer by layer over all
calibration windows at once: each planned int4 linear is quantized the moment its input arrives
and the pass goes on with its dequantized weight, so every linear's Hessian comes from the inputs
of the model with all the linears before it already quantized (int8 ones too), in execution
order (QKV, output projection, gate/up, down; layer by layer; then the head). Its `GptqScope` says
which of them GPTQ rounds (the others keep the search's codes) and whether the Hessians of those that
read the normed residual stream are shrunk toward quantize/prior.py's weight-only estimate (`--calib
random`). Memory: the batch's hidden states, one layer's float32 weights and one linear's Hessian.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import EdgeError
from ..model.checkpoint import Checkpoint
from ..model.cache import visible
from ..model.reference import ReferenceModel, apply_rope, attend, rms_norm, rope_tables
from ..tokenizer import Tokenizer
from .gptq import BLOCK, DAMP, Hessian, gptq_int4, hessian
from .int4 import Int4Weight, quantize_int4
from .int8 import quantize_int8
from .plan import LAYER_LINEARS, TensorQuant, int4_quant, quant_plan
from .prior import ResidualPrior
from .spec import Calibration, QuantSpec, RandomTokens, budgeted

ALPHAS = tuple(i / 10 for i in range(11))
SAMPLE_ROWS = 512  # calibration inputs kept per linear for the alpha search
SENSITIVITY_TOKENS = 256
INT8_SHARE = 0.15  # at most this share of the layer linears' parameters is kept int8
GPTQ_SETTINGS = {"damp": DAMP, "block": BLOCK, "act_order": True, "static_groups": True}
"""What decides GPTQ's codes besides the text (a calibrated variant's record)."""


@dataclass
class _Inputs:
    abs_sum: torch.Tensor
    rows: int = 0
    sample: list = dataclasses.field(default_factory=list)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()


def _logits(model: ReferenceModel, tokens: np.ndarray) -> torch.Tensor:
    """[T, V] logits of one window from an empty cache, with the model's own sliding window."""
    window = min(model.cfg.sliding_window or len(tokens), len(tokens))
    return model.prefill(torch.as_tensor(tokens[None]), model.new_cache(1, window), window)[0]


class _InputRecorder(TorchFunctionMode):
    """Records the left operand of `x @ W.T` for the weights in `names` (keyed by storage address)."""

    def __init__(self, names: dict[int, str], stride: int):
        super().__init__()
        self.names, self.stride = names, stride
        self.inputs: dict[str, _Inputs] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__") and isinstance(args[1], torch.Tensor):
            name = self.names.get(args[1].data_ptr())
            if name is not None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                rec = self.inputs.setdefault(name, _Inputs(torch.zeros(x.shape[1], dtype=torch.float64)))
                rec.abs_sum += x.abs().sum(0, dtype=torch.float64)
                rec.rows += x.shape[0]
                rec.sample.append(x[:: self.stride].clone())
        return func(*args, **(kwargs or {}))


PARTS = {"attention.wqkv": ["attention.wq", "attention.wk", "attention.wv"], "attention.wo": ["attention.wo"],
         "feed_forward.w13": ["feed_forward.w1", "feed_forward.w3"], "feed_forward.w2": ["feed_forward.w2"]}
"""Each exported (fused) layer linear and its checkpoint weights; the parts share one input."""


def collect_inputs(ck: Checkpoint, windows: np.ndarray) -> dict[str, _Inputs]:
    """Mean |x| per input channel and up to SAMPLE_ROWS sampled rows at every layer linear's input."""
    cfg = ck.config
    model = ReferenceModel(cfg, ck.weights)
    names = {model.w[f"layers.{i}.{parts[0]}.weight"].data_ptr(): f"layers.{i}.{linear}"
             for i in range(cfg.n_layers) for linear, parts in PARTS.items()}
    recorder = _InputRecorder(names, stride=max(1, windows.size // SAMPLE_ROWS))
    with recorder:
        for tokens in windows:
            _logits(model, tokens)
    for rec in recorder.inputs.values():
        rec.sample = torch.cat(rec.sample)[:SAMPLE_ROWS]
    return recorder.inputs


def search_scale(w: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, spec: QuantSpec, zero_point: str,
                 tie=lambda m: m) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s (and its alpha) minimising the output error of int4 W s."""
    ref = x @ w.T
    m = tie(mean_abs.clamp(min=1e-5))
    best = None
    for alpha in ALPHAS:
        s = m ** alpha
        s = s / (s.max() * s.min()).sqrt()
        wq = quantize_int4(w * s, spec.group_size, zero_point, "rtn").dequantize() / s
        err = float(((x @ wq.T - ref) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def awq_scales(ck: Checkpoint, spec: QuantSpec, inputs: dict[str, _Inputs]) -> tuple[Checkpoint, dict, dict]:
    """A copy of `ck` with AWQ scales folded in (the same fp32 function), the mean |x| each linear
    now sees (its input divided by s), and the alpha chosen per linear."""
    cfg = ck.config
    w = {k: v.float().clone() for k, v in ck.weights.items()}
    gqa, hd = cfg.gqa_ratio, cfg.head_dim

    def tie_heads(m: torch.Tensor) -> torch.Tensor:  # one value per (KV head, dim), shared by its query heads
        return m.view(cfg.n_kv_heads, gqa, hd).mean(1, keepdim=True).expand(-1, gqa, -1).reshape(-1)

    alphas, act = {}, {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."

        def scale(linear: str, tie=lambda m: m) -> torch.Tensor:
            rec, parts = inputs[p + linear], PARTS[linear]
            fused = torch.cat([w[p + part + ".weight"] for part in parts])
            zero_point = spec.zero_point_of(p + linear)
            s, alphas[p + linear] = search_scale(fused, rec.sample, rec.mean_abs, spec, zero_point, tie)
            act[p + linear] = rec.mean_abs / s
            for part in parts:
                w[p + part + ".weight"] *= s
            return s

        w[p + "attention_norm.weight"] /= scale("attention.wqkv")
        w[p + "ffn_norm.weight"] /= scale("feed_forward.w13")
        w[p + "feed_forward.w3.weight"] /= scale("feed_forward.w2")[:, None]
        s = scale("attention.wo", tie_heads)
        w[p + "attention.wv.weight"] /= s.view(cfg.n_kv_heads, gqa, hd)[:, 0].reshape(-1, 1)
    return dataclasses.replace(ck, weights=w), act, alphas


def sensitivity(ck: Checkpoint, spec: QuantSpec, tokens: np.ndarray, linears: list[str]) -> dict[str, float]:
    """Mean next-token KL on `tokens` when only one of `linears` is int4 (round-to-nearest)."""
    cfg = ck.config

    def logp(weights: dict) -> torch.Tensor:
        return torch.log_softmax(_logits(ReferenceModel(cfg, weights), tokens), -1)

    ref = logp(ck.weights)
    out = {}
    for linear in linears:
        swapped = {name: quantize_int4(ck.weights[name], spec.group_size, spec.zero_point_of(linear), "rtn").dequantize()
                   for name in weights_of(linear)}
        out[linear] = float((ref.exp() * (ref - logp({**ck.weights, **swapped}))).sum(-1).mean())
    return out


def most_sensitive(kl: dict[str, float], sizes: dict[str, int], budget: float) -> list[str]:
    """Greedy by KL per parameter: the linears to make int8 within `budget` parameters."""
    chosen = []
    for name in sorted(kl, key=lambda n: kl[n] / sizes[n], reverse=True):
        if sizes[name] <= budget:
            chosen.append(name)
            budget -= sizes[name]
    return chosen


@dataclass(frozen=True)
class Calibrated:
    checkpoint: Checkpoint
    """AWQ scales folded in."""
    plan: dict[str, TensorQuant]
    """The spec's plan with each int4 linear's act_scale set and the most sensitive linears int8."""
    alphas: dict[str, float]
    int8: tuple[str, ...]


def weights_of(linear: str) -> list[str]:
    """'layers.3.attention.wqkv' -> its checkpoint weights (wq, wk, wv)."""
    _, layer, sub = linear.split(".", 2)
    return [f"layers.{layer}.{part}.weight" for part in PARTS[sub]]


def _linear_of(plan_name: str) -> str | None:
    """The fused layer linear a plan entry belongs to ('layers.3.attention.wv' -> 'layers.3.attention.wqkv')."""
    head, _, rest = plan_name.partition(".")
    layer, _, sub = rest.partition(".")
    if head != "layers":
        return None
    return next((f"layers.{layer}.{linear}" for linear, parts in PARTS.items() if sub == linear or sub in parts), None)


def calibrate_int4(ck: Checkpoint, spec: QuantSpec, windows: np.ndarray, int8_share: float = INT8_SHARE) -> Calibrated:
    """AWQ scales, act-weighted int4 search, and int8 for the linears whose int4 costs the most KL per
    parameter, until `int8_share` of the layer linears' parameters is int8 (counting any the plan has)."""
    scaled, act, alphas = awq_scales(ck, spec, collect_inputs(ck, windows))
    plan = quant_plan(scaled.config, spec)

    def size(name: str) -> int:  # a plan entry is a fused linear or one checkpoint weight
        return sum(ck.weights[w].numel() for w in ([name + ".weight"] if name + ".weight" in ck.weights
                                                    else weights_of(name)))

    layer = {name: _linear_of(name) for name in plan if _linear_of(name) is not None}
    budget = int8_share * sum(map(size, layer)) - sum(size(n) for n in layer if plan[n].kind == "int8")
    all_int4 = {linear for linear in act if all(plan[n].kind == "int4" for n, l in layer.items() if l == linear)}
    kl = sensitivity(scaled, spec, windows[0][:SENSITIVITY_TOKENS], sorted(all_int4)) if budget > 0 else {}
    int8 = most_sensitive(kl, {linear: size(linear) for linear in kl}, budget)
    for name, linear in layer.items():
        if plan[name].kind == "int4":
            plan[name] = (TensorQuant("int8") if linear in int8
                          else dataclasses.replace(plan[name], act_scale=act[linear]))
    return Calibrated(scaled, plan, alphas, tuple(int8))


def _fused(weights, name: str) -> torch.Tensor:
    """The float32 weight [N, K] of a fused layer linear, or of the head (the embedding when tied)."""
    if name == "output":
        return weights["output.weight" if "output.weight" in weights else "tok_embeddings.weight"].float()
    return torch.cat([weights[part] for part in weights_of(name)]).float()


def _drain(gen):
    """Run a generator to its end; its return value (for a pass whose linears yield nothing)."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


@dataclass(frozen=True)
class _Windows:
    """What every layer of a pass over windows [B, T] shares: rope tables and the causal bias."""

    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    empty: torch.Tensor

    @staticmethod
    def of(c, B: int, T: int) -> _Windows:
        positions = torch.arange(T).expand(B, T)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        seen = visible(positions[0][None], positions[0][:, None], min(c.sliding_window or T, T))
        bias = torch.zeros(T, T).masked_fill(~seen, float("-inf")).expand(B, 1, T, T)
        return _Windows(cos, sin, bias, torch.zeros(B, c.n_kv_heads, 0, c.head_dim))


def _layer(c, weights, i: int, h: torch.Tensor, linear, win: _Windows):
    """Layer i on hidden states h [B, T, dim]; `linear(name, x)` is a generator that returns
    x @ W.T for the fused linear `name` (what it yields, the layer yields). Returns the new h.

    Each linear's input is built in its call and never named here, so the linear's frame holds the
    only reference and may drop it (LayerwiseGptq holds the smaller of a linear's input and output
    while suspended: at 7B widths w2's input is 224 MiB for 8 x 512 tokens, its output 64)."""
    B, T, _ = h.shape
    p = f"layers.{i}."
    qkv = [(yield from linear(p + "attention.wqkv", rms_norm(h, weights[p + "attention_norm.weight"], c.norm_eps)))]
    h = h + (yield from linear(p + "attention.wo", _attention(c, qkv.pop(), win)))
    gate_up = [(yield from linear(p + "feed_forward.w13", rms_norm(h, weights[p + "ffn_norm.weight"], c.norm_eps)))]
    return h + (yield from linear(p + "feed_forward.w2", _swiglu(gate_up.pop(), c.hidden_dim)))


def _attention(c, qkv: torch.Tensor, win: _Windows) -> torch.Tensor:
    """Causal attention of the fused projection qkv [B, T, (H + 2 KV) head_dim] -> [B, T, H head_dim]."""
    B, T, _ = qkv.shape
    q, k, v = (t.reshape(B, T, -1, c.head_dim).transpose(1, 2)
               for t in qkv.split([c.n_heads * c.head_dim] + [c.n_kv_heads * c.head_dim] * 2, -1))
    out = attend(apply_rope(q, win.cos, win.sin), apply_rope(k, win.cos, win.sin), v, win.empty, win.empty, win.bias)
    return out.transpose(1, 2).reshape(B, T, -1)


def _swiglu(gate_up: torch.Tensor, hidden: int) -> torch.Tensor:
    gate, up = gate_up.split(hidden, -1)
    return F.silu(gate) * up


def _decoder_pass(c, weights, tokens: torch.Tensor, linear, head: bool):
    """The decoder over windows [B, T] at once, each from an empty cache with causal attention over
    its T tokens (within the model's sliding window), layer by layer (`_layer`). Returns the head's
    output if `head` (linear('output', x)), else None."""
    win = _Windows.of(c, *tokens.shape)
    h = [weights["tok_embeddings.weight"][tokens].float()]  # handed over by pop(): the running layer alone holds it
    for i in range(c.n_layers):
        h.append((yield from _layer(c, weights, i, h.pop(), linear, win)))
    if head:
        return (yield from linear("output", rms_norm(h.pop(), weights["norm.weight"], c.norm_eps)))
    return None


WRITERS = ("attention.wo", "feed_forward.w2")
"""The layer linears that add their output to the residual stream (what quantize/prior.py sums)."""
NORMED_INPUTS = {"attention.wqkv": "attention_norm.weight", "feed_forward.w13": "ffn_norm.weight", "output": "norm.weight"}
"""The linears that read the normed residual stream, and the norm's gain."""


@dataclass(frozen=True)
class GptqScope:
    """Which int4 linears GPTQ rounds (by role: 'feed_forward.w13', ..., 'output'; the others keep the
    search's codes, as uncalibrated) and how far the Hessian of one reading the normed residual stream is
    shrunk toward quantize/prior.py's estimate (`Hessian.shrunk`'s weight; 0: not at all)."""

    linears: tuple[str, ...] = LAYER_LINEARS + ("output",)
    prior: float = 0.0


RANDOM_SCOPE = GptqScope(("feed_forward.w13",), prior=1.0)
"""`--calib random`: random tokens' Hessians help the linears that read the stream (w13 and wqkv lose a
quarter to half of their int4 output error) and hurt w2 on real inputs; with 512 tokens shrunk toward the
prior, GPTQ on w13 alone beat 2048 tokens on every int4 linear on the off-grid SmolLM2 (next-token KL
0.063 against 0.068, 8 windows; docs/quantization.md), at a quarter of the forward's time and without w2's
and wo's passes. wqkv is int8 in the default plan."""


def gptq_scope(calib: Calibration) -> GptqScope:
    """The scope for a `--calib` value: RANDOM_SCOPE for random tokens, every int4 linear for text."""
    return RANDOM_SCOPE if isinstance(calib, RandomTokens) else GptqScope()


class LayerwiseGptq:
    """GPTQ codes for a plan's int4 layer linears (and an untied int4 head), one linear at a time in
    execution order (QKV, output projection, gate/up, down; layer by layer; then the head), each on
    the Hessian of its input in the model with every linear before it already quantized (int8 ones
    too; the embedding stays float). All calibration windows [B, T] go through at once, each from
    an empty cache with causal attention over its T tokens (within the model's sliding window).

    Memory: the batch's hidden states, one linear's float32 weights (read from the checkpoint when
    the linear is reached) and its Hessian; never the model. `codes(name)` runs the pass up
    to that linear, so an export that asks for its tensors in the same order holds one linear's
    codes at a time."""

    def __init__(self, ck: Checkpoint, plan: dict[str, TensorQuant], windows: np.ndarray, act_order: bool = True,
                 scope: GptqScope = GptqScope()):
        self.cfg, self.weights, self.plan, self.act_order, self.scope = ck.config, ck.weights, plan, act_order, scope
        self.tokens = torch.as_tensor(np.asarray(windows, np.int64))
        self.names = {name for name, tq in plan.items() if tq.kind == "int4" and self._parts(name)}
        """The plan entries the pass gives codes for (GPTQ's, or the search's outside the scope)."""
        self.prior = ResidualPrior(ck.weights["tok_embeddings.weight"]) if scope.prior else None
        self._steps = self._run()

    def _parts(self, name: str) -> list[str]:
        """The checkpoint weights of a plan entry that a matmul reads: a fused layer linear's parts,
        an untied head, or none (the embedding, a Gather; a tied head, which is the embedding)."""
        if name == "output":
            return ["output.weight"] if "output.weight" in self.weights else []
        return weights_of(name) if _linear_of(name) == name else []

    def codes(self, name: str) -> Int4Weight | None:
        """The GPTQ codes of plan entry `name`, or None when the pass gives it none; a name the pass
        has already gone past (asked out of execution order) is an error."""
        if name not in self.names:
            return None
        for done, codes in self._steps:
            if done == name:
                return codes
        raise ValueError(f"GPTQ codes for {name} asked for after the pass went past it")

    def all_codes(self) -> dict[str, Int4Weight]:
        """Every linear's codes (the whole model's worth: for small models and tests)."""
        return {name: codes for name, codes in self._steps if codes is not None}

    def _run(self):
        """Yields (plan entry, Int4Weight or None) for each linear in execution order."""
        # no tensor needs a gradient (no_grad here would hold for the caller too while the pass is suspended)
        yield from _decoder_pass(self.cfg, self.weights, self.tokens, self._linear, "output" in self.names)

    def _hessian(self, name: str, role: str, x: torch.Tensor, group_size: int) -> Hessian:
        """The Hessian of a linear's inputs x, shrunk toward the prior if the scope has one and x is the
        normed residual stream."""
        h = hessian(x, group_size)
        if self.prior is None or role not in NORMED_INPUTS:
            return h
        return h.shrunk(self.prior.of(self.weights[name.replace(role, NORMED_INPUTS[role])]), self.scope.prior)

    def _linear(self, name: str, x: torch.Tensor):
        """x @ W.T with the plan's quantized W (int4: GPTQ codes on x's Hessian), yielding the codes
        (while the export stores them, the pass holds nothing else of this linear)."""
        tq = self.plan.get(name, TensorQuant("fp32"))
        w = _fused(self.weights, name)
        role = name.split(".", 2)[-1]
        if self.prior is not None and role in WRITERS:
            self.prior.add(w)
        if name not in self.names:  # its output, not its weight, is what the pass holds while suspended
            y = None if name == "output" else x @ (quantize_int8(w).dequantize() if tq.kind == "int8" else w).T
            del w, x
            yield name, None
            return y
        if role in self.scope.linears:  # the Hessian is an argument, so the suspended pass does not hold it
            codes = gptq_int4(w, self._hessian(name, role, x, tq.group_size), tq.group_size, tq.zero_point, tq.method,
                              self.act_order, scale_bits=tq.scale_bits)
        else:  # the codes the export would store without calibration
            codes = quantize_int4(w, tq.group_size, tq.zero_point, tq.method, tq.act_scale, tq.scale_bits)
        del w
        if name == "output":  # the logits themselves are not needed
            yield name, codes
            return None
        if codes.q.shape[0] < x.shape[-1]:  # fewer outputs than inputs (w2): hold the output while suspended
            y = x @ codes.dequantize().T
            del x
            yield name, codes
            return y
        yield name, codes
        return x @ codes.dequantize().T


SENSITIVITY_WINDOWS = 4
"""Calibration windows the sensitivity pass runs (the first ones: a forward and a backward)."""


def int4_sensitivity(ck: Checkpoint, tq: TensorQuant, windows: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The next-token KL (nats per token) that each layer linear adds when it alone is int4 in the
    scheme `tq` (act-weighted, as GPTQ's grid), estimated to second order.

    KL(p || p') is ½ dθ^T F dθ with F the Fisher of the model's own next-token distribution; per
    linear y = x W^T its block is taken as E[g g^T] ⊗ E[x x^T] (K-FAC, g = d log p(t) / dy with t
    sampled from the model), both diagonal: ½ Σ_n E[g_n²] Σ_k E[x_k²] dW_nk². dW is the tensor's
    int4 rounding error, so the estimate sees both its place in the model and how well its weights
    fit the grid. One forward keeps each layer's input; the backward then recomputes one layer at a
    time from it: the pass holds one layer's float32 weights and activations and the hidden states
    at every layer's input (B T dim floats each), never the model."""
    cfg, weights = ck.config, ck.weights
    tokens = torch.as_tensor(np.asarray(windows, np.int64))
    win = _Windows.of(cfg, *tokens.shape)
    x2: dict[str, torch.Tensor] = {}
    g2: dict[str, torch.Tensor] = {}

    def plain(name: str, x: torch.Tensor):
        return x @ _fused(weights, name).T
        yield  # a generator, as _layer takes

    def recording(name: str, x: torch.Tensor):
        y = x @ _fused(weights, name).T
        x2[name] = x.detach().square().sum((0, 1))
        y.register_hook(lambda g: g2.__setitem__(name, g.square().sum((0, 1))))
        return y
        yield

    with torch.no_grad():
        hs = [weights["tok_embeddings.weight"][tokens].float()]
        for i in range(cfg.n_layers):
            hs.append(_drain(_layer(cfg, weights, i, hs[-1], plain, win)))
    with torch.enable_grad():
        h = hs.pop().requires_grad_()
        logp = torch.log_softmax(_drain(plain("output", rms_norm(h, weights["norm.weight"], cfg.norm_eps))), -1)
        sampled = torch.multinomial(logp.detach().flatten(0, 1).exp(), 1, generator=torch.Generator().manual_seed(seed))
        logp.flatten(0, 1).gather(-1, sampled).sum().backward()
        del logp
        for i in reversed(range(cfg.n_layers)):
            grad, h = h.grad, hs.pop().requires_grad_()
            _drain(_layer(cfg, weights, i, h, recording, win)).backward(grad)
    rows = tokens.numel()
    out = {}
    for name, sum_x2 in x2.items():
        w, h2 = _fused(weights, name), sum_x2 / rows
        dw = w - quantize_int4(w, tq.group_size, tq.zero_point, tq.method, act_scale=h2.sqrt(),
                               scale_bits=tq.scale_bits).dequantize()
        out[name] = 0.5 * float(((g2[name] / rows)[:, None] * dw.square() * h2[None]).sum())
    return out


def calibrated_plan(ck: Checkpoint, spec: QuantSpec, windows: np.ndarray) -> dict[str, TensorQuant]:
    """The plan a calibrated export quantizes with: for a mixed int4 spec, its int8 upgrades chosen
    by int4_sensitivity on the first SENSITIVITY_WINDOWS windows (same bit budget); any other
    spec's plan as quant_plan gives it."""
    if not budgeted(spec):
        return quant_plan(ck.config, spec)
    int4 = int4_quant(spec, f"layers.0.{LAYER_LINEARS[0]}")
    return quant_plan(ck.config, spec, int4_sensitivity(ck, int4, windows[:SENSITIVITY_WINDOWS]))


def calibrate_gptq(ck: Checkpoint, spec: QuantSpec, windows: np.ndarray, awq: bool = False,
                   act_order: bool = True, choose_plan: bool = True, scope: GptqScope = GptqScope()) -> Calibrated:
    """The spec's plan with GPTQ codes for its int4 linears in `scope`, on the AWQ-scaled model if `awq`; the
    plan's int8 upgrades chosen on the windows (calibrated_plan) if `choose_plan`, else quant_plan's."""
    scaled, alphas = ck, {}
    if awq:
        scaled, _, alphas = awq_scales(ck, spec, collect_inputs(ck, windows))
    plan = calibrated_plan(scaled, spec, windows) if choose_plan else quant_plan(scaled.config, spec)
    codes = LayerwiseGptq(scaled, plan, windows, act_order, scope).all_codes()
    plan = {name: dataclasses.replace(tq, codes=codes[name]) if name in codes else tq for name, tq in plan.items()}
    return Calibrated(scaled, plan, alphas, ())


CALIB_WINDOWS, CALIB_TOKENS = 8, 512
"""What `export --calib` calibrates on: the first 8 windows of 512 tokens of the text (compare's too)."""
CALIB_MAX_BYTES = 1 << 20
"""Only the start of a calibration text is read: 4096 tokens of prose take about 20 KB."""


def calibration_windows(path: Path, tokenizer: Tokenizer) -> tuple[np.ndarray, dict]:
    """The calibration windows [CALIB_WINDOWS, CALIB_TOKENS] from the start of a UTF-8 text file, and
    the record a bundle's manifest keeps of them (file name, sha256 of the whole file, windows)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(CALIB_MAX_BYTES)
            digest.update(head)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise EdgeError(f"--calib {path}: cannot read it ({e.strerror or e})") from None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < CALIB_MAX_BYTES or e.start < len(head) - 3:  # not a character cut at the end
            raise EdgeError(f"--calib {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        text = head[: e.start].decode("utf-8")
    ids = tokenizer.encode(text, add_bos=False)
    need = CALIB_WINDOWS * CALIB_TOKENS
    if len(ids) < need:
        raise EdgeError(f"--calib {path}: {len(ids)} tokens, fewer than the {need} that calibration needs "
                        f"({CALIB_WINDOWS} windows of {CALIB_TOKENS})")
    record = {"method": "gptq", "text": Path(path).name, "sha256": digest.hexdigest(), "windows": CALIB_WINDOWS,
              "tokens_per_window": CALIB_TOKENS}
    return np.asarray(ids[:need], np.int64).reshape(CALIB_WINDOWS, CALIB_TOKENS), record
