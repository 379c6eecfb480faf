"""Benchmark of structured pruning on the shared CIFAR ResNet-56 (issue 3).

For each criterion: ``onnxc.compress(..., passes=["fold_bn", "prune"],
prune_flops=0.5)`` without any training, then prints MACs removed, ORT latency
ratio original/pruned (batch 64, both measured in the same run, interleaved, after
warm-up; median of repetitions), top-1 on test_dev and the pass time.

    python tools/bench_prune.py [--model resnet56] [--flops 0.5] [--criteria l1,fpgm,thinet]
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


def latency_ratio(original, pruned, batch=64, warmup=3, reps=10, threads=None):
    """Median ORT latency of both models on the same batch, runs interleaved."""
    from onnxc.verify import Runner

    a, b = Runner(original, threads), Runner(pruned, threads)
    name = a.input_names[0]
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for _ in range(warmup):
        a.session.run(None, {name: x})
        b.session.run(None, {name: x})
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a.session.run(None, {name: x})
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b.session.run(None, {name: x})
        tb.append(time.perf_counter() - t)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma * 1e3, mb * 1e3, ma / mb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--criteria", default="l1,fpgm,thinet")
    p.add_argument("--calib-samples", type=int, default=256)
    args = p.parse_args(argv)

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
    print(f"# {args.model}: fold_bn,prune --prune-flops {args.flops} (no training); "
          f"top-1 on test_dev ({len(load_npz(str(test), original, pre))} images), "
          f"latency: ORT CPU, batch 64, median of 10 interleaved runs after warm-up, "
          f"1 thread and ORT's default threads")
    rows = [("criterion", "MACs", "MACs removed", "1 thread orig/pruned ms", "speed-up",
             "default threads ms", "speed-up", "top-1 orig", "top-1 pruned", "prune s")]
    for crit in [c.strip() for c in args.criteria.split(",") if c.strip()]:
        res = compress(str(model), ["fold_bn", "prune"],
                       options={"prune_flops": args.flops, "prune_criterion": crit,
                                "prune_samples": args.calib_samples},
                       calibration_loader=lambda g: load_npz(
                           str(train), g, pre, samples=args.calib_samples),
                       evaluation_loader=lambda g: load_npz(str(test), g, pre),
                       log=lambda m: None)
        rep = res.report
        prune = next(x for x in rep["passes"] if x["name"] == "prune")
        la1, lb1, ratio1 = latency_ratio(original, res.graph, threads=1)
        la, lb, ratio = latency_ratio(original, res.graph)
        rows.append((crit, f"{rep['original']['macs'] / 1e6:.1f}M -> "
                     f"{rep['final']['macs'] / 1e6:.1f}M",
                     f"{100 * (1 - rep['final']['macs'] / rep['original']['macs']):.1f}%",
                     f"{la1:.0f} / {lb1:.0f}", f"{ratio1:.2f}x",
                     f"{la:.0f} / {lb:.0f}", f"{ratio:.2f}x",
                     f"{rep['accuracy']['original_top1']:.2f}%",
                     f"{rep['accuracy']['final_top1']:.2f}%", f"{prune['seconds']:.1f}"))
        print("  done:", crit, file=sys.stderr)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
