"""Small multi-input ONNX models for the multi-input tests (built here, nothing read)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_two_inputs() -> onnx.ModelProto:
    """Y = A[2,3] · B[3,4]: no dim is shared, so no input has a batch."""
    return _model([helper.make_node("MatMul", ["A", "B"], ["Y"])],
                  [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3]),
                   helper.make_tensor_value_info("B", TensorProto.FLOAT, [3, 4])],
                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])])


def gru_with_state(hidden: int = 16, features: int = 8, steps: int = 5,
                   state: bool = True) -> onnx.ModelProto:
    """Bidirectional GRU over x[T, N, F] from state[2, N, H] (or zeros without
    ``state``), then a MatMul head: the batch N is axis 1 of the inputs and outputs."""
    rng = np.random.default_rng(0)
    h = hidden
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W", (2, 3 * h, features)), ("R", (2, 3 * h, h)),
                          ("Bias", (2, 6 * h)), ("Wo", (h, 4)))]
    nodes = [helper.make_node("GRU", ["x", "W", "R", "Bias", "", "state" if state else ""],
                              ["Y", "Y_h"], hidden_size=h, direction="bidirectional"),
             helper.make_node("MatMul", ["Y_h", "Wo"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, "N", features]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", h])]
    return _model(nodes, inputs if state else inputs[:1],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, "N", 4]),
                   helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [2, "N", h])],
                  inits)


def prelu_slope_input() -> onnx.ModelProto:
    """Conv then PRelu whose per-channel slope[3,1,1] is a graph input."""
    w = np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                   helper.make_node("PRelu", ["c", "slope"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
                   helper.make_tensor_value_info("slope", TensorProto.FLOAT, [3, 1, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
                  [numpy_helper.from_array(w, "w")])


def expand_shape_input() -> onnx.ModelProto:
    """Expand x[N,1] to an int64 shape given as a graph input, then Relu."""
    return _model([helper.make_node("Expand", ["x", "shape"], ["e"]),
                   helper.make_node("Relu", ["e"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1]),
                   helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])])


def token_embedding(vocab: int = 3) -> onnx.ModelProto:
    """ids[N,6] (int64) -> Gather from a [vocab, 8] table -> MatMul."""
    rng = np.random.default_rng(0)
    return _model([helper.make_node("Gather", ["emb", "ids"], ["e"]),
                   helper.make_node("MatMul", ["e", "wo"], ["y"])],
                  [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 4])],
                  [numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32),
                                           "emb"),
                   numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32),
                                           "wo")])


def batch_first_gru_with_rate(hidden: int = 16, features: int = 8,
                              steps: int = 4) -> onnx.ModelProto:
    """A voice-activity-style model: x[N, T, F] (batch first), state[2, N, H] and an int64
    scalar sample rate ``sr`` scaling the output by sr / 16000."""
    rng = np.random.default_rng(0)
    h = hidden
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W", (2, 3 * h, features)), ("R", (2, 3 * h, h)),
                          ("Wo", (h, 1)))]
    inits.append(numpy_helper.from_array(np.float32(16000), "rate0"))
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["xt", "W", "R", "", "", "state"], ["Y", "Y_h"],
                              hidden_size=h, direction="bidirectional"),
             helper.make_node("MatMul", ["Y_h", "Wo"], ["m"]),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "rate0"], ["k"]),
             helper.make_node("Mul", ["m", "k"], ["prob"])]
    return _model(nodes,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, features]),
                   helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", h]),
                   helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [2, "N", 1]),
                   helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [2, "N", h])],
                  inits)


def reflect_padded_sequence(pad: int = 8) -> onnx.ModelProto:
    """x[N, T] reflect-padded by ``pad`` on T (needs T > pad), then Relu: T is a
    symbolic dim other than the batch."""
    pads = numpy_helper.from_array(np.array([0, pad, 0, pad], np.int64), "pads")
    return _model([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
                   helper.make_node("Relu", ["p"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "P"])],
                  [pads])
