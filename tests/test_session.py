"""DecoderSession's loading: which failures it loads again without the native library, and which it refuses at once."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mistral_edge import kernels
from mistral_edge.errors import EdgeError
from mistral_edge.runtime import session as session_module
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from helpers import write_tiny_bundle

needs_library = pytest.mark.skipif(kernels.unavailable_reason() is not None,
                                   reason=str(kernels.unavailable_reason()))


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_tiny_bundle(out)
    return out / "model.onnx"


def _with_node(graph, tmp_path, op: str, domain: str = "mistral_edge", body: bool = True):
    """The tiny graph plus one node `domain::op` over a float64 constant into an extra output (a local
    function of that name, an Identity, when `body`): a type no kernel of the library has."""
    model = onnx.load(str(graph))
    model.graph.initializer.append(helper.make_tensor("probe", TensorProto.DOUBLE, [2], [1.0, 2.0]))
    model.graph.node.append(helper.make_node(op, ["probe"], ["probe_out"], domain=domain))
    model.graph.output.append(helper.make_tensor_value_info("probe_out", TensorProto.DOUBLE, [2]))
    if body:
        model.functions.append(helper.make_function(domain, op, ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                                    [helper.make_opsetid("", 17)]))
    path = tmp_path / "probe.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every onnxruntime graph load DecoderSession makes, as its SessionOptions."""
    seen, real = [], ort.InferenceSession

    def counting(path, so=None, **kw):
        seen.append(so)
        return real(path, so, **kw)

    monkeypatch.setattr(session_module.ort, "InferenceSession", counting)
    return seen


@needs_library
def test_a_node_type_the_library_lacks_is_loaded_again_without_it(graph, tmp_path, loads):
    """The library registers SinkWindowedGroupQueryAttention for its own types only, so ONNX Runtime
    refuses a float64 node of that name beside it: the graph loads again without the library, runs
    its function bodies, and gives the logits the function-body session gives."""
    probe = _with_node(graph, tmp_path, "SinkWindowedGroupQueryAttention")
    session = DecoderSession(probe, config=SessionConfig(kernel="auto"))
    assert len(loads) == 2 and session.attention_path.startswith("function body (the native kernel has no variant")
    tokens = np.asarray([[5, 6, 7]], np.int64)
    body = DecoderSession(graph, config=SessionConfig(kernel="off"))
    np.testing.assert_allclose(session.step(tokens), body.step(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(EdgeError, match="no variant for fp32 activations with an fp32 cache"):
        DecoderSession(probe, config=SessionConfig(kernel="on"))  # "on" requires the kernel


def test_a_library_that_fails_to_register_is_left_out_before_the_one_load(graph, tmp_path, monkeypatch, loads):
    not_a_library = tmp_path / "lib.so"
    not_a_library.write_bytes(b"not an ELF file")
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: None)
    monkeypatch.setattr(kernels, "library_path", lambda: not_a_library)
    session = DecoderSession(graph, config=SessionConfig(kernel="auto"))
    assert len(loads) == 1 and session.attention_path.startswith("function body (native kernel failed to load: ")


@pytest.mark.parametrize("kernel", ["auto", "off"])
@pytest.mark.parametrize("defect", ["corrupt", "unknown op", "foreign op"])
def test_any_other_load_failure_is_one_line_at_once(graph, tmp_path, loads, kernel, defect):
    """A corrupt file, a node of our domain that is no op of ours (no body either), or a foreign
    domain's op the library has nothing to do with: one EdgeError line, from one load, never retried."""
    if defect == "corrupt":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"\x08\x07 not a protobuf")
    else:
        op, domain = ("Evil", "mistral_edge") if defect == "unknown op" else ("WindowedGroupQueryAttention", "evil")
        path = _with_node(graph, tmp_path, op, domain, body=False)
    with pytest.raises(EdgeError) as e:
        DecoderSession(path, config=SessionConfig(kernel=kernel))
    assert len(loads) == 1
    assert str(e.value).startswith(f"cannot load {path}: ") and "\n" not in str(e.value)
