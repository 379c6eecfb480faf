"""Defaults that never slow a model down: rank / channel rounding by target.

1. ResNet-56 ``fold_bn,lowrank --lowrank-flops 0.5``, ranks as they fall
   (``--lowrank-multiple 1``, the old default) against the new default (the target's
   channel block: 8 for ``onnx``): MACs and ONNX Runtime latency relative to the
   original, bs 1 and bs 64.
2. ResNet-56 ``fold_bn,prune --prune-flops 0.5``, uniform and ``--prune-global``: kept
   channel counts unrounded (``--prune-multiple 1``) against the default rounding: MACs,
   distinct conv shapes (each a separate TVM tuning task at least) and latency.

All latencies of one table are measured in the same process, interleaved round by round
after warm-up (ONNX Runtime with spinning off), medians: ratios within one run.

    nice python tools/bench_defaults.py [--reps 20] [--batches 1,64] [--part lowrank,prune]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))


def conv_shapes(graph) -> set:
    """Distinct (C_in, C_out, kernel, stride, input H×W) of the graph's convs."""
    shapes = set()
    for node in graph.nodes:
        if node.op != "Conv":
            continue
        w = node.inputs[1]
        x = node.inputs[0]
        shapes.add((tuple(w.shape), tuple(node.attrs.get("strides", [1, 1])),
                    tuple(x.shape[2:]) if x.shape else None))
    return shapes


def interleaved(models: dict, batch: int, reps: int) -> dict:
    """Median ms per model, all timed round-robin in this process."""
    from onnxc.speed import _ort_session

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sessions = {k: _ort_session(m) for k, m in models.items()}
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, {name[k]: x})
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {name[k]: x})
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def build(model_path, passes, options, target="onnx"):
    from onnxc.compress import compress

    return compress(str(model_path), passes, target=target, options=options,
                    log=lambda m: None)


def table(title, variants: dict, batches, reps):
    """variants: label -> CompressResult (first one is the original)."""
    print(f"\n## {title}")
    models = {k: r.graph.to_onnx() for k, r in variants.items()}
    base = next(iter(variants))
    macs = {k: r.report["final"]["macs"] for k, r in variants.items()}
    shapes = {k: len(conv_shapes(r.graph)) for k, r in variants.items()}
    lat = {b: interleaved(models, b, reps) for b in batches}
    head = f"{'variant':<34} {'MACs':>12} {'MAC ratio':>9} {'conv shapes':>11}"
    for b in batches:
        head += f" {'bs ' + str(b) + ' ms':>10} {'speed':>7}"
    print(head)
    print("-" * len(head))
    for k in variants:
        row = f"{k:<34} {macs[k]:>12,} {macs[base] / macs[k]:>8.2f}x {shapes[k]:>11}"
        for b in batches:
            row += f" {lat[b][k]:>10.2f} {lat[b][base] / lat[b][k]:>6.2f}x"
        print(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "resnet56_cifar10.onnx"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--part", default="lowrank,prune")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"bench_defaults: {args.model} not found", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    parts = args.part.split(",")
    import onnxruntime

    print(f"# {pathlib.Path(args.model).name}; onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} cores; {args.reps} interleaved reps, medians; "
          f"load {os.getloadavg()[0]:.2f}")
    original = build(args.model, ["fold_bn"], {})
    if "lowrank" in parts:
        table("lowrank --lowrank-flops 0.5 (tucker2, data-free)", {
            "original (fold_bn)": original,
            "lowrank, ranks unrounded (old)": build(
                args.model, ["fold_bn", "lowrank"],
                {"lowrank_flops": 0.5, "lowrank_multiple": 1}),
            "lowrank, default (target: 8)": build(
                args.model, ["fold_bn", "lowrank"], {"lowrank_flops": 0.5}),
        }, batches, args.reps)
    if "prune" in parts:
        for rule, opts in (("--prune-flops 0.5 (l1, uniform)", {"prune_flops": 0.5}),
                           ("--prune-flops 0.5 --prune-global (l1)",
                            {"prune_flops": 0.5, "prune_global": True})):
            table(f"prune {rule}", {
                "original (fold_bn)": original,
                "prune, counts unrounded": build(args.model, ["fold_bn", "prune"],
                                                 dict(opts, prune_multiple=1)),
                "prune, default (target: 8)": build(args.model, ["fold_bn", "prune"],
                                                    dict(opts)),
            }, batches, args.reps)
        # At a fixed ratio (no budget to rebalance) rounding up keeps channels: its cost.
        print("\n## what rounding costs at a fixed share: --prune-ratio 0.5 --prune-global")
        for label, extra in (("counts unrounded", {"prune_multiple": 1}),
                             ("default (target: 8)", {})):
            res = build(args.model, ["fold_bn", "prune"],
                        dict(prune_ratio=0.5, prune_global=True, **extra))
            print(f"prune, {label:<22} MACs {res.report['final']['macs']:>12,}  "
                  f"conv shapes {len(conv_shapes(res.graph))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
