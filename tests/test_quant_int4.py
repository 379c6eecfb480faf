"""int8 --int4-weights: 4-bit weights as packed INT4 initializers that ONNX Runtime widens
to int8 at load (Cast -> DequantizeLinear), so the integer kernels still run."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxc.calibrate import qdq
from onnxc.compress import compress
from onnxc.errors import UsageError
from onnxc.ir import Graph

from conftest import run_cli
from quant_helpers import dataset, ort_optimized_ops, residual_cnn, save


@pytest.fixture(scope="module")
def model():
    # 32 channels: the weights dominate the file, as in a real network
    return residual_cnn(channels=32)


@pytest.fixture(scope="module")
def data(model):
    return dataset(model, 64)


def _quantize(model, data, **options):
    return compress(model, ["int8"], options=dict(reduce_range="off", **options),
                    calibration=data, evaluation=data, log=lambda m: None)


@pytest.fixture(scope="module")
def int8(model, data):
    return _quantize(model, data)


@pytest.fixture(scope="module")
def int4(model, data):
    return _quantize(model, data, int4_weights="all")


def _int4_inits(model):
    return [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]


def test_int4_weights_are_packed_two_per_byte_in_an_opset_21_model(int4):
    model = int4.graph.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = _int4_inits(model)
    assert len(inits) == 4                         # conv0, conv1, conv2, fc
    for init in inits:
        n = int(np.prod(init.dims))
        assert len(init.raw_data) == (n + 1) // 2
        codes = numpy_helper.to_array(init).astype(np.int8)
        assert np.abs(codes).max() <= qdq.INT4_QMAX and len(np.unique(codes)) > 8


def test_int4_model_round_trips_through_the_ir_unchanged(int4):
    model = int4.graph.to_onnx()
    again = Graph.from_onnx(model).to_onnx()
    assert again.SerializeToString() == model.SerializeToString()


def test_int4_file_is_smaller_by_half_a_byte_per_weight(model, int8, int4):
    weights = sum(numpy_helper.to_array(i).size for i in model.graph.initializer
                  if i.name.startswith("w"))
    saved = int8.report["final"]["bytes"] - int4.report["final"]["bytes"]
    assert int4.report["final"]["bytes"] == int4.graph.to_onnx().ByteSize()
    # half a byte per weight, less the Cast nodes (a few dozen bytes each)
    assert 0.45 * weights < saved <= 0.5 * weights


def test_int4_scales_are_per_output_channel(int4):
    model = int4.graph.to_onnx()
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    cast_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
           and n.input[0] in cast_of]
    assert len(dqs) == 4
    for dq in dqs:
        codes = consts[cast_of[dq.input[0]]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert consts[dq.input[1]].shape == (codes.shape[axis],)


def test_int4_output_stays_close_to_float(int4):
    out = int4.report["error"]
    assert out["max_rel"] < 0.15


def test_onnxruntime_folds_the_cast_and_runs_integer_kernels(int4, tmp_path):
    ran = ort_optimized_ops(int4.graph.to_onnx(), tmp_path)
    assert ran.count("QLinearConv") == 3 and "Conv" not in ran and "Cast" not in ran


def test_mse_clipping_has_less_weight_error_than_max_scaling():
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    err = {}
    for clip in ("mse", "max"):
        codes, scale = qdq.quantize_weight_int4(w, 0, clip)
        err[clip] = float(((qdq.dequantize(codes, scale, 0) - w) ** 2).sum())
    assert err["mse"] < 0.9 * err["max"]


def test_int4_only_on_the_named_layers(model, data):
    res = _quantize(model, data, int4_weights="conv1")
    assert res.report["passes"][-1]["extra"]["int4_layers"] == ["conv1"]
    assert len(_int4_inits(res.graph.to_onnx())) == 1


def test_unknown_int4_layer_is_a_usage_error(model, data):
    with pytest.raises(UsageError, match="--int4-weights: 'nope'"):
        _quantize(model, data, int4_weights="nope")


def test_int4_on_a_tvm_target_is_refused_in_one_line(model, tmp_path):
    path = save(model, tmp_path)
    code, _, err = run_cli("compress", path, "--passes", "int8", "--int4-weights", "all",
                           "--target", "x86", "-o", tmp_path / "out")
    assert code == 2
    assert [line for line in err.splitlines() if "error" in line] == [
        "onnxc: error: int8 --int4-weights: target 'x86' cannot run 4-bit (INT4) weights; "
        "use --target onnx, or leave --int4-weights out for int8 weights"]
    assert "RANDOM" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_int4_with_adaround_gives_the_same_bytes_twice(model, data):
    runs = [_quantize(model, data, int4_weights="all", int8_adaround=True,
                      int8_adaround_iters=20).graph.to_onnx().SerializeToString()
            for _ in range(2)]
    assert runs[0] == runs[1]
