"""Rate–distortion benchmark suite: one command, every configuration through the public API.

    python tools/bench_suite.py                       # full suite -> BENCHMARKS.md + plots
    python tools/bench_suite.py --models resnet56 --configs prune50,prune50+recover --merge

For ResNet-20 and ResNet-56 (../shared, CIFAR-10) and each configuration (fold_bn; int8;
prune 30% / 50% FLOPs with the best criterion; prune50+int8; Tucker-2; ternary; binary;
each lossy one also +recover) it runs ``onnxc.compress`` and records top-1 on test_dev
and its drop, params, MACs, size and Cr, ONNX Runtime latency at batch 1 and 64 for the
original and the compressed model measured in the same run (interleaved, so machine load
hits both alike) and their ratio Sr, and TVM x86 latency where the TVM backend exists.
A configuration whose pass is not registered is reported as "not available".

Results are written after every configuration (``--json``, ``BENCHMARKS.md``, plots), so
an interrupted run still leaves a consistent partial report; ``--merge`` reruns a subset
and keeps the other rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from onnxc.errors import first_line

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
CIFAR = dict(scale=1 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MODELS = {"resnet20": "resnet20_cifar10.onnx", "resnet56": "resnet56_cifar10.onnx"}
PRUNE_CRITERIA = ("l1", "fpgm", "thinet")

# name -> (passes, options). "{criterion}" is filled with the selected prune criterion.
BASE_CONFIGS = {
    "fold_bn": (["fold_bn"], {}),
    "int8": (["fold_bn", "int8"], {}),
    "prune30": (["fold_bn", "prune"], {"prune_flops": 0.3, "prune_criterion": "{criterion}"}),
    "prune50": (["fold_bn", "prune"], {"prune_flops": 0.5, "prune_criterion": "{criterion}"}),
    "prune50+int8": (["fold_bn", "prune", "int8"],
                     {"prune_flops": 0.5, "prune_criterion": "{criterion}"}),
    "tucker2": (["fold_bn", "lowrank"], {"lowrank_method": "tucker2", "lowrank_layers": "conv"}),
    "ternary": (["fold_bn", "ternary"], {}),
    "binary": (["fold_bn", "binary"], {}),
}
LOSSY = ["int8", "prune30", "prune50", "prune50+int8", "tucker2", "ternary", "binary"]
# Share of the suite's recovery time per configuration. The suite first runs every base
# row, then splits what is left of --budget-minutes among the +recover rows by these
# weights (re-split before each row, so time a row leaves unused goes to the next).
# The must-show ResNet-56 rows (prune50, prune50+int8, ternary, binary) get most of it;
# int8 loses little and gets a touch-up; ResNet-20 rows are for the rate-distortion
# picture only.
RECOVER_WEIGHTS = {
    "resnet20": {"int8": 0.05, "prune30": 0.15, "prune50": 0.25, "prune50+int8": 0.25,
                 "tucker2": 0.2, "ternary": 0.3, "binary": 0.2},
    "resnet56": {"int8": 0.15, "prune30": 0.4, "prune50": 3.0, "prune50+int8": 2.6,
                 "tucker2": 0.5, "ternary": 3.4, "binary": 0.8},
}
# Seconds a +recover row costs besides training (loading, the teacher's held-out
# logits, verification, top-1 of original and result): reserved before splitting.
RECOVER_OVERHEAD_S = {"resnet20": 15.0, "resnet56": 30.0}
ALL_CONFIGS = ["fold_bn"] + [c for base in LOSSY for c in (base, base + "+recover")]
TVM_DEFAULT = ("original", "prune50")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------
# Data and measurement


def datasets(graph):
    from onnxc.calibrate.readers import Preprocess, load_npz

    pre = Preprocess(CIFAR["scale"], CIFAR["mean"], CIFAR["std"])
    train = load_npz(str(SHARED / "data/cifar10/train.npz"), graph, pre)
    test = load_npz(str(SHARED / "data/cifar10/test_dev.npz"), graph, pre)
    return train, test


def ort_latency_pair(a, b, batch: int, rounds: int = 7, per_round: int | None = None,
                     threads: int = 2) -> tuple[float, float]:
    """Median ms per inference of models a and b, interleaved round by round."""
    from onnxc.execution import session

    # no spinning: an idle session's threads would busy-wait through the other's turn
    sa, sb = (session(m, threads=threads, spinning=False) for m in (a, b))
    name_a, name_b = sa.get_inputs()[0].name, sb.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for s, n in ((sa, name_a), (sb, name_b)):
        for _ in range(2):
            s.run(None, {n: x})                      # warm-up
    per_round = per_round or (5 if batch == 1 else 2)
    ta, tb = [], []
    for _ in range(rounds):
        for s, n, acc in ((sa, name_a, ta), (sb, name_b, tb)):
            t0 = time.perf_counter()
            for _ in range(per_round):
                s.run(None, {n: x})
            acc.append((time.perf_counter() - t0) * 1e3 / per_round)
    return statistics.median(ta), statistics.median(tb)


def tvm_latency(model) -> tuple[float | None, str]:
    try:
        from onnxc.backends.tvm import x86_latency
    except ImportError:
        return None, "TVM backend not available"
    try:
        fig = x86_latency(model, input_shapes={"input": [1, 3, 32, 32]}, tune_trials=0,
                          warmup=3, repeat=15)
        took = fig.get("compile_seconds")
        took = sum(took.values()) if isinstance(took, dict) else (took or 0.0)
        return float(fig["median_ms"]), f"untuned, build {took:.0f} s"
    except Exception as exc:          # report, never abort the suite
        return None, f"{type(exc).__name__}: {first_line(exc, 120)}"


def storage_bytes(report: dict) -> int:
    return int(report.get("storage_bytes") or report["final"]["bytes"])


# ----------------------------------------------------------------------------------------
# Configurations


def needed_passes(config: str) -> list:
    base = config.replace("+recover", "")
    passes = list(BASE_CONFIGS[base][0])
    if config.endswith("+recover"):
        passes.append("recover")
    return passes


def options_for(model: str, config: str, criterion: str, args,
                minutes: float | None = None) -> dict:
    base = config.replace("+recover", "")
    opts = {k: (v.format(criterion=criterion) if isinstance(v, str) else v)
            for k, v in BASE_CONFIGS[base][1].items()}
    if base == "prune50+int8":
        share = getattr(args, "params_share", {}).get(model,
                                                      getattr(args, "p50i8_params", None))
        if share:
            opts["prune_params"] = share
    if config.endswith("+recover"):
        opts.update(recover_epochs=args.recover_epochs, recover_threads=args.threads,
                    recover_hints=args.recover_hints, recover_minutes=minutes,
                    recover_augment=getattr(args, "recover_augment", None))
    return opts


def params_share_for_cr(original_bytes: int, original_params: int, int8_bytes: int,
                        target_cr: float, margin: float = 0.02) -> float:
    """Share of parameters prune must remove so the int8 model is ``target_cr`` times
    smaller than the original, from the measured int8 model of the unpruned network.

    Size model: int8 bytes ≈ params + F, F the fixed overhead (graph, names, scales,
    biases) read off the unpruned int8 model as its bytes minus its parameter count.
    Per-channel scales and biases shrink with pruning too, so this overestimates the
    pruned model's size: the share it gives errs on the side of reaching the target.
    """
    overhead = int8_bytes - original_params
    keep = (1 - margin) * original_bytes / target_cr - overhead
    return round(min(0.95, max(0.0, 1 - keep / original_params)), 3)


def recover_minutes(pending: list, seconds_left: float) -> float:
    """Minutes for the first of ``pending`` [(model, config)] +recover rows: what is left
    of the budget after every pending row's overhead, split by RECOVER_WEIGHTS."""
    weights = [RECOVER_WEIGHTS[m][c.replace("+recover", "")] for m, c in pending]
    train_s = seconds_left - sum(RECOVER_OVERHEAD_S[m] for m, _ in pending)
    return max(0.25, train_s * weights[0] / sum(weights) / 60.0)


