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

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
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
                 "tune_build_workers": args.build_workers}
    if args.refine and not args.tune_only:
        p.error("--refine goes with --tune-only (measuring runs never tune)")
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


if __name__ == "__main__":
    sys.exit(main())
