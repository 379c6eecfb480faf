"""The recover pass's ONNX→PyTorch converter computes what ONNX Runtime computes.

Checked on a real CIFAR ResNet, two zoo graphs with other op families, a QDQ graph made
by ONNX Runtime's own quantizer (int8 weights behind DequantizeLinear, activations
through QuantizeLinear→DequantizeLinear), and hand-made ternary / binary QDQ graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import light_model_path, randomize_weights
from onnxc import frontend
from onnxc.errors import UnsupportedError
from onnxc.passes.recover.torch_graph import QuantWeight, TorchGraph
from onnxc.execution import Runner


def _torch_out(graph, x):
    with torch.no_grad():
        return TorchGraph(graph)(torch.from_numpy(x))[0].numpy()


def _assert_matches_ort(graph, x, rtol=1e-4):
    ref = Runner(graph).run({graph.gs.inputs[0].name: x})[0]
    got = _torch_out(graph, x)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err < rtol, f"relative error {err:.2e}"


def _cifar_like(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_resnet20_matches_onnxruntime(resnet20_path):
    _assert_matches_ort(frontend.load(resnet20_path), _cifar_like())


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_zoo_graph_matches_onnxruntime(name):
    path = light_model_path(name)
    if not path.exists():
        pytest.skip(f"{path} not installed with onnx")
    model = randomize_weights(onnx.load(str(path)), seed=1)
    graph = frontend.load(model)
    shape = [d if isinstance(d, int) else 1 for d in graph.gs.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _assert_matches_ort(graph, x, rtol=1e-4)


def _ort_qdq(model_path, per_channel=True):
    """ResNet quantized by ONNX Runtime's static QDQ quantizer (an independent producer)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": _cifar_like(8, seed=s)} for s in range(2)])

        def get_next(self):
            return next(self.items, None)

    import os
    import tempfile

    src = frontend.load(model_path).to_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(src, fin)
        quantize_static(fin, fout, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
        return frontend.load(onnx.load(fout))


def test_ort_qdq_int8_resnet_matches_onnxruntime(resnet20_path):
    import onnxruntime as ort

    graph = _ort_qdq(resnet20_path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op for n in graph.nodes}
    quant = TorchGraph(graph).quant
    assert quant and all(q.kind == "int" for q in quant.values())
    # Reference semantics: ORT running the QDQ graph as written (no fusion into int8
    # kernels). Compare the integer activations of the first layers: float accumulation
    # order differs between torch and ORT convolutions, so a value exactly on a rounding
    # boundary may land one step off — rare early, then it cascades through depth. A
    # residual Add sums two such inputs, so its output can be two steps off (seen on an
    # AVX-512 machine, whose ORT float kernels accumulate in another order than AVX2's).
    taps = [n.outputs[0].name for n in graph.nodes if n.op == "QuantizeLinear"][:6]
    model = graph.to_onnx()
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in taps)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    x = _cifar_like(8)
    ref = sess.run(None, {"input": x})
    with torch.no_grad():
        (logits,), got = TorchGraph(graph)(torch.from_numpy(x), taps=taps)
    for name, r, g in zip(taps, ref[1:], got):
        diff = np.abs(r.astype(np.float32) - g.numpy())
        assert diff.max() <= 2 and np.mean(diff > 0) < 1e-3, name
    assert np.mean(logits.numpy().argmax(1) == ref[0].argmax(1)) >= 0.75


def _lowbit_graph(levels, seed=0):
    """Conv(3→8) with weights on a {levels}·scale grid behind DequantizeLinear → Relu →
    GlobalAveragePool → Flatten → Gemm; the way a ternary/binary QDQ pass stores them."""
    rng = np.random.default_rng(seed)
    q = rng.choice(levels, size=(8, 3, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.05, 0.2, 8).astype(np.float32)
    w2 = rng.standard_normal((10, 8)).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.zeros(10, np.float32), "b2")]
    g = helper.make_graph(nodes, "lowbit",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return frontend.load(model)


@pytest.mark.parametrize("levels,kind", [([-1, 0, 1], "ternary"), ([-1, 1], "binary")])
def test_lowbit_qdq_matches_onnxruntime_and_is_detected(levels, kind):
    graph = _lowbit_graph(levels)
    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    _assert_matches_ort(graph, x, rtol=1e-5)
    (qw,) = TorchGraph(graph).quant.values()
    assert qw.kind == kind


def test_latent_weights_requantize_to_the_stored_grid():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 3)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 4).astype(np.float32)
    qw = QuantWeight(q, scale, np.zeros(4, np.int8), axis=0)
    assert np.array_equal(qw.to_storage(qw.latent(q)), q)


def test_unsupported_op_is_named_in_one_line():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("TopK", ["r", "k"], ["v", "i"], axis=1)]
    g = helper.make_graph(nodes, "topk",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(np.array([3], np.int64), "k")])
    graph = frontend.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(UnsupportedError, match=r"cannot train graphs with op\(s\) TopK") as e:
        TorchGraph(graph)
    assert "\n" not in str(e.value)
