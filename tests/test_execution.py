"""The ONNX Runtime execution layer: sessions, batch layouts, slicing and padding,
intermediate-tensor capture, one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.errors import BackendError, first_line
from onnxc.execution import Runner, batch_layout, capture_model, in_slices, session
from onnxc.ir import Graph


def _scale_model(batch=4) -> onnx.ModelProto:
    """y = relu(x · 2) - 1 over x[batch, 3]; ``h`` is the intermediate x · 2."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Sub", ["r", "one"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(np.float32(2), "two"),
         numpy_helper.from_array(np.float32(1), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shared_symbolic_dim_is_the_batch_wherever_it_stands():
    layout = batch_layout([("x", [5, "N", 8]), ("state", [2, "N", 16]), ("lens", ["T"])])
    assert layout.axes == {"x": 1, "state": 1, "lens": None} and layout.dim == "N"


def test_on_a_tie_the_shared_dim_nearest_the_front_is_the_batch():
    layout = batch_layout([("ids", ["batch", "seq"]), ("mask", ["batch", "seq"])])
    assert layout.axes == {"ids": 0, "mask": 0} and layout.dim == "batch"


def test_leading_symbolic_dim_of_one_input_is_its_batch_only():
    layout = batch_layout([("x", ["N", 3, 4, 4]), ("slope", [3, 1, 1])])
    assert layout.axes == {"x": 0, "slope": None} and layout.fixed is None


def test_the_only_symbolic_dim_of_a_single_input_is_its_batch():
    layout = batch_layout([("x", [5, "N", 8])])
    assert layout.axes == {"x": 1} and layout.dim == "N" and layout.fixed is None


def test_an_unnamed_only_symbolic_dim_beside_a_leading_batch_is_batched_there():
    layout = batch_layout([("input", [None, None]), ("state", [2, None, 128]), ("sr", [])])
    assert layout.axes == {"input": 0, "state": 1, "sr": None}


def test_single_static_input_has_a_fixed_batch_and_several_have_none():
    assert batch_layout([("x", [4, 3])]).fixed == 4
    assert batch_layout([("a", [2, 3]), ("b", [3, 4])]).axes == {"a": None, "b": None}


def test_runner_pads_a_fixed_batch_and_trims_the_result():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    out = Runner(_scale_model(batch=4)).run({"x": x})[0]
    assert out.shape == (10, 3) and np.allclose(out, np.maximum(2 * x, 0) - 1)


def test_stream_hands_each_slice_without_padding():
    seen = []
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    Runner(_scale_model(batch=4)).stream(
        {"x": x}, lambda start, values: seen.append((start, values["y"].shape[0])))
    assert seen == [(0, 4), (4, 4), (8, 2)]


def test_in_slices_cuts_along_each_inputs_axis_and_passes_unbatched_ones_whole():
    a = np.arange(12).reshape(2, 6)             # batch on axis 1
    w = np.array([10, 20])                      # not batched

    def fn(x, s):
        assert x.shape[1] <= 4 and s.shape == (2,)
        return [x * s[:, None]]

    out = in_slices(fn, [a, w], 4, pad=True, axes=[1, None], out_axes=[1])[0]
    assert np.array_equal(out, a * w[:, None])


def test_capture_model_reads_an_intermediate_tensor_from_a_graph_and_a_proto():
    model = _scale_model(batch=4)
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    for source in (Graph.from_onnx(model), model):
        h = Runner(capture_model(source, ["h"])).run({"x": x})
        assert len(h) == 1 and np.allclose(h[0], 2 * x)
    both = Runner(capture_model(model, ["h"], keep_outputs=True)).output_names
    assert both == ["y", "h"]


def test_session_options_are_applied():
    sess = session(_scale_model(), optimize="basic", threads=1, spinning=False)
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError):
        session(_scale_model(), optimize="fast")


def test_a_model_ort_cannot_load_is_a_one_line_backend_error():
    broken = _scale_model()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BackendError) as info:
        session(broken)
    assert "\n" not in str(info.value) and str(info.value).startswith(
        "ONNX Runtime cannot load the model: ")


def test_first_line_takes_the_error_line_of_a_traceback_message():
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(RuntimeError("Traceback (most recent call last):\n  File x\n"
                                   "TVMError: the real reason")) == "TVMError: the real reason"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10
