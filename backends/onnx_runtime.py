"""Target ``onnx``: the compressed graph as an ONNX model for ONNX Runtime.

``model.onnx`` is always written by the artifact writer for every target; this
backend adds nothing beyond it, so it is the portable default.
"""

from __future__ import annotations

from . import Backend, register_backend


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnx"
    summary = "ONNX model for ONNX Runtime (model.onnx + report.json)"
    # ORT's CPU convs work in NCHWc blocks of 8 channels (AVX2; see prune/allocate.py):
    # lowrank ranks and pruned widths default to multiples of it.
    channel_multiple = 8

    def build(self, graph, ctx, out_dir, report):
        import onnxruntime

        report["runtime"] = {"name": "onnxruntime", "version": onnxruntime.__version__,
                             "load": "onnxruntime.InferenceSession('model.onnx')"}
