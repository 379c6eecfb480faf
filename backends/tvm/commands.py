"""``onnxc run ARTIFACT --input x.npy [--output y.npy]`` and ``onnxc bench ARTIFACT``."""

from __future__ import annotations

import json

from onnxc.commands import register_command


def _configure_run(sub) -> None:
    p = sub.add_parser("run", help="run an artifact (TVM x86/CUDA library or onnx model)")
    p.add_argument("artifact", help="artifact directory written by onnxc compress -o")
    p.add_argument("--input", action="append", required=True, metavar="[NAME=]FILE.npy",
                   help="input array (.npy; NAME= for multi-input models; .npz by name)")
    p.add_argument("--output", help="save the first output (.npy) or all outputs (.npz)")


def _configure_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency of an artifact (warm-up, then repetitions)")
    p.add_argument("artifact", help="artifact directory written by onnxc compress -o")
    p.add_argument("--input", action="append", metavar="[NAME=]FILE.npy",
                   help="input arrays (default: seeded random data of the compiled shape)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--json", action="store_true", help="machine-readable output")


@register_command("run", _configure_run)
def cmd_run(args) -> int:
    from onnxc.backends.artifact import load_artifact, read_inputs, save_outputs

    art = load_artifact(args.artifact)
    outputs = art.run(read_inputs(args.input, art))
    names = [o["name"] for o in art.outputs]
    for name, out in zip(names, outputs):
        flat = out.reshape(-1)
        head = ", ".join(f"{v:.5g}" for v in flat[:6]) + (", ..." if flat.size > 6 else "")
        print(f"{name}: {out.dtype} {list(out.shape)} [{head}]")
    if args.output:
        save_outputs(args.output, names, outputs)
        print(f"saved to {args.output}")
    return 0


@register_command("bench", _configure_bench)
def cmd_bench(args) -> int:
    from onnxc.backends.artifact import benchmark, load_artifact, read_inputs

    art = load_artifact(args.artifact)
    feeds = read_inputs(args.input, art) if args.input else None
    figures = benchmark(art, feeds, warmup=args.warmup, repeat=args.repeat)
    figures.update(artifact=args.artifact, runtime=art.kind, device=art.device)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{args.artifact} ({art.kind}, {art.device}): median {figures['median_ms']:.3f} ms"
          f"  mean {figures['mean_ms']:.3f}  min {figures['min_ms']:.3f}"
          f"  p90 {figures['p90_ms']:.3f}  ({figures['runs']} runs after "
          f"{figures['warmup']} warm-up)")
    return 0

