"""ONNX graph (onnxc IR) -> trainable PyTorch module, and trained values back into the IR.

Why our own converter rather than onnx2torch: the student graphs recover trains are
compressed graphs — QDQ-quantized (int8, ternary, binary weights behind
DequantizeLinear, activations through QuantizeLinear→DequantizeLinear) with pruned or
factorised shapes. Training them needs fake quantization with straight-through
estimators on exactly those nodes, and writing the result back must touch nothing but
the constants' values so the graph's structure (op types, shapes, quantization grids)
stays identical. An interpreter over the IR does both in a few hundred lines; a
general converter builds its own module tree we would have to map back.

The module interprets the topologically sorted nodes; each node becomes a closure
over its attributes and constant inputs. Learned weights (float constants feeding
Conv/Gemm/MatMul/BN/elementwise ops, and the integer weights behind
DequantizeLinear) become ``nn.Parameter``s; everything else (shape data, activation
quantization scales, zero points, BN running statistics) stays fixed. The per-channel
scale α of a ternary or binary weight is learned too (``learn_lowbit_scales``): with
only two or three levels per channel, α is the layer's whole magnitude, and with BN
folded nothing else can rescale a channel (Zhu et al., "Trained Ternary Quantization").
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from torch import nn

from onnxc.errors import UnsupportedError

# Float constants feeding these ops at these input positions are learned weights.
TRAINABLE_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
    "Div": (0,), "PRelu": (1,),
    # A float weight quantized on the fly (QuantizeLinear→DequantizeLinear) is trained
    # through the Q node's fake quantization.
    "QuantizeLinear": (0,),
}


# ----------------------------------------------------------------------------------------
# Fake quantization with straight-through estimators


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() forward (half to even, as ONNX QuantizeLinear), identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x, scale, zero_point, qmin, qmax):
    """Integer grid values q = clamp(round(x/s) + zp) as float; clipped STE gradient."""
    return torch.clamp(ste_round(x / scale + zero_point), qmin, qmax)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """±1 forward (0 maps to +1, as binary weights are stored); hardtanh gradient."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    soft = torch.clamp(x, -1.0, 1.0)
    return soft + (hard - soft).detach()


_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
           np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535),
           np.dtype(np.int32): (-2**31, 2**31 - 1)}


