"""Small QDQ models with power-of-two scales, built with onnx.helper for the VTA tests.

``qdq_model(layers, in_shape)`` chains layers given as dicts:
``{"op": "conv", "out": 24, "k": 3, "stride": 1, "pad": 1, "relu": True}``,
``{"op": "gemm", "out": 10}`` (flattens first), ``{"op": "maxpool"}``,
``{"op": "dwconv", "k": 3}`` (depthwise: stays on the host). Every quantized tensor is
int8 with zero point 0; weights are per-channel int8, biases int32 at s_x·s_w, and a
ReLU is written the way ``int8 --int8-pow2-scales`` does (Q → DQ → Relu → Q).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base, arr):
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def q(self, x, exp, pow2=True):
        scale = np.float32(2.0 ** exp) if pow2 else np.float32(2.0 ** exp * 1.37)
        s = self.const("s", scale)
        zp = self.const("zp", np.int8(0))
        xq = self.node("QuantizeLinear", [x, s, zp])
        return xq, self.node("DequantizeLinear", [xq, s, zp]), exp

    def weight(self, w_codes, exps, axis=0, pow2=True):
        scales = (2.0 ** np.asarray(exps, np.float64)).astype(np.float32)
        if not pow2:
            scales = scales * np.float32(1.37)
        wq = self.const("wq", w_codes.astype(np.int8))
        s = self.const("ws", scales)
        zp = self.const("wzp", np.zeros(len(scales), np.int8))
        return self.node("DequantizeLinear", [wq, s, zp], axis=axis)

    def bias(self, b_codes, exps):
        bq = self.const("bq", b_codes.astype(np.int32))
        s = self.const("bs", (2.0 ** np.asarray(exps, np.float64)).astype(np.float32))
        zp = self.const("bzp", np.zeros(len(exps), np.int32))
        return self.node("DequantizeLinear", [bq, s, zp], axis=0)


def qdq_model(layers: list, in_shape=(1, 3, 8, 8), seed: int = 0, pow2: bool = True,
              act_exp: int = -4) -> onnx.ModelProto:
    b = _Builder(seed)
    rng = b.rng
    x = "input"
    _, xdq, ex = b.q(x, act_exp, pow2)
    c = in_shape[1]
    shape = list(in_shape)
    flat = False
    for spec in layers:
        op = spec["op"]
        if op in ("conv", "dwconv"):
            k = spec.get("k", 3)
            o = spec.get("out", c) if op == "conv" else c
            group = 1 if op == "conv" else c
            cin = c // group
            w = rng.integers(-127, 128, (o, cin, k, k))
            ew = rng.integers(-9, -6, o)
            acc = ex + ew
            bias = rng.integers(-3000, 3000, o)
            pad, stride = spec.get("pad", k // 2), spec.get("stride", 1)
            y = b.node("Conv", [xdq, b.weight(w, ew, 0, pow2), b.bias(bias, acc)],
                       kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)
            shape = [shape[0], o, (shape[2] + 2 * pad - k) // stride + 1,
                     (shape[3] + 2 * pad - k) // stride + 1]
            c = o
        elif op == "gemm":
            if not flat:
                xdq = b.node("Flatten", [xdq], axis=1)
                c = int(np.prod(shape[1:]))
                flat = True
            o = spec["out"]
            w = rng.integers(-127, 128, (o, c))
            ew = rng.integers(-9, -6, o)
            y = b.node("Gemm", [xdq, b.weight(w, ew, 0, pow2),
                                b.bias(rng.integers(-3000, 3000, o), ex + ew)], transB=1)
            shape = [shape[0], o]
            c = o
        elif op == "maxpool":
            y = b.node("MaxPool", [xdq], kernel_shape=[2, 2], strides=[2, 2])
            shape = [shape[0], c, shape[2] // 2, shape[3] // 2]
            _, xdq, ex = b.q(y, ex, pow2)
            continue
        else:
            raise ValueError(op)
        ey = spec.get("out_exp", ex + 1)
        _, ydq, ey = b.q(y, ey, pow2)
        if spec.get("relu"):
            r = b.node("Relu", [ydq])
            _, ydq, ey = b.q(r, ey + spec.get("relu_shift", 0), pow2)
        xdq, ex = ydq, ey
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(shape))
    b.nodes.append(helper.make_node("Identity", [xdq], ["output"], name="out"))
    graph = helper.make_graph(b.nodes, "qdq", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, list(in_shape))], [out], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_model(in_shape=(1, 3, 8, 8), seed: int = 0) -> onnx.ModelProto:
    """A float conv → relu → conv model with no quantization at all."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, in_shape[1], 3, 3)).astype(
        np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["input", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["output"])]
    graph = helper.make_graph(nodes, "f", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, list(in_shape))], [helper.make_tensor_value_info(
            "output", TensorProto.FLOAT, [in_shape[0], 4] + list(in_shape[2:]))], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model
