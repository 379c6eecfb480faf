"""fold_bn: every foldable producer is folded exactly; a lone BN becomes Mul+Add."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.compress import compress
from onnxc.errors import VerificationError
from onnxc.ir import Graph
from onnxc.pipeline import Context, PassManager, resolve_passes

RNG = np.random.default_rng(0)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _bn_inits(prefix, c):
    return [_init(f"{prefix}_g", RNG.uniform(0.5, 1.5, c)), _init(f"{prefix}_b", RNG.normal(size=c)),
            _init(f"{prefix}_m", RNG.normal(size=c)), _init(f"{prefix}_v", RNG.uniform(0.5, 2, c))]


def _bn(prefix, x, y):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "gbmv"], [y],
                            name=prefix, epsilon=1e-3)


def _model(nodes, inits, in_shape, out_shape):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _fold(model):
    result = compress(model, ["fold_bn"], log=lambda m: None)
    ops = [n.op for n in result.graph.nodes]
    return result, ops


def test_conv_bn_folds_into_conv_weights_exactly():
    w = RNG.normal(size=(8, 3, 3, 3))
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                _bn("bn", "c", "y")], [_init("w", w)] + _bn_inits("bn", 8),
               ["N", 3, 8, 8], ["N", 8, 8, 8])
    result, ops = _fold(m)
    assert ops == ["Conv"]
    assert result.report["error"]["max_rel"] <= 1e-5


def test_grouped_conv_transpose_bn_folds_on_output_channels():
    # ConvTranspose weight is C_in × C_out/group × k × k: BN scales axis 1 per group.
    w = RNG.normal(size=(4, 3, 3, 3))
    m = _model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv",
                                 group=2, strides=[2, 2]),
                _bn("bn", "c", "y")], [_init("w", w), _init("b", RNG.normal(size=6))]
               + _bn_inits("bn", 6), [2, 4, 5, 5], [2, 6, 11, 11])
    result, ops = _fold(m)
    assert ops == ["ConvTranspose"]
    assert result.report["error"]["max_rel"] <= 1e-5


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds_with_alpha_beta_and_trans_b(trans_b):
    w = RNG.normal(size=(5, 7) if trans_b else (7, 5))
    m = _model([helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc", transB=trans_b,
                                 alpha=0.5, beta=2.0),
                _bn("bn", "g", "y")], [_init("w", w), _init("c", RNG.normal(size=5))]
               + _bn_inits("bn", 5), [4, 7], [4, 5])
    result, ops = _fold(m)
    assert ops == ["Gemm"]
    assert result.report["error"]["max_rel"] <= 1e-5


def test_matmul_bn_becomes_matmul_plus_bias():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["g"], name="mm"),
                _bn("bn", "g", "y")], [_init("w", RNG.normal(size=(6, 4)))]
               + _bn_inits("bn", 4), [3, 6], [3, 4])
    result, ops = _fold(m)
    assert ops == ["MatMul", "Add"]
    assert result.report["error"]["max_rel"] <= 1e-5


def test_bn_without_foldable_producer_becomes_mul_add():
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"), _bn("bn", "r", "y")],
               _bn_inits("bn", 3), ["N", 3, 4, 4], ["N", 3, 4, 4])
    result, ops = _fold(m)
    assert ops == ["Relu", "Mul", "Add"]
    assert result.report["error"]["max_rel"] <= 1e-5


def test_conv_output_read_elsewhere_is_not_folded_into():
    # The conv output also feeds an Add: scaling the weights would change that branch.
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                _bn("bn", "c", "b"), helper.make_node("Add", ["b", "c"], ["y"], name="add")],
               [_init("w", RNG.normal(size=(3, 3, 1, 1)))] + _bn_inits("bn", 3),
               [1, 3, 4, 4], [1, 3, 4, 4])
    result, ops = _fold(m)
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1 and "Mul" in ops
    assert result.report["error"]["max_rel"] <= 1e-5


def test_graph_output_name_survives_folding():
    w = RNG.normal(size=(2, 3, 1, 1))
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("bn", "c", "y")],
               [_init("w", w)] + _bn_inits("bn", 2), [1, 3, 2, 2], [1, 2, 2, 2])
    result, _ = _fold(m)
    assert [t.name for t in result.graph.gs.outputs] == ["y"]


def test_exact_pass_that_changes_outputs_is_rejected():
    """The pass manager holds exact passes to the tolerance (here: a broken pass)."""
    from onnxc.pipeline import Pass

    class Broken(Pass):
        name, exact = "broken", True

        def run(self, graph, ctx, report):
            for t in graph.tensors().values():
                if hasattr(t, "values") and t.values.dtype == np.float32:
                    t.values = t.values * 1.01
            return graph

    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
               [_init("w", RNG.normal(size=(2, 3, 1, 1)))], [1, 3, 2, 2], [1, 2, 2, 2])
    graph = Graph.from_onnx(onnx.shape_inference.infer_shapes(m))
    with pytest.raises(VerificationError, match="broken"):
        PassManager([Broken()]).run(graph, Context(log=lambda m: None))


def test_resnet56_fold_bn_keeps_top1(resnet56_path, cifar_test_path, tmp_path):
    from conftest import CIFAR_FLAGS, run_cli

    out = tmp_path / "out"
    code, stdout, err = run_cli("compress", resnet56_path, "--passes", "fold_bn",
                                "--target", "onnx", "-o", out, "--eval-data", cifar_test_path,
                                *CIFAR_FLAGS)
    assert code == 0, err
    import json

    report = json.loads((out / "report.json").read_text())
    model = onnx.load(out / "model.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert report["error"]["max_rel"] <= 1e-5 and report["error"]["samples"] >= 64
    assert report["accuracy"]["final_top1"] == pytest.approx(94.11, abs=0.01)
    assert report["accuracy"]["original_top1"] == report["accuracy"]["final_top1"]
