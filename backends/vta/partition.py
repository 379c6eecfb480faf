"""Host/accelerator partitioning of a QDQ graph.

A Conv (2-D, group 1, no dilation) or Gemm/MatMul goes to VTA when it reads the
standard QDQ pattern with power-of-two scales and zero points 0::

    x_q ─DQ(s_x)─┐
    W_q ─DQ(s_w, axis 0)─ Conv/Gemm ─[Relu]─ Q(s_y) ─▶ y_q
    b_q ─DQ(s_x·s_w)────┘
                                        [─ DQ(s_y) ─ Relu ─ Q(s_r) ─▶ y_q']

(int8 x_q/W_q, int32 b_q). The optional tail is how ``int8 --int8-pow2-scales`` writes a
ReLU after a quantized conv; it becomes a second requantisation stage of the same VTA
layer (a plain clip when s_r = s_y). The matched nodes are replaced by one ``VtaLayer``
node (domain ``onnxc.vta``) from x_q to y_q; everything else stays on the host.
Every Conv/Gemm/MatMul that stays on the host is listed with the reason.
"""

from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs

from .qlayer import QLayer

DOMAIN = "onnxc.vta"
OP = "VtaLayer"
LAYER_OPS = ("Conv", "Gemm", "MatMul")


class _Reject(Exception):
    pass


def _pow2_exponent(value, what: str) -> np.ndarray:
    """Exponents e with value == 2^e exactly, else _Reject naming the scale."""
    arr = np.atleast_1d(np.asarray(value, np.float64))
    mant, exp = np.frexp(arr)
    bad = (mant != 0.5) | ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        v = float(arr[np.argmax(bad)])
        raise _Reject(f"{what} scale {v:.6g} is not a power of two "
                      f"(quantize with int8 --int8-pow2-scales)")
    return (exp - 1).astype(np.int64)


def _const(graph, tensor, what):
    val = graph.constant(tensor)
    if val is None:
        raise _Reject(f"{what} is not a constant")
    return val


def _only_reader(graph, tensor, op: str | None = None):
    """The single consumer of ``tensor`` (of type ``op``), else None."""
    if graph.is_graph_output(tensor) or len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    return node if op is None or node.op == op else None


def _dq(graph, tensor, what, dtype=np.int8):
    """(codes, scale, axis, node) of a DequantizeLinear feeding ``tensor``."""
    node = graph.producer(tensor)
    if node is None or node.op != "DequantizeLinear":
        raise _Reject(f"{what} is not the output of a DequantizeLinear")
    q = node.inputs[0]
    scale = _const(graph, node.inputs[1], f"{what} scale")
    zp = graph.constant(node.inputs[2]) if len(node.inputs) > 2 else None
    qtype = graph.constant(q)
    qdtype = qtype.dtype if qtype is not None else (np.dtype(q.dtype) if q.dtype else None)
    if qdtype != np.dtype(dtype):
        raise _Reject(f"{what} is {qdtype} (VTA takes {np.dtype(dtype).name})")
    if zp is not None and np.any(zp != 0):
        raise _Reject(f"{what} has a non-zero zero point")
    return qtype, scale, node.attrs.get("axis", 1), node


def _q(graph, node, what):
    """(scale exponent, output tensor) of a QuantizeLinear to int8 with zero point 0."""
    if len(node.inputs) < 3:
        raise _Reject(f"{what} QuantizeLinear has no zero point (would be uint8)")
    zp = _const(graph, node.inputs[2], f"{what} zero point")
    if zp.dtype != np.int8:
        raise _Reject(f"{what} is quantized to {zp.dtype} (VTA takes int8 activations; "
                      f"quantize with int8 --int8-pow2-scales)")
    if np.any(zp != 0):
        raise _Reject(f"{what} has a non-zero zero point")
    scale = _const(graph, node.inputs[1], f"{what} scale")
    if np.size(scale) != 1:
        raise _Reject(f"{what} is quantized per channel")
    return int(_pow2_exponent(scale, what)[0]), node.outputs[0]


