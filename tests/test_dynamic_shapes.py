"""Symbolic dims: a runtime target (``--target onnx``) keeps the input model's dynamic
shapes in its artifact; only compiled targets (TVM, VTA) need ``--input-shape``."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxc import frontend
from onnxc.backends import all_backends
from onnxc.compress import compress
from onnxc.errors import UsageError

from quant_helpers import residual_cnn
from transformer_nets import cosine, encoder


def _io_dims(model: onnx.ModelProto) -> list:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("passes", [["fold_bn"], ["int8"]])
def test_onnx_artifact_keeps_a_symbolic_sequence_length(tmp_path, passes):
    model = encoder(tokens="T")
    result = compress(model, passes, target="onnx", out_dir=str(tmp_path / "out"),
                      log=lambda m: None)
    artifact = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert _io_dims(artifact) == [["B", "T", 64], ["B", "T", 64]]
    assert any("symbolic dims kept" in n for n in result.report["frontend_notes"])
    for tokens in (5, 16):                       # one artifact, two sequence lengths
        x = np.random.default_rng(tokens).standard_normal((2, tokens, 64)).astype(np.float32)
        assert cosine(_run(model, x), _run(artifact, x)) >= (0.9999 if passes == ["fold_bn"]
                                                            else 0.99)


def test_onnx_artifact_keeps_a_symbolic_batch(tmp_path):
    compress(residual_cnn(), ["fold_bn"], target="onnx", out_dir=str(tmp_path / "out"),
             log=lambda m: None)
    assert _io_dims(onnx.load(str(tmp_path / "out" / "model.onnx")))[0] == ["N", 3, 8, 8]


def test_static_shape_targets_still_ask_for_input_shape():
    with pytest.raises(UsageError, match="--input-shape x:"):
        frontend.load(encoder(tokens="T"), static_shapes=True)


def test_only_the_runtime_target_accepts_symbolic_dims():
    assert {name for name, cls in all_backends().items() if not cls.static_shapes} == {"onnx"}
