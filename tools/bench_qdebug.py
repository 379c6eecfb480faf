"""qdebug, cross-layer equalization, AdaRound and float fallback on a MobileNetV2-like net.

Builds a small MobileNetV2-like CNN (inverted residual blocks: 1x1 expand, 3x3 depthwise,
1x1 linear projection, residual adds; BatchNorm, ReLU) and trains it briefly on
scikit-learn's bundled digits (8x8, 10 classes; as examples/make_example.py loads them),
exports it with BN folded by the exporter (what makes depthwise channel ranges span
orders of magnitude), then:

1. runs ``onnxc qdebug`` on it and prints the worst layers and the keep-float advice;
2. quantizes it with int8 as is, with --int8-cle, with --int8-adaround, with both, and
   with the float fallback qdebug recommends — per-channel and per-tensor weights — and
   prints int8 output cosine vs fp32 and top-1 on the held-out digits.

``--unbalance F`` additionally rescales the expand→depthwise channels by seeded factors
in [1/F, F] (function-preserving in float: ReLU is positively homogeneous), the "weights
with deliberately unbalanced channel ranges" case. Seeded, CPU only, a few minutes on a
shared 2-core machine (training dominates; --keep DIR trains once).

    python tools/bench_qdebug.py [--epochs 6] [--unbalance 0] [--adaround-iters 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.make_example import digits, train  # noqa: E402  (the built-in example's)


def mobilenet_like(classes: int = 10, act: str = "relu"):
    import torch
    from torch import nn

    Act = nn.ReLU if act == "relu" else nn.ReLU6

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            self.body = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), Act(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), Act(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), Act(),
        InvertedResidual(16, 16, 1, 1),
        InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6),
        InvertedResidual(24, 32, 1, 6), InvertedResidual(32, 32, 1, 6),
        nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), Act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))



def unbalance(model, factor: float, seed: int = 0):
    """Rescale every expand→Relu→depthwise pair's channels by factors in [1/F, F]."""
    from onnxc.calibrate.equalize import find_pairs
    from onnxc.ir import Graph

    graph = Graph.from_onnx(model)
    rng = np.random.default_rng(seed)
    pairs, _ = find_pairs(graph)
    for conv1, conv2 in pairs:
        if int(conv2.attrs.get("group", 1)) == 1:
            continue
        w1, w2 = graph.constant(conv1.inputs[1]), graph.constant(conv2.inputs[1])
        s = np.exp(rng.uniform(-np.log(factor), np.log(factor), w1.shape[0]))
        conv1.inputs[1] = graph.make_constant(conv1.inputs[1].name + "_u",
                                              (w1 * s[:, None, None, None]).astype(np.float32))
        if len(conv1.inputs) > 2 and graph.constant(conv1.inputs[2]) is not None:
            conv1.inputs[2] = graph.make_constant(
                conv1.inputs[2].name + "_u", (graph.constant(conv1.inputs[2]) * s)
                .astype(np.float32))
        conv2.inputs[1] = graph.make_constant(conv2.inputs[1].name + "_u",
                                              (w2 / s[:, None, None, None]).astype(np.float32))
    return graph.refresh().to_onnx()


