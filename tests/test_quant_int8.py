"""int8 pass: standard QDQ that ONNX Runtime fuses into integer kernels."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxc.compress import compress
from onnxc.errors import UsageError
from onnxc.pipeline import resolve_passes

from conftest import run_cli
from quant_helpers import dataset, ops, ort_optimized_ops, residual_cnn, save


@pytest.fixture(scope="module")
def model():
    return residual_cnn()


@pytest.fixture(scope="module")
def data(model):
    return dataset(model, 64)


def _int8(model, data, **options):
    return compress(model, ["int8"], options=options, calibration=data, evaluation=data,
                    log=lambda m: None)


@pytest.fixture(scope="module")
def quantized(model, data):
    return _int8(model, data, reduce_range="off")


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _dq_inputs(model, node):
    """The DequantizeLinear feeding each input of ``node`` (or None)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    return [prod.get(i) if prod.get(i) is not None and prod[i].op_type == "DequantizeLinear"
            else None for i in node.input]


def test_output_stays_close_to_float(quantized):
    # (a random network's logits have tiny margins: top-1 is checked on the real ResNets)
    assert quantized.report["error"]["max_rel"] < 0.05


def test_conv_weights_are_int8_per_output_channel_behind_dequantize(quantized):
    m = quantized.graph.to_onnx()
    inits = _inits(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        x_dq, w_dq, b_dq = _dq_inputs(m, conv)
        assert x_dq is not None and w_dq is not None and b_dq is not None
        codes, w_scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
        assert {a.name: a.i for a in w_dq.attribute}["axis"] == 0
        assert w_scale.shape == (codes.shape[0],)
        # Bias: int32 with scale s_x · s_w (what QLinearConv expects).
        bias, b_scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
        assert bias.dtype == np.int32
        np.testing.assert_allclose(b_scale, inits[x_dq.input[1]] * w_scale, rtol=1e-6)


def test_activation_scales_are_scalars_and_uint8(quantized):
    m = quantized.graph.to_onnx()
    inits = _inits(m)
    for q in (n for n in m.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[1]].shape == () and inits[q.input[2]].dtype == np.uint8


def test_relu_after_a_quantized_conv_is_fused_into_the_quantize(quantized):
    # uint8 with zero point 0 clamps negatives: the Relu nodes are gone.
    assert "Relu" not in ops(quantized.graph)


def test_onnxruntime_runs_integer_kernels(quantized, tmp_path):
    optimized = ort_optimized_ops(quantized.graph.to_onnx(), tmp_path)
    assert optimized.count("QLinearConv") == 3
    assert "QLinearAdd" in optimized
    assert "QLinearGlobalAveragePool" in optimized
    assert "Conv" not in optimized and "Add" not in optimized
    # The Gemm keeps its weight zero point: without it ORT leaves the Gemm in float.
    assert "QGemm" in optimized and "Gemm" not in optimized


def test_int8_file_is_weights_plus_little_structure(quantized):
    # Size: weight/bias zero points (all 0, the ONNX default) are left out where ORT fuses
    # without them, and every added tensor has a short name (w<j>_q, a<k>_s, ...).
    m = quantized.graph.to_onnx()
    inits = _inits(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        assert len(prod[conv.input[1]].input) == 2 and len(prod[conv.input[2]].input) == 2
    added = [n for n in inits if n not in {"w0", "w1", "w2", "wf", "b0", "b1", "b2", "bf"}]
    assert added and all(len(n) <= 6 for n in added)
    # Names and structure: ~52 bytes per node, ~12 per initializer here (names derived from
    # the tensors, like "<tensor>_QuantizeLinear", cost about twice that).
    assert sum(n.ByteSize() for n in m.graph.node) < 60 * len(m.graph.node)
    header = sum(i.ByteSize() for i in m.graph.initializer) - sum(a.nbytes for a in inits.values())
    assert header < 16 * len(inits)


def test_bias_correction_removes_the_mean_shift_of_weight_rounding():
    from onnxc.passes.int8 import weight_error_bias
    from onnxc.calibrate.qdq import dequantize, quantize_weight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    codes, scale = quantize_weight(w, 0, 7)                     # coarse: a visible shift
    w_hat = dequantize(codes, scale, 0)
    x = (rng.standard_normal((16, 3, 10, 10)) + [[[1.0]], [[-2.0]], [[0.5]]]).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # N,C,8,8,3,3

    def conv(k):   # 'valid' convolution: every output sees real inputs, no padding
        return np.einsum("nchwij,ocij->nohw", windows, k)

    shift = (conv(w) - conv(w_hat)).mean((0, 2, 3))
    node = type("N", (), {"op": "Conv", "attrs": {}})()
    d = weight_error_bias(node, w, w_hat, x.mean((0, 2, 3)))
    # E[x] of the whole image vs of the valid windows differ slightly: not exact.
    np.testing.assert_allclose(d, shift, rtol=0.03, atol=0.01)
    assert np.abs(shift).max() > 10 * np.abs(shift - d).max()


def test_bias_correction_option_changes_only_the_biases(model, data):
    on = _inits(_int8(model, data).graph.to_onnx())
    off = _inits(_int8(model, data, bias_correction="off").graph.to_onnx())
    assert on.keys() == off.keys()
    changed = {k for k in on if not np.array_equal(on[k], off[k])}
    assert changed and all(on[k].dtype == np.int32 for k in changed)


def test_keep_float_first_and_last_leaves_those_layers_float(model, data):
    res = _int8(model, data, keep_float="first,last")
    m = res.graph.to_onnx()
    inits = _inits(m)
    by_name = {n.name: n for n in m.graph.node}
    first_w = by_name["conv0"].input[1]
    assert first_w in inits and inits[first_w].dtype == np.float32
    assert inits[by_name["fc"].input[1]].dtype == np.float32
    assert {s["node"] for s in res.report["passes"][-1]["skipped"]} == {"conv0", "fc"}


def test_unknown_keep_float_name_is_a_usage_error(model, data):
    with pytest.raises(UsageError, match="no_such_layer"):
        _int8(model, data, keep_float="no_such_layer")


def test_pow2_scales_give_shift_requantisation(model, data):
    res = _int8(model, data, pow2_scales=True)
    m = res.graph.to_onnx()
    inits = _inits(m)
    for node in m.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = inits[node.input[1]]
            np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
            if len(node.input) < 3:        # zero point left out: 0 of the codes' type
                assert inits[node.input[0]].dtype in (np.int8, np.int32)
            elif node.input[0] not in inits or inits[node.input[0]].dtype != np.int32:
                assert inits[node.input[2]].dtype == np.int8       # int8, zero point 0
                assert not np.any(inits[node.input[2]])
    shifts = res.report["passes"][-1]["extra"]["shifts"]
    assert set(shifts) >= {"conv0", "conv1", "conv2", "fc"}
    assert all(isinstance(k, int) for v in shifts.values() for k in v)
    assert res.report["error"]["max_rel"] < 0.1


def test_reduced_range_weights_fit_seven_bits(model, data):
    m = _int8(model, data, reduce_range="on").graph.to_onnx()
    inits = _inits(m)
    codes = [inits[n.input[0]] for n in m.graph.node
             if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
             and inits[n.input[0]].dtype == np.int8]
    assert codes and max(int(np.abs(c).max()) for c in codes) <= 63


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibrator_produces_a_working_model(model, data, method):
    res = _int8(model, data, calibrator=method)
    assert res.report["passes"][-1]["extra"]["calibrator"] == method
    assert res.report["error"]["max_rel"] < 0.15


def test_int8_conflicts_with_ternary_and_binary():
    for other in ("ternary", "binary"):
        with pytest.raises(UsageError, match="cannot be combined"):
            resolve_passes(["int8", other])


def test_without_calibration_data_random_inputs_are_used_with_a_warning(model):
    logs = []
    res = compress(model, ["int8"], log=logs.append)
    assert any("RANDOM" in m for m in logs)
    assert res.report["passes"][-1]["extra"]["calibration_data"] == "random"


def test_cli_reports_bad_calibration_data_before_any_work(model, tmp_path):
    path = save(model, tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 3, 5, 5), np.float32))
    code, out, err = run_cli("compress", path, "--passes", "int8", "-o", tmp_path / "o",
                             "--calib-data", bad)
    assert code == 7
    assert "expects" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_int8_writes_a_runnable_artifact(model, tmp_path):
    import onnxruntime as ort

    path = save(model, tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=np.random.default_rng(0).standard_normal((32, 3, 8, 8)))
    code, out, err = run_cli("compress", path, "--passes", "int8", "-o", tmp_path / "o",
                             "--calib-data", calib, "--calibrator", "percentile")
    assert code == 0, err
    sess = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})[0]
    assert y.shape == (2, 10)


