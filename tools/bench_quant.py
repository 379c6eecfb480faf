"""Quantization benchmark: prints every figure docs/quantization.md reports.

    python tools/bench_quant.py [--shared ../shared] [--reps 10] [--skip-lowbit]
                                [--part all|accuracy|latency]

1. ResNet-56 ``fold_bn,int8`` calibrated on 512 train images, per calibrator: top-1 on
   test_dev vs fp32, size Cr, pass wall time (statistics + calibration + rewrite); then,
   in the same run, ``onnxruntime.quantization.quantize_static`` on the same 512 images
   (its wall time and top-1), and ORT latency fp32 / int8 at batch 64, interleaved
   (fp32, ours, ORT's, fp32, ...) after warm-up, median of ``--reps``.
2. ResNet-20 / ResNet-56 ``ternary`` and ``binary``: top-1 without recovery and the packed
   storage Cr of the quantized layers.
3. ``int8 --pow2-scales`` top-1 on ResNet-56.
4. Bad calibration data: the one-line message for each case, produced before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255.0


def _preprocess():
    from onnxc.calibrate.readers import Preprocess

    return Preprocess(SCALE, MEAN, STD)


def _compress(model, passes, options, train, test, calib_samples=512):
    from onnxc.calibrate.readers import load_npz
    from onnxc.compress import compress

    pre = _preprocess()
    with tempfile.TemporaryDirectory() as tmp:
        res = compress(str(model), passes, out_dir=os.path.join(tmp, "out"),
                       options=options, log=lambda m: None,
                       calibration_loader=lambda g: load_npz(str(train), g, pre,
                                                             samples=calib_samples),
                       evaluation_loader=lambda g: load_npz(str(test), g, pre))
    return res


def _session(model_bytes: bytes, threads: int = 2):
    from onnxc.execution import session

    # sessions are timed interleaved: idle ones must not spin through the others' turns
    return session(model_bytes, threads=threads, spinning=False)


def _logits(sess, x) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0]
                           for i in range(0, len(x), 64)])


def _top1(sess, x, y) -> float:
    return 100.0 * float(np.mean(_logits(sess, x).argmax(1) == y))


def _latency(sessions: dict, x: np.ndarray, reps: int, stat=np.median) -> dict:
    """Seconds per run (``stat`` over reps), measured interleaved so load changes hit
    all models alike."""
    times = {k: [] for k in sessions}
    for sess in sessions.values():                       # warm-up
        for _ in range(2):
            sess.run(None, {sess.get_inputs()[0].name: x})
    for _ in range(reps):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {sess.get_inputs()[0].name: x})
            times[k].append(time.perf_counter() - t)
    return {k: (float(np.median(v)), float(np.min(v))) for k, v in times.items()}


def _ort_quantize_static(model_bytes: bytes, calib: np.ndarray, input_name: str,
                         reduce_range: bool) -> tuple[bytes, float]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        import logging

        logging.getLogger().setLevel(logging.ERROR)   # ORT's "consider pre-processing" hint
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            # The settings that make ORT fast and accurate on this CPU: uint8 activations
            # (QLinear kernels), per-channel int8 weights, reduced range without VNNI.
            quantize_static(src, dst, Reader(), per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        seconds = time.perf_counter() - start
        with open(dst, "rb") as f:
            return f.read(), seconds


def int8_section(shared, reps, accuracy=True, latency=True):
    from onnxc.calibrate.qdq import has_vnni

    r56 = shared / "models" / "resnet56_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    test = shared / "data" / "cifar10" / "test_dev.npz"
    pre = _preprocess()
    x_test = pre.apply(np.load(test)["images"])
    y_test = np.load(test)["labels"].astype(np.int64)
    calib = pre.apply(np.load(train)["images"][:512])

    print("== 1. ResNet-56 fold_bn,int8 — 512 calibration images (train.npz), "
          f"top-1 on {len(y_test)} test_dev images")
    print(f"{'calibrator':<12}{'fp32 top-1':>11}{'int8 top-1':>11}{'drop':>7}"
          f"{'argmax = fp32':>15}{'size Cr':>9}{'pass s':>8}")
    from onnxc import frontend

    fp32_model = frontend.load(str(r56)).to_onnx().SerializeToString()
    fp32_pred = _logits(_session(fp32_model), x_test).argmax(1)
    results = {}
    from onnxc.calibrate.calibrators import CALIBRATORS

    runs = [(m, {"int8_calibrator": m}) for m in (list(CALIBRATORS) if accuracy
                                                  else ["minmax"])]
    if accuracy:    # reference row: what bias correction (on by default) buys
        runs.append(("minmax, no bias corr.", {"int8_calibrator": "minmax",
                                               "int8_bias_correction": "off"}))
    for label, options in runs:
        res = _compress(r56, ["fold_bn", "int8"], options, train, test)
        rep = res.report
        p = next(p for p in rep["passes"] if p["name"] == "int8")
        acc = rep["accuracy"]
        results[label] = res
        pred = _logits(_session(res.graph.to_onnx().SerializeToString()), x_test).argmax(1)
        print(f"{label:<12}{acc['original_top1']:>10.2f}%{acc['final_top1']:>10.2f}%"
              f"{acc['drop']:>7.2f}{100 * np.mean(pred == fp32_pred):>14.2f}%"
              f"{rep['compression_ratio']:>8.2f}x{p['seconds']:>8.1f}")
    print(f"(one test image = {100 / len(y_test):.3f} pt; 'size Cr' is report.json "
          "compression_ratio: serialized canonical input model / serialized model.onnx)")

    ours = results["minmax"].graph.to_onnx().SerializeToString()
    ort_model, ort_seconds = _ort_quantize_static(fp32_model, calib, "input",
                                                  reduce_range=not has_vnni())
    ours_seconds = next(p["seconds"] for p in results["minmax"].report["passes"]
                        if p["name"] == "int8")
    s_fp32, s_ours, s_ort = _session(fp32_model), _session(ours), _session(ort_model)
    print(f"onnxruntime quantize_static (minmax, same 512 images): top-1 "
          f"{_top1(s_ort, x_test, y_test):.2f}%, size Cr "
          f"{len(fp32_model) / len(ort_model):.2f}x, wall {ort_seconds:.1f} s")
    print(f"calibration + quantization wall time: onnxc int8 (minmax) {ours_seconds:.1f} s "
          f"vs quantize_static {ort_seconds:.1f} s "
          f"({'faster' if ours_seconds <= ort_seconds else 'SLOWER'}, "
          f"ratio {ort_seconds / ours_seconds:.2f}x)")
    size_section(r56, fp32_model, ours, ort_model)
    agree = np.mean(fp32_pred == _logits(s_ort, x_test).argmax(1))
    print(f"argmax agreement fp32 vs quantize_static int8 on test_dev: {100 * agree:.2f}%")
    fused_section({"onnxc int8": ours, "quantize_static": ort_model})
    if not latency:
        return
    print(f"(load average before the latency runs: {os.getloadavg()[0]:.1f})")
    for bs in (1, 64):
        x = x_test[:bs]
        n = reps if bs == 64 else 20 * reps
        lat = _latency({"fp32": s_fp32, "onnxc": s_ours, "ort": s_ort}, x, n)
        med = {k: v[0] for k, v in lat.items()}
        best = {k: v[1] for k, v in lat.items()}
        print(f"ORT latency bs {bs:>2} (2 threads, {n} interleaved reps): median fp32 "
              f"{1e3 * med['fp32']:.1f} ms, onnxc int8 {1e3 * med['onnxc']:.1f} ms, "
              f"quantize_static {1e3 * med['ort']:.1f} ms -> speed-up fp32/int8 onnxc "
              f"{med['fp32'] / med['onnxc']:.2f}x, ORT {med['fp32'] / med['ort']:.2f}x"
              + (f"; best-of-{n}: onnxc {best['fp32'] / best['onnxc']:.2f}x, "
                 f"ORT {best['fp32'] / best['ort']:.2f}x" if bs > 1 else ""))
    print(f"(machine load average during the run: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores)")


def _size_parts(model_bytes: bytes) -> dict:
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model_bytes)
    parts = {"int8 weight codes": 0, "float32 scales": 0, "int32 biases": 0,
             "float32 weights/biases": 0, "other constants": 0}
    for i in m.graph.initializer:
        a = numpy_helper.to_array(i)
        if a.dtype == np.int8 and a.ndim > 1:
            key = "int8 weight codes"
        elif a.dtype == np.int32:
            key = "int32 biases"
        elif a.dtype == np.float32:      # onnxc names every scale <base>_s
            key = "float32 scales" if i.name.endswith("_s") else "float32 weights/biases"
        else:
            key = "other constants"
        parts[key] += a.nbytes
    payload = sum(parts.values())
    parts["names + structure (nodes, initializer headers, value_info)"] = \
        len(model_bytes) - payload
    return parts


def size_section(model_path, fp32_model: bytes, ours: bytes, ort_model: bytes) -> None:
    """Where the int8 file's bytes go, and how the size Cr is measured."""
    disk = os.path.getsize(model_path)
    print(f"size: input file {disk:,} B on disk, canonical fp32 model {len(fp32_model):,} B "
          f"(what report.json compares); onnxc int8 model.onnx {len(ours):,} B -> "
          f"Cr {len(fp32_model) / len(ours):.2f}x (vs file on disk {disk / len(ours):.2f}x); "
          f"quantize_static {len(ort_model):,} B -> Cr {len(fp32_model) / len(ort_model):.2f}x")
    p32, p8 = _size_parts(fp32_model), _size_parts(ours)
    for k in p8:
        print(f"    {k:<62}{p32[k]:>11,} B -> {p8[k]:>9,} B")
    codes = p8["int8 weight codes"]
    print(f"    ceiling: int8 codes alone give {len(fp32_model) / codes:.2f}x; codes + the "
          f"scales and int32 biases QLinearConv needs give "
          f"{len(fp32_model) / (codes + p8['float32 scales'] + p8['int32 biases']):.2f}x "
          f"with zero graph structure (the fp32 graph's own structure is "
          f"{p32['names + structure (nodes, initializer headers, value_info)']:,} B)")