def match_layer(graph, node) -> tuple:
    """(QLayer, nodes to remove) for a VTA-able node, else raises _Reject(reason)."""
    x_in = node.inputs[0]
    flatten = None
    prod = graph.producer(x_in)
    if node.op != "Conv" and prod is not None and prod.op == "Flatten" \
            and prod.attrs.get("axis", 1) == 1 and len(x_in.outputs) == 1:
        flatten = prod           # N×C×H×W int8 read as N×(C·H·W): same bytes, no copy
        x_in = prod.inputs[0]
    x_codes, sx, _, x_dq = _dq(graph, x_in, "the input")
    if x_codes is not None:
        raise _Reject("the input is a constant")
    x_q = x_dq.inputs[0]
    if np.size(sx) != 1:
        raise _Reject("the input is quantized per channel")
    ex = int(_pow2_exponent(sx, "input")[0])
    w_codes, sw, w_axis, w_dq = _dq(graph, node.inputs[1], "the weight")
    if w_codes is None:
        raise _Reject("the weight is not a constant")
    if node.op == "Conv":
        a = node.attrs
        if w_codes.ndim != 4:
            raise _Reject("only 2-D convolutions go to VTA")
        if a.get("group", 1) != 1:
            raise _Reject("grouped/depthwise convolution (VTA's GEMM core is dense)")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise _Reject("dilated convolution")
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise _Reject("auto_pad convolution (run the frontend to make pads explicit)")
        weight = w_codes
        stride = tuple(int(s) for s in a.get("strides", [1, 1]))
        pads = tuple(int(p) for p in a.get("pads", [0, 0, 0, 0]))
        pads = (pads[0], pads[1], pads[2], pads[3])
        w_out_axis = 0
    else:
        if node.op == "Gemm":
            a = node.attrs
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise _Reject("Gemm with transA/alpha/beta")
            trans_b = a.get("transB", 0)
        else:
            trans_b = 0
        if w_codes.ndim != 2:
            raise _Reject("the weight is not a matrix")
        w_out_axis = 0 if trans_b else 1
        weight = (w_codes if trans_b else w_codes.T)[:, :, None, None]
        stride, pads = (1, 1), (0, 0, 0, 0)
    o = weight.shape[0]
    if np.size(sw) not in (1, o) or (np.size(sw) == o and o > 1 and w_axis != w_out_axis):
        raise _Reject("the weight is not quantized per output channel")
    ew = np.broadcast_to(_pow2_exponent(sw, "weight"), (o,)).astype(np.int64)

    shape = x_q.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[1:]):
        raise _Reject("the input shape is not static")
    if node.op == "Conv":
        if len(shape) != 4:
            raise _Reject("the input is not N×C×H×W")
        in_shape = (1,) + tuple(int(d) for d in shape[1:])
    else:
        if len(shape) != 2 and flatten is None:
            raise _Reject("the input is not N×K")
        in_shape = (1, int(np.prod([int(d) for d in shape[1:]])), 1, 1)
    if in_shape[1] != weight.shape[1]:
        raise _Reject("the input channels do not match the weight")

    removed = [node] + ([flatten] if flatten is not None else [])
    bias = np.zeros(o, np.int64)
    notes = []
    b_tensor = node.inputs[2] if node.op != "MatMul" and len(node.inputs) > 2 else None
    if b_tensor is not None and not (isinstance(b_tensor, gs.Variable) and not b_tensor.name):
        prod = graph.producer(b_tensor)
        acc_exp = ex + ew                                        # accumulator scale 2^acc_exp
        if prod is not None and prod.op == "DequantizeLinear":
            b_codes, sb, _, b_dq = _dq(graph, b_tensor, "the bias", np.int32)
            eb = np.broadcast_to(_pow2_exponent(sb, "bias"), (o,))
            d = eb - acc_exp
            if np.any(d < 0):
                raise _Reject("the bias scale is finer than s_x·s_w (cannot be exact)")
            bias = b_codes.astype(np.int64).reshape(o) << d
        else:
            b = _const(graph, b_tensor, "the bias").astype(np.float64).reshape(o)
            bias = np.round(b / np.exp2(acc_exp.astype(np.float64))).astype(np.int64)
            notes.append("float bias rounded to the accumulator scale s_x·s_w")
        if np.any(np.abs(bias) >= 1 << 31):
            raise _Reject("the bias does not fit int32 at the accumulator scale")

    stages, tail, y_q = _output_chain(graph, node.outputs[0], ex + ew, o)
    removed += tail
    layer = QLayer(node.name or "layer", "conv" if node.op == "Conv" else "dense", in_shape,
                   np.ascontiguousarray(weight.astype(np.int8)), bias,
                   stages[0][0].astype(np.int64), stride, pads, stages[0][1],
                   input_name=x_q.name, output_name=y_q.name, notes=notes,
                   extra_stages=[(np.asarray(s, np.int64), r) for s, r in stages[1:]])
    return layer, removed, x_q, y_q


def _output_chain(graph, out, acc_exp, o: int) -> tuple:
    """Match ``[Relu] -> Q(s_y) [-> DQ -> Relu -> Q(s_r)]`` after a tensor at scale
    2^acc_exp (per channel, [o]). Returns (stages [(shift[o], relu)], nodes, y_q)."""
    removed = []
    relu = False
    nxt = _only_reader(graph, out)
    if nxt is not None and nxt.op == "Relu":
        relu = True
        removed.append(nxt)
        out = nxt.outputs[0]
        nxt = _only_reader(graph, out)
    if nxt is None or nxt.op != "QuantizeLinear":
        raise _Reject("the output is not requantized to int8 by a single QuantizeLinear "
                      "(VTA stores int8 only)")
    ey, y_q = _q(graph, nxt, "the output")
    removed.append(nxt)
    stages = [(np.broadcast_to(ey - np.asarray(acc_exp, np.int64), (o,)).copy(), relu)]
    # a second stage: DQ -> Relu -> Q(s_r)
    dq2 = _only_reader(graph, y_q, "DequantizeLinear")
    if dq2 is not None and not relu:
        relu2 = _only_reader(graph, dq2.outputs[0], "Relu")
        q2 = _only_reader(graph, relu2.outputs[0], "QuantizeLinear") if relu2 else None
        same_scale = np.array_equal(graph.constant(dq2.inputs[1]),
                                    graph.constant(nxt.inputs[1])) and \
            (len(dq2.inputs) < 3 or np.all(graph.constant(dq2.inputs[2]) == 0))
        if q2 is not None and same_scale:
            try:
                er, y2 = _q(graph, q2, "the ReLU output")
            except _Reject:
                er = None
            if er is not None:
                if er == ey:
                    stages = [(stages[0][0], True)]
                else:
                    stages.append((np.full(o, er - ey, np.int64), True))
                removed += [dq2, relu2, q2]
                y_q = y2
    return stages, removed, y_q


