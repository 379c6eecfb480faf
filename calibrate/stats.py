"""Activation statistics: one pass of ONNX Runtime over the calibration data.

Every tensor we want to quantize is added as an extra graph output; each batch
updates, per tensor, the running min/max and a histogram. The histogram is kept
exact while the range grows: bins are aligned on 0 with a power-of-two width, and
when the data no longer fits in ``MAX_BINS`` bins the width doubles and pairs of
bins merge (bin k becomes bin floor(k/2)). No second pass over the data is needed,
and the result does not depend on batch order beyond float rounding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.errors import BackendError, DataError

MAX_BINS = 4096
BATCH_SIZE = 32
# Histogram at most this many values per tensor per batch (a fixed odd stride, so it does
# not alias with power-of-two spatial dims); min/max always see every value.
HIST_VALUES = 1 << 17


@dataclass
class TensorStats:
    """Running statistics of one tensor: count, min, max and an origin-aligned histogram.

    ``counts[i]`` holds values in ``[(first + i)·width, (first + i + 1)·width)``.
    """

    name: str
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    width: float = 0.0
    first: int = 0
    counts: np.ndarray | None = None      # int64, len ≤ MAX_BINS
    zeros: int = 0                        # exact zeros among the histogrammed values
    channel_sum: np.ndarray | None = None  # float64 per axis-1 channel (when asked for)
    channel_count: int = 0                # values summed per channel

    def update_channels(self, x: np.ndarray) -> None:
        """Accumulate the per-channel (axis 1) sum of an N×C×… tensor."""
        x = np.asarray(x)
        if x.ndim < 2:
            return
        axes = (0,) + tuple(range(2, x.ndim))
        s = x.sum(axes, dtype=np.float64)
        self.channel_sum = s if self.channel_sum is None else self.channel_sum + s
        self.channel_count += x.size // x.shape[1]

    def channel_mean(self) -> np.ndarray | None:
        """Mean of each axis-1 channel over samples and positions, or None."""
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return self.channel_sum / self.channel_count

    # -- update ------------------------------------------------------------------------
    def update(self, x: np.ndarray, histogram: bool = True) -> None:
        x = np.asarray(x, np.float32).reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"tensor '{self.name}' produced NaN/Inf during calibration")
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if not histogram:
            return
        if self.width == 0.0:
            span = max(abs(self.min), abs(self.max), 1e-12)
            # Start with the finest power-of-two width that fits the first batch.
            self.width = 2.0 ** math.ceil(math.log2(2 * span / (MAX_BINS - 2)))
            self.first = math.floor(self.min / self.width)
            self.counts = np.zeros(math.floor(self.max / self.width) - self.first + 1, np.int64)
        self._cover(lo, hi)
        if x.size > HIST_VALUES:
            stride = x.size // HIST_VALUES
            x = x[::stride | 1]
        self.zeros += int(np.count_nonzero(x == 0))
        idx = np.floor(x * np.float32(1.0 / self.width)).astype(np.int64) - self.first
        np.clip(idx, 0, len(self.counts) - 1, out=idx)  # float rounding at the edges
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def _cover(self, lo: float, hi: float) -> None:
        """Grow (and if needed coarsen) the histogram so [lo, hi] fits."""
        k_lo = min(self.first, math.floor(lo / self.width))
        k_hi = max(self.first + len(self.counts) - 1, math.floor(hi / self.width))
        while k_hi - k_lo + 1 > MAX_BINS:
            # Double the width: bin k merges into k // 2 (floor keeps 0-alignment).
            old = np.arange(self.first, self.first + len(self.counts))
            new_first = self.first // 2
            merged = np.zeros(old[-1] // 2 - new_first + 1, np.int64)
            np.add.at(merged, old // 2 - new_first, self.counts)
            self.counts, self.first, self.width = merged, new_first, self.width * 2
            k_lo, k_hi = math.floor(k_lo / 2), math.floor(k_hi / 2)
        if k_lo < self.first or k_hi > self.first + len(self.counts) - 1:
            grown = np.zeros(k_hi - k_lo + 1, np.int64)
            grown[self.first - k_lo:self.first - k_lo + len(self.counts)] = self.counts
            self.counts, self.first = grown, k_lo

    # -- views -------------------------------------------------------------------------
    def edges(self) -> np.ndarray:
        """Bin edges, len(counts) + 1."""
        return (self.first + np.arange(len(self.counts) + 1)) * self.width

    def centers(self) -> np.ndarray:
        return (self.first + np.arange(len(self.counts)) + 0.5) * self.width

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """(counts, width) of |x| over bins [i·width, (i+1)·width): negative bin k covers
        [k·w, (k+1)·w), whose magnitudes fall in bin -k-1 (all but the edge value k·w)."""
        ks = self.first + np.arange(len(self.counts))
        mag = np.where(ks >= 0, ks, -ks - 1)
        out = np.zeros(int(mag.max()) + 1, np.int64)
        np.add.at(out, mag, self.counts)
        return out, self.width


def collect(model: onnx.ModelProto, tensors: list[str], dataset, batch_size: int = BATCH_SIZE,
            progress: bool = True, desc: str = "calibrating",
            histograms: bool = True, channel_means=()) -> dict[str, TensorStats]:
    """Run ``model`` over ``dataset`` once; statistics of every tensor in ``tensors``
    (min/max always; histograms unless ``histograms`` is False, e.g. for minmax).
    Tensors named in ``channel_means`` also get per-channel means (they are collected
    too if not in ``tensors``); int8 bias correction needs them for layer inputs."""
    from onnxc.execution import Runner, capture_model

    if len(dataset) == 0:
        raise DataError("calibration dataset is empty")
    tensors = list(dict.fromkeys(list(tensors) + list(channel_means)))
    runner = Runner(capture_model(model, tensors, keep_outputs=True))
    wanted, means = set(tensors), set(channel_means)
    stats = {name: TensorStats(name) for name in tensors}
    step = runner.fixed_batch or batch_size
    bar = _progress(total=math.ceil(len(dataset) / step), desc=desc, enabled=progress)

    def visit(start, values):
        for name, value in values.items():
            if name in wanted:
                stats[name].update(value, histograms)
                if name in means:
                    stats[name].update_channels(value)
        bar.update()

    try:
        runner.stream(dataset.inputs, visit, batch_size)
    except BackendError as exc:
        raise BackendError(f"calibration: {exc}") from exc
    finally:
        bar.close()
    return stats


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:   # tqdm is a declared dependency; still never fail on a bar
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr,
                leave=False, disable=not sys.stderr.isatty())