class QuantWeight:
    """How an integer weight behind DequantizeLinear is re-quantized during training.

    The grid is read from the values the quantizer chose: {-1, +1} is binary (sign),
    a subset of {-1, 0, +1} with a zero is ternary (round, clamp to ±1), anything else
    is the full range of the storage type. Scales and zero points stay fixed, so the
    trained graph uses exactly the quantization grid the quantization pass chose.
    """

    def __init__(self, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                 axis: int):
        self.dtype = q.dtype
        zp = np.zeros_like(scale, dtype=np.float64) if zero_point is None \
            else zero_point.astype(np.float64)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis % q.ndim] = -1
        self.scale = torch.tensor(scale.astype(np.float32).reshape(shape))
        self.zero_point = torch.tensor(zp.astype(np.float32).reshape(shape))
        values = set(np.unique(q).tolist()) if q.size <= 1 << 22 else set()
        if zero_point is not None and np.any(zero_point != 0):
            values = set()            # asymmetric grids are never ternary/binary
        if values and values <= {-1, 1} and len(values) == 2:
            self.kind, self.qmin, self.qmax = "binary", -1, 1
        elif values and values <= {-1, 0, 1} and 0 in values and len(values) > 1:
            self.kind, self.qmin, self.qmax = "ternary", -1, 1
        else:
            self.kind = "int"
            self.qmin, self.qmax = _QRANGE.get(np.dtype(q.dtype), (-128, 127))
            if (zero_point is None or not np.any(zero_point != 0)) and q.size \
                    and q.dtype == np.int8:
                # Symmetric int8 weight codes reach the grid's end (per channel or per
                # tensor), so max|q| is the range the quantizer used (e.g. ±63 for
                # reduced-range int8 on CPUs without VNNI, whose u8×s8 kernels would
                # overflow beyond it): training stays inside it. Not for int32 biases,
                # whose codes are nowhere near their type's limits.
                m = int(np.abs(q.astype(np.int64)).max())
                if m > 0:
                    self.qmin, self.qmax = -m, m

    def latent(self, q: np.ndarray) -> torch.Tensor:
        """Float weight whose fake quantization reproduces ``q`` exactly."""
        return ((torch.tensor(q.astype(np.float32)) - self.zero_point) * self.scale).float()

    def float_latent(self, q: np.ndarray, w: np.ndarray, axis: int) -> torch.Tensor | None:
        """Latent from the float weight ``w`` the codes ``q`` were made from, or None
        when it does not reproduce them exactly.

        Training from the float weight keeps what the codes threw away: how close each
        weight is to a quantization boundary, so the ones the quantizer decided
        narrowly flip first. Ternary codes come from a threshold Δ on |w| (TWN), not
        from rounding at α/2; each channel is rescaled so the gap between its largest
        zeroed and smallest kept |w| falls on α/2, which rounding then reproduces.
        """
        if w.shape != q.shape or w.dtype.kind != "f":
            return None
        w = w.astype(np.float32)
        if self.kind == "ternary":
            ax = axis % q.ndim
            a = np.abs(np.moveaxis(w, ax, 0)).reshape(q.shape[ax], -1).astype(np.float64)
            kept = np.moveaxis(q, ax, 0).reshape(q.shape[ax], -1) != 0
            lo = np.where(~kept, a, 0.0).max(1)
            hi = np.where(kept, a, np.inf).min(1)
            if np.any(lo >= hi):
                return None               # not a threshold on |w|: not made from w
            t = np.where(np.isfinite(hi), (lo + hi) / 2, 2 * lo + 1e-12)
            t = np.maximum(t, 1e-12)
            shape = [1] * q.ndim
            shape[ax] = -1
            s = self.scale.numpy().reshape(-1) if self.scale.numel() > 1 \
                else np.full(len(t), float(self.scale))
            w = w * (0.5 * s / t).astype(np.float32).reshape(shape)
        latent = torch.tensor(w)
        with torch.no_grad():
            ok = np.array_equal(self.quantize(latent).round().numpy().astype(np.int64),
                                q.astype(np.int64))
        return latent if ok else None

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer grid values (float tensor) of latent weight ``w``, STE gradient."""
        if self.kind == "binary":
            return ste_sign(w / self.scale)
        return fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax)

    def dequantize(self, w: torch.Tensor) -> torch.Tensor:
        return (self.quantize(w) - self.zero_point) * self.scale

    def to_storage(self, w: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            q = self.quantize(w).round()
        return q.numpy().astype(self.dtype)


# ----------------------------------------------------------------------------------------
# The module


class TorchGraph(nn.Module):
    """A PyTorch module computing an onnxc ``Graph``; ``forward`` returns its outputs.

    ``forward(*inputs, taps=())`` also returns the intermediate tensors named in
    ``taps`` (for feature hints) as a second value when ``taps`` is given.
    """

    def __init__(self, graph, trainable: bool = True, learn_lowbit_scales: bool = True,
                 float_weights: dict | None = None):
        super().__init__()
        self.graph = graph
        # {consumer node name: [candidate float weights]}: where quantized weights came
        # from (see QuantWeight.float_latent); used only if one reproduces the codes.
        self.float_weights = float_weights or {}
        self.float_latents = 0
        self.learn_lowbit_scales = learn_lowbit_scales
        self.lowbit_scales: set = set()           # learned α of ternary/binary weights
        self.input_names = [t.name for t in graph.gs.inputs]
        self.output_names = [t.name for t in graph.gs.outputs]
        self.params = nn.ParameterList()
        self.param_index: dict[str, int] = {}     # constant name -> index in self.params
        self.quant: dict[str, QuantWeight] = {}   # integer weights behind DequantizeLinear
        self._consts: dict[str, torch.Tensor] = {}
        self.steps = []
        unsupported = {}
        for node in graph.nodes:
            build = getattr(self, f"_op_{node.op}", None)
            if build is None or (node.domain or "") not in ("", "ai.onnx"):
                unsupported.setdefault(node.op, node.name)
                continue
            self._mark_trainable(node, trainable)
            fn = build(node)
            self.steps.append(([t.name for t in node.inputs],
                               [t.name for t in node.outputs], fn, node.name))
        if unsupported:
            ops = ", ".join(f"{op} (e.g. node '{name}')" for op, name in
                            sorted(unsupported.items()))
            raise UnsupportedError(f"recover cannot train graphs with op(s) {ops}; "
                                   f"supported: {', '.join(supported_ops())}")
        # Every constant the closures read (non-learned ones are fixed tensors).
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.name not in self.param_index \
                    and t.name not in self.quant:
                self._consts[t.name] = _to_torch(t.values)

    # ---- parameters ---------------------------------------------------------------------
    def _mark_trainable(self, node, trainable: bool) -> None:
        if not trainable:
            return
        if node.op == "DequantizeLinear":
            x = node.inputs[0]
            if isinstance(x, gs.Constant) and x.values.dtype.kind in "iu" \
                    and x.name not in self.quant:
                scale = np.asarray(node.inputs[1].values) \
                    if isinstance(node.inputs[1], gs.Constant) else None
                zp = node.inputs[2] if len(node.inputs) > 2 else None
                if scale is None or (zp is not None and zp.name and
                                     not isinstance(zp, gs.Constant)):
                    return
                zpv = np.asarray(zp.values) if isinstance(zp, gs.Constant) else None
                qw = QuantWeight(np.asarray(x.values), scale, zpv,
                                 int(node.attrs.get("axis", 1)))
                self.quant[x.name] = qw
                self.param_index[x.name] = len(self.params)
                q = np.asarray(x.values)
                latent = None
                readers = node.outputs[0].outputs
                for w in self.float_weights.get(readers[0].name if len(readers) == 1
                                                else None, ()):
                    latent = qw.float_latent(q, w, int(node.attrs.get("axis", 1)))
                    if latent is not None:
                        self.float_latents += 1
                        break
                self.params.append(nn.Parameter(qw.latent(q) if latent is None else latent))
                s_t = node.inputs[1]
                if self.learn_lowbit_scales and qw.kind in ("ternary", "binary") \
                        and s_t.name not in self.param_index \
                        and len(s_t.outputs) == 1:
                    # The codes are still chosen on the pass's grid (w / α₀, fixed in
                    # ``qw``); the DequantizeLinear multiplies them by the learned α.
                    self.param_index[s_t.name] = len(self.params)
                    self.lowbit_scales.add(s_t.name)
                    self.params.append(nn.Parameter(torch.tensor(
                        np.asarray(s_t.values, dtype=np.float32))))
            return
        for i in TRAINABLE_INPUTS.get(node.op, ()):
            if i >= len(node.inputs):
                continue
            t = node.inputs[i]
            if not isinstance(t, gs.Constant) or t.values.dtype.kind != "f":
                continue
            # Elementwise scalars are fixed normalisation constants, not weights.
            if node.op in ("Add", "Sub", "Mul", "Div") and t.values.size <= 1:
                continue
            if t.name not in self.param_index:
                self.param_index[t.name] = len(self.params)
                self.params.append(nn.Parameter(torch.tensor(
                    np.asarray(t.values, dtype=np.float32))))

    def _value(self, name: str):
        """Tensor for a constant (learned → its parameter, quantized → fake-quant grid)."""
        if name in self.quant:
            return self.quant[name].quantize(self.params[self.param_index[name]])
        if name in self.param_index:
            return self.params[self.param_index[name]]
        return self._consts.get(name)

    def write_back(self) -> int:
        """Store trained values into the graph's constants (same names, shapes, dtypes)."""
        written = 0
        tensors = self.graph.tensors()
        for name, idx in self.param_index.items():
            const = tensors[name]
            p = self.params[idx].detach()
            if name in self.quant:
                new = self.quant[name].to_storage(p)
            elif name in self.lowbit_scales:
                # α stays float16-exact: the packed low-bit file stores it as float16
                # and must dequantize exactly like the model.
                new = p.numpy().astype(np.float16).astype(np.float32)
            else:
                new = p.numpy().astype(const.values.dtype)
            assert new.shape == tuple(const.values.shape), name
            const.values = np.ascontiguousarray(new)
            written += 1
        return written

    # ---- execution ----------------------------------------------------------------------
    def forward(self, *inputs, taps=()):
        env = dict(zip(self.input_names, inputs))
        for ins, outs, fn, _name in self.steps:
            args = []
            for n in ins:
                if not n:
                    args.append(None)            # omitted optional input
                elif n in env:
                    args.append(env[n])
                else:
                    args.append(self._value(n))
            result = fn(*args)
            if not isinstance(result, (tuple, list)):
                result = (result,)
            for n, r in zip(outs, result):
                if n:
                    env[n] = r
        outputs = [env[n] if n in env else self._value(n) for n in self.output_names]
        if taps:
            return outputs, [env[n] for n in taps]
        return outputs

    # ---- op builders: each returns fn(*inputs) ------------------------------------------
    def _const_np(self, node, i, default=None):
        """A constant input as numpy (shape data must be constant to be trainable)."""
        if i >= len(node.inputs) or not node.inputs[i].name:
            return default
        t = node.inputs[i]
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        raise UnsupportedError(f"recover: input {i} of {node.op} node '{node.name}' must be "
                               f"a constant (it carries shape data)")

    def _op_Conv(self, node):
        a = node.attrs
        k = len(a.get("kernel_shape", [])) or None
        strides = list(a.get("strides", [1] * (k or 2)))
        dil = list(a.get("dilations", [1] * len(strides)))
        group = int(a.get("group", 1))
        pads = list(a.get("pads", [0] * 2 * len(strides)))
        auto = a.get("auto_pad", "NOTSET")
        if isinstance(auto, bytes):
            auto = auto.decode()
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(len(strides))
        if conv is None:
            raise UnsupportedError(f"recover: Conv '{node.name}' has {len(strides)} "
                                   "spatial dims")

        def fn(x, w, b=None):
            p = pads
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                p = _same_pads(x.shape[2:], w.shape[2:], strides, dil, auto)
            elif auto == "VALID":
                p = [0] * 2 * len(strides)
            n = len(strides)
            if p[:n] == p[n:]:
                return conv(x, w, b, strides, p[:n], dil, group)
            x = F.pad(x, _torch_pads(p))
            return conv(x, w, b, strides, 0, dil, group)
        return fn

    def _op_ConvTranspose(self, node):
        a = node.attrs
        strides = list(a.get("strides", [1, 1]))
        dil = list(a.get("dilations", [1] * len(strides)))
        group = int(a.get("group", 1))
        pads = list(a.get("pads", [0] * 2 * len(strides)))
        outpad = list(a.get("output_padding", [0] * len(strides)))
        n = len(strides)
        if "output_shape" in a or pads[:n] != pads[n:] or \
                a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise UnsupportedError(f"recover: ConvTranspose '{node.name}' with asymmetric "
                                   "pads / output_shape / auto_pad is not supported")
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        return lambda x, w, b=None: conv(x, w, b, strides, pads[:n], outpad, group, dil)

    def _op_Gemm(self, node):
        a = node.attrs
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))

        def fn(x, w, c=None):
            y = (x.t() if ta else x) @ (w.t() if tb else w)
            if alpha != 1.0:
                y = y * alpha
            if c is not None:
                y = y + (c * beta if beta != 1.0 else c)
            return y
        return fn

    def _op_MatMul(self, node):
        return torch.matmul

    def _op_BatchNormalization(self, node):
        eps = float(node.attrs.get("epsilon", 1e-5))
        return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, eps)

    def _op_Relu(self, node):
        return F.relu

    def _op_LeakyRelu(self, node):
        alpha = float(node.attrs.get("alpha", 0.01))
        return lambda x: F.leaky_relu(x, alpha)

    def _op_PRelu(self, node):
        return lambda x, s: torch.where(x >= 0, x, x * s)

    def _op_Sigmoid(self, node):
        return torch.sigmoid

    def _op_Tanh(self, node):
        return torch.tanh

    def _op_HardSigmoid(self, node):
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)

    def _op_HardSwish(self, node):
        return lambda x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)

    def _op_Clip(self, node):
        lo = self._const_np(node, 1)
        hi = self._const_np(node, 2)
        lo = float(lo) if lo is not None else node.attrs.get("min")
        hi = float(hi) if hi is not None else node.attrs.get("max")
        return lambda x, *_: torch.clamp(x, lo, hi)

    def _op_Softmax(self, node):
        axis = int(node.attrs.get("axis", -1))
        return lambda x: torch.softmax(x, axis)

    def _op_Erf(self, node):
        return torch.erf

    def _op_Sqrt(self, node):
        return torch.sqrt

    def _op_Exp(self, node):
        return torch.exp

    def _op_Neg(self, node):
        return torch.neg

    def _op_Abs(self, node):
        return torch.abs

    def _op_Sign(self, node):
        # Binary activations: ONNX sign (0 stays 0) forward, hardtanh gradient (the
        # usual STE, Courbariaux et al.), so XNOR-style layers train.
        def fn(x):
            soft = torch.clamp(x, -1.0, 1.0)
            return soft + (torch.sign(x) - soft).detach()
        return fn

    def _op_Pow(self, node):
        return torch.pow

    def _op_Add(self, node):
        return torch.add

    def _op_Sub(self, node):
        return torch.sub

    def _op_Mul(self, node):
        return torch.mul

    def _op_Div(self, node):
        return torch.div

    def _op_Sum(self, node):
        def fn(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return fn

    def _op_Max(self, node):
        def fn(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = torch.maximum(out, x)
            return out
        return fn

    def _op_Min(self, node):
        def fn(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = torch.minimum(out, x)
            return out
        return fn

    def _op_LRN(self, node):
        a = node.attrs
        size, alpha = int(a["size"]), float(a.get("alpha", 1e-4))
        beta, bias = float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
        # torch's alpha/size convention matches ONNX's (both divide alpha by size).
        return lambda x: F.local_response_norm(x, size, alpha, beta, bias)

    def _op_Identity(self, node):
        return lambda x: x

    def _op_Dropout(self, node):
        return lambda x, *_: x

    def _op_Cast(self, node):
        to = int(node.attrs["to"])
        if to not in (1, 10, 11):        # float, float16, double: kept as float32
            raise UnsupportedError(f"recover: Cast '{node.name}' to a non-float type")
        return lambda x: x.float()

    def _op_GlobalAveragePool(self, node):
        return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def _op_GlobalMaxPool(self, node):
        return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)

    def _op_AveragePool(self, node):
        a = node.attrs
        k = list(a["kernel_shape"])
        s = list(a.get("strides", [1] * len(k)))
        p = list(a.get("pads", [0] * 2 * len(k)))
        cip = bool(a.get("count_include_pad", 0))
        ceil = bool(a.get("ceil_mode", 0))
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(k)]
        n = len(k)
        if p[:n] != p[n:]:
            raise UnsupportedError(f"recover: AveragePool '{node.name}' has asymmetric pads")
        return lambda x: pool(x, k, s, p[:n], ceil, cip)

    def _op_MaxPool(self, node):
        a = node.attrs
        k = list(a["kernel_shape"])
        s = list(a.get("strides", [1] * len(k)))
        p = list(a.get("pads", [0] * 2 * len(k)))
        d = list(a.get("dilations", [1] * len(k)))
        ceil = bool(a.get("ceil_mode", 0))
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(k)]
        n = len(k)
        if len(node.outputs) > 1 and node.outputs[1].name:
            raise UnsupportedError(f"recover: MaxPool '{node.name}' with Indices output")
        if p[:n] == p[n:]:
            return lambda x: pool(x, k, s, p[:n], d, ceil)
        return lambda x: pool(F.pad(x, _torch_pads(p), value=-math.inf), k, s, 0, d, ceil)

    def _op_Flatten(self, node):
        axis = int(node.attrs.get("axis", 1))

        def fn(x):
            ax = axis % x.dim() if x.dim() else 0
            lead = int(np.prod(x.shape[:ax])) if ax else 1
            return x.reshape(lead, -1)
        return fn

    def _op_Reshape(self, node):
        shape = [int(v) for v in self._const_np(node, 1)]
        allowzero = int(node.attrs.get("allowzero", 0))

        def fn(x, _s):
            target = [x.shape[i] if (v == 0 and not allowzero) else v
                      for i, v in enumerate(shape)]
            return x.reshape(target)
        return fn

    def _op_Transpose(self, node):
        perm = node.attrs.get("perm")
        return lambda x: x.permute(*(perm or range(x.dim() - 1, -1, -1)))

    def _op_Concat(self, node):
        axis = int(node.attrs["axis"])
        return lambda *xs: torch.cat(xs, axis)

    def _op_Squeeze(self, node):
        axes = self._const_np(node, 1, node.attrs.get("axes"))

        def fn(x, *_):
            if axes is None:
                return x.squeeze()
            return x.squeeze(tuple(int(a) % x.dim() for a in np.ravel(axes)))
        return fn

    def _op_Unsqueeze(self, node):
        axes = self._const_np(node, 1, node.attrs.get("axes"))

        def fn(x, *_):
            out_rank = x.dim() + len(np.ravel(axes))
            for a in sorted(int(v) % out_rank for v in np.ravel(axes)):
                x = x.unsqueeze(a)
            return x
        return fn

    def _op_ReduceMean(self, node):
        axes = self._const_np(node, 1, node.attrs.get("axes"))
        keep = bool(node.attrs.get("keepdims", 1))

        def fn(x, *_):
            dims = tuple(range(x.dim())) if axes is None else \
                tuple(int(a) % x.dim() for a in np.ravel(axes))
            return x.mean(dim=dims, keepdim=keep)
        return fn

    def _op_Gather(self, node):
        axis = int(node.attrs.get("axis", 0))
        idx = self._const_np(node, 1)

        def fn(x, _i):
            ind = torch.as_tensor(np.where(idx < 0, idx + x.shape[axis], idx), dtype=torch.long)
            out = torch.index_select(x, axis, ind.reshape(-1))
            return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])
        return fn

    def _op_Slice(self, node):
        starts = self._const_np(node, 1)
        ends = self._const_np(node, 2)
        axes = self._const_np(node, 3)
        steps = self._const_np(node, 4)

        def fn(x, *_):
            ax = range(len(starts)) if axes is None else [int(a) % x.dim() for a in axes]
            st = [1] * len(starts) if steps is None else [int(s) for s in steps]
            for a, s0, e0, step in zip(ax, starts, ends, st):
                dim = x.shape[a]
                s0, e0 = int(s0), int(e0)
                s0 = s0 + dim if s0 < 0 else s0
                e0 = e0 + dim if e0 < 0 else e0
                if step > 0:
                    s0, e0 = min(max(s0, 0), dim), min(max(e0, 0), dim)
                    idx = [slice(None)] * x.dim()
                    idx[a] = slice(s0, e0, step)
                    x = x[tuple(idx)]
                else:
                    s0, e0 = min(max(s0, 0), dim - 1), min(max(e0, -1), dim - 1)
                    ind = torch.arange(s0, e0, step, dtype=torch.long)
                    x = torch.index_select(x, a, ind)
            return x
        return fn

    def _op_Pad(self, node):
        mode = node.attrs.get("mode", "constant")
        if isinstance(mode, bytes):
            mode = mode.decode()
        pads = self._const_np(node, 1, node.attrs.get("pads"))
        value = self._const_np(node, 2)
        value = float(np.ravel(value)[0]) if value is not None and np.size(value) else 0.0
        if len(node.inputs) > 3 and node.inputs[3].name:
            raise UnsupportedError(f"recover: Pad '{node.name}' with axes input")
        torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
        tp = _torch_pads([int(p) for p in pads])

        def fn(x, *_):
            if torch_mode == "constant":
                return F.pad(x, tp, value=value)
            # reflect/replicate pad only the trailing spatial dims in torch.
            n_sp = x.dim() - 2
            return F.pad(x, tp[:2 * n_sp], mode=torch_mode)
        return fn

    def _op_QuantizeLinear(self, node):
        axis = int(node.attrs.get("axis", 1))
        zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        dtype = np.dtype(zp_t.values.dtype) if isinstance(zp_t, gs.Constant) \
            else np.dtype(np.uint8)
        qmin, qmax = _QRANGE.get(dtype, (-128, 127))

        def fn(x, s, zp=None):
            s, zp = _per_axis(s, x, axis), _per_axis(zp, x, axis)
            return fake_quant(x, s, 0.0 if zp is None else zp.float(), qmin, qmax)
        return fn

    def _op_DequantizeLinear(self, node):
        axis = int(node.attrs.get("axis", 1))

        def fn(q, s, zp=None):
            s, zp = _per_axis(s, q, axis), _per_axis(zp, q, axis)
            q = q.float()
            return (q - zp.float()) * s if zp is not None else q * s
        return fn


