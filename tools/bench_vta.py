"""VTA benchmark: prints every figure docs/vta.md reports.

    python tools/bench_vta.py [--shared ../shared] [--samples 509] [--calib 256]
                              [--clock 100] [--skip-prune] [--only SECTION]

1. ResNet-20 ``fold_bn,int8 --pow2-scales --target vta`` with the default VTA
   configuration (BLOCK 16): per-layer cycles, GEMM utilisation, DRAM bytes and latency
   at the stated clock; top-1 on test_dev through the simulator vs fp32 and vs ONNX
   Runtime on the same quantized model, with the share of identical predictions.
2. The same with a LOG_BLOCK 5 configuration (32×32 GEMM core), and with round-half-up
   requantisation (fewer ALU ops, no longer bit-exact with ONNX).
3. ResNet-20 with ``--vta-residual`` (the residual Adds on VTA too): cycles per layer.
4. ResNet-56 pruned (``prune --prune-ratio R``) with and without ``--prune-multiple 16``:
   simulated cycles and channel-padding waste, and their ratio.

Cycles come from onnxc's cycle model (docs/vta.md), not from an FPGA.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255.0


def _compress(model, passes, options, train, calib, out_dir, test=None):
    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.compress import compress

    pre = Preprocess(SCALE, MEAN, STD)
    return compress(str(model), passes, target="vta", out_dir=str(out_dir), options=options,
                    calibration_loader=lambda g: load_npz(str(train), g, pre, samples=calib),
                    evaluation_loader=(lambda g: load_npz(str(test), g, pre)) if test else None,
                    log=lambda m: None)


def layer_table(rep: dict, clock: float) -> str:
    rows = [("#", "layer", "out", "MACs", "cycles", "us", "GEMM util", "GEMM busy",
             "pad waste", "DRAM KiB")]
    for k, r in enumerate(rep["layers"]):
        rows.append((str(k), r["name"].replace("/Conv", "").replace("/", "")[-22:],
                     "x".join(map(str, r["out_shape"][1:])), f"{r['macs']:,}",
                     f"{r['cycles']:,}", f"{r['cycles'] / clock:.1f}",
                     f"{100 * r['gemm_utilization']:.1f}%", f"{100 * r['gemm_busy']:.1f}%",
                     f"{100 * r['padding_waste']:.1f}%", f"{r['dram_bytes'] / 1024:.1f}"))
    t = rep["totals"]
    rows.append(("", "total", "", f"{t['macs']:,}", f"{t['cycles']:,}",
                 f"{t['cycles'] / clock:.1f}", f"{100 * t['gemm_utilization']:.1f}%", "",
                 f"{100 * t['padding_waste']:.1f}%", f"{t['dram_bytes'] / 1024:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def accuracy(out_dir, test, samples):
    """(top-1 sim, top-1 ORT on the quantized model, agreement %, seconds)."""
    from onnxc import frontend
    from onnxc.backends.vta.runtime import load_artifact
    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.execution import Runner

    art = load_artifact(out_dir)
    ds = load_npz(str(test), frontend.load(os.path.join(out_dir, "model.onnx")),
                  Preprocess(SCALE, MEAN, STD), samples=samples)
    t0 = time.perf_counter()
    sim = art.run(ds.inputs)[0].reshape(len(ds.labels), -1).argmax(1)
    secs = time.perf_counter() - t0
    ref = Runner(art.qdq_model()).run(ds.inputs)[0].reshape(len(ds.labels), -1).argmax(1)
    return (100 * float(np.mean(sim == ds.labels)), 100 * float(np.mean(ref == ds.labels)),
            100 * float(np.mean(sim == ref)), secs)


def fp32_top1(model, test, samples):
    from onnxc import frontend
    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.verify import top1

    g = frontend.load(str(model))
    return top1(g, load_npz(str(test), g, Preprocess(SCALE, MEAN, STD), samples=samples))


def section_resnet20(args, tmp, shared):
    model = shared / "models" / "resnet20_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    test = shared / "data" / "cifar10" / "test_dev.npz"
    fp32 = fp32_top1(model, test, args.samples)
    variants = [("BLOCK 16 (default config)", {}),
                ("BLOCK 32 (LOG_BLOCK 5)", {"LOG_BLOCK": 5}),
                ("BLOCK 16, round half up", {"ROUNDING": "up"})]
    for title, cfg in variants:
        cfg_path = tmp / f"cfg{len(cfg)}{title[-3:].strip()}.json"
        cfg_path.write_text(json.dumps(dict(cfg, CLOCK_MHZ=args.clock)))
        out = tmp / f"r20_{abs(hash(title))}"
        t0 = time.perf_counter()
        res = _compress(model, ["fold_bn", "int8"],
                        {"pow2_scales": True, "vta_config": str(cfg_path),
                         "vta_verify_samples": 4}, train, args.calib, out)
        secs = time.perf_counter() - t0
        rep = res.report["vta"]
        print(f"\n## ResNet-20 fold_bn,int8 --pow2-scales --target vta — {title}")
        hosted = ", ".join(p["node"] for p in rep["host_layers"]) or "none"
        print(f"VTA {rep['describe']}; compile {secs:.0f} s; host layers: "
              f"{len(rep['host_layers'])} ({hosted})")
        print(layer_table(rep, args.clock))
        t = rep["totals"]
        print(f"estimated latency {t['latency_ms']:.3f} ms at {args.clock:g} MHz "
              f"(VTA layers only; host ops and host<->VTA layout changes not counted)")
        v = rep["verification"]
        print(f"build check: layer runs bit-exact vs integer reference "
              f"{v['layer_runs_bit_exact']}, max |diff| vs ONNX Runtime "
              f"{v['max_abs_diff_vs_onnxruntime']:g} (default opt.), "
              f"{v['max_abs_diff_vs_onnxruntime_basic']:g} (QDQ as written)")
        if not args.skip_accuracy:
            sim, ort_top1, agree, sim_s = accuracy(out, test, args.samples)
            print(f"top-1 on test_dev ({args.samples} images): fp32 {fp32:.2f}%  "
                  f"VTA simulator {sim:.2f}% (drop {fp32 - sim:.2f} pt)  ONNX Runtime on "
                  f"the same quantized model {ort_top1:.2f}%  prediction agreement "
                  f"{agree:.2f}%  (simulation {sim_s:.0f} s)")


def section_residual(args, tmp, shared):
    model = shared / "models" / "resnet20_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    res = _compress(model, ["fold_bn", "int8"],
                    {"pow2_scales": True, "vta_residual": True, "vta_clock_mhz": args.clock,
                     "vta_verify_samples": 8}, train, args.calib, tmp / "r20_residual")
    rep = res.report["vta"]
    print("\n## ResNet-20 fold_bn,int8 --pow2-scales --target vta --vta-residual "
          "(residual Adds on VTA as identity GEMMs)")
    print(f"VTA {rep['describe']}; host conv/dense/add layers: {len(rep['host_layers'])}")
    print(layer_table(rep, args.clock))
    v = rep["verification"]
    print(f"build check on {v['samples']} calibration images: layer runs bit-exact "
          f"{v['layer_runs_bit_exact']}, max |diff| vs ONNX Runtime "
          f"{v['max_abs_diff_vs_onnxruntime']:g} (default opt.), "
          f"{v['max_abs_diff_vs_onnxruntime_basic']:g} (QDQ as written)")


def section_prune(args, tmp, shared):
    model = shared / "models" / "resnet56_cifar10.onnx"
    train = shared / "data" / "cifar10" / "train.npz"
    print(f"\n## ResNet-56 prune --prune-ratio {args.prune_ratio} + int8 --pow2-scales "
          f"--target vta: channel padding with and without --prune-multiple 16")
    test = shared / "data" / "cifar10" / "test_dev.npz"
    results = {}
    for mult in (1, 16):
        out = tmp / f"r56_m{mult}"
        opts = {"pow2_scales": True, "prune_ratio": args.prune_ratio, "prune_multiple": mult,
                "vta_verify_samples": 4, "vta_clock_mhz": args.clock}
        t0 = time.perf_counter()
        res = _compress(model, ["fold_bn", "prune", "int8"], opts, train, args.calib, out,
                        test=test)
        t = res.report["vta"]["totals"]
        v = res.report["vta"]["verification"]
        results[mult] = t
        print(f"--prune-multiple {mult:>2}: MACs {res.report['final']['macs']:,}  VTA "
              f"cycles {t['cycles']:,} ({t['latency_ms']:.3f} ms)  padded MACs "
              f"{t['padded_macs']:,}  padding waste {100 * t['padding_waste']:.1f}%  GEMM "
              f"utilisation {100 * t['gemm_utilization']:.1f}%  top-1 "
              f"{res.report['accuracy']['final_top1']:.2f}% (no recovery; ONNX Runtime on "
              f"the quantized model, which the simulator matched bit for bit on "
              f"{v['samples']} images: max |diff| {v['max_abs_diff_vs_onnxruntime']:g})  "
              f"({time.perf_counter() - t0:.0f} s)")
    ratio = results[1]["cycles"] / max(results[16]["cycles"], 1)
    print(f"cycles without / with --prune-multiple 16: {ratio:.3f} (VTA pads every channel "
          f"count up to a multiple of 16 anyway; --prune-multiple 16 turns that padding "
          f"into kept channels)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared"))
    p.add_argument("--samples", type=int, default=509, help="test_dev images for top-1")
    p.add_argument("--calib", type=int, default=256, help="calibration images")
    p.add_argument("--clock", type=float, default=100.0, help="VTA clock in MHz")
    p.add_argument("--prune-ratio", type=float, default=0.4)
    p.add_argument("--skip-prune", action="store_true")
    p.add_argument("--only", choices=("resnet20", "residual", "prune"), default=None,
                   help="run one section")
    p.add_argument("--skip-accuracy", action="store_true")
    args = p.parse_args(argv)
    shared = pathlib.Path(args.shared)
    if not (shared / "models" / "resnet20_cifar10.onnx").is_file():
        print(f"needs the shared models and data in {shared}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_vta_") as tmp:
        tmp = pathlib.Path(tmp)
        if args.only in (None, "resnet20"):
            section_resnet20(args, tmp, shared)
        if args.only in (None, "residual"):
            section_residual(args, tmp, shared)
        if args.only == "prune" or (args.only is None and not args.skip_prune):
            section_prune(args, tmp, shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
