"""Building blocks of the QDQ format shared by the int8, ternary and binary passes.

Conventions (documented for users in docs/quantization.md). Every tensor the passes add
is named ``<base>_<role>`` with a short base (int8: ``a<k>`` per quantized activation,
``w<j>``/``b<j>`` per layer's weight/bias), roles ``_q`` codes, ``_s`` scale, ``_z`` zero
point, ``_dq`` dequantized float; a Q/DQ node is named after its output. Short names
matter: ResNet-56 has ~300 Q/DQ nodes and every name is stored several times, which cost
5 % of the int8 file with names derived from the original tensors.
- an activation tensor T is quantized by ``T → QuantizeLinear(s, zp) → DequantizeLinear(s, zp)``;
  every consumer of T reads the DequantizeLinear output;
- a weight is an int8 initializer read by ``DequantizeLinear(codes, scale[, zp], axis=<output
  channel axis>)``; scales are float32 vectors; the zero point (all zeros, the ONNX default)
  is only stored where ONNX Runtime's fusion needs it (Gemm/MatMul → QGemm);
- a bias is an int32 initializer with scale ``s_input · s_weight`` (per channel) and no
  zero point, read through its own DequantizeLinear (what ONNX Runtime fuses into
  QLinearConv / QGemm).
"""

from __future__ import annotations

import platform

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.options import Option, non_negative

# Options every quantization pass (int8, ternary, binary) shares: declared once here.
SHARED_OPTIONS = (
    Option("--keep-float", str, None,
           "layers left in float: first,last,none or node names "
           "(int8 default: none; ternary/binary default: first,last)"),
    Option("--max-drop", non_negative, None,
           "mixed precision: top-1 drop budget (pt) on labelled data (unlabelled: "
           "argmax agreement with the original, per output position); the most "
           "sensitive layers fall back to higher precision until it holds"),
    Option("--format", str, "qdq", "also export QONNX-style Quant nodes "
           "(model_qonnx.onnx) for FPGA toolflows", choices=("qdq", "qonnx")),
)


def has_vnni() -> bool:
    """True when this CPU has VNNI (or is not x86): u8·s8 dot products then cannot saturate."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def weight_qmax(reduce_range: bool) -> int:
    """Largest int8 weight code. With reduced range (7 bit) |w1|+|w2| ≤ 126, so a u8·s8 pair
    sum 255·126 fits int16: the AVX2 VPMADDUBSW kernel of ONNX Runtime cannot saturate."""
    return 63 if reduce_range else 127


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = 127,
                    pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weight quantization.

    ``axis`` is the output-channel axis (per-channel scales, shape (C,)) or None (one
    scale, shape ()). Returns (codes int8 like w, scales float32)."""
    w = np.asarray(w, np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), np.float64)
    else:
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if pow2:
        scale = 2.0 ** np.ceil(np.log2(scale))
    scale = scale.astype(np.float32)
    codes = np.clip(np.round(w / _expand(scale, w.ndim, axis)), -qmax, qmax).astype(np.int8)
    return codes, scale


def _const(graph, name: str, values: np.ndarray) -> gs.Constant:
    """Constant that keeps 0-d arrays 0-d (``Graph.make_constant`` makes them 1-d, and ONNX
    Runtime fuses QLinearAdd & co only for truly scalar scales / zero points)."""
    return gs.Constant(graph.unique_name(name), np.array(values, copy=True))