def supported_ops() -> list:
    return sorted(m[4:] for m in dir(TorchGraph) if m.startswith("_op_"))


# ----------------------------------------------------------------------------------------
# helpers


def _to_torch(values) -> torch.Tensor:
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return torch.tensor(arr.astype(np.float32))
    if arr.dtype.kind in "iu":
        # Integer grids (quantized weights, zero points) are computed with in float.
        if arr.dtype.itemsize <= 2:
            return torch.tensor(arr.astype(np.float32))
        return torch.tensor(arr.astype(np.int64))
    if arr.dtype == np.bool_:
        return torch.tensor(arr)
    raise UnsupportedError(f"recover: constant of dtype {arr.dtype} is not supported")


def _per_axis(t, x, axis):
    """Broadcast a per-channel quantization parameter along ``axis`` of ``x``."""
    if t is None or t.dim() == 0 or t.numel() == 1:
        return t.reshape(()) if t is not None else None
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def _torch_pads(pads):
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> torch F.pad order (last dim first)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _same_pads(in_sp, k_sp, strides, dil, mode):
    begins, ends = [], []
    for n, k, s, d in zip(in_sp, k_sp, strides, dil):
        out = -(-int(n) // s)
        total = max((out - 1) * s + (int(k) - 1) * d + 1 - int(n), 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends
