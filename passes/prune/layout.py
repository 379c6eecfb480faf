"""Channel-padding shortcuts as 1×1 selection convolutions (for ONNX Runtime's CPU).

ResNet "option A" shortcuts subsample with Slices (step 2 on H and W) and add zero
channels with a Pad on the channel axis. ONNX Runtime's CPU provider runs convs in
NCHWc blocks (8 channels on AVX2), but a Pad (or a strided Slice) has no NCHWc kernel:
the shortcut stays NCHW, so does every residual Add it feeds, and the whole trunk
after it is reordered NCHWc→NCHW→NCHWc around every block, with the Add and Relu
run unfused. Those costs scale with the trunk width, which pruning leaves whole, so
they cap the speed-up of a pruned graph (ResNet-56: 19 ReorderOutput, 17
ReorderInput, 18 Add and 18 Relu left in ORT's optimised graph).

A 1×1 Conv whose weight is a 0/1 selection matrix (input channel c → output channel
pad_before + c) with the Slices' steps as strides computes exactly the same tensor
(1·x plus zeros), and ORT keeps it, the Adds (fused into the convs) and the trunk in
NCHWc. Its cost is tiny (C_in·C_out MACs per output pixel at the subsampled size).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def _const(graph, tensor):
    return None if tensor is None else graph.constant(tensor)


def _slice_steps(graph, node, rank):
    """(H step, W step) of a Slice that only subsamples H/W from 0 to the end, else None."""
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = (_const(graph, t) if t is not None and t.name else None
                                 for t in ins[1:5])
    if starts is None or ends is None:
        return None
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes) % rank
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps)
    out = [1, 1]
    dims = node.inputs[0].shape
    for s, e, a, k in zip(starts, ends, axes, steps):
        if a not in (2, 3) or s != 0 or k < 1:
            return None
        if not (e >= 2 ** 31 or (dims is not None and isinstance(dims[a], int) and e >= dims[a])):
            return None
        out[a - 2] *= int(k)
    return out


def channel_pads_as_convs(graph) -> int:
    """Rewrite every zero channel Pad of a 4-D float tensor (with the H/W-subsampling
    Slices right before it) as a selection Conv. Returns the number rewritten."""
    done = 0
    for pad in [n for n in graph.gs.nodes if n.op == "Pad"]:
        x = pad.inputs[0]
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) \
                or pad.attrs.get("mode", "constant") != "constant" or x.dtype != np.float32:
            continue
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            continue                                 # explicit axes: leave it
        pads = _const(graph, pad.inputs[1]) if len(pad.inputs) > 1 else pad.attrs.get("pads")
        if pads is None or len(np.ravel(pads)) != 8:
            continue
        pads = [int(p) for p in np.ravel(pads)]
        if any(pads[i] for i in (0, 2, 3, 4, 6, 7)) or pads[1] < 0 or pads[5] < 0 \
                or pads[1] + pads[5] == 0:
            continue
        if len(pad.inputs) > 2 and pad.inputs[2].name:
            value = _const(graph, pad.inputs[2])
            if value is None or np.any(np.asarray(value) != 0):
                continue
        # Fold the H/W subsampling Slices that feed only this Pad into the strides.
        src, stride = x, [1, 1]
        while len(src.inputs) == 1 and src.inputs[0].op == "Slice" and len(src.outputs) == 1:
            sl = src.inputs[0]
            steps = _slice_steps(graph, sl, 4)
            if steps is None:
                break
            stride = [stride[0] * steps[0], stride[1] * steps[1]]
            src = sl.inputs[0]
        c_in = int(x.shape[1])
        c_out = c_in + pads[1] + pads[5]
        w = np.zeros((c_out, c_in, 1, 1), np.float32)
        w[pads[1] + np.arange(c_in), np.arange(c_in)] = 1.0
        conv = gs.Node("Conv", graph.unique_name(pad.name + "_as_conv"),
                       attrs={"kernel_shape": [1, 1], "strides": stride,
                              "pads": [0, 0, 0, 0]},
                       inputs=[src, graph.make_constant(pad.name + "_select", w)],
                       outputs=list(pad.outputs))
        pad.outputs.clear()
        graph.gs.nodes.append(conv)
        done += 1
    if done:
        graph.gs.cleanup(remove_unused_graph_inputs=False).toposort()
    return done
