"""Specification of the ``gap`` pass: flatten->FC heads become GlobalAveragePool -> FC."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cifar_preprocess, light_model_path
from onnxc.calibrate.readers import Dataset, load_npz
from onnxc.compress import compress
from onnxc.errors import UnsupportedError, UsageError
from onnxc.execution import Runner
from onnxc.verify import top1

RNG = np.random.default_rng(1)
FC_MODEL = pathlib.Path(__file__).parent / "models" / "vgg_fc_cifar10.onnx"
C, H, W, HIDDEN, CLASSES = 8, 4, 4, 32, 10


def head_model(relu=True, matmul=False, extra_consumer=False):
    """x: N×8×4×4 feature map -> Flatten -> FC(128->32) [-> Relu] -> FC(32->10) -> y."""
    inits = {"w1": RNG.standard_normal((HIDDEN, C * H * W)) * 0.2,
             "b1": RNG.standard_normal(HIDDEN), "w2": RNG.standard_normal((CLASSES, HIDDEN)),
             "b2": RNG.standard_normal(CLASSES)}
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1)]
    if matmul:
        inits["w1"] = inits["w1"].T.copy()
        nodes += [helper.make_node("MatMul", ["f", "w1"], ["m1"]),
                  helper.make_node("Add", ["m1", "b1"], ["h1"])]
    else:
        nodes.append(helper.make_node("Gemm", ["f", "w1", "b1"], ["h1"], transB=1))
    hidden = "h1"
    if relu:
        nodes.append(helper.make_node("Relu", ["h1"], ["r1"]))
        hidden = "r1"
    nodes.append(helper.make_node("Gemm", [hidden, "w2", "b2"], ["y"], transB=1))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])]
    if extra_consumer:
        nodes.append(helper.make_node("Sigmoid", ["h1"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", HIDDEN]))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
        outputs, [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def constant_maps(n):
    """Feature maps equal at every position: where the data-free fit is exact."""
    return np.repeat(np.repeat(RNG.standard_normal((n, C, 1, 1)), H, 2), W, 3) \
        .astype(np.float32)


def gap(model, calibration=None, log=None, **options):
    return compress(model, ["gap"], options=options, calibration=calibration,
                    log=log or (lambda m: None))


def gap_report(result):
    return next(p for p in result.report["passes"] if p["name"] == "gap")


def rel_error(a, b, x):
    ya, yb = Runner(a).run({"x": x})[0], Runner(b).run({"x": x})[0]
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


# ---- the rewrite ---------------------------------------------------------------------------

def test_head_becomes_global_average_pool_then_fc_reading_channels():
    result = gap(head_model())
    ops = [n.op for n in result.graph.nodes]
    assert ops == ["GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm"]
    first = [n for n in result.graph.nodes if n.op == "Gemm"][0]
    assert first.inputs[1].values.shape == (HIDDEN, C)


def test_data_free_fit_warns_and_is_exact_on_spatially_constant_maps():
    messages = []
    model = head_model()
    result = gap(model, log=messages.append)
    assert any("no --calib-data: data-free fit" in m for m in messages)
    assert rel_error(model, result.graph.to_onnx(), constant_maps(16)) <= 1e-5


def test_least_squares_fit_matches_the_old_logits_on_calibration_data():
    model = head_model()
    # Maps = per-channel level × a fixed, non-uniform spatial pattern (objects sit in the
    # centre): the pooled features determine the flattened ones, but not uniformly, so
    # the data-free "sum over positions" is biased and the least-squares fit is not.
    pattern = 1 + 0.8 * RNG.random((1, 1, H, W))
    def maps(n):
        return (RNG.standard_normal((n, C, 1, 1)) * pattern).astype(np.float32)
    result = gap(model, calibration=Dataset({"x": maps(512)}, source="maps"))
    fit = gap_report(result)["extra"]["gap"][0]
    assert fit["fit"] == "least-squares" and fit["calibration_samples"] == 512
    assert fit["logit_rel_error"] < 0.01 and fit["argmax_agreement"] > 0.99
    free = gap(model)
    held_out = maps(64)
    assert rel_error(model, result.graph.to_onnx(), held_out) < \
        rel_error(model, free.graph.to_onnx(), held_out)


def test_kl_fit_agrees_with_the_old_argmax_at_least_as_often_as_least_squares():
    def maps(n):   # per-channel levels + spatial texture the pooled features cannot see
        return (constant_maps(n) + 0.5 * RNG.standard_normal((n, C, H, W))).astype(
            np.float32)
    data = Dataset({"x": maps(512)}, source="maps")
    model = head_model()
    rows = {fit: gap_report(gap(model, calibration=data, gap_collapse=True, gap_fit=fit))
            ["extra"]["gap"][0] for fit in ("lstsq", "kl")}
    assert rows["kl"]["fit"] == "least-squares + KL"
    assert rows["kl"]["argmax_agreement"] >= rows["lstsq"]["argmax_agreement"]


def test_relu_aware_first_fc_fit_lowers_the_error_after_the_relu():
    from onnxc import frontend
    from onnxc.passes import gap as gap_module
    from onnxc.passes._activations import collect

    def maps(n):   # per-channel levels + spatial texture the pooled features cannot see
        return (constant_maps(n) + 0.7 * RNG.standard_normal((n, C, H, W))).astype(
            np.float32)
    data = Dataset({"x": maps(400)}, source="maps")
    model = head_model()
    graph = frontend.load(model)
    fitter = gap_module.GlobalAveragePoolHead()
    head = fitter._find_heads(graph)[0][0]
    acts = collect(graph, ["x", "h1", "y"], data)
    g = acts["x"].reshape(400, C, -1).mean(2).astype(np.float64)
    hidden = acts["h1"].astype(np.float64)

    def error_after_relu(relu_fit):
        first = fitter._fit_form(head, "hidden", g, hidden, acts["y"].astype(np.float64),
                                 1e-3, False, relu_fit)[0]
        return np.linalg.norm(np.maximum(g @ first.m + first.c, 0) - np.maximum(hidden, 0))
    assert error_after_relu(True) < 0.98 * error_after_relu(False)
    # The pass tries both fits (each ridge) and keeps the better on held-out logits.
    row = gap_report(gap(model, calibration=data, gap_form="hidden"))["extra"]["gap"][0]
    assert sorted(t["relu_fit"] for t in row["held_out"]) == \
        [False] * len(gap_module.RIDGES) + [True] * len(gap_module.RIDGES)


def test_collapse_replaces_the_fc_stack_by_one_fc_to_the_classes():
    data = Dataset({"x": constant_maps(256)}, source="maps")
    result = gap(head_model(), calibration=data, gap_collapse=True)
    gemms = [n for n in result.graph.nodes if n.op == "Gemm"]
    assert len(gemms) == 1 and gemms[0].inputs[1].values.shape == (CLASSES, C)
    row = gap_report(result)["extra"]["gap"][0]
    assert row["head_params_after"] == CLASSES * C + CLASSES
    assert row["head_params_before"] == HIDDEN * C * H * W + HIDDEN + CLASSES * HIDDEN \
        + CLASSES


def test_auto_form_keeps_the_form_with_the_lower_held_out_logit_error():
    maps = Dataset({"x": constant_maps(400)}, source="maps")
    # Nonlinear head, spatially constant maps: the hidden form can reproduce the logits
    # exactly, one FC cannot; a linear head: both can, and the collapsed one is as good.
    row = gap_report(gap(head_model(), calibration=maps, gap_form="auto"))["extra"]["gap"][0]
    assert row["form"] == "hidden" and row["held_out_samples"] == 80
    best = {f: min(t["held_out_logit_rel_error"] for t in row["held_out"] if t["form"] == f)
            for f in ("hidden", "collapse")}
    assert best["hidden"] < best["collapse"]
    assert row["held_out_logit_rel_error"] == best["hidden"]
    linear = gap(head_model(relu=False), calibration=maps, gap_form="collapse")
    assert gap_report(linear)["extra"]["gap"][0]["logit_rel_error"] < 1e-3


def test_collapse_of_a_linear_stack_without_data_composes_it_exactly():
    model = head_model(relu=False)
    result = gap(model, gap_collapse=True)
    assert [n.op for n in result.graph.nodes] == ["GlobalAveragePool", "Flatten", "Gemm"]
    assert rel_error(model, result.graph.to_onnx(), constant_maps(16)) <= 1e-5


def test_matmul_plus_add_head_is_recognised():
    model = head_model(matmul=True)
    result = gap(model)
    assert rel_error(model, result.graph.to_onnx(), constant_maps(16)) <= 1e-5


def region_constant_maps(n, grid=2):
    """Feature maps constant within each cell of a grid × grid partition of the 4×4 map:
    where the data-free grid fit is exact."""
    cells = RNG.standard_normal((n, C, grid, grid))
    return np.repeat(np.repeat(cells, H // grid, 2), W // grid, 3).astype(np.float32)


def test_grid_2_pools_regions_and_its_data_free_fit_is_exact_on_region_constant_maps():
    model = head_model()
    result = gap(model, gap_grid=2, gap_data_free=True)
    pool = next(n for n in result.graph.nodes if n.op == "AveragePool")
    assert list(pool.attrs["kernel_shape"]) == [2, 2] and list(pool.attrs["strides"]) == [2, 2]
    assert "GlobalAveragePool" not in [n.op for n in result.graph.nodes]
    gemm = next(n for n in result.graph.nodes if n.op == "Gemm")
    assert gemm.inputs[1].values.shape == (HIDDEN, C * 4)
    row = gap_report(result)["extra"]["gap"][0]
    assert row["grid"] == 2 and row["pooled_features"] == C * 4
    proto = result.graph.to_onnx()
    onnx.checker.check_model(proto)
    assert rel_error(model, proto, region_constant_maps(16)) <= 1e-5
    # A global average cannot be exact on such maps: the grid keeps what GAP loses.
    assert rel_error(model, gap(model, gap_data_free=True).graph.to_onnx(),
                     region_constant_maps(16)) > 1e-2


def test_grid_2_data_fit_reproduces_logits_that_global_pooling_cannot():
    data = Dataset({"x": region_constant_maps(400)}, source="maps")
    fitted = gap(head_model(), calibration=data, gap_grid=2)
    pooled = gap(head_model(), calibration=data)
    err = gap_report(fitted)["extra"]["gap"][0]["logit_rel_error"]
    assert err < 1e-3 < gap_report(pooled)["extra"]["gap"][0]["logit_rel_error"]


# ---- refusals: one clear message, model untouched ------------------------------------------

def test_global_pool_head_is_refused_as_already_global():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(RNG.standard_normal((CLASSES, C)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedError, match="already 8x1x1"):
        gap(model)


def test_head_whose_hidden_layer_is_also_read_elsewhere_is_not_a_plain_classifier():
    with pytest.raises(UnsupportedError, match="not a plain classifier head"):
        gap(head_model(extra_consumer=True))


def test_model_without_flatten_into_fc_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedError, match="no plain classifier head"):
        gap(model)


def test_collapse_of_a_nonlinear_head_without_data_is_a_usage_error():
    with pytest.raises(UsageError, match="--gap-collapse .* needs calibration data"):
        gap(head_model(), gap_collapse=True)


@pytest.mark.parametrize("options, message", [
    ({"gap_form": "auto"}, "--gap-form auto chooses on held-out calibration data"),
    ({"gap_form": "hidden", "gap_collapse": True}, "--gap-collapse contradicts"),
    ({"gap_form": "wide"}, "--gap-form must be one of"),
])
def test_bad_form_is_a_usage_error(options, message):
    with pytest.raises(UsageError, match=message):
        gap(head_model(), **options)


@pytest.mark.parametrize("grid, message", [
    (0, "--gap-grid must be a positive integer"),
    ("two", "--gap-grid must be a positive integer"),
    (3, "--gap-grid 3 does not divide the 4x4 map"),
    (4, "--gap-grid 4 keeps the whole 4x4 map"),
])
def test_bad_grid_is_a_usage_error(grid, message):
    with pytest.raises(UsageError, match=message):
        gap(head_model(), gap_grid=grid)


def test_bad_sample_count_is_a_usage_error():
    with pytest.raises(UsageError, match="--gap-samples must be a positive integer"):
        gap(head_model(), gap_samples=0)


# ---- the trained FC-head model (tools/train_fc_model.py) ---------------------------------

def fc_model_data(train_path, test_path):
    """The trained FC-head model, 512 calibration images and the test_dev set."""
    from onnxc import frontend

    graph = frontend.load(str(FC_MODEL))
    return (graph, load_npz(str(train_path), graph, cifar_preprocess(), samples=512),
            load_npz(str(test_path), graph, cifar_preprocess()))


def test_trained_fc_model_head_shrinks_90pct_and_the_data_fit_beats_the_data_free_one(
        cifar_train_path, cifar_test_path):
    graph, calib, evaluation = fc_model_data(cifar_train_path, cifar_test_path)
    fitted = gap(str(FC_MODEL), calibration=calib)
    free = gap(str(FC_MODEL), gap_data_free=True)
    row = gap_report(fitted)["extra"]["gap"][0]
    assert row["head_params_after"] <= 0.1 * row["head_params_before"]
    before = top1(graph, evaluation)
    after_fit, after_free = top1(fitted.graph, evaluation), top1(free.graph, evaluation)
    assert after_fit > after_free
    # Measured 68.76% -> 63.85% with these 512 images (tools/bench_gap.py, docs/
    # lowrank_gap.md): the 1.5 pt goal is not reached on this model without
    # training; this guards against regressions of the fit.
    assert before > 65 and before - after_fit < 7, (before, after_fit)


def test_trained_fc_model_2x2_grid_collapse_keeps_more_accuracy_than_gap_at_fewer_params(
        cifar_train_path, cifar_test_path):
    graph, calib, evaluation = fc_model_data(cifar_train_path, cifar_test_path)
    pooled = gap(str(FC_MODEL), calibration=calib)
    grid = gap(str(FC_MODEL), calibration=calib, gap_grid=2, gap_form="collapse")
    row = gap_report(grid)["extra"]["gap"][0]
    assert row["head_params_after"] < gap_report(pooled)["extra"]["gap"][0][
        "head_params_after"] < 0.1 * row["head_params_before"]
    # Measured 63.85% (GAP, hidden kept) vs 67.78% (2x2 grid, one FC) with these 512
    # images, original 68.76% (tools/bench_gap.py, docs/lowrank_gap.md).
    assert top1(grid.graph, evaluation) > top1(pooled.graph, evaluation) + 2


@pytest.mark.slow
def test_light_zfnet_gap_runs_in_onnx_runtime():
    from onnxc import frontend
    from onnxc.pipeline import Context, PassManager, resolve_passes

    graph = frontend.load(str(light_model_path("zfnet512")))
    out = PassManager(resolve_passes(["gap"]), verify=False).run(
        graph, Context(log=lambda m: None)).graph
    assert "GlobalAveragePool" in [n.op for n in out.nodes]
    onnx.checker.check_model(out.to_onnx())
    x = RNG.standard_normal((1, 3, 224, 224)).astype(np.float32)
    y = Runner(out).run({graph.gs.inputs[0].name: x})[0]
    assert y.shape == (1, 1000) and np.all(np.isfinite(y))
