"""Calibrators: turn a tensor's statistics into a clipping range, then into (scale, zero point).

``minmax``      the observed range.
``percentile``  clip the tails at the given percentile (of |x| for signed tensors).
``entropy``     TensorRT's KL-divergence threshold: the clip that keeps the quantized
                distribution closest to the observed one.
``mse``         the clip minimising the expected squared quantization error over the
                histogram (rounding noise + clipping error).

Signed tensors are clipped symmetrically in magnitude (threshold t, range
[max(min, -t), min(max, t)]); tensors that never go negative (ReLU outputs) are
clipped at the top only.

A new calibrator is one function decorated with ``@register_calibrator(name)``; the
int8 pass offers every registered name as ``--int8-calibrator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxc.errors import UsageError

from .stats import TensorStats


@dataclass(frozen=True)
class Scheme:
    """How activations are stored: uint8 asymmetric, or int8 symmetric (zero point 0)."""

    signed: bool = False           # int8 with zero point 0 (else uint8 asymmetric)
    pow2: bool = False             # scales restricted to powers of two

    @property
    def qmin(self) -> int:
        return -128 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 127 if self.signed else 255

    @property
    def dtype(self):
        return np.int8 if self.signed else np.uint8

    def params(self, lo: float, hi: float) -> tuple[float, int]:
        """(scale, zero point) covering [lo, hi]; the range always includes 0 so that
        zero (padding, ReLU) is exact."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if self.signed:
            scale = max(-lo, hi) / self.qmax
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
        scale = max(scale, 1e-12)
        if self.pow2:
            # Round up, never down: a smaller scale would clip the calibrated range.
            scale = float(2.0 ** np.ceil(np.log2(scale)))
        scale = float(np.float32(scale))
        if self.signed:
            return scale, 0
        zp = int(np.clip(round(-lo / scale), self.qmin, self.qmax))
        return scale, zp


def clip_range(stats: TensorStats, method: str = "minmax", scheme: Scheme = Scheme(),
               percentile: float = 99.99) -> tuple[float, float]:
    """The calibrated [lo, hi] of one tensor by calibrator ``method``."""
    calibrator = CALIBRATORS.get(method)
    if calibrator is None:
        raise UsageError(f"unknown calibrator '{method}' (choose from {', '.join(CALIBRATORS)})")
    if stats.count == 0:
        raise ValueError(f"no statistics collected for tensor '{stats.name}'")
    if stats.max == stats.min:
        return stats.min, stats.max
    if calibrator.histograms and stats.counts is None:
        raise ValueError(f"calibrator '{method}' needs histograms; collect them")
    return calibrator.clip(stats, scheme, percentile)


# ----------------------------------------------------------------------------------------
# The registry: a calibrator is a function (stats, scheme, percentile) -> (lo, hi).


@dataclass(frozen=True)
class Calibrator:
    name: str
    clip: Callable
    histograms: bool = True        # needs TensorStats histograms (int8 collects them)


CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(name: str, histograms: bool = True):
    """Decorator: ``clip(stats, scheme, percentile) -> (lo, hi)`` becomes ``--int8-calibrator
    NAME``."""
    def decorate(clip):
        if name in CALIBRATORS:
            raise RuntimeError(f"calibrator registered twice: {name!r}")
        CALIBRATORS[name] = Calibrator(name, clip, histograms)
        return clip
    return decorate


@register_calibrator("minmax", histograms=False)
def _minmax(stats, scheme, percentile):
    return stats.min, stats.max


def _clip_magnitude(stats, t: float, width: float) -> tuple[float, float]:
    """Clip at magnitude ``t`` (at least one histogram bin, at most the observed range)."""
    max_abs = max(abs(stats.min), abs(stats.max))
    t = min(max(t, width), max_abs)
    return max(stats.min, -t), min(stats.max, t)


@register_calibrator("percentile")
def _percentile(stats, scheme, percentile):
    counts, width = stats.abs_histogram()         # |x| histogram, bins [i·w, (i+1)·w)
    return _clip_magnitude(stats, _percentile_threshold(counts, width, percentile), width)


@register_calibrator("entropy")
def _entropy(stats, scheme, percentile):
    counts, width = stats.abs_histogram()
    # TensorRT's setting: |x| in 2048 bins over [0, max|x|], 128 quantized levels.
    # Exact zeros (half of a ReLU output) are left out: they are exact in any
    # quantization, and in bin 0 they would make every wide first chunk look lossy.
    nz = counts.copy()
    nz[0] -= min(stats.zeros, nz[0])
    coarse, cwidth = _rebin(nz, width, 2048)
    # Levels on the clipped side: a non-negative tensor in uint8 really has 256.
    levels = 256 if stats.min >= 0 and not scheme.signed else 128
    return _clip_magnitude(stats, _entropy_threshold(coarse, cwidth, levels), width)


