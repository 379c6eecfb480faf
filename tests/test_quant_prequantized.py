"""Models that are already quantized (ONNX Runtime's own quantizer: QDQ, QOperator with
QLinearConv, dynamic with ConvInteger / MatMulInteger): exact passes keep them working;
int8 / ternary / binary leave the quantized layers alone, report them, and quantize the
rest — never rounding a tensor twice — or refuse in one line when nothing is left."""

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

from onnxc.compress import compress
from onnxc.errors import UnsupportedError

from quant_helpers import residual_cnn
from transformer_nets import encoder


class _Random(CalibrationDataReader):
    def __init__(self, shape):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal(shape)
                              .astype(np.float32)} for i in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _cnn():
    model = residual_cnn()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    return model


def _ort_quantized(tmp_path, kind):
    src, dst = tmp_path / "float.onnx", tmp_path / f"{kind}.onnx"
    if kind == "dynamic_matmul":
        onnx.save(encoder(), src)
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"])
    elif kind == "qoperator_matmul":
        model = encoder()
        for vi in (model.graph.input[0], model.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].dim_value = 2
        onnx.save(model, src)
        quantize_static(src, dst, _Random([2, 16, 64]), quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=["MatMul"], per_channel=True)
    elif kind == "dynamic_conv":
        onnx.save(_cnn(), src)
        quantize_dynamic(src, dst, op_types_to_quantize=["Conv"])
    elif kind == "qdq_16bit_contrib":          # 16-bit QDQ: com.microsoft Q/DQ nodes
        onnx.save(_cnn(), src)
        quantize_static(src, dst, _Random([1, 3, 8, 8]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True,
                        activation_type=QuantType.QUInt16, weight_type=QuantType.QInt16,
                        extra_options={"UseQDQContribOps": True})
    else:
        onnx.save(_cnn(), src)
        fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
        quantize_static(src, dst, _Random([1, 3, 8, 8]), quant_format=fmt,
                        op_types_to_quantize=["Conv"], per_channel=True)
    return onnx.load(dst)


KINDS = {"qdq": "weight comes through DequantizeLinear", "qoperator": "QLinearConv",
         "dynamic_conv": "ConvInteger", "dynamic_matmul": "MatMulInteger",
         "qoperator_matmul": "QLinearMatMul",
         "qdq_16bit_contrib": "weight comes through DequantizeLinear"}
# Encoders whose every weighted MatMul is quantized: nothing left for ternary / binary.
ALL_WEIGHTS_QUANTIZED = ("dynamic_matmul", "qoperator_matmul")


@pytest.fixture(scope="module", params=sorted(KINDS))
def prequantized(request, tmp_path_factory):
    return request.param, _ort_quantized(tmp_path_factory.mktemp(request.param), request.param)


def _quantized_twice(model: onnx.ModelProto) -> list:
    """QuantizeLinear / DynamicQuantizeLinear nodes reading a DequantizeLinear output."""
    prod = {o: n for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
            and n.input[0] in prod and prod[n.input[0]].op_type == "DequantizeLinear"]


def test_exact_pass_keeps_an_already_quantized_model_working(prequantized):
    kind, model = prequantized
    result = compress(model, ["fold_bn"], log=lambda m: None)
    assert result.report["error"]["max_rel"] <= 1e-5
    quant_ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                 "ConvInteger", "MatMulInteger")
    before = sorted(n.op_type for n in model.graph.node if n.op_type in quant_ops)
    assert sorted(n.op for n in result.graph.nodes if n.op in quant_ops) == before


def test_int8_leaves_quantized_layers_alone_and_quantizes_the_rest(prequantized):
    kind, model = prequantized
    result = compress(model, ["int8"], log=lambda m: None)
    report = result.report["passes"][-1]
    reasons = [s["reason"] for s in report["skipped"]]
    assert any("already quantized" in r and KINDS[kind] in r for r in reasons)
    assert report["changed"] >= 1                         # e.g. the float Gemm head
    out = result.graph.to_onnx()
    onnx.checker.check_model(out)
    assert not _quantized_twice(out)
    assert report["error"]["max_rel"] < 0.1


@pytest.mark.parametrize("name", ["ternary", "binary"])
def test_low_bit_skips_quantized_layers_and_reports_them(prequantized, name):
    kind, model = prequantized
    if kind in ALL_WEIGHTS_QUANTIZED:
        with pytest.raises(UnsupportedError, match="already quantized"):
            compress(model, [name], options={"keep_float": "none"}, log=lambda m: None)
        return
    result = compress(model, [name], options={"keep_float": "none"}, log=lambda m: None)
    report = result.report["passes"][-1]
    assert len(report["extra"]["layers"]) == 1 and report["extra"]["layers"][0].startswith("fc")
    assert any(KINDS[kind] in s["reason"] for s in report["skipped"])
    assert not any("not understood" in s["reason"] for s in report["skipped"])  # Q/DQ plumbing


@pytest.mark.parametrize("kind", ["dynamic_conv", "dynamic_matmul"])
def test_int8_keeps_the_mul_that_dequantizes_a_dynamic_layer(kind, tmp_path):
    # ConvInteger/MatMulInteger -> Cast -> Mul(x_scale · w_scale): the scale changes every
    # run, a static Q/DQ on that Mul would round the layer a second time.
    model = _ort_quantized(tmp_path, kind)
    prod = {o: n for n in model.graph.node for o in n.output}
    dequant = {n.name for n in model.graph.node if n.op_type == "Mul" and any(
        i in prod and prod[i].op_type == "Cast" and prod[i].input[0] in prod
        and prod[prod[i].input[0]].op_type in ("ConvInteger", "MatMulInteger")
        for i in n.input)}
    assert dequant
    result = compress(model, ["int8"], log=lambda m: None)
    report = result.report["passes"][-1]
    assert not dequant & set(report["extra"]["quantized_layers"])
    kept = {s["node"] for s in report["skipped"]
            if "dequantizes an already-quantized layer" in s["reason"]}
    assert dequant <= kept
