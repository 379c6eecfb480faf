"""int8 on transformers: MatMuls with constant weights get per-channel int8 weights on
[B, T, C] activations; attention's activation x activation MatMuls are quantized
statically (calibrated QDQ on both operands) or at run time (``--int8-act-matmul dynamic``,
and always in ``--int8-mode dynamic``). Random inputs, random calibration."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxc.compress import compress

from transformer_nets import cosine, encoder, vit


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _int8_cosine(model, shape, **options):
    """(quantized model, cosine of its output vs float on fresh random inputs)."""
    result = compress(model, ["int8"], options=options, log=lambda m: None)
    q = result.graph.to_onnx()
    onnx.checker.check_model(q)
    x = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    return q, result, cosine(_run(model, x), _run(q, x))


@pytest.fixture(scope="module")
def encoder_model():
    return encoder()


@pytest.fixture(scope="module")
def static(encoder_model):
    return _int8_cosine(encoder_model, (4, 16, 64))


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_encoder_int8_output_cosine_is_at_least_099(static):
    assert static[2] >= 0.99


def test_constant_weight_matmuls_on_3d_activations_get_per_channel_int8_weights(static):
    q = static[0]
    prod, inits = _producers(q), {i.name: i for i in q.graph.initializer}
    weight_mms = [n for n in q.graph.node if n.op_type == "MatMul"
                  and prod[n.input[1]].input[0] in inits]
    assert len(weight_mms) == 6                                  # q, k, v, o, fc1, fc2
    for mm in weight_mms:
        dq = prod[mm.input[1]]
        codes = numpy_helper.to_array(inits[dq.input[0]])
        scales = numpy_helper.to_array(inits[dq.input[1]])
        assert codes.dtype == np.int8 and scales.shape == (codes.shape[1],)
        assert {a.name: a.i for a in dq.attribute}["axis"] == 1  # per output column
        assert prod[mm.input[0]].op_type == "DequantizeLinear"   # [B, T, C] activation


def test_attention_matmuls_read_calibrated_qdq_on_both_operands_by_default(static):
    q = static[0]
    prod = _producers(q)
    act = [n for n in q.graph.node if n.op_type == "MatMul" and n.name in ("blk0.qk", "blk0.av")]
    assert len(act) == 2
    for mm in act:
        assert all(prod[i].op_type == "DequantizeLinear" for i in mm.input)


def test_dynamic_act_matmul_quantizes_attention_at_run_time(encoder_model):
    q, result, cos = _int8_cosine(encoder_model, (4, 16, 64), int8_act_matmul="dynamic")
    assert cos >= 0.99
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 4
    assert sorted(result.report["passes"][-1]["extra"]["dynamic_act_matmuls"]) == \
        ["blk0.av", "blk0.qk"]


def test_dynamic_mode_quantizes_weight_and_attention_matmuls_without_data(encoder_model):
    q, result, cos = _int8_cosine(encoder_model, (4, 16, 64), int8_mode="dynamic")
    assert cos >= 0.99
    assert [n.op_type for n in q.graph.node].count("MatMulInteger") == 8
    assert "MatMul" not in [n.op_type for n in q.graph.node]


def test_vit_like_int8_output_cosine_is_at_least_099():
    q, result, cos = _int8_cosine(vit(), (4, 3, 32, 32))
    assert cos >= 0.99
    assert result.report["passes"][-1]["changed"] >= 10


def test_onnxruntime_runs_every_encoder_matmul_on_integer_kernels(static, tmp_path):
    from quant_helpers import ort_optimized_ops

    optimized = ort_optimized_ops(static[0], tmp_path)
    assert "MatMul" not in optimized and optimized.count("QLinearMatMul") == 8