def select_criterion(model_path, graph, train, registry, cache: dict, name: str) -> str:
    """Best pruning criterion at −50% FLOPs by top-1 on 1000 *training* images
    (test_dev stays untouched by every choice the suite makes)."""
    from onnxc.compress import compress
    from onnxc.verify import top1

    if name in cache:
        return cache[name]["criterion"]
    if "prune" not in registry:
        return "l1"
    held = train.take(1000)
    scores = {}
    for crit in PRUNE_CRITERIA:
        try:
            res = compress(str(model_path), ["fold_bn", "prune"],
                                 options={"prune_flops": 0.5, "prune_criterion": crit},
                                 calibration=train, seed=0, log=lambda m: None)
            scores[crit] = round(top1(res.graph, held), 2)
        except Exception as exc:
            log(f"  criterion {crit}: failed ({first_line(exc, 100)})")
    best = max(scores, key=scores.get) if scores else "l1"
    cache[name] = {"criterion": best, "train_top1_at_prune50": scores}
    log(f"  {name}: prune criterion {best} (train top-1 at -50% FLOPs: {scores})")
    return best


def run_config(model: str, model_path, config: str, criterion: str, train, test,
               original_proto, args, bases: dict, minutes: float | None = None) -> dict:
    """One row. A "+recover" row continues from its base configuration's compressed model
    (kept in ``bases``) with ``compress(base, ["recover"], recover_teacher=original)`` —
    what ``compress(original, base_passes + ["recover"])`` computes, since recover runs
    last with the original as teacher — so slow lossy passes (int8 calibration, pruning
    criteria) run once, not twice."""
    # The function, not ``onnxc.compress``: once the submodule onnxc.compress is imported
    # (the CLI and several passes do), that attribute is the module, not the function.
    from onnxc.compress import compress
    from onnxc.pipeline import all_passes

    registry = all_passes()
    row = {"model": model, "config": config}
    missing = [p for p in needed_passes(config) if p not in registry]
    if missing:
        row["status"] = f"not available (pass {', '.join(missing)} not registered)"
        return row
    base = config.replace("+recover", "")
    recovering = config.endswith("+recover")
    if recovering and base not in bases:
        bases[base] = run_config(model, model_path, base, criterion, train, test,
                                 original_proto, args, bases)
    if recovering and bases[base].get("status") != "ok":
        row["status"] = f"base failed: {bases[base].get('status')}"
        return row
    opts = options_for(model, config, criterion, args, minutes)
    say = (lambda m: log("   " + m.strip())) if args.verbose else (lambda m: None)
    start = time.perf_counter()
    try:
        if recovering:
            res = compress(bases[base]["_model"], ["recover"],
                           options={**opts, "recover_teacher": str(model_path)},
                           calibration=train, evaluation=test, seed=0, log=say)
        else:
            res = compress(str(model_path), needed_passes(config), options=opts,
                           calibration=train, evaluation=test, seed=0, log=say)
    except Exception as exc:
        row["status"] = f"failed: {type(exc).__name__}: {first_line(exc, 160)}"
        return row
    rep = res.report
    ref = bases[base] if recovering else None
    original_top1 = ref["original_top1"] if ref else rep["accuracy"]["original_top1"]
    row.update(status="ok", seconds=round(time.perf_counter() - start, 1),
               options={k: v for k, v in opts.items() if v is not None},
               top1=rep["accuracy"]["final_top1"], original_top1=original_top1,
               drop=round(original_top1 - rep["accuracy"]["final_top1"], 3),
               params=rep["final"]["params"], macs=rep["final"]["macs"],
               bytes=rep["final"]["bytes"],
               storage_bytes=ref["storage_bytes"] if ref else storage_bytes(rep),
               original_bytes=ref["original_bytes"] if ref else rep["original"]["bytes"])
    if ref and (row["params"], row["macs"]) != (ref["params"], ref["macs"]):
        row["status_note"] = "recover changed params/MACs (unexpected)"
    row["cr"] = round(row["original_bytes"] / row["storage_bytes"], 2)
    rec = next((p for p in rep["passes"] if p["name"] == "recover"), None)
    if rec:
        ex = rec["extra"]
        row["recover"] = {"steps": ex["steps"], "epochs": ex["epochs"],
                          "seconds": ex["train_seconds"], "hints": len(ex["hints"]),
                          "stopped_by_time": ex["stopped_by_time"],
                          "kept_epoch": ex.get("kept_epoch"),
                          "augment": ex["config"]["augment"],
                          "last_epoch": ex["loss_log"][-1] if ex["loss_log"] else None}
    compressed = res.graph.to_onnx()
    if recovering and not args.measure_recover_latency and "sr_bs1" in ref:
        # recover keeps the graph structure (op types, shapes, dtypes — checked by the
        # pass), so the compute is the base's: reuse its same-run measurement.
        for key in ("ort_bs1_original_ms", "ort_bs1_ms", "sr_bs1", "ort_bs64_original_ms",
                    "ort_bs64_ms", "sr_bs64"):
            row[key] = ref[key]
        row["latency_note"] = f"same structure as {base}: its latency"
    else:
        for bs in (1, 64):
            o, c = ort_latency_pair(original_proto, compressed, bs, threads=args.ort_threads)
            row[f"ort_bs{bs}_original_ms"] = round(o, 3)
            row[f"ort_bs{bs}_ms"] = round(c, 3)
            row[f"sr_bs{bs}"] = round(o / c, 2)
    if args.tvm != "none" and (args.tvm == "all" or config in args.tvm_configs) \
            and not recovering:
        ms, note = tvm_latency(compressed)
        row["tvm_x86_ms"], row["tvm_note"] = (round(ms, 3) if ms else None), note
    elif recovering and base in args.tvm_configs:
        row["tvm_x86_ms"] = bases[base].get("tvm_x86_ms")
        row["tvm_note"] = f"same structure as {base} (recover changes only values)"
    if not recovering:
        row["_model"] = compressed          # in memory only: the start of base+recover
        bases[base] = row
    return row


