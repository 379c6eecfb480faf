"""Target ``onnx``: the compressed graph as an ONNX model for ONNX Runtime.

``model.onnx`` is always written by the artifact writer for every target; this
backend adds nothing beyond it, so it is the portable default.
"""

from __future__ import annotations

from . import Backend, register_backend


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnx"
    static_shapes = False        # ONNX Runtime runs symbolic dims: the artifact keeps them
    summary = "ONNX model for ONNX Runtime (model.onnx + report.json)"

    def build(self, graph, ctx, out_dir, report):
        import onnxruntime

        report["runtime"] = {"name": "onnxruntime", "version": onnxruntime.__version__,
                             "load": "onnxruntime.InferenceSession('model.onnx')"}
