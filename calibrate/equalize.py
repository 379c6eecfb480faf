"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), for ``int8 --int8-cle``.

For a pair Conv₁ → [Relu] → Conv₂ where Conv₂ is the only reader, output channel c of
Conv₁ is divided by s_c (weights and bias) and the matching input channel(s) of Conv₂
multiplied by s_c. ReLU is positively homogeneous (relu(x/s) = relu(x)/s for s > 0) and
zero padding stays zero, so the model computes exactly the same function in float. With
s_c = √(r₁_c · r₂_c) / r₂_c (r = the channel's max |w|) both channels end with range
√(r₁_c · r₂_c): a depthwise Conv whose channels span 1000× after BN folding — the reason
MobileNetV2 collapses under per-tensor int8 — becomes balanced. Conv₂ may be a regular
(group 1) or depthwise Conv; chains (expand → depthwise → project) are swept a few times
until the scales settle, since the middle Conv belongs to two pairs.

Not handled (reported, left as they are): Clip/ReLU6 between the convs (clip(x/s, 0, 6)
is not clip(x, 0, 6)/s), other grouped convs, a Conv₁ output read by more than Conv₂
(residual), non-constant weights/biases.
"""

from __future__ import annotations

import numpy as np

from onnxc.calibrate import qdq

SWEEPS = 20          # chains converge in a handful of sweeps; each is O(weights)
SETTLED = 1e-3       # stop when no scale moves by more than this (relative)
CHECK_SAMPLES = 32   # samples the float outputs are compared on
CHECK_TOLERANCE = 1e-4   # relative output error allowed (float32 reassociation only)


def _conv_weight(graph, node):
    if node.op != "Conv" or not qdq.is_standard(node) or len(node.inputs) < 2:
        return None
    w = graph.constant(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim < 3:
        return None
    return w


def find_pairs(graph) -> tuple[list, list]:
    """([(conv1, conv2)], [(node name, reason)]) for every Conv₁ → [Relu] → Conv₂."""
    pairs, skipped = [], []
    for conv1 in graph.nodes:
        w1 = _conv_weight(graph, conv1)
        if w1 is None or not conv1.outputs:
            continue
        out = conv1.outputs[0]
        readers = list(out.outputs)
        if len(readers) != 1 or graph.is_graph_output(out):
            continue
        mid = readers[0]
        act = None
        if mid.op in ("Relu", "Clip") and qdq.is_standard(mid):
            if mid.op == "Clip":
                skipped.append((conv1.name, f"Clip ({mid.name}) between the convs is not "
                                            f"positively homogeneous: pair not equalized"))
                continue
            act = mid
            after = list(mid.outputs[0].outputs)
            if len(after) != 1 or graph.is_graph_output(mid.outputs[0]):
                continue
            mid = after[0]
        w2 = _conv_weight(graph, mid)
        if w2 is None or mid.inputs[0] is not (act.outputs[0] if act else out):
            continue
        if len(conv1.inputs) > 2 and conv1.inputs[2].name \
                and graph.constant(conv1.inputs[2]) is None:
            skipped.append((conv1.name, "bias is not a constant: pair not equalized"))
            continue
        channels = w1.shape[0]
        group2 = int(mid.attrs.get("group", 1))
        depthwise = group2 == channels and w2.shape[1] == 1 and w2.shape[0] == channels
        if not (group2 == 1 and w2.shape[1] == channels) and not depthwise:
            skipped.append((mid.name, f"grouped conv (group {group2}) after {conv1.name}: "
                                      f"pair not equalized"))
            continue
        pairs.append((conv1, mid))
    return pairs, skipped


def _set_const(graph, node, index: int, values: np.ndarray) -> None:
    """Give ``node`` its own constant at input ``index`` (a shared weight stays intact)."""
    node.inputs[index] = graph.make_constant(node.inputs[index].name + "_cle",
                                             values.astype(np.float32))


def equalize(graph) -> dict:
    """Equalize every pair in place; returns {"pairs": [...], "skipped": [...],
    "sweeps": n, "range_ratio_before/after": worst per-layer channel range spread}."""
    pairs, skipped = find_pairs(graph)
    weights = {}

    def weight(node):
        if node.name not in weights:
            weights[node.name] = graph.constant(node.inputs[1]).astype(np.float64)
        return weights[node.name]

    biases = {}
    for conv1, _ in pairs:
        b = graph.constant(conv1.inputs[2]) if len(conv1.inputs) > 2 \
            and conv1.inputs[2].name else None
        biases[conv1.name] = None if b is None else b.astype(np.float64)

    def spread(w):
        r = np.abs(w).reshape(w.shape[0], -1).max(1)
        return float(r.max() / max(r[r > 0].min(), 1e-30)) if (r > 0).any() else 1.0

    touched = {n.name: n for pair in pairs for n in pair}
    before = {name: spread(weight(n)) for name, n in touched.items()}
    sweeps = 0
    for sweeps in range(1, SWEEPS + 1):
        moved = 0.0
        for conv1, conv2 in pairs:
            w1, w2 = weight(conv1), weight(conv2)
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
            if w2.shape[1] == 1 and int(conv2.attrs.get("group", 1)) > 1:    # depthwise
                r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1)
            else:
                r2 = np.abs(np.moveaxis(w2, 1, 0)).reshape(w2.shape[1], -1).max(1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            weights[conv1.name] = w1 / s.reshape(shape1)
            if biases[conv1.name] is not None:
                biases[conv1.name] = biases[conv1.name] / s
            if w2.shape[1] == 1 and int(conv2.attrs.get("group", 1)) > 1:
                weights[conv2.name] = w2 * s.reshape(shape1)
            else:
                weights[conv2.name] = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
            moved = max(moved, float(np.abs(np.log(s)).max()) if s.size else 0.0)
        if moved < SETTLED:
            break
    for name, node in touched.items():
        _set_const(graph, node, 1, weights[name])
        if biases.get(name) is not None:
            _set_const(graph, node, 2, biases[name])
    after = {name: spread(weights[name]) for name in touched}
    return {"pairs": [[a.name, b.name] for a, b in pairs],
            "skipped": skipped, "sweeps": sweeps if pairs else 0,
            "channel_range_spread": {name: [round(before[name], 2), round(after[name], 2)]
                                     for name in touched}}


def equalize_checked(graph, ctx, report):
    """An equalized copy of ``graph``, checked to compute the same outputs in float on
    up to CHECK_SAMPLES calibration samples; the original when there is nothing to do or
    the check fails (reported either way)."""
    from onnxc.execution import Runner

    work = graph.copy()
    info = equalize(work)
    for name, reason in info["skipped"]:
        report.skip(name, f"cross-layer equalization: {reason}")
    if not info["pairs"]:
        report.note("cross-layer equalization: no Conv→[Relu]→Conv pair to equalize")
        report.extra["cle"] = info
        return graph
    data = ctx.calibration_data(graph, CHECK_SAMPLES)
    data = data.take(min(len(data), CHECK_SAMPLES))
    ref = Runner(graph).run(data.inputs)
    got = Runner(work).run(data.inputs)
    err = max(float(np.linalg.norm((g - r).astype(np.float64))
                    / max(np.linalg.norm(r.astype(np.float64)), 1e-30))
              for r, g in zip(ref, got))
    info["float_relative_error"] = err
    report.extra["cle"] = info
    if not err <= CHECK_TOLERANCE:
        report.note(f"cross-layer equalization changed the float outputs (relative error "
                    f"{err:.2e} > {CHECK_TOLERANCE:g}): not applied")
        return graph
    worst = max(info["channel_range_spread"].items(), key=lambda kv: kv[1][0])
    report.note(f"cross-layer equalization: {len(info['pairs'])} conv pairs, "
                f"{info['sweeps']} sweeps, float outputs unchanged (rel. error {err:.1e}); "
                f"worst channel range spread {worst[1][0]:g}x -> {worst[1][1]:g}x "
                f"({worst[0]})")
    return work.refresh()
