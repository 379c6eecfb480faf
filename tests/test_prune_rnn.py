"""Structured pruning of LSTM / GRU hidden units (passes/prune/rules.py: Recurrent).

Each model is built here: two stacked recurrent layers (the second reads the first's
Y through a Squeeze, as torch exports them), the last step into a Gemm. Units whose
W, R and B rows are all zero stay exactly zero from a zero initial state (LSTM: g = 0,
so c = 0 and h = 0; GRU: h̃ = 0 and h = z·h_prev = 0), so removing them must leave the
outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc import frontend
from onnxc.compress import compress
from onnxc.errors import UnsupportedError
from onnxc.execution import Runner
from onnxc.passes.prune import prunable_groups
from onnxc.passes.prune.groups import DependencyGraph
from onnxc.verify import compare_outputs

T, B, F, H = 5, 2, 6, 8
GATES = {"LSTM": 4, "GRU": 3}


def rnn_model(op="LSTM", dead=((0, (1, 5)), (1, (2,))), state="zeros",
              linear_before_reset=1, state_output=False, batch=B):
    """x [T, B, F] -> op(H) -> Squeeze -> op(H) -> Squeeze -> last step -> Gemm -> y.

    ``dead``: (layer, units) whose rows are zeroed. ``state``: how layer 0 gets its
    initial state: "zeros" (computed, like torch: ConstantOfShape of [1, batch, H]),
    "input" (a graph input), or "none"; layer 1 gets a constant one (zero at its dead
    units) when ``batch`` is static, else none. A symbolic batch keeps the computed
    state from being folded into a constant."""
    rng = np.random.default_rng(0)
    g = GATES[op]
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [T, batch, F])]

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    x = "x"
    for layer, fan_in in ((0, F), (1, H)):
        w = rng.standard_normal((1, g * H, fan_in)).astype(np.float32) * 0.5
        r = rng.standard_normal((1, g * H, H)).astype(np.float32) * 0.5
        b = rng.standard_normal((1, 2 * g * H)).astype(np.float32) * 0.2
        for lay, units in dead:
            if lay == layer:
                for k in range(g):
                    w[0, k * H + np.array(units)] = 0
                    r[0, k * H + np.array(units)] = 0
                for k in range(2 * g):
                    b[0, k * H + np.array(units)] = 0
        ins = [x, const(f"W{layer}", w), const(f"R{layer}", r), const(f"B{layer}", b), ""]
        if layer == 0 and state == "zeros":
            nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                      helper.make_node("Gather", ["shape", "one"], ["batch"], axis=0),
                      helper.make_node("Concat", ["one", "batch", "hid"], ["hshape"], axis=0),
                      helper.make_node("ConstantOfShape", ["hshape"], ["h0"],
                                       value=helper.make_tensor("v", TensorProto.FLOAT,
                                                                [1], [0.0]))]
            inits += [numpy_helper.from_array(np.array([1], np.int64), "one"),
                      numpy_helper.from_array(np.array([H], np.int64), "hid")]
            ins += ["h0"] + (["h0"] if op == "LSTM" else [])
        elif layer == 0 and state == "view":
            # silero-vad: one state input, each layer's state a Gather + Unsqueeze of it.
            inputs.append(helper.make_tensor_value_info("st", TensorProto.FLOAT,
                                                        [2, batch, H]))
            nodes += [helper.make_node("Gather", ["st", "zero"], ["st0"], axis=0),
                      helper.make_node("Unsqueeze", ["st0", "ax0"], ["h0"])]
            inits += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                      numpy_helper.from_array(np.array([0], np.int64), "ax0")]
            ins.append("h0")
        elif layer == 0 and state == "input":
            inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT,
                                                        [1, batch, H]))
            ins.append("h0")
        elif layer == 1 and batch == B:
            h1 = rng.standard_normal((1, B, H)).astype(np.float32) * 0.3
            for lay, units in dead:
                if lay == 1:
                    h1[..., list(units)] = 0
            ins.append(const("h1", h1))
            if op == "LSTM":
                ins.append(const("c1", np.zeros((1, B, H), np.float32)))
        while ins[-1] == "":
            ins.pop()
        attrs = {"hidden_size": H}
        if op == "GRU":
            attrs["linear_before_reset"] = linear_before_reset
        outs = [f"Y{layer}", f"Yh{layer}"]
        nodes.append(helper.make_node(op, ins, outs, name=f"rnn{layer}", **attrs))
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "ax1"], [f"S{layer}"]))
        x = f"S{layer}"
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    nodes.append(helper.make_node("Gather", [x, "last"], ["hT"], axis=0))
    inits.append(numpy_helper.from_array(np.array(T - 1, np.int64), "last"))
    nodes.append(helper.make_node("Gemm", ["hT", const("fcW", rng.standard_normal((3, H))),
                                           const("fcB", np.zeros(3))], ["y"],
                                  name="fc", transB=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])]
    if state_output:
        outputs.append(helper.make_tensor_value_info("Yh0", TensorProto.FLOAT,
                                                     [1, batch, H]))
    model = helper.make_model(helper.make_graph(nodes, "rnn", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def feeds(model):
    x = np.random.default_rng(1).standard_normal((T, B, F)).astype(np.float32)
    out = {"x": x}
    if any(i.name == "h0" for i in model.graph.input):
        out["h0"] = np.zeros((1, B, H), np.float32)
    return out


def prune_units(model, n_dead):
    dg = DependencyGraph(frontend.load(model))
    n = sum(len(g.classes) for g in prunable_groups(dg, []))
    return compress(model, ["prune"], options={
        "prune_ratio": (n_dead + 0.5) / n, "prune_global": True, "prune_criterion": "l1",
        "prune_multiple": 1}, log=lambda m: None)


def hidden_sizes(graph, op):
    return [(n.attrs["hidden_size"], n.inputs[1].values.shape, n.inputs[2].values.shape)
            for n in graph.nodes if n.op == op]


@pytest.mark.parametrize("op,lbr,state", [("LSTM", 0, "zeros"), ("LSTM", 0, "none"),
                                          ("GRU", 1, "zeros"), ("GRU", 0, "none")])
def test_removing_zero_impact_units_is_exact(op, lbr, state):
    model = rnn_model(op, state=state, linear_before_reset=lbr,
                      batch="batch" if state == "zeros" else B)
    result = prune_units(model, 3)
    g = GATES[op]
    assert hidden_sizes(result.graph, op) == [(H - 2, (1, g * (H - 2), F), (1, g * (H - 2),
                                                                             H - 2)),
                                              (H - 1, (1, g * (H - 1), H - 2),
                                               (1, g * (H - 1), H - 1))]
    fc = next(n for n in result.graph.nodes if n.op == "Gemm")
    assert fc.inputs[1].values.shape == (3, H - 1)
    x = feeds(model)
    cmp = compare_outputs(Runner(model).run(x), Runner(result.graph).run(x))
    assert cmp.max_rel <= 1e-5, cmp
    assert result.report["passes"][-1]["extra"]["channels_removed"] == 3
    # A computed initial state is narrowed to the kept units by a Gather.
    gathers = [n for n in result.graph.nodes if n.op == "Gather" and n.outputs[0].outputs
               and n.outputs[0].outputs[0].op == op]
    assert len(gathers) == (0 if state == "none" else 2 if op == "LSTM" else 1)


def test_state_that_is_a_graph_input_leaves_its_layer_whole_and_says_why():
    model = rnn_model("GRU", state="input")
    dg = DependencyGraph(frontend.load(model))
    groups = {g.sources[0]: g for g in dg.groups}
    assert "initial state 'h0' is a graph input" in groups["rnn0"].blocked
    assert groups["rnn1"].blocked is None
    result = prune_units(model, 1)
    assert [h for h, _, _ in hidden_sizes(result.graph, "GRU")] == [H, H - 1]
    x = feeds(model)
    assert Runner(result.graph).run(x)[0].shape == (B, 3)


def test_state_selected_from_a_graph_input_leaves_its_layer_whole():
    model = rnn_model("GRU", state="view")
    groups = {g.sources[0]: g for g in DependencyGraph(frontend.load(model)).groups}
    assert "comes from graph input 'st'" in groups["rnn0"].blocked
    assert groups["rnn1"].blocked is None


def test_state_that_is_a_graph_output_keeps_its_units():
    model = rnn_model("LSTM", state="zeros", state_output=True)
    result = prune_units(model, 1)
    assert [h for h, _, _ in hidden_sizes(result.graph, "LSTM")] == [H, H - 1]


def test_pruning_units_cuts_the_recurrent_weights_quadratically():
    model = rnn_model("LSTM", dead=())
    result = compress(model, ["prune"], options={"prune_ratio": 0.5, "prune_multiple": 1},
                      log=lambda m: None)
    # W [4H, F] halves, R [4H, H] drops to a quarter: params fall by more than half.
    assert result.report["final"]["params"] < 0.5 * result.report["original"]["params"]
    assert result.report["final"]["macs"] < 0.5 * result.report["original"]["macs"]


def test_nothing_prunable_under_a_flops_budget_is_an_error_naming_the_layer():
    model = rnn_model("GRU", state="input")
    # Only rnn1 is prunable; skip it and nothing is left.
    with pytest.raises(UnsupportedError, match="--prune-flops cannot be met.*rnn"):
        compress(model, ["prune"], options={"prune_flops": 0.5, "prune_skip": "rnn1"},
                 log=lambda m: None)


def test_bidirectional_lstm_reshaped_to_both_directions_prunes_units_exactly():
    # torch's bidirectional output: Y [T, 2, B, H] -> Transpose -> Reshape [T, B, 2H]; a
    # unit goes in both directions and both halves of the consumer's input.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4 * H, F)).astype(np.float32) * 0.5
    r = rng.standard_normal((2, 4 * H, H)).astype(np.float32) * 0.5
    b = rng.standard_normal((2, 8 * H)).astype(np.float32) * 0.2
    for k in range(4):
        w[:, k * H + np.array([1, 5])] = 0
        r[:, k * H + np.array([1, 5])] = 0
    for k in range(8):
        b[:, k * H + np.array([1, 5])] = 0
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w, "W"), (r, "R"), (b, "B"), (np.array([T, B, 2 * H], np.int64), "shape"),
        (np.array(T - 1, np.int64), "last"),
        (rng.standard_normal((3, 2 * H)).astype(np.float32), "fcW"))]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Yh"], hidden_size=H,
                              direction="bidirectional", name="bi"),
             helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Yt", "shape"], ["Yr"]),
             helper.make_node("Gather", ["Yr", "last"], ["hT"], axis=0),
             helper.make_node("Gemm", ["hT", "fcW"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "bi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    result = compress(model, ["prune"], options={"prune_ratio": 2.5 / H, "prune_multiple": 1},
                      log=lambda m: None)
    assert hidden_sizes(result.graph, "LSTM") == [(H - 2, (2, 4 * (H - 2), F),
                                                   (2, 4 * (H - 2), H - 2))]
    fc = next(n for n in result.graph.nodes if n.op == "Gemm")
    assert fc.inputs[1].values.shape == (3, 2 * (H - 2))
    x = feeds(model)
    assert compare_outputs(Runner(model).run(x), Runner(result.graph).run(x)).max_rel <= 1e-5
