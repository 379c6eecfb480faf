"""binary: BWN weights sign(W)·α per output channel (1-bit storage), optionally XNOR-style
binary activations.

α_c = mean|W_c| (Rastegari et al., "XNOR-Net", 2016). With ``--binary-activations`` each
binarized layer's input x becomes sign(x)·β with β = mean|x| per sample (the XNOR-Net
activation scaling, simplified to one factor per sample): Abs → ReduceMean → Mul(Sign).
First and last layers stay float by default (``--keep-float``). Without recovery the
accuracy falls sharply; this pass is the starting point for ``recover``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.calibrate.lowbit import LowBitPass, binarize
from onnxc.pipeline import Option, register_pass


@register_pass
class Binary(LowBitPass):
    name = "binary"
    summary = "BWN binary weights (1-bit packed, α per output channel); XNOR activations"
    conflicts = ("int8", "ternary")
    bits = 1
    label = "binarized"
    options = LowBitPass.options + (
        Option("--binary-activations", action="store_true",
               help="also binarize the inputs of binarized layers: sign(x)·mean|x|"),
    )

    def encode(self, w):
        return binarize(w)

    def rewrite_input(self, graph, node, ctx):
        if not self.config.binary_activations:
            return
        x = node.inputs[0]
        if x.shape is None or len(x.shape) < 2:
            return
        base = node.name + "_xnor"
        axes = list(range(1, len(x.shape)))
        absx = graph.make_variable(base + "_abs")
        beta = graph.make_variable(base + "_beta")
        sign = graph.make_variable(base + "_sign")
        xb = graph.make_variable(base + "_x")
        if graph.opset >= 18:     # ReduceMean takes axes as an input from opset 18
            reduce = gs.Node("ReduceMean", graph.unique_name(base + "_mean"),
                             attrs={"keepdims": 1},
                             inputs=[absx, gs.Constant(graph.unique_name(base + "_axes"),
                                                       np.array(axes, np.int64))],
                             outputs=[beta])
        else:
            reduce = gs.Node("ReduceMean", graph.unique_name(base + "_mean"),
                             attrs={"axes": axes, "keepdims": 1}, inputs=[absx],
                             outputs=[beta])
        graph.gs.nodes.extend([
            gs.Node("Abs", graph.unique_name(base + "_absn"), inputs=[x], outputs=[absx]),
            reduce,
            gs.Node("Sign", graph.unique_name(base + "_signn"), inputs=[x], outputs=[sign]),
            gs.Node("Mul", graph.unique_name(base + "_scale"), inputs=[sign, beta],
                    outputs=[xb]),
        ])
        node.inputs[0] = xb
