"""The one verifier: run two graphs on ONNX Runtime over the same inputs and compare.

Graphs run through the execution layer (:mod:`onnxc.execution`), batched along each
input's own batch axis.

Relative error is ``max|a-b| / max|a|`` per output (scale-free, stable when single
elements are near zero); the worst output counts. With labels, top-1 of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BackendError
from .execution import Runner

VERIFY_SAMPLES = 64
# Keep one verification run near this many MACs (ResNet-56: 64 samples, ResNet-50: 2).
VERIFY_MAC_BUDGET = 1e10


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


def compare_outputs(ref: list, out: list, samples: int | None = None) -> Comparison:
    """Errors of ``out`` vs ``ref``; ``samples``: how many inputs they came from (default:
    the first output's leading dim)."""
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
    n = samples if samples is not None else len(ref[0]) if ref and np.ndim(ref[0]) else 1
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
