"""LSTM / GRU / RNN unrolled for TVM (backends/tvm/unroll_rnn.py): the unrolled graph
gives ONNX Runtime's outputs of the original node, for every direction, layout and
option the spec defines; what cannot be unrolled is one line naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.backends.tvm.unroll_rnn import unroll_recurrent
from onnxc.errors import UnsupportedError

STEPS, BATCH, FEATURES, HIDDEN = 5, 2, 3, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op, direction="forward", layout=0, states=False, peepholes=False,
                    seq_lens=None, **attrs) -> onnx.ModelProto:
    """x -> one ``op`` node -> all its outputs, with seeded constant weights."""
    rng = np.random.default_rng(0)
    d, g, h = 2 if direction == "bidirectional" else 1, GATES[op], HIDDEN
    inits = {"W": rng.standard_normal((d, g * h, FEATURES)) * 0.5,
             "R": rng.standard_normal((d, g * h, h)) * 0.5,
             "B": rng.standard_normal((d, 2 * g * h)) * 0.3}
    names = ["x", "W", "R", "B", "", "", ""]
    if seq_lens is not None:
        inits["lens"] = np.asarray(seq_lens, np.int32)
        names[4] = "lens"
    x_shape = [BATCH, STEPS, FEATURES] if layout else [STEPS, BATCH, FEATURES]
    s_shape = [BATCH, d, h] if layout else [d, BATCH, h]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if states:
        names[5] = "h0"
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, s_shape))
        if op == "LSTM":
            names[6] = "c0"
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, s_shape))
    if peepholes:
        inits["P"] = rng.standard_normal((d, 3 * h)) * 0.5
        names += ["P"]
    if op != "LSTM":
        names = names[:6]
    while names and not names[-1]:
        names.pop()
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, name="rnn", hidden_size=h, direction=direction,
                            layout=layout, **attrs)
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32 if k != "lens" else None), k)
               for k, v in inits.items()]
    y_shape = [BATCH, STEPS, d, h] if layout else [STEPS, d, BATCH, h]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT,
                                                             y_shape if o == "Y" else s_shape)
                               for o in outs], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds(model):
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input}


def assert_unrolled_matches(model):
    notes = []
    unrolled = unroll_recurrent(model, notes)
    onnx.checker.check_model(unrolled)
    assert not any(n.op_type in GATES for n in unrolled.graph.node)
    assert "unrolled" in notes[0]
    feeds = _feeds(model)
    for name, a, b in zip(["Y", "Y_h", "Y_c"], _run(model, feeds), _run(unrolled, feeds)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_unrolled_recurrent_op_matches_onnxruntime(op, direction):
    assert_unrolled_matches(recurrent_model(op, direction))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_unrolled_batch_first_layout_with_initial_states_matches_onnxruntime(op):
    # ORT has no layout=1 kernels: the reference is the layout=0 node on transposed data.
    batch_first = recurrent_model(op, "bidirectional", layout=1, states=True)
    time_first = recurrent_model(op, "bidirectional", layout=0, states=True)
    feeds = _feeds(batch_first)
    ref = _run(time_first, {k: v.transpose(1, 0, 2) for k, v in feeds.items()})
    got = _run(unroll_recurrent(batch_first), feeds)
    np.testing.assert_allclose(got[0], ref[0].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    for a, b in zip(ref[1:], got[1:]):
        np.testing.assert_allclose(b, a.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


def test_unrolled_lstm_with_peepholes_clip_and_initial_states_matches_onnxruntime():
    assert_unrolled_matches(recurrent_model("LSTM", "bidirectional", states=True,
                                            peepholes=True, clip=0.7))


def test_unrolled_lstm_with_coupled_input_forget_gate_matches_onnxruntime():
    assert_unrolled_matches(recurrent_model("LSTM", input_forget=1))


def test_unrolled_gru_with_linear_before_reset_matches_onnxruntime():
    assert_unrolled_matches(recurrent_model("GRU", "bidirectional", states=True,
                                            linear_before_reset=1))


def test_unrolled_gru_with_clip_and_relu_activation_matches_onnxruntime():
    assert_unrolled_matches(recurrent_model("GRU", clip=0.5, activations=["Sigmoid", "Relu"]))


def test_constant_full_sequence_lens_unrolls():
    assert_unrolled_matches(recurrent_model("LSTM", seq_lens=[STEPS] * BATCH))


def test_varying_sequence_lens_is_refused_naming_the_node():
    with pytest.raises(UnsupportedError, match=r"^LSTM 'rnn': cannot unroll .*sequence_lens"):
        unroll_recurrent(recurrent_model("LSTM", seq_lens=[STEPS, 2]))


def test_model_without_recurrent_ops_is_returned_as_is():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert unroll_recurrent(model) is model


@pytest.mark.slow
def test_lstm_model_compiles_for_x86_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    from onnxc.backends.tvm.build import compile_model

    model = recurrent_model("LSTM", "bidirectional", states=True)
    result = compile_model(model, "x86", str(tmp_path / "out"))
    assert result.verification["max_rel"] < 1e-4
    assert any("unrolled" in n for n in result.notes)


def test_recurrent_op_inside_an_if_branch_is_refused_naming_the_node(tmp_path):
    pytest.importorskip("tvm")
    from onnxc.backends.tvm.build import compile_model

    lstm = recurrent_model("LSTM")
    branch = helper.make_graph(list(lstm.graph.node), "then", [],
                               [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
                               list(lstm.graph.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["h_out"])], "else", [],
                              [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch,
                          else_branch=other)], "g",
        [lstm.graph.input[0], helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, BATCH, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, BATCH, HIDDEN])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(UnsupportedError, match=r"has no LSTM \(node 'rnn'\) in the then_branch "
                                               r"of If 'choose'$"):
        compile_model(model, "x86", str(tmp_path / "out"))


def test_sequence_too_long_to_unroll_is_refused_naming_the_node(monkeypatch):
    from onnxc.backends.tvm import unroll_rnn

    monkeypatch.setattr(unroll_rnn, "MAX_UNROLLED_STEPS", STEPS)
    with pytest.raises(UnsupportedError, match=r"^GRU 'rnn': .*5 time steps x 2 direction"):
        unroll_recurrent(recurrent_model("GRU", "bidirectional"))
