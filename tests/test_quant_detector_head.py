"""int8 on a detector-style head: a Concat of boxes (pixels) and class scores (0..1)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxc.calibrate.readers import Dataset
from onnxc.compress import compress
from onnxc.execution import Runner

RNG = np.random.default_rng(0)


def head_model(score_bias=-6.0):
    """x -> Conv -> Relu -> ×100 (boxes, 0..~300) and x -> Conv -> Sigmoid (scores,
    mostly < 0.05) -> Concat on channels -> the graph output."""
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 8, 3, 3)).astype(np.float32)
                                     * 0.3, "wb"),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "bb"),
             numpy_helper.from_array(np.array(100.0, np.float32), "px"),
             numpy_helper.from_array(RNG.standard_normal((6, 8, 3, 3)).astype(np.float32)
                                     * 0.3, "ws"),
             numpy_helper.from_array(np.full(6, score_bias, np.float32), "bs")]
    nodes = [helper.make_node("Conv", ["x", "wb", "bb"], ["cb"], pads=[1] * 4, name="box"),
             helper.make_node("Relu", ["cb"], ["rb"]),
             helper.make_node("Mul", ["rb", "px"], ["boxes"]),
             helper.make_node("Conv", ["x", "ws", "bs"], ["cs"], pads=[1] * 4, name="cls"),
             helper.make_node("Sigmoid", ["cs"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="head")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def cosine(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_concat_of_boxes_and_scores_keeps_float_and_the_scores_survive():
    model = head_model()
    calib = Dataset({"x": RNG.standard_normal((32, 8, 10, 10)).astype(np.float32)}, None,
                    "calib")
    result = compress(model, ["int8"], calibration=calib, log=lambda m: None)
    rep = result.report["passes"][-1]
    assert "head" not in rep["extra"]["quantized_layers"]
    skip = next(s for s in rep["skipped"] if s["node"] == "head")
    assert "ranges differ" in skip["reason"] and "scores" in skip["reason"]
    assert {"box", "cls"} <= set(rep["extra"]["quantized_layers"])
    x = RNG.standard_normal((8, 8, 10, 10)).astype(np.float32)
    ref = Runner(model).run({"x": x})[0]
    out = Runner(result.graph).run({"x": x})[0]
    # One uint8 scale over 0..300 rounds every score (< 0.05) to 0: cosine ~0 before.
    assert cosine(ref[:, 4:], out[:, 4:]) > 0.95
    assert cosine(ref[:, :4], out[:, :4]) > 0.99


def test_concat_of_similar_ranges_is_still_quantized():
    model = head_model(score_bias=0.0)
    # Scores near 0..1 beside boxes up to ~300 still differ: make boxes small too.
    for init in model.graph.initializer:
        if init.name == "px":
            init.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), "px"))
    calib = Dataset({"x": RNG.standard_normal((32, 8, 10, 10)).astype(np.float32)}, None,
                    "calib")
    result = compress(model, ["int8"], calibration=calib, log=lambda m: None)
    assert "head" in result.report["passes"][-1]["extra"]["quantized_layers"]


def test_random_calibration_at_made_up_spatial_dims_says_which_size_it_used():
    model = head_model()
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    lines = []
    compress(model, ["int8"], log=lines.append)
    warned = [line for line in lines if "symbolic dims set to" in line]
    assert len(warned) == 1 and "'x' [N, 8, " in warned[0] and "--input-shape" in warned[0]
    lines.clear()
    compress(head_model(), ["int8"], log=lines.append)         # static dims: nothing made up
    assert not [line for line in lines if "symbolic dims set to" in line]


def test_calibration_on_one_sample_of_a_fixed_batch_model_is_warned():
    # Two static inputs (silero-vad: audio [1, 576] and state [2, 1, 128]): no batch
    # axis, so random calibration draws one sample.
    nodes = [helper.make_node("Add", ["x", "s"], ["h"]),
             helper.make_node("Gemm", ["h", "w"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                       helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(RNG.standard_normal((4, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lines = []
    compress(model, ["int8"], log=lines.append)
    warned = [line for line in lines if "int8 calibrated on 1 sample(s)" in line]
    assert len(warned) == 1 and "fixed batch" in warned[0]
    lines.clear()
    compress(head_model(), ["int8"], log=lines.append)          # symbolic batch: 64 drawn
    assert not [line for line in lines if "calibrated on" in line and "sample(s)" in line]


def test_float_concat_read_through_a_move_op_gets_its_own_calibrated_scale():
    # Concat (mixed ranges, float) -> Reshape (a move: shares its input's scale when that
    # is quantized) -> Concat with the boxes (quantized): the Reshape output then needs a
    # range of its own (ddddocr_det: an internal KeyError).
    model = head_model()
    g = model.graph
    g.node[-1].output[0] = "cat"
    g.node.extend([helper.make_node("Reshape", ["cat", "same"], ["flat"]),
                   helper.make_node("Concat", ["flat", "boxes"], ["y"], axis=1,
                                    name="tail")])
    g.initializer.append(numpy_helper.from_array(np.array([0, 10, 100], np.int64), "same"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 14, 100]))
    g.node.insert(len(g.node) - 1, helper.make_node("Reshape", ["boxes", "four"], ["boxes_"]))
    g.node[-1].input[1] = "boxes_"
    g.initializer.append(numpy_helper.from_array(np.array([0, 4, 100], np.int64), "four"))
    onnx.checker.check_model(model)
    calib = Dataset({"x": RNG.standard_normal((16, 8, 10, 10)).astype(np.float32)}, None,
                    "calib")
    result = compress(model, ["int8"], calibration=calib, log=lambda m: None)
    rep = result.report["passes"][-1]
    assert "head" not in rep["extra"]["quantized_layers"]
    assert "tail" in rep["extra"]["quantized_layers"]
    assert "flat" in rep["extra"]["activation_ranges"]
