"""Specification of the ``lowrank`` pass (SVD, data-aware SVD, Tucker-2, CP, rank rules)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from onnxc.calibrate.readers import Dataset
from onnxc.compress import compress
from onnxc.errors import UnsupportedError, UsageError
from onnxc.passes import _lowrank_math as lm
from onnxc.execution import Runner

RNG = np.random.default_rng(0)


# ---- small models --------------------------------------------------------------------

def _model(nodes, inits, x_shape, y_shape, opset=13):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def low_rank(rows, cols, rank, rng=RNG):
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / rank


def gemm_model(w, bias=True):
    out, d_in = w.shape
    inits = {"w": w}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = RNG.standard_normal(out)
        inputs.append("b")
    return _model([helper.make_node("Gemm", inputs, ["y"], transB=1)], inits,
                  ["N", d_in], ["N", out])


def conv_model(w, stride=1, pads=(1, 1, 1, 1), dilation=1, size=12, group=1):
    n, c = w.shape[0], w.shape[1] * group
    node = helper.make_node("Conv", ["x", "w", "b"], ["h"], strides=[stride, stride],
                            pads=list(pads), dilations=[dilation, dilation], group=group)
    relu = helper.make_node("Relu", ["h"], ["y"])
    k = w.shape[2]
    out = (size + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    out_w = (size + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    return _model([node, relu], {"w": w, "b": RNG.standard_normal(n)},
                  ["N", c, size, size], ["N", n, out, out_w])


def tucker_weight(n, c, r_out, r_in, k=3):
    core = RNG.standard_normal((r_out, r_in, k, k))
    return lm.tucker2_reconstruct(core, np.linalg.qr(RNG.standard_normal((n, r_out)))[0],
                                  np.linalg.qr(RNG.standard_normal((c, r_in)))[0])


def run_pass(model, **options):
    # Ranks unrounded unless a test asks (the target's default rounds them to 8).
    options.setdefault("lowrank_multiple", 1)
    return compress(model, ["lowrank"], options=options, log=lambda m: None)


def output_error(a, b, shape, n=8):
    x = RNG.standard_normal([n] + list(shape)).astype(np.float32)
    ya = Runner(a).run({"x": x})[0]
    yb = Runner(b).run({"x": x})[0]
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def ops(graph):
    return [n.op for n in graph.nodes]


def layers(result):
    return next(p for p in result.report["passes"] if p["name"] == "lowrank")["extra"][
        "lowrank"]["layers"]


# ---- exactness ---------------------------------------------------------------------------

def test_exactly_rank_r_fc_weight_splits_at_rank_r_with_error_below_1e_5():
    model = gemm_model(low_rank(48, 64, 5))
    result = run_pass(model, lowrank_energy=1.0)
    assert layers(result)[0]["ranks"] == [5]
    assert ops(result.graph) == ["Gemm", "Gemm"]
    assert output_error(model, result.graph.to_onnx(), [64]) <= 1e-5


def test_matmul_on_a_sequence_splits_into_two_matmuls_and_stays_exact():
    w = low_rank(32, 40, 4)                                   # in × out for MatMul
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w},
                   ["N", 6, 32], ["N", 6, 40])
    result = run_pass(model, lowrank_energy=1.0)
    assert ops(result.graph) == ["MatMul", "MatMul"]
    assert layers(result)[0]["ranks"] == [4]
    # MACs are counted per row of the sequence: 6 rows × 4 × (32 + 40).
    assert layers(result)[0]["macs_after"] == 6 * 4 * 72
    assert output_error(model, result.graph.to_onnx(), [6, 32]) <= 1e-5


def test_tucker2_at_full_ranks_reproduces_the_conv():
    model = conv_model(RNG.standard_normal((24, 16, 3, 3)))
    result = run_pass(model, lowrank_rank=10_000, lowrank_force=True)
    assert layers(result)[0]["ranks"] == [24, 16]
    assert ops(result.graph) == ["Conv", "Conv", "Conv", "Relu"]
    assert output_error(model, result.graph.to_onnx(), [16, 12, 12]) <= 1e-5


def test_tucker2_finds_the_multilinear_rank_of_an_exact_weight_and_saves_macs():
    model = conv_model(tucker_weight(32, 24, 6, 5))
    result = run_pass(model, lowrank_energy=1.0, lowrank_als_iters=0)
    row = layers(result)[0]
    assert row["ranks"] == [6, 5] and row["method"] == "tucker2"
    assert row["macs_after"] < row["macs_before"] / 3
    assert output_error(model, result.graph.to_onnx(), [24, 12, 12]) <= 1e-5


def test_tucker2_keeps_stride_asymmetric_pads_and_dilation_on_the_core_conv():
    model = conv_model(tucker_weight(16, 16, 4, 4), stride=2, pads=(1, 0, 2, 1),
                       dilation=2, size=13)
    result = run_pass(model, lowrank_energy=1.0)
    core = [n for n in result.graph.nodes if n.op == "Conv"][1]
    assert core.attrs["strides"] == [2, 2] and core.attrs["pads"] == [1, 0, 2, 1]
    assert core.attrs["dilations"] == [2, 2]
    assert output_error(model, result.graph.to_onnx(), [16, 13, 13]) <= 1e-5


def test_cp_of_an_exact_rank_r_weight_is_exact_with_depthwise_kx1_and_1xk_stages():
    a, b, kh, kw = (RNG.standard_normal((d, 3)) for d in (16, 12, 3, 3))
    model = conv_model(lm.cp_reconstruct(a, b, kh, kw), stride=2, pads=(1, 2, 1, 0))
    result = run_pass(model, lowrank_method="cp", lowrank_rank=3, lowrank_als_iters=200)
    convs = [n for n in result.graph.nodes if n.op == "Conv"]
    assert [c.attrs.get("group", 1) for c in convs] == [1, 3, 3, 1]
    assert [c.attrs["kernel_shape"] for c in convs] == [[1, 1], [3, 1], [1, 3], [1, 1]]
    assert output_error(model, result.graph.to_onnx(), [12, 12, 12]) <= 1e-5


def test_svd_method_splits_a_kxk_conv_into_kxk_then_1x1():
    w = low_rank(24, 16 * 9, 4).reshape(24, 16, 3, 3)
    model = conv_model(w, stride=2)
    result = run_pass(model, lowrank_method="svd", lowrank_energy=1.0)
    convs = [n for n in result.graph.nodes if n.op == "Conv"]
    assert [c.attrs["kernel_shape"] for c in convs] == [[3, 3], [1, 1]]
    assert convs[0].attrs["strides"] == [2, 2]
    assert output_error(model, result.graph.to_onnx(), [16, 12, 12]) <= 1e-5


def test_1x1_conv_is_split_by_svd_into_two_1x1_convs():
    w = low_rank(64, 48, 6).reshape(64, 48, 1, 1)
    model = conv_model(w, pads=(0, 0, 0, 0))
    result = run_pass(model, lowrank_energy=1.0)            # auto method
    assert layers(result)[0]["method"] == "svd"
    assert [n.attrs["kernel_shape"] for n in result.graph.nodes if n.op == "Conv"] == \
        [[1, 1], [1, 1]]
    assert output_error(model, result.graph.to_onnx(), [48, 12, 12]) <= 1e-5


# ---- rank rules ----------------------------------------------------------------------------

def test_energy_rule_keeps_the_requested_share_of_singular_value_energy():
    s = np.array([4.0, 2.0, 1.0, 1.0])                     # energies 16, 4, 1, 1 of 22
    assert lm.energy_rank(s, 0.7) == 1
    assert lm.energy_rank(s, 0.9) == 2
    assert lm.energy_rank(s, 1.0) == 4


def test_vbmf_recovers_the_rank_of_a_noisy_low_rank_matrix():
    m = low_rank(64, 200, 7) * 20 + RNG.standard_normal((64, 200)) * 0.3
    assert lm.evbmf_rank(lm.svd(m)[1], m.shape) == 7


def two_conv_model():
    """Conv 16->32 -> Relu -> Conv 32->32, 3x3 on 8x8: two eligible layers for budgets."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return _model(nodes, {"w1": RNG.standard_normal((32, 16, 3, 3)),
                          "w2": RNG.standard_normal((32, 32, 3, 3))},
                  ["N", 16, 8, 8], ["N", 32, 8, 8])


