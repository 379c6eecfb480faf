"""Benchmark of the ``gap`` pass (issue 4).

1. The trained FC-head model (tests/models/vgg_fc_cifar10.onnx, made by
   tools/train_fc_model.py): head params before/after and top-1 on test_dev before/after
   with no training, for the data-free fit, the least-squares fit (calibration: the first
   512 images of train.npz), with ``--gap-collapse`` and with ``--gap-fit kl``; plus the
   logit error on the calibration set and on test_dev.
2. Light-zoo VGG-19, AlexNet and ZFNet: ``gap`` (data-free) gives a graph that passes the
   ONNX checker and runs in ONNX Runtime; head params before/after.

    nice python tools/bench_gap.py [--part fc|zoo|all] [--randomize]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
FC_MODEL = REPO / "tests" / "models" / "vgg_fc_cifar10.onnx"
sys.path.insert(0, str(REPO / "tests"))


def bench_fc_model() -> None:
    from conftest import cifar_preprocess

    from onnxc import frontend
    from onnxc.calibrate.readers import load_npz
    from onnxc.compress import compress
    from onnxc.verify import Runner, compare_outputs, top1

    original = frontend.load(str(FC_MODEL))
    test = load_npz(str(SHARED / "data" / "cifar10" / "test_dev.npz"), original,
                    cifar_preprocess())
    calib = load_npz(str(SHARED / "data" / "cifar10" / "train.npz"), original,
                     cifar_preprocess(), samples=512)
    base = top1(original, test)
    ref = Runner(original).run(test.inputs)
    print(f"FC-head model {FC_MODEL.name}: {original.stats(with_bytes=False).params:,} params, "
          f"top-1 {base:.2f}% on test_dev ({len(test)} images)")
    for label, options, data in (
            ("data-free fit", {}, None),
            ("least-squares fit", {}, calib),
            ("least-squares, --gap-collapse", {"gap_collapse": True}, calib),
            ("least-squares + KL (--gap-fit kl)", {"gap_fit": "kl"}, calib),
            ("--gap-collapse --gap-fit kl", {"gap_collapse": True, "gap_fit": "kl"}, calib)):
        start = time.perf_counter()
        result = compress(str(FC_MODEL), ["gap"], options=options, calibration=data,
                          log=lambda m: None)
        seconds = time.perf_counter() - start
        row = next(p for p in result.report["passes"] if p["name"] == "gap")["extra"]["gap"][0]
        acc = top1(result.graph, test)
        cmp = compare_outputs(ref, Runner(result.graph).run(test.inputs))
        rel = float(np.linalg.norm(Runner(result.graph).run(test.inputs)[0] - ref[0])
                    / np.linalg.norm(ref[0]))
        before, after = row["head_params_before"], row["head_params_after"]
        calib_err = (f"calibration logit rel. error {row['logit_rel_error']:.3f}, "
                     if "logit_rel_error" in row else "")
        print(f"  {label}: head params {before:,} -> {after:,} "
              f"({100 * (after / before - 1):+.1f}%), FC layers {row['fc_layers_before']} -> "
              f"{row['fc_layers_after']}; top-1 {base:.2f}% -> {acc:.2f}% "
              f"({acc - base:+.2f} pt, no training)")
        print(f"    {calib_err}test_dev logit rel. error {rel:.3f} (max rel "
              f"{cmp.max_rel:.3f}), argmax agreement {100 * cmp.top1_agreement:.1f}%; "
              f"{seconds:.1f} s")


def bench_zoo(randomize: bool) -> None:
    import onnx

    from conftest import light_model_path, randomize_weights

    from onnxc import frontend
    from onnxc.pipeline import Context, PassManager, resolve_passes
    from onnxc.verify import Runner

    for name in ("vgg19", "bvlc_alexnet", "zfnet512"):
        start = time.perf_counter()
        model = onnx.load(light_model_path(name))
        if randomize:
            model = randomize_weights(model)
        graph = frontend.load(model)
        out, reports = PassManager(resolve_passes(["gap"]), verify=False).run(
            graph, Context({}, log=lambda m: None))
        proto = out.to_onnx()
        onnx.checker.check_model(proto)
        x = np.random.default_rng(0).standard_normal(
            [1] + list(graph.gs.inputs[0].shape[1:])).astype(np.float32)
        y = Runner(proto).run({graph.gs.inputs[0].name: x})[0]
        row = reports[-1].extra["gap"][0]
        print(f"  light {name}: {row['channels']}x{row['positions']} map -> GAP; head params "
              f"{row['head_params_before']:,} -> {row['head_params_after']:,} "
              f"({100 * (row['head_params_after'] / row['head_params_before'] - 1):+.1f}%); "
              f"model params {reports[-1].before['params']:,} -> "
              f"{reports[-1].after['params']:,}; passes the ONNX checker, runs in ONNX "
              f"Runtime: output {tuple(y.shape)}, finite={bool(np.all(np.isfinite(y)))}; "
              f"{time.perf_counter() - start:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="gap benchmark (issue 4)")
    ap.add_argument("--part", choices=("fc", "zoo", "all"), default="all")
    ap.add_argument("--randomize", action="store_true",
                    help="give the zoo models seeded random weights first (slower)")
    args = ap.parse_args(argv)
    if args.part in ("fc", "all"):
        bench_fc_model()
    if args.part in ("zoo", "all"):
        print("light zoo (data-free gap):")
        bench_zoo(args.randomize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
