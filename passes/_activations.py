"""Intermediate activations for data-aware passes (``lowrank --lowrank-data-aware``, ``gap``).

Exports a copy of the graph whose outputs are the wanted intermediate tensors and runs
it on ONNX Runtime (the verifier's :class:`~onnxc.verify.Runner`), so the numbers are the
ones the deployed model computes. The input graph is not modified.
"""

from __future__ import annotations

import numpy as np

from onnxc.verify import Runner


def collect(graph, names: list[str], dataset, batch_size: int = 64) -> dict:
    """{tensor name: N × … array} for ``names`` over ``dataset.inputs``."""
    given = {n: dataset.inputs[n] for n in names if n in dataset.inputs}
    names = [n for n in names if n not in given]     # graph inputs are the data itself
    if not names:
        return given
    probe = graph.copy()
    tensors = probe.tensors()
    outputs = []
    for name in dict.fromkeys(names):           # unique, order kept
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = np.float32
        outputs.append(tensor)
    probe.gs.outputs = outputs
    # Nodes that feed none of the wanted tensors need not run; a graph mid-edit (new
    # nodes appended at the end) must be sorted before ONNX Runtime accepts it.
    probe.gs.cleanup(remove_unused_graph_inputs=False).toposort()
    values = Runner(probe.to_onnx()).run(dataset.inputs, batch_size)
    return {**given, **{t.name: v for t, v in zip(outputs, values)}}