# ----------------------------------------------------------------------------------------
# Report


def fmt_int(v) -> str:
    return f"{v / 1e6:.3f} M" if v >= 1e6 else f"{v / 1e3:.1f} k"


def write_markdown(results: dict, path: pathlib.Path, plots: list, command: str) -> None:
    runs = results.get("runs") or [dict(results["meta"])]
    lines = ["# onnxc benchmarks: rate–distortion on CIFAR-10 ResNets", "",
             "Produced by the command(s) below — a `--merge` run, or one imported with "
             "`--import-rows`, replaces only the rows it lists (the numbers are whatever "
             "they measured; rerun to reproduce):", ""]
    for run in runs:
        lines += ["```", run.get("command", command), "```",
                  f"{run.get('started', '?')} → {run.get('finished', '(running)')}, load "
                  f"average {run.get('load_start', '?')} at start, "
                  f"{run.get('load_end', '?')} at end"
                  + (f", {run['suite_minutes']} min" if run.get("suite_minutes") else "")
                  + (f", commit {run['commit']}" if run.get("commit") else "")
                  + (f"; {run['note']}" if run.get("note") else "") + ".", ""]
    lines += [f"Machine: {results['meta']['machine']}, shared with other jobs: latencies "
              "are noisy, which is why original and compressed are timed interleaved in "
              "the same run and their ratio Sr is what to compare.", "",
             "- top-1 on `test_dev` (509 images); drop = original − compressed, in points.",
             "- size: bytes of the serialized ONNX model, or the packed storage a pass "
             "declares (ternary 2-bit, binary 1-bit); Cr = original size / size.",
             "- ORT: ONNX Runtime CPU, "
             f"{results['meta']['ort_threads']} threads, median ms per batch; Sr = original "
             "/ compressed latency, measured in the same run.",
             "- TVM x86: untuned Relax build via `onnxc.backends.tvm.x86_latency`, batch 1 "
             "(only for the listed configurations; +recover variants have the same graph "
             "structure as their base, so the same latency).",
             "- +recover rows reuse their base row's ORT latency unless run with "
             "`--measure-recover-latency`: recover changes only constant values, never op "
             "types or shapes, so the compute is identical.",
             "- +recover: the `recover` pass (distillation from the original, "
             "fake-quant/STE for quantized graphs) with the epochs and seconds shown: the "
             "suite runs every base row first, then splits what is left of the run's "
             "budget (`--budget-minutes` of the command above that made the row) among "
             "the +recover rows by fixed weights (most to the ResNet-56 rows with recovery "
             f"asks about); torch threads: {results['meta'].get('recover_threads', '?')}; "
             "augmentation flip+crop unless the row says mixup. See docs/recover.md.", ""]
    for model in results["models"]:
        rows = [r for r in results["rows"] if r["model"] == model]
        if not rows:
            continue
        meta = results["models"][model]
        lines += [f"## {model}", "",
                  f"Original: top-1 {meta.get('original_top1', '?')}%, "
                  f"{fmt_int(meta.get('params', 0))} params, {fmt_int(meta.get('macs', 0))} "
                  f"MACs, {meta.get('bytes', 0) / 1024:.0f} KiB. Prune criterion: "
                  f"{meta.get('criterion', '?')} (chosen on training images: "
                  f"{meta.get('criterion_scores', {})}).", "",
                  "| config | top-1 % | drop pt | params | MACs | size KiB | Cr | ORT bs1 ms "
                  "(orig) | Sr bs1 | ORT bs64 ms (orig) | Sr bs64 | TVM x86 bs1 ms | "
                  "recover |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['config']} | {r.get('status')} |" + " |" * 11)
                continue
            rec = r.get("recover")
            rec_s = (f"{rec['epochs']} ep, {rec['seconds']:.0f} s"
                     + (", hints" if rec["hints"] else "")
                     + (", mixup" if "mixup" in rec.get("augment", ()) else "")
                     + (", input weights kept" if rec.get("kept_epoch") == 0 else "")) \
                if rec else ""
            tvm = f"{r['tvm_x86_ms']:.2f}" if r.get("tvm_x86_ms") else \
                ("n/a" if "tvm_note" in r and "same structure" not in r["tvm_note"] else "")
            lines.append(
                f"| {r['config']} | {r['top1']:.2f} | {r['drop']:+.2f} | {fmt_int(r['params'])}"
                f" | {fmt_int(r['macs'])} | {r['storage_bytes'] / 1024:.0f} | {r['cr']:.2f}×"
                f" | {r['ort_bs1_ms']:.2f} ({r['ort_bs1_original_ms']:.2f}) | "
                f"{r['sr_bs1']:.2f}× | {r['ort_bs64_ms']:.1f} ({r['ort_bs64_original_ms']:.1f})"
                f" | {r['sr_bs64']:.2f}× | {tvm} | {rec_s} |")
        if meta.get("prune50_int8_params"):
            lines.append(f"\nprune50+int8 prunes with `--prune-flops 0.5 --prune-params "
                         f"{meta['prune50_int8_params']}`: the parameter share that makes "
                         f"the int8 model ≥ {meta.get('int8_cr_target', 10):g}× smaller, "
                         "computed from the int8 row's size (`params_share_for_cr`).")
        if meta.get("tvm_original_ms"):
            lines.append(f"\nTVM x86 original (bs 1): {meta['tvm_original_ms']:.2f} ms.")
        notes = [f"{r['config']}: TVM {r['tvm_note']}" for r in rows
                 if r.get("tvm_note") and not r.get("tvm_x86_ms")
                 and "same structure" not in r["tvm_note"]]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    lines += goals_section(results)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(path.parent)})" for p in plots]
        lines.append("")
    path.write_text("\n".join(lines))


