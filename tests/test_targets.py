"""Target bundles on a tiny Mistral: written, verified, loaded and run; the manifest, tampering,
the memory budget, atomic replacement and the CLI (docs/bundle-format.md)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import SPM_V1, W, assert_close, checkpoint_of, tiny_hf_mistral
from google.protobuf.message import DecodeError
from onnx import numpy_helper

import mistral_edge
from mistral_edge.cli.main import main
from mistral_edge.errors import EdgeError
from mistral_edge.model.config import ModelConfig
from mistral_edge.model.loaders.hf import config_from_hf
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.manifest import FORMAT_VERSION
from mistral_edge.runtime.bundle import Bundle, read_manifest, verify
from mistral_edge.contract import GRAPH_CONTRACT_VERSION
from mistral_edge.targets import bundle as bundle_mod
from mistral_edge.targets.bundle import BundleRequest, write_bundle
from mistral_edge.targets.profiles import DEVICES, TARGETS, get_target, parse_memory

ONNX_TARGETS = ("cpu", "gpu", "jetson", "android", "ios")
MODEL_FILE = {"cpu": "model.onnx", "gpu": "model.onnx", "jetson": "model.onnx", "android": "model.ort",
              "ios": "model.ort"}
MLC_FILES = {"mlc-chat-config.json", "tensor-cache.json", "params_shard_0.bin"}


def fixture_checkpoint(**kw):
    ck = checkpoint_of(tiny_hf_mistral(window=W, vocab=32000, dim=32, **kw))
    ck.tokenizer_files = {"tokenizer.model": SPM_V1}  # 32000 pieces: agrees with the vocabulary
    return ck


def export(ck, out, target="cpu", quant=None, **kw) -> dict:
    profile = get_target(target)
    return write_bundle(ck, BundleRequest(profile, parse_quant(quant or profile.quant), **kw), out, log=lambda _: None)


def run_cli(*args) -> subprocess.CompletedProcess:
    """The installed `mistral-edge` console script, in a process of its own."""
    return subprocess.run(["mistral-edge", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The same entry point in-process (the script only calls main()): no interpreter start-up."""
    def run(*args) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["mistral-edge", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, e.value.code or 0, out.out, out.err)
    return run


