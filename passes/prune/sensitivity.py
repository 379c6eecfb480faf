"""``onnxc sensitivity MODEL``: how much each prunable group hurts when pruned alone.

For every prunable group and every ratio, the group's lowest-scored channels (by the
chosen criterion) are removed — simulated exactly by zeroing the weights that read
them, which is what removal computes — and the model is run on the data. The output
error is ‖y − y₀‖ / ‖y₀‖ over all outputs; with labels, top-1 too. Prints a table,
writes a PNG plot and optionally JSON that ``--prune-sensitivity`` feeds into
``--prune-flops`` allocation.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from onnxc.commands import register_command
from onnxc.errors import UsageError


def configure(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-group pruning sensitivity: table + PNG plot")
    p.add_argument("model")
    p.add_argument("--passes", default="fold_bn",
                   help="passes applied before measuring (as compress would run before "
                        "prune; default fold_bn)")
    p.add_argument("--ratios", default="0.25,0.5,0.75",
                   help="comma-separated pruning ratios in (0, 1)")
    from .criteria import CRITERIA

    # Criteria that only score channels; one that rewrites itself (thinet) has no
    # zeroing to simulate here.
    p.add_argument("--criterion", default="l1",
                   choices=[name for name, c in CRITERIA.items() if c.rewrite is None])
    p.add_argument("--residual", action="store_true",
                   help="also measure residual groups (see --prune-residual)")
    p.add_argument("--samples", type=int, default=128, help="samples to evaluate on")
    p.add_argument("--plot", default="sensitivity.png", help="PNG path ('' for none)")
    p.add_argument("--json", default=None, help="write curves for --prune-sensitivity")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.add_argument("--seed", type=int, default=0)
    from onnxc.commands import add_data_args

    add_data_args(p)


def parse_ratios(text: str) -> list:
    try:
        ratios = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise UsageError(f"--ratios '{text}' must be comma-separated numbers") from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UsageError(f"--ratios must be in (0, 1), got '{text}'")
    return ratios


def measure(graph, groups, dg, scores, ratios, dataset, log=None) -> list:
    """[{group, sources, channels, macs_share, error{ratio}, top1{ratio}}] per group."""
    from onnxc.execution import Runner

    from .allocate import Allocator

    feeds = dataset.inputs
    ref = Runner(graph).run(feeds)
    ref_norm = math.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)) + 1e-12
    labels = dataset.labels
    base = dg.estimate_macs(np.zeros(dg.num_classes, bool))
    rows = []
    for gi, g in enumerate(groups):
        alloc = Allocator(dg, [g], scores)
        consumers = [c for c in dg.consumers if np.isin(dg.label[c.slots], g.classes).any()]
        row = {"group": g.label, "sources": list(g.sources), "channels": int(len(g.classes)),
               "error": {}, "top1": {}, "macs_saved": {}}
        for r in ratios:
            removed = alloc.select(r, False)
            saved = 1.0 - dg.estimate_macs(removed) / max(base, 1)
            originals = []
            for c in consumers:        # zero what reads removed channels = removing them
                w = np.asarray(c.node.inputs[1].values)
                originals.append((c.node, w))
                c.node.inputs[1].values = _zero_inputs(c, w, removed[dg.label[c.slots]])
            try:
                out = Runner(graph).run(feeds)
            finally:
                for node, w in originals:
                    node.inputs[1].values = w
            err = math.sqrt(sum(float(np.sum((o.astype(np.float64) - a) ** 2))
                                for o, a in zip(out, ref))) / ref_norm
            row["error"][r] = round(err, 6)
            row["macs_saved"][r] = round(saved, 6)
            if labels is not None:
                pred = out[0].reshape(len(out[0]), -1).argmax(1)
                row["top1"][r] = round(100.0 * float(np.mean(pred == labels)), 3)
        rows.append(row)
        if log:
            log(f"  [{gi + 1}/{len(groups)}] {g.label}: "
                + "  ".join(f"{r:g}: {row['error'][r]:.4f}" for r in ratios))
    return rows


def _zero_inputs(cons, w, dead) -> np.ndarray:
    """Weights of a consumer with the inputs at positions ``dead`` zeroed (new array)."""
    w = w.copy()
    pos = np.flatnonzero(dead)
    if cons.kind in ("conv", "matmul"):
        if cons.kind == "conv":
            w[:, pos] = 0
        else:
            w[pos] = 0
    elif cons.kind == "gemm":
        if int(cons.node.attrs.get("transB", 0)):
            w[:, pos] = 0
        else:
            w[pos] = 0
    elif cons.kind == "convT":
        w[pos] = 0
    elif cons.kind == "rnn":
        w[..., pos] = 0                   # W [dirs, G·H, in]: input features last
    elif cons.kind == "grouped":
        g = int(cons.node.attrs.get("group", 1))
        cig = w.shape[1]
        cog = w.shape[0] // g
        for p in pos:
            grp = p // cig
            w[grp * cog:(grp + 1) * cog, p % cig] = 0
    return w


def table(rows, ratios) -> str:
    has_top1 = any(r["top1"] for r in rows)
    head = ["group", "ch"] + [f"err@{r:g}" for r in ratios] + \
        ([f"top1@{r:g}" for r in ratios] if has_top1 else []) + \
        [f"MACs-@{ratios[-1]:g}"]
    lines = [head]
    for row in rows:
        line = [row["group"][:48], str(row["channels"])]
        line += [f"{row['error'][r]:.4f}" for r in ratios]
        if has_top1:
            line += [f"{row['top1'][r]:.1f}" for r in ratios]
        line.append(f"{100 * row['macs_saved'][ratios[-1]]:.1f}%")
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def plot(rows, ratios, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        ax.plot(ratios, [row["error"][r] for r in ratios], marker="o", lw=1,
                label=row["group"][:40])
    ax.set_xlabel("pruning ratio of the group alone")
    ax.set_ylabel("relative output error ‖y−y₀‖/‖y₀‖")
    ax.set_title("Pruning sensitivity per channel group")
    ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax.legend(fontsize=6)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        from onnxc.errors import OutputError

        raise OutputError(f"cannot write plot {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)


@register_command("sensitivity", configure)
def handler(args) -> int:
    from onnxc import frontend
    from onnxc.calibrate.readers import random_dataset
    from onnxc.commands import data_loaders
    from onnxc.pipeline import Context, PassManager, resolve_passes

    from . import prunable_groups
    from .criteria import scores as criterion_scores
    from .groups import DependencyGraph

    ratios = parse_ratios(args.ratios)
    if args.samples <= 0:
        raise UsageError("--samples must be positive")
    passes = [p for p in args.passes.split(",") if p.strip()]
    if any(p.strip() in ("prune", "sparsify") for p in passes):
        raise UsageError("--passes lists what runs before pruning; leave prune out")
    graph = frontend.load(args.model, frontend.parse_input_shapes(args.input_shape))
    calib, eval_ = data_loaders(args)
    ds = eval_(graph) if eval_ else (calib(graph) if calib else None)
    ds = ds.take(min(args.samples, len(ds))) if ds is not None \
        else random_dataset(graph, args.samples, seed=args.seed)
    log = (lambda m: print(m, file=sys.stderr))
    ctx = Context(seed=args.seed, calibration=ds, log=log)
    graph = PassManager(resolve_passes(passes), verify=False).run(graph, ctx).graph
    graph.name_nodes()
    dg = DependencyGraph(graph)
    groups = prunable_groups(dg, [], None, residual=args.residual)
    if not groups:
        raise UsageError("nothing to measure: no prunable channel group in this model")
    scores = criterion_scores(args.criterion, dg, graph, ctx, args.samples)
    log(f"onnxc: sensitivity of {len(groups)} groups at ratios {ratios} on {len(ds)} "
        f"{'random' if ds.synthetic else 'data'} samples")
    rows = measure(graph, groups, dg, scores, ratios, ds, log)
    print(table(rows, ratios))
    if args.plot:
        plot(rows, ratios, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": str(args.model), "criterion": args.criterion,
                       "ratios": ratios, "groups": rows}, f, indent=1)
        print(f"curves written to {args.json}")
    return 0