GOALS = [  # (config, the recovery goal, check(row) -> met?)
    ("prune50+recover", "top-1 drop ≤ 0.5 pt (hand-written baseline: 3.5 pt)",
     lambda r: r["drop"] <= 0.5),
    ("prune50+int8+recover", "size Cr ≥ 10× and drop ≤ 1.0 pt",
     lambda r: r["cr"] >= 10 and r["drop"] <= 1.0),
    ("ternary+recover", "drop ≤ 3 pt", lambda r: r["drop"] <= 3),
    ("binary+recover", "report", None),
]


def goals_section(results: dict) -> list:
    """The recovery goals' figures for ResNet-56, read from the rows above."""
    rows = {r["config"]: r for r in results["rows"]
            if r["model"] == "resnet56" and r.get("status") == "ok"}
    if not any(c in rows for c, _, _ in GOALS):
        return []
    out = ["## Recovery goals (ResNet-56)", "",
           "| configuration | goal | measured | met |", "|---|---|---|---|"]
    for config, goal, check in GOALS:
        r = rows.get(config)
        if r is None:
            out.append(f"| {config} | {goal} | not run | |")
            continue
        rec = r.get("recover") or {}
        measured = (f"top-1 {r['top1']:.2f}% (drop {r['drop']:.2f} pt), Cr {r['cr']:.2f}×, "
                    f"recover {rec.get('epochs', 0)} epochs / {rec.get('seconds', 0):.0f} s")
        met = "" if check is None else ("yes" if check(r) else "no")
        out.append(f"| {config} | {goal} | {measured} | {met} |")
    out.append("")
    return out