def test_macs_budget_removes_the_requested_share_of_eligible_macs():
    model = two_conv_model()
    result = run_pass(model, lowrank_flops=0.5)
    extra = result.report["passes"][-1]["extra"]["lowrank"]
    assert extra["eligible_macs_after"] <= 0.5 * extra["eligible_macs"]
    assert extra["eligible_macs_after"] >= 0.4 * extra["eligible_macs"]   # not overshot
    assert result.report["final"]["macs"] == extra["eligible_macs_after"]


def test_rank_multiple_rounds_ranks_up_and_the_budget_still_holds():
    model = two_conv_model()
    result = run_pass(model, lowrank_flops=0.5, lowrank_multiple=8)
    extra = result.report["passes"][-1]["extra"]["lowrank"]
    assert extra["layers"] and all(r % 8 == 0 for row in extra["layers"]
                                   for r in row["ranks"])
    assert extra["eligible_macs_after"] <= 0.5 * extra["eligible_macs"]
    assert "multiples of 8" in extra["rule"]
    # An exact rank-5 FC weight at energy 1.0: rank 5 rounds up to 8, still exact.
    fc = gemm_model(low_rank(48, 64, 5))
    fc_result = run_pass(fc, lowrank_energy=1.0, lowrank_multiple=8)
    assert layers(fc_result)[0]["ranks"] == [8]
    assert output_error(fc, fc_result.graph.to_onnx(), [64]) <= 1e-5


