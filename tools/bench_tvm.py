#!/usr/bin/env python3
"""ONNX Runtime vs TVM x86 (untuned, MetaSchedule-tuned) latency, measured in one run.

    python tools/bench_tvm.py [--model ../shared/models/resnet56_cifar10.onnx]
        [--batches 1,64] [--variants fp32,int8] [--trials 128] [--tune-db DIR]
        [--repeat 20]

For each variant (fp32 after fold_bn; int8 = ONNX Runtime's static QDQ quantization
of that graph, calibrated on CIFAR-10 train images when ../shared has them) and batch
size it prints the median latency of ONNX Runtime, TVM untuned and TVM tuned with
--trials MetaSchedule trials, then compiles the tuned configuration a second time
against the now-warm database and prints that wall time and its new trials (0 when
the database served every task). Every latency is measured in this run, and so is
the machine's reference rate: numpy's SGEMM (OpenBLAS, all cores) on 2048² matrices.
Each latency is also shown as an effective rate, 2·MACs / latency, against it.

Tuning takes far longer than measuring, so on a shared machine the two can be split:

    nice -n 19 python tools/bench_tvm.py --tune-only --trials-per-task 64 --tune-db DIR
    flock /tmp/onnxc-cpu.lock python tools/bench_tvm.py --from-db --tune-db DIR

A later `--tune-only --refine` run adds trials to the tasks the database already has
(the search starts from their best records) instead of skipping them.

The first fills the database at low priority (no latencies: they would be disturbed);
the second only compiles and measures: "tuned" applies the database as it is (tasks
it lacks stay untuned and are counted) and the trials column is the number of
measured candidates the database holds for that model's tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("ONNXC_SHARED", os.path.join(HERE, "..", "..", "shared"))


def ort_latency(model: onnx.ModelProto, x: np.ndarray, repeat: int) -> float:
    import onnxruntime as ort

    from onnxc.backends.artifact import Artifact, benchmark

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # interleaved
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    art = Artifact("ort", "onnxruntime", [{"name": name, "shape": list(x.shape),
                                           "dtype": "float32"}], [],
                   lambda feeds: sess.run(None, feeds))
    return benchmark(art, {name: x}, warmup=3, repeat=repeat)["median_ms"]


def sgemm_gflops(n: int = 2048, repeat: int = 10) -> float:
    """numpy's SGEMM rate: what a vendor BLAS gets out of this machine's cores."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def graph_macs(model: onnx.ModelProto) -> int:
    from onnxc.ir import Graph

    return Graph.from_onnx(model).stats(with_bytes=False).macs


def fp32_graph(model_path: str, batch: int) -> onnx.ModelProto:
    from onnxc.compress import compress

    result = compress(model_path, ["fold_bn"], input_shapes={"input": [batch, 3, 32, 32]},
                      log=lambda m: None)
    return result.graph.to_onnx()


