"""Mixed precision: per-layer sensitivity and fallback until an accuracy budget holds.

Sensitivity of a layer = relative output error ‖y_q − y‖² / ‖y‖² of the model in which
only that layer (of the candidate layers) is quantized, on up to ``SENS_SAMPLES``
samples. With labelled data and a top-1 budget, layers fall back to the higher
precision in decreasing sensitivity until the fully built model's top-1 drop is within
the budget (or every layer fell back).
"""

from __future__ import annotations

import numpy as np

from onnxc.errors import UsageError

SENS_SAMPLES = 128
BUDGET_SAMPLES = 1024


def labelled_data(ctx):
    """Labelled data for the budget: the evaluation set (--eval-data) first — a trained
    model is near 100 % on its own training images, so a drop measured there says
    little — else labelled calibration data."""
    for ds, what in ((ctx.evaluation, "evaluation"), (ctx.calibration, "calibration")):
        if ds is not None and ds.labels is not None:
            return ds.take(min(len(ds), BUDGET_SAMPLES)), what
    raise UsageError("--max-drop needs labelled data: --calib-data or --eval-data with "
                     "a 'labels' array")


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


def fallback_until(graph, ctx, report, layers: list, build, budget: float,
                   higher: str) -> list:
    """Layers (most sensitive first) that fall back to ``higher`` precision so that the
    top-1 drop of ``build(fallback)`` stays within ``budget`` points."""
    from onnxc.verify import top1

    data, source = labelled_data(ctx)
    everything = list(layers)
    scores = sensitivity(graph, everything,
                         lambda name: build([n for n in everything if n != name]), data)
    order = sorted(everything, key=lambda n: -scores[n])
    ref = top1(graph, data)
    # Smallest k such that falling back the k most sensitive layers meets the budget,
    # by bisection (top-1 is assumed to improve as more layers fall back): log2(n)
    # evaluations instead of n.
    cache: dict = {}

    def acc_at(k: int) -> float:
        if k not in cache:
            cache[k] = top1(build(order[:k]), data)
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
    report.extra["mixed_precision"] = {
        "budget_pt": budget, "data": source, "samples": len(data),
        "reference_top1": round(ref, 3), "final_top1": round(acc, 3),
        "higher_precision": higher, "fallback": fallback, "trace": trace}
    met = ref - acc <= budget
    report.note(f"mixed precision: {len(fallback)} of {len(order)} layers fall back to "
                f"{higher}; top-1 {ref:.2f}% -> {acc:.2f}% on {len(data)} {source} samples"
                + ("" if met else f" (budget {budget} pt NOT met)"))
    return fallback