def match_add(graph, node) -> tuple:
    """A residual ``DQ(a) + DQ(b) -> Q`` as a VTA layer: a 1×1 GEMM over the channel
    concatenation [a, b] with weights 2^da·I and 2^db·I that brings both to the finer
    scale, then the usual requantisation. Same return as :func:`match_layer`."""
    qs, exps = [], []
    for k, t in enumerate(node.inputs[:2]):
        codes, scale, _, dq = _dq(graph, t, f"Add input {k}")
        if codes is not None:
            raise _Reject("an Add with a constant input")
        if np.size(scale) != 1:
            raise _Reject("an Add input quantized per channel")
        qs.append(dq.inputs[0])
        exps.append(int(_pow2_exponent(scale, f"Add input {k}")[0]))
    shapes = [q.shape for q in qs]
    if any(sh is None or len(sh) != 4 for sh in shapes) or list(shapes[0][1:]) != \
            list(shapes[1][1:]) or any(not isinstance(d, (int, np.integer))
                                       for d in shapes[0][1:]):
        raise _Reject("the Add inputs are not two N×C×H×W tensors of one static shape")
    _, c, h, w = (int(d) if isinstance(d, (int, np.integer)) else 1 for d in shapes[0])
    e0 = min(exps)
    d = [e - e0 for e in exps]
    if max(d) > 6:
        raise _Reject("the Add input scales differ by more than 2^6 (int8 identity weights)")
    weight = np.zeros((c, 2 * c, 1, 1), np.int8)
    weight[np.arange(c), np.arange(c)] = 1 << d[0]
    weight[np.arange(c), c + np.arange(c)] = 1 << d[1]
    stages, removed, y_q = _output_chain(graph, node.outputs[0], e0, c)
    layer = QLayer(node.name or "add", "add", (1, 2 * c, h, w), weight,
                   np.zeros(c, np.int64), stages[0][0], relu=stages[0][1],
                   input_name=qs[0].name, output_name=y_q.name,
                   extra_stages=stages[1:], concat_inputs=[q.name for q in qs])
    return layer, [node] + removed, qs, y_q


def partition(graph, accept=None, residual: bool = False) -> tuple:
    """Split ``graph`` (an onnxc IR Graph, edited in place) into host and VTA parts.

    ``accept(layer)`` (optional) compiles a matched layer and returns the result, or
    raises UnsupportedError (e.g. the buffers cannot hold one tile): that layer then
    stays on the host with the message as its reason.
    Returns (layers, results, placement): the QLayers in graph order, what ``accept``
    returned for each, and one placement entry per Conv/Gemm/MatMul:
    {"node", "op", "where": "vta"|"host", "reason"}.
    """
    from onnxc.errors import UnsupportedError

    layers, results, placement = [], [], []
    for node in list(graph.nodes):
        if node.op not in LAYER_OPS and not (residual and node.op == "Add"):
            continue
        try:
            if node.op == "Add":
                layer, removed, x_q, y_q = match_add(graph, node)
            else:
                layer, removed, x_q, y_q = match_layer(graph, node)
            results.append(accept(layer) if accept else None)
        except (_Reject, UnsupportedError) as exc:
            placement.append({"node": node.name, "op": node.op, "where": "host",
                              "reason": str(exc)})
            continue
        idx = len(layers)
        layers.append(layer)
        placement.append({"node": node.name, "op": node.op, "where": "vta", "layer": idx,
                          "reason": "; ".join(layer.notes)})
        # Replace the matched chain by one custom node x_q -> y_q.
        for n in removed:
            n.outputs.clear()
        removed[0].inputs.clear()
        for n in removed[1:]:
            n.inputs.clear()
        vnode = gs.Node(OP, name=f"vta_{idx}_{node.name}", domain=DOMAIN,
                        attrs={"layer": idx}, inputs=x_q if isinstance(x_q, list) else [x_q],
                        outputs=[y_q])
        graph.gs.nodes.append(vnode)
    graph.gs.cleanup(remove_unused_graph_inputs=False).toposort()
    return layers, results, placement

