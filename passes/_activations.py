"""Intermediate activations for data-aware passes (``lowrank --lowrank-data-aware``,
``gap``, the pruning criteria and ThiNet).

A copy of the graph whose outputs are the wanted intermediate tensors runs on ONNX
Runtime through the execution layer (:func:`onnxc.execution.capture_model`), so the
numbers are the ones the deployed model computes. The input graph is not modified.
"""

from __future__ import annotations

from onnxc.execution import Runner, capture_model


def collect(graph, names: list[str], dataset, batch_size: int = 64) -> dict:
    """{tensor name: N × … array} for ``names`` over ``dataset.inputs``."""
    given = {n: dataset.inputs[n] for n in names if n in dataset.inputs}
    names = [n for n in dict.fromkeys(names) if n not in given]  # inputs are the data
    if not names:
        return given
    values = Runner(capture_model(graph, names)).run(dataset.inputs, batch_size)
    return {**given, **dict(zip(names, values))}


def stream(graph, dataset, names: list, visit, batch_size: int = 64) -> None:
    """``visit(name, array, first_sample)`` for each tensor in ``names``, one batch at a
    time, so large activation sets never sit in memory together."""
    if not names:
        return
    names = list(dict.fromkeys(names))

    def each(start, values):
        for name in names:
            visit(name, values[name], start)

    Runner(capture_model(graph, names)).stream(dataset.inputs, each, batch_size)