def _expand(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ndim tensor."""
    if axis is None or np.ndim(v) == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def dequantize(codes: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    return codes.astype(np.float32) * _expand(scale, codes.ndim, axis)


def weight_dq(graph, base: str, codes: np.ndarray, scale: np.ndarray,
              axis: int | None, zero_point: bool = True) -> gs.Variable:
    """Float output of ``DequantizeLinear(codes, scale[, 0], axis)``, node added to the graph.
    ``zero_point=False`` leaves out the all-zero zero point (the ONNX default)."""
    out = graph.make_variable(base + "_dq", dtype=np.float32, shape=list(codes.shape))
    per_channel = axis is not None and scale.ndim == 1
    if per_channel and not per_channel_ok(graph):
        # Below opset 13 DequantizeLinear has no axis: codes · 1.0, then · scale[axis].
        codes_f = graph.make_variable(base + "_dq1", dtype=np.float32,
                                      shape=list(codes.shape))
        inputs = [_const(graph, base + "_q", codes),
                  _const(graph, base + "_one", np.array(1.0, np.float32))]
        if zero_point:
            inputs.append(_const(graph, base + "_z", np.array(0, codes.dtype)))
        graph.gs.nodes.append(gs.Node("DequantizeLinear", codes_f.name, inputs=inputs,
                                      outputs=[codes_f]))
        graph.gs.nodes.append(gs.Node(
            "Mul", out.name, outputs=[out],
            inputs=[codes_f, _const(graph, base + "_s", _expand(scale, codes.ndim, axis))]))
        return out
    attrs = {"axis": int(axis)} if per_channel else {}
    inputs = [_const(graph, base + "_q", codes), _const(graph, base + "_s", scale)]
    if zero_point:
        inputs.append(_const(graph, base + "_z", np.zeros(scale.shape, codes.dtype)))
    graph.gs.nodes.append(gs.Node("DequantizeLinear", out.name, attrs=attrs, inputs=inputs,
                                  outputs=[out]))
    return out


# 4-bit weights (int8 --int4-weights): codes in [-7, 7] stored as an INT4 initializer
# (two per byte in the file) and read by Cast(INT8) -> DequantizeLinear. ONNX Runtime's
# CPU EP does not fuse DequantizeLinear(INT4) -> Conv into QLinearConv (the weight would
# be dequantized on every run, 2.3x slower measured on a 64x64 3x3 conv); a Cast of a
# constant is folded at session load, and the int8 DequantizeLinear it leaves fuses as
# usual. INT4 and Cast to/from it need opset 21.
INT4_QMAX, INT4_OPSET = 7, 21
INT4_CLIP_GRID = np.linspace(0.5, 1.0, 26)


def quantize_weight_int4(w: np.ndarray, axis: int | None, clip: str = "mse"
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit weight codes (int8 array, values in [-7, 7]) and float32 scales,
    per output channel along ``axis`` (or one scale). ``clip="mse"``: each channel's
    scale is the clipping of its range (a grid of 0.5..1.0 times max|w|) that minimises
    the channel's squared rounding + clipping error; at 4 bits clipping a few outliers
    buys finer steps for the rest (typically 20-40 % less error than max|w|)."""
    w = np.asarray(w, np.float32)
    flat = (w.reshape(1, -1) if axis is None
            else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).astype(np.float64)
    amax = np.abs(flat).max(1)
    amax = np.where(amax > 0, amax, 1.0)
    ratios = INT4_CLIP_GRID if clip == "mse" else np.array([1.0])
    best_err = np.full(len(flat), np.inf)
    best = amax / INT4_QMAX
    for r in ratios:
        s = (r * amax / INT4_QMAX)[:, None]
        err = ((np.clip(np.round(flat / s), -INT4_QMAX, INT4_QMAX) * s - flat) ** 2).sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s[:, 0], best)
    scale = best.astype(np.float32)
    if axis is None:
        scale = scale.reshape(())
    codes = np.clip(np.round(w / _expand(scale, w.ndim, axis)), -INT4_QMAX, INT4_QMAX)
    return codes.astype(np.int8), scale


def int4_ok(graph) -> bool:
    return graph.opset >= INT4_OPSET


def weight_dq_int4(graph, base: str, codes: np.ndarray, scale: np.ndarray,
                   axis: int | None, zero_point: bool = True) -> gs.Variable:
    """Like :func:`weight_dq` for codes in [-7, 7] stored as INT4: the initializer is
    4-bit, a Cast makes it int8 (folded by ONNX Runtime at load), the DequantizeLinear
    is weight_dq's own. The graph's opset must be >= 21 (:func:`int4_ok`)."""
    import ml_dtypes

    assert int4_ok(graph), "INT4 weights need opset 21"
    assert np.abs(codes).max(initial=0) <= INT4_QMAX
    packed = _const(graph, base + "_q4", np.asarray(codes).astype(ml_dtypes.int4))
    as_int8 = graph.make_variable(base + "_q", dtype=np.int8, shape=list(codes.shape))
    graph.gs.nodes.append(gs.Node("Cast", as_int8.name, attrs={"to": 3},   # INT8
                                  inputs=[packed], outputs=[as_int8]))
    out = graph.make_variable(base + "_dq", dtype=np.float32, shape=list(codes.shape))
    per_channel = axis is not None and np.ndim(scale) == 1
    attrs = {"axis": int(axis)} if per_channel else {}
    inputs = [as_int8, _const(graph, base + "_s", scale)]
    if zero_point:
        inputs.append(_const(graph, base + "_z", np.zeros(np.shape(scale), np.int8)))
    graph.gs.nodes.append(gs.Node("DequantizeLinear", out.name, attrs=attrs, inputs=inputs,
                                  outputs=[out]))
    return out


def bias_dq(graph, base: str, bias: np.ndarray, x_scale: float,
            w_scale: np.ndarray) -> gs.Variable | None:
    """int32 bias through DequantizeLinear with scale s_x·s_w (per channel, or one scalar
    when ``w_scale`` is a scalar); None if it would overflow."""
    scale = (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)
    codes = np.round(bias.astype(np.float64) / np.broadcast_to(scale, bias.shape))
    if np.any(np.abs(codes) > 2**31 - 1):
        return None
    # No zero point: int32 zeros would cost 4 bytes per channel, ORT fuses without it.
    return weight_dq(graph, base, codes.astype(np.int32), scale,
                     0 if scale.ndim else None, zero_point=False)


# QuantizeLinear/DequantizeLinear exist from opset 10; their ``axis`` (per-channel scales)
# from opset 13. The frontend upgrades older models to 13; these guard models it could not.
QDQ_OPSET, AXIS_OPSET = 10, 13


def per_channel_ok(graph) -> bool:
    """True if DequantizeLinear takes per-channel scales (``axis``) in this graph's opset."""
    return graph.opset >= AXIS_OPSET


def require_qdq_opset(graph, pass_name: str) -> None:
    """One-line refusal for graphs whose opset has no QuantizeLinear/DequantizeLinear."""
    from onnxc.errors import UnsupportedError

    if graph.opset < QDQ_OPSET:
        raise UnsupportedError(f"{pass_name}: the model's opset {graph.opset} has no "
                               f"QuantizeLinear/DequantizeLinear (opset {QDQ_OPSET}+) and "
                               f"could not be upgraded (see the frontend notes)")


def insert_qdq(graph, tensor: gs.Variable, scale: float, zero_point: int, dtype,
               base: str | None = None) -> gs.Variable:
    """Quantize ``tensor`` in place: every reader now sees DQ(Q(tensor)). Returns the DQ
    output. New names start with ``base`` (default: the tensor's name)."""
    base = base or tensor.name
    s = _const(graph, base + "_s", np.array(scale, np.float32))
    z = _const(graph, base + "_z", np.array(zero_point, dtype))
    q_out = graph.make_variable(base + "_q", dtype=dtype, shape=tensor.shape)
    dq_out = graph.make_variable(base + "_dq", dtype=np.float32, shape=tensor.shape)
    readers = list(tensor.outputs)
    q = gs.Node("QuantizeLinear", q_out.name, inputs=[tensor, s, z], outputs=[q_out])
    dq = gs.Node("DequantizeLinear", dq_out.name, inputs=[q_out, s, z], outputs=[dq_out])
    graph.gs.nodes.extend([q, dq])
    # Only the original readers: the new QuantizeLinear must keep reading the float tensor.
    graph.replace_tensor(tensor, dq_out, consumers=readers)
    return dq_out


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack small signed codes into bytes: 1 bit (−1→0, +1→1) or 2 bit (code+1 ∈ {0,1,2}),
    little-end first within a byte. Returns uint8, ceil(size·bits/8) long."""
    flat = codes.reshape(-1).astype(np.int16)
    if bits == 1:
        return np.packbits((flat > 0).astype(np.uint8), bitorder="little")
    if bits == 2:
        u = (flat + 1).astype(np.uint8)                        # {0, 1, 2}
        u = np.concatenate([u, np.zeros((-len(u)) % 4, np.uint8)]).reshape(-1, 4)
        return (u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)).astype(np.uint8)
    raise ValueError(f"unsupported bit width {bits}")


def unpack_bits(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` → int8 codes (flat, ``size`` long)."""
    if bits == 1:
        b = np.unpackbits(packed, bitorder="little")[:size].astype(np.int8)
        return (2 * b - 1).astype(np.int8)
    if bits == 2:
        u = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)[:size]
        return (u.astype(np.int8) - 1).astype(np.int8)
    raise ValueError(f"unsupported bit width {bits}")


def npz_bytes(arrays: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)   # not compressed: the packed codes are already dense
    return buf.getvalue()


# ---- layer selection shared by the quantization passes -------------------------------

def weight_axis(graph, node) -> int | None | bool:
    """Output-channel axis of a Conv/Gemm/MatMul's constant weight; None for per-tensor;
    False when the node's weight is not a quantizable float constant."""
    if len(node.inputs) < 2:
        return False
    w = graph.constant(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.size == 0:
        return False
    if node.op == "Conv":
        return 0 if w.ndim >= 3 else False
    if node.op == "Gemm":
        if w.ndim != 2 or node.attrs.get("transA", 0):
            return False
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return 1 if w.ndim == 2 else None
    return False


def weighted_layers(graph) -> list:
    """Conv/Gemm/MatMul nodes with a constant float weight, in topological order."""
    return [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")
            and is_standard(n) and weight_axis(graph, n) is not False]


def is_standard(node) -> bool:
    """True for ops of the default ONNX domain (the only ones the passes rewrite)."""
    return node.domain in (None, "", "ai.onnx")


def report_vendor_nodes(graph, report, pass_name: str) -> None:
    """Vendor-domain nodes (ORT contrib ops such as com.microsoft FusedConv) run as they
    are; the pass says it left them alone."""
    for node in graph.nodes:
        if not is_standard(node) and prequantized_reason(graph, node) is None \
                and node.op not in QDQ_OPS:
            report.skip(node.name, f"{node.domain} op {node.op} is not understood by "
                                   f"{pass_name}: left in float as is")


def resolve_keep(spec: str | None, layers: list, default: str, also: list = ()) -> set:
    """Names of layers kept out of quantization from a spec like 'first,last' or node names
    (of ``layers``, or of ``also``: other nodes the pass quantizes, e.g. int8's
    activation-only ops; first/last are always weighted layers)."""
    from onnxc.errors import UsageError

    spec = default if spec is None else spec
    names = [n.name for n in layers]
    others = {n.name for n in also}
    keep = set()
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        if item == "none":
            continue
        if item == "first" and names:
            keep.add(names[0])
        elif item == "last" and names:
            keep.add(names[-1])
        elif item in ("first", "last"):
            continue
        elif item in names or item in others:
            keep.add(item)
        else:
            raise UsageError(f"--keep-float: '{item}' is neither first/last/none nor a "
                             f"quantizable layer name (e.g. {', '.join(names[:3])})")
    return keep


# ---- models that are already quantized ----------------------------------------------

# Integer kernels (ONNX and ORT contrib): their layers are quantized already.
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
               "DynamicQuantizeLSTM", "QuantizeLinear", "DequantizeLinear"}


# Quantization plumbing in any domain (ORT writes com.microsoft Q/DQ for 16-bit types).
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def is_integer_op(node) -> bool:
    return node.op in INTEGER_OPS or node.op.startswith("QLinear")


def already_quantized(graph, tensor) -> bool:
    """True if ``tensor`` is the float view of quantized data (a DequantizeLinear output)
    or is quantized by a reader (QuantizeLinear / DynamicQuantizeLinear): a second Q/DQ
    on it would round twice."""
    producer = graph.producer(tensor)
    if producer is not None and producer.op == "DequantizeLinear":
        return True
    return any(r.op in ("QuantizeLinear", "DynamicQuantizeLinear") for r in tensor.outputs)


def prequantized_reason(graph, node) -> str | None:
    """Why ``node`` is left alone as an already-quantized layer, or None."""
    if is_integer_op(node) and node.op not in ("QuantizeLinear", "DequantizeLinear"):
        return f"already quantized ({node.op})"
    if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1:
        w = node.inputs[1]
        producer = graph.producer(w)
        if producer is not None and producer.op == "DequantizeLinear" \
                and _constant_through_cast(graph, producer.inputs[0]):
            return "already quantized (weight comes through DequantizeLinear)"
    return None


def _constant_through_cast(graph, tensor) -> bool:
    """A constant, or a Cast of one (4-bit codes widened to int8, see weight_dq_int4)."""
    if graph.constant(tensor) is not None:
        return True
    producer = graph.producer(tensor)
    return producer is not None and producer.op == "Cast" \
        and graph.constant(producer.inputs[0]) is not None


def report_prequantized(graph, report) -> int:
    """Report every already-quantized layer as skipped; returns how many."""
    count = 0
    for node in graph.nodes:
        reason = prequantized_reason(graph, node)
        if reason:
            report.skip(node.name, reason)
            count += 1
    return count