def int8_qdq(fp32: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    train = os.path.join(SHARED, "data", "cifar10", "train.npz")
    if os.path.isfile(train):
        imgs = np.load(train)["images"][:64].astype(np.float32) / 255.0
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        calib = (imgs - mean) / std
    else:
        calib = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    batches = [calib[i:i + batch] for i in range(0, len(calib) - batch + 1, batch)] \
        or [np.resize(calib, (batch, 3, 32, 32))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(fp32, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        return onnx.load(dst)


def tvm_latency(model, trials, db, repeat, log, **options):
    from onnxc.backends.tvm import x86_latency

    start = time.perf_counter()
    figures = x86_latency(model, tune_trials=trials, tune_db=db, warmup=2, repeat=repeat,
                          log=log, **options)
    figures["wall_seconds"] = time.perf_counter() - start
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(SHARED, "models", "resnet56_cifar10.onnx"))
    p.add_argument("--batches", default="1,64")
    p.add_argument("--variants", default="fp32,int8")
    p.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per model")
    p.add_argument("--trials-per-task", type=int, default=None,
                   help="cap per task (then --trials is only the overall cap)")
    p.add_argument("--tune-db", default=None, help="default: a fresh temporary database")
    p.add_argument("--tune-minutes", type=float, default=None,
                   help="wall-clock tuning budget per build (onnxc's --tune-minutes: tasks "
                        "one after the other, shares by weight); with --integer")
    p.add_argument("--tune-only", action="store_true",
                   help="only fill --tune-db (run it at low priority); no latencies")
    p.add_argument("--from-db", action="store_true",
                   help="tuned = what --tune-db holds (no new tuning), then measure")
    p.add_argument("--merge-db", default=None, help="comma-separated databases (e.g. "
                   "filled by parallel --tune-only runs) copied into --tune-db first")
    p.add_argument("--no-prepack", action="store_true",
                   help="tune without cpu_weight_prepack (separate tasks/records)")
    p.add_argument("--refine", action="store_true",
                   help="with --tune-only: tune the tasks the database has too (more trials "
                        "for them, starting from their best records)")
    p.add_argument("--build-workers", type=int, default=1, help="tuning build processes")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--verbose", action="store_true", help="show tuning progress")
    p.add_argument("--integer", action="store_true",
                   help="the integer-kernel report instead: onnxc's own int8 (and prune50+"
                        "int8) ResNet-56 through the QDQ->integer lowering, tuned with "
                        "--trials-per-task like fp32, against ORT; per-kernel table; "
                        "top-1 on test_dev")
    args = p.parse_args(argv)
    if (args.tune_only or args.from_db) and not args.tune_db:
        p.error("--tune-only and --from-db need --tune-db DIR")
    if args.tune_only and args.from_db:
        p.error("--tune-only and --from-db exclude each other")

    import platform

    import onnxruntime
    import tvm

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    db = args.tune_db or tempfile.mkdtemp(prefix="onnxc-bench-tunedb-")
    tune_opts = {"cpu_weight_prepack": not args.no_prepack,
                 "tune_trials_per_task": args.trials_per_task,
                 "tune_build_workers": args.build_workers,
                 "tune_minutes": args.tune_minutes}
    if args.refine and not args.tune_only:
        p.error("--refine goes with --tune-only (measuring runs never tune)")
    if args.integer:
        return integer_report(args, db, tune_opts, log)
    if args.tune_only:
        return tune_only(args, db, dict(tune_opts, tune_refine=args.refine), log)
    if args.merge_db:
        from onnxc.backends.tvm.tuning import merge_databases

        srcs = args.merge_db.split(",")
        print(f"# merged {merge_databases(db, srcs)} tuning records from {', '.join(srcs)}")
    print(f"# {os.path.basename(args.model)} on {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}, "
          f"tvm {tvm.__version__}; tuning db {db}")
    if args.from_db:
        print("# median latency in ms; tuned = MetaSchedule records already in the database "
              "(trials = measured candidates it holds for the model's tasks; untuned tasks "
              "counted)")
    else:
        print(f"# median latency in ms; tuned = MetaSchedule, {args.trials} trials per model"
              + (f", at most {args.trials_per_task} per task" if args.trials_per_task else ""))
    print(f"# cpu_weight_prepack {not args.no_prepack}; load before: {load()}")
    peak = sgemm_gflops()
    print(f"# reference: numpy SGEMM 2048x2048 {peak:.0f} GFLOPS; GF/s columns are "
          f"2*MACs/latency (ORT, TVM tuned) and % of that reference", flush=True)
    header = (f"{'model':<6} {'bs':>3} {'ORT':>9} {'TVM untuned':>12} {'TVM tuned':>10} "
              f"{'tuned/ORT':>9} {'trials':>6} {'tasks':>5} {'tune s':>7} {'max rel err':>11} "
              f"{'ORT GF/s':>12} {'tuned GF/s':>12}")
    print(header)
    print("-" * len(header), flush=True)
    warm = []
    for variant in args.variants.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            fp32 = fp32_graph(args.model, batch)
            model = fp32 if variant == "fp32" else int8_qdq(fp32, batch)
            x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            rep = max(5, args.repeat // 4) if batch > 1 else args.repeat
            ort_ms = ort_latency(model, x, rep)
            untuned = tvm_latency(model, 0, db, max(3, rep // 4), log)
            if args.from_db:
                tuned = tvm_latency(model, 0, db, rep, log, tune_db_only=True, **tune_opts)
            elif args.trials:
                tuned = tvm_latency(model, args.trials, db, rep, log, **tune_opts)
            else:
                tuned = None
            t = tuned["tuning"] if tuned else None
            err = max(f["verification"]["max_rel"] for f in (untuned, tuned) if f)
            flop = 2 * graph_macs(fp32) / 1e6          # MFLOP per batch; ms -> GFLOPS
            rate = (lambda ms: f"{flop / ms:>5.0f} ({100 * flop / ms / peak:>3.0f}%)")
            trials = t and (f"{t['trials_in_db']}" if args.from_db else f"{t['trials']}")
            tasks = t and (f"{t['cached']}/{t['tasks']}" if args.from_db else f"{t['tasks']}")
            print(f"{variant:<6} {batch:>3} {ort_ms:>9.2f} {untuned['median_ms']:>12.2f} "
                  + (f"{tuned['median_ms']:>10.2f} {tuned['median_ms'] / ort_ms:>8.2f}x "
                     f"{trials:>6} {tasks:>5} {t['seconds']:>7.0f}"
                     if tuned else f"{'-':>10} {'-':>9} {'-':>6} {'-':>5} {'-':>7}")
                  + f" {err:>11.2e} {rate(ort_ms):>12} "
                  + (f"{rate(tuned['median_ms']):>12}" if tuned else f"{'-':>12}"), flush=True)
            if tuned and args.from_db and t["cached"] < t["tasks"]:
                # the normal path would tune the missing tasks here, inside the measuring run
                warm.append((variant, batch, f"skipped: the database has only "
                                             f"{t['cached']}/{t['tasks']} tasks"))
            elif tuned:
                # The normal tuning path (not database-only): a warm database must
                # serve every task, so this runs no trials.
                again = tvm_latency(model, max(args.trials, 1), db, rep, log, **tune_opts)
                warm.append((variant, batch, again))
    if warm:
        print("\n# second compile of the tuned configurations against the warm database")
        for variant, batch, again in warm:
            if isinstance(again, str):
                print(f"{variant:<6} bs {batch:>3}: {again}")
                continue
            t = again["tuning"]
            print(f"{variant:<6} bs {batch:>3}: wall {again['wall_seconds']:.1f} s "
                  f"(tuning step {t['seconds']:.1f} s), new trials {t['trials']}, "
                  f"tasks from the database {t['cached']}/{t['tasks']}, "
                  f"latency {again['median_ms']:.2f} ms", flush=True)
    print(f"# load after: {load()}")
    return 0


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def tune_only(args, db, tune_opts, log) -> int:
    """Fill the database for every variant and batch; print what was tuned."""
    from onnxc.backends.tvm import compile_model

    print(f"# tuning {os.path.basename(args.model)} into {db}: {args.trials} trials per "
          f"model" + (f", at most {args.trials_per_task} per task"
                      if args.trials_per_task else "")
          + f", cpu_weight_prepack {not args.no_prepack}; {load()}", flush=True)
    for variant in args.variants.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            fp32 = fp32_graph(args.model, batch)
            model = fp32 if variant == "fp32" else int8_qdq(fp32, batch)
            with tempfile.TemporaryDirectory(prefix="onnxc-tvm-") as tmp:
                res = compile_model(model, "x86", tmp, dict(tune_opts, tune_trials=args.trials,
                                                            tune_db=db), log=log)
            t = res.tuning
            print(f"{variant:<6} bs {batch:>3}: {t.trials} trials measured now, "
                  f"{t.trials_in_db} in the database for its {t.tasks} tasks "
                  f"({t.cached} were already tuned), {t.seconds:.0f} s, max rel err "
                  f"{res.verification['max_rel']:.2e}; {load()}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# The integer path (backends/tvm/int_lower.py, int_kernels.py)


def _cifar(split: str, n: int | None = None):
    path = os.path.join(SHARED, "data", "cifar10", f"{split}.npz")
    if not os.path.isfile(path):
        return None, None
    data = np.load(path)
    imgs = data["images"][:n].astype(np.float32) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((imgs - mean) / std).astype(np.float32), data["labels"][:n]


def onnxc_models(model_path: str, batch: int, prune: float | None) -> tuple:
    """(fp32, int8 QDQ) through onnxc itself: fold_bn[,prune],int8 on 256 train images."""
    from onnxc.calibrate.readers import Dataset
    from onnxc.compress import compress

    x, _ = _cifar("train", 256)
    if x is None:
        x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    data = Dataset({"input": x}, None, "cifar10 train[:256]")
    passes = ["fold_bn"] + (["prune"] if prune else [])
    opts = {"prune_flops": prune} if prune else {}
    shapes = {"input": [batch, 3, 32, 32]}
    fp32 = compress(model_path, passes, input_shapes=shapes, options=opts,
                    calibration=data, evaluation=data, log=lambda m: None).graph.to_onnx()
    int8 = compress(model_path, passes + ["int8"], input_shapes=shapes, options=opts,
                    calibration=data, evaluation=data, log=lambda m: None).graph.to_onnx()
    return fp32, int8


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def kernel_table(module, target, top: int = 12) -> tuple:
    """Where the time goes: each kernel of the compiled module built and timed alone.

    (The Relax VM of this TVM has no profiler.) Returns ([(name, calls, ms per call,
    total ms, share)], sum of totals); the sum is close to, not equal to, the latency.
    """
    import tvm
    from tvm import relax, tirx

    calls, signature = {}, {}

    def visit(expr):    # R.call_tir(kernel, (args...), out_sinfo): count it, keep types
        if isinstance(expr, relax.Call) and len(expr.args) >= 2 and \
                isinstance(expr.args[0], tvm.ir.GlobalVar):
            name = expr.args[0].name_hint
            calls[name] = calls.get(name, 0) + 1
            args = expr.args[1]
            inputs = list(args.fields) if hasattr(args, "fields") else [args]
            outs = list(expr.ty.fields) if hasattr(expr.ty, "fields") else [expr.ty]
            signature.setdefault(name, [a.ty for a in inputs] + outs)

    relax.analysis.post_order_visit(module["main"], visit)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    rows = []
    for gvar, func in module.functions.items():
        if not isinstance(func, tirx.PrimFunc) or gvar.name_hint not in calls:
            continue
        try:
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                              target)
            args = []
            for ty in signature[gvar.name_hint]:
                shape = [int(d) for d in ty.shape.values]
                dtype = str(ty.dtype)
                data = (rng.integers(0, 8, shape) if "int" in dtype else
                        rng.standard_normal(shape)).astype(dtype)
                args.append(tvm.runtime.tensor(data, dev))
            ms = lib.mod.time_evaluator("main", dev, number=10, repeat=3)(*args).median * 1e3
        except Exception as exc:   # e.g. a kernel taking a shape argument: not timed
            if os.environ.get("BENCH_DEBUG"):
                print(gvar.name_hint, exc)
            continue
        rows.append((gvar.name_hint, calls[gvar.name_hint], ms, ms * calls[gvar.name_hint]))
    total = sum(r[3] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[3])
    return [r + (r[3] / total,) for r in rows[:top]], total


def integer_report(args, db, tune_opts, log) -> int:
    """ResNet-56 int8 and prune50+int8 through the integer lowering, in one run."""
    from onnxc.backends.tvm import compile_model
    from onnxc.backends.tvm import benchmark, load_artifact

    per_task = 16 if args.trials_per_task is None else args.trials_per_task
    trials = 0 if args.from_db or per_task == 0 else 100000    # the per-task cap rules
    opts = dict(tune_opts, tune_db=db, tune_trials_per_task=per_task or None,
                tune_trials=trials, tune_db_only=args.from_db)
    work = tempfile.mkdtemp(prefix="onnxc-bench-int-")
    print(f"# integer path: {os.path.basename(args.model)}; int8 = onnxc fold_bn[,prune],int8 "
          f"(uint8 activations, int8 per-channel weights, 256 CIFAR train images); tuning "
          f"{'from ' + db if args.from_db else f'{per_task} trials per task into {db}' if per_task else 'none (integer kernels: untuned tensorized schedules)'}; "
          f"{load()}", flush=True)

    results = {}

    def build(name, model, **extra):
        out = os.path.join(work, name)
        start = time.perf_counter()
        res = compile_model(model, "x86", out, dict(opts, **extra), log=log)
        results[out] = res
        t = res.tuning
        print(f"  built {name}: {time.perf_counter() - start:.0f} s"
              + (f", {t.tasks} tasks, {t.trials} trials now, {t.trials_in_db} in db"
                 if t else "") + (f"; lowering {res.lowering}" if res.lowering else "")
              + f"; vs ORT max rel {res.verification['max_rel']:.2e}", flush=True)
        return out

    def tvm_ms(out, x, rep):
        art = load_artifact(out)
        return benchmark(art, {art.inputs[0]["name"]: x}, warmup=3, repeat=rep)["median_ms"]

    x1 = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    x64 = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    rep = args.repeat
    fp32_1, int8_1 = onnxc_models(args.model, 1, None)
    a_fp32 = build("fp32_bs1", fp32_1)
    a_int8 = build("int8_bs1", int8_1)
    ort_fp32_1 = ort_latency(fp32_1, x1, rep)
    ort_int8_1 = ort_latency(int8_1, x1, rep)
    tvm_fp32_1 = tvm_ms(a_fp32, x1, rep)
    tvm_int8_1 = tvm_ms(a_int8, x1, rep)
    tuned = ("tuned from the database" if args.from_db else
             f"tuned, {per_task} trials per task each" if per_task else "both untuned")
    print(f"int8 bs 1: TVM int8 {tvm_int8_1:.2f} ms, TVM fp32 {tvm_fp32_1:.2f} ms ({tuned}): "
          f"int8 {tvm_fp32_1 / tvm_int8_1:.2f}x faster than fp32; ORT int8 (same QDQ model) {ort_int8_1:.2f} ms: TVM/ORT "
          f"{tvm_int8_1 / ort_int8_1:.2f}x; ORT fp32 {ort_fp32_1:.2f} ms", flush=True)

    if "prune" in args.variants:
        for batch in (int(b) for b in args.batches.split(",")):
            x = x1 if batch == 1 else x64 if batch == 64 else np.random.default_rng(
                0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            orig = fp32_graph(args.model, batch)
            _, p_int8 = onnxc_models(args.model, batch, 0.5)
            a_p = build(f"prune50_int8_bs{batch}", p_int8)
            r = max(5, rep // 4) if batch > 1 else rep
            ort_orig = ort_latency(orig, x, r)
            ort_same = ort_latency(p_int8, x, r)
            tvm_p = tvm_ms(a_p, x, r)
            print(f"prune50+int8 bs {batch}: TVM {tvm_p:.2f} ms; ORT fp32 original "
                  f"{ort_orig:.2f} ms ({ort_orig / tvm_p:.2f}x); ORT same compressed model "
                  f"{ort_same:.2f} ms ({ort_same / tvm_p:.2f}x)", flush=True)
            if batch == 1:
                res = results[a_p]
                rows, total = kernel_table(res.module, res.spec.tvm_target())
                print(f"# where the time goes (prune50+int8 bs 1): each kernel timed alone, "
                      f"x calls; sum {total:.2f} ms")
                for name, calls, ms, tot, share in rows:
                    print(f"  {tot:8.3f} ms {100 * share:5.1f}%  {calls:>3} x {ms:7.3f} ms  "
                          f"{name[:80]}")

    imgs, labels = _cifar("test_dev")
    if imgs is not None:
        sess = _ort_session(int8_1)
        art = load_artifact(a_int8)
        name = art.inputs[0]["name"]
        ort_hits = tvm_hits = same = 0
        for i in range(len(imgs)):
            xi = imgs[i:i + 1]
            o = sess.run(None, {sess.get_inputs()[0].name: xi})[0].argmax(1)[0]
            t = art.run({name: xi})[0].argmax(1)[0]
            ort_hits += int(o == labels[i])
            tvm_hits += int(t == labels[i])
            same += int(o == t)
        n = len(imgs)
        print(f"top-1 test_dev ({n} images): TVM int8 {100 * tvm_hits / n:.2f}%, ORT int8 "
              f"{100 * ort_hits / n:.2f}% (difference {100 * (tvm_hits - ort_hits) / n:+.2f} "
              f"pt); same prediction on {same}/{n}", flush=True)
    print(f"# artifacts in {work}; {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
