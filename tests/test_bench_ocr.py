"""tools/bench_ocr.py helpers (CTC decoding, line rendering) and --max-drop without labels."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.calibrate.readers import Dataset
from onnxc.compress import compress
from tools import bench_ocr

CHARS = ["<blank>", "a", "b", "c"]


def _ctc_model(features=8, classes=len(CHARS), seed=0):
    """x [N, T, F] → MatMul → Softmax over classes: a CTC head y [N, T, C]."""
    rng = np.random.default_rng(seed)
    w = np.zeros((features, classes), np.float32)
    w[:classes, :classes] = 4 * np.eye(classes, dtype=np.float32)     # feature k → class k
    w += rng.standard_normal(w.shape).astype(np.float32) * 0.3
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], "head"),
         helper.make_node("Softmax", ["logits"], ["y"], "softmax", axis=-1)],
        "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, classes])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _frames(classes_per_step, features=8):
    x = np.zeros((1, len(classes_per_step), features), np.float32)
    x[0, np.arange(len(classes_per_step)), classes_per_step] = 1.0
    return x


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    probs = np.eye(4, dtype=np.float32)[[1, 1, 0, 1, 2, 2, 0, 0, 3, 3, 3, 0]][None]
    assert bench_ocr.ctc_greedy(probs, CHARS) == ["aabc"]


def test_ctc_greedy_decodes_a_ctc_model_output():
    import onnxruntime as ort

    sess = ort.InferenceSession(_ctc_model().SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = _frames([0, 2, 2, 0, 2, 1, 0, 0, 3, 0, 3, 3])
    assert bench_ocr.ctc_greedy(sess.run(None, {"x": x})[0], CHARS) == ["bbacc"]


def test_agreement_counts_identical_lines():
    assert bench_ocr.agreement(["ab", "c", "d", ""], ["ab", "c", "x", ""]) == 75.0


def test_rendered_lines_are_preprocessed_like_rapidocr():
    chars = ["<blank>"] + list("abc0123") + [" "]
    texts, images = bench_ocr.make_lines(6, chars, seed=1)
    assert len(texts) == 6 and all(1 <= len(t) <= 14 for t in texts)
    assert images.shape == (6, 3, 48, 320) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert np.all(images[:, 0] == images[:, 1])                # grey text in 3 channels
    # Short lines are padded with zeros (rapidocr's padding in normalised units).
    widths = [(np.abs(img[0]).sum(0) > 0).nonzero()[0].max() + 1 for img in images]
    assert min(widths) < 320 and all(np.all(img[:, :, w:] == 0) for img, w in
                                      zip(images, widths))
    again, images2 = bench_ocr.make_lines(6, chars, seed=1)
    assert again == texts and np.array_equal(images, images2)   # seeded


def test_max_drop_without_labels_bounds_argmax_agreement_with_the_original():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 12, 8)).astype(np.float32)
    data = Dataset({"x": x}, None, "unlabelled.npy")
    res = compress(_ctc_model(), ["int8"], options={"max_drop": 0.0}, calibration=data,
                   log=lambda m: None)
    mp = res.report["passes"][-1]["extra"]["mixed_precision"]
    assert mp["metric"] == "agreement" and "unlabelled" in mp["data"]
    assert mp["reference_top1"] == 100.0                       # the original agrees with itself
    assert mp["final_top1"] == 100.0 or mp["fallback"] == ["head"]


@pytest.mark.slow
def test_fp32_recogniser_reads_the_rendered_lines():
    wheel = bench_ocr.find_wheel(download=False)
    if wheel is None:
        pytest.skip("rapidocr_onnxruntime-1.4.4 wheel not cached (python -m tools.bench_ocr "
                    "downloads it once)")
    data, chars = bench_ocr.load_model(wheel)
    assert len(chars) == 6625                                  # blank + 6623 + space
    texts, images = bench_ocr.make_lines(24, chars, seed=0)
    decoded = bench_ocr.ctc_greedy(bench_ocr.run(data, images), chars)
    assert bench_ocr.agreement(decoded, texts) >= 75.0


def test_int8_macs_share_counts_nodes_with_dequantized_activation_and_weight(tmp_path):
    import onnx

    q = numpy_helper.from_array(np.ones((8, 4), np.int8), "wq")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    xs = numpy_helper.from_array(np.array(0.1, np.float32), "xs")
    xz = numpy_helper.from_array(np.array(0, np.uint8), "xz")
    w2 = numpy_helper.from_array(np.ones((4, 4), np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], "q"),
         helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], "dq"),
         helper.make_node("DequantizeLinear", ["wq", "s"], ["wdq"], "wdq"),
         helper.make_node("MatMul", ["xdq", "wdq"], ["h"], "int8_mm"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], "float_mm")],
        "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [q, s, xs, xz, w2])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    macs = {"int8_mm": 32, "float_mm": 16}
    assert bench_ocr.int8_macs_share(path, macs) == pytest.approx(100 * 32 / 48)
