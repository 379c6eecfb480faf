"""Tiny ONNX graphs that exercise every channel rule of the prune pass.

``Net`` appends nodes with random weights; ``kill`` makes output channels of a
layer dead (zero filter and bias) so pruning them must leave the outputs exact.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    def __init__(self, shape=(1, 3, 12, 12), seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = shape
        self.n = 0

    def _name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, arr, base="c"):
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op, inputs, name=None, n_out=1, **attrs):
        name = name or self._name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def w(self, *shape):
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))) \
            .astype(np.float32)

    def conv(self, x, cin, cout, k=3, group=1, name=None, bias=True, **attrs):
        ins = [x, self.const(self.w(cout, cin // group, k, k), "W")]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout).astype(np.float32) * .1,
                                  "B"))
        return self.op("Conv", ins, name=name, group=group, pads=[k // 2] * 4, **attrs)

    def bn(self, x, c, name=None):
        # β = 0 and mean = 0 so a dead (zero) channel stays zero.
        g = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        zeros = np.zeros(c, np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        return self.op("BatchNormalization", [x, self.const(g), self.const(zeros),
                                              self.const(zeros), self.const(var)], name=name)

    def gemm(self, x, k, n, name=None, trans_b=1):
        w = self.w(n, k) if trans_b else self.w(n, k).T.copy()
        return self.op("Gemm", [x, self.const(w, "W"),
                                self.const(self.rng.standard_normal(n).astype(np.float32)
                                           * .1, "B")], name=name, transB=trans_b)

    def model(self, outputs, opset=14) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shape))],
            [helper.make_empty_tensor_value_info(o) for o in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m)
        # Graph outputs take the inferred type and shape.
        inferred = {v.name: v for v in m.graph.value_info}
        for out in m.graph.output:
            out.CopyFrom(inferred[out.name])
        return m


def kill(model: onnx.ModelProto, layer: str, channels) -> onnx.ModelProto:
    """Zero the filters and bias of output ``channels`` of Conv/ConvTranspose/Gemm ``layer``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == layer)
    inits = {i.name: i for i in out.graph.initializer}
    channels = list(channels)
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    if node.op_type == "Conv":
        w[channels] = 0
    elif node.op_type == "ConvTranspose":
        g = next((a.i for a in node.attribute if a.name == "group"), 1)
        cog = w.shape[1]
        for c in channels:
            w[(c // cog) * (w.shape[0] // g):(c // cog + 1) * (w.shape[0] // g), c % cog] = 0
    elif node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if trans_b:
            w[channels] = 0
        else:
            w[:, channels] = 0
    else:   # MatMul
        w[:, channels] = 0
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    if len(node.input) > 2 and node.input[2] in inits:
        b = numpy_helper.to_array(inits[node.input[2]]).copy()
        b[channels] = 0
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
    return out


def kill_input(model: onnx.ModelProto, layer: str, channels) -> onnx.ModelProto:
    """Zero the weights of Conv ``layer`` that read input ``channels`` (so whatever a
    non-zero-preserving op like Sigmoid makes of a dead channel is never read)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == layer)
    init = next(i for i in out.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[:, list(channels)] = 0
    init.CopyFrom(numpy_helper.from_array(w, node.input[1]))
    return out