def test_data_aware_svd_has_lower_error_than_plain_svd_on_the_data_it_was_fitted_to():
    # Inputs live in a 6-dim subspace of R^64: plain SVD spends its rank on directions the
    # data never visits; the whitened SVD does not.
    basis = RNG.standard_normal((6, 64))
    def data(n):
        return (RNG.standard_normal((n, 6)) @ basis).astype(np.float32)
    model = gemm_model(RNG.standard_normal((48, 64)))
    calib = Dataset({"x": data(256)}, source="subspace")
    plain = compress(model, ["lowrank"], options={"lowrank_rank": 6}, log=lambda m: None)
    aware = compress(model, ["lowrank"], calibration=calib, log=lambda m: None,
                     options={"lowrank_rank": 6, "lowrank_data_aware": True})
    test = {"x": data(64)}
    ref = Runner(model).run(test)[0]
    err = {k: np.abs(Runner(r.graph).run(test)[0] - ref).max() / np.abs(ref).max()
           for k, r in (("plain", plain), ("aware", aware))}
    # The small ridge term (unseen directions still count a little) leaves ~1e-4.
    assert err["aware"] < 1e-3 and err["plain"] > 100 * err["aware"]


# ---- what is left alone ------------------------------------------------------------------

def test_grouped_conv_is_skipped_and_reported():
    nodes = [helper.make_node("Conv", ["x", "wg"], ["a"], group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = _model(nodes, {"wg": RNG.standard_normal((32, 8, 3, 3)),
                           "w": tucker_weight(32, 32, 4, 4)}, ["N", 32, 8, 8],
                   ["N", 32, 8, 8])
    result = run_pass(model, lowrank_energy=1.0)
    report = result.report["passes"][-1]
    assert any("grouped conv" in s["reason"] for s in report["skipped"])
    assert [n.attrs.get("group", 1) for n in result.graph.nodes] == [4, 1, 1, 1]


def test_layer_whose_split_would_not_save_macs_is_left_alone():
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1)]
    model = _model(nodes, {"w1": low_rank(32, 64, 2), "w2": RNG.standard_normal((10, 32))},
                   ["N", 64], ["N", 10])
    result = run_pass(model, lowrank_energy=1.0)
    report = result.report["passes"][-1]
    assert report["changed"] == 1
    assert "would not save MACs" in report["skipped"][0]["reason"]


