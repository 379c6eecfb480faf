"""int8 float fallback (--max-drop): activation-only quantized ops are candidates too,
grouped with the weighted layer that feeds them."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxc import frontend
from onnxc.calibrate.readers import Dataset
from onnxc.compress import compress
from onnxc.passes.int8 import Int8, Plan, fallback_groups
from onnxc.pipeline import Context, PassReport


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                       for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                           for n, s in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _gated_mlp(seed=0):
    """s = x * t (two inputs, no weight) → MatMul → Relu → MatMul → y [N, 6]."""
    rng = np.random.default_rng(seed)
    inits = {"w1": (rng.standard_normal((16, 32)) / 4).astype(np.float32),
             "w2": (rng.standard_normal((32, 6)) / 6).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "t"], ["s"], "gate"),
             helper.make_node("MatMul", ["s", "w1"], ["h"], "mm1"),
             helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2")]
    return _model(nodes, [("x", ["N", 16]), ("t", ["N", 16])], [("y", ["N", 6])], inits)


def test_harmful_activation_only_op_falls_back_and_weighted_layers_stay_int8():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    t = rng.uniform(0.5, 1.5, (256, 16)).astype(np.float32)
    # One calibration sample with a gate of 1000 (where x is 0, so the product stays
    # small): a min/max range on t then rounds every ordinary gate value to 0 or ~4.
    x[0], t[0] = 0.0, 1000.0
    data = Dataset({"x": x, "t": t}, None, "unlabelled.npy")
    res = compress(_gated_mlp(), ["int8"], options={"max_drop": 2.0}, calibration=data,
                   log=lambda m: None)
    extra = res.report["passes"][-1]["extra"]
    mp = extra["mixed_precision"]
    assert mp["fallback_nodes"] == ["gate"]                 # only the harmful op
    assert mp["reference_top1"] - mp["final_top1"] <= 2.0
    assert {"mm1", "mm2"} <= set(extra["quantized_layers"])
    assert "gate" in extra["float_layers"] and "gate" not in extra["quantized_layers"]


def test_all_int8_breaks_the_gated_model_the_fallback_test_uses():
    """The fallback test above is not vacuous: without --max-drop the gate is int8 and
    the agreement with float collapses."""
    from onnxc.calibrate.mixed import agreement, argmax_positions

    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    t = rng.uniform(0.5, 1.5, (256, 16)).astype(np.float32)
    x[0], t[0] = 0.0, 1000.0
    data = Dataset({"x": x, "t": t}, None, "unlabelled.npy")
    model = _gated_mlp()
    res = compress(model, ["int8"], calibration=data, log=lambda m: None)
    ref = argmax_positions(frontend.load(model), data)
    assert agreement(res.graph, data, ref) < 80.0


def _hard_swish_cnn(seed=0):
    """Conv → hard-swish (x · clip(x + 3, 0, 6) / 6) → Conv → Transpose → squared (Mul of
    two activations)."""
    rng = np.random.default_rng(seed)
    inits = {"w0": (rng.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32),
             "w1": (rng.standard_normal((4, 4, 1, 1)) / 2).astype(np.float32),
             "three": np.array(3.0, np.float32), "six": np.array(6.0, np.float32),
             "zero": np.array(0.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c0", "three"], ["a"], "plus3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["k"], "clip"),
             helper.make_node("Mul", ["c0", "k"], ["m"], "hswish"),
             helper.make_node("Div", ["m", "six"], ["hs"], "div6"),
             helper.make_node("Conv", ["hs", "w1"], ["c1"], "conv1"),
             helper.make_node("Transpose", ["c1"], ["tr"], "nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["tr", "tr"], ["y"], "square")]
    return _model(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", 6, 6, 4])], inits)


def _prepared(model, data):
    graph = frontend.load(model)
    ctx = Context(seed=0, calibration=data, log=lambda m: None, progress=False)
    return Int8({}).prepare(graph, ctx, PassReport("int8", False))


def test_activation_only_op_is_grouped_with_the_weighted_layer_feeding_it():
    data = Dataset({"x": np.random.default_rng(0).standard_normal((8, 3, 6, 6))
                    .astype(np.float32)}, None, "x.npy")
    prep = _prepared(_hard_swish_cnn(), data)
    layers = Plan(prep.graph, prep.candidates, prep.scheme.signed).layers
    groups = fallback_groups(prep.graph, layers, {n.name for n in prep.weighted})
    assert groups == {"conv0": ["conv0", "hswish"], "conv1": ["conv1", "square"]}


def test_any_subset_of_the_layers_builds_behind_a_data_movement_op():
    """With conv1 in float, the Transpose output read by the int8 Mul needs statistics
    of its own (in the full plan it shares conv1's output scale)."""
    data = Dataset({"x": np.random.default_rng(0).standard_normal((8, 3, 6, 6))
                    .astype(np.float32)}, None, "x.npy")
    prep = _prepared(_hard_swish_cnn(), data)
    from onnxc.execution import Runner

    ref = Runner(prep.graph).run(data.inputs)[0]
    built, plan = prep.build({"square"})
    assert plan.layers == {"square"} and plan.params_from["tr"] == "tr"
    out = Runner(built).run(data.inputs)[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_keep_float_accepts_an_activation_only_op():
    """What --max-drop / qdebug choose can be replayed with --keep-float."""
    rng = np.random.default_rng(2)
    data = Dataset({"x": rng.standard_normal((16, 16)).astype(np.float32),
                    "t": rng.uniform(0.5, 1.5, (16, 16)).astype(np.float32)}, None, "d.npy")
    res = compress(_gated_mlp(), ["int8"], options={"keep_float": "gate"}, calibration=data,
                   log=lambda m: None)
    extra = res.report["passes"][-1]["extra"]
    assert "gate" not in extra["quantized_layers"]
    assert {"mm1", "mm2"} <= set(extra["quantized_layers"])
