"""Benchmark of the ``lowrank`` pass (issue 4).

1. ResNet-56 (shared, BN already folded): Tucker-2 on its convs at a budget of -50% conv
   MACs (``fold_bn,lowrank --lowrank-method tucker2 --lowrank-layers conv
   --lowrank-flops 0.5``), data-free and ``--lowrank-data-aware``: MACs, params, top-1 on
   test_dev without any training, and the ONNX Runtime latency ratio at batch 64.
2. Light-zoo VGG-19 with seeded random weights: SVD of its three FC layers at energy 0.9
   (``--lowrank-layers fc``), plain and data-aware: FC params before/after and the output
   error on held-out inputs.

Latencies are measured in the same run, interleaving the two models (warm-up first,
median of the repetitions) so machine load hits both alike.

    nice python tools/bench_lowrank.py [--part resnet56|vgg19|all] [--reps 10]
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
sys.path.insert(0, str(REPO / "tests"))


def latency_ratio(a, b, feeds: dict, warmup: int = 3, reps: int = 10):
    """Median seconds per batch of a and b, measured alternately, and a/b."""
    from onnxc.verify import Runner

    ra, rb = Runner(a), Runner(b)
    for _ in range(warmup):
        ra.session.run(None, feeds)
        rb.session.run(None, feeds)
    ta, tb = [], []
    for _ in range(reps):
        for runner, times in ((ra, ta), (rb, tb)):
            start = time.perf_counter()
            runner.session.run(None, feeds)
            times.append(time.perf_counter() - start)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ta) / np.median(tb))


def conv_macs(graph) -> int:
    return sum(s.macs for s in graph.stats(with_bytes=False).per_node if s.op == "Conv")


def bench_resnet56(reps: int) -> None:
    from conftest import cifar_preprocess

    from onnxc import frontend
    from onnxc.calibrate.readers import load_npz
    from onnxc.compress import compress
    from onnxc.verify import top1

    path = SHARED / "models" / "resnet56_cifar10.onnx"
    original = frontend.load(str(path))
    test = load_npz(str(SHARED / "data" / "cifar10" / "test_dev.npz"), original,
                    cifar_preprocess())
    calib = load_npz(str(SHARED / "data" / "cifar10" / "train.npz"), original,
                     cifar_preprocess(), samples=256)
    base = original.stats(with_bytes=False)
    base_top1 = top1(original, test)
    print(f"ResNet-56: {base.macs / 1e6:.1f} M MACs ({conv_macs(original) / 1e6:.1f} M in "
          f"convs), {base.params:,} params, top-1 {base_top1:.2f}% on test_dev "
          f"({len(test)} images)")
    opts = {"lowrank_method": "tucker2", "lowrank_layers": "conv", "lowrank_flops": 0.5}
    feeds = {"input": test.inputs["input"][:64]}
    for label, extra in (("data-free", {}), ("data-aware", {"lowrank_data_aware": True})):
        start = time.perf_counter()
        result = compress(str(path), ["fold_bn", "lowrank"], options={**opts, **extra},
                          calibration=calib if extra else None, log=lambda m: None)
        seconds = time.perf_counter() - start
        g = result.graph
        st = g.stats(with_bytes=False)
        acc = top1(g, test)
        lr = next(p for p in result.report["passes"] if p["name"] == "lowrank")
        t_a, t_b, ratio = latency_ratio(original.to_onnx(), g.to_onnx(), feeds, reps=reps)
        print(f"  Tucker-2 -50% conv MACs ({label}): split {lr['changed']} convs, conv MACs "
              f"{conv_macs(original) / 1e6:.1f} M -> {conv_macs(g) / 1e6:.1f} M "
              f"({100 * (conv_macs(g) / conv_macs(original) - 1):+.1f}%), model MACs "
              f"{base.macs / 1e6:.1f} M -> {st.macs / 1e6:.1f} M, params {base.params:,} -> "
              f"{st.params:,} ({100 * (st.params / base.params - 1):+.1f}%)")
        print(f"    top-1 {base_top1:.2f}% -> {acc:.2f}% (no training); ORT bs64 latency "
              f"{1e3 * t_a:.1f} ms -> {1e3 * t_b:.1f} ms (speed-up x{ratio:.2f}, median of "
              f"{reps}); pass+verify {seconds:.0f} s")


def bench_vgg19(samples: int) -> None:
    import onnx

    from conftest import light_model_path, randomize_weights

    from onnxc import frontend
    from onnxc.calibrate.readers import random_dataset
    from onnxc.pipeline import Context, PassManager, resolve_passes
    from onnxc.verify import Runner, compare_outputs

    original = frontend.load(randomize_weights(onnx.load(light_model_path("vgg19"))))
    fc = [n for n in original.nodes if n.op == "Gemm"]
    fc_params = sum(original.node_stats(n).params for n in fc)
    print(f"VGG-19 (light zoo, random weights): {original.stats(with_bytes=False).params:,} "
          f"params, {len(fc)} FC layers with {fc_params:,}", flush=True)
    calib = random_dataset(original, samples, seed=1)
    held_out = random_dataset(original, 4, seed=2)
    ref = Runner(original).run(held_out.inputs, 4)
    for label, extra in (("plain", {}), ("data-aware", {"lowrank_data_aware": True})):
        ctx = Context({"lowrank_layers": "fc", "lowrank_energy": 0.9,
                       "lowrank_samples": samples, **extra},
                      calibration=calib if extra else None, log=lambda m: None)
        start = time.perf_counter()
        out, reports = PassManager(resolve_passes(["lowrank"]), verify=False).run(
            original.copy(), ctx)
        seconds = time.perf_counter() - start
        rows = reports[-1].extra["lowrank"]["layers"]
        after = fc_params - sum(r["params_before"] - r["params_after"] for r in rows)
        cmp = compare_outputs(ref, Runner(out).run(held_out.inputs, 4))
        ranks = ", ".join(f"{r['node']} r={r['ranks'][0]}" for r in rows)
        print(f"  SVD energy 0.9 ({label}): FC params {fc_params:,} -> {after:,} "
              f"({100 * (after / fc_params - 1):+.1f}%) [{ranks}]; output error on 4 held-out "
              f"inputs: max rel {cmp.max_rel:.3e}, argmax agreement "
              f"{100 * cmp.top1_agreement:.0f}%; {seconds:.0f} s", flush=True)
        for r in reports[-1].skipped:
            print(f"    skipped {r['node']}: {r['reason']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lowrank benchmark (issue 4)")
    ap.add_argument("--part", choices=("resnet56", "vgg19", "all"), default="all")
    ap.add_argument("--reps", type=int, default=10, help="latency repetitions")
    ap.add_argument("--vgg-samples", type=int, default=16,
                    help="calibration samples for the data-aware VGG-19 fit")
    args = ap.parse_args(argv)
    if args.part in ("resnet56", "all"):
        bench_resnet56(args.reps)
    if args.part in ("vgg19", "all"):
        bench_vgg19(args.vgg_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
