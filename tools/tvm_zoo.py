#!/usr/bin/env python3
"""Compile models for TVM x86 / arm / cuda and check x86 against ONNX Runtime.

    python tools/tvm_zoo.py [--targets x86,arm,cuda] [--models all|NAME,...] [--samples 1]

Models: the CIFAR ResNet-20/56 after fold_bn (from ../shared), the onnx package's
light model zoo (weights re-drawn at random with a fixed seed, as the tests do, since
the zoo ships constant weights), and a dynamic-batch model compiled at batch 2
(``--input-shape``). Prints one row per model and target: seconds, files, and for x86
the max relative error vs ONNX Runtime on the compressed model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("ONNXC_SHARED", os.path.join(HERE, "..", "..", "shared"))
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def models() -> dict:
    """name -> (ModelProto or path, passes, input_shapes)."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from conftest import randomize_weights
    from test_tvm import tiny_cnn

    out = {}
    for name in ("resnet20", "resnet56"):
        path = os.path.join(SHARED, "models", f"{name}_cifar10.onnx")
        if os.path.isfile(path):
            out[name] = (path, ["fold_bn"], None)
    for fname in sorted(os.listdir(LIGHT)) if os.path.isdir(LIGHT) else []:
        if fname.startswith("light_") and fname.endswith(".onnx"):
            model = randomize_weights(onnx.load(os.path.join(LIGHT, fname)))
            out[fname[len("light_"):-len(".onnx")]] = (model, ["fold_bn"], None)
    out["dynamic_batch"] = (tiny_cnn(batch="N"), ["fold_bn"], {"x": [2, 3, 16, 16]})
    return out


def main(argv=None) -> int:
    from onnxc.compress import compress
    from onnxc.errors import OnnxcError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="x86,arm,cuda")
    p.add_argument("--models", default="all")
    args = p.parse_args(argv)
    zoo = models()
    names = list(zoo) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in zoo]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(zoo)}")
    print(f"{'model':<16} {'target':<6} {'result':<7} {'seconds':>7}  {'x86 vs ORT max rel':>18}"
          f"  files")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="onnxc-zoo-") as tmp:
        for name in names:
            model, passes, shapes = zoo[name]
            for target in args.targets.split(","):
                out = os.path.join(tmp, f"{name}-{target}")
                start = time.perf_counter()
                try:
                    res = compress(model, passes, target=target, out_dir=out,
                                   input_shapes=shapes, log=lambda m: None)
                    verif = res.report["runtime"].get("verification")
                    err = f"{verif['max_rel']:.2e}" if verif else "-"
                    files = ",".join(f for f in sorted(os.listdir(out))
                                     if f not in ("README.md", "report.json", "model.onnx"))
                    status = "ok"
                except OnnxcError as exc:
                    err, files, status = "-", str(exc)[:100], "FAILED"
                    failures += 1
                print(f"{name:<16} {target:<6} {status:<7} {time.perf_counter() - start:>7.1f}"
                      f"  {err:>18}  {files}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
