"""Data readers: npz/npy, image folders, random within a declared range; bad data fails
with one line before any work."""

import numpy as np
import pytest
from PIL import Image

from onnxc.calibrate.readers import Preprocess, load_npz
from onnxc.errors import DataError
from onnxc.ir import Graph

from quant_helpers import residual_cnn


@pytest.fixture(scope="module")
def graph():
    # Static 3×8×8 input, batch symbolic.
    return Graph.from_onnx(residual_cnn())


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_is_preprocessed_and_labels_kept(tmp_path, graph):
    raw = np.full((4, 3, 8, 8), 255, np.uint8)
    ds = load_npz(_npz(tmp_path, images=raw, labels=np.arange(4)), graph,
                  Preprocess(1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    np.testing.assert_allclose(ds.inputs["x"], 1.0, rtol=1e-6)
    assert list(ds.labels) == [0, 1, 2, 3]


def test_nhwc_layout_is_converted(tmp_path, graph):
    ds = load_npz(_npz(tmp_path, images=np.zeros((2, 8, 8, 3), np.uint8)), graph,
                  Preprocess(layout="NHWC"))
    assert ds.inputs["x"].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("what, arrays, samples, message", [
    ("wrong shape", {"images": np.zeros((4, 3, 9, 8), np.float32)}, None, "expects"),
    ("wrong dtype", {"images": np.array([["a"] * 8] * 4)}, None, "dtype"),
    ("fewer samples", {"images": np.zeros((4, 3, 8, 8), np.float32)}, 10,
     "asked for 10 samples but it holds 4"),
    ("NaN", {"images": np.full((4, 3, 8, 8), np.nan, np.float32)}, None, "NaN"),
    ("labels mismatch", {"images": np.zeros((4, 3, 8, 8)), "labels": np.arange(3)}, None,
     "labels"),
])
def test_bad_data_is_one_line_data_error(tmp_path, graph, what, arrays, samples, message):
    with pytest.raises(DataError, match=message) as info:
        load_npz(_npz(tmp_path, **arrays), graph, samples=samples)
    assert "\n" not in str(info.value)


def test_empty_file_is_a_data_error(tmp_path, graph):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_npz(str(path), graph)


def test_image_folder_resizes_crops_and_labels_by_subfolder(tmp_path, graph):
    for cls, color in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (16, 12), (color, color, color)).save(tmp_path / cls / f"{i}.png")
    ds = load_npz(str(tmp_path), graph, Preprocess(1 / 255))
    assert ds.inputs["x"].shape == (4, 3, 8, 8)
    assert list(ds.labels) == [0, 0, 1, 1]
    np.testing.assert_allclose(ds.inputs["x"][2], 200 / 255, atol=1e-5)


def test_image_folder_without_images_is_a_data_error(tmp_path, graph):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no image files"):
        load_npz(str(tmp_path), graph)


def test_random_in_declared_range_is_seeded_and_marked_synthetic(graph):
    a = load_npz("random:-1,3", graph, samples=5)
    b = load_npz("random:-1,3", graph, samples=5)
    x = a.inputs["x"]
    assert a.synthetic and x.shape == (5, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 3
    np.testing.assert_array_equal(x, b.inputs["x"])


def test_random_with_malformed_range_is_a_data_error(graph):
    with pytest.raises(DataError, match="LO"):
        load_npz("random:3,1", graph)
