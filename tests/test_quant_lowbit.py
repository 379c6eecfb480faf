"""ternary / binary passes: TWN / BWN codes, packed storage, QONNX export."""

import io

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxc.calibrate import lowbit, qdq
from onnxc.compress import compress

from quant_helpers import dataset, ops, residual_cnn


@pytest.fixture(scope="module")
def model():
    return residual_cnn(channels=16)


def _inits(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_ternarize_follows_twn_per_output_channel():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    codes, alpha = lowbit.ternarize(w)
    assert set(np.unique(codes)) <= {-1, 0, 1}
    for c in range(4):
        delta = 0.7 * np.abs(w[c]).mean()
        np.testing.assert_array_equal(codes[c], np.sign(w[c]) * (np.abs(w[c]) > delta))
        kept = np.abs(w[c])[np.abs(w[c]) > delta]
        assert alpha[c] == pytest.approx(kept.mean(), rel=1e-3)   # float16-rounded


def test_binarize_follows_bwn_per_output_channel():
    w = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
    codes, alpha = lowbit.binarize(w)
    assert set(np.unique(codes)) == {-1, 1}
    np.testing.assert_allclose(alpha, np.abs(w).mean(1), rtol=1e-3)


@pytest.mark.parametrize("bits, values", [(1, [-1, 1]), (2, [-1, 0, 1])])
def test_packing_round_trips_and_has_the_promised_size(bits, values):
    codes = np.random.default_rng(2).choice(values, size=1001).astype(np.int8)
    packed = qdq.pack_bits(codes, bits)
    assert packed.nbytes == -(-1001 * bits // 8)
    np.testing.assert_array_equal(qdq.unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("name, bits, cr", [("ternary", 2, 14), ("binary", 1, 28)])
def test_pass_stores_packed_weights_that_match_the_model(model, tmp_path, name, bits, cr):
    res = compress(model, [name], out_dir=str(tmp_path / "o"), log=lambda m: None)
    p = res.report["passes"][-1]
    # First and last layers stay float by default; the middle convs are low-bit.
    assert p["extra"]["layers"] == ["conv1", "conv2"]
    packed = lowbit.unpack_layers((tmp_path / "o" / "packed_weights.npz").read_bytes())
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    inits = _inits(m)
    for node in m.graph.node:
        if node.op_type == "Conv" and node.name in packed:
            dq = next(n for n in m.graph.node if n.output[0] == node.input[1])
            codes, alpha = packed[node.name]
            np.testing.assert_array_equal(inits[dq.input[0]], codes)
            np.testing.assert_array_equal(inits[dq.input[1]], alpha)
    # Storage: the packed layers beat fp32 by the bit-width ratio (minus α overhead).
    assert p["extra"]["bits"] == bits
    assert p["extra"]["quantized_layers_cr"] >= cr
    assert res.report["storage_bytes"] < res.report["final"]["bytes"]
    assert res.report["storage_compression_ratio"] > res.report["compression_ratio"]


def test_ternary_model_runs_in_onnxruntime_with_int8_codes(model):
    import onnxruntime as ort

    res = compress(model, ["ternary"], log=lambda m: None)
    m = res.graph.to_onnx()
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0].shape == (1, 10)
    codes = [a for a in _inits(m).values() if a.dtype == np.int8]
    assert codes and all(set(np.unique(c)) <= {-1, 0, 1} for c in codes)


def test_keep_float_none_quantizes_first_and_last_too(model):
    res = compress(model, ["binary"], options={"keep_float": "none"}, log=lambda m: None)
    assert res.report["passes"][-1]["extra"]["layers"] == ["conv0", "conv1", "conv2", "fc"]


def test_binary_activations_insert_sign_times_mean_magnitude(model):
    res = compress(model, ["binary"], options={"binary_activations": True},
                   log=lambda m: None)
    names = ops(res.graph)
    assert names.count("Sign") == 2 and names.count("ReduceMean") == 2


def test_qonnx_export_uses_bipolar_and_2bit_quant(model, tmp_path):
    for name, op in (("binary", "BipolarQuant"), ("ternary", "Quant")):
        compress(model, [name], options={"format": "qonnx"}, out_dir=str(tmp_path / name),
                 log=lambda m: None)
        q = onnx.load(str(tmp_path / name / "model_qonnx.onnx"))
        quant = [n for n in q.graph.node if n.op_type == op]
        assert len(quant) == 2 and all(n.domain == "qonnx.custom_op.general" for n in quant)
        if op == "Quant":
            bw = _inits(q)[quant[0].input[3]]
            assert float(bw) == 2.0


def test_max_drop_falls_back_to_int8_weights(model):
    data = dataset(model, 64)
    res = compress(model, ["ternary"], options={"max_drop": 0.0}, calibration=data,
                   log=lambda m: None)
    extra = res.report["passes"][-1]["extra"]
    assert extra["mixed_precision"]["higher_precision"] == "int8 weights"
    assert set(extra["int8_fallback"]) | set(extra["layers"]) == {"conv1", "conv2"}
