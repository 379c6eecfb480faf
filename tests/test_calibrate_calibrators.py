"""Calibrators turn statistics into ranges; Scheme turns ranges into (scale, zero point)."""

import numpy as np
import pytest

from onnxc.calibrate.calibrators import CALIBRATORS, Scheme, clip_range
from onnxc.calibrate.stats import TensorStats


def _stats(x):
    s = TensorStats("t")
    s.update(np.asarray(x, np.float32))
    return s


@pytest.fixture(scope="module")
def heavy_tailed():
    # Gaussian bulk plus a few far outliers: every clipping calibrator should clip them.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [40.0, -35.0, 38.0]])
    return _stats(x)


def test_minmax_is_the_observed_range(heavy_tailed):
    assert clip_range(heavy_tailed, "minmax") == (heavy_tailed.min, heavy_tailed.max)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_clipping_calibrators_cut_outliers_but_keep_the_bulk(heavy_tailed, method):
    lo, hi = clip_range(heavy_tailed, method)
    assert 2.5 < hi < 20 and -20 < lo < -2.5


def _fake_quant_mse(x, lo, hi, scheme=Scheme()):
    scale, zp = scheme.params(lo, hi)
    q = np.clip(np.round(x / scale) + zp, scheme.qmin, scheme.qmax)
    return float(np.mean(((q - zp) * scale - x) ** 2))


@pytest.mark.parametrize("scheme", [Scheme(), Scheme(signed=True)])
def test_mse_range_has_the_lowest_quantization_error(scheme):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.laplace(0.5, 1, 100_000), rng.uniform(-30, 30, 30)])
    s = _stats(x)
    best = _fake_quant_mse(x, *clip_range(s, "mse", scheme), scheme)
    for other in ("minmax", "percentile", "entropy"):
        assert best <= 1.02 * _fake_quant_mse(x, *clip_range(s, other, scheme), scheme)


def test_relu_output_is_clipped_at_the_top_only():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(0, 1, 100_000), 0).astype(np.float32)
    for method in CALIBRATORS:
        lo, hi = clip_range(_stats(x), method)
        assert lo == 0.0 and 0 < hi <= x.max()


def test_percentile_matches_numpy_percentile_of_magnitudes():
    rng = np.random.default_rng(3)
    x = rng.laplace(0, 1, 100_000)
    lo, hi = clip_range(_stats(x), "percentile", percentile=99.0)
    assert hi == pytest.approx(np.percentile(np.abs(x), 99.0), rel=0.02)


def test_uint8_params_make_zero_exact_and_cover_the_range():
    scale, zp = Scheme(signed=False).params(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255)
    assert zp == round(1.0 / scale)          # the integer that dequantizes to exactly 0
    assert (0 - zp) * scale <= -1.0 + scale and (255 - zp) * scale >= 3.0 - scale


def test_int8_params_are_symmetric_with_zero_point_0():
    scale, zp = Scheme(signed=True).params(-0.5, 2.54)
    assert zp == 0 and scale == pytest.approx(2.54 / 127)


def test_pow2_scales_are_powers_of_two_never_smaller_than_needed():
    for lo, hi in [(-1, 1), (0, 6.2), (-0.03, 0.01)]:
        scale, zp = Scheme(signed=True, pow2=True).params(lo, hi)
        assert np.log2(scale) == int(np.log2(scale))
        assert scale * 127 >= max(-lo, hi)
        assert zp == 0
