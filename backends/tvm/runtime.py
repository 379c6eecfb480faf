"""Load an onnxc artifact directory and run or time it (``onnxc run`` / ``onnxc bench``).

TVM artifacts (``target.json`` + ``model.so``) run on the Relax VM when the target
runs here (x86 on x86; CUDA with a GPU); ``onnx`` artifacts run on ONNX Runtime.
ARM artifacts run on this machine under qemu: see ``tools/run_arm_qemu.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

from onnxc.errors import BackendError, DataError, UsageError

from .build import LIBRARY, TARGET_FILE


class Artifact:
    """A loaded, runnable artifact: ``run(feeds) -> [outputs]``."""

    def __init__(self, path: str, kind: str, inputs: list, outputs: list, run_fn,
                 device: str = "cpu"):
        self.path = path
        self.kind = kind              # "tvm" or "onnxruntime"
        self.inputs = inputs          # [{"name", "shape", "dtype"}]
        self.outputs = outputs
        self._run = run_fn
        self.device = device

    def run(self, feeds: dict) -> list:
        missing = [i["name"] for i in self.inputs if i["name"] not in feeds]
        if missing:
            raise DataError(f"missing input(s) {', '.join(missing)} "
                            f"(artifact inputs: {', '.join(i['name'] for i in self.inputs)})")
        arrays = {}
        for spec in self.inputs:
            arr = np.asarray(feeds[spec["name"]])
            shape = list(spec["shape"])
            if all(isinstance(d, int) and d > 0 for d in shape) and list(arr.shape) != shape:
                raise DataError(f"input '{spec['name']}' has shape {list(arr.shape)}, the "
                                f"artifact was compiled for {shape}")
            arrays[spec["name"]] = arr.astype(spec["dtype"], copy=False)
        return self._run(arrays)

    def random_inputs(self, seed: int = 0) -> dict:
        from .build import _random_input

        rng = np.random.default_rng(seed)
        for spec in self.inputs:
            if not all(isinstance(d, int) and d > 0 for d in spec["shape"]):
                raise UsageError(f"input '{spec['name']}' has a symbolic shape "
                                 f"{spec['shape']}: give inputs explicitly")
        return {i["name"]: _random_input(rng, i) for i in self.inputs}


def load_artifact(path: str) -> Artifact:
    """Open an artifact directory written by ``onnxc compress``; one-line errors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not an artifact directory (written by onnxc compress -o)")
    if os.path.isfile(os.path.join(path, "vta", "program.json")):
        # A VTA artifact runs through its bit-exact simulator (+ host part).
        from onnxc.backends.vta.runtime import load_artifact as load_vta

        return load_vta(path)
    target_file = os.path.join(path, TARGET_FILE)
    if os.path.isfile(target_file):
        return _load_tvm(path, target_file)
    model = os.path.join(path, "model.onnx")
    if os.path.isfile(model) and os.path.isfile(os.path.join(path, "report.json")):
        return _load_onnx(path, model)
    raise UsageError(f"{path} is not an onnxc artifact: it has neither {TARGET_FILE} nor "
                     f"model.onnx + report.json")


def _load_onnx(path: str, model_path: str) -> Artifact:
    import onnx

    from onnxc.verify import Runner

    runner = Runner(onnx.load(model_path))
    inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
               "dtype": _ort_dtype(i.type)} for i in runner.session.get_inputs()]
    outputs = [{"name": o.name} for o in runner.session.get_outputs()]
    return Artifact(path, "onnxruntime", inputs, outputs,
                    lambda feeds: runner.session.run(None, feeds))


def _ort_dtype(type_str: str) -> str:
    inner = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else "float"
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)


def _load_tvm(path: str, target_file: str) -> Artifact:
    try:
        with open(target_file) as f:
            info = json.load(f)
        spec = info["target"]
        inputs, outputs = info["inputs"], info["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{target_file} is not an onnxc TVM target description "
                         f"({type(exc).__name__}: {exc})") from None
    lib = os.path.join(path, info.get("library", LIBRARY))
    if not lib.endswith(".so"):
        raise BackendError(f"{path} holds an unlinked library ({os.path.basename(lib)}): "
                           f"link it first as LINK.txt explains")
    if not os.path.isfile(lib):
        raise UsageError(f"{path} is missing its library {os.path.basename(lib)}")
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                       platform.machine().lower())
    if spec.get("arch") != here:
        hint = (" (run it under qemu: python tools/run_arm_qemu.py ARTIFACT --input x.npy)"
                if spec.get("arch") == "aarch64" else "")
        raise BackendError(f"{path} was built for {spec.get('arch')}, this machine is "
                           f"{here}{hint}")
    import tvm
    from tvm import relax

    device = spec.get("device", "cpu")
    if device == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BackendError(f"{path} is a CUDA artifact and this machine has no CUDA GPU")
    else:
        dev = tvm.cpu(0)
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)
    except Exception as exc:
        from .targets import _first_line

        raise BackendError(f"cannot load {lib}: {_first_line(exc)}") from None
    main = vm["main"]

    def run(feeds):
        args = [tvm.runtime.tensor(feeds[i["name"]], device=dev) for i in inputs]
        out = main(*args)
        items = list(out) if isinstance(out, (list, tuple)) or type(out).__name__ in (
            "Array", "Tuple") else [out]
        return [o.numpy() for o in items]

    art = Artifact(path, "tvm", inputs, outputs, run, device)
    art.sync = (lambda: dev.sync())
    return art


# ----------------------------------------------------------------------------------------
# Inputs / outputs for the CLI


def read_inputs(specs: list, artifact: Artifact) -> dict:
    """``--input x.npy`` (single-input models) or ``--input NAME=x.npy``; .npz by name."""
    feeds = {}
    names = [i["name"] for i in artifact.inputs]
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = None, spec
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if isinstance(data, np.lib.npyio.NpzFile):
            for key in data.files:
                if key in names:
                    feeds[key] = data[key]
            continue
        if name is None:
            if len(names) != 1:
                raise UsageError(f"the artifact has {len(names)} inputs "
                                 f"({', '.join(names)}): use --input NAME=FILE.npy")
            name = names[0]
        if name not in names:
            raise UsageError(f"--input names '{name}', not an artifact input "
                             f"({', '.join(names)})")
        feeds[name] = data
    return feeds


def benchmark(artifact: Artifact, feeds: dict | None = None, warmup: int = 5,
              repeat: int = 30, min_seconds: float = 0.0) -> dict:
    """Latency of one inference in ms: median, mean, min, p90 over ``repeat`` runs."""
    if warmup < 0 or repeat < 1:
        raise UsageError("--warmup must be >= 0 and --repeat >= 1")
    feeds = feeds or artifact.random_inputs()
    sync = getattr(artifact, "sync", lambda: None)
    for _ in range(warmup):
        artifact.run(feeds)
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        artifact.run(feeds)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": times[0], "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": len(times), "warmup": warmup}
