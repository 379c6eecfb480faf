"""fold_bn: fold inference BatchNormalization into the preceding linear layer.

BN(y) = s·(y − mean) + β with s = γ/√(var+ε), per channel (axis 1). When y comes
from Conv / ConvTranspose / Gemm / MatMul with constant weights and BN is y's only
consumer, s scales the weights' output channels and the bias becomes
s·(b − mean) + β. A BN with no foldable producer becomes Mul + Add with the same
per-channel constants (cheaper, and what later passes understand).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.pipeline import Pass, register_pass


def _bn_affine(node, graph):
    """(scale, shift) of an inference BN, or None if its parameters are not constant."""
    params = [graph.constant(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


@register_pass
class FoldBatchNorm(Pass):
    name = "fold_bn"
    summary = "fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul (else Mul+Add)"
    order = 10
    exact = True

    def run(self, graph, ctx, report):
        folded = affine = 0
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if len(bn.outputs) > 1 and any(o.outputs or graph.is_graph_output(o)
                                           for o in bn.outputs[1:]):
                report.skip(bn.name, "training-mode BatchNormalization (running stats used)")
                continue
            coeffs = _bn_affine(bn, graph)
            if coeffs is None:
                report.skip(bn.name, "BatchNormalization parameters are not constant")
                continue
            scale, shift = coeffs
            x, y = bn.inputs[0], bn.outputs[0]
            producer = graph.producer(x)
            if producer is not None and self._fold_into(graph, producer, x, scale, shift):
                graph.replace_tensor(y, x)
                folded += 1
            elif self._to_mul_add(graph, bn, scale, shift):
                affine += 1
            else:
                report.skip(bn.name, "input rank unknown; cannot build Mul+Add")
                continue
            bn.inputs.clear()
            bn.outputs.clear()
        report.changed = folded + affine
        report.note(f"{folded} BatchNormalization folded into weights, "
                    f"{affine} turned into Mul+Add")
        return graph

    # -- folding into a producer -----------------------------------------------------------
    def _fold_into(self, graph, prod, x, scale, shift) -> bool:
        if len(x.outputs) != 1 or graph.is_graph_output(x):
            return False            # x is also read elsewhere: folding would change that
        if prod.op == "Conv":
            return self._fold_conv(graph, prod, scale, shift, transpose=False)
        if prod.op == "ConvTranspose":
            return self._fold_conv(graph, prod, scale, shift, transpose=True)
        if prod.op == "Gemm":
            return self._fold_gemm(graph, prod, scale, shift)
        if prod.op == "MatMul":
            return self._fold_matmul(graph, prod, x, scale, shift)
        return False

    def _fold_conv(self, graph, conv, scale, shift, transpose) -> bool:
        w = graph.constant(conv.inputs[1])
        if w is None or w.dtype.kind != "f":
            return False
        dtype = w.dtype
        bias = graph.constant(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if len(conv.inputs) > 2 and bias is None:
            return False
        if transpose:
            # W: C_in × C_out/group × k…; output channel o = g·(C_out/group) + j.
            group = int(conv.attrs.get("group", 1))
            cin, cout_g = w.shape[0], w.shape[1]
            if scale.size != group * cout_g:
                return False
            w6 = w.reshape(group, cin // group, cout_g, *w.shape[2:]).astype(np.float64)
            w6 = w6 * scale.reshape(group, 1, cout_g, *([1] * (w6.ndim - 3)))
            new_w = w6.reshape(cin, cout_g, *w6.shape[3:])
        else:
            if scale.size != w.shape[0]:
                return False
            new_w = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b = bias.astype(np.float64) if bias is not None else np.zeros(scale.size)
        new_b = b * scale + shift
        conv.inputs[1] = graph.make_constant(conv.name + "_w_bn", new_w.astype(dtype))
        b_const = graph.make_constant(conv.name + "_b_bn", new_b.astype(dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = b_const
        else:
            conv.inputs.append(b_const)
        return True

    def _fold_gemm(self, graph, gemm, scale, shift) -> bool:
        w = graph.constant(gemm.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return False
        trans_b = int(gemm.attrs.get("transB", 0))
        alpha = float(gemm.attrs.get("alpha", 1.0))
        beta = float(gemm.attrs.get("beta", 1.0))
        n = w.shape[0] if trans_b else w.shape[1]
        if scale.size != n:
            return False
        c = graph.constant(gemm.inputs[2]) if len(gemm.inputs) > 2 else np.zeros(n)
        if c is None or (c.ndim and c.shape[-1] not in (1, n)):
            return False
        w64 = w.astype(np.float64) * alpha
        w64 = w64 * (scale[:, None] if trans_b else scale[None, :])
        new_c = (c.astype(np.float64) * beta) * scale + shift
        gemm.inputs[1] = graph.make_constant(gemm.name + "_w_bn", w64.astype(w.dtype))
        c_const = graph.make_constant(gemm.name + "_c_bn", new_c.astype(w.dtype))
        if len(gemm.inputs) > 2:
            gemm.inputs[2] = c_const
        else:
            gemm.inputs.append(c_const)
        gemm.attrs["alpha"] = 1.0
        gemm.attrs["beta"] = 1.0
        return True

    def _fold_matmul(self, graph, mm, x, scale, shift) -> bool:
        # BN normalises axis 1, MatMul's features are its last axis: only rank 2 matches.
        w = graph.constant(mm.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f" or x.shape is None \
                or len(x.shape) != 2 or scale.size != w.shape[1]:
            return False
        new_w = (w.astype(np.float64) * scale[None, :]).astype(w.dtype)
        mm.inputs[1] = graph.make_constant(mm.name + "_w_bn", new_w)
        # The MatMul now writes a fresh tensor, the Add writes x (BN's consumers follow).
        mm_out = graph.make_variable(mm.name + "_out", dtype=x.dtype)
        mm.outputs[0] = mm_out
        add = gs.Node("Add", graph.unique_name(mm.name + "_bn_bias"),
                      inputs=[mm_out, graph.make_constant(mm.name + "_b_bn",
                                                          shift.astype(w.dtype))],
                      outputs=[x])
        graph.gs.nodes.append(add)
        return True

    # -- no producer to fold into --------------------------------------------------------
    def _to_mul_add(self, graph, bn, scale, shift) -> bool:
        x, y = bn.inputs[0], bn.outputs[0]
        if x.shape is None:
            return False
        rank = len(x.shape)
        shape = (-1,) + (1,) * max(rank - 2, 0)
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
        mid = graph.make_variable(bn.name + "_scaled", dtype=dtype)
        mul = gs.Node("Mul", graph.unique_name(bn.name + "_mul"),
                      inputs=[x, graph.make_constant(bn.name + "_s",
                                                     scale.reshape(shape).astype(dtype))],
                      outputs=[mid])
        add = gs.Node("Add", graph.unique_name(bn.name + "_add"),
                      inputs=[mid, graph.make_constant(bn.name + "_t",
                                                       shift.reshape(shape).astype(dtype))],
                      outputs=[y])
        graph.gs.nodes.extend([mul, add])
        return True