# ---- bad input: one clear message, model untouched ----------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"lowrank_energy": 1.5}, "--lowrank-energy must be in (0, 1]"),
    ({"lowrank_flops": 1.0}, "--lowrank-flops is the fraction of MACs to remove"),
    ({"lowrank_rank": 0}, "--lowrank-rank must be a positive integer"),
    ({"lowrank_rank": 2.5}, "--lowrank-rank must be an integer"),
    ({"lowrank_rank": 4, "lowrank_energy": 0.9}, "choose one rank rule"),
    ({"lowrank_method": "cp"}, "give --lowrank-rank or --lowrank-flops"),
    ({"lowrank_method": "qr"}, "--lowrank-method must be one of"),
    ({"lowrank_multiple": 0}, "--lowrank-multiple must be a positive integer"),
])
def test_out_of_range_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        run_pass(gemm_model(RNG.standard_normal((48, 64))), **options)


def test_unreachable_macs_budget_says_how_far_it_can_go():
    model = conv_model(RNG.standard_normal((8, 4, 3, 3)))
    with pytest.raises(UsageError, match="out of reach.*at most"):
        run_pass(model, lowrank_flops=0.99)


def test_model_without_eligible_layer_is_written_unchanged_with_a_warning():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, ["N", 8], ["N", 8])
    lines = []
    result = compress(model, ["lowrank"], log=lines.append)
    assert ops(result.graph) == ["Relu"]
    assert [line for line in lines if "lowrank changed nothing: no eligible layer" in line]
    rep = result.report["passes"][-1]
    assert rep["changed"] == 0 and rep["skipped"]


def test_model_without_eligible_layer_under_a_macs_budget_is_unsupported():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, ["N", 8], ["N", 8])
    with pytest.raises(UnsupportedError, match="--lowrank-flops 0.5 cannot be met: no "
                                               "eligible layer"):
        run_pass(model, lowrank_flops=0.5)


def test_rank_that_saves_nothing_anywhere_leaves_the_model_and_names_the_layer():
    lines = []
    result = compress(gemm_model(RNG.standard_normal((48, 64))), ["lowrank"],
                      options={"lowrank_rank": 40, "lowrank_multiple": 1}, log=lines.append)
    assert ops(result.graph) == ["Gemm"]
    warned = [line for line in lines if "lowrank changed nothing" in line]
    assert len(warned) == 1 and "no layer gets cheaper" in warned[0]
    assert result.graph.nodes[0].name in warned[0]


def test_cli_rejects_bad_rank_with_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(gemm_model(RNG.standard_normal((48, 64))), path)
    before = path.read_bytes()
    code, out, err = run_cli("compress", path, "--passes", "lowrank", "--lowrank-rank",
                             "-3", "-o", tmp_path / "out")
    assert code == 2
    assert err.strip().splitlines()[-1] == \
        "onnxc: error: --lowrank-rank must be a positive integer, got -3"
    assert not (tmp_path / "out").exists() and path.read_bytes() == before


