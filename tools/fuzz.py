"""Fuzz campaign for the `onnxc compress` command line.

    python tools/fuzz.py --minutes 10 --seed 0 --save /tmp/fuzz-failures

Each case builds a model — a random but valid CNN (convs with strides, groups and
dilations, BN, residual adds, concats, pools, FC heads, dynamic batch), or a broken one
(bytes flipped or cut, an initializer missing, a weight of the wrong shape, NaN weights,
an unknown op), sometimes with calibration images (valid, or of the wrong shape, NaN,
empty, flat, under the wrong key) and the recover pass — and runs `onnxc compress` on it in-process through `onnxc.cli.main` with
a random pass list and options. What must hold, whatever the input:

- no "internal error" (exit 1) and no exception escaping the CLI;
- the input file is byte-identical afterwards;
- a failure prints `onnxc: error: ...` on one line and leaves no output directory;
- a success leaves model.onnx and report.json, and model.onnx passes the ONNX checker and
  runs in ONNX Runtime;
- a *valid* model never fails verification (exit 5), and with exact passes only
  (cleanup, fold_bn) it always succeeds.

Failures are printed with the command that reproduces them; with --save DIR the model
and its command are kept there. Exit status 1 when any case failed. tests/test_fuzz.py
runs a short campaign of this in the default suite; this script is for long ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxc.errors import first_line

UNARY = ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "Identity", "Dropout", "Clip", "HardSigmoid"]
LOSSY = ["prune", "lowrank", "sparsify", "gap"]
QUANT = ["int8", "ternary", "binary"]          # at most one of them per case
EXACT = {"cleanup", "fold_bn"}
CASE_SECONDS = 120


# ----------------------------------------------------------------------------------------
# Model generators


class _Builder:
    """Tracks the running tensor's channels and spatial size while ops are appended."""

    def __init__(self, rng: np.random.Generator, c: int, h: int, w: int):
        self.rng, self.c, self.h, self.w = rng, c, h, w
        self.nodes, self.inits, self.cur, self.n = [], [], "x", 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def const(self, stem: str, array) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list, **attrs) -> str:
        out = self.name("t")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()),
                                           **attrs))
        return out

    def conv(self, src: str, cin: int, co: int, k: int, stride=1, group=1, dilation=1,
             bias=True) -> str:
        pad = dilation * (k // 2)
        w = self.const("w", self.rng.normal(0, 1 / np.sqrt(cin * k * k // group),
                                            (co, cin // group, k, k)))
        ins = [src, w] + ([self.const("b", self.rng.normal(0, 0.1, co))] if bias else [])
        self.h = (self.h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        self.w = (self.w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[stride] * 2,
                         pads=[pad] * 4, group=group, dilations=[dilation] * 2)


def random_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A valid random CNN: every model this returns is well-formed and runs in ORT."""
    c = int(rng.integers(1, 9))
    hw = int(rng.integers(4, 17))
    b = _Builder(rng, c, hw, hw)
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.choice(["conv", "conv", "conv", "bn", "unary", "residual", "concat",
                           "pool", "deconv", "scale"])
        if kind == "conv":
            k = int(rng.choice([1, 3, 5]))
            stride = int(rng.choice([1, 1, 2])) if min(b.h, b.w) >= 4 else 1
            dilation = int(rng.choice([1, 1, 2])) if k > 1 and stride == 1 else 1
            group, co = 1, int(rng.integers(1, 17))
            if b.c > 1 and rng.random() < 0.3:               # grouped (group = C: depthwise)
                group = int(rng.choice([g for g in range(2, b.c + 1) if b.c % g == 0]))
                co = group * int(rng.integers(1, 3))
            b.cur = b.conv(b.cur, b.c, co, k, stride, group, dilation,
                           bias=bool(rng.random() < 0.7))
            b.c = co
        elif kind == "bn":
            parts = [b.const("bn", rng.uniform(lo, hi, b.c))
                     for lo, hi in [(0.5, 1.5), (-1, 1), (-1, 1), (0.1, 2)]]
            b.cur = b.node("BatchNormalization", [b.cur] + parts)
        elif kind == "unary":
            op = str(rng.choice(UNARY))
            ins = [b.cur]
            if op == "Clip":
                ins += [b.const("lo", 0.0), b.const("hi", 6.0)]
            b.cur = b.node(op, ins)
        elif kind == "residual":
            h, w = b.h, b.w
            branch = b.conv(b.cur, b.c, b.c, 3)
            b.h, b.w = h, w
            branch = b.node("Relu", [branch])
            b.cur = b.node("Add", [b.cur, branch])
        elif kind == "concat":
            h, w = b.h, b.w
            co1, co2 = (int(v) for v in rng.integers(1, 9, 2))
            left = b.conv(b.cur, b.c, co1, 1)
            b.h, b.w = h, w
            right = b.conv(b.cur, b.c, co2, 3)
            b.cur = b.node("Concat", [left, right], axis=1)
            b.c = co1 + co2
        elif kind == "pool" and min(b.h, b.w) >= 2:
            op = str(rng.choice(["MaxPool", "AveragePool"]))
            b.cur = b.node(op, [b.cur], kernel_shape=[2, 2], strides=[2, 2])
            b.h, b.w = b.h // 2, b.w // 2
        elif kind == "deconv":
            co = int(rng.integers(1, 9))
            w = b.const("w", rng.normal(0, 0.3, (b.c, co, 2, 2)))
            b.cur = b.node("ConvTranspose", [b.cur, w], kernel_shape=[2, 2], strides=[2, 2])
            b.c, b.h, b.w = co, b.h * 2, b.w * 2
        elif kind == "scale":
            b.cur = b.node("Mul", [b.cur, b.const("s", rng.uniform(0.5, 2, (b.c, 1, 1)))])
    rank = 4
    head = rng.choice(["none", "gap_fc", "flatten_fc", "flatten_mlp"])
    classes = int(rng.integers(2, 11))
    if head != "none":
        feats = b.c
        if head == "gap_fc":
            b.cur = b.node("GlobalAveragePool", [b.cur])
        else:
            feats = b.c * b.h * b.w
        b.cur = b.node("Flatten", [b.cur], axis=1)
        if head == "flatten_mlp":
            hidden = int(rng.integers(4, 33))
            fc = b.const("fc", rng.normal(0, 1 / np.sqrt(feats), (hidden, feats)))
            b.cur = b.node("Relu", [b.node("Gemm", [b.cur, fc, b.const("fb", np.zeros(hidden))],
                                             transB=1)])
            feats = hidden
        fc = b.const("fc", rng.normal(0, 1 / np.sqrt(feats), (classes, feats)))
        b.cur = b.node("Gemm", [b.cur, fc, b.const("fb", np.zeros(classes))], transB=1)
        rank = 2
    batch = "N" if rng.random() < 0.2 else 1
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
        [helper.make_tensor_value_info(b.cur, TensorProto.FLOAT, [None] * rank)], b.inits)
    opset = int(rng.choice([11, 13, 17]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def broken_model(rng: np.random.Generator) -> bytes:
    """A model that is wrong in one way, serialized."""
    model = random_model(rng)
    g = model.graph
    how = rng.choice(["bytes", "cut", "drop_init", "bad_shape", "nan", "unknown_op",
                      "dangling", "dtype"])
    if how == "drop_init" and len(g.initializer):
        del g.initializer[int(rng.integers(len(g.initializer)))]
    elif how == "bad_shape" and len(g.initializer):
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(np.zeros(a.size + 1, np.float32), t.name))
    elif how == "nan" and len(g.initializer):
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        a = numpy_helper.to_array(t).copy()
        a.flat[0] = np.nan
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    elif how == "unknown_op":
        g.node[int(rng.integers(len(g.node)))].op_type = "NoSuchOp"
    elif how == "dangling":
        g.node[int(rng.integers(len(g.node)))].input[0] = "missing_tensor"
    elif how == "dtype":
        g.input[0].type.tensor_type.elem_type = TensorProto.INT64
    data = bytearray(model.SerializeToString())
    if how == "bytes":
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif how == "cut":
        data = data[:int(rng.integers(1, len(data)))]
    return bytes(data)


# ----------------------------------------------------------------------------------------
# One case


@dataclasses.dataclass
class Case:
    index: int
    valid: bool
    argv: list
    rc: int | None = None
    problem: str | None = None
    stderr: str = ""
    seconds: float = 0.0


def random_data(rng: np.random.Generator, path: pathlib.Path, c: int, h: int, w: int) -> bool:
    """Write calibration images for a C×H×W input (or, sometimes, broken ones); returns
    whether the data is valid."""
    n = int(rng.integers(8, 41))                 # --calib-samples asks for at most 8
    images = rng.integers(0, 256, (n, c, h, w)).astype(np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int64)
    how = rng.choice(["ok"] * 6 + ["shape", "nan", "empty", "flat", "key"])
    arrays = {"images": images, "labels": labels}
    if how == "shape":
        arrays["images"] = images[:, :, : max(1, h - 1)]
    elif how == "nan":
        bad = images.astype(np.float32)
        bad.flat[int(rng.integers(bad.size))] = np.nan
        arrays["images"] = bad
    elif how == "empty":
        arrays = {"images": images[:0], "labels": labels[:0]}
    elif how == "flat":
        arrays["images"] = images.reshape(-1)
    elif how == "key":
        arrays = {"pictures": images}
    np.savez(path, **arrays)
    return how == "ok" or (how == "shape" and h == 1)


def random_argv(rng: np.random.Generator, data: pathlib.Path | None) -> list:
    passes = ["fold_bn"] if rng.random() < 0.6 else []
    passes += [p for p in LOSSY if rng.random() < 0.25]
    if rng.random() < 0.5:
        passes.append(str(rng.choice(QUANT)))
    if data is not None and rng.random() < 0.3:
        passes.append("recover")
    if not passes:
        passes = ["cleanup"]
    argv = ["--passes", ",".join(passes), "--calib-samples", str(int(rng.integers(1, 9))),
            "--seed", str(int(rng.integers(1000)))]
    if data is not None:
        argv += ["--calib-data", str(data), "--scale", "0.00392156862745098"]
        if rng.random() < 0.3:
            argv += ["--eval-data", str(data)]
    if "prune" in passes:
        argv += str(rng.choice(["--prune-flops 0.3", "--prune-flops 0.5", "--prune-ratio 0.5",
                                "--prune-params 0.4 --prune-criterion fpgm",
                                "--prune-criterion thinet --prune-flops 0.4"])).split()
    if "lowrank" in passes:
        argv += str(rng.choice(["--lowrank-energy 0.9", "--lowrank-flops 0.5",
                                "--lowrank-method cp --lowrank-flops 0.6",
                                "--lowrank-rank 2 --lowrank-force"])).split()
    if "int8" in passes and rng.random() < 0.5:
        argv += ["--calibrator", str(rng.choice(["percentile", "entropy", "mse"]))]
    if "recover" in passes:
        argv += ["--recover-epochs", "0.5", "--recover-batch", "4", "--recover-threads", "1"]
    if rng.random() < 0.3:
        argv += ["--input-shape", f"x:{int(rng.integers(1, 4))},{{c}},{{h}},{{w}}"]
    return argv


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_case(index: int, rng: np.random.Generator, work: pathlib.Path) -> Case:
    from onnxc import cli

    valid = rng.random() < 0.7
    if valid:
        model = random_model(rng)
        data = model.SerializeToString()
        dims = model.graph.input[0].type.tensor_type.shape.dim
        c, h, w = (d.dim_value for d in dims[1:])
    else:
        data, c, h, w = broken_model(rng), 1, 1, 1
    src = work / f"case{index}.onnx"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    npz = None
    if rng.random() < 0.4:
        npz = work / f"case{index}.npz"
        valid = random_data(rng, npz, c, h, w) and valid
    out = work / f"out{index}"
    argv = ["compress", str(src), "-o", str(out)] + [
        a.format(c=c, h=h, w=w) for a in random_argv(rng, npz)]
    case = Case(index, valid, argv)
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            case.rc = cli.main(argv)
    except _Timeout:
        case.problem = f"no answer within {CASE_SECONDS} s"
    except BaseException as exc:   # noqa: BLE001  (anything escaping the CLI is the bug)
        case.problem = f"exception escaped the CLI: {type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    case.seconds = time.perf_counter() - start
    case.stderr = err.getvalue()
    if case.problem is None:
        case.problem = _check(case, src, digest, out)
    return case


def _check(case: Case, src: pathlib.Path, digest: str, out: pathlib.Path) -> str | None:
    if hashlib.sha256(src.read_bytes()).hexdigest() != digest:
        return "the input file was modified"
    if "Traceback" in case.stderr:
        return "a traceback was printed"
    if case.rc == 1:
        return "internal error: " + case.stderr.strip().splitlines()[-1]
    passes = set(case.argv[case.argv.index("--passes") + 1].split(","))
    if case.rc != 0:
        if out.exists():
            return f"exit {case.rc} left an output directory behind"
        errors = [ln for ln in case.stderr.splitlines() if ln.startswith("onnxc: error:")]
        if len(errors) != 1:
            return f"exit {case.rc} without exactly one 'onnxc: error:' line"
        if case.valid and case.rc == 5:
            return "a valid model failed verification: " + errors[0]
        if case.valid and passes <= EXACT:
            return "a valid model with exact passes only failed: " + errors[0]
        return None
    for name in ("model.onnx", "report.json"):
        if not (out / name).is_file():
            return f"success without {name}"
    try:
        import onnxruntime as ort

        model = onnx.load(str(out / "model.onnx"))
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return f"the artifact does not run: {type(exc).__name__}: {first_line(exc)}"
    return None


# ----------------------------------------------------------------------------------------


def campaign(cases: int | None, minutes: float | None, seed: int, save: str | None,
             log=print, verbose: bool = False) -> list:
    """Run cases until the count or the time is used; returns the failed cases."""
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter() + 60 * minutes if minutes else None
    failures, counts = [], {}
    with tempfile.TemporaryDirectory(prefix="onnxc-fuzz-") as tmp:
        work = pathlib.Path(tmp)
        i = 0
        while (cases is None or i < cases) and (deadline is None
                                                or time.perf_counter() < deadline):
            case = run_case(i, rng, work)
            key = ("valid" if case.valid else "broken", case.rc)
            counts[key] = counts.get(key, 0) + 1
            if verbose:
                last = case.stderr.strip().splitlines()[-1:] or [""]
                log(f"case {i} {'valid' if case.valid else 'broken'} exit {case.rc} "
                    f"{case.seconds:.1f}s {' '.join(case.argv[4:])} | {last[0][:150]}")
            if case.problem:
                failures.append(case)
                log(f"FAIL case {i}: {case.problem}\n  onnxc {' '.join(case.argv)}")
                if save:
                    dest = pathlib.Path(save)
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(work / f"case{i}.onnx", dest / f"seed{seed}_case{i}.onnx")
                    (dest / f"seed{seed}_case{i}.txt").write_text(
                        f"{case.problem}\nonnxc {' '.join(case.argv)}\n\n{case.stderr}")
            shutil.rmtree(work / f"out{i}", ignore_errors=True)
            for leftover in work.glob(f"case{i}.*"):
                if save and case.problem and leftover.suffix == ".npz":
                    shutil.copy(leftover, pathlib.Path(save) / f"seed{seed}_case{i}.npz")
                leftover.unlink()
            i += 1
    total = sum(counts.values())
    summary = ", ".join(f"{kind} exit {rc}: {n}" for (kind, rc), n in sorted(
        counts.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])))
    log(f"{total} cases, {len(failures)} failed ({summary})")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=None, help="number of cases")
    ap.add_argument("--minutes", type=float, default=None, help="time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="keep failing models and commands here")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    if args.cases is None and args.minutes is None:
        args.cases = 100
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    failures = campaign(args.cases, args.minutes, args.seed, args.save, verbose=args.verbose)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
