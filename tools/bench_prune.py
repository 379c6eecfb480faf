"""Benchmark of structured pruning on the shared CIFAR ResNet-56.

One run prints every figure docs/pruning.md reports: for each criterion,
``onnxc.compress(..., passes=["fold_bn", "prune"], prune_flops=0.5)`` without any
training, with MACs and parameters removed, top-1 on test_dev and the pass time;
then the ORT latency (CPU, batch 64) of the original and the pruned model, measured
in the same run, interleaved, after warm-up, median of repetitions, with 1 thread
and with ORT's default threads, and the load average at start and end.

Latency table, per pruned architecture (criteria that give the same shapes run at
the same speed: l1 and fpgm always do at one allocation; thinet re-fits weights but
keeps the shapes, so its model is the one timed when it is run):

- ``original``: the shared model file as ORT loads it;
- ``pruned``: the ``fold_bn,prune`` result;
- ``pruned +layout``: the same with ``--prune-ort-layout`` (channel-Pad shortcuts as
  1x1 selection convs, so ORT keeps the trunk in NCHWc);
- ``original +layout``: ``fold_bn`` and the same layout rewrite on the unpruned model,
  so ``(original +layout) / (pruned +layout)`` is the part due to pruning alone.

    python tools/bench_prune.py [--model resnet56] [--flops 0.5] [--params P]
                                [--criteria l1,fpgm,thinet] [--reps 20]
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
MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255.0


def load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def shapes(graph) -> tuple:
    return tuple((n.op, tuple(getattr(t, "shape", None) or ()))
                 for n in graph.nodes for t in n.inputs[1:2])


def latencies(models: dict, batch=64, warmup=3, reps=20, threads=None) -> dict:
    """Median ORT latency (ms) of each model on the same batch; runs interleaved so
    load changes hit every model alike."""
    from onnxc.execution import Runner

    runners = {k: Runner(m, threads) for k, m in models.items()}
    name = next(iter(runners.values())).input_names[0]
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for _ in range(warmup):
        for r in runners.values():
            r.session.run(None, {name: x})
    times = {k: [] for k in runners}
    for _ in range(reps):
        for k, r in runners.items():
            t = time.perf_counter()
            r.session.run(None, {name: x})
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def with_layout(graph):
    from onnxc.passes.prune.layout import channel_pads_as_convs

    g = graph.copy()
    if channel_pads_as_convs(g):
        g.refresh()
    return g


def table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--params", type=float, default=None,
                   help="also a parameter budget (--prune-params)")
    p.add_argument("--criteria", default="l1,fpgm,thinet")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)

    import onnxruntime

    from onnxc import frontend
    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.compress import compress

    model = SHARED / "models" / f"{args.model}_cifar10.onnx"
    train = SHARED / "data" / "cifar10" / "train.npz"
    test = SHARED / "data" / "cifar10" / "test_dev.npz"
    for f in (model, train, test):
        if not f.exists():
            print(f"needs {f}", file=sys.stderr)
            return 2
    pre = Preprocess(SCALE, MEAN, STD)
    original = frontend.load(str(model))
    budget = f"--prune-flops {args.flops}" + \
        (f" --prune-params {args.params}" if args.params is not None else "")
    start_load = load()
    print(f"# {args.model}: fold_bn,prune {budget} (no training); top-1 on test_dev "
          f"({len(load_npz(str(test), original, pre))} images); latency: ORT "
          f"{onnxruntime.__version__} CPU, batch 64, median of {args.reps} interleaved "
          f"runs after 3 warm-up runs ({os.cpu_count()} cores)")
    rows = [("criterion", "MACs", "MACs removed", "params", "params removed",
             "top-1 orig", "top-1 pruned", "prune s")]
    timed = {}        # shapes -> ([criteria], pruned graph timed)
    for crit in [c.strip() for c in args.criteria.split(",") if c.strip()]:
        options = {"prune_flops": args.flops, "prune_criterion": crit,
                   "prune_samples": args.calib_samples}
        if args.params is not None:
            options["prune_params"] = args.params
        res = compress(str(model), ["fold_bn", "prune"], options=options,
                       calibration_loader=lambda g: load_npz(
                           str(train), g, pre, samples=args.calib_samples),
                       evaluation_loader=lambda g: load_npz(str(test), g, pre),
                       log=lambda m: None)
        rep = res.report
        prune = next(x for x in rep["passes"] if x["name"] == "prune")
        key = shapes(res.graph)
        names, graph = timed.get(key, ([], res.graph))
        timed[key] = (names + [crit], res.graph if crit == "thinet" else graph)
        o, f = rep["original"], rep["final"]
        rows.append((crit, f"{o['macs'] / 1e6:.1f}M -> {f['macs'] / 1e6:.1f}M",
                     f"{100 * (1 - f['macs'] / o['macs']):.1f}%",
                     f"{o['params'] / 1e3:.1f}k -> {f['params'] / 1e3:.1f}k",
                     f"{100 * (1 - f['params'] / o['params']):.1f}%",
                     f"{rep['accuracy']['original_top1']:.2f}%",
                     f"{rep['accuracy']['final_top1']:.2f}%", f"{prune['seconds']:.1f}"))
        print("  done:", crit, file=sys.stderr)
    table(rows)

    print()
    folded = compress(str(model), ["fold_bn"], log=lambda m: None).graph
    rows = [("pruned model", "threads", "original ms", "pruned ms", "orig/pruned",
             "pruned +layout ms", "orig/(pruned +layout)", "orig +layout ms",
             "(orig +layout)/(pruned +layout)", "load")]
    for crits, graph in timed.values():
        models = {"o": original, "p": graph, "pl": with_layout(graph),
                  "ol": with_layout(folded)}
        for threads in (1, None):
            t = latencies(models, reps=args.reps, threads=threads)
            rows.append(("=".join(crits), "1" if threads else "default", f"{t['o']:.0f}",
                         f"{t['p']:.0f}", f"{t['o'] / t['p']:.2f}x", f"{t['pl']:.0f}",
                         f"{t['o'] / t['pl']:.2f}x", f"{t['ol']:.0f}",
                         f"{t['ol'] / t['pl']:.2f}x", load()))
    table(rows)
    print(f"# load average (1 min): {start_load} at start, {load()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
