"""onnxc qdebug, cross-layer equalization (--int8-cle) and AdaRound (--int8-adaround)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.calibrate.readers import Dataset
from onnxc.execution import Runner
from onnxc.ir import Graph
from quant_helpers import dataset, residual_cnn, save


def depthwise_net(seed: int = 0, c: int = 8, spread: float = 100.0,
                  act: str = "Relu") -> onnx.ModelProto:
    """Conv 1x1 expand → act → 3x3 depthwise → Relu → Conv 1x1 → GAP → Gemm, the expand
    conv's channels scaled by factors spanning ``spread`` (undone in the depthwise conv,
    so the function is a plain, balanced net): MobileNet after BN folding."""
    rng = np.random.default_rng(seed)
    s = np.exp(np.linspace(-np.log(spread) / 2, np.log(spread) / 2, 2 * c))
    w0 = rng.standard_normal((2 * c, 3, 1, 1)) * 0.5
    b0 = rng.standard_normal(2 * c) * 0.1
    w1 = rng.standard_normal((2 * c, 1, 3, 3)) * 0.3
    b1 = rng.standard_normal(2 * c) * 0.1
    w2 = rng.standard_normal((c, 2 * c, 1, 1)) * 0.3
    wf = rng.standard_normal((10, c)) * 0.5
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (
        ("w0", w0 * s[:, None, None, None]), ("b0", b0 * s),
        ("w1", w1 / s[:, None, None, None]), ("b1", b1),
        ("w2", w2), ("b2", np.zeros(c)), ("wf", wf), ("bf", np.zeros(10)))]
    act_node = helper.make_node("Relu", ["c0"], ["r0"], "act0") if act == "Relu" else \
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], "act0")
    if act != "Relu":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "expand", kernel_shape=[1, 1]),
        act_node,
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], "dw", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], group=2 * c),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "project", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten", axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _int8(model, calib, **options):
    from onnxc.passes.int8 import Int8
    from onnxc.pipeline import Context, PassReport

    graph = Graph.from_onnx(model).refresh()      # dtypes, as the frontend gives them
    ctx = Context(calibration=calib, log=lambda m: None, progress=False)
    report = PassReport("int8", False)
    return Int8(options).run(graph, ctx, report), report


def _cosine(model, quantized, data):
    from onnxc.passes.qdebug import output_cosine

    return output_cosine(Runner(model).run(data.inputs), Runner(quantized).run(data.inputs))


def test_cle_keeps_float_outputs_and_balances_depthwise_ranges():
    from onnxc.calibrate.equalize import equalize

    model = depthwise_net()
    graph = Graph.from_onnx(model)
    data = dataset(model, n=16)
    ref = Runner(graph).run(data.inputs)[0]
    info = equalize(graph)
    graph.refresh()
    got = Runner(graph).run(data.inputs)[0]
    assert [["expand", "dw"], ["dw", "project"]] == info["pairs"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    before, after = info["channel_range_spread"]["dw"]
    assert before > 50 and after < before / 5


def test_cle_skips_relu6_pair_as_not_homogeneous():
    from onnxc.calibrate.equalize import find_pairs

    pairs, skipped = find_pairs(Graph.from_onnx(depthwise_net(act="Clip")))
    assert [(a.name, b.name) for a, b in pairs] == [("dw", "project")]
    assert skipped and skipped[0][0] == "expand" and "Clip" in skipped[0][1]


def test_int8_cle_raises_per_tensor_output_cosine():
    model = depthwise_net()
    data = dataset(model, n=64)
    plain, _ = _int8(model, data, int8_weight_granularity="tensor")
    cle, report = _int8(model, data, int8_weight_granularity="tensor", int8_cle=True)
    assert report.extra["cle"]["float_relative_error"] < 1e-4
    assert _cosine(model, cle, data) > _cosine(model, plain, data) + 0.01


def test_adaround_lowers_layer_reconstruction_error():
    import torch

    from onnxc.calibrate.adaround import round_layer

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    # Correlated input channels: with i.i.d. inputs round-to-nearest is already optimal.
    x = (rng.standard_normal((64, 1, 6, 6)) + 0.3 * rng.standard_normal((64, 4, 6, 6))
         ).astype(np.float32)
    scale = (np.abs(w).reshape(8, -1).max(1) / 15).reshape(-1, 1, 1, 1)   # ~5-bit grid

    def fn(xt, wt):
        return torch.nn.functional.conv2d(xt, wt, padding=1)

    codes, nearest, ada = round_layer(fn, w, scale, 127, x, x, iters=100)
    assert ada < 0.6 * nearest
    # Every code is the floor or the ceiling of w/s: rounding, not retraining.
    assert np.all(np.abs(codes - w / scale) < 1.0)


def test_int8_adaround_option_reports_layers_and_keeps_format(tmp_path):
    model = residual_cnn()
    data = dataset(model, n=64)
    q, report = _int8(model, data, int8_adaround=True, int8_adaround_iters=30)
    ada = report.extra["adaround"]
    assert ada["iterations"] == 30 and set(ada["layers"]) == {"conv0", "conv1", "conv2", "fc"}
    assert any("AdaRound" in n for n in report.notes)
    assert sum(n.op == "QLinearConv" or n.op == "DequantizeLinear" for n in q.nodes) > 0
    assert _cosine(model, q, data) > 0.99


def test_qdebug_cli_names_the_outlier_layer_and_writes_outputs(tmp_path):
    from onnxc.cli import main

    model = residual_cnn()
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    arr = numpy_helper.to_array(w1).copy()
    arr[0, 0, 0, 0] = 40.0                     # one huge weight: per-tensor scale x100
    w1.CopyFrom(numpy_helper.from_array(arr, "w1"))
    path = save(model, tmp_path)
    data = dataset(model, n=64)
    np.savez(tmp_path / "d.npz", images=data.inputs["x"])
    out = tmp_path / "qd"
    code = main(["qdebug", path, "--calib-data", str(tmp_path / "d.npz"), "-o", str(out),
                 "--samples", "32", "--int8-weight-granularity", "tensor",
                 "--min-cosine", "0.9999"])
    assert code == 0
    doc = json.loads((out / "qdebug.json").read_text())
    assert doc["worst"][0] == "conv1"
    row = next(r for r in doc["layers"] if r["layer"] == "conv1")
    assert any(f.startswith("weight channel spread") for f in row["outliers"])
    rec = doc["recommendation"]
    assert rec["keep_float"][0] == "conv1" and rec["met"]
    assert rec["output_cosine_with_fallback"] > rec["output_cosine_all_int8"]
    assert (out / "qdebug.png").stat().st_size > 1000
    assert "conv1" in (out / "qdebug.txt").read_text()


def test_qdebug_rejects_bad_samples_with_usage_exit(tmp_path, capsys):
    from onnxc.cli import main

    path = save(residual_cnn(), tmp_path)
    assert main(["qdebug", path, "-o", str(tmp_path / "o"), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_qdebug_max_drop_uses_labelled_fallback(tmp_path):
    from onnxc.cli import main

    model = residual_cnn()
    path = save(model, tmp_path)
    data = dataset(model, n=64)
    np.savez(tmp_path / "d.npz", images=data.inputs["x"], labels=data.labels)
    out = tmp_path / "qd"
    assert main(["qdebug", path, "--calib-data", str(tmp_path / "d.npz"), "--eval-data",
                 str(tmp_path / "d.npz"), "-o", str(out), "--samples", "16",
                 "--max-drop", "100"]) == 0
    rec = json.loads((out / "qdebug.json").read_text())["recommendation"]
    assert rec["criterion"].startswith("top-1 drop <= 100")
    assert rec["keep_float"] == [] and rec["met"]
