"""Run a graph on ONNX Runtime and stream chosen intermediate tensors to a callback.

Intermediate tensors become extra graph outputs of a copy of the model; only the
requested ones are outputs, so ORT computes just the prefix of the graph they need.
Batches are handed to ``visit(name, array, first_sample)`` one at a time so large
activation sets never sit in memory together.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.verify import Runner


def probe_model(graph, names: list):
    """ModelProto of ``graph`` whose outputs are exactly the tensors ``names``."""
    g = graph.gs.copy()
    tensors = g.tensors()
    outs = []
    for n in names:
        t = tensors[n]
        if t.dtype is None:
            t.dtype = np.float32
        outs.append(t)
    g.outputs = outs
    return gs.export_onnx(g, do_type_check=False)


def stream(graph, dataset, names: list, visit, batch_size: int = 64) -> None:
    if not names:
        return
    names = list(dict.fromkeys(names))
    runner = Runner(probe_model(graph, names))
    n = len(dataset)
    step = runner.fixed_batch or batch_size
    for start in range(0, n, step):
        feeds = {k: v[start:start + step] for k, v in dataset.inputs.items()
                 if k in runner.input_names}
        got = len(next(iter(feeds.values())))
        if runner.fixed_batch and got < runner.fixed_batch:   # pad a static last batch
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], runner.fixed_batch - got, 0)])
                     for k, v in feeds.items()}
        outs = runner.session.run(names, feeds)
        for name, arr in zip(names, outs):
            visit(name, arr[:got], start)
