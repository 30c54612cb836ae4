"""The command-line contract: one `error: ...` line, exit 2 for usage errors and 1 for bad input;
requests checked whole before a model loads; flags that do not apply refused; hostile streams."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from dataclasses import fields

import pytest
from helpers import SPM_V1, W, checkpoint_of, tiny_hf_mistral, write_tiny_hf_dir

import mistral_edge.model.loaders
from mistral_edge.cli import generate as generate_cli
from mistral_edge.cli.main import COMMANDS, app, main
from mistral_edge.errors import EdgeError
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.targets.bundle import write_bundle
from mistral_edge.targets.profiles import get_target
from mistral_edge.targets.request import MAX_WINDOW, BundleRequest

NESTED_RANGES = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{{ 'x' }}"
HUGE_STRING = "{{ 'x' * 300000000 }}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny fp32 bundle, and two whose chat templates attack the renderer."""
    ck = checkpoint_of(tiny_hf_mistral(window=W, vocab=32000, dim=32))
    ck.tokenizer_files = {"tokenizer.model": SPM_V1}
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name, template in (("plain", None), ("ranges", NESTED_RANGES), ("huge", HUGE_STRING)):
        ck.chat_template = template
        write_bundle(ck, BundleRequest(get_target("cpu"), parse_quant("fp32"), chunk=5), root / name,
                     log=lambda _: None)
        out[name] = root / name
    return out


@pytest.fixture
def cli(capsys, monkeypatch):
    """The console script's entry point in-process: (exit status, stdout, stderr)."""
    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mistral-edge", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code or 0, out.out, out.err
    return run


@pytest.fixture
def no_load(monkeypatch):
    """Loading a checkpoint fails the test: the command had to refuse before it."""
    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")
    monkeypatch.setattr(mistral_edge.model.loaders, "load_checkpoint", load)


def script(*args, **kwargs) -> subprocess.CompletedProcess:
    """The command in a process of its own, for what needs real streams."""
    code = "from mistral_edge.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120, **kwargs)


def one_error_line(stderr: str, message: str = "") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], stderr
    assert "Traceback" not in stderr and "╭" not in stderr
    return lines[0]


# ---- usage errors: one line, exit 2, for every command ---------------------------------------------

