"""``onnxc vta-sim ARTIFACT``: run a VTA artifact in the simulator and print its cycles.

    onnxc vta-sim out/ --input x.npy [--output y.npy]
    onnxc vta-sim out/ --eval-data test.npz --scale ... --mean ... --std ...  (top-1)
    onnxc vta-sim out/ --dump 3          (the instruction stream of layer 3, decoded)
"""

from __future__ import annotations

import numpy as np

from onnxc.commands import register_command
from onnxc.errors import DataError, UsageError


def _configure(sub) -> None:
    from onnxc.commands import add_data_args

    p = sub.add_parser("vta-sim", help="run a --target vta artifact in the VTA simulator")
    p.add_argument("artifact", help="artifact directory written by onnxc compress --target vta")
    p.add_argument("--input", help="input array (.npy) for the model's first input")
    p.add_argument("--output", help="save the first output (.npy) or all outputs (.npz)")
    p.add_argument("--dump", type=int, metavar="LAYER", default=None,
                   help="print the decoded instruction stream of one VTA layer and exit")
    p.add_argument("--schedule", default="load-first",
                   help="module interleaving of the functional run: load-first, "
                        "compute-first, store-first or an integer seed (random)")
    add_data_args(p, calib=False)


@register_command("vta-sim", _configure)
def cmd_vta_sim(args) -> int:
    from onnxc.backends.vta import isa
    from onnxc.backends.vta.runtime import load_artifact

    art = load_artifact(args.artifact)
    if args.dump is not None:
        if not 0 <= args.dump < len(art.programs):
            raise UsageError(f"--dump: the artifact has VTA layers 0..{len(art.programs) - 1}")
        prog = art.programs[args.dump]
        print(f"# layer {args.dump} {prog.layer.name}: {len(prog.insns)} instructions")
        for k, ins in enumerate(prog.insns):
            print(f"{k:5d} {isa.MODULE_NAMES[isa.module_of(ins)]:<7} {isa.describe(ins)}")
        return 0
    schedule = int(args.schedule) if args.schedule.lstrip("-").isdigit() else args.schedule
    if schedule not in ("load-first", "compute-first", "store-first") \
            and not isinstance(schedule, int):
        raise UsageError(f"--schedule {args.schedule}: not a schedule name or seed")
    name = art.inputs[0]["name"]
    labels = None
    if args.input:
        try:
            x = np.load(args.input)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {args.input}: {exc}") from None
        feeds = {name: x}
    elif args.eval_data or args.input_data:
        from onnxc import frontend
        from onnxc.commands import data_loaders

        given, eval_ = data_loaders(args)
        ds = (eval_ or given)(frontend.load(f"{args.artifact}/model.onnx"))
        feeds, labels = ds.inputs, ds.labels
    else:
        raise UsageError("give --input x.npy, --input-data or --eval-data data.npz")
    outs = art.run(feeds, schedule=schedule)
    print(layer_table(art))
    if labels is not None:
        from onnxc.execution import Runner

        ref = Runner(art.qdq_model()).run(feeds)[0]
        pred = outs[0].reshape(len(outs[0]), -1).argmax(1)
        top1 = 100 * float(np.mean(pred == labels))
        ref_top1 = 100 * float(np.mean(ref.reshape(len(ref), -1).argmax(1) == labels))
        agree = 100 * float(np.mean(pred == ref.reshape(len(ref), -1).argmax(1)))
        print(f"top-1 through the simulator {top1:.2f}%  (ONNX Runtime on the same "
              f"quantized model {ref_top1:.2f}%, prediction agreement {agree:.2f}%, "
              f"{len(labels)} samples)")
    else:
        flat = outs[0].reshape(-1)
        print(f"{art.outputs[0]['name']}: {outs[0].dtype} {list(outs[0].shape)} "
              f"[{', '.join(f'{v:.5g}' for v in flat[:6])}{', ...' if flat.size > 6 else ''}]")
    if args.output:
        from onnxc.backends.artifact import save_outputs

        save_outputs(args.output, [o["name"] for o in art.outputs], outs)
        print(f"saved to {args.output}")
    return 0


def layer_table(art) -> str:
    """Per-layer cycles, utilisation and DRAM traffic of the last simulated sample."""
    from onnxc.backends.vta import layer_report, totals

    cfg = art.cfg
    reps = [layer_report(p, s, cfg) for p, s in zip(art.programs, art.layer_stats)
            if s is not None]
    rows = [("#", "layer", "out shape", "MACs", "cycles", "us", "GEMM util", "pad waste",
             "DRAM KiB")]
    for k, r in enumerate(reps):
        rows.append((str(k), r["name"][-32:], "x".join(map(str, r["out_shape"][1:])),
                     f"{r['macs']:,}", f"{r['cycles']:,}", f"{r['latency_us']:.1f}",
                     f"{100 * r['gemm_utilization']:.1f}%", f"{100 * r['padding_waste']:.1f}%",
                     f"{r['dram_bytes'] / 1024:.1f}"))
    t = totals(reps, cfg)
    rows.append(("", "total", "", f"{t['macs']:,}", f"{t['cycles']:,}",
                 f"{t['latency_ms'] * 1e3:.1f}", f"{100 * t['gemm_utilization']:.1f}%",
                 f"{100 * t['padding_waste']:.1f}%", f"{t['dram_bytes'] / 1024:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append(f"VTA {cfg.describe()}; conv/dense layers on the host: "
                 f"{sum(p['where'] == 'host' for p in art.meta['placement'])}; host part "
                 f"on {art.host_runtime}")
    if art.host_note:
        lines.append(f"note: {art.host_note}")
    return "\n".join(lines)

