"""A quantized conv/dense layer as VTA sees it, and its numpy integer reference.

Everything is integer: int8 input ``x`` (scale 2^ex), int8 weights (per-output-channel
scale 2^ew[o]), int32 bias at the accumulator scale 2^(ex+ew[o]), and the output
``y = clip(round(acc · 2^-n[o]))`` with ``n[o] = ey - ex - ew[o]`` — exactly what ONNX
Runtime computes for the QDQ pattern DQ→Conv→[Relu]→Q when all scales are powers of two
(the float products and sums are exact, and QuantizeLinear rounds half to even).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class QLayer:
    name: str
    kind: str                       # "conv" or "dense"
    in_shape: tuple                 # (N, C, H, W); dense: (N, K, 1, 1)
    weight: np.ndarray              # int8 [O, C, kh, kw]
    bias: np.ndarray                # int64 [O], accumulator scale
    shift: np.ndarray               # int64 [O], y = acc · 2^-shift
    stride: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)      # top, left, bottom, right
    relu: bool = False
    input_name: str = ""
    output_name: str = ""
    notes: list = field(default_factory=list)
    # Further requantisation stages [(shift[O], relu)] applied to the int8 result, e.g.
    # Q(s_y) -> DQ -> Relu -> Q(s_r) becomes (s_r/s_y as a shift, relu=True).
    extra_stages: list = field(default_factory=list)
    # kind "add": the input is the channel concatenation of these tensors (same shape)
    concat_inputs: list = field(default_factory=list)

    @property
    def stages(self) -> list:
        return [(np.asarray(self.shift, np.int64), self.relu)] + list(self.extra_stages)

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> tuple:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def out_shape(self) -> tuple:
        n, _, h, w = self.in_shape
        kh, kw = self.kernel
        pt, pl, pb, pr = self.pads
        oh = (h + pt + pb - kh) // self.stride[0] + 1
        ow = (w + pl + pr - kw) // self.stride[1] + 1
        return (n, self.out_channels, oh, ow)

    @property
    def macs(self) -> int:
        n, o, oh, ow = self.out_shape
        if self.kind == "add":        # one useful multiply-add per element and input
            return int(n * o * oh * ow * len(self.concat_inputs))
        _, c, kh, kw = self.weight.shape
        return int(n * o * oh * ow * c * kh * kw)


def accumulate(layer: QLayer, x: np.ndarray) -> np.ndarray:
    """int32 accumulators (wrapped) [N, O, OH, OW] = conv(x, w) + bias."""
    n = len(x)
    _, c, h, w = layer.in_shape
    kh, kw = layer.kernel
    sh, sw = layer.stride
    pt, pl, pb, pr = layer.pads
    _, o, oh, ow = layer.out_shape
    xp = np.zeros((n, c, h + pt + pb, w + pl + pr), np.int64)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    # cols [N, C, kh, kw, OH, OW]: the input patch seen by every output position
    cols = np.empty((n, c, kh, kw, oh, ow), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            cols[:, :, ky, kx] = xp[:, :, ky:ky + sh * (oh - 1) + 1:sh,
                                    kx:kx + sw * (ow - 1) + 1:sw]
    acc = np.einsum("nckxhw,ockx->nohw", cols, layer.weight.astype(np.int64), optimize=True)
    acc = acc + layer.bias.astype(np.int64)[None, :, None, None]
    return ((acc + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def requantize(acc: np.ndarray, shift: np.ndarray, relu: bool, rounding: str = "even",
               axis: int = 1) -> np.ndarray:
    """int8 output of accumulators ``acc`` scaled by 2^-shift (per channel on ``axis``)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    n = np.asarray(shift, np.int64).reshape(shape)
    acc = acc.astype(np.int64)
    pos = np.maximum(n, 0)
    q = acc >> pos                                  # floor(acc / 2^n)
    r = acc - (q << pos)                            # remainder in [0, 2^n)
    half = np.where(n > 0, np.left_shift(1, np.maximum(pos - 1, 0)), 0)
    if rounding == "even":
        up = (r > half) | ((r == half) & (n > 0) & (q & 1 == 1))
    else:
        up = (r >= half) & (n > 0)
    y = np.where(n > 0, q + up, acc << np.maximum(-n, 0))
    y = np.maximum(y, 0 if relu else -128)
    return np.minimum(y, 127).astype(np.int8)


def reference(layer: QLayer, x: np.ndarray, rounding: str = "even") -> np.ndarray:
    """The layer's int8 output for int8 input ``x`` [N, C, H, W], computed in numpy."""
    x = np.asarray(x).reshape((len(x),) + tuple(layer.in_shape[1:]))
    y = accumulate(layer, x)
    for shift, relu in layer.stages:
        y = requantize(y, shift, relu, rounding)
    return y.reshape(y.shape[:2]) if layer.kind == "dense" else y
