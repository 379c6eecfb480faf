"""QDQ → integer lowering of the Relax module TVM's ONNX importer produces.

The importer turns every QuantizeLinear/DequantizeLinear into ``R.quantize`` /
``R.dequantize`` around *float* convolutions, matmuls and adds, so an int8 QDQ model
runs float kernels (and TVM legalizes each quantize with its scale baked in as a
literal, making every layer its own tuning task). This rewrite replaces

    quantize( [relu]( conv2d(dequantize(x_q), dequantize(W_q)) [+ dequantize(b_q)] ) )
    quantize( [relu]( matmul(dequantize(x_q), [permute_dims](dequantize(W_q))) [+ b] ) )
    quantize( [relu]( dequantize(a_q) + dequantize(b_q) ) )            (residual Add)

by integer arithmetic on the quantized tensors:

    acc  = conv2d(x_q, W_q, out_dtype="int32") + b'        uint8/int8 x int8 -> int32
    y_q  = clip(round(float(acc) * M[c]) + z_y, lo, hi)     requantize epilogue

with ``b' = b_q - z_x * sum(W_q[c])`` (the input zero point folded into the int32 bias;
with a non-zero ``z_x`` and padding, the input is padded with ``z_x`` explicitly, as in
QDQ semantics the padded value is the real 0) and ``M[c] = s_x * s_w[c] / s_y``
computed in float32.

Requantization: float multiply + round-half-even, not a fixed-point multiplier and
shift, because that is what ONNX Runtime's integer kernels do (MLAS's
``MlasRequantizeOutput`` multiplies the int32 accumulator by the float32 scale
``s_x*s_w/s_y``, clamps, and rounds to nearest even; ``QLinearAdd`` likewise computes
``(a-z_a)*s_a/s_y + (b-z_b)*s_b/s_y`` in float): matching ORT's arithmetic keeps the
TVM artifact within one quantization step of ORT by construction, where a 31-bit
fixed-point multiplier would round differently on some elements. It also costs no
int64 on 32-bit targets, and the float conversion vectorizes on every CPU here.

The per-channel scale ``M`` and zero point ``z_y`` are passed as (1, C, 1, 1)
*tensors*, not scalars: Relax legalizes scalar constants into literals inside the
fused kernel, which would make each layer's conv kernel structurally unique. As
tensors they are kernel arguments, so convolutions of the same shape share one
tuning task whatever their scales.

Anything that does not match exactly (non-constant or non-zero weight zero points,
per-channel activation scales, other layouts) is left as the importer wrote it
(float QDQ arithmetic) and counted in :class:`LoweringReport.skipped`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
# Name of the packed integer convolution kernel (and of every fused kernel around it):
# its weight is packed at compile time already (see tuning.prepare_module).
PACKED_CONV = "conv2d_nhwc_packed"


@dataclass
class LoweringReport:
    conv: int = 0
    matmul: int = 0
    add: int = 0
    skipped: dict = field(default_factory=dict)   # reason -> count

    @property
    def lowered(self) -> int:
        return self.conv + self.matmul + self.add

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {"conv": self.conv, "matmul": self.matmul, "add": self.add,
                "skipped": dict(self.skipped)}

    def summary(self) -> str:
        text = (f"{self.lowered} QDQ patterns lowered to integer kernels "
                f"({self.conv} conv, {self.matmul} matmul, {self.add} add)")
        if self.skipped:
            text += "; left in float: " + ", ".join(f"{n} {r}" for r, n in
                                                    sorted(self.skipped.items()))
        return text


def has_qdq(mod) -> bool:
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, __import__("tvm").ir.Op) \
                and expr.op.name in ("relax.quantize", "relax.dequantize"):
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def lower_qdq(mod, activation_dtype: str | None = None, packing: list | None = None):
    """Rewrite every matched QDQ pattern of ``mod``'s Relax functions into integer ops.

    ``activation_dtype`` ("uint8"/"int8", None: as quantized) is what the convolutions
    and matmuls read: the target's dot-product instruction decides (VNNI and DP4A
    multiply uint8 by int8, ARM's SDOT int8 by int8). A uint8 tensor with zero point z
    is the int8 tensor ``x - 128`` with zero point ``z - 128``: the same real values,
    so the choice changes no result. ``packing``, a list of (o, i) tiles widest first
    (:func:`int_kernels.packing`), makes each convolution an NHWC convolution on a weight packed once, at
    compile time, as [O/o, KH, KW, I/i, o, i] (see :func:`packed_conv2d`), with the
    first tile whose o divides its output channels (else the first, zero-padded).
    Returns ``(module, LoweringReport)``; dead float code is removed.
    """
    from tvm import relax

    report = LoweringReport()
    mutator = _mutator_class()(mod, report)
    mutator.activation_dtype = activation_dtype
    mutator.packing = [tuple(b) for b in packing] if packing else None
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.defs = _definitions(func)
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    mod = mutator.builder_.get()
    if report.lowered:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, report


def _definitions(func) -> dict:
    """var -> bound value, for looking through bindings while matching."""
    from tvm import relax

    defs = {}

    def visit(expr):
        if isinstance(expr, relax.SeqExpr):
            for block in expr.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        defs[binding.var] = binding.value

    relax.analysis.post_order_visit(func, visit)
    return defs


# ----------------------------------------------------------------------------------------
# Matching helpers


def _op(expr, name: str) -> bool:
    from tvm import ir, relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op) \
        and expr.op.name == "relax." + name


class _NoMatch(Exception):
    """Raised with the reason a pattern is left in float."""


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _shape(expr) -> list:
    return [int(d) for d in expr.ty.shape.values]


_MUTATOR = []


def _mutator_class():
    if _MUTATOR:
        return _MUTATOR[0]
    from tvm import ir, relax

    @relax.expr_functor.mutator
    class QDQToInteger(relax.PyExprMutator):
        def __init__(self, mod, report):
            super().__init__(mod)
            self.report = report
            self.defs = {}
            self.activation_dtype = None
            self.packing = None      # [(output block, reduction block)], widest first
            self.converted = {}
            self.nhwc = {}           # NCHW quantized var -> its NHWC twin (packed convs)
            self.current = None

        # -- looking through bindings -------------------------------------------------
        def value(self, expr):
            """The expression bound to ``expr`` (a var), or ``expr`` itself."""
            seen = 0
            while isinstance(expr, relax.Var) and expr in self.defs and seen < 8:
                expr = self.defs[expr]
                seen += 1
            return expr

        def const(self, expr):
            expr = self.value(expr)
            if isinstance(expr, ir.Constant):
                return expr.value.numpy()
            raise _NoMatch("non-constant quantization parameter")

        def dequantized(self, expr):
            """(quantized var, scale array, zero-point array, axis) of a dequantize."""
            call = self.value(expr)
            if not _op(call, "dequantize"):
                raise _NoMatch("operand is not dequantized")
            return (call.args[0], self.const(call.args[1]), self.const(call.args[2]),
                    int(call.attrs.axis))

        def activation(self, expr):
            """A quantized activation: (new var, scale, zero point) with scalar params."""
            q, scale, zp, _ = self.dequantized(expr)
            if scale.size != 1 or zp.size != 1:
                raise _NoMatch("per-channel activation scale")
            if _dtype(q) not in INT_RANGE:
                raise _NoMatch(f"{_dtype(q)} activation")
            return self.visit_expr(q), np.float32(scale.reshape(())), int(zp.reshape(()))

        def weight(self, expr):
            """A constant quantized weight: (int8 array, float32 scale array, axis)."""
            q, scale, zp, axis = self.dequantized(expr)
            w = self.const(q)
            if w.dtype != np.int8:
                raise _NoMatch(f"{w.dtype} weight")
            if np.any(zp != 0):
                raise _NoMatch("non-zero weight zero point")
            return w, scale.astype(np.float32), axis

        def operand(self, x_q, z_x):
            """The activation in the dtype the target's dot product wants (shifted by 128)."""
            want = self.activation_dtype
            have = _dtype(x_q)
            if want is None or want == have:
                return x_q, z_x
            shift = -128 if want == "int8" else 128
            key = (x_q, want)
            if key not in self.converted:
                wide = relax.op.add(relax.op.astype(x_q, "int32"),
                                    relax.const(np.int32(shift)))
                self.converted[key] = self.builder_.emit(relax.op.astype(wide, want))
            return self.converted[key], z_x + shift

        # -- the rewrite --------------------------------------------------------------
        def visit_var_binding_(self, binding):
            value = binding.value
            if _op(value, "quantize"):
                self.current = binding.var
                try:
                    new = self.lower(value)
                except _NoMatch as why:
                    if str(why) != "not a lowered pattern":
                        self.report.skip(str(why))
                    new = None
                if new is not None:
                    self.builder_.emit_normalized(
                        relax.VarBinding(binding.var, self.builder_.normalize(new)))
                    return
            super().visit_var_binding_(binding)

        def lower(self, quant):
            out_dtype = str(quant.attrs.out_dtype)
            if out_dtype not in INT_RANGE:
                raise _NoMatch(f"quantize to {out_dtype}")
            s_y, z_y = self.const(quant.args[1]), self.const(quant.args[2])
            if s_y.size != 1 or z_y.size != 1:
                raise _NoMatch("per-channel output scale")
            s_y, z_y = np.float32(s_y.reshape(())), int(z_y.reshape(()))
            body = self.value(quant.args[0])
            relu = _op(body, "nn.relu")
            if relu:
                body = self.value(body.args[0])
            bias = None
            if _op(body, "add"):
                lhs, rhs = self.value(body.args[0]), self.value(body.args[1])
                if _op(lhs, "dequantize") and _op(rhs, "dequantize"):
                    return self.lower_add(body, s_y, z_y, out_dtype, relu)
                if _op(lhs, "nn.conv2d") or _op(lhs, "matmul"):
                    body, bias = lhs, body.args[1]
                elif _op(rhs, "nn.conv2d") or _op(rhs, "matmul"):
                    body, bias = rhs, body.args[0]
                else:
                    raise _NoMatch("not a lowered pattern")
            if _op(body, "nn.conv2d"):
                return self.lower_conv(body, bias, s_y, z_y, out_dtype, relu)
            if _op(body, "matmul"):
                return self.lower_matmul(body, bias, s_y, z_y, out_dtype, relu)
            raise _NoMatch("not a lowered pattern")

        def int_bias(self, bias, channels: int, acc_scale: np.ndarray) -> np.ndarray:
            """The bias as int32 in units of the accumulator (s_x * s_w)."""
            if bias is None:
                return np.zeros(channels, np.int64)
            expr = self.value(bias)
            if _op(expr, "reshape"):
                expr = self.value(expr.args[0])
            if _op(expr, "dequantize"):
                b_q, b_s, b_z, _ = self.dequantized(expr)
                b_q = self.const(b_q)
                if b_q.dtype == np.int32 and not np.any(b_z) and np.allclose(
                        np.broadcast_to(b_s, acc_scale.shape), acc_scale, rtol=1e-5):
                    # ONNX Runtime adds the int32 bias as it is: so do we
                    return b_q.reshape(-1).astype(np.int64)
                b = (b_q.astype(np.float64) - b_z) * b_s
            elif isinstance(expr, ir.Constant):
                b = expr.value.numpy().astype(np.float64)
            else:
                raise _NoMatch("non-constant bias")
            b = np.broadcast_to(b.reshape(-1), (channels,))
            return np.round(b / acc_scale).astype(np.int64)

        def requantize(self, acc, multiplier, z_y, out_dtype, relu, channel_shape):
            """int32 accumulator -> quantized output, as ONNX Runtime's MLAS does it."""
            lo, hi = INT_RANGE[out_dtype]
            mult = relax.const(multiplier.astype(np.float32).reshape(channel_shape))
            zero = relax.const(np.full(channel_shape, z_y, np.float32))
            x = relax.op.multiply(relax.op.astype(acc, "float32"), mult)
            x = relax.op.add(relax.op.round(x), zero)
            if relu:   # relu then quantize == clamp at the zero point
                x = relax.op.maximum(x, zero)
            x = relax.op.clip(x, relax.prim_value(float(lo)), relax.prim_value(float(hi)))
            return relax.op.astype(x, out_dtype)

        def lower_conv(self, conv, bias, s_y, z_y, out_dtype, relu):
            attrs = conv.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" \
                    or str(attrs.out_layout) != "NCHW":
                raise _NoMatch("conv layout other than NCHW/OIHW")
            x_q, s_x, z_x = self.activation(conv.args[0])
            w, s_w, axis = self.weight(conv.args[1])
            cout = w.shape[0]
            if s_w.size not in (1, cout) or (s_w.size > 1 and axis != 0):
                raise _NoMatch("weight scale not per output channel")
            s_w = np.broadcast_to(s_w.reshape(-1), (cout,)).astype(np.float32)
            acc_scale = (s_x * s_w).astype(np.float32)
            b = self.int_bias(bias, cout, acc_scale.astype(np.float64))
            # ONNX Runtime: output_scale[c] = x_scale * w_scale[c] / y_scale in float32
            multiplier = (s_x * s_w / s_y).astype(np.float32)
            padding = [int(p) for p in attrs.padding]
            strides = [int(v) for v in attrs.strides]
            dilation = [int(d) for d in attrs.dilation]
            # the widest tile that divides the output channels, else the widest (padded)
            block = next((b for b in self.packing or [] if cout % b[0] == 0),
                         self.packing[0] if self.packing else None)
            if block and int(attrs.groups) == 1:
                nhwc, z_x = self.operand(self.as_nhwc(x_q), z_x)
                b = b - z_x * w.reshape(cout, -1).astype(np.int64).sum(1)
                # Channel counts the intrinsic's tile does not divide (pruned layers, the
                # 3-channel stem) are padded with zero weights: extra input channels
                # then contribute nothing whatever they hold, extra outputs are cut off.
                cin = w.shape[1]
                o_pad, i_pad = -cout % block[0], -cin % block[1]
                if i_pad:
                    nhwc = self.builder_.emit(relax.op.nn.pad(
                        nhwc, [0, 0, 0, 0, 0, 0, 0, i_pad], "constant", float(z_x)))
                w_full = np.pad(w, [(0, o_pad), (0, i_pad), (0, 0), (0, 0)])
                acc = self.builder_.emit_te(
                    packed_conv2d, nhwc, relax.const(pack_weight(w_full, *block)), strides,
                    padding, dilation, z_x, primfunc_name_hint=PACKED_CONV + "_int8")
                if o_pad:
                    acc = relax.op.strided_slice(acc, axes=[3], begin=[0], end=[cout])
                acc = relax.op.add(acc, relax.const(_int32(b).reshape(1, 1, 1, cout)))
                out = self.builder_.emit(self.requantize(acc, multiplier, z_y, out_dtype, relu,
                                                         (1, 1, 1, cout)))
                self.nhwc[self.current] = out
                self.report.conv += 1
                return relax.op.permute_dims(out, [0, 3, 1, 2])
            x_q, z_x = self.operand(x_q, z_x)
            b = b - z_x * w.reshape(cout, -1).astype(np.int64).sum(1)
            if z_x != 0 and any(padding):
                top, left, bottom, right = padding
                x_q = self.builder_.emit(relax.op.nn.pad(
                    x_q, [0, 0, 0, 0, top, bottom, left, right], "constant", float(z_x)))
                padding = [0, 0, 0, 0]
            acc = self.builder_.emit(relax.op.nn.conv2d(
                x_q, relax.const(w), strides=strides, padding=padding, dilation=dilation,
                groups=int(attrs.groups), out_dtype="int32"))
            acc = relax.op.add(acc, relax.const(_int32(b).reshape(1, cout, 1, 1)))
            self.report.conv += 1
            return self.requantize(acc, multiplier, z_y, out_dtype, relu, (1, cout, 1, 1))

        def lower_matmul(self, mm, bias, s_y, z_y, out_dtype, relu):
            x_q, s_x, z_x = self.activation(mm.args[0])
            wexpr = self.value(mm.args[1])
            x_q, z_x = self.operand(x_q, z_x)
            if _op(wexpr, "permute_dims"):
                axes = wexpr.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    raise _NoMatch("matmul weight permutation")
                w, s_w, axis = self.weight(wexpr.args[0])
                if w.ndim != 2:
                    raise _NoMatch("matmul weight not 2-D")
                w, axis = w.T, 1 - axis if s_w.size > 1 else 1
            else:
                w, s_w, axis = self.weight(wexpr)
                if w.ndim != 2:
                    raise _NoMatch("matmul weight not 2-D")
            n = w.shape[1]
            if s_w.size not in (1, n) or (s_w.size > 1 and axis != 1):
                raise _NoMatch("weight scale not per output column")
            if len(_shape(x_q)) < 2:
                raise _NoMatch("matmul input rank")
            s_w = np.broadcast_to(s_w.reshape(-1), (n,)).astype(np.float32)
            acc_scale = (s_x * s_w).astype(np.float32)
            b = self.int_bias(bias, n, acc_scale.astype(np.float64))
            b = b - z_x * w.astype(np.int64).sum(0)
            acc = self.builder_.emit(relax.op.matmul(
                x_q, relax.const(np.ascontiguousarray(w)), out_dtype="int32"))
            acc = relax.op.add(acc, relax.const(_int32(b)))
            multiplier = (s_x * s_w / s_y).astype(np.float32)
            self.report.matmul += 1
            return self.requantize(acc, multiplier, z_y, out_dtype, relu, (n,))

        def as_nhwc(self, q):
            """The NHWC twin of an NCHW quantized var (one transpose if it has none)."""
            if q not in self.nhwc:
                self.nhwc[q] = self.builder_.emit(relax.op.permute_dims(q, [0, 2, 3, 1]))
            return self.nhwc[q]

        def lower_add(self, add, s_y, z_y, out_dtype, relu):
            a_q, s_a, z_a = self.activation(add.args[0])
            b_q, s_b, z_b = self.activation(add.args[1])
            if _shape(a_q) != _shape(b_q):
                raise _NoMatch("broadcasting add")
            shape = _shape(a_q)
            # constants as channel tensors, not scalars: kept out of the kernel's identity
            # (the add is usually fused into the preceding conv's kernel)
            channel = (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) >= 2 else \
                tuple(shape)
            # Stay NHWC when either operand comes from a packed conv. A residual add
            # whose other operand is NCHW (a downsampling shortcut: slice + pad in float)
            # permutes that one operand, so the add's output - and every block after it
            # - keeps the packed convs' layout: left NCHW, each later add cost two
            # transposes of a full activation (22% of ResNet-56's int8 kernel time).
            nhwc = len(shape) == 4 and (a_q in self.nhwc or b_q in self.nhwc)
            if nhwc:
                a_q, b_q = self.as_nhwc(a_q), self.as_nhwc(b_q)
                channel = (1, 1, 1, shape[1])

            def tensor(value):
                return relax.const(np.full(channel, value, np.float32))

            def scaled(q, s, z):    # (q - z) * s / s_y, as ONNX Runtime's QLinearAdd
                x = relax.op.subtract(relax.op.astype(q, "float32"), tensor(z))
                return relax.op.multiply(x, tensor(np.float32(s) / s_y))

            lo, hi = INT_RANGE[out_dtype]
            zero = tensor(z_y)
            x = relax.op.add(scaled(a_q, s_a, z_a), scaled(b_q, s_b, z_b))
            x = relax.op.add(relax.op.round(x), zero)
            if relu:
                x = relax.op.maximum(x, zero)
            x = relax.op.clip(x, relax.prim_value(float(lo)), relax.prim_value(float(hi)))
            self.report.add += 1
            if nhwc:
                out = self.builder_.emit(relax.op.astype(x, out_dtype))
                self.nhwc[self.current] = out
                return relax.op.permute_dims(out, [0, 3, 1, 2])
            return relax.op.astype(x, out_dtype)

    _MUTATOR.append(QDQToInteger)
    return QDQToInteger