@register_calibrator("mse")
def _mse(stats, scheme, percentile):
    return _mse_range(stats, scheme)


# ----------------------------------------------------------------------------------------


def _percentile_threshold(counts: np.ndarray, width: float, percentile: float) -> float:
    if not 0 < percentile <= 100:
        raise UsageError(f"--int8-percentile {percentile} must be in (0, 100]")
    cdf = np.cumsum(counts) / max(counts.sum(), 1)
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return (min(i, len(counts) - 1) + 1) * width


def _rebin(counts: np.ndarray, width: float, bins: int) -> tuple[np.ndarray, float]:
    """Histogram over [0, len·width) regridded to ``bins`` equal bins (mass by bin center)."""
    top = len(counts) * width
    new_width = top / bins
    centers = (np.arange(len(counts)) + 0.5) * width
    idx = np.minimum((centers / new_width).astype(np.int64), bins - 1)
    return np.bincount(idx, weights=counts, minlength=bins), new_width


def _entropy_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """TensorRT-style: for each candidate clip bin i, compare P = hist[:i] with the
    outliers folded into the last bin against Q = hist[:i] squeezed into ``levels``
    bins and expanded back (mass spread over the originally non-empty bins)."""
    counts = counts.astype(np.float64)
    n = len(counts)
    if n <= levels:
        return n * width
    # ≤ ~160 candidates (every 12th of 2048 bins) keeps this cheap at a clip resolution
    # of 0.6 % of the range, well below the 128-level quantization step.
    step = max(1, (n - levels) // 160)
    best_i, best_kl = n, np.inf
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])   # tail[i] = sum(counts[i:])
    for i in range(levels, n + 1, step):
        p = counts[:i].copy()
        p[-1] += tail[i]
        # Quantize hist[:i] (without outliers) into `levels` chunks, spread back uniformly.
        chunk = (np.arange(i) * levels) // i                    # bin -> chunk, shape (i,)
        nonzero = counts[:i] > 0
        chunk_mass = np.bincount(chunk, weights=counts[:i], minlength=levels)
        chunk_nz = np.bincount(chunk, weights=nonzero, minlength=levels)
        q = np.where(nonzero, chunk_mass[chunk] / np.maximum(chunk_nz[chunk], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        # A P>0 bin with Q=0 would be infinite KL; TensorRT smooths Q with a tiny epsilon.
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def _fq_error(c, w, lo, hi, scheme: Scheme) -> np.ndarray:
    """Σ_bins count·(c − fakequant(c))² for candidate ranges lo, hi (each shape (T,))."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if scheme.signed:
        scale = np.maximum(-lo, hi) / scheme.qmax
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    scale = np.maximum(scale, 1e-12)
    if scheme.pow2:
        scale = 2.0 ** np.ceil(np.log2(scale))
    zp = np.zeros_like(scale) if scheme.signed else \
        np.clip(np.round(-lo / scale), scheme.qmin, scheme.qmax)
    q = np.clip(np.round(c[None, :] / scale[:, None]) + zp[:, None], scheme.qmin, scheme.qmax)
    fq = (q - zp[:, None]) * scale[:, None]                           # (T, B)
    return ((fq - c[None, :]) ** 2 * w[None, :]).sum(1)


def _mse_range(stats: TensorStats, scheme: Scheme, candidates: int = 512) -> tuple:
    """Range minimising the expected squared quantization error over the histogram.

    Symmetric int8 or a one-sided tensor: one threshold t. uint8 with both signs (the
    zero point is free): the two ends are searched in turn (coordinate descent, two
    rounds), because the best clip of a skewed tensor is not symmetric."""
    c = stats.centers()                              # (B,)
    w = stats.counts.astype(np.float64)              # (B,)
    keep = w > 0
    c, w = c[keep], w[keep]
    frac = np.arange(1, candidates + 1) / candidates                  # (T,)
    if scheme.signed or stats.min >= 0 or stats.max <= 0:
        max_abs = max(abs(stats.min), abs(stats.max))
        ts = max_abs * frac
        err = _fq_error(c, w, np.maximum(stats.min, -ts), np.minimum(stats.max, ts), scheme)
        t = float(ts[int(np.argmin(err))])
        return max(stats.min, -t), min(stats.max, t)
    lo, hi = stats.min, stats.max
    for _ in range(2):
        his = stats.max * frac
        hi = float(his[int(np.argmin(_fq_error(c, w, np.full_like(his, lo), his, scheme)))])
        los = stats.min * frac
        lo = float(los[int(np.argmin(_fq_error(c, w, los, np.full_like(los, hi), scheme)))])
    return lo, hi
