"""Speed check of a build: the artifact next to ONNX Runtime, in the same process.

Every build whose artifact runs on this machine times three things on the same random
input, interleaved round by round so that load on a shared machine hits all alike
(ratios within one run, never absolute targets): the artifact, ONNX Runtime on the
compressed model, and ONNX Runtime on the original model. ``report["speed"]`` holds
the medians and ratios; ``--require-speedup X`` fails the build when the artifact is
not X times faster than the original on ONNX Runtime.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from .errors import OnnxcError, UsageError, VerificationError

# Time for the timed rounds of all three runners together (warm-up not counted);
# at least MIN_ROUNDS rounds however slow the artifact is (untuned TVM: ~0.1 s/run).
BUDGET_SECONDS = 3.0
MIN_ROUNDS, MAX_ROUNDS, WARMUP = 3, 30, 2


def cpu_name() -> str:
    """This machine's CPU model (``/proc/cpuinfo``), e.g. 'AMD EPYC 9R14 96-Core'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    # Interleaved sessions in one process: a spinning pool would steal the next
    # runner's cores and bias the ratios.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def artifact_runner(target: str, out_dir: str):
    """(callable feeds -> outputs, None) for the artifact in ``out_dir``, or
    (None, reason) when it cannot run on this machine."""
    if target == "onnx":
        import onnx

        sess = _ort_session(onnx.load(os.path.join(out_dir, "model.onnx")))
        return (lambda feeds: sess.run(None, feeds)), None
    if target in ("x86", "arm", "cuda"):
        from onnxc.backends import all_backends

        try:
            art = all_backends()[target].load_artifact(out_dir)
        except OnnxcError as exc:
            return None, str(exc)

        def run(feeds):
            out = art.run(feeds)
            art.sync()
            return out
        return run, None
    return None, f"the {target} artifact is not timed here (no native runtime on this machine)"


def can_time(target: str, config) -> tuple[bool, str]:
    """Whether this machine can time a ``target`` artifact, before anything is built
    (``config``: the configured backend's options)."""
    if target == "onnx":
        return True, ""
    if target in ("x86", "arm", "cuda"):
        from onnxc.backends.tvm import targets

        spec = targets.resolve(target, config)
        if spec.runs_here:
            return True, ""
        return False, f"a {target} artifact does not run on this machine"
    return False, f"a {target} artifact has no native runtime on this machine"


def _feeds(graph, out_dir: str, seed: int = 0) -> dict:
    """Random inputs of the artifact's own static shapes (TVM fixed the batch)."""
    import json

    rng = np.random.default_rng(seed)
    target_file = os.path.join(out_dir, "target.json")
    if os.path.isfile(target_file):
        with open(target_file) as f:
            specs = json.load(f)["inputs"]
    else:
        specs = [{"name": i.name, "shape": [d if isinstance(d, int) and d > 0 else 1
                                             for d in i.shape],
                  "dtype": np.dtype(i.dtype).name} for i in graph.gs.inputs]
    feeds = {}
    for s in specs:
        dtype = np.dtype(s["dtype"])
        feeds[s["name"]] = (rng.standard_normal(s["shape"]).astype(dtype)
                            if dtype.kind == "f" else np.zeros(s["shape"], dtype))
    return feeds


def measure(target: str, out_dir: str, graph, original, log=None) -> dict:
    """Median latency of the artifact, ORT on ``graph`` and ORT on ``original``.

    A speed check that cannot run (e.g. ONNX Runtime refuses the original) does not
    fail the build: the reason is reported instead (``--require-speedup`` then fails).
    """
    log = log or (lambda m: None)
    try:
        return _measure(target, out_dir, graph, original, log)
    except Exception as exc:   # noqa: BLE001 - reported, never fatal on its own
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        result = {"measured": False, "reason": f"timing failed: {type(exc).__name__}: "
                                                f"{first}"}
        log(f"  speed: {summary_line(result)}")
        return result


def _measure(target, out_dir, graph, original, log) -> dict:
    run, reason = artifact_runner(target, out_dir)
    if run is None:
        return {"measured": False, "reason": reason}
    feeds = _feeds(graph, out_dir)
    ort_c = _ort_session(graph.to_onnx())
    ort_o = _ort_session(original.to_onnx())
    runners = {"artifact": run,
               "ort_compressed": lambda f: ort_c.run(None, f),
               "ort_original": lambda f: ort_o.run(None, f)}
    for fn in runners.values():
        for _ in range(WARMUP):
            fn(feeds)
    times = {k: [] for k in runners}

    def one_round():
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    one_round()
    per_round = time.perf_counter() - t0
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_SECONDS / max(per_round, 1e-6))))
    for _ in range(rounds - 1):
        one_round()
    med = {k: statistics.median(v) for k, v in times.items()}
    batch = next(iter(feeds.values())).shape[0] if feeds else None
    result = {
        "measured": True, "batch": int(batch) if batch is not None else None,
        "rounds": rounds, "cpu": cpu_name(), "threads": os.cpu_count(),
        "artifact_ms": round(med["artifact"], 4),
        "ort_compressed_ms": round(med["ort_compressed"], 4),
        "ort_original_ms": round(med["ort_original"], 4),
        "speedup_vs_original": round(med["ort_original"] / med["artifact"], 3),
        "speedup_vs_ort_compressed": round(med["ort_compressed"] / med["artifact"], 3),
        "method": "same process, interleaved rounds after warm-up, medians; the original "
                  "on ONNX Runtime is the baseline",
    }
    log(f"  speed: {summary_line(result)}")
    return result


def summary_line(speed: dict) -> str:
    if not speed or not speed.get("measured"):
        return f"not measured ({(speed or {}).get('reason', 'no speed check')})"
    return (f"batch {speed['batch']}: artifact {speed['artifact_ms']:.2f} ms, ONNX Runtime "
            f"{speed['ort_compressed_ms']:.2f} ms on the compressed model, "
            f"{speed['ort_original_ms']:.2f} ms on the original -> "
            f"{speed['speedup_vs_original']:.2f}x the original "
            f"(median of {speed['rounds']})")


def check_required(speed: dict, required: float | None) -> None:
    """``--require-speedup``: VerificationError (exit 5) when not met or not measurable."""
    if required is None:
        return
    if not speed.get("measured"):
        raise VerificationError(f"--require-speedup {required:g}: the artifact's speed "
                                f"could not be measured ({speed.get('reason')})")
    if speed["speedup_vs_original"] < required:
        raise VerificationError(
            f"the artifact runs {speed['speedup_vs_original']:.2f}x as fast as the original "
            f"on ONNX Runtime ({speed['artifact_ms']:.2f} vs {speed['ort_original_ms']:.2f} "
            f"ms, batch {speed['batch']}), less than --require-speedup {required:g}")


def validate_required(required, target: str, config) -> None:
    """Fail before any work when ``--require-speedup`` cannot be checked or is invalid."""
    if required is None:
        return
    if not required > 0:
        raise UsageError(f"--require-speedup must be a positive factor, got {required:g}")
    ok, reason = can_time(target, config)
    if not ok:
        raise UsageError(f"--require-speedup needs an artifact that runs here: {reason}")
