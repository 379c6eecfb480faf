"""onnxc: a graph-level compiler toolchain that turns ONNX models into compressed,
verified, deployable artifacts.

Python API::

    import onnxc
    result = onnxc.compress("model.onnx", ["fold_bn"], target="onnx", out_dir="out")
    print(result.report["compression_ratio"])
"""

from .version import __version__  # noqa: F401

# Imported eagerly on purpose: binding the function here, after the submodule import,
# keeps ``onnxc.compress`` the function even once ``onnxc.compress`` (module) is loaded.
from .compress import compress  # noqa: E402,F401
