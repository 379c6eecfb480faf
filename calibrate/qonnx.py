"""Export a QDQ graph with QONNX-style quantization nodes (FINN / hls4ml / QONNX toolflows).

QONNX (domain ``qonnx.custom_op.general``) describes quantization with float tensors:
``Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)`` computes
``(clamp(round(x/scale + zeropt)) − zeropt)·scale``; ``BipolarQuant(x, scale)`` gives
±scale. The mapping from our QDQ form:

- weight ``DequantizeLinear(int codes, s, 0, axis)`` → float initializer codes·s read by
  ``Quant`` with s reshaped to broadcast along ``axis``, bitwidth 2 (ternary, narrow:
  {-1,0,1}), 8 or 7 (int8, narrow), or ``BipolarQuant`` for binary codes;
- activation ``QuantizeLinear → DequantizeLinear`` → one ``Quant`` (8 bit, signed as the
  QDQ dtype);
- int32 bias ``DequantizeLinear`` → its float value (QONNX toolflows requantize biases).

The result is for FPGA toolflows; ONNX Runtime cannot run the custom domain.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

DOMAIN = "qonnx.custom_op.general"


def _f32(graph, name, value) -> gs.Constant:
    return gs.Constant(graph.unique_name(name), np.array(value, np.float32))


def to_qonnx(graph) -> onnx.ModelProto:
    g = graph.copy()
    for node in list(g.nodes):
        if node.op != "DequantizeLinear" or not node.outputs:
            continue
        codes = g.constant(node.inputs[0])
        scale = g.constant(node.inputs[1])
        if codes is not None:
            _weight(g, node, codes, scale)
        else:
            _activation(g, node)
    g.gs.cleanup(remove_unused_graph_inputs=False).toposort()
    model = g.to_onnx()
    model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model


def _reshaped_scale(scale, codes, axis) -> np.ndarray:
    if np.ndim(scale) == 0:
        return np.asarray(scale, np.float32)
    shape = [1] * codes.ndim
    shape[axis] = -1
    return np.asarray(scale, np.float32).reshape(shape)


def _weight(g, node, codes, scale) -> None:
    axis = int(node.attrs.get("axis", 1))
    axis = axis % codes.ndim if codes.ndim else 0
    s = _reshaped_scale(scale, codes, axis)
    out = node.outputs[0]
    if codes.dtype == np.int32:         # bias: plain float constant
        value = (codes.astype(np.float64) * s).astype(np.float32)
        for reader in list(out.outputs):
            for i, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[i] = _f32(g, out.name + "_float", value)
        node.outputs.clear()
        return
    values = np.unique(codes)
    real = _f32(g, out.name + "_float", codes.astype(np.float32) * s)
    if set(values.tolist()) <= {-1, 1}:
        new = gs.Node("BipolarQuant", node.name, domain=DOMAIN,
                      inputs=[real, _f32(g, out.name + "_scale", s)], outputs=[out])
    else:
        amax = int(np.abs(codes).max()) if codes.size else 1
        bits = 2 if amax <= 1 else (7 if amax <= 63 else 8)
        new = gs.Node("Quant", node.name, domain=DOMAIN,
                      attrs={"signed": 1, "narrow": 1, "rounding_mode": "ROUND"},
                      inputs=[real, _f32(g, out.name + "_scale", s),
                              _f32(g, out.name + "_zeropt", 0.0),
                              _f32(g, out.name + "_bitwidth", float(bits))],
                      outputs=[out])
    node.outputs.clear()
    g.gs.nodes.append(new)


def _activation(g, dq) -> None:
    q = g.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear":
        return
    scale = g.constant(dq.inputs[1])
    zp = g.constant(dq.inputs[2]) if len(dq.inputs) > 2 else np.array(0, np.uint8)
    signed = int(np.dtype(zp.dtype) == np.int8)
    out = dq.outputs[0]
    new = gs.Node("Quant", dq.name, domain=DOMAIN,
                  attrs={"signed": signed, "narrow": 0, "rounding_mode": "ROUND"},
                  inputs=[q.inputs[0], _f32(g, out.name + "_scale", scale),
                          _f32(g, out.name + "_zeropt", float(zp)),
                          _f32(g, out.name + "_bitwidth", 8.0)],
                  outputs=[out])
    dq.outputs.clear()
    g.gs.nodes.append(new)
