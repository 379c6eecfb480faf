"""Benchmark of the ``gap`` pass.

1. The trained FC-head model (tests/models/vgg_fc_cifar10.onnx, made by
   tools/train_fc_model.py): head params before/after and top-1 on test_dev before/after
   with no training, for the data-free fit, the least-squares fit on the first 512 images
   of train.npz (the pass's default sample count), and on all train images plus their
   horizontal flips: hidden layer kept or collapsed as ``--gap-form auto`` chooses on the
   held-out 20% of the calibration set (both forms printed), and with ``--gap-fit kl``;
   plus the logit error on the calibration set and on test_dev. Then the same with
   ``--gap-grid 2`` (a 2x2 grid of regional averages instead of GAP; not GAP).
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


def _with_flips(data):
    """The calibration images interleaved with their horizontal mirrors:
    (image, mirror) pairs, so the pass's held-out tail (an even count) never separates a
    pair."""
    from onnxc.calibrate.readers import Dataset

    inputs = {}
    for name, x in data.inputs.items():
        pairs = np.stack([x, x[..., ::-1]], axis=1)               # N × 2 × C × H × W
        inputs[name] = np.ascontiguousarray(pairs.reshape((-1,) + x.shape[1:]))
    return Dataset(inputs, None, data.source + " + horizontal flips")


def bench_fc_model(model_path: pathlib.Path = FC_MODEL, fits: str = "all") -> None:
    from conftest import cifar_preprocess

    from onnxc import frontend
    from onnxc.calibrate.readers import load_npz
    from onnxc.compress import compress
    from onnxc.execution import Runner
    from onnxc.verify import compare_outputs, top1

    original = frontend.load(str(model_path))
    test = load_npz(str(SHARED / "data" / "cifar10" / "test_dev.npz"), original,
                    cifar_preprocess())
    train = load_npz(str(SHARED / "data" / "cifar10" / "train.npz"), original,
                     cifar_preprocess())
    small = train.take(512)
    full = _with_flips(train)
    base = top1(original, test)
    ref = Runner(original).run(test.inputs)
    print(f"FC-head model {model_path.name}: {original.stats(with_bytes=False).params:,} params, "
          f"top-1 {base:.2f}% on test_dev ({len(test)} images)")
    n_full = f"{len(train)} train images + flips"
    runs = (
            ("data-free fit", {}, None),
            ("least-squares, 512 train images", {}, small),
            (f"least-squares, {n_full}, --gap-form auto",
             {"gap_form": "auto"}, full),
            (f"least-squares, {n_full}, --gap-form hidden", {"gap_form": "hidden"}, full),
            (f"least-squares, {n_full}, --gap-form collapse", {"gap_form": "collapse"},
             full),
            (f"least-squares + KL, {n_full}, --gap-form auto --gap-fit kl",
             {"gap_form": "auto", "gap_fit": "kl"}, full),
            # Not GAP: a 2x2 grid of regional averages (C*4 features) keeps the coarse
            # positions one global average loses.
            ("least-squares, 512 train images, --gap-grid 2 --gap-form collapse",
             {"gap_grid": 2, "gap_form": "collapse"}, small),
            (f"least-squares, {n_full}, --gap-grid 2 --gap-form collapse",
             {"gap_grid": 2, "gap_form": "collapse"}, full),
            (f"least-squares + KL, {n_full}, --gap-grid 2 --gap-form collapse --gap-fit kl",
             {"gap_grid": 2, "gap_form": "collapse", "gap_fit": "kl"}, full),
            (f"least-squares, {n_full}, --gap-grid 2 --gap-form auto",
             {"gap_grid": 2, "gap_form": "auto"}, full))
    if fits == "auto":      # a quick look: the data-free fit and the chosen data fit
        runs = [r for r in runs if r[2] is None or r[1] == {"gap_form": "auto"}]
    for label, options, data in runs:
        options = {**options, "gap_samples": len(data) if data is not None else 512}
        start = time.perf_counter()
        result = compress(str(model_path), ["gap"], options=options, calibration=data,
                          log=lambda m: None)
        seconds = time.perf_counter() - start
        row = next(p for p in result.report["passes"] if p["name"] == "gap")["extra"]["gap"][0]
        acc = top1(result.graph, test)
        out = Runner(result.graph).run(test.inputs)
        cmp = compare_outputs(ref, out)
        rel = float(np.linalg.norm(out[0] - ref[0]) / np.linalg.norm(ref[0]))
        before, after = row["head_params_before"], row["head_params_after"]
        calib_err = (f"calibration logit rel. error {row['logit_rel_error']:.3f}, "
                     if "logit_rel_error" in row else "")
        print(f"  {label}: head params {before:,} -> {after:,} "
              f"({100 * (after / before - 1):+.1f}%), FC layers {row['fc_layers_before']} -> "
              f"{row['fc_layers_after']}; top-1 {base:.2f}% -> {acc:.2f}% "
              f"({acc - base:+.2f} pt, no training)")
        if "held_out" in row:
            best = {}
            for t in row["held_out"]:
                key = t["form"] + (" ReLU-aware" if t["relu_fit"] else "")
                if key not in best or t["held_out_logit_rel_error"] < \
                        best[key]["held_out_logit_rel_error"]:
                    best[key] = t
            chosen = row["form"] + (" ReLU-aware" if row["relu_fit"] else "")
            print(f"    held-out {row['held_out_samples']} of {row['calibration_samples']} "
                  f"calibration samples, logit rel. error: " + ", ".join(
                      f"{k} {t['held_out_logit_rel_error']:.3f} (ridge {t['ridge']:g})"
                      for k, t in best.items())
                  + f" -> {chosen}, ridge {row['ridge']:g}")
        print(f"    {calib_err}test_dev logit rel. error {rel:.3f} (max rel "
              f"{cmp.max_rel:.3f}), argmax agreement {100 * cmp.top1_agreement:.1f}%; "
              f"{seconds:.1f} s", flush=True)


def bench_zoo(randomize: bool) -> None:
    import onnx

    from conftest import light_model_path, randomize_weights

    from onnxc import frontend
    from onnxc.pipeline import Context, PassManager, resolve_passes
    from onnxc.execution import Runner

    for name in ("vgg19", "bvlc_alexnet", "zfnet512"):
        start = time.perf_counter()
        model = onnx.load(light_model_path(name))
        if randomize:
            model = randomize_weights(model)
        graph = frontend.load(model)
        result = PassManager(resolve_passes(["gap"]), verify=False).run(
            graph, Context(log=lambda m: None))
        out, reports = result.graph, result.reports
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
    ap = argparse.ArgumentParser(description="gap benchmark")
    ap.add_argument("--part", choices=("fc", "zoo", "all"), default="all")
    ap.add_argument("--model", type=pathlib.Path, default=FC_MODEL,
                    help="FC-head model for --part fc (default: the committed one)")
    ap.add_argument("--fits", choices=("all", "auto"), default="all",
                    help="auto: only the data-free fit and --gap-form auto on all images")
    ap.add_argument("--randomize", action="store_true",
                    help="give the zoo models seeded random weights first (slower)")
    args = ap.parse_args(argv)
    if args.part in ("fc", "all"):
        bench_fc_model(args.model, args.fits)
    if args.part in ("zoo", "all"):
        print("light zoo (data-free gap):")
        bench_zoo(args.randomize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