def fused_section(models: dict) -> None:
    """What ONNX Runtime actually executes: op counts of its optimized graph."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        for name, mb in models.items():
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
            ort.InferenceSession(mb, opts, providers=["CPUExecutionProvider"])
            ops = collections.Counter(n.op_type for n in
                                      onnx.load(os.path.join(tmp, "opt.onnx")).graph.node)
            print(f"ORT-optimized graph, {name:<16}: {sum(ops.values())} nodes: "
                  + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


def lowbit_section(shared):
    train = shared / "data" / "cifar10" / "train.npz"
    test = shared / "data" / "cifar10" / "test_dev.npz"
    print("\n== 2. ternary / binary weights, no recovery (first & last layer float)")
    print(f"{'model':<11}{'pass':<9}{'fp32 top-1':>11}{'top-1':>9}{'layers':>8}"
          f"{'packed Cr (quantized layers)':>30}{'storage Cr (model)':>20}")
    for model in ("resnet20", "resnet56"):
        path = shared / "models" / f"{model}_cifar10.onnx"
        for name in ("ternary", "binary"):
            rep = _compress(path, [name], {}, train, test).report
            p = next(p for p in rep["passes"] if p["name"] == name)
            acc = rep["accuracy"]
            print(f"{model:<11}{name:<9}{acc['original_top1']:>10.2f}%"
                  f"{acc['final_top1']:>8.2f}%{len(p['extra']['layers']):>8}"
                  f"{p['extra']['quantized_layers_cr']:>29.2f}x"
                  f"{rep['storage_compression_ratio']:>19.2f}x")


def pow2_section(shared):
    r56 = shared / "models" / "resnet56_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    test = shared / "data" / "cifar10" / "test_dev.npz"
    print("\n== 3. ResNet-56 int8 --pow2-scales (int8 zero-point-0 activations, shift requant)")
    for method in ("minmax", "percentile"):
        rep = _compress(r56, ["fold_bn", "int8"], {"int8_pow2_scales": True, "int8_calibrator": method},
                        train, test).report
        acc = rep["accuracy"]
        shifts = next(p for p in rep["passes"] if p["name"] == "int8")["extra"]["shifts"]
        ks = sorted({k for v in shifts.values() for k in v})
        print(f"{method:<11} top-1 {acc['original_top1']:.2f}% -> {acc['final_top1']:.2f}% "
              f"(drop {acc['drop']:.2f} pt); requant shifts used: {ks}")


def mixed_section(shared):
    r20 = shared / "models" / "resnet20_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    test = shared / "data" / "cifar10" / "test_dev.npz"
    print("\n== 5. mixed precision: ResNet-20 ternary --max-drop 2 (sensitive layers -> int8)")
    rep = _compress(r20, ["ternary"], {"max_drop": 2.0}, train, test, calib_samples=128).report
    extra = rep["passes"][-1]["extra"]
    mp = extra["mixed_precision"]
    print(f"top-1 {mp['reference_top1']:.2f}% -> {mp['final_top1']:.2f}% "
          f"({mp['samples']} {mp['data']} samples); {len(mp['fallback'])} of "
          f"{len(extra['sensitivity'])} layers fell back to int8; storage Cr "
          f"{rep['storage_compression_ratio']:.2f}x")
    top = list(extra["sensitivity"].items())[:3]
    print("most sensitive: " + ", ".join(f"{n} ({e:.3f})" for n, e in top))


def bad_input_section(shared):
    sys.path.insert(0, str(REPO / "tests"))
    from onnxc.cli import main

    r20 = shared / "models" / "resnet20_cifar10.onnx"
    print("\n== 4. bad calibration data -> one-line error before any work")
    with tempfile.TemporaryDirectory() as tmp:
        good = np.load(shared / "data" / "cifar10" / "train.npz")["images"][:16]
        cases = {
            "wrong shape": np.zeros((16, 3, 28, 28), np.uint8),
            "wrong dtype": np.array([["a"] * 4] * 16),
            "empty file": None,
            "fewer samples than asked": good,
            "NaN in data": np.where(np.arange(good.size).reshape(good.shape) == 5, np.nan,
                                    good.astype(np.float32)),
        }
        for what, arr in cases.items():
            path = os.path.join(tmp, what.replace(" ", "_") + ".npz")
            if arr is None:
                open(path, "wb").close()
            else:
                np.savez(path, images=arr)
            argv = ["compress", str(r20), "--passes", "int8", "-o", os.path.join(tmp, "o"),
                    "--calib-data", path, "--scale", str(SCALE), "--quiet"]
            if what == "fewer samples than asked":
                argv += ["--calib-samples", "64"]
            err = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            line = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            wrote = os.path.exists(os.path.join(tmp, "o"))
            print(f"{what:<26} exit {code} after {time.perf_counter() - start:.1f} s "
                  f"(CLI start-up + model load; no pass ran, artifact written: "
                  f"{'yes' if wrote else 'no'}): {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-lowbit", action="store_true")
    ap.add_argument("--part", choices=("all", "accuracy", "latency"), default="all",
                    help="accuracy: everything but the latency runs (can run at low priority "
                         "next to other jobs); latency: only ResNet-56 minmax int8, "
                         "quantize_static and the latency runs (run it on a quiet machine)")
    args = ap.parse_args(argv)
    shared = pathlib.Path(args.shared)
    if not (shared / "models" / "resnet56_cifar10.onnx").exists():
        print(f"error: shared models not found under {shared}", file=sys.stderr)
        return 2
    int8_section(shared, args.reps, accuracy=args.part != "latency",
                 latency=args.part != "accuracy")
    if args.part == "latency":
        return 0
    if not args.skip_lowbit:
        lowbit_section(shared)
    pow2_section(shared)
    bad_input_section(shared)
    mixed_section(shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