def test_cli_exposes_the_options_and_writes_an_artifact(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(tucker_weight(32, 24, 6, 5)), path)
    code, out, err = run_cli("compress", path, "--passes", "lowrank", "--lowrank-method",
                             "tucker2", "--lowrank-energy", "0.999", "-o", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").exists()
    assert "lowrank" in out


# ---- the shared ResNets (the benchmark suite runs this exact path) ----------------------

@pytest.mark.slow
def test_resnet20_tucker2_at_half_the_macs_via_the_python_api(resnet20_path):
    result = compress(str(resnet20_path), ["fold_bn", "lowrank"], log=lambda m: None,
                      options={"lowrank_method": "tucker2", "lowrank_flops": 0.5})
    extra = result.report["passes"][-1]["extra"]["lowrank"]
    assert 0.4 <= extra["eligible_macs_after"] / extra["eligible_macs"] <= 0.5
    assert result.report["mac_ratio"] >= 1.8
    Runner(result.graph).run({"input": np.zeros((2, 3, 32, 32), np.float32)})


def test_data_aware_tucker2_refits_its_last_stage_to_the_convs_outputs():
    # Input channels are correlated (8 latent factors over 16 channels) and biased, as
    # post-ReLU activations are; the refit uses that, the data-free Tucker-2 cannot.
    mix = RNG.standard_normal((16, 8))
    def data(n):
        z = RNG.standard_normal((n, 8, 10, 10))
        return (np.einsum("cf,nfhw->nchw", mix, z) + 1.0).astype(np.float32)
    model = conv_model(RNG.standard_normal((24, 16, 3, 3)), size=10)
    options = {"lowrank_rank": 6}
    plain = compress(model, ["lowrank"], options=options, log=lambda m: None)
    aware = compress(model, ["lowrank"], calibration=Dataset({"x": data(64)}, source="c"),
                     options={**options, "lowrank_data_aware": True}, log=lambda m: None)
    row = layers(aware)[0]
    assert row["data_aware"] and row["output_rel_error"] < row["output_rel_error_before_refit"]
    held_out = data(16)
    assert rel_rms(model, aware.graph, held_out) < rel_rms(model, plain.graph, held_out)


def rel_rms(a, b, x):
    ya, yb = Runner(a).run({"x": x})[0], Runner(b).run({"x": x})[0]
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


def test_ranks_follow_the_targets_channel_block_by_default():
    # No --lowrank-multiple: the onnx target's kernels work in blocks of 8 channels.
    result = compress(two_conv_model(), ["lowrank"], options={"lowrank_flops": 0.5},
                      log=lambda m: None)
    extra = result.report["passes"][-1]["extra"]["lowrank"]
    assert extra["layers"] and all(r % 8 == 0 for row in extra["layers"]
                                   for r in row["ranks"])
    assert "multiples of 8" in extra["rule"]


# ---- 1-D convs, dynamic spatial dims, already-quantized models ---------------------------

def conv1d_model(w, stride=1, pads=(1, 1), length=20):
    n, c, k = w.shape
    node = helper.make_node("Conv", ["x", "w", "b"], ["h"], strides=[stride],
                            pads=list(pads))
    out = (length + pads[0] + pads[1] - k) // stride + 1
    return _model([node, helper.make_node("Relu", ["h"], ["y"])],
                  {"w": w, "b": RNG.standard_normal(n)}, ["N", c, length], ["N", n, out])


@pytest.mark.parametrize("method,n_convs", [("tucker2", 3), ("svd", 2)])
def test_1d_conv_at_full_rank_splits_into_1d_convs_and_reproduces_it(method, n_convs):
    model = conv1d_model(RNG.standard_normal((24, 16, 5)), stride=2, pads=(2, 1))
    result = run_pass(model, lowrank_method=method, lowrank_rank=10_000, lowrank_force=True)
    convs = [n for n in result.graph.nodes if n.op == "Conv"]
    assert len(convs) == n_convs and all(c.inputs[1].values.ndim == 3 for c in convs)
    assert output_error(model, result.graph.to_onnx(), [16, 20]) <= 1e-5


def test_1d_conv_of_low_rank_saves_macs():
    w = tucker_weight(32, 24, 4, 4, k=1)[:, :, :, 0].repeat(3, axis=2)   # (32, 24, 3)
    model = conv1d_model(w)
    result = run_pass(model, lowrank_energy=0.999)
    assert layers(result)[0]["macs_after"] < layers(result)[0]["macs_before"]
    assert output_error(model, result.graph.to_onnx(), [24, 20]) <= 1e-4


def test_conv_with_symbolic_spatial_dims_is_split_on_probed_shapes():
    w = tucker_weight(32, 24, 6, 5)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    model = _model([node], {"w": w, "b": RNG.standard_normal(32)},
                   ["N", 24, "H", "W"], ["N", 32, "H", "W"])
    result = run_pass(model, lowrank_energy=0.999)
    assert layers(result)[0]["ranks"] == [6, 5]
    assert not result.report["passes"][-1]["skipped"]
    assert output_error(model, result.graph.to_onnx(), [24, 9, 13]) <= 1e-4


def test_already_quantized_model_is_left_unchanged_and_the_warning_names_the_layer():
    # x -> DynamicQuantizeLinear -> ConvInteger(uint8 weights) -> Cast -> scale: what ORT's
    # dynamic quantizer writes.
    w = RNG.integers(0, 255, (8, 4, 3, 3)).astype(np.uint8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["acc"], name="qconv",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "xs"], ["y"])]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for passes in (["lowrank"], ["prune"]):
        lines = []
        result = compress(model, passes, log=lines.append)
        assert ops(result.graph) == [n.op_type for n in nodes]
        warned = [line for line in lines if "changed nothing" in line]
        assert len(warned) == 1 and "qconv" in warned[0] and "already quantized" in warned[0]
