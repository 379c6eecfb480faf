"""Mixed precision: per-layer sensitivity and fallback until an accuracy budget holds.

Sensitivity of a layer = relative output error ‖y_q − y‖² / ‖y‖² of the model in which
only that layer (of the candidate layers) is quantized, on up to ``SENS_SAMPLES``
samples. With labelled data and a top-1 budget, layers fall back to the higher
precision in decreasing sensitivity until the fully built model's top-1 drop is within
the budget (or every layer fell back). Without labels the accuracy is the agreement with
the original model: the share of output positions whose argmax over the last axis is
the original's (top-1 agreement for a classifier; per time step for an N × T × C
sequence output such as a CTC text recogniser's).
"""

from __future__ import annotations

import numpy as np

from onnxc.errors import UsageError

SENS_SAMPLES = 128
BUDGET_SAMPLES = 1024


def labelled_data(ctx):
    """Data for the budget and whether it is labelled: the evaluation set (--eval-data)
    first — a trained model is near 100 % on its own training images, so a drop measured
    there says little — else labelled calibration data, else unlabelled data (evaluation
    first), measured as agreement with the original."""
    sets = ((ctx.evaluation, "evaluation"), (ctx.calibration, "calibration"))
    for ds, what in sets:
        if ds is not None and ds.labels is not None:
            return ds.take(min(len(ds), BUDGET_SAMPLES)), what, True
    for ds, what in sets:
        if ds is not None and not getattr(ds, "synthetic", False):
            return ds.take(min(len(ds), BUDGET_SAMPLES)), what, False
    raise UsageError("--max-drop needs data: --eval-data, --calib-data or --input-data "
                     "(labelled: top-1; unlabelled: agreement with the original)")


def argmax_positions(model, dataset) -> np.ndarray:
    """Argmax over the last axis of the first output, at every other position."""
    from onnxc.execution import Runner

    return Runner(model).run(dataset.inputs)[0].argmax(axis=-1)


def agreement(model, dataset, reference: np.ndarray) -> float:
    """Share (%) of output positions whose argmax equals ``reference``'s."""
    return 100.0 * float(np.mean(argmax_positions(model, dataset) == reference))


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.sum((out - ref) ** 2) / max(np.sum(ref ** 2), 1e-30))


def sensitivity(graph, layers: list, build_only, dataset) -> dict:
    """{layer: relative output error with only that layer quantized}."""
    from onnxc.execution import Runner

    sample = dataset.take(min(len(dataset), SENS_SAMPLES))
    ref = Runner(graph).run(sample.inputs)[0]
    scores = {}
    for name in layers:
        out = Runner(build_only(name)).run(sample.inputs)[0]
        scores[name] = relative_error(ref, out)
    return scores


def measured_macs(graph, members: dict, dataset) -> dict:
    """{group: multiply-accumulates per sample of its nodes}, from the tensor shapes of
    one run on one sample (the graph's own shapes may be symbolic, e.g. a text line's
    width)."""
    from onnxc.execution import Runner, capture_model
    from onnxc.ir import node_macs

    nodes = {n.name: n for n in graph.nodes}
    wanted = [n for ns in members.values() for n in ns if nodes[n].outputs]
    tensors = list(dict.fromkeys(t.name for n in wanted
                                 for t in (nodes[n].inputs[:1] + nodes[n].outputs[:1])
                                 if graph.constant(t) is None))
    if not tensors:
        return {g: 0 for g in members}
    got = Runner(capture_model(graph, tensors)).run(dataset.take(1).inputs)
    shapes = dict(zip(tensors, (np.shape(v) for v in got)))
    probe = graph.copy()
    by_name = {n.name: n for n in probe.nodes}
    for t in probe.tensors().values():
        if t.name in shapes:
            t.shape = list(shapes[t.name])
    return {g: sum(node_macs(by_name[n]) for n in ns) for g, ns in members.items()}


def fallback_until(graph, ctx, report, layers: list, build, budget: float,
                   higher: str, members: dict | None = None) -> list:
    """Layers (most sensitive first) that fall back to ``higher`` precision so that the
    top-1 drop of ``build(fallback)`` stays within ``budget`` points.

    With ``members`` ({layer or group: node names}) the order is sensitivity per
    multiply-accumulate kept in ``higher`` precision instead (a greedy knapsack: the
    most error removed for the least compute leaving int8). Sensitivity is dominated by
    cheap layers — depthwise convolutions, element-wise ops of activations — while
    most of the MACs sit in a few pointwise layers of moderate sensitivity; measured on
    PP-OCRv4's recogniser (docs/quantization.md) ranking by sensitivity alone left
    6 % of the MACs int8 at the same budget."""
    from onnxc.verify import top1

    data, source, labelled = labelled_data(ctx)
    if labelled:
        metric, name = (lambda model: top1(model, data)), "top-1"
    else:
        reference = argmax_positions(graph, data)
        metric, name = (lambda model: agreement(model, data, reference)), "agreement"
        source += " (unlabelled: argmax agreement with the original)"
    everything = list(layers)
    scores = sensitivity(graph, everything,
                         lambda name: build([n for n in everything if n != name]), data)
    if members is not None:
        macs = measured_macs(graph, members, data)
        # A group without MACs (element-wise ops) still costs a little: a floor of 0.1 %
        # of the candidates' compute keeps the ratio finite and ties broken by error.
        floor = max(1.0, 1e-3 * sum(macs.values()))
        order = sorted(everything, key=lambda n: -scores[n] / (macs[n] + floor))
    else:
        macs = None
        order = sorted(everything, key=lambda n: -scores[n])
    ref = metric(graph)
    # Smallest k such that falling back the k most sensitive layers meets the budget,
    # by bisection (top-1 is assumed to improve as more layers fall back): log2(n)
    # evaluations instead of n.
    cache: dict = {}

    def acc_at(k: int) -> float:
        if k not in cache:
            cache[k] = metric(build(order[:k]))
        return cache[k]

    lo, hi = 0, len(order)
    if ref - acc_at(0) > budget:
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ref - acc_at(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
    fallback = order[:lo]
    acc = acc_at(lo)
    trace = [{"fallback": k, "top1": round(v, 3)} for k, v in sorted(cache.items())]
    report.extra["sensitivity"] = {n: scores[n] for n in order}
    if macs is not None:
        total = max(sum(macs.values()), 1)
        report.extra["fallback_macs_share"] = round(sum(macs[n] for n in order[:lo])
                                                    / total, 4)
        report.extra["group_macs"] = {n: int(macs[n]) for n in order}
    report.extra["mixed_precision"] = {
        "budget_pt": budget, "data": source, "samples": len(data), "metric": name,
        "reference_top1": round(ref, 3), "final_top1": round(acc, 3),
        "higher_precision": higher, "fallback": fallback, "trace": trace}
    met = ref - acc <= budget
    report.note(f"mixed precision: {len(fallback)} of {len(order)} "
                f"{'groups' if members is not None else 'layers'} fall back to "
                f"{higher}; {name} {ref:.2f}% -> {acc:.2f}% on {len(data)} {source} samples"
                + ("" if met else f" (budget {budget} pt NOT met)"))
    return fallback