def test_qonnx_export_replaces_qdq_with_quant_nodes(model, data, tmp_path):
    compress(model, ["int8"], options={"format": "qonnx"}, calibration=data,
             out_dir=str(tmp_path / "o"), log=lambda m: None)
    q = onnx.load(str(tmp_path / "o" / "model_qonnx.onnx"))
    kinds = [(n.domain, n.op_type) for n in q.graph.node]
    assert ("qonnx.custom_op.general", "Quant") in kinds
    assert not {"QuantizeLinear", "DequantizeLinear"} & {k for _, k in kinds}
    # The runnable QDQ model is still the main artifact.
    assert "DequantizeLinear" in ops(onnx.load(str(tmp_path / "o" / "model.onnx")))


def test_max_drop_falls_back_most_sensitive_layers_until_budget_holds(model, data):
    res = _int8(model, data, max_drop=0.0, pow2_scales=True, weight_granularity="tensor")
    extra = res.report["passes"][-1]["extra"]
    mp = extra["mixed_precision"]
    sens = extra["sensitivity"]
    macs = extra["group_macs"]
    floor = max(1.0, 1e-3 * sum(macs.values()))
    # Most error per multiply-accumulate kept in float first.
    assert list(sens) == sorted(sens, key=lambda n: -sens[n] / (macs[n] + floor))
    assert mp["fallback"] == list(sens)[:len(mp["fallback"])]
    assert mp["reference_top1"] - mp["final_top1"] <= 0.0 or \
        len(mp["fallback"]) == len(sens)
    assert set(mp["fallback"]) <= set(extra["float_layers"])


def _mlp(seed=0):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32) / 8, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((10, 128)).astype(np.float32) / 11, "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], "mm"),
         helper.make_node("Relu", ["h"], ["r"], "relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], "fc", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w1, w2, b2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_dynamic_mode_quantizes_matmuls_without_data_into_fused_kernels(tmp_path):
    logs = []
    res = compress(_mlp(), ["int8"], options={"int8_mode": "dynamic"}, log=logs.append)
    assert not any("RANDOM" in m for m in logs)            # no calibration needed
    assert res.report["passes"][-1]["extra"]["quantized_layers"] == ["mm", "fc"]
    assert res.report["error"]["max_rel"] < 0.05
    optimized = ort_optimized_ops(res.graph.to_onnx(), tmp_path)
    assert "MatMul" not in optimized and "Gemm" not in optimized
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & set(optimized)


def test_model_with_static_batch_one_is_calibrated_sample_by_sample():
    model = residual_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    data = dataset(residual_cnn(), 5)
    res = compress(model, ["int8"], calibration=data, log=lambda m: None)
    assert res.report["passes"][-1]["extra"]["calibration_samples"] == 5
    assert res.report["error"]["max_rel"] < 0.05
