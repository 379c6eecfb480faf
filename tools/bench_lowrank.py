"""Benchmark of the ``lowrank`` pass.

1. ResNet-56 (shared, BN already folded): Tucker-2 on its convs at a budget of -50% conv
   MACs (``fold_bn,lowrank --lowrank-method tucker2 --lowrank-layers conv
   --lowrank-flops 0.5``), data-free, ``--lowrank-data-aware``, and data-aware with ranks
   rounded up to multiples of 8 (``--lowrank-multiple 8``, ORT's channel blocks): MACs,
   params, top-1 on test_dev without any training, and the ONNX Runtime latency ratio at
   batch 64.
2. Light-zoo VGG-19, SVD of its three FC layers at energy 0.9 (``--lowrank-layers fc``):
   as shipped by the onnx package (constant 0.02 weights: every FC matrix has rank 1), and
   with seeded random weights (flat spectrum: the share of energy in the top 30% of
   singular values is printed), plain and data-aware. FC params before/after and the
   output error on held-out inputs.

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
    from onnxc.execution import Runner

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


def bench_resnet56(reps: int, multiple: int) -> None:
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
    variants = [("data-free", {}), ("data-aware", {"lowrank_data_aware": True})]
    if multiple > 1:
        # ONNX Runtime's CPU convs work on channel blocks of 8 (NCHWc): ranks that are
        # multiples of 8 avoid partly empty blocks.
        variants.append((f"data-aware, ranks multiples of {multiple}",
                         {"lowrank_data_aware": True, "lowrank_multiple": multiple}))
    for label, extra in variants:
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


def _logits(graph, data):
    """The model's output before a final Softmax (VGG-19 ends with one): tied or saturated
    probabilities would hide the error of the FC layers."""
    from onnxc.passes._activations import collect
    from onnxc.execution import Runner

    out = graph.gs.outputs[0]
    producer = out.inputs[0] if len(out.inputs) else None
    if producer is not None and producer.op == "Softmax":
        name = producer.inputs[0].name
        return [collect(graph, [name], data, batch_size=4)[name]]
    return Runner(graph).run(data.inputs, 4)


def _fc_svd_run(original, held_out, ref, label, options, calib=None):
    """lowrank on the FC layers of ``original``; prints FC params and the output error."""
    from onnxc.pipeline import Context, PassManager, resolve_passes
    from onnxc.verify import compare_outputs

    fc = [n for n in original.nodes if n.op == "Gemm"]
    fc_params = sum(original.node_stats(n).params for n in fc)
    ctx = Context(calibration=calib, log=lambda m: None)
    start = time.perf_counter()
    passes = resolve_passes(["lowrank"], {"lowrank_layers": "fc", **options})
    result = PassManager(passes, verify=False).run(original.copy(), ctx)
    out, reports = result.graph, result.reports
    seconds = time.perf_counter() - start
    rows = reports[-1].extra["lowrank"]["layers"]
    after = fc_params - sum(r["params_before"] - r["params_after"] for r in rows)
    got = _logits(out, held_out)
    cmp = compare_outputs(ref, got)
    # float64: the as-shipped constant weights give logits near 1e35, whose float32
    # squares overflow.
    a64, b64 = np.asarray(ref[0], np.float64), np.asarray(got[0], np.float64)
    rel = float(np.linalg.norm(b64 - a64) / max(np.linalg.norm(a64), 1e-300))
    ranks = ", ".join(f"{r['node']} r={r['ranks'][0]}" for r in rows)
    # All-equal logits (the as-shipped constant weights) make argmax a tie: say so
    # rather than print an agreement that means nothing.
    tied = float(np.ptp(ref[0], axis=1).max()) <= 1e-6 * float(np.abs(ref[0]).max())
    agree = ("argmax undefined (all logits equal in the original)" if tied else
             f"argmax agreement {100 * cmp.top1_agreement:.0f}%")
    scale = float(np.abs(ref[0]).max())
    print(f"  SVD energy 0.9 ({label}): FC params {fc_params:,} -> {after:,} "
          f"({100 * (after / fc_params - 1):+.1f}%) [{ranks}]; logit (pre-softmax) error on "
          f"4 held-out inputs (max |logit| {scale:.3g}): rel {rel:.3e}, max rel "
          f"{cmp.max_rel:.3e}, {agree}; "
          f"{seconds:.0f} s",
          flush=True)
    for r in reports[-1].skipped:
        print(f"    skipped {r['node']}: {r['reason']}")


def _spectrum_line(graph) -> str:
    """Share of Σσ² held by the top 30% of each FC weight's singular values and the rank
    fraction energy 0.9 needs: what decides whether energy 0.9 can cut params by 70%
    (a rank-r split of in × out saves params only below r = in·out/(in+out))."""
    from onnxc.passes import _lowrank_math as lm

    from threadpoolctl import threadpool_limits

    parts = []
    for node in (n for n in graph.nodes if n.op == "Gemm"):
        m = graph.constant(node.inputs[1])
        # Singular values do not depend on the orientation, but fc_spectrum's Gram path
        # forms mᵀm: give it the tall orientation so that Gram is min × min (4096², not
        # VGG's 25088²).
        if m.shape[0] < m.shape[1]:
            m = m.T
        # One BLAS thread, as in the pass: on the busy shared machine a multi-threaded
        # eigh of the 4096 × 4096 Gram ran for over 15 minutes without finishing.
        with threadpool_limits(limits=1):
            s = lm.fc_spectrum(m)[0]
        power = np.cumsum(s ** 2) / np.sum(s ** 2)
        top = power[max(1, int(round(0.3 * len(s)))) - 1]
        r = lm.energy_rank(s, 0.9)
        parts.append(f"{node.name} ({min(m.shape)}x{max(m.shape)}): top 30% of the singular "
                     f"values hold {100 * top:.1f}% of the energy, energy 0.9 needs rank "
                     f"{r}/{len(s)} ({100 * r / len(s):.0f}%)")
    return "; ".join(parts)


def _bench_vgg19_shipped() -> None:
    import onnx

    from conftest import light_model_path

    from onnxc import frontend
    from onnxc.calibrate.readers import random_dataset

    shipped = frontend.load(onnx.load(light_model_path("vgg19")))
    fc = [n for n in shipped.nodes if n.op == "Gemm"]
    print(f"VGG-19 (light zoo as shipped: every weight is the constant 0.02, so each FC "
          f"matrix has rank 1): {shipped.stats(with_bytes=False).params:,} params, "
          f"{len(fc)} FC layers with {sum(shipped.node_stats(n).params for n in fc):,}",
          flush=True)
    held_out = random_dataset(shipped, 4, seed=2)
    ref = _logits(shipped, held_out)
    _fc_svd_run(shipped, held_out, ref, "plain", {"lowrank_energy": 0.9})


def bench_vgg19(samples: int, shipped_too: bool = True) -> None:
    import onnx

    from conftest import light_model_path, randomize_weights

    from onnxc import frontend
    from onnxc.calibrate.readers import random_dataset

    # 1. As shipped by the onnx package: every weight is ConstantOfShape(0.02), so every
    # FC matrix is exactly rank 1 and energy 0.9 (any energy) picks rank 1.
    if shipped_too:
        _bench_vgg19_shipped()

    # 2. The same architecture with seeded i.i.d. Gaussian weights (tests/conftest.py
    # randomize_weights): a flat, Marchenko-Pastur spectrum.
    original = frontend.load(randomize_weights(onnx.load(light_model_path("vgg19"))))
    fc = [n for n in original.nodes if n.op == "Gemm"]
    print(f"VGG-19 (light zoo, seeded random weights): "
          f"{original.stats(with_bytes=False).params:,} params, {len(fc)} FC layers with "
          f"{sum(original.node_stats(n).params for n in fc):,}", flush=True)
    print(f"  spectrum: {_spectrum_line(original)}", flush=True)
    calib = random_dataset(original, samples, seed=1)
    held_out = random_dataset(original, 4, seed=2)
    ref = _logits(original, held_out)
    _fc_svd_run(original, held_out, ref, "plain", {"lowrank_energy": 0.9})
    _fc_svd_run(original, held_out, ref, "data-aware",
                {"lowrank_energy": 0.9, "lowrank_data_aware": True,
                 "lowrank_samples": samples}, calib)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lowrank benchmark")
    ap.add_argument("--part", choices=("resnet56", "vgg19", "vgg19-random", "all"),
                    default="all", help="vgg19-random: only the seeded-random VGG-19")
    ap.add_argument("--reps", type=int, default=10, help="latency repetitions")
    ap.add_argument("--multiple", type=int, default=8,
                    help="also run data-aware Tucker-2 with ranks rounded up to multiples "
                         "of this (1: skip)")
    ap.add_argument("--vgg-samples", type=int, default=16,
                    help="calibration samples for the data-aware VGG-19 fit")
    args = ap.parse_args(argv)
    if args.part in ("resnet56", "all"):
        bench_resnet56(args.reps, args.multiple)
    if args.part in ("vgg19", "vgg19-random", "all"):
        bench_vgg19(args.vgg_samples, shipped_too=args.part != "vgg19-random")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