def quantize(graph, options: dict, calib, seed: int = 0):
    from onnxc.passes.int8 import Int8
    from onnxc.pipeline import Context, PassReport

    ctx = Context(seed=seed, calibration=calib, log=lambda m: None, progress=False)
    report = PassReport("int8", False)
    out = Int8(options).run(graph.copy(), ctx, report)
    return out, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--unbalance", type=float, default=0.0)
    ap.add_argument("--adaround-iters", type=int, default=300)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--keep", help="keep the model and data in this folder")
    args = ap.parse_args(argv)

    import onnx
    import torch

    from onnxc.calibrate.readers import Dataset
    from onnxc.execution import Runner
    from onnxc import frontend
    from onnxc.frontend import from_torch
    from onnxc.passes.qdebug import output_cosine

    work = args.keep or tempfile.mkdtemp(prefix="bench_qdebug_")
    os.makedirs(work, exist_ok=True)
    (xtr, ytr), (xte, yte) = digits()
    t0 = time.perf_counter()
    path = os.path.join(work, "mobilenet_like.onnx")
    trained = os.path.join(work, f"mobilenet_like_e{args.epochs}.onnx")
    if os.path.exists(trained):              # --keep DIR: train once, measure many times
        model = onnx.load(trained)
    else:
        torch.set_num_threads(2)
        net = train(mobilenet_like(), xtr, ytr, args.epochs)
        model = from_torch(net, torch.zeros(1, 1, 8, 8), output_names=["logits"])
        onnx.save(model, trained)
    if args.unbalance > 1:
        model = unbalance(model, args.unbalance)
    onnx.save(model, path)
    np.savez(os.path.join(work, "train.npz"), images=xtr, labels=ytr)
    np.savez(os.path.join(work, "test.npz"), images=xte, labels=yte)
    print(f"trained MobileNetV2-like net ({args.epochs} epochs, {time.perf_counter() - t0:.0f} s)"
          f"{f', channels unbalanced x{args.unbalance:g}' if args.unbalance > 1 else ''}: "
          f"{path}")

    # 1. onnxc qdebug (the command as a user runs it)
    qd = os.path.join(work, "qdebug")
    cmd = [sys.executable, "-m", "onnxc.cli", "qdebug", path, "-o", qd,
           "--calib-data", os.path.join(work, "train.npz"), "--calib-samples",
           str(args.calib_samples), "--scale", "0.0625", "--samples", "128"]
    try:
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)
        return 1
    print(text)
    # qdebug again with CLE: the same table once the channel ranges are balanced
    try:
        cle_cmd = [c if c != qd else qd + "_cle" for c in cmd] + ["--int8-cle"]
        after = subprocess.run(cle_cmd, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)
        return 1
    print("qdebug --int8-cle: " + "\n".join(line for line in after.splitlines()
                                          if line.startswith(("worst", "all int8"))))
    import json

    with open(os.path.join(qd, "qdebug.json")) as f:
        keep = json.load(f)["recommendation"]["keep_float"]

    # 2. int8 variants: output cosine vs fp32 and top-1 on the held-out digits
    graph = frontend.load(path)
    graph.name_nodes()
    calib = Dataset({"input": (xtr[:args.calib_samples] / 16.0).astype(np.float32)},
                    None, "digits-train")
    test = {"input": (xte / 16.0).astype(np.float32)}
    ref = Runner(graph).run(test)
    top1_fp = float((ref[0].argmax(1) == yte).mean() * 100)
    print(f"fp32: top-1 {top1_fp:.2f}% on {len(yte)} held-out digits")
    variants = [("int8", {}), ("int8 --int8-cle", {"int8_cle": True}),
                ("int8 --int8-adaround", {"int8_adaround": True,
                                          "int8_adaround_iters": args.adaround_iters}),
                ("int8 --int8-cle --int8-adaround", {"int8_cle": True, "int8_adaround": True,
                                                     "int8_adaround_iters": args.adaround_iters})]
    if keep:
        variants.append((f"int8 --keep-float <qdebug's {len(keep)}>",
                         {"keep_float": ",".join(keep)}))
    print(f"{'variant':44s} {'weights':8s} {'out cosine':>10s} {'top-1':>7s} {'s':>5s}")
    # 7-bit per-tensor weights (reduced range, x86 without VNNI): where rounding matters.
    settings = {"channel": {"int8_weight_granularity": "channel"},
                "tensor": {"int8_weight_granularity": "tensor"},
                "tensor7": {"int8_weight_granularity": "tensor", "int8_reduce_range": "on"}}
    for gran, base_opts in settings.items():
        for label, opts in variants:
            t = time.perf_counter()
            q, report = quantize(graph, dict(opts, **base_opts), calib)
            out = Runner(q).run(test)
            cos = output_cosine(ref, out)
            top1 = float((out[0].argmax(1) == yte).mean() * 100)
            ada = report.extra.get("adaround", {}).get("layers", {})
            used = [r["mse_nearest"] / max(r["mse_adaround"], 1e-30) for r in ada.values()
                    if r["used"]]
            note = f"  layer MSE /{np.median(used):.2f} (median, {len(used)}/{len(ada)} " \
                   f"layers)" if ada else ""
            print(f"{label:44s} {gran:8s} {cos:10.5f} {top1:6.2f}% "
                  f"{time.perf_counter() - t:5.1f}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