USAGE_ERRORS = [
    (["generate"], "Missing argument"),
    (["info", "--window", "abc"], "Invalid value for '--window'"),
    (["export", "--bogus"], "No such option: --bogus"),
    (["compare", "--runs", "x"], "Invalid value for '--runs'"),
    (["inspect"], "Missing argument"),
    (["verify", "a", "b"], "unexpected extra argument"),
    (["chat", "--temperature", "hot"], "Invalid value for '--temperature'"),
    (["chat", "extra"], "unexpected extra argument"),
    (["serve", "--port", "http"], "Invalid value for '--port'"),
    (["moderate"], "Missing argument 'text'"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("args, message", USAGE_ERRORS)
def test_usage_errors_are_one_line_and_exit_2(cli, args, message):
    status, out, err = cli(*args)
    assert status == 2 and out == ""
    assert one_error_line(err, message).endswith("--help`)")


def test_every_command_has_a_usage_error_test():
    assert {args[0] for args, _ in USAGE_ERRORS} >= {name for name, _ in COMMANDS}


def test_bare_command_prints_help_as_a_usage_error(cli):
    status, _, err = cli()
    assert status == 2 and all(name in err for name, _ in COMMANDS)


def test_help_is_not_an_error(cli):
    status, out, err = cli("generate", "--help")
    assert status == 0 and "--temperature" in out and err == ""


# ---- structure ------------------------------------------------------------------------------------

def test_commands_are_registered_in_the_listed_order():
    assert [c.name for c in app.registered_commands] == [name for name, _ in COMMANDS]
    with pytest.raises(ModuleNotFoundError):
        __import__("mistral_edge.cli.commands")


def test_generate_and_chat_share_one_options_object():
    shared = [f.name for f in fields(generate_cli.RunOptions)]
    for command, own in ((generate_cli.generate, ["prompt", "raw", "json_schema", "regex", "choice"]),
                        (generate_cli.chat, ["save", "resume"])):
        assert list(inspect.signature(command).parameters) == own + shared


# ---- export: the whole request is checked before the checkpoint loads -------------------------------

@pytest.mark.parametrize("args, message", [
    (["--format", "bogus"], "unknown weight format 'bogus'; expected one of nbits, qdq, integer"),
    (["--format", "integer", "--activations", "fp16"], "the integer format computes in fp32"),
    (["--target", "gpu", "--format", "integer"], "built in fp32, not fp16"),
    (["--target", "mlc", "--format", "qdq"], "q4f16_1"),
    (["--target", "mlc", "--quant", "int8"], "q4f16_1"),
    (["--target", "mlc", "--head", "fp16"], "q4f16_1"),
    (["--target", "mlc", "--activations", "fp32"], "no --activations fp32"),
    (["--embedding", "int2"], "unsupported embedding precision 'int2'; expected one of fp32, fp16, int8, int4"),
    (["--window", "1099511627776"], f"window must be an integer between 1 and {MAX_WINDOW:,}"),
    (["--window", "0"], "window must be an integer between 1"),
    (["--chunk", "0"], "chunk size must be an integer between 1"),
    (["--window", "8", "--chunk", "16"], "chunk size must be between 1 and the window W=8"),
    (["--window", "8", "--sinks", "8"], "sinks must be an integer between 0 and 7, got 8"),
    (["--sinks", "-1"], "sinks must be an integer between 0"),
    (["--window", "8", "--sinks", "2", "--chunk", "7"], "chunk size must be between 1 and the window W=8 minus its 2 sinks, 6"),
    (["--target", "mlc", "--sinks", "4"], "the mlc target has no attention sinks"),
    (["--target", "mlc", "--sinks", "0", "--pool", "4"], "the mlc target has no attention sinks or pool"),
    (["--pool", "-1"], "pool must be an integer between 0"),
    (["--window", "8", "--sinks", "2", "--pool", "6"], "pool must be an integer between 0 and 5"),
    (["--window", "8", "--sinks", "2", "--pool", "3", "--chunk", "4"],
     "chunk size must be between 1 and the window W=8 minus its 2 sinks and pool of 3, 3, got 4"),
    (["--group-size", "0"], "unsupported int4 group size 0"),
    (["--group-size", "-32"], "unsupported int4 group size -32"),
    (["--quant", "int4-g0"], "unsupported int4 group size 0"),
    (["--activations", "bf16"], "unknown activation dtype 'bf16'"),
    (["--device-memory", "1" + "0" * 400 + "GB"], "device memory must be positive and at most 1 PiB"),
    (["--quant", ""], "unknown quantization ''"),
    (["--quant", "int4-g²"], "unknown quantization 'int4-g²'"),
])
def test_export_refuses_before_loading(cli, no_load, tmp_path, args, message):
    status, _, err = cli("export", "some-model", "--out", tmp_path / "b", *args)
    assert status == 1
    one_error_line(err, message)
    assert list(tmp_path.iterdir()) == []


def test_info_window_is_bounded_before_loading(cli, no_load):
    status, _, err = cli("info", "--window", 2**40)
    assert status == 1
    one_error_line(err, "window must be an integer between 1")


def test_request_types():
    cpu, mlc = get_target("cpu"), get_target("mlc")
    BundleRequest(mlc, parse_quant("int4"))  # the mlc defaults
    BundleRequest(mlc, parse_quant("int4-g32-sym-rtn"))
    assert parse_quant("int4", head="int4").embedding is None  # the plan's choice (quantize/plan.py)
    assert BundleRequest(cpu, parse_quant("int8"), fmt="qdq").fmt == "qdq"


# ---- generate / chat: flags that do not apply, bad values, hostile streams ---------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "x"], "--model cannot be used with --backend onnx"),
    (["--window", "8"], "--window cannot be used with --backend onnx"),
    (["--trust-pickle"], "--trust-pickle cannot be used with --backend onnx"),
    (["--quant", "int8"], "--quant applies to --backend torch"),
    (["--kv-cache", "int8"], "--kv-cache applies to --backend torch; a bundle's KV cache is chosen at export"),
    (["--temperature", "nan"], "temperature must be 0 (greedy) or a finite number"),
    (["--temperature", "5e-324"], "temperature must be 0 (greedy) or a finite number"),
    (["--temperature", "-1"], "temperature must be 0"),
    (["--top-p", "-0.5"], "top-p must be in (0, 1]"),
    (["--top-k", "-1"], "top-k must be >= 0"),
    (["--repetition-penalty", "nan"], "repetition penalty must be a finite number"),
    (["--seed", "-1"], "seed must be >= 0"),  # even when greedy
    (["--stop", ""], "a stop string must be non-empty"),
    (["--max-new-tokens", "-1"], "max-new-tokens must be an integer >= 0"),
    (["--chunk", "0"], "chunk size must be an integer between 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_generate_refuses_with_a_bundle(cli, bundles, args, message):
    for command in (["generate", "hi"], ["chat"]):
        status, out, err = cli(*command, "--bundle", bundles["plain"], *args)
        assert status == 1 and out == ""
        one_error_line(err, message)


@pytest.mark.parametrize("args, message", [
    (["--threads", "2"], "--threads cannot be used with --backend torch"),
    (["--verify"], "--verify/--no-verify cannot be used with --backend torch"),
    (["--no-verify"], "--verify/--no-verify cannot be used with --backend torch"),
    (["--quant", "int3"], "unknown --quant 'int3' for the torch backend; expected none, int8, nf4, int8-wo, int4-wo"),
    (["--window", str(2**40)], "window must be an integer between 1"),
    (["--kv-cache", "int4"], "unknown KV cache type 'int4'; expected one of fp32, fp16, int8"),
    (["--kv-cache", "fp32", "--dtype", "bf16"], "an fp32 KV cache needs fp32 activations (bf16 ones would be "
                                                "stored widened): use --kv-cache fp16 or int8, or --dtype fp32"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
])
def test_generate_refuses_with_the_torch_backend_before_loading(cli, no_load, args, message):
    status, _, err = cli("generate", "hi", "--model", "some-model", *args)
    assert status == 1
    one_error_line(err, message)


def test_generate_on_the_torch_backend_stores_the_kv_cache_asked_for(cli, tmp_path):
    """`generate --backend torch --kv-cache int8`: the reply of direct generation on an int8-cache
    TorchSession, past W (the prompt and reply wrap the ring, so every cached key is read back)."""
    from mistral_edge.model.loaders import load_checkpoint
    from mistral_edge.model.reference import ReferenceModel
    from mistral_edge.model.torch_session import TorchSession
    from mistral_edge.runtime.generate import GenerationConfig, Generator
    from mistral_edge.tokenizer import Tokenizer

    model_dir = write_tiny_hf_dir(tmp_path / "tiny", W)
    prompt = "the sea " * W
    status, out, err = cli("generate", "--backend", "torch", "--model", model_dir, "--kv-cache", "int8", "--raw",
                           "--max-new-tokens", "12", prompt)
    assert status == 0, err
    ck = load_checkpoint(str(model_dir))
    tok = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    session = TorchSession(ReferenceModel(ck.config, ck.weights), W, W, kv_cache="int8")
    expected = "".join(Generator(session, tok).stream(tok.encode(prompt), GenerationConfig(max_new_tokens=12)))
    assert session.positions[0] > W and out == expected + "\n"


def test_generate_runs_a_bundle(cli, bundles):
    status, out, err = cli("generate", "--bundle", bundles["plain"], "hi", "--max-new-tokens", "3",
                           "--temperature", "0.8", "--seed", "0")
    assert status == 0 and out.endswith("\n") and err == ""


def test_prompt_that_is_not_utf8(bundles):
    r = script("generate", "--bundle", str(bundles["plain"]), os.fsdecode(b"caf\xe9"))
    assert r.returncode == 1 and r.stdout == b""
    one_error_line(r.stderr.decode(), "the prompt is not valid UTF-8")


def test_chat_input_that_is_not_utf8(bundles):
    r = script("chat", "--bundle", str(bundles["plain"]), input=b"caf\xe9\n",
               env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 1
    one_error_line(r.stderr.decode(), "the input is not valid UTF-8")


def test_closed_streams(bundles):
    bundle = str(bundles["plain"])
    closed_stdin = script("chat", "--bundle", bundle, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert closed_stdin.returncode == 1
    one_error_line(closed_stdin.stderr.decode(), "standard input is closed")
    code = "import os; os.close(1); from mistral_edge.cli.main import main; main()"
    closed_stdout = subprocess.run([sys.executable, "-c", code, "generate", "--bundle", bundle, "hi"],
                                   capture_output=True, timeout=120)
    assert closed_stdout.returncode == 1
    one_error_line(closed_stdout.stderr.decode(), "standard output is closed")


def test_reader_that_goes_away_ends_quietly(bundles):
    """`generate ... | head -c0`: EPIPE on the first write ends the command non-zero, without a traceback."""
    code = "from mistral_edge.cli.main import main; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "generate", "--bundle", str(bundles["plain"]), "hi",
                          "--max-new-tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) != 0 and err == ""


@pytest.mark.parametrize("attack, message", [("ranges", "took longer than"), ("huge", "a repetition of")])
def test_hostile_chat_template_in_a_bundle(cli, bundles, attack, message):
    start = time.monotonic()
    status, out, err = cli("generate", "--bundle", bundles[attack], "hi", "--max-new-tokens", "2")
    assert time.monotonic() - start < 30  # the render stops at its 2 s deadline, not after 10^10 steps
    assert status == 1 and out == ""
    one_error_line(err, f"chat template stopped: {message}")


# ---- the options reach the generator (each assertion fails if the option were ignored) --------------

def test_sampling_options_apply(cli, bundles):
    def run(*args):
        status, out, err = cli("generate", "--bundle", bundles["plain"], "Hello", "--max-new-tokens", "12", *args)
        assert status == 0, err
        return out

    greedy = run()
    assert run("--seed", "3") == greedy  # a seed alone keeps greedy decoding
    sampled = {seed: run("--temperature", "1.5", "--seed", str(seed)) for seed in range(3)}
    assert any(text != greedy for text in sampled.values())
    assert len(set(sampled.values())) > 1  # the seed matters
    assert run("--temperature", "1.5", "--seed", "1") == sampled[1]  # and reproduces


def test_stop_string_applies(cli, bundles):
    status, greedy, _ = cli("generate", "--bundle", bundles["plain"], "Hello", "--max-new-tokens", "12")
    text = greedy.removesuffix("\n")
    at = next(i for i in range(1, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])  # no blanks in it
    stop = text[at:at + 3]
    status, out, _ = cli("generate", "--bundle", bundles["plain"], "Hello", "--max-new-tokens", "12", "--stop", stop)
    assert status == 0 and out == text[:text.find(stop)] + "\n"


def test_bundle_generation_defaults_are_checked():
    opts = generate_cli.RunOptions(bundle=SPM_V1.parent)
    assert opts.config({"temperature": 0.5, "top_k": 3}).sampling.top_k == 3
    for bad in ({"temperature": "hot"}, {"top_k": 1.5}, {"max_new_tokens": True}, {"top_p": float("nan")}):
        with pytest.raises(EdgeError, match="must be"):
            opts.config(bad)
