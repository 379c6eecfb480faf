"""``compress``: frontend → passes (each verified) → final verification → backend artifact.

The artifact directory is assembled in a temporary sibling directory and renamed
into place only when everything succeeded, so a failure never leaves a partial
artifact; an existing artifact at the destination is replaced only then.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import onnx

from .errors import OutputError, VerificationError
from .ir import Graph
from .options import Option, check_keys, configure, declare, positive_int, reserve
from .pipeline import Context, PassManager, resolve_passes
from .recipe import sha256_file
from .verify import compare_outputs, top1
from .version import __version__

REPORT_SCHEMA_VERSION = 1

# Settings of the whole run that the API takes in ``options`` too (the CLI's data flags).
RUN_OPTIONS = (
    Option("--calib-samples", positive_int, None,
           "use the first N calibration samples (default: all, max 512)"),
    Option("--scale", str, None, "multiply raw values first (e.g. 1/255)"),
    Option("--mean", str, None, "per-channel mean, e.g. 0.485,0.456,0.406"),
    Option("--std", str, None, "per-channel std, e.g. 0.229,0.224,0.225"),
    Option("--layout", str, "NCHW", "layout of stored images (converted to NCHW)",
           choices=("NCHW", "NHWC")),
)
declare("onnxc compress", RUN_OPTIONS)
# Flags of the compress command that are arguments of compress(), not options.
reserve("onnxc compress", ("--passes", "--target", "--output", "-o", "--input-shape",
                           "--seed", "--tolerance", "--max-accuracy-drop", "--quiet",
                           "--calib-data", "--eval-data", "--eval-samples", "--input-data",
                           "--require-speedup", "--no-speed-check",
                           "--debug", "--help", "-h"))


@dataclass
class CompressResult:
    graph: Graph
    report: dict
    out_dir: str | None


def check_output_dir(out_dir: str) -> None:
    """Fail before any work if the artifact cannot be written there."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"output path exists and is not a directory: {out_dir}")
    # Missing parents are created at the end; the nearest existing one must be writable.
    ancestor = os.path.dirname(out_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"output path is below a file, not a directory: {ancestor}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"output directory is not writable: {ancestor}")


def compress(model, passes, target: str = "onnx", out_dir: str | None = None,
             options: dict | None = None, input_shapes: dict | None = None,
             calibration=None, evaluation=None, calibration_loader=None,
             evaluation_loader=None, seed: int = 0, tolerance: float = 1e-5,
             max_accuracy_drop: float | None = None, log=None,
             require_speedup: float | None = None, speed_check: bool = True
             ) -> CompressResult:
    """Compress ``model`` (path, bytes or ModelProto) with ``passes`` for ``target``.

    ``options`` maps option keys (``prune_ratio``; flag names without dashes, see
    ``onnxc compress --help``) to values, strings or typed; each pass and the backend
    take theirs, and an unknown key is a UsageError. ``calibration_loader`` /
    ``evaluation_loader`` are callables ``graph -> Dataset`` used when the data has to
    be checked against the canonical graph's inputs.
    ``speed_check`` times an artifact that runs here against ONNX Runtime (see
    :mod:`onnxc.speed`); ``require_speedup`` X fails the build (VerificationError,
    nothing written) unless the artifact is X times faster than the original.
    """
    from . import speed as speed_mod
    from onnxc import frontend
    from onnxc.backends import get_backend
    from onnxc.calibrate.readers import Preprocess

    started = time.perf_counter()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if out_dir is not None:
        check_output_dir(out_dir)
    pass_list = resolve_passes(list(passes), options)
    backend = get_backend(target, options)
    check_keys(options)
    run = configure("onnxc compress", RUN_OPTIONS, options)
    preprocess = Preprocess.from_strings(run.scale, run.mean, run.std, run.layout)
    speed_mod.validate_required(require_speedup, target, backend.config)
    input_hash = sha256_file(model)

    notes: list = []
    graph = frontend.load(model, input_shapes=input_shapes, notes=notes,
                          static_shapes=backend.static_shapes)
    if calibration is None and calibration_loader is not None:
        calibration = calibration_loader(graph)
    if evaluation is None and evaluation_loader is not None:
        evaluation = evaluation_loader(graph)
    ctx = Context(seed=seed, calibration=calibration, evaluation=evaluation,
                  original=graph.copy(), log=log, calib_samples=run.calib_samples,
                  preprocess=preprocess)
    # Rank / channel rounding defaults follow the target's kernels (passes read it).
    ctx.channel_multiple = getattr(backend, "channel_multiple", 1)
    for msg in notes:
        ctx.log(f"  frontend: {msg}")

    result = PassManager(pass_list, tolerance=tolerance, backend=backend).run(graph, ctx)
    final, reports = result.graph, result.reports
    original_stats, final_stats = result.original_stats, result.final_stats
    verifier = result.verifier
    overall = compare_outputs(result.original_outputs, result.final_outputs,
                              len(verifier.dataset))
    accuracy = None
    if evaluation is not None and evaluation.labels is not None:
        before = top1(ctx.original, evaluation)
        after = top1(final, evaluation)
        accuracy = {"samples": len(evaluation), "original_top1": round(before, 3),
                    "final_top1": round(after, 3), "drop": round(before - after, 3)}
        ctx.log(f"  top-1 {before:.2f}% -> {after:.2f}% on {len(evaluation)} samples")

    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "onnxc_version": __version__,
        "input": {"path": str(model) if isinstance(model, (str, os.PathLike)) else None,
                  "sha256": input_hash},
        "target": target,
        "options": options,                       # as given; passes[].config has all
        "target_config": backend.config.as_dict(),
        "run_config": run.as_dict(),
        "frontend_notes": notes,
        "passes": [r.as_dict() for r in reports],
        "original": original_stats.as_dict(),
        "final": final_stats.as_dict(),
        "compression_ratio": round(original_stats.bytes / max(final_stats.bytes, 1), 4),
        "mac_ratio": round(original_stats.macs / max(final_stats.macs, 1), 4)
        if original_stats.macs else None,
        "error": overall.as_dict(),
        "verification": {"samples": overall.samples,
                         "data": "synthetic" if verifier.dataset.synthetic
                         else verifier.dataset.source},
        "accuracy": accuracy,
        "timings": {"passes_seconds": round(sum(r.seconds for r in reports), 3)},
        "calibration": {"data": "synthetic" if getattr(ctx, "synthetic_calibration", False)
                        else ("given" if calibration is not None else "not used")},
    }
    # Passes may declare a true storage size (packed low-bit or sparse weights).
    storage = [r.extra.get("storage_bytes") for r in reports if "storage_bytes" in r.extra]
    if storage:
        report["storage_bytes"] = storage[-1]
        report["storage_compression_ratio"] = round(original_stats.bytes / storage[-1], 4)

    # Budget checked before anything is written: a failed run leaves no artifact.
    if max_accuracy_drop is not None and accuracy is not None \
            and accuracy["drop"] > max_accuracy_drop:
        raise VerificationError(f"top-1 dropped {accuracy['drop']:.2f} pt, more than "
                                f"--max-accuracy-drop {max_accuracy_drop}")
    if out_dir is not None:
        speed = {"require": require_speedup} if speed_check or require_speedup else None
        write_artifact(out_dir, final, report, reports, backend, ctx, speed=speed)
    report["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    if out_dir is not None:   # the total is known only now; rewrite report.json in place
        _write_json(os.path.join(out_dir, "report.json"), report)
    if input_hash is not None and sha256_file(model) != input_hash:
        raise OutputError("the input model file changed during the run")  # never expected
    return CompressResult(final, report, out_dir)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_artifact(out_dir, graph, report, pass_reports, backend, ctx,
                   speed: dict | None = None) -> None:
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".onnxc-", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        model = graph.to_onnx()
        onnx.save(model, os.path.join(staging, "model.onnx"))
        for r in pass_reports:
            for name, data in r.files.items():
                path = os.path.join(staging, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        backend.build(graph, ctx, staging, report)
        if speed is not None:
            from . import speed as speed_mod

            report["speed"] = speed_mod.measure(report["target"], staging, graph,
                                                ctx.original, log=ctx.log)
            speed_mod.check_required(report["speed"], speed.get("require"))
        report["artifacts"] = sorted(
            os.path.relpath(os.path.join(d, f), staging)
            for d, _, files in os.walk(staging) for f in files) + ["README.md", "report.json"]
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(deployer_readme(report))
        _write_json(os.path.join(staging, "report.json"), report)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".onnxc-old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def deployer_readme(report: dict) -> str:
    acc = report.get("accuracy")
    lines = [
        "# onnxc artifact", "",
        f"Target: `{report['target']}`. Passes: "
        + ", ".join(p["name"] for p in report["passes"]) + ".", "",
        "| | original | compressed |", "|---|---|---|",
        f"| params | {report['original']['params']:,} | {report['final']['params']:,} |",
        f"| MACs | {report['original']['macs']:,} | {report['final']['macs']:,} |",
        f"| size (bytes) | {report['original']['bytes']:,} | {report['final']['bytes']:,} |",
        "",
        f"Compression ratio Cr = {report['compression_ratio']}"
        + (f"; storage Cr with packed weights = {report['storage_compression_ratio']}"
           if "storage_compression_ratio" in report else "") + ".",
        f"Max relative output error vs the original: {report['error']['max_rel']:.3e}"
        f" over {report['error']['samples']} samples ({report['verification']['data']}).",
    ]
    if acc:
        lines.append(f"Top-1: {acc['original_top1']}% -> {acc['final_top1']}% "
                     f"(drop {acc['drop']} pt, {acc['samples']} samples).")
    lines += _speed_section(report)
    lines += ["", "## Files", ""]
    lines += [f"- `{a}`" for a in report.get("artifacts", [])]
    runtime = report.get("runtime", {})
    if runtime.get("load"):
        lines += ["", "## Load", "", "```python", runtime["load"], "```"]
    lines += ["", "`report.json` follows onnxc report schema version "
              f"{report['schema_version']} (see the onnxc README).", ""]
    return "\n".join(lines)


def _speed_section(report: dict) -> list:
    """What the artifact's speed is and why: measured latency, tuning, calibration data."""
    from .speed import summary_line

    lines = ["", "## Speed", ""]
    speed = report.get("speed")
    if speed:
        lines.append(f"Measured at build time: {summary_line(speed)}"
                     + (f", on {speed['cpu']}." if speed.get("measured") else "."))
    runtime = report.get("runtime") or {}
    if runtime.get("name") == "tvm":
        t = runtime.get("tuning") or {}
        state = runtime.get("tuned", "untuned")
        if state == "untuned":
            lines.append("Tuning: **untuned** — TVM's default schedules. Untuned TVM ran "
                         "50-80x slower than ONNX Runtime on ResNet-56 on x86 here "
                         "(docs/tvm.md); tune with `--tune-minutes M` or `--tune-trials N`.")
        else:
            where = t.get("measured_on") or "records from the tuning database (earlier runs)"
            lines.append(
                f"Tuning: **{state}** — {t.get('trials', 0)} trials measured in this build "
                f"({t.get('seconds', 0) / 60:.1f} min" + (f" of a {t['minutes']:g}-minute "
                                                          f"budget" if t.get("minutes") else "")
                + f"), {t.get('cached', 0)}/{t.get('tasks', 0)} tasks from the database "
                f"({t.get('trials_in_db', 0)} records for this model's tasks in all); "
                f"measured on: {where}.")
            if t.get("untuned_kernels"):
                lines.append(f"{len(t['untuned_kernels'])} kernel(s) run TVM's default "
                             f"schedule (their database record did not fit them).")
        if runtime.get("how_to_tune"):
            lines.append(f"This machine cannot run {report['target']} code, so nothing "
                         f"measured this library's speed. To tune it on the device, "
                         f"{runtime['how_to_tune']}.")
    calib = (report.get("calibration") or {}).get("data")
    if calib == "synthetic":
        lines.append("Calibration: **synthetic** (seeded random inputs, no --calib-data): "
                     "quantization ranges were not fit to real data, so accuracy can be "
                     "far below a calibrated build.")
    elif calib == "given":
        lines.append("Calibration: on the data given with --calib-data.")
    return lines if len(lines) > 3 else []
