"""Export a Mistral-7B-v0.1-shaped model in bounded memory, then run it against llama.cpp.

1. Writes a random checkpoint of exactly Mistral-7B-v0.1's shapes (seeded, bf16, 4 safetensors
   shards + index, Mistral 7B's SentencePiece tokenizer), tensor by tensor, under --work.
2. Exports it for each of --exports (cpu int4, android int4, cpu int8) in a child process and
   reports wall time and the child's peak RSS (VmHWM), with RSS after each layer as a profile.
3. Runs the cpu int4 bundle (prefill of a 128-token prompt, decode tok/s over 64 tokens, peak
   RSS, 2 threads) against llama.cpp (llama-cpp-python) on a Q4_0 GGUF written from the same
   checkpoint with the `gguf` package's quantizer, with the same prompt ids; bundle vs GGUF size.

    python benchmarks/export_scale.py                     # everything, 32 layers (an hour or more on 2 cores)
    python benchmarks/export_scale.py --layers 2 --skip-llamacpp
    python benchmarks/export_scale.py --exports cpu-int4 --skip-run

The export child loads the checkpoint with `load_checkpoint` (lazy: each tensor is read from its
shard when the exporter asks for it) and calls `write_bundle`; `--cli` runs `mistral-edge export`
itself instead. Nothing under --work is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32000, "sliding_window": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}
SHARDS = 4
EXPORTS = {  # name -> (target, quant; "int4" is --int4's spec)
    "cpu-int4": ("cpu", "int4"),
    "android": ("android", "int4"),
    "cpu-int8": ("cpu", "int8"),
}
PROMPT, DECODE, THREADS = 128, 64, 2


# --- the checkpoint ------------------------------------------------------------------------------

def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (q, d),
                       p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
                       p + "self_attn.o_proj.weight": (d, q), p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int):
    """bf16: norms near 1, matrices N(0, 0.02), seeded per tensor so any one can be remade alone."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def write_checkpoint(path: Path, layers: int, seed: int = 0, vocab: int = MISTRAL_7B["vocab_size"]) -> Path:
    """A Mistral-7B-shaped HF directory, written one tensor at a time (safetensors by hand: an
    8-byte header length, the JSON header, then each tensor's bytes)."""
    cfg = {**MISTRAL_7B, "num_hidden_layers": layers, "vocab_size": vocab}
    done = path / "config.json"
    if done.is_file() and json.loads(done.read_text()) == cfg:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes = hf_shapes(cfg)
    total = sum(2 * math.prod(s) for s in shapes.values())
    shards: list[list[str]] = [[] for _ in range(SHARDS)]
    acc = 0
    for name, shape in shapes.items():
        shards[min(SHARDS - 1, acc * SHARDS // total)].append(name)
        acc += 2 * math.prod(shape)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            n = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                import torch

                f.write(random_tensor(name, shapes[name], seed).view(torch.int16).numpy().tobytes())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    from mistral_common import __file__ as mc

    shutil.copyfile(Path(mc).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    done.write_text(json.dumps(cfg))  # last: marks the directory complete
    return path


# --- export in a child process -------------------------------------------------------------------

def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def export_child(model: Path, out: Path, target: str, quant: str, calib: str | None = None) -> None:
    """Runs in the child: export (with --calib `calib`: a file, self, random or none; not given: what
    `mistral-edge export` does), then print one JSON line (wall, peak RSS, RSS after each step)."""
    sys.path.insert(0, str(ROOT))
    from mistral_edge.model.loaders import load_checkpoint
    from mistral_edge.quantize.spec import export_calibration, parse_quant
    from mistral_edge.targets.bundle import write_bundle
    from mistral_edge.targets.profiles import get_target
    from mistral_edge.targets.request import BundleRequest

    t0 = time.perf_counter()
    ck = load_checkpoint(str(model))  # lazy: each tensor is read from its shard when the exporter asks
    steps, start = [], vm("VmRSS")

    def progress(done: int, total: int) -> None:
        steps.append((done, round(time.perf_counter() - t0, 1), vm("VmRSS")))
        print(f"  step {done}/{total} {steps[-1][1]:.0f}s rss {steps[-1][2] / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)

    spec = parse_quant(quant)
    req = BundleRequest(get_target(target), spec, device_memory="32GB", calib=export_calibration(calib, spec, target))
    write_bundle(ck, req, out, log=lambda line: None, progress=progress)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss": vm("VmHWM"), "start_rss": start,
                      "steps": steps}), flush=True)


def run_export(model: Path, out: Path, target: str, quant: str, cli: bool, calib: str | None = None) -> dict:
    if cli:  # the real command; peak RSS from /usr/bin/time-free getrusage of a fresh child
        t0 = time.perf_counter()
        code = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
                "print(json.dumps({'rc': r.returncode, 'peak_rss': "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
        cmd = [sys.executable, "-c", code, sys.executable, "-m", "mistral_edge.cli.main", "export", str(model),
               "--target", target, "--quant", quant, "--device-memory", "32GB", "--out", str(out)]
        cmd += ["--calib", calib] if calib else []
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        result = json.loads(r.stdout.strip().splitlines()[-1])
        if result["rc"]:
            raise SystemExit(f"export failed: {r.stderr[-2000:]}")
        return {**result, "wall_s": time.perf_counter() - t0, "steps": []}
    cmd = [sys.executable, __file__, "_export", str(model), str(out), target, quant] + ([calib] if calib else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_env())
    if r.returncode:
        raise SystemExit(f"export {target} {quant} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def verify(bundle: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from mistral_edge.runtime.bundle import verify as check

    return check(bundle)


# --- llama.cpp's GGUF ------------------------------------------------------------------------------

def write_gguf(model: Path, out: Path) -> Path:
    """Q4_0 GGUF of the checkpoint (gguf.quants.quantize; norms f32), written tensor by tensor."""
    import gguf
    import sentencepiece
    import torch

    if out.is_file():
        return out
    cfg = json.loads((model / "config.json").read_text())
    lazy_index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = hf_shapes(cfg)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    T = gguf.TokenType
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                       T.BYTE if sp.is_byte(i) else T.NORMAL for i in range(n)])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up"}

    def gguf_name(hf: str) -> str:
        if hf in top:
            return top[hf]
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"

    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    block, type_size = gguf.GGML_QUANT_SIZES[Q4_0]
    for hf, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor_info(gguf_name(hf), shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = (shape[0], shape[1] // block * type_size)
            w.add_tensor_info(gguf_name(hf), byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    from safetensors import safe_open

    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for hf, shape in shapes.items():
        with safe_open(model / lazy_index[hf], "pt") as f:
            t = f.get_tensor(hf).to(torch.float32).numpy()
        kind = hf.split(".")[-2]
        if kind in heads:  # llama.cpp's RoPE pairs are interleaved: convert_hf_to_gguf's permute
            h = heads[kind]
            t = t.reshape(h, 2, t.shape[0] // h // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        w.write_tensor_data(t if t.ndim == 1 else gguf.quants.quantize(t, Q4_0))
    w.close()
    os.replace(tmp, out)
    return out


# --- running both --------------------------------------------------------------------------------

class Worker:
    """benchmarks/peers.py serving one system in its own process."""

    def __init__(self, system: str, model: Path):
        self.p = subprocess.Popen([sys.executable, str(HERE / "peers.py"), system, str(model),
                                   "--threads", str(THREADS), "--n-ctx", str(PROMPT + DECODE + 8)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        assert json.loads(self.p.stdout.readline())["ready"]

    def ask(self, cmd: dict) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def peak_rss(system: str, model: Path, prompt: list[int]) -> int:
    r = subprocess.run([sys.executable, str(HERE / "peers.py"), system, str(model), "--threads", str(THREADS),
                        "--n-ctx", str(PROMPT + DECODE + 8), "--memory", str(DECODE)],
                       input=json.dumps(prompt) + "\n", capture_output=True, text=True, env=_env())
    if r.returncode:
        raise SystemExit(f"{system} memory run failed: {r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]


def measure(system: str, model: Path, prompt: list[int]) -> dict:
    w = Worker(system, model)
    try:
        prefill = w.ask({"prefill": prompt})["seconds"]
        decode = w.ask({"decode": prompt, "n": DECODE})
    finally:
        w.close()
    return {"prefill_tok_s": PROMPT / prefill, "decode_tok_s": DECODE / decode["seconds"],
            "peak_rss": peak_rss(system, model, prompt), "first_tokens": decode["tokens"][:8]}


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=MISTRAL_7B["num_hidden_layers"])
    ap.add_argument("--exports", default=",".join(EXPORTS), help=f"comma-separated subset of {', '.join(EXPORTS)}")
    ap.add_argument("--skip-run", action="store_true", help="export only: no prefill/decode runs")
    ap.add_argument("--skip-llamacpp", action="store_true", help="run our bundle only")
    ap.add_argument("--int4", default="int4", help="the int4 spec of cpu-int4 and android (e.g. int4-rtn)")
    ap.add_argument("--cli", action="store_true", help="export with `mistral-edge export` (its progress bar and all)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mistral-edge-export-scale")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles under --work")
    ap.add_argument("--calib", help="export --calib for the int4 exports: a text file, self, random or none "
                                    "(default: the command's, random tokens for the default int4)")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles kept under --work that verify (no export)")
    args = ap.parse_args()
    names = [e for e in args.exports.split(",") if e]
    if unknown := set(names) - set(EXPORTS):
        raise SystemExit(f"unknown export {sorted(unknown)[0]!r}; expected some of {', '.join(EXPORTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = write_checkpoint(args.work / f"mistral-7b-shape-L{args.layers}", args.layers)
    print(f"checkpoint {model}: {gib(size(model))} ({time.perf_counter() - t0:.0f}s)", flush=True)
    results = {}
    for name in names:
        target, quant = EXPORTS[name]
        quant = args.int4 if quant == "int4" else quant
        out = args.work / f"bundle-{name}-L{args.layers}"
        if args.reuse and out.is_dir() and not verify(out):
            print(f"export {name}: reusing {out}", flush=True)
            continue
        r = run_export(model, out, target, quant, args.cli, args.calib if quant.startswith("int4") else None)
        problems = verify(out)
        results[name] = {**r, "bytes": size(out), "verify": problems or "ok"}
        print(f"export {name}: wall {r['wall_s']:.0f}s, peak RSS {gib(r['peak_rss'])}, bundle {gib(size(out))}, "
              f"verify {'ok' if not problems else problems[0]}", flush=True)
        if r["steps"]:
            print("  rss by step (step, s, GiB): " + " ".join(
                f"{d}:{s:.0f}:{rss / 2**30:.2f}" for d, s, rss in r["steps"]), flush=True)
    if not args.skip_run and "cpu-int4" in names:
        prompt = np.random.default_rng(0).integers(3, MISTRAL_7B["vocab_size"], PROMPT).tolist()
        bundle = args.work / f"bundle-cpu-int4-L{args.layers}"
        ours = measure("ours", bundle, prompt)
        print(f"ours int4: prefill {ours['prefill_tok_s']:.1f} tok/s, decode {ours['decode_tok_s']:.2f} tok/s, "
              f"peak RSS {gib(ours['peak_rss'])}, bundle {gib(size(bundle))}", flush=True)
        results["run_ours"] = ours
        if not args.skip_llamacpp:
            t1 = time.perf_counter()
            gguf_path = write_gguf(model, args.work / f"mistral-7b-shape-L{args.layers}-Q4_0.gguf")
            print(f"gguf Q4_0 written in {time.perf_counter() - t1:.0f}s: {gib(size(gguf_path))}", flush=True)
            peer = measure("llama.cpp", gguf_path, prompt)
            print(f"llama.cpp Q4_0: prefill {peer['prefill_tok_s']:.1f} tok/s, decode {peer['decode_tok_s']:.2f} "
                  f"tok/s, peak RSS {gib(peer['peak_rss'])}, gguf {gib(size(gguf_path))}", flush=True)
            results["run_llamacpp"] = {**peer, "bytes": size(gguf_path)}
            print(f"decode_ratio={ours['decode_tok_s'] / peer['decode_tok_s']:.2f} "
                  f"prefill_ratio={ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f} "
                  f"rss_ratio={ours['peak_rss'] / peer['peak_rss']:.2f} "
                  f"size_ratio={size(bundle) / size(gguf_path):.2f}", flush=True)
    print(json.dumps(results, default=str), flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_export":
        export_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5], *sys.argv[6:7])
    else:
        main()
