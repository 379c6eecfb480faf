"""Models users bring: old opsets with broken type annotations, vendor (ORT contrib) ops and
declared-but-unused domains. Every quantized artifact must pass the ONNX checker and load
in ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc import frontend
from onnxc.compress import compress
from onnxc.errors import UnsupportedError, UsageError

from quant_helpers import dataset, residual_cnn


def _valid(model: onnx.ModelProto) -> ort.InferenceSession:
    """The model passes the full ONNX checker and ONNX Runtime builds a session for it."""
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _opset12_with_broken_annotations() -> onnx.ModelProto:
    """residual_cnn at opset 12 whose tail is a com.microsoft Gelu (ONNX shape inference
    cannot see through it), with the graph output and an intermediate value_info
    declared without a shape: the checker rejects it as is, and the version converter's
    result lost the output's shape ("Field 'shape' of 'type' is required but missing")."""
    model = residual_cnn(opset=12)
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Gelu", ["logits"], ["y"], "gelu",
                                             domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.value_info.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, None))
    return model


def _dq_axes(model: onnx.ModelProto) -> list:
    """``axis`` attribute (or None) of every DequantizeLinear reading an int8 weight."""
    inits = {i.name: i for i in model.graph.initializer}
    axes = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == TensorProto.INT8:
            axes.append(next((a.i for a in node.attribute if a.name == "axis"), None))
    return axes


def test_opset12_model_with_broken_value_info_gets_valid_per_channel_int8():
    model = _opset12_with_broken_annotations()
    result = compress(model, ["int8"], calibration=dataset(residual_cnn(opset=12), 32),
                      log=lambda m: None)
    out = result.graph.to_onnx()
    session = _valid(out)
    assert result.graph.opset == 13
    assert any("upgraded 12 -> 13" in n for n in result.report["frontend_notes"])
    assert any("repaired" in n for n in result.report["frontend_notes"])
    assert _dq_axes(out) and all(a is not None for a in _dq_axes(out))   # per-channel
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(residual_cnn(opset=12).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = session.run(None, {"x": x})[0]
    gelu = 0.5 * ref * (1 + np.vectorize(__import__("math").erf)(ref / np.sqrt(2)))
    assert np.abs(got - gelu).max() < 0.1 * np.abs(gelu).max()


def test_version_converter_failure_is_retried_after_repairing_the_annotations():
    notes = []
    graph = frontend.canonicalize(_opset12_with_broken_annotations(), notes=notes)
    assert graph.opset == 13
    assert any("it succeeded" in n for n in notes), notes


def test_input_shape_on_an_opset12_model_still_upgrades():
    """--input-shape used to clear the graph output's shape; with a tail ONNX shape
    inference cannot follow, the converted model then failed the checker and the
    upgrade was skipped. Now the output keeps its rank."""
    model = residual_cnn(opset=12)
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Gelu", ["logits"], ["y"], "gelu",
                                             domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    notes = []
    graph = frontend.load(model, input_shapes={"x": [2, 3, 8, 8]}, notes=notes)
    assert graph.opset == 13, notes


@pytest.fixture
def upgrade_impossible(monkeypatch):
    def refuse(model, opset, notes):
        raise RuntimeError("No adapter for this op")
    monkeypatch.setattr(frontend, "_convert", refuse)


def test_int8_falls_back_to_per_tensor_weights_when_opset12_cannot_be_upgraded(
        upgrade_impossible):
    model = residual_cnn(opset=12)
    result = compress(model, ["int8"], calibration=dataset(model, 32), log=lambda m: None)
    out = result.graph.to_onnx()
    _valid(out)
    assert result.graph.opset == 12
    assert _dq_axes(out) and all(a is None for a in _dq_axes(out))
    int8 = result.report["passes"][-1]
    assert any("per-tensor" in n for n in int8["notes"])
    assert int8["error"]["top1_agreement"] >= 0.8


@pytest.mark.parametrize("name", ["ternary", "binary"])
def test_low_bit_at_opset12_scales_channels_with_a_mul_instead_of_an_axis(
        upgrade_impossible, name):
    model = residual_cnn(opset=12)
    result = compress(model, [name], options={"keep_float": "none"}, log=lambda m: None)
    out = result.graph.to_onnx()
    _valid(out)
    assert _dq_axes(out) and all(a is None for a in _dq_axes(out))


def test_int8_refuses_an_opset9_model_that_cannot_be_upgraded(upgrade_impossible):
    model = residual_cnn(opset=9)
    with pytest.raises(UnsupportedError, match="opset 9 has no QuantizeLinear"):
        compress(model, ["int8"], log=lambda m: None)


# ---- vendor domains -------------------------------------------------------------------

def _with_vendor_ops(extra_domains=()) -> onnx.ModelProto:
    """Conv → com.microsoft FusedConv (Conv+Relu) → com.microsoft Gelu → GAP → Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in [("w0", (8, 3, 3, 3)), ("w1", (8, 8, 3, 3)), ("b1", (8,)),
                          ("wf", (10, 8))]]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
        helper.make_node("FusedConv", ["c0", "w1", "b1"], ["c1"], "fused", domain="com.microsoft",
                         activation="Relu", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Gelu", ["c1"], ["g"], "gelu", domain="com.microsoft"),
        helper.make_node("GlobalAveragePool", ["g"], ["p"], "gap"),
        helper.make_node("Flatten", ["p"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "vendor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    opsets += [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_declared_but_unused_domain_is_accepted():
    result = compress(_with_vendor_ops(["com.example.unused"]), ["fold_bn"], log=lambda m: None)
    _valid(result.graph.to_onnx())


@pytest.mark.parametrize("passes", [["fold_bn"], ["int8"], ["ternary"]])
def test_contrib_ops_run_and_passes_report_the_vendor_nodes_they_skip(passes):
    model = _with_vendor_ops()
    result = compress(model, passes, options={"keep_float": "none"}, log=lambda m: None)
    _valid(result.graph.to_onnx())
    ops = {(n.domain, n.op) for n in result.graph.nodes}
    assert ("com.microsoft", "FusedConv") in ops and ("com.microsoft", "Gelu") in ops
    last = result.report["passes"][-1]
    if passes != ["fold_bn"]:
        skipped = {s["node"]: s["reason"] for s in last["skipped"]}
        assert "fused" in skipped and "com.microsoft" in skipped["fused"]
        assert last["changed"] >= 1          # the standard Conv/Gemm are still quantized
    if passes == ["int8"]:
        # Types flow past the vendor ops (from ORT's schemas): the head is quantized too.
        assert {"conv0", "gap", "fc"} <= set(last["extra"]["quantized_layers"])


def test_op_onnx_runtime_cannot_run_is_refused_naming_node_and_domain():
    model = _with_vendor_ops(["com.example"])
    model.graph.node[2].domain = "com.example"
    with pytest.raises(UnsupportedError) as err:
        frontend.load(model)
    msg = str(err.value)
    assert "'gelu'" in msg and "'com.example'" in msg and "\n" not in msg


def test_input_without_a_shape_asks_for_input_shape_and_runs_with_it():
    model = residual_cnn()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UsageError, match="--input-shape x:"):
        frontend.load(model)
    graph = frontend.load(model, input_shapes={"x": [2, 3, 8, 8]})
    assert list(graph.gs.inputs[0].shape) == [2, 3, 8, 8]
