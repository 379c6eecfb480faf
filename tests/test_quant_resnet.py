"""Quantization on the shared CIFAR-10 ResNets (slow: real calibration and evaluation)."""

import pytest

from conftest import cifar_preprocess

pytestmark = pytest.mark.slow


def _run(model_path, passes, options, train, test, calib=512):
    from onnxc.calibrate.readers import load_npz
    from onnxc.compress import compress

    pre = cifar_preprocess()
    return compress(str(model_path), passes, options=options, log=lambda m: None,
                    calibration_loader=lambda g: load_npz(str(train), g, pre, samples=calib),
                    evaluation_loader=lambda g: load_npz(str(test), g, pre))


def test_resnet20_int8_keeps_top1_within_half_a_point(resnet20_path, cifar_train_path,
                                                      cifar_test_path, tmp_path):
    from quant_helpers import ort_optimized_ops

    res = _run(resnet20_path, ["fold_bn", "int8"], {"calibrator": "percentile"},
               cifar_train_path, cifar_test_path)
    rep = res.report
    # What ONNX Runtime executes: every Conv/Add/Gemm fused into an integer kernel.
    optimized = ort_optimized_ops(res.graph.to_onnx(), tmp_path)
    assert optimized.count("QLinearConv") == 19 and optimized.count("QLinearAdd") == 9
    assert "QGemm" in optimized
    assert not {"Conv", "Add", "Gemm", "Relu"} & set(optimized)
    assert rep["accuracy"]["drop"] <= 0.5
    # int8 codes alone would give 4.0x; scales, int32 biases and the graph cost the rest
    # (measured 3.64x; 3.2x before short names and dropped zero points)
    assert rep["compression_ratio"] > 3.5


def test_resnet20_pow2_int8_drops_at_most_one_point(resnet20_path, cifar_train_path,
                                                    cifar_test_path):
    rep = _run(resnet20_path, ["int8"], {"pow2_scales": True, "calibrator": "percentile"},
               cifar_train_path, cifar_test_path).report
    assert rep["accuracy"]["drop"] <= 1.0


def test_resnet20_ternary_reports_packed_storage(resnet20_path, cifar_train_path,
                                                 cifar_test_path):
    rep = _run(resnet20_path, ["ternary"], {}, cifar_train_path, cifar_test_path,
               calib=64).report
    extra = rep["passes"][-1]["extra"]
    assert len(extra["layers"]) == 18      # 19 convs + fc; first conv and fc stay float
    assert extra["quantized_layers_cr"] >= 14
    assert rep["storage_compression_ratio"] > 10
