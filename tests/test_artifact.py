"""Opening artifact directories (``onnxc run`` / ``bench``): each backend names the file
that marks its artifacts and opens them; plain ones run on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxc.backends import BACKENDS, Backend
from onnxc.backends.artifact import Artifact, load_artifact
from onnxc.compress import compress
from onnxc.errors import UsageError


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    out = tmp_path_factory.mktemp("art") / "out"
    compress(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
             ["fold_bn"], out_dir=str(out), log=lambda m: None)
    return out


def test_a_plain_artifact_runs_on_onnx_runtime(onnx_artifact):
    art = load_artifact(onnx_artifact)
    assert art.kind == "onnxruntime"
    assert art.inputs == [{"name": "x", "shape": [None, 4], "dtype": "float32"}]
    x = np.array([[-1, 2, -3, 4]], np.float32)
    assert np.array_equal(art.run({"x": x})[0], np.maximum(x, 0))


def test_a_backends_marker_file_sends_the_directory_to_its_loader(onnx_artifact,
                                                                  monkeypatch):
    class MarkedBackend(Backend):
        name = "marked"
        artifact_marker = "marked.json"

        @classmethod
        def load_artifact(cls, path):
            return Artifact(path, "marked", [], [], lambda feeds: [])

    monkeypatch.setitem(BACKENDS, "marked", MarkedBackend)
    assert load_artifact(onnx_artifact).kind == "onnxruntime"
    (onnx_artifact / "marked.json").write_text("{}")
    try:
        assert load_artifact(onnx_artifact).kind == "marked"
    finally:
        (onnx_artifact / "marked.json").unlink()


def test_a_directory_that_is_no_artifact_is_a_usage_error_naming_the_markers(tmp_path):
    with pytest.raises(UsageError, match=r"none of target\.json, vta/program\.json nor "
                                         r"model\.onnx \+ report\.json"):
        load_artifact(tmp_path)
