"""The one verifier: run two graphs on ONNX Runtime over the same inputs and compare.

Relative error is ``max|a-b| / max|a|`` per output (scale-free, stable when single
elements are near zero); the worst output counts. With labels, top-1 of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import BackendError

VERIFY_SAMPLES = 64
# Keep one verification run near this many MACs (ResNet-56: 64 samples, ResNet-50: 2).
VERIFY_MAC_BUDGET = 1e10


def _session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Fatal only: ORT would print its own copy of every error we turn into one line.
    opts.log_severity_level = 4
    if not optimize:
        # ORT's own fusions (e.g. Conv+BatchNormalization) would hide our rewrites:
        # exactness checks run the graph op by op as written.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"ONNX Runtime cannot load the model: "
                           f"{str(exc).strip().splitlines()[0][:300]}") from exc


class Runner:
    """ONNX Runtime session over an IR graph or ModelProto, batching to its input shape."""

    def __init__(self, model, threads: int | None = None, optimize: bool = True):
        from .ir import Graph

        self.model = model.to_onnx() if isinstance(model, Graph) else model
        self.session = _session(self.model, threads, optimize)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.session.get_inputs()[0].shape
        self.fixed_batch = first[0] if first and isinstance(first[0], int) else None

    def run(self, feeds: dict, batch_size: int = 64) -> list[np.ndarray]:
        names = [k for k in feeds if k in self.input_names]

        def run_slice(*parts):
            try:
                return self.session.run(None, dict(zip(names, parts)))
            except Exception as exc:
                raise BackendError(f"ONNX Runtime failed to run the model: "
                                   f"{str(exc).strip().splitlines()[0][:300]}") from exc

        return in_slices(run_slice, [feeds[k] for k in names],
                         self.fixed_batch or batch_size, pad=bool(self.fixed_batch))


def in_slices(fn, inputs: list, size: int | None, pad: bool = True,
              concat=np.concatenate) -> list:
    """``fn(*inputs)`` run on slices of ``size`` rows and joined (batch first), for graphs
    whose batch is fixed (``pad``: the last slice is padded by repeating its final row,
    and the results trimmed) or too large for one run. Rows never mix (BN runs on its
    running statistics), so padding changes nothing. ``fn`` returns a list of
    arrays/tensors; ``concat`` joins them (np.concatenate or torch.cat)."""
    n = len(inputs[0])
    if not size or n == size or (n < size and not pad):
        return fn(*inputs)
    parts = []
    for start in range(0, n, size):
        part = [x[start:start + size] for x in inputs]
        if pad and len(part[0]) < size:
            part = [concat([x] + [x[-1:]] * (size - len(x))) for x in part]
        parts.append(fn(*part))
    return [concat([p[i] for p in parts])[:n] for i in range(len(parts[0]))]


@dataclass
class Comparison:
    max_abs: float
    max_rel: float
    mean_abs: float
    top1_agreement: float | None   # share of samples whose argmax matches (classifiers)
    samples: int

    def as_dict(self) -> dict:
        return {"max_abs": float(self.max_abs), "max_rel": float(self.max_rel),
                "mean_abs": float(self.mean_abs),
                "top1_agreement": None if self.top1_agreement is None
                else float(self.top1_agreement), "samples": self.samples}


def compare_outputs(ref: list, out: list) -> Comparison:
    max_abs = max_rel = mean_abs = 0.0
    agree = None
    for a, b in zip(ref, out):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise BackendError(f"output shapes differ: {a.shape} vs {b.shape}")
        diff = np.abs(a - b)
        scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
        max_rel = max(max_rel, (float(diff.max()) if diff.size else 0.0) / scale)
        mean_abs = max(mean_abs, float(diff.mean()) if diff.size else 0.0)
        if agree is None and a.ndim == 2 and a.shape[1] > 1:
            agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    n = len(ref[0]) if ref and np.ndim(ref[0]) else 1
    return Comparison(max_abs, max_rel, mean_abs, agree, n)


def top1(model, dataset, batch_size: int = 64) -> float:
    """Top-1 accuracy (%) of a classifier whose first output is N × classes."""
    runner = Runner(model)
    outs = runner.run(dataset.inputs, batch_size)[0]
    return 100.0 * float(np.mean(outs.reshape(len(outs), -1).argmax(1) == dataset.labels))


class Verifier:
    """Compares graphs on a fixed set of inputs (data if given, else seeded random).

    Graphs run op by op as written (ORT optimisations off) so that an exact pass
    is checked against the semantics of its input, not against ORT's fusions.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    @classmethod
    def for_context(cls, graph, ctx) -> "Verifier":
        from onnxc.calibrate.readers import random_dataset

        macs = max(graph.stats(with_bytes=False).macs, 1)
        budget = int(min(VERIFY_SAMPLES, max(2, VERIFY_MAC_BUDGET // macs)))
        for ds in (ctx.evaluation, ctx.calibration):
            if ds is not None:
                return cls(ds.take(min(budget, len(ds))))
        return cls(random_dataset(graph, min(budget, 16), seed=ctx.seed))

    def outputs(self, graph) -> list:
        return Runner(graph, optimize=False).run(self.dataset.inputs)

    def compare(self, a, b) -> Comparison:
        return compare_outputs(self.outputs(a), self.outputs(b))
