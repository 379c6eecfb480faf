"""A tiny residual CNN (Conv-Relu-Conv-Add-Relu-GAP-Flatten-Gemm) and a labelled dataset for
the quantization tests: seconds to calibrate, yet it has every pattern the passes handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


CONV3X3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def random_init(rng):
    """``init(name, *shape, scale=None)``: an initializer of He-scaled normal values
    (``scale`` replaces the He scale, e.g. for biases)."""
    def init(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else np.sqrt(2.0 / fan_in)
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)
    return init


def residual_block(init, channels: int, out: str) -> tuple:
    """(nodes, initializers) of Conv-Relu (3 -> c, the stem) then Conv-Relu-Conv-Add-Relu
    with the stem as the residual, from graph input ``x`` to ``out``."""
    c = channels
    inits = [init("w0", c, 3, 3, 3), init("b0", c, scale=0.1),
             init("w1", c, c, 3, 3), init("b1", c, scale=0.1),
             init("w2", c, c, 3, 3), init("b2", c, scale=0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "conv0", **CONV3X3),
        helper.make_node("Relu", ["c0"], ["r0"], "relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], "conv1", **CONV3X3),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", **CONV3X3),
        helper.make_node("Add", ["c2", "r0"], ["s"], "add"),
        helper.make_node("Relu", ["s"], [out], "relu2"),
    ]
    return nodes, inits


def residual_cnn(seed: int = 0, channels: int = 8, size: int = 8, classes: int = 10,
                 opset: int = 13) -> onnx.ModelProto:
    init = random_init(np.random.default_rng(seed))
    nodes, inits = residual_block(init, channels, "r2")
    inits += [init("wf", classes, channels), init("bf", classes, scale=0.1)]
    nodes += [
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten", axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def dataset(model: onnx.ModelProto, n: int = 64, seed: int = 1):
    """Samples with labels = the float model's own argmax (so float top-1 is 100%)."""
    import onnxruntime as ort

    from onnxc.calibrate.readers import Dataset

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed).standard_normal([n] + shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"x": x})[0].argmax(1)
    return Dataset({"x": x}, labels, "synthetic-labelled")


def save(model: onnx.ModelProto, tmp_path, name: str = "model.onnx") -> str:
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def ops(graph_or_model) -> list:
    model = graph_or_model.to_onnx() if hasattr(graph_or_model, "to_onnx") else graph_or_model
    return [n.op_type for n in model.graph.node]


def ort_optimized_ops(model: onnx.ModelProto, tmp_path) -> list:
    """Op types after ONNX Runtime's graph optimizations (what actually runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "ort_optimized.onnx")).graph.node]
