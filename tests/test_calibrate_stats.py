"""Activation statistics: one pass, exact histograms while the range grows."""

import numpy as np
import pytest

from onnxc.calibrate import stats as st
from onnxc.calibrate.stats import TensorStats
from onnxc.errors import DataError


def test_min_max_and_count_cover_every_batch():
    s = TensorStats("t")
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, k + 1, 1000).astype(np.float32) for k in range(4)]
    for b in batches:
        s.update(b)
    allx = np.concatenate(batches)
    assert s.count == allx.size
    assert s.min == allx.min() and s.max == allx.max()
    assert s.counts.sum() == allx.size


def test_histogram_of_growing_batches_equals_histogram_of_all_data():
    # Range grows 50x over the batches: bins must merge exactly, not approximately.
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-0.1 * 5 ** k, 0.2 * 5 ** k, 2000).astype(np.float32)
               for k in range(4)]
    grown = TensorStats("t")
    for b in batches:
        grown.update(b)
    assert len(grown.counts) <= st.MAX_BINS
    # Every value is in the bin whose edges enclose it.
    allx = np.concatenate(batches)
    idx = np.floor(allx / grown.width).astype(np.int64) - grown.first
    expected = np.bincount(idx, minlength=len(grown.counts))
    np.testing.assert_array_equal(grown.counts, expected)


def test_abs_histogram_folds_negative_bins_onto_their_magnitudes():
    # (values exactly on a negative bin's lower edge would land one |x| bin higher)
    values = np.array([-2.9, -1.1, 1.3, 3.0, 0.0, -0.37], np.float32)
    s = TensorStats("t")
    s.update(values)
    counts, width = s.abs_histogram()
    mags = np.floor(np.abs(values) / np.float32(width)).astype(int)
    np.testing.assert_array_equal(counts, np.bincount(mags, minlength=len(counts)))


def test_large_batches_are_subsampled_for_the_histogram_but_not_for_min_max():
    s = TensorStats("t")
    x = np.zeros(st.HIST_VALUES * 4, np.float32)
    x[1] = 7.0                     # never on the sampling stride
    s.update(x)
    assert s.max == 7.0
    assert s.counts.sum() < x.size


def test_minmax_only_collection_keeps_no_histogram():
    s = TensorStats("t")
    s.update(np.arange(10, dtype=np.float32), histogram=False)
    assert s.counts is None and s.max == 9.0


def test_non_finite_activation_is_a_data_error():
    with pytest.raises(DataError, match="NaN"):
        TensorStats("t").update(np.array([1.0, np.nan], np.float32))


def test_collect_runs_the_model_once_and_sees_requested_tensors():
    from onnxc.calibrate.stats import collect
    from onnxc.ir import Graph

    from quant_helpers import dataset, residual_cnn

    model = residual_cnn()
    data = dataset(model, 40)
    stats = collect(Graph.from_onnx(model).to_onnx(), ["r0", "c2", "y"], data,
                    batch_size=16, progress=False)
    assert set(stats) == {"r0", "c2", "y"}
    assert stats["r0"].min == 0.0                  # a ReLU output
    assert stats["c2"].min < 0 < stats["c2"].max
    assert all(s.count > 0 for s in stats.values())


def test_channel_means_cover_samples_and_positions():
    s = TensorStats("t")
    rng = np.random.default_rng(3)
    batches = [rng.normal([[[1.0]], [[-3.0]]], 1.0, (n, 2, 4, 4)) for n in (5, 7)]
    for b in batches:
        s.update_channels(b.astype(np.float32))
    np.testing.assert_allclose(s.channel_mean(), np.concatenate(batches).mean((0, 2, 3)),
                               rtol=1e-6)
    assert TensorStats("u").channel_mean() is None
