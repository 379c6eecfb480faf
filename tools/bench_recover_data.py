#!/usr/bin/env python3
"""How much does `recover` gain from more training images? (is it data-limited?)

    python tools/bench_recover_data.py [--model resnet56] [--fractions 0.125,0.25,0.5,1]
        [--epochs 6] [--augment flip,crop,mixup] [--threads 2]

ResNet-56 (../shared) is pruned once (fold_bn, prune −50% FLOPs, ThiNet — the suite's
prune50), then recovered from the original model on random subsets of the 5,085
CIFAR-10 training images. Every run takes the same number of optimizer steps
(--epochs passes over the full set; a subset of a quarter runs four times as many
epochs), so the runs differ only in how many distinct images they see. Each subset is
drawn with one seed and nested in the next (the half holds the quarter). Top-1 is
measured on test_dev.

The printed fit is top-1 against log2(images): the gain per doubling of the data, and
where that line would meet the original's accuracy minus 0.5 pt (the recovery goal for
prune50+recover). A line through a handful of points is a rough guide, not a law; the
runs carry about ±1 pt of noise on 509 test images.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
CIFAR = dict(scale=1 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def subset(ds, idx):
    from onnxc.calibrate.readers import Dataset

    return Dataset({k: v[idx] for k, v in ds.inputs.items()},
                   None if ds.labels is None else ds.labels[idx],
                   f"{ds.source}[{len(idx)} of {len(ds)}]")


def steps_per_epoch(n: int, batch: int = 32) -> int:
    """Optimizer steps recover takes per epoch over ``n`` samples: it holds
    min(256, n/10) out to pick the best epoch and drops the ragged last batch
    (passes/recover/distill.py)."""
    return max(1, (n - (min(256, n // 10) if n >= 100 else 0)) // batch)


def fit_line(xs, ys):
    """Least-squares y = a + b·x; returns (a, b)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b = float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else 0.0
    return float(y.mean() - b * x.mean()), b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56", choices=("resnet20", "resnet56"))
    p.add_argument("--fractions", default="0.125,0.25,0.5,1")
    p.add_argument("--epochs", type=float, default=6.0,
                   help="training length, in passes over the FULL training set (same "
                        "number of steps for every fraction)")
    p.add_argument("--augment", default="flip,crop,mixup", help="--recover-augment")
    p.add_argument("--hints", default="auto", help="--recover-hints")
    p.add_argument("--criterion", default="thinet", help="--prune-criterion")
    p.add_argument("--threads", type=int, default=2, help="--recover-threads")
    p.add_argument("--seed", type=int, default=0, help="subsets, pruning and training")
    args = p.parse_args(argv)

    model_path = SHARED / "models" / f"{args.model}_cifar10.onnx"
    train_npz = SHARED / "data" / "cifar10" / "train.npz"
    if not model_path.is_file() or not train_npz.is_file():
        print(f"needs {model_path} and {train_npz} (../shared)", file=sys.stderr)
        return 2
    fractions = sorted(float(f) for f in args.fractions.split(","))
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        p.error("--fractions are shares of the training set in (0, 1]")

    from onnxc import frontend
    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.compress import compress

    graph = frontend.load(str(model_path))
    pre = Preprocess(CIFAR["scale"], CIFAR["mean"], CIFAR["std"])
    train = load_npz(str(train_npz), graph, pre)
    test = load_npz(str(SHARED / "data" / "cifar10" / "test_dev.npz"), graph, pre)

    log(f"pruning {model_path.name}: fold_bn, prune -50% FLOPs ({args.criterion})")
    base = compress(str(model_path), ["fold_bn", "prune"],
                    options={"prune_flops": 0.5, "prune_criterion": args.criterion},
                    calibration=train, evaluation=test, seed=args.seed, log=lambda m: None)
    acc = base.report["accuracy"]
    original, pruned = acc["original_top1"], acc["final_top1"]
    model = base.graph.to_onnx()
    order = np.random.default_rng(args.seed).permutation(len(train))

    print(f"# {model_path.name}: original top-1 {original:.2f}%, pruned (-50% FLOPs, "
          f"{args.criterion}, no training) {pruned:.2f}%; recover: the steps of {args.epochs:g} "
          f"epochs over all images for each subset, augment {args.augment}, hints {args.hints}, "
          f"{args.threads} torch threads, seed {args.seed}; load {os.getloadavg()[0]:.2f}")
    header = (f"{'images':>6} {'share':>6} {'epochs':>7} {'steps':>6} {'train s':>8} "
              f"{'top-1 %':>8} {'drop pt':>8} {'held-out agree':>14}")
    print(header)
    print("-" * len(header), flush=True)
    points = []
    for frac in fractions:
        n = max(64, int(round(frac * len(train))))
        data = subset(train, np.sort(order[:n]))
        epochs = args.epochs * steps_per_epoch(len(train)) / steps_per_epoch(n)
        log(f"recover on {n} images, {epochs:.2f} epochs")
        res = compress(model, ["recover"],
                       options={"recover_epochs": epochs, "recover_teacher": str(model_path),
                                "recover_augment": args.augment, "recover_hints": args.hints,
                                "recover_threads": args.threads},
                       calibration=data, evaluation=test, seed=args.seed,
                       log=lambda m: None)
        top1 = res.report["accuracy"]["final_top1"]
        ex = next(q for q in res.report["passes"] if q["name"] == "recover")["extra"]
        held = (ex.get("held_out") or [{}])[-1].get("agree")
        points.append((n, top1))
        print(f"{n:>6} {frac:>6.3f} {ex['epochs']:>7.2f} {ex['steps']:>6} "
              f"{ex['train_seconds']:>8.0f} {top1:>8.2f} {original - top1:>+8.2f} "
              f"{'-' if held is None else f'{100 * held:.1f}%':>14}", flush=True)

    a, b = fit_line([math.log2(n) for n, _ in points], [t for _, t in points])
    goal = original - 0.5
    print(f"# fit: top-1 = {a:.2f} + {b:.2f} * log2(images)  ({b:+.2f} pt per doubling)")
    if b > 0:
        need = 2 ** ((goal - a) / b)
        print(f"# on that line, top-1 {goal:.2f}% (drop 0.5 pt) needs about {need:,.0f} "
              f"images ({need / len(train):.1f}x the {len(train)} here)")
    else:
        print("# no gain from more images in this range: the line does not reach the goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
