"""Load an onnxc artifact directory and run or time it (``onnxc run`` / ``onnxc bench``).

Each backend says how to recognise and open its artifacts: ``Backend.artifact_marker``
is a file only its artifacts hold (``target.json``, ``vta/program.json``) and
``Backend.load_artifact(path)`` opens one. A directory with no backend's marker is an
``onnx`` artifact (every artifact has ``model.onnx`` and ``report.json``) and runs on
ONNX Runtime; opening it imports no compiler code.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from onnxc.errors import DataError, UnsupportedError, UsageError

DEFAULT_BACKEND = "onnx"


class Artifact:
    """A loaded, runnable artifact: ``run(feeds) -> [outputs]``."""

    def __init__(self, path: str, kind: str, inputs: list, outputs: list, run_fn,
                 device: str = "cpu", sync=None):
        self.path = path
        self.kind = kind              # "tvm", "onnxruntime", ...
        self.inputs = inputs          # [{"name", "shape", "dtype"}]
        self.outputs = outputs        # [{"name"}]
        self._run = run_fn
        self.device = device
        self.sync = sync or (lambda: None)   # wait for the device (timing)

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
        rng = np.random.default_rng(seed)
        for spec in self.inputs:
            if not all(isinstance(d, int) and d > 0 for d in spec["shape"]):
                raise UsageError(f"input '{spec['name']}' has a symbolic shape "
                                 f"{spec['shape']}: give inputs explicitly")
        return {i["name"]: random_input(rng, i) for i in self.inputs}


def random_input(rng, spec: dict) -> np.ndarray:
    """Seeded test data for one input spec {"name", "shape", "dtype"}."""
    dtype = np.dtype(spec["dtype"])
    if dtype.kind == "f":
        return rng.standard_normal(spec["shape"]).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 2, spec["shape"]).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, spec["shape"]).astype(bool)
    raise UnsupportedError(f"input '{spec['name']}' has dtype {dtype}, which onnxc cannot "
                           f"generate test data for")


def load_artifact(path) -> Artifact:
    """Open an artifact directory written by ``onnxc compress``; one-line errors."""
    from onnxc.backends import all_backends

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not an artifact directory (written by onnxc compress -o)")
    backends = all_backends()
    for cls in backends.values():
        if cls.artifact_marker and os.path.isfile(os.path.join(path, cls.artifact_marker)):
            return cls.load_artifact(path)
    if all(os.path.isfile(os.path.join(path, f)) for f in ("model.onnx", "report.json")):
        return backends[DEFAULT_BACKEND].load_artifact(path)
    markers = sorted({c.artifact_marker for c in backends.values() if c.artifact_marker})
    raise UsageError(f"{path} is not an onnxc artifact: it has none of "
                     f"{', '.join(markers)} nor model.onnx + report.json")


# ----------------------------------------------------------------------------------------
# Inputs and timing for the CLI


def read_inputs(specs: list, artifact) -> dict:
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


def save_outputs(path: str, names: list, outputs: list) -> None:
    """``--output``: the first output as .npy, or every output by name as .npz."""
    from onnxc.errors import OutputError

    try:
        if path.endswith(".npz"):
            np.savez(path, **dict(zip(names, outputs)))
        else:
            np.save(path, outputs[0])
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


def benchmark(artifact, feeds: dict | None = None, warmup: int = 5,
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
