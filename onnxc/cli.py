"""onnxc command line.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad model, 4 unsupported model,
5 verification failed / accuracy budget exceeded, 6 output not writable,
7 bad data, 8 backend/toolchain failure. Tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import json
import sys

from .commands import add_data_args, data_loaders, register_command
from .errors import OnnxcError, UsageError, first_line

EXAMPLES = """examples:
  onnxc compress model.onnx --passes fold_bn --target onnx -o out/
  onnxc compress resnet.onnx --passes fold_bn,prune,int8 --prune-flops 0.5 \\
      --calib-data train.npz --eval-data test.npz --scale 0.00392156862745098 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o out/
  onnxc inspect model.onnx
  onnxc verify original.onnx out/model.onnx --eval-data test.npz
  onnxc passes
"""



def _add_option(group, opt, seen: list) -> None:
    """One declared option as a flag. Values stay strings: the pass's config converts
    and checks them, exactly as it does for the Python API."""
    if any(opt is s or opt == s for s in seen):
        return                    # a declaration several passes/targets share
    seen.append(opt)
    kwargs = {"dest": opt.dest, "help": opt.help, "default": None}
    if opt.is_switch:
        kwargs["action"] = "store_true"
    elif opt.choices is not None:
        kwargs["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}"
    if opt.default is not None and opt.help and not opt.is_switch:
        kwargs["help"] = f"{opt.help} (default: {opt.default})"
    group.add_argument(*opt.flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from onnxc.commands import all_commands

    parser = argparse.ArgumentParser(
        prog="onnxc", description="Compress, verify and compile ONNX models.",
        epilog=EXAMPLES + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in all_commands().values():
        command.configure(sub)
    for p in sub.choices.values():
        # --debug after the command too; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")
    return parser


# ----------------------------------------------------------------------------------------
# onnxc compress


def _configure_compress(sub) -> None:
    from onnxc.backends import all_backends
    from onnxc.pipeline import all_passes

    passes = all_passes()
    backends = all_backends()
    c = sub.add_parser("compress", help="run passes and write an artifact directory",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", nargs="?", help="input .onnx file (never modified; "
                   "default with --recipe: the recipe's)")
    c.add_argument("--passes", default=None,
                   help=f"comma-separated, run in canonical order: {', '.join(passes)} "
                        "(default: fold_bn)")
    c.add_argument("--target", default=None,
                   help=f"one of {', '.join(sorted(backends))} (default: onnx)")
    c.add_argument("--recipe", default=None, help="replay a recipe.yaml (from 'onnxc "
                   "search'): its passes, options, data and seed; flags given here win")
    c.add_argument("-o", "--output", required=True, help="artifact directory (replaced)")
    c.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="fix an input's shape; repeat for several inputs")
    c.add_argument("--seed", type=int, default=None, help="(default: 0)")
    c.add_argument("--tolerance", type=float, default=1e-5,
                   help="max relative output error allowed for exact passes")
    c.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="exit 5 if top-1 drops more than this many points (needs --eval-data)")
    c.add_argument("--require-speedup", type=float, default=None, metavar="X",
                   help="exit 5 (nothing written) unless the artifact runs X times as fast "
                        "as the original model on ONNX Runtime (measured here)")
    c.add_argument("--no-speed-check", action="store_true",
                   help="skip timing the artifact against ONNX Runtime")
    c.add_argument("--quiet", action="store_true", help="only print the summary")
    add_data_args(c)
    seen: list = []
    for cls in passes.values():
        if cls.options:
            g = c.add_argument_group(f"pass {cls.name}")
            for opt in cls.options:
                _add_option(g, opt, seen)
    for cls in backends.values():
        if cls.options:
            g = c.add_argument_group(f"target {cls.name}")
            for opt in cls.options:
                _add_option(g, opt, seen)


def _declared_options() -> list:
    from onnxc.backends import all_backends
    from onnxc.pipeline import all_passes

    return [opt for cls in list(all_passes().values()) + list(all_backends().values())
            for opt in cls.options]


@register_command("compress", _configure_compress)
def cmd_compress(args) -> int:
    from onnxc import frontend
    from onnxc.compress import RUN_OPTIONS, compress

    if args.recipe:
        from onnxc.recipe import apply_to_args

        apply_to_args(args, _declared_options())
    if args.model is None:
        raise UsageError("compress needs a MODEL (or --recipe)")
    args.passes = args.passes or "fold_bn"
    args.target = args.target or "onnx"
    args.seed = 0 if args.seed is None else args.seed
    options = {}
    for opt in list(_declared_options()) + list(RUN_OPTIONS):
        value = getattr(args, opt.dest, None)
        if value is not None and value is not False:   # False: a switch not given
            options[opt.dest] = value
    calib, eval_ = data_loaders(args)
    shapes = frontend.parse_input_shapes(args.input_shape)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    log(f"onnxc: compressing {args.model} with {args.passes} for target {args.target}")
    result = compress(args.model, args.passes.split(","), target=args.target,
                      out_dir=args.output, options=options, input_shapes=shapes,
                      calibration_loader=calib, evaluation_loader=eval_, seed=args.seed,
                      tolerance=args.tolerance, max_accuracy_drop=args.max_accuracy_drop,
                      log=log, require_speedup=args.require_speedup,
                      speed_check=not args.no_speed_check)
    print(summary_table(result.report))
    print(f"artifact written to {args.output}")
    return 0

def summary_table(report: dict) -> str:
    rows = [("pass", "nodes", "params", "MACs", "bytes", "max rel err", "s")]
    for p in report["passes"]:
        err = p["error"]["max_rel"] if p["error"] else None
        rows.append((p["name"] + ("" if not p["skipped"] else f" ({len(p['skipped'])} skip)"),
                     str(p["after"]["nodes"]), f"{p['after']['params']:,}",
                     f"{p['after']['macs']:,}", f"{p['after']['bytes']:,}",
                     "-" if err is None else f"{err:.2e}", f"{p['seconds']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    o, f = report["original"], report["final"]
    lines.append(f"params {o['params']:,} -> {f['params']:,}   MACs {o['macs']:,} -> "
                 f"{f['macs']:,}   size {o['bytes']:,} -> {f['bytes']:,} B   "
                 f"Cr {report['compression_ratio']:.2f}x")
    if "storage_compression_ratio" in report:
        lines.append(f"storage with packed weights: {report['storage_bytes']:,} B   "
                     f"storage Cr {report['storage_compression_ratio']:.2f}x")
    lines.append(f"max relative output error vs original: {report['error']['max_rel']:.3e}")
    if report.get("speed"):
        from onnxc.speed import summary_line

        lines.append(f"speed: {summary_line(report['speed'])}")
    if report.get("accuracy"):
        a = report["accuracy"]
        lines.append(f"top-1 {a['original_top1']:.2f}% -> {a['final_top1']:.2f}% "
                     f"(drop {a['drop']:.2f} pt, {a['samples']} samples)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# onnxc inspect, verify, passes


def _configure_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="per-layer table: op, shapes, params, MACs")
    i.add_argument("model")
    i.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    i.add_argument("--all", action="store_true", help="list every node, not only layers")
    i.add_argument("--json", action="store_true", help="machine-readable output")


@register_command("inspect", _configure_inspect)
def cmd_inspect(args) -> int:
    from onnxc import frontend

    graph = frontend.load(args.model, frontend.parse_input_shapes(args.input_shape))
    stats = graph.stats()
    if args.json:
        print(json.dumps({"totals": stats.as_dict(), "layers": [
            vars(n) for n in stats.per_node if args.all or n.params or n.macs]}, default=list))
        return 0
    rows = [("#", "name", "op", "input", "output", "params", "MACs")]
    for k, n in enumerate(stats.per_node):
        if not (args.all or n.params or n.macs):
            continue
        fmt = (lambda s: "x".join(map(str, s)) if s is not None else "?")
        rows.append((str(k), n.name[:40], n.op, fmt(n.input_shape), fmt(n.output_shape),
                     f"{n.params:,}", f"{n.macs:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.rjust(w) if i in (0, 5, 6) else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(f"total: {stats.nodes} nodes, {stats.params:,} params ({stats.params / 1e6:.2f} M), "
          f"{stats.macs:,} MACs ({stats.macs / 1e9:.3f} G), {stats.bytes:,} bytes")
    return 0


def _configure_verify(sub) -> None:
    v = sub.add_parser("verify", help="compare two models on ONNX Runtime")
    v.add_argument("reference")
    v.add_argument("candidate")
    v.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    v.add_argument("--samples", type=int, default=16, help="random samples without data")
    v.add_argument("--tolerance", type=float, default=None,
                   help="exit 5 if max relative error exceeds this")
    v.add_argument("--seed", type=int, default=0)
    add_data_args(v, calib=False)


@register_command("verify", _configure_verify)
def cmd_verify(args) -> int:
    from onnxc import frontend
    from onnxc.calibrate.readers import random_dataset
    from onnxc.errors import VerificationError
    from onnxc.execution import Runner
    from onnxc.verify import compare_outputs

    shapes = frontend.parse_input_shapes(args.input_shape)
    a = frontend.load(args.reference, shapes)
    b = frontend.load(args.candidate, shapes)
    given, eval_ = data_loaders(args)
    ds = eval_(a) if eval_ else given(a) if given else \
        random_dataset(a, args.samples, seed=args.seed)
    ref = Runner(a).run(ds.inputs)
    out = Runner(b).run(ds.inputs)
    cmp = compare_outputs(ref, out, len(ds))
    if cmp.mismatch:
        raise VerificationError(f"the models' outputs differ: {cmp.mismatch}")
    print(f"samples {cmp.samples} ({'random' if ds.synthetic else ds.source})")
    print(f"max abs error {cmp.max_abs:.3e}  max rel error {cmp.max_rel:.3e}  "
          f"mean abs error {cmp.mean_abs:.3e}")
    if cmp.top1_agreement is not None:
        print(f"argmax agreement {100 * cmp.top1_agreement:.2f}%")
    if ds.labels is not None:
        import numpy as np

        acc = [100 * float(np.mean(o.reshape(len(o), -1).argmax(1) == ds.labels))
               for o in (ref[0], out[0])]
        print(f"top-1 reference {acc[0]:.2f}%  candidate {acc[1]:.2f}%  "
              f"drop {acc[0] - acc[1]:.2f} pt")
    if args.tolerance is not None and cmp.max_rel > args.tolerance:
        raise VerificationError(f"max relative error {cmp.max_rel:.3e} exceeds "
                                f"--tolerance {args.tolerance}")
    return 0


def _configure_passes(sub) -> None:
    sub.add_parser("passes", help="list passes and targets")


@register_command("passes", _configure_passes)
def cmd_passes(args) -> int:
    from onnxc.backends import all_backends
    from onnxc.pipeline import all_passes

    print("passes (run in this order):")
    for name, cls in all_passes().items():
        kind = "exact" if cls.exact else "lossy"
        print(f"  {name:<10} {kind}  {cls.summary}")
    print("targets:")
    for name, cls in sorted(all_backends().items()):
        print(f"  {name:<10} {cls.summary}")
    return 0


# `onnxc search` (and the recipes `compress --recipe` replays) lives in its own module.
from onnxc import search as _search  # noqa: E402,F401  (registers 'onnxc search')


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv        # before parsing: errors while building the parser
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:      # argparse already printed its one-line usage error
            return 0 if exc.code in (0, None) else UsageError.exit_code
        debug = bool(getattr(args, "debug", False))
        if not args.command:
            parser.print_help()
            return UsageError.exit_code
        from onnxc.commands import all_commands

        return int(all_commands()[args.command].run(args) or 0)
    except OnnxcError as exc:
        if debug:
            raise
        print(f"onnxc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxc: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxc: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        msg = first_line(exc) if str(exc).strip() else ""
        print(f"onnxc: internal error: {type(exc).__name__}: {msg} "
              f"(rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
