"""onnxc: a graph-level compiler toolchain that turns ONNX models into compressed,
verified, deployable artifacts.

Python API::

    from onnxc import compress
    result = compress("model.onnx", ["fold_bn"], target="onnx", out_dir="out")
    print(result.report["compression_ratio"])
"""

__version__ = "0.1.0"


def compress(*args, **kwargs):
    from .compress import compress as _compress

    return _compress(*args, **kwargs)
