"""Target ``onnx``: the compressed graph as an ONNX model for ONNX Runtime.

``model.onnx`` is always written by the artifact writer for every target; this
backend adds nothing beyond it, so it is the portable default.
"""

from __future__ import annotations

import os

from . import Backend, register_backend


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnx"
    static_shapes = False        # ONNX Runtime runs symbolic dims: the artifact keeps them
    summary = "ONNX model for ONNX Runtime (model.onnx + report.json)"
    # ORT's CPU convs work in NCHWc blocks of 8 channels (AVX2; see prune/allocate.py):
    # lowrank ranks and pruned widths default to multiples of it.
    channel_multiple = 8

    def build(self, graph, ctx, out_dir, report):
        import onnxruntime

        report["runtime"] = {"name": "onnxruntime", "version": onnxruntime.__version__,
                             "load": "onnxruntime.InferenceSession('model.onnx')"}

    @classmethod
    def load_artifact(cls, path):
        import onnx

        from onnxc.execution import Runner

        from .artifact import Artifact

        runner = Runner(onnx.load(os.path.join(path, "model.onnx")))
        inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
                   "dtype": _numpy_dtype(i.type)} for i in runner.session.get_inputs()]
        outputs = [{"name": o.name} for o in runner.session.get_outputs()]
        return Artifact(path, "onnxruntime", inputs, outputs,
                        lambda feeds: runner.session.run(None, feeds))


def _numpy_dtype(ort_type: str) -> str:
    """numpy dtype name of an ORT type string such as ``tensor(float)``."""
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") else "float"
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)