def snapshot(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


TOKENS = np.random.default_rng(0).integers(0, 32000, (1, W + 9))


def run_tokens(session, tokens=TOKENS) -> np.ndarray:
    """Logits of every token: a prefill chunk of W, then one token per step past the window."""
    out = [session.step(tokens[:, :W], all_logits=True).copy()]
    out += [session.step(tokens[:, t:t + 1], all_logits=True).copy() for t in range(W, tokens.shape[1])]
    return np.concatenate(out, 1)


@pytest.fixture(scope="module")
def ck():
    return fixture_checkpoint()


@pytest.fixture(scope="module")
def bundles(ck, tmp_path_factory):
    """One bundle per target, each with the target's default quant (int4)."""
    root = tmp_path_factory.mktemp("bundles")
    return {t: (root / t, export(ck, root / t, t)) for t in TARGETS}


@pytest.fixture(scope="module")
def cpu_logits(bundles):
    return run_tokens(Bundle.open(bundles["cpu"][0]).session())


@pytest.fixture
def copy_of(bundles, tmp_path):
    def make(target: str):
        dst = tmp_path / target
        shutil.copytree(bundles[target][0], dst)
        return dst
    return make


# --- one test per target ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ONNX_TARGETS)
def test_onnx_target_bundle(bundles, cpu_logits, cli, target):
    path, manifest = bundles[target]
    profile = TARGETS[target]
    assert {p.name for p in path.iterdir()} == {"manifest.json", "README.md", "tokenizer.model", MODEL_FILE[target]}
    assert manifest.model == MODEL_FILE[target] and manifest.target == target
    assert manifest.runtime.providers == profile.providers
    assert profile.note in (path / "README.md").read_text()
    assert verify(path) == []
    result = cli("verify", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")

    session = Bundle.open(path).session()
    have = ort.get_available_providers()
    expected = [p for p in profile.providers if p in have] or ["CPUExecutionProvider"]
    assert session.session.get_providers() == expected
    options = session.session.get_session_options()
    for key, value in profile.session_options.items():
        if key.startswith("session."):
            assert options.get_session_config_entry(key) == value
    # the same int4 weights whatever the target: the .ort and every provider setting give the cpu
    # logits, to float rounding, or where the target computes in fp16 to its precision, here
    # amplified by MatMulNBits' int8 compute (accuracy_level 4) requantizing fp16-rounded
    # activations (measured: 0.013 of the logit scale; near ties on the random fixture may flip, 0.96 top-1)
    assert session.cache_dtype == {"fp32": np.float32, "fp16": np.float16}[profile.activation_dtype]
    assert_close(run_tokens(session), cpu_logits, profile.activation_dtype, fp32_tol=1e-5, fp16_tol=0.03, top1=0.95)


def test_fp16_targets_halve_the_kv_cache(bundles):
    cpu = bundles["cpu"][1].memory_budget
    for target in ("gpu", "jetson"):
        path, m = bundles[target]
        assert m.activation_dtype == "fp16"
        model = onnx.load(str(path / "model.onnx"))
        types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert types["past_key.0"] == types["present_value.1"] == onnx.TensorProto.FLOAT16
        assert types["logits"] == onnx.TensorProto.FLOAT
        budget = m.memory_budget
        assert budget.kv_cache_bytes == cpu.kv_cache_bytes // 2
        assert budget.activation_bytes == cpu.activation_bytes // 2
        stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert stored <= budget.weight_bytes <= 1.1 * stored  # 8-bit int4 scales are resident as fp16 (folded at load)
        assert budget.weight_bytes < cpu.weight_bytes  # fp16 scales and norms


def test_ort_format_is_not_onnx(bundles):
    """android/ios ship the ORT flatbuffer format, which onnx cannot parse but onnxruntime runs."""
    assert bundles["android"][1].runtime.converted_by == f"onnxruntime {ort.__version__}"
    assert bundles["cpu"][1].runtime.converted_by is None and "converted_by" not in bundles["cpu"][1].to_json()["runtime"]
    data = (bundles["android"][0] / "model.ort").read_bytes()
    assert data[4:8] == b"ORTM"  # the flatbuffer file identifier of ORT format models
    with pytest.raises(DecodeError):
        onnx.load_from_string(data)


def test_mlc_target_bundle(bundles, cli):
    path, manifest = bundles["mlc"]
    assert {p.name for p in path.iterdir()} == {"manifest.json", "README.md", "tokenizer.model", *MLC_FILES}
    assert manifest.model is None and manifest.ops == () and manifest.activation_dtype == "fp16"
    assert manifest.quant.spec == manifest.quant.format == "q4f16_1"
    assert set(manifest.quant.tensors.values()) == {"int4-g32-sym-rtn"}
    chat = json.loads((path / "mlc-chat-config.json").read_text())
    assert chat["quantization"] == "q4f16_1" and chat["model_type"] == "mistral"
    assert chat["sliding_window_size"] == manifest.window == W
    assert chat["prefill_chunk_size"] == manifest.chunk
    # the budget counts what the shards hold (fp16 scales and norms: MLC's activation type)
    param_bytes = json.loads((path / "tensor-cache.json").read_text())["metadata"]["ParamBytes"]
    assert manifest.memory_budget.weight_bytes == pytest.approx(param_bytes, rel=0.01)
    assert "mlc_llm compile" in (path / "README.md").read_text()
    assert verify(path) == []
    result = cli("verify", path)
    assert result.returncode == 0, result.stderr
    with pytest.raises(EdgeError, match="no ONNX model"):
        Bundle.open(path).session()


def test_mlc_refuses_other_quants(ck, tmp_path):
    for quant, kw in (("int8", {}), ("int4-g128", {}), ("int4", {"fmt": "qdq"})):
        with pytest.raises(EdgeError, match="q4f16_1"):
            export(ck, tmp_path / "mlc", "mlc", quant, **kw)
    assert siblings(tmp_path / "mlc") == []


def test_fp32_bundle_matches_reference(ck, tmp_path):
    """The whole path (write, open, session with the profile's settings) computes the model."""
    export(ck, tmp_path / "b", "android", "fp32")
    ref = ReferenceModel(ck.config, ck.weights)
    expected = ref.prefill(torch.from_numpy(TOKENS), ref.new_cache(), W).numpy()
    np.testing.assert_allclose(run_tokens(Bundle.open(tmp_path / "b").session()), expected, atol=1e-4, rtol=0)


# --- the manifest ---------------------------------------------------------------------------------

def test_manifest_round_trip(ck, bundles):
    path, written = bundles["cpu"]
    assert read_manifest(path) == written
    m = json.loads((path / "manifest.json").read_text())  # the JSON format of docs/bundle-format.md
    assert m == written.to_json() and m["manifest_sha256"] == written.digest()
    assert m["format_version"] == FORMAT_VERSION == 2 and m["graph_contract"] == GRAPH_CONTRACT_VERSION == 5 and m["sinks"] == 0
    assert m["toolkit"] == {"name": "mistral-edge", "version": mistral_edge.__version__}
    assert m["source"] == {"path": "fixture", "format": "hf", "sha256": None}  # not a file: nothing to hash
    assert ModelConfig.from_dict(m["config"]) == ck.config
    assert (m["window"], m["chunk"], m["activation_dtype"]) == (W, W, "fp32")
    assert m["quant"] == {"spec": "int4-g32-mzp-search", "format": "nbits", "tensors": {
        "layers.*.attention.wqkv": "int4-g32-fzp-search-s8", "layers.*.attention.wo": "int4-g32-fzp-search-s8",
        "layers.*.feed_forward.w13": "int4-g32-fzp-search-s8", "layers.*.feed_forward.w2": "int4-g32-fzp-search-s8",
        "tok_embeddings": "int4-g32-fzp-search-s8", "output": "int8"}}
    model = onnx.load(str(path / "model.onnx"))
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    assert m["ops"] == sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in nodes})
    assert {"com.microsoft::MatMulNBits", "mistral_edge::WindowedGroupQueryAttention"} <= set(m["ops"])
    files = {p.name: p for p in path.iterdir() if p.name != "manifest.json"}
    assert [f["path"] for f in m["files"]] == sorted(files)
    for f in m["files"]:
        data = files[f["path"]].read_bytes()
        assert (f["bytes"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert m["tokenizer"] == {"file": "tokenizer.model", "bos_id": 1, "eos_ids": [2], "chat_template": None}
    assert m["runtime"]["providers"] == ["CPUExecutionProvider"]

    budget, c = m["memory_budget"], ck.config
    assert budget["kv_cache_bytes"] == c.n_layers * 2 * c.n_kv_heads * W * c.head_dim * 4 == 4096
    assert budget["total_bytes"] == budget["weight_bytes"] + budget["kv_cache_bytes"] + budget["activation_bytes"]
    assert budget["activation_bytes"] > 0 and budget["device_usable_bytes"] is None
    stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    from mistral_edge.quantize.plan import quant_plan
    from mistral_edge.targets.budget import estimate

    plan = quant_plan(c, parse_quant(m["quant"]["spec"]))  # scales are stored fp16, resident at fp32
    assert estimate(c, plan, W, W, stored=True).weight_bytes == pytest.approx(stored, rel=0.01)
    assert budget["weight_bytes"] > stored


def test_an_integer_in_a_float_field_verifies(tmp_path):
    """A loader may keep rope_theta 10000 as an int; the digest is over the JSON as written, so it verifies."""
    ck = fixture_checkpoint()
    ck.config = dataclasses.replace(ck.config, rope_theta=10000)
    export(ck, tmp_path / "b", "cpu", "int8")
    assert '"rope_theta": 10000,' in (tmp_path / "b" / "manifest.json").read_text()
    assert verify(tmp_path / "b") == [] and read_manifest(tmp_path / "b").config.rope_theta == 10000.0


def test_kv_budget_follows_the_window(ck, tmp_path):
    m = export(ck, tmp_path / "b", "cpu", "int8", window=64, chunk=8)
    assert (m.window, m.chunk) == (64, 8)
    assert m.memory_budget.kv_cache_bytes == 4 * 4096
    assert verify(tmp_path / "b") == []


# --- tampering ------------------------------------------------------------------------------------

def assert_cli_rejects(cli, path, *needles):
    result = cli("verify", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr
    return result


@pytest.mark.parametrize("target", ["cpu", "android"])
def test_flipped_byte_is_reported(copy_of, cli, target):
    path = copy_of(target)
    model = path / MODEL_FILE[target]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert verify(path) == [f"{model.name}: sha256 mismatch (file changed since export)"]
    # once through the installed script, in its own process
    assert_cli_rejects(run_cli if target == "cpu" else cli, path, "FAIL", model.name, "sha256 mismatch")
    with pytest.raises(EdgeError, match="--no-verify") as e:
        Bundle.open(path)
    assert "sha256 mismatch" in str(e.value)


def test_missing_truncated_and_unlisted_files(copy_of, cli):
    path = copy_of("cpu")
    (path / "tokenizer.model").unlink()
    (path / "notes.txt").write_text("stray")
    readme = (path / "README.md").read_bytes()
    (path / "README.md").write_bytes(readme[:-1])
    problems = verify(path)
    assert problems == [f"README.md: size {len(readme) - 1} bytes, manifest says {len(readme)}",
                        "missing file tokenizer.model", "unlisted file notes.txt"]
    result = assert_cli_rejects(cli, path, "missing file tokenizer.model", "unlisted file notes.txt", "README.md: size")
    assert len(result.stderr.strip().splitlines()) == 3
    with pytest.raises(EdgeError, match=r"and 2 more.*--no-verify"):
        Bundle.open(path)


def edit_manifest(path, edit, reseal: bool = True) -> dict:
    """Apply `edit` to the bundle's manifest.json; with `reseal`, write manifest_sha256 anew (unless the
    edit removed it) as the docs define it, sha256 of the canonical JSON of every other field."""
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    if reseal and "manifest_sha256" in m:
        m["manifest_sha256"] = hashlib.sha256(json.dumps({k: v for k, v in m.items() if k != "manifest_sha256"},
                                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))
    return m


def test_edited_manifest_disagrees_with_the_graph(copy_of, cli):
    path = copy_of("cpu")

    def edit(m):
        m["window"] = 32
        m["activation_dtype"] = "fp16"
        m["ops"] = m["ops"][1:]
    edit_manifest(path, edit)
    assert verify(path) == ["graph window is '16', manifest says 32", "graph activation_dtype is 'fp32', manifest says "
                            "'fp16'", "graph ops differ from the manifest's op list"]
    assert_cli_rejects(cli, path, "graph window")


def test_edited_manifest_disagrees_with_the_ort_graph(copy_of):
    path = copy_of("ios")
    edit_manifest(path, lambda m: m["config"].update(n_layers=3))
    assert verify(path) == ["graph n_layers is '2', manifest says 3"]


@pytest.mark.parametrize("text, message", [
    ("{\"format_version\": 1, ", "invalid JSON"),
    ("[1, 2]", "not a manifest object"),
    ("{\"format_version\": 99}", "unsupported bundle format version 99"),
    ("{\"format_version\": 1}", "unsupported bundle format version 1 (this toolkit reads version 2; export the model again)"),
    (b"{\"format_version\": 2, \"target\": \"\xff\"}", "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ("{\"format_version\": NaN}", "invalid JSON"),
    ("{\"format_version\": 2}", "field 'manifest_sha256' is missing"),
])
def test_corrupt_manifest_is_one_line(copy_of, cli, text, message):
    path = copy_of("cpu")
    if isinstance(text, bytes):
        (path / "manifest.json").write_bytes(text)
    else:
        (path / "manifest.json").write_text(text)
    with pytest.raises(EdgeError, match=re.escape(message)):
        verify(path)
    for command in (["verify", path], ["inspect", path], ["generate", "--bundle", path, "hi"]):
        result = cli(*command)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("files"), "field 'files' is missing or not an array"),
    (lambda m: m.update(model=3), "field 'model' is missing or not a string"),
    (lambda m: m["files"][0].pop("sha256"), "field 'files[0].sha256' is missing or not a string"),
    (lambda m: m["files"].append({"path": "../escape", "bytes": 1, "sha256": "0"}), "lies outside the bundle"),
    (lambda m: m.update(tokenizer={}), "field 'tokenizer.file' is missing or not a string"),
    (lambda m: m.update(runtime={}), "field 'runtime.providers' is missing or not an array"),
    (lambda m: m["runtime"].pop("providers"), "field 'runtime.providers' is missing or not an array"),
    (lambda m: m["tokenizer"].update(eos_ids=5), "field 'tokenizer.eos_ids' is missing or not an array"),
    (lambda m: m["tokenizer"].update(eos_ids=[True]), "field 'tokenizer.eos_ids[0]' is missing or not an integer"),
    (lambda m: m["tokenizer"].update(eos_ids=[32000]), "token id 32000 is outside the vocabulary"),
    (lambda m: m["runtime"]["session_options"].update(intra_op_num_threads="4"), "intra_op_num_threads must be an integer"),
    (lambda m: m["files"][0].update(path="x" * 300), "a name longer than 255 bytes"),
    (lambda m: m["files"][0].update(path="a\u0000b"), "not a plain relative path"),
    (lambda m: m["files"][0].update(path="\ud800"), "not valid Unicode"),
    (lambda m: m.update(window=8), "chunk 16 must be between 1 and the window 8"),
    (lambda m: m.update(extra=1), "field 'extra' is not part of bundle format 2"),
    (lambda m: m["generation"].update(top_p=0), "top_p must be in (0, 1]"),
    (lambda m: m["memory_budget"].update(total_bytes=1), "total_bytes their sum"),
    (lambda m: m["config"].update(n_heads=0), "n_heads must be a positive integer"),
    (lambda m: m["toolkit"].update(name="other"), "written by 'other', not mistral-edge"),
    (lambda m: m.pop("manifest_sha256"), "field 'manifest_sha256' is missing"),
])
def test_malformed_manifest_fields(copy_of, edit, message):
    """Every field is checked on read, nested ones too: one line, never a KeyError later."""
    path = copy_of("cpu")
    edit_manifest(path, edit)
    for action in (verify, read_manifest, lambda p: Bundle.open(p, check=False)):
        with pytest.raises(EdgeError, match=re.escape(message)) as e:
            action(path)
        assert "\n" not in str(e.value)


# --- what the runtime opens: listed, hashed, regular files inside the bundle -------------------

@pytest.mark.parametrize("edit", [
    lambda m: m["tokenizer"].update(chat_template="{{ 'pwned' }}"),
    lambda m: m["tokenizer"].update(eos_ids=[5]),
    lambda m: m["generation"].update(temperature=0.7),
    lambda m: m["generation"].update(temperature=0),  # the same value once typed: still an edit of the file
    lambda m: m["runtime"]["session_options"].update(intra_op_num_threads=2),
    lambda m: m["runtime"].update(providers=["CUDAExecutionProvider"]),
])
def test_hand_edits_to_the_manifest_are_caught(copy_of, cli, edit):
    path = copy_of("cpu")
    edit_manifest(path, edit, reseal=False)
    assert verify(path) == ["manifest.json: edited since export (its content no longer matches manifest_sha256)"]
    assert_cli_rejects(cli, path, "manifest.json: edited since export")
    with pytest.raises(EdgeError, match="edited since export.*--no-verify"):
        Bundle.open(path)


def outside_copy(path, tmp_path, name="model.onnx"):
    evil = tmp_path / "elsewhere"
    evil.mkdir(exist_ok=True)
    shutil.copyfile(path / name, evil / name)
    return evil / name


@pytest.mark.parametrize("field", ["model", "tokenizer"])
@pytest.mark.parametrize("where, listed, message", [
    ("{abs}", False, "is not one of the listed (hashed) files"),
    ("../elsewhere/{name}", False, "is not one of the listed (hashed) files"),
    ("../elsewhere/{name}", True, "lies outside the bundle"),
])
def test_model_and_tokenizer_must_be_listed_files_inside(copy_of, tmp_path, cli, field, where, listed, message):
    """A manifest pointing `model` or `tokenizer.file` at a file elsewhere is refused, even with its
    digest rewritten and the file listed with its true hash, with or without verification."""
    path = copy_of("cpu")
    name = "model.onnx" if field == "model" else "tokenizer.model"
    evil = outside_copy(path, tmp_path, name)
    where = where.format(abs=evil, name=name)

    def edit(m):
        if field == "model":
            m["model"] = where
        else:
            m["tokenizer"]["file"] = where
        if listed:
            m["files"].append({"path": where, "bytes": evil.stat().st_size,
                               "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()})
    edit_manifest(path, edit)
    for action in (verify, lambda p: Bundle.open(p, check=False)):
        with pytest.raises(EdgeError, match=re.escape(message)):
            action(path)
    result = cli("generate", "--bundle", path, "--no-verify", "hi")
    assert result.returncode == 1 and message in result.stderr


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.model"])
def test_symlink_leaving_the_bundle_is_refused(copy_of, tmp_path, name):
    """The same bytes (hashes match) through a symlink to a file outside: refused, also with --no-verify."""
    path = copy_of("cpu")
    evil = outside_copy(path, tmp_path, name)
    (path / name).unlink()
    (path / name).symlink_to(evil)
    assert verify(path) == [f"{name}: a symlink that leaves the bundle"]
    b = Bundle.open(path, check=False)
    with pytest.raises(EdgeError, match="a symlink that leaves the bundle"):
        b.session() if name == "model.onnx" else b.tokenizer()


def test_symlinks_inside_and_symlinked_directories(copy_of, tmp_path):
    path = copy_of("cpu")
    (path / "README.md").rename(path / "readme.txt")
    (path / "README.md").symlink_to("readme.txt")  # resolves inside: allowed, but readme.txt is not listed
    (tmp_path / "outside").mkdir()
    (path / "extra").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert verify(path) == ["unlisted symlink extra", "unlisted file readme.txt"]


def within(seconds: float, fn):
    """fn() in a daemon thread: fails (rather than hanging the suite) if it takes longer."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_fifos_are_refused_without_opening(copy_of, cli):
    """A FIFO in place of a listed file, beside them, or as the manifest: reported, never opened (no hang)."""
    import os

    path = copy_of("cpu")
    (path / "model.onnx").unlink()
    os.mkfifo(path / "model.onnx")
    os.mkfifo(path / "pipe")
    assert within(30, lambda: verify(path)) == ["model.onnx: not a regular file", "unlisted entry (not a regular file) pipe"]
    with pytest.raises(EdgeError, match="not a regular file"):
        within(30, lambda: Bundle.open(path, check=False).model_path)
    (path / "manifest.json").unlink()
    os.mkfifo(path / "manifest.json")
    result = within(30, lambda: cli("verify", path))
    assert result.returncode == 1 and "manifest.json: not a regular file" in result.stderr


NEWER_METADATA = {1: ("activation_dtype", "sinks", "trained_window", "kv_cache"),
                  2: ("sinks", "trained_window", "kv_cache"), 3: ("kv_cache",)}


def old_contract_bundle(path, version: int = 1):
    """Rewrite a bundle as graph contract `version` wrote it: its graph metadata (without the keys
    later versions added) and manifest."""
    model = onnx.load(str(path / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props
             if p.key.removeprefix("mistral_edge.") not in NEWER_METADATA[version]}
    props["mistral_edge.graph_contract"] = str(version)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path / "model.onnx"))
    data = (path / "model.onnx").read_bytes()

    def edit(m):
        m["graph_contract"] = version
        m.pop("sinks", None)
        m.pop("kv_cache", None)
        entry = next(f for f in m["files"] if f["path"] == "model.onnx")
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    edit_manifest(path, edit)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_graph_contracts_say_export_again(copy_of, cli, version):
    path = copy_of("cpu")
    old_contract_bundle(path, version)
    message = f"model.onnx: graph contract {version}, this runtime runs version 5; export the model again"
    assert verify(path) == [message]
    assert_cli_rejects(cli, path, message)


def test_no_verify_opens_a_tampered_bundle(copy_of, cpu_logits):
    path = copy_of("cpu")
    (path / "README.md").write_text("edited by hand")
    with pytest.raises(EdgeError, match="README.md: size 14 bytes.*--no-verify"):
        Bundle.open(path)
    np.testing.assert_allclose(run_tokens(Bundle.open(path, check=False).session()), cpu_logits, atol=1e-5, rtol=0)


def test_not_a_bundle(tmp_path):
    with pytest.raises(EdgeError, match="no such bundle directory"):
        verify(tmp_path / "absent")
    with pytest.raises(EdgeError, match="not a bundle"):
        verify(tmp_path)


# --- memory budget --------------------------------------------------------------------------------

def test_budget_refusal_writes_nothing(ck, bundles, tmp_path):
    out = tmp_path / "out" / "bundle"
    with pytest.raises(EdgeError) as e:
        export(ck, out, "cpu", device_memory="1MB")
    msg = str(e.value)
    total = bundles["cpu"][1].memory_budget.total_bytes
    short = total - int(2**20 * TARGETS["cpu"].usable_fraction)
    assert f"{short / 2**20:.1f} MiB short" in msg and f"needs {total / 2**20:.1f} MiB" in msg
    assert msg.endswith("short; it would fit with --device-memory phone-4gb") and "\n" not in msg  # already int4
    assert not (tmp_path / "out").exists()  # not even the parent, nor a temp dir beside it


@pytest.mark.parametrize("quant, memory, hints", [
    ("fp32", "10MB", "--device-memory phone-4gb or --quant int4"),  # no window fits fp32 in 8 MB
    ("int4", "9MB", "--device-memory phone-4gb or --window {w} or less"),  # int4 already: no --quant hint
    ("int8", "phone-4gb", None),
])
def test_budget_hints_follow_the_request(ck, tmp_path, quant, memory, hints):
    """Each hint is a single change to this request that fits: checked by exporting with it."""
    from mistral_edge.quantize.plan import quant_plan
    from mistral_edge.targets.budget import estimate

    if hints is None:  # fits: no refusal at all
        assert export(ck, tmp_path / "ok", "cpu", quant, window=1024, chunk=16, device_memory=memory).window == 1024
        return
    usable = int(parse_memory(memory) * TARGETS["cpu"].usable_fraction)
    plan = quant_plan(ck.config, parse_quant(quant))
    w = max(w for w in range(1, 1024) if estimate(ck.config, plan, w, min(w, 16), packed=True).total_bytes <= usable) \
        if "{w}" in hints else None
    with pytest.raises(EdgeError) as e:
        export(ck, tmp_path / "b", "cpu", quant, window=1024, chunk=16, device_memory=memory)
    assert str(e.value).endswith("short; it would fit with " + hints.format(w=w))
    if w:
        export(ck, tmp_path / "w", "cpu", quant, window=w, chunk=min(w, 16), device_memory=memory)  # the hint is right
        with pytest.raises(EdgeError, match="short"):
            export(ck, tmp_path / "w1", "cpu", quant, window=w + 1, chunk=min(w, 16), device_memory=memory)
    if "int4" in hints:
        export(ck, tmp_path / "q", "cpu", "int4", window=1024, chunk=16, device_memory=memory)


def test_default_device_budgets(bundles):
    usable = {t: bundles[t][1].memory_budget.device_usable_bytes for t in TARGETS}
    assert usable == {"cpu": None, "gpu": None, "mlc": None, "jetson": int(0.6 * (8 << 30)),
                      "android": 2 << 30, "ios": 2 << 30}


def test_a_phone_budget_refuses_a_big_model(tmp_path):
    """A 7B-shaped config at fp16 needs ~28 GB resident: far past a phone, and no file is written."""
    ck = fixture_checkpoint()
    ck.config = dataclasses.replace(ck.config, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                                    hidden_dim=14336)
    with pytest.raises(EdgeError, match=r"but phone-4gb leaves 2048\.0 MiB \(50%\) for the model on android"):
        export(ck, tmp_path / "b", "android", "fp16")
    assert list(tmp_path.iterdir()) == []


def test_a_7b_int4_refusal_does_not_suggest_int4(tmp_path):
    """Bug 10: the hint for a request that already is int4 was "try a smaller --quant (int4)"; no
    phone profile holds 7B int4 weights (6.5 GiB as ONNX Runtime's CPU provider holds them) at 50%, no
    window makes them smaller."""
    ck = fixture_checkpoint()
    ck.config = dataclasses.replace(ck.config, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                                    hidden_dim=14336)
    with pytest.raises(EdgeError) as e:
        export(ck, tmp_path / "b", "android", "int4", window=4096)
    assert "int4" not in str(e.value) and "--window" not in str(e.value)
    assert str(e.value).endswith("short; it would fit with --device-memory orin-nx-16gb")


@pytest.mark.parametrize("text, size", [
    ("phone-4gb", 4 << 30), ("orin-nano-8gb", 8 << 30), ("ORIN-NX-16GB", 16 << 30), ("8GB", 8 << 30),
    ("512MiB", 512 << 20), ("1.5g", 3 << 29), ("640k", 640 << 10), ("100", 100),
])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "8XB", "8 GB GB", ""])
def test_parse_memory_refuses(text):
    with pytest.raises(EdgeError, match="memory"):
        parse_memory(text)
    with pytest.raises(EdgeError):
        BundleRequest(TARGETS["cpu"], parse_quant("int4"), device_memory=text)


def test_named_devices_are_listed_in_the_error():
    with pytest.raises(EdgeError) as e:
        parse_memory("tablet")
    assert all(name in str(e.value) for name in DEVICES)


# --- atomic writes --------------------------------------------------------------------------------

def dying_export(error: BaseException):
    """An export_onnx that writes part of the model, then dies with `error`."""
    def export_onnx(ck, spec, out_path, **kw):
        out_path.write_bytes(b"half a model")
        raise error
    return export_onnx


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_nothing(ck, tmp_path, monkeypatch, error):
    monkeypatch.setattr(bundle_mod, "export_onnx", dying_export(error))
    with pytest.raises(type(error)):
        export(ck, tmp_path / "b")
    assert siblings(tmp_path / "b") == []


def test_existing_bundle_survives_a_failed_export_and_is_replaced_whole(ck, bundles, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(bundles["cpu"][0], out)
    before = snapshot(out)
    with monkeypatch.context() as mp:
        mp.setattr(bundle_mod, "export_onnx", dying_export(RuntimeError("disk full")))
        with pytest.raises(RuntimeError):
            export(ck, out, "cpu")
    assert snapshot(out) == before and siblings(out) == ["b"]

    export(ck, out, "android")  # replaces the cpu bundle: its model.onnx must not linger
    assert {p.name for p in out.iterdir()} == {"manifest.json", "README.md", "tokenizer.model", "model.ort"}
    assert read_manifest(out).target == "android" and verify(out) == []
    assert siblings(out) == ["b"]


def test_out_must_be_a_bundle_or_empty(ck, tmp_path):
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(EdgeError, match="exists and is not a bundle"):
        export(ck, precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeError, match="exists and is not a bundle"):
        export(ck, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    export(ck, empty, "mlc")
    assert verify(empty) == []


def test_unwritable_parent_is_one_line(ck, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeError, match="cannot write to") as e:
        export(ck, tmp_path / "file" / "bundle")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_folder_with_someone_elses_manifest_is_not_replaced(ck, bundles, tmp_path):
    """Security 2: a web app's manifest.json does not make its folder a bundle; an older format's bundle of ours is one."""
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/"}))
    (app / "index.html").write_text("<html>")
    before = snapshot(app)
    with pytest.raises(EdgeError, match="exists and is not a bundle") as e:
        export(ck, app)
    assert "\n" not in str(e.value) and snapshot(app) == before and siblings(app) == ["webapp"]
    for text in ("not json", json.dumps({"format_version": 2, "toolkit": {"name": "other"}}), "[" * 100_000):
        (app / "manifest.json").write_text(text)
        with pytest.raises(EdgeError, match="exists and is not a bundle"):
            export(ck, app)
    old = tmp_path / "old"
    shutil.copytree(bundles["cpu"][0], old)
    edit_manifest(old, lambda m: m.update(format_version=1), reseal=False)  # as an earlier toolkit wrote it
    export(ck, old, "mlc")
    assert verify(old) == [] and siblings(old) == ["old", "webapp"]


def test_full_disk_is_one_line(ck, tmp_path, monkeypatch, hf_dir, cli):
    """A write failing with ENOSPC: one error line naming the cause, and nothing left behind."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.onnx")
    monkeypatch.setattr(bundle_mod, "export_onnx", dying_export(full))
    with pytest.raises(EdgeError, match="cannot write the bundle .*: No space left on device") as e:
        export(ck, tmp_path / "b")
    assert "\n" not in str(e.value) and siblings(tmp_path / "b") == []
    result = cli("export", hf_dir[0], "--out", tmp_path / "c")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write the bundle")
    assert siblings(tmp_path / "c") == []


SLOW_EXPORT = """
import sys, time
from pathlib import Path
from mistral_edge.model.checkpoint import Checkpoint
from mistral_edge.model.config import ModelConfig
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.targets import bundle as bundle_mod
from mistral_edge.targets.profiles import get_target

def slow_export(ck, spec, out_path, **kw):
    out_path.write_bytes(b"half a model")
    print("writing", flush=True)
    time.sleep(120)

bundle_mod.export_onnx = slow_export
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=72, vocab_size=32000,
                  sliding_window=16)
ck = Checkpoint(cfg, {}, "fixture", tokenizer_files={"tokenizer.model": Path(sys.argv[2])})
bundle_mod.write_bundle(ck, bundle_mod.BundleRequest(get_target("cpu"), parse_quant("int4")), Path(sys.argv[1]),
                        log=lambda _: None)
"""


def slow_export(out) -> subprocess.Popen:
    """An export in a process of its own, stopped while it writes the model."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(out), str(SPM_V1)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "writing\n", p.communicate()[1]
    return p


def test_sigterm_during_export_removes_the_temp_dir(tmp_path):
    """Bug 12: what `timeout`, CI runners and service managers send; Ctrl-C is test_failed_export_leaves_nothing."""
    out = tmp_path / "b"
    p = slow_export(out)
    assert [n.startswith(".b.tmp-") for n in siblings(out)] == [True]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in p.stderr.read()
    assert siblings(out) == []


def test_a_killed_exports_temp_dir_is_removed_by_the_next(ck, tmp_path):
    """A SIGKILL leaves `.b.tmp-PID-*`; the next export to b removes it once PID is gone, and no other dir."""
    out = tmp_path / "b"
    p = slow_export(out)
    p.kill()
    p.wait(timeout=60)
    (stale,) = siblings(out)
    assert stale.startswith(f".b.tmp-{p.pid}-")
    keep = [f".b.tmp-{os.getpid()}-0123abcd", f".c.tmp-{p.pid}-0123abcd", ".b.tmp-0123abcd", f".b.tmp-{p.pid}-notours"]
    for name in keep:
        (tmp_path / name).mkdir()
    lines = []
    write_bundle(ck, BundleRequest(TARGETS["mlc"], parse_quant("int4")), out, log=lines.append)
    assert siblings(out) == sorted(["b", *keep]) and verify(out) == []
    assert lines == [f"removed {tmp_path / stale}, left by an export (pid {p.pid}) that was killed"]


# --- the CLI --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-mistral"
    model = tiny_hf_mistral(window=W, vocab=32000, dim=32)
    model.save_pretrained(path)
    shutil.copyfile(SPM_V1, path / "tokenizer.model")
    return path, model


def test_cli_export_verify_inspect(hf_dir, tmp_path, cli):
    path, model = hf_dir
    out = tmp_path / "bundle"
    result = run_cli("export", path, "--target", "cpu", "--quant", "int8", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr
    m = read_manifest(out).to_json()
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    assert m["source"] == {"path": str(path), "format": "hf", "sha256": digest.hexdigest()}
    assert ModelConfig.from_dict(m["config"]) == config_from_hf(
        {**model.config.to_dict(), "architectures": ["MistralForCausalLM"]})
    assert m["quant"]["spec"] == "int8" and set(m["quant"]["tensors"].values()) == {"int8"}
    assert (out / "tokenizer.model").read_bytes() == SPM_V1.read_bytes()

    result = cli("verify", out)
    assert result.returncode == 0 and "OK" in result.stdout
    result = cli("inspect", out)
    assert result.returncode == 0, result.stderr
    for text in ("int8 (nbits)", "memory.kv_cache_bytes", "4,096 B", "config.sliding_window", "file model.onnx",
                 "layers.*.attention.wqkv", "CPUExecutionProvider"):
        assert text in result.stdout, text


def test_activations_override_the_target(ck, hf_dir, tmp_path, cli, cpu_logits, bundles):
    m = export(ck, tmp_path / "gpu32", "gpu", activations="fp32")
    cpu = bundles["cpu"][1].memory_budget  # the same, but for the CPU provider's repacked MatMulNBits weights
    assert m.activation_dtype == "fp32" and m.memory_budget.kv_cache_bytes == cpu.kv_cache_bytes
    assert m.memory_budget.activation_bytes == cpu.activation_bytes and m.memory_budget.weight_bytes < cpu.weight_bytes
    np.testing.assert_allclose(run_tokens(Bundle.open(tmp_path / "gpu32").session()), cpu_logits, atol=1e-5, rtol=0)

    result = cli("export", hf_dir[0], "--target", "cpu", "--activations", "fp16", "--out", tmp_path / "cpu16")
    assert result.returncode == 0, result.stderr
    assert "fp16 activations" in result.stderr
    assert read_manifest(tmp_path / "cpu16").activation_dtype == "fp16" and verify(tmp_path / "cpu16") == []
    assert Bundle.open(tmp_path / "cpu16").session().cache_dtype == np.float16


@pytest.mark.parametrize("args, message", [
    (["--target", "toaster"], "unknown target 'toaster'; expected one of cpu, gpu, jetson, android, ios, mlc"),
    (["--quant", "int3"], "unknown quantization 'int3'"),
    (["--device-memory", "lots"], "cannot read memory size 'lots'"),
    (["--device-memory", "1MB"], "MiB short; it would fit with --device-memory phone-4gb"),
    (["--activations", "bf16"], "unknown activation dtype 'bf16'; expected one of fp32, fp16"),
    (["--target", "mlc", "--activations", "fp32"], "no --activations fp32"),
])
def test_cli_export_errors(hf_dir, tmp_path, cli, args, message):
    result = cli("export", hf_dir[0], "--out", tmp_path / "b", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_integer_format_bundle_round_trip(ck, tmp_path):
    """`--format integer`: the manifest names it and its MatMulInteger op, the files verify, the
    budget is the exported bytes, and the bundle's session computes what the nbits bundle does
    within the 8-bit activations' rounding; fp16 activations are refused before anything is written."""
    manifest = export(ck, tmp_path / "b", quant="int8", fmt="integer")
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["quant"]["format"] == "integer" and "ai.onnx::MatMulInteger" in m["ops"]
    assert "com.microsoft::MatMulNBits" not in m["ops"] and verify(tmp_path / "b") == []
    assert read_manifest(tmp_path / "b") == manifest
    export(ck, tmp_path / "n", quant="int8")
    got, nbits = (run_tokens(Bundle.open(tmp_path / d).session()) for d in ("b", "n"))
    assert 0 < np.abs(got - nbits).max() < 0.05 * np.abs(nbits).max()
    with pytest.raises(EdgeError, match="the integer format computes in fp32"):
        export(ck, tmp_path / "h", quant="int8", fmt="integer", activations="fp16")
    assert not (tmp_path / "h").exists()