def write_plots(results: dict, out_dir: pathlib.Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for key, label, fname in (("cr", "compression ratio Cr (size, log scale)", "top1_vs_cr.png"),
                              ("sr_bs1", "speed-up Sr (ORT, batch 1, log scale)",
                               "top1_vs_sr.png")):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for model, color in zip(results["models"], ("tab:blue", "tab:red", "tab:green")):
            rows = [r for r in results["rows"] if r["model"] == model and r.get("status") == "ok"]
            for recovered, marker in ((False, "o"), (True, "^")):
                pts = [r for r in rows if r["config"].endswith("+recover") == recovered]
                if not pts:
                    continue
                ax.scatter([r[key] for r in pts], [r["top1"] for r in pts], color=color,
                           marker=marker, alpha=0.85,
                           label=f"{model}{' +recover' if recovered else ''}")
                for r in pts:
                    ax.annotate(r["config"].replace("+recover", "+r"), (r[key], r["top1"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
            orig = results["models"][model].get("original_top1")
            if orig is not None:
                ax.axhline(orig, color=color, lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 on test_dev (%)")
        ax.set_title(f"top-1 vs {key.split('_')[0].upper()} (dashed: original)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS),
                   help=f"comma-separated subset of: {', '.join(ALL_CONFIGS)}")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--plots", default=str(REPO / "docs" / "bench"))
    p.add_argument("--json", default=str(REPO / "docs" / "bench" / "results.json"))
    p.add_argument("--merge", action="store_true", help="keep rows of other (model, config)")
    p.add_argument("--budget-minutes", type=float, default=40.0,
                   help="wall-clock target of the whole run: the +recover rows share "
                        "what the base rows leave of it (by RECOVER_WEIGHTS)")
    p.add_argument("--recover-epochs", type=float, default=60.0,
                   help="epoch cap for recover (the time budget normally ends it first)")
    p.add_argument("--recover-hints", default="auto")
    p.add_argument("--recover-augment", default=None,
                   help="recover's --recover-augment (default: the pass's flip,crop)")
    p.add_argument("--threads", default="auto",
                   help="torch threads for recover; auto: 2 when the 1-minute load average "
                        "is below 2.5 at the start, else 1 (on a busy 2-core box one thread "
                        "trained 2-3x faster than two: OpenMP threads spin-wait for a core)")
    p.add_argument("--ort-threads", type=int, default=2)
    p.add_argument("--tvm", choices=("none", "some", "all"), default="some")
    p.add_argument("--tvm-configs", default=",".join(TVM_DEFAULT))
    p.add_argument("--measure-recover-latency", action="store_true",
                   help="time +recover rows too (default: reuse the base row's figures, "
                        "the graph structure being identical)")
    p.add_argument("--int8-cr-target", type=float, default=10.0,
                   help="prune50+int8 also removes the share of parameters (--prune-params) "
                        "that makes its int8 model this many times smaller than the "
                        "original, computed from the int8 row's size (0: FLOPs only)")
    p.add_argument("--p50i8-params", type=float, default=None,
                   help="--prune-params for prune50+int8 when the int8 row is not run")
    p.add_argument("--criterion", default=None,
                   help="prune criterion to use instead of selecting one")
    p.add_argument("--import-rows", default=None, metavar="JSON",
                   help="replace rows of --json with those of another results file (a "
                        "run written elsewhere, e.g. while the main run was going) and "
                        "rewrite the report")
    p.add_argument("--render", action="store_true",
                   help="only rewrite BENCHMARKS.md and the plots from --json")
    p.add_argument("--tvm-only", action="store_true",
                   help="only add TVM latencies to the rows already in --json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.tvm_configs = [c.strip() for c in args.tvm_configs.split(",")]
    args.params_share = {}
    if args.threads == "auto":
        args.threads = 2 if os.getloadavg()[0] < 2.5 else 1
    else:
        args.threads = int(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in ALL_CONFIGS]
    if bad:
        p.error(f"unknown configuration(s): {', '.join(bad)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    command = "python tools/bench_suite.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:])

    import torch

    from onnxc import frontend
    from onnxc.pipeline import all_passes

    torch.set_num_threads(args.threads)
    registry = all_passes()
    json_path, out, plot_dir = pathlib.Path(args.json), pathlib.Path(args.out), \
        pathlib.Path(args.plots)
    results = {"rows": [], "models": {}}
    if args.merge and json_path.exists():
        results = json.loads(json_path.read_text())
        results["rows"] = [r for r in results["rows"]
                           if not (r["model"] in models and r["config"] in configs)]
    run = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_start": round(os.getloadavg()[0], 1), "commit": _commit()}
    if args.render:
        results = json.loads(json_path.read_text())
        _save(results, json_path, out, plot_dir, command)
        return 0
    if args.import_rows:
        results = json.loads(json_path.read_text())
        other = json.loads(pathlib.Path(args.import_rows).read_text())
        keys = {(r["model"], r["config"]) for r in other["rows"] if r.get("status") == "ok"}
        results["rows"] = [r for r in results["rows"] if (r["model"], r["config"]) not in keys]
        results["rows"] += [r for r in other["rows"] if (r["model"], r["config"]) in keys]
        order = {c: i for i, c in enumerate(ALL_CONFIGS)}
        results["rows"].sort(key=lambda r: (list(MODELS).index(r["model"]), order[r["config"]]))
        results.setdefault("runs", [dict(results["meta"])]).extend(
            other.get("runs") or [dict(other["meta"])])
        results["runs"].append(dict(run, finished=run["started"],
                                    note=f"rows {sorted(keys)} imported from that run"))
        _save(results, json_path, out, plot_dir, command)
        log(f"imported {len(keys)} row(s) from {args.import_rows}")
        return 0
    if args.tvm_only:
        results = json.loads(json_path.read_text())
        fill_tvm(results, models, args)
        results.setdefault("runs", [dict(results["meta"])]).append(
            dict(run, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                 load_end=round(os.getloadavg()[0], 1)))
        _save(results, json_path, out, plot_dir, command)
        return 0
    if args.merge and "meta" in results:
        results.setdefault("runs", [dict(results["meta"])]).append(run)
    else:
        results["runs"] = [run]
    results["meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                       "ort_threads": args.ort_threads, "recover_threads": args.threads,
                       "budget_minutes": args.budget_minutes,
                       "passes_registered": sorted(registry)}
    suite_start = time.perf_counter()
    deadline = suite_start + 60.0 * args.budget_minutes
    order = {c: i for i, c in enumerate(ALL_CONFIGS)}

    def record(model, config, row, bases):
        base = config.replace("+recover", "")
        if base != config and base not in configs and base in bases \
                and not any(r is bases[base] for r in results["rows"]):
            results["rows"] = [r for r in results["rows"]
                               if (r["model"], r["config"]) != (model, base)]
            results["rows"].append(bases[base])     # measured anyway: report it
        results["rows"].append(row)
        if row.get("status") == "ok":
            rec = row.get("recover")
            log(f"{model} {config}: top-1 {row['top1']:.2f} (drop {row['drop']:+.2f}) "
                f"Cr {row['cr']:.2f}x Sr bs1 {row['sr_bs1']:.2f}x bs64 "
                f"{row['sr_bs64']:.2f}x in {row['seconds']:.0f} s"
                + (f" (recover {rec['epochs']} epochs, {rec['seconds']:.0f} s)" if rec
                   else ""))
        else:
            log(f"{model} {config}: {row['status']}")
        results["rows"].sort(key=lambda r: (list(MODELS).index(r["model"]),
                                            order[r["config"]]))
        _save(results, json_path, out, plot_dir, command, plots=False)

    # Phase 1: every base row (and the bases the +recover rows start from).
    state = {}
    for model in models:
        path = SHARED / "models" / MODELS[model]
        graph = frontend.load(str(path))
        train, test = datasets(graph)
        from onnxc.verify import top1

        meta = results["models"].setdefault(model, {})
        stats = graph.stats()
        meta.update(original_top1=round(top1(graph, test), 3), params=stats.params,
                    macs=stats.macs, bytes=stats.bytes)
        original_proto = graph.to_onnx()
        if args.criterion:
            meta["criterion"] = args.criterion
        elif any("prune" in c for c in configs):
            cache = results.setdefault("criteria", {})
            crit = select_criterion(path, graph, train, registry, cache, model)
            meta["criterion"] = crit
            meta["criterion_scores"] = cache.get(model, {}).get("train_top1_at_prune50", {})
        crit = meta.get("criterion", "l1")
        if args.tvm != "none" and "original" in args.tvm_configs \
                and not meta.get("tvm_original_ms"):
            ms, note = tvm_latency(original_proto)
            meta["tvm_original_ms"], meta["tvm_original_note"] = ms, note
            log(f"{model}: TVM x86 original {ms} ms ({note})")
        bases: dict = {}
        state[model] = (path, crit, train, test, original_proto, bases)
        for config in configs:
            base = config.replace("+recover", "")
            if config.endswith("+recover") and base in configs:
                continue                             # its base row comes by itself
            log(f"{model} {base} ...")
            row = run_config(model, path, base, crit, train, test, original_proto, args,
                             bases)
            if base == "int8" and row.get("status") == "ok" and args.int8_cr_target:
                share = params_share_for_cr(row["original_bytes"], meta["params"],
                                            row["storage_bytes"], args.int8_cr_target)
                args.params_share[model] = share
                meta["prune50_int8_params"] = share
                meta["int8_cr_target"] = args.int8_cr_target
                log(f"{model}: int8 model {row['storage_bytes']:,} B -> prune50+int8 "
                    f"removes {100 * share:.1f}% of params for Cr >= {args.int8_cr_target}")
            if base in configs:
                record(model, base, row, bases)
            elif row.get("status") == "ok":
                log(f"{model} {base} (base of {config}): top-1 {row['top1']:.2f}")
    phase1 = (time.perf_counter() - suite_start) / 60
    _save(results, json_path, out, plot_dir, command)
    # Phase 2: +recover rows share what is left of the budget.
    pending = [(m, c) for m in models for c in configs if c.endswith("+recover")]
    if pending:
        left = deadline - time.perf_counter()
        log(f"base rows took {phase1:.1f} min; {left / 60:.1f} min left for "
            f"{len(pending)} +recover rows")
    while pending:
        model, config = pending[0]
        path, crit, train, test, original_proto, bases = state[model]
        minutes = recover_minutes(pending, deadline - time.perf_counter())
        log(f"{model} {config} (recover budget {minutes:.2f} min) ...")
        row = run_config(model, path, config, crit, train, test, original_proto, args,
                         bases, minutes=minutes)
        record(model, config, row, bases)
        pending.pop(0)
    run["phase1_minutes"] = round(phase1, 1)
    run.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"),
               load_end=round(os.getloadavg()[0], 1),
               suite_minutes=round((time.perf_counter() - suite_start) / 60, 1))
    _save(results, json_path, out, plot_dir, command)
    log(f"done in {run['suite_minutes']} min: {out}")
    return 0


def fill_tvm(results: dict, models: list, args) -> None:
    """Add TVM x86 latencies to an existing results file: the original and the
    configurations in --tvm-configs are compressed again (same seed, so the same graph)
    and built; their +recover rows share the structure, hence the latency."""
    from onnxc import frontend
    from onnxc.compress import compress

    for model in models:
        path = SHARED / "models" / MODELS[model]
        graph = frontend.load(str(path))
        train, _ = datasets(graph)
        meta = results["models"].setdefault(model, {})
        if "original" in args.tvm_configs:
            ms, note = tvm_latency(graph.to_onnx())
            meta["tvm_original_ms"], meta["tvm_original_note"] = ms, note
            log(f"{model}: TVM x86 original {ms} ms ({note})")
        for config in args.tvm_configs:
            if config == "original" or config not in BASE_CONFIGS:
                continue
            rows = [r for r in results["rows"] if r["model"] == model
                    and r["config"] in (config, config + "+recover") and r.get("status") == "ok"]
            if not rows:
                continue
            opts = options_for(model, config, meta.get("criterion", "l1"), args)
            res = compress(str(path), needed_passes(config), options=opts,
                           calibration=train, seed=0, log=lambda m: None)
            ms, note = tvm_latency(res.graph.to_onnx())
            log(f"{model} {config}: TVM x86 {ms} ms ({note})")
            for r in rows:
                r["tvm_x86_ms"] = round(ms, 3) if ms else None
                r["tvm_note"] = note if r["config"] == config else \
                    f"same structure as {config} (recover changes only values)"


def _commit() -> str:
    """The checkout's commit, "+ local changes" when its tracked files differ from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + (" + local changes" if dirty else "")


def _save(results, json_path, out, plot_dir, command, plots: bool = True) -> None:
    """JSON and BENCHMARKS.md; the plots too unless ``plots`` is False (matplotlib
    costs seconds per call: the suite redraws them only at the end of each phase)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    clean = dict(results, rows=[{k: v for k, v in r.items() if not k.startswith("_")}
                                for r in results["rows"]])
    json_path.write_text(json.dumps(clean, indent=1, default=str) + "\n")
    made = (write_plots(results, plot_dir) if plots else
            [plot_dir / n for n in ("top1_vs_cr.png", "top1_vs_sr.png")
             if (plot_dir / n).exists()]) if results["rows"] else []
    write_markdown(results, out, made, command)


if __name__ == "__main__":
    sys.exit(main())