def pack_weight(w: np.ndarray, o: int, i: int) -> np.ndarray:
    """OIHW int8 -> [O/o, KH, KW, I/i, o, i]: each (o x i) tile one intrinsic operand."""
    cout, cin, kh, kw = w.shape
    tiles = w.transpose(0, 2, 3, 1).reshape(cout // o, o, kh, kw, cin // i, i)
    return np.ascontiguousarray(tiles.transpose(0, 2, 3, 4, 1, 5))


def packed_conv2d(data, weight, strides, padding, dilation, zero_point):
    """NHWC x packed weight -> NHWC int32, written the way dot-product intrinsics match.

    MetaSchedule's auto-tensorization needs the intrinsic's operands as compact tiles:
    the input's innermost 4 channels (A[4]) and an (o x i) weight tile (B[o, i]). On the
    importer's NCHW/OIHW conv (or NHWC/OHWI) the weight tile is strided, and
    tensorization fails ("The workload cannot be tensorized" / "read buffers regions do
    not match"); this is the packed-GEMM form that tensorizes (as TVM's dense_vnni).
    Padding uses the input zero point (the real 0 of QDQ semantics).
    """
    from tvm import te, topi

    n, h, w, c = (int(d) for d in data.shape)
    oo, kh, kw, io, ob, ib = (int(d) for d in weight.shape)
    top, left, bottom, right = padding
    if any(padding):
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0],
                           pad_value=zero_point, name="pad_zero_point")
    sh, sw = strides
    dh, dw = dilation
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute(
        (n, oh, ow, oo * ob),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + ry * dh, x * sw + rx * dw, rc].astype("int32")
            * weight[o // ob, ry, rx, rc // ib, o % ob, rc % ib].astype("int32"),
            axis=[ry, rx, rc]),
        name=PACKED_CONV)


def _int32(values: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    if values.min(initial=0) < info.min or values.max(initial=0) > info.max:
        raise _NoMatch("bias out of int32 range")
    return values.astype(np.int32)
