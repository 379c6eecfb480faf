"""``onnxc qdebug MODEL``: where int8 loses accuracy, layer by layer.

int8 is planned and calibrated once (``Int8.prepare``: the same plan, calibrator and
options ``compress`` would use); then, for every quantizable layer in graph order,

- *only*: the model with just that layer quantized (its inputs, weights and output);
- *cumulative*: every layer up to and including it quantized,

and for each the SQNR (dB) and cosine vs float of the layer's own output (after its
QuantizeLinear/DequantizeLinear, i.e. what the next layer reads) and of the model
output. Range outliers: per weighted layer the spread of per-output-channel weight
ranges (max/median, what per-tensor scales and CLE care about) and max/99.9th-percentile
of |w|; per layer output the same two for the activation (per-tensor scales: one outlier
channel or value stretches the scale for all).

Recommendation: the layers int8 should keep in float (``--keep-float``). With labelled
data and ``--max-drop``, int8's own mixed-precision search (calibrate/mixed.py) on top-1;
otherwise the fewest weighted layers, worst "only" output SQNR first, for the model
output cosine to reach ``--min-cosine``. Writes qdebug.json, qdebug.txt and qdebug.png.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from onnxc.commands import register_command
from onnxc.errors import OutputError, UsageError

OUTLIER_SPREAD = 20.0     # channel range max/median above this is flagged
OUTLIER_TAIL = 4.0        # max/p99.9 of |x| above this is flagged


def _add_option(group, opt) -> None:
    """An int8 option as a flag, as ``compress`` declares it (values stay strings: the
    pass's config converts them). Not imported from onnxc.cli: under ``python -m
    onnxc.cli`` that would load the CLI module a second time."""
    kwargs = {"dest": opt.dest, "help": opt.help, "default": None}
    if opt.is_switch:
        kwargs["action"] = "store_true"
    elif opt.choices is not None:
        kwargs["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}"
    group.add_argument(*opt.flags, **kwargs)


def configure(sub) -> None:
    from onnxc.commands import add_data_args

    from .int8 import Int8

    p = sub.add_parser("qdebug", help="per-layer int8 error (SQNR, cosine), range "
                       "outliers, PNG, and the layers to keep in float")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="directory for qdebug.json/.txt/.png")
    p.add_argument("--passes", default="fold_bn",
                   help="passes applied before int8, as compress would run them "
                        "(default fold_bn)")
    p.add_argument("--samples", type=int, default=128,
                   help="samples the errors are measured on (default 128)")
    p.add_argument("--min-cosine", type=float, default=0.999,
                   help="without labels (or --max-drop): model output cosine vs float "
                        "the float fallback must reach (default 0.999)")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.add_argument("--seed", type=int, default=0)
    add_data_args(p)
    g = p.add_argument_group("int8 options (as for compress)")
    for opt in Int8.options:
        if opt.dest not in ("int8_mode", "format"):
            _add_option(g, opt)


# ----------------------------------------------------------------------------------------
# Metrics


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((np.asarray(got, np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over samples of the cosine between the flattened per-sample vectors."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(got, np.float64).reshape(len(got), -1)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    return float(cos.mean())


def output_cosine(ref: list, got: list) -> float:
    return float(np.mean([cosine(r, g) for r, g in zip(ref, got)]))


def output_sqnr(ref: list, got: list) -> float:
    return float(min(sqnr_db(r, g) for r, g in zip(ref, got)))


def range_outliers(x: np.ndarray, channel_axis: int) -> dict:
    """{"spread": max/median per-channel max|x|, "tail": max|x| / p99.9 |x|}."""
    a = np.abs(np.asarray(x, np.float32))
    if a.size == 0:
        return {"spread": 1.0, "tail": 1.0}
    per = np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1).max(1) \
        if a.ndim > channel_axis else a.reshape(1, -1).max(1)
    med = float(np.median(per))
    p999 = float(np.percentile(a, 99.9))
    return {"spread": float(per.max() / med) if med > 0 else float("inf") if per.max() > 0
            else 1.0,
            "tail": float(a.max() / p999) if p999 > 0 else 1.0}


# ----------------------------------------------------------------------------------------
# Measurement


def _compared_tensor(graph, plan, node) -> str:
    """Float-graph name of what the layer hands on: its fused Relu's output, else its own."""
    out = node.outputs[0].name
    relu = plan.fused_relu.get(out)
    if relu is not None:
        nodes = {n.name: n for n in graph.nodes}
        return nodes[relu].outputs[0].name
    return out


def _quantized_name(built, name: str) -> str:
    """Name in ``built`` of ``name`` after its QuantizeLinear→DequantizeLinear."""
    tensors = built.tensors()
    t = tensors.get(name)
    if t is None:
        return name
    if t.inputs and t.inputs[0].op == "DequantizeLinear":
        return name
    for q in t.outputs:
        if q.op == "QuantizeLinear":
            for dq in q.outputs[0].outputs:
                if dq.op == "DequantizeLinear":
                    return dq.outputs[0].name
    return name


def _run(graph, feeds, extra: list) -> tuple[list, list]:
    """(model outputs, extra tensors) of ``graph``."""
    from onnxc.execution import Runner, capture_model

    outputs = [t.name for t in graph.gs.outputs]
    got = Runner(capture_model(graph, extra, keep_outputs=True)).run(feeds)
    names = list(dict.fromkeys(outputs + extra))
    by_name = dict(zip(names, got)) if len(got) == len(names) else {}
    if not by_name:                       # capture keeps outputs first, then the extras
        by_name = dict(zip(outputs + [e for e in extra if e not in outputs], got))
    return [by_name[n] for n in outputs], [by_name[n] for n in extra]


def measure(prep, dataset, log=None) -> tuple[list, list]:
    """(rows, layer order). One row per quantizable layer, graph order."""
    from .int8 import Plan

    graph = prep.graph
    full = Plan(graph, prep.candidates, prep.scheme.signed)
    layers = [n for n in graph.nodes if n.name in full.layers]
    weighted = {n.name for n in prep.weighted}
    feeds = dataset.inputs
    ref_out, _ = _run(graph, feeds, [])
    rows = []
    for i, node in enumerate(layers):
        name = _compared_tensor(graph, full, node)
        _, (ref_layer,) = _run(graph, feeds, [name])
        row = {"layer": node.name, "op": node.op, "tensor": name,
               "weighted": node.name in weighted}
        for mode, layer_set in (("only", {node.name}),
                                ("cumulative", {n.name for n in layers[:i + 1]})):
            built, _ = prep.build(layer_set)
            out, (lay,) = _run(built, feeds, [_quantized_name(built, name)])
            row[mode] = {"layer_sqnr_db": sqnr_db(ref_layer, lay),
                         "layer_cosine": cosine(ref_layer, lay),
                         "output_sqnr_db": output_sqnr(ref_out, out),
                         "output_cosine": output_cosine(ref_out, out)}
        row["activation"] = range_outliers(ref_layer, 1 if ref_layer.ndim > 1 else 0)
        if node.name in weighted:
            from onnxc.calibrate import qdq

            w = graph.constant(node.inputs[1])
            axis = qdq.weight_axis(graph, node)
            row["weight"] = range_outliers(w, axis if axis is not None else 0)
        flags = []
        for what in ("weight", "activation"):
            r = row.get(what)
            if r and r["spread"] > OUTLIER_SPREAD:
                flags.append(f"{what} channel spread {r['spread']:.0f}x")
            if r and r["tail"] > OUTLIER_TAIL:
                flags.append(f"{what} max/p99.9 {r['tail']:.1f}x")
        row["outliers"] = flags
        rows.append(row)
        if log:
            log(f"  {i + 1}/{len(layers)} {node.name}: only {row['only']['output_sqnr_db']:.1f} dB")
    return rows, [n.name for n in layers]


def recommend_by_cosine(prep, rows, dataset, min_cosine: float) -> dict:
    """Fewest weighted layers (worst 'only' output SQNR first) kept float for the model
    output cosine to reach ``min_cosine``, by bisection on how many fall back."""
    graph = prep.graph
    feeds = dataset.inputs
    ref, _ = _run(graph, feeds, [])
    order = [r["layer"] for r in sorted((r for r in rows if r["weighted"]),
                                        key=lambda r: r["only"]["output_sqnr_db"])]
    cache: dict = {}

    def cos_at(k):
        if k not in cache:
            out, _ = _run(prep.build(prep.candidates - set(order[:k]))[0], feeds, [])
            cache[k] = output_cosine(ref, out)
        return cache[k]

    lo, hi = 0, len(order)
    if cos_at(0) < min_cosine:
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cos_at(mid) >= min_cosine:
                hi = mid
            else:
                lo = mid + 1
    return {"criterion": f"model output cosine >= {min_cosine}", "keep_float": order[:lo],
            "output_cosine_all_int8": cos_at(0), "output_cosine_with_fallback": cos_at(lo),
            "met": cos_at(lo) >= min_cosine,
            "trace": [{"fallback": k, "output_cosine": v} for k, v in sorted(cache.items())]}


# ----------------------------------------------------------------------------------------
# Output


def _fmt_db(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.1f}"


def table(rows) -> str:
    head = ["layer", "op", "only layer dB", "only out dB", "only out cos", "cum out dB",
            "cum out cos", "w spread", "a spread", "a max/p99.9", "outliers"]
    lines = [head]
    for r in rows:
        o, c = r["only"], r["cumulative"]
        lines.append([r["layer"][:36], r["op"], _fmt_db(o["layer_sqnr_db"]),
                      _fmt_db(o["output_sqnr_db"]), f"{o['output_cosine']:.5f}",
                      _fmt_db(c["output_sqnr_db"]), f"{c['output_cosine']:.5f}",
                      f"{r['weight']['spread']:.1f}" if "weight" in r else "-",
                      f"{r['activation']['spread']:.1f}", f"{r['activation']['tail']:.2f}",
                      "; ".join(r["outliers"]) or "-"])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i in (0, 1, len(head) - 1) else c.rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))).rstrip()
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    cap = 80.0       # an exact layer (inf dB) is drawn at the top of the axis

    def ys(mode, key):
        return [min(r[mode][key], cap) for r in rows]

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(rows) + 4), 7),
                                  sharex=True)
    ax.plot(x, ys("only", "layer_sqnr_db"), "o-", ms=3, lw=1, label="layer output, only it")
    ax.plot(x, ys("only", "output_sqnr_db"), "s-", ms=3, lw=1, label="model output, only it")
    ax.plot(x, ys("cumulative", "output_sqnr_db"), "^-", ms=3, lw=1,
            label="model output, cumulative")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("int8 quantization error per layer (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.bar(x - 0.2, [r.get("weight", {}).get("spread", 0.0) for r in rows], 0.4,
            label="weight channel range max/median")
    ax2.bar(x + 0.2, [r["activation"]["spread"] for r in rows], 0.4,
            label="activation channel range max/median")
    ax2.set_yscale("log")
    ax2.set_ylabel("range spread")
    ax2.legend(fontsize=7)
    ax2.set_xticks(x)
    ax2.set_xticklabels([r["layer"][:24] for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _finite(v):
    """JSON has no infinity: an exact layer's SQNR is written as null."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@register_command("qdebug", configure)
def handler(args) -> int:
    from onnxc import frontend
    from onnxc.commands import data_loaders
    from onnxc.pipeline import Context, PassManager, PassReport, resolve_passes

    from .int8 import Int8

    if args.samples <= 0:
        raise UsageError("--samples must be positive")
    if not 0.0 < args.min_cosine <= 1.0:
        raise UsageError(f"--min-cosine {args.min_cosine} must be in (0, 1]")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    if any(p in ("int8", "ternary", "binary") for p in passes):
        raise UsageError("--passes lists what runs before int8; leave quantization out")
    values = {opt.dest: getattr(args, opt.dest) for opt in Int8.options
              if getattr(args, opt.dest, None) not in (None, False)}
    int8 = Int8(values)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise OutputError(f"-o {args.output} exists and is not a directory")
    graph = frontend.load(args.model, frontend.parse_input_shapes(args.input_shape))
    calib, eval_ = data_loaders(args)
    calib_ds = calib(graph) if calib else None
    eval_ds = eval_(graph) if eval_ else None
    log = (lambda m: print(m, file=sys.stderr))
    ctx = Context(seed=args.seed, calibration=calib_ds, evaluation=eval_ds, log=log,
                  calib_samples=args.calib_samples)
    if passes:
        graph = PassManager(resolve_passes(passes), verify=False).run(graph, ctx).graph
    int8.validate(ctx)
    report = PassReport("int8", False)
    prep = int8.prepare(graph, ctx, report)
    base = eval_ds if eval_ds is not None else (calib_ds if calib_ds is not None
                                                 else prep.data)
    ds = base.take(min(args.samples, len(base)))
    log(f"onnxc: qdebug on {len(ds)} {'evaluation' if eval_ds is not None else 'calibration'}"
        f" samples{' (RANDOM)' if ds.synthetic else ''}, calibrator {prep.method}")
    rows, _ = measure(prep, ds, log)
    if not rows:
        raise UsageError("nothing to debug: no layer of this model is quantized by int8")
    if int8.config.max_drop is not None:
        # int8's own fallback: weighted layers grouped with the activation-only ops
        # they feed, by sensitivity per MAC.
        keep = int8.float_fallback(prep, ctx, report)
        mp = report.extra["mixed_precision"]
        rec = {"criterion": f"top-1 drop <= {int8.config.max_drop} pt on {mp['samples']} "
                            f"{mp['data']} samples",
               "keep_float": keep, "reference_top1": mp["reference_top1"],
               "final_top1": mp["final_top1"],
               "met": mp["reference_top1"] - mp["final_top1"] <= int8.config.max_drop,
               "trace": mp["trace"]}
    else:
        rec = recommend_by_cosine(prep, rows, ds, args.min_cosine)
    worst = sorted(rows, key=lambda r: r["only"]["output_sqnr_db"])[:5]
    text = table(rows)
    summary = [f"worst layers (model output SQNR with only that layer int8): "
               + ", ".join(f"{r['layer']} {_fmt_db(r['only']['output_sqnr_db'])} dB"
                           for r in worst),
               f"all int8: model output SQNR "
               f"{_fmt_db(rows[-1]['cumulative']['output_sqnr_db'])} dB, cosine "
               f"{rows[-1]['cumulative']['output_cosine']:.5f}",
               f"keep in float ({rec['criterion']}): "
               f"{','.join(rec['keep_float']) or '(none)'}"
               + ("" if rec["met"] else "  [bound NOT met even with every weighted layer float]")]
    if rec["keep_float"]:
        summary.append(f"  -> onnxc compress ... --passes {','.join(passes + ['int8'])} "
                       f"--keep-float {','.join(rec['keep_float'])}")
    os.makedirs(args.output, exist_ok=True)
    doc = {"model": str(args.model), "samples": len(ds), "calibrator": prep.method,
           "data": "evaluation" if eval_ds is not None else "calibration",
           "layers": rows, "worst": [r["layer"] for r in worst], "recommendation": rec,
           "int8_notes": report.notes}
    try:
        _write_atomic(os.path.join(args.output, "qdebug.json"),
                      json.dumps(_finite(doc), indent=1, default=float).encode())
        _write_atomic(os.path.join(args.output, "qdebug.txt"),
                      (text + "\n\n" + "\n".join(summary) + "\n").encode())
        png = os.path.join(args.output, "qdebug.png")
        plot(rows, png + ".tmp.png")
        os.replace(png + ".tmp.png", png)
    except OSError as exc:
        raise OutputError(f"cannot write to {args.output}: {exc.strerror}") from None
    print(text)
    print()
    print("\n".join(summary))
    print(f"written: {args.output}/qdebug.json, qdebug.txt, qdebug.png")
    return 0
