"""Sub-8-bit weights: ternary (TWN) and binary (BWN) codes, packing and the shared pass body.

In the ONNX model a low-bit layer's weight is an int8 code tensor (values in {-1, 0, 1}
or {-1, 1}) read by ``DequantizeLinear(codes, α, 0, axis=0)`` with α per output
channel, so ONNX Runtime runs it unchanged. The artifact also holds the same codes
packed at 2 or 1 bit per weight (``packed_weights.npz``), and the pass reports the true
storage size: the model with those code tensors replaced by their packed form.

Scales α are rounded to float16 (what the packed file stores) and the ONNX model uses
exactly those values, so the packed file and the model dequantize identically.
"""

from __future__ import annotations

import json

import numpy as np

from . import qdq


def _per_channel(w: np.ndarray) -> np.ndarray:
    """(C_out, rest) view of a weight whose output channels are axis 0."""
    return w.reshape(w.shape[0], -1)


def ternarize(w: np.ndarray, threshold: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """TWN (Li & Liu 2016), per output channel c (axis 0):
    Δ_c = t·mean|W_c|, codes = sign(W)·[|W| > Δ_c], α_c = mean of |W| over the kept weights."""
    flat = _per_channel(w.astype(np.float64))                     # (C, K)
    a = np.abs(flat)
    delta = threshold * a.mean(1, keepdims=True)                  # (C, 1)
    keep = a > delta
    alpha = (a * keep).sum(1) / np.maximum(keep.sum(1), 1)        # (C,)
    codes = (np.sign(flat) * keep).astype(np.int8)
    return codes.reshape(w.shape), _fp16_exact(alpha)


def binarize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BWN (Rastegari et al. 2016): codes = sign(W) (0 → +1), α_c = mean|W_c|."""
    flat = _per_channel(w.astype(np.float64))
    alpha = np.abs(flat).mean(1)
    codes = np.where(flat >= 0, 1, -1).astype(np.int8)
    return codes.reshape(w.shape), _fp16_exact(alpha)


def _fp16_exact(alpha: np.ndarray) -> np.ndarray:
    """float32 α holding float16-representable values (zero channels get α = 1)."""
    alpha = np.where(alpha > 0, alpha, 1.0)
    return alpha.astype(np.float16).astype(np.float32)


def pack_layers(layers: list) -> tuple[bytes, dict]:
    """``layers``: [(name, codes int8, alpha float32, bits)] → (npz bytes, sizes).

    npz keys: ``L<i>.codes`` (packed uint8), ``L<i>.alpha`` (float16, per output channel),
    ``L<i>.shape`` (int64) and ``index`` (JSON: name, bits, key per layer)."""
    arrays, index = {}, []
    packed_bytes = alpha_bytes = 0
    for i, (name, codes, alpha, bits) in enumerate(layers):
        packed = qdq.pack_bits(codes, bits)
        a16 = alpha.astype(np.float16)
        arrays[f"L{i}.codes"] = packed
        arrays[f"L{i}.alpha"] = a16
        arrays[f"L{i}.shape"] = np.asarray(codes.shape, np.int64)
        index.append({"name": name, "bits": bits, "key": f"L{i}", "axis": 0})
        packed_bytes += packed.nbytes
        alpha_bytes += a16.nbytes
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), np.uint8)
    return qdq.npz_bytes(arrays), {"packed_bytes": packed_bytes, "alpha_bytes": alpha_bytes}


def unpack_layers(data: bytes) -> dict:
    """Inverse of :func:`pack_layers`: {name: (codes int8, alpha float32)}."""
    import io

    z = np.load(io.BytesIO(data))
    out = {}
    for entry in json.loads(bytes(z["index"]).decode()):
        k = entry["key"]
        shape = tuple(int(d) for d in z[f"{k}.shape"])
        codes = qdq.unpack_bits(z[f"{k}.codes"], entry["bits"], int(np.prod(shape)))
        out[entry["name"]] = (codes.reshape(shape), z[f"{k}.alpha"].astype(np.float32))
    return out


# ---- the shared body of the ternary and binary passes --------------------------------

from onnxc.pipeline import Pass  # noqa: E402  (pass machinery after the numerics)


class LowBitPass(Pass):
    """Replace Conv/Gemm/MatMul weights by low-bit codes; subclasses set ``bits``/``encode``."""

    order = 60
    exact = False
    bits = 2
    label = ""
    options = qdq.SHARED_OPTIONS

    def encode(self, w: np.ndarray):
        raise NotImplementedError

    def run(self, graph, ctx, report):
        qdq.require_qdq_opset(graph, self.name)
        if not qdq.per_channel_ok(graph):
            report.note(f"opset {graph.opset}: per-channel α applied by a Mul after a "
                        f"per-tensor DequantizeLinear (no axis before opset 13)")
        graph.name_nodes()
        qdq.report_vendor_nodes(graph, report, self.name)
        prequantized = qdq.report_prequantized(graph, report)
        weighted = qdq.weighted_layers(graph)
        if not weighted and prequantized:
            from onnxc.errors import UnsupportedError

            raise UnsupportedError(f"{self.name}: every weighted layer is already quantized "
                                   f"({prequantized} integer or DequantizeLinear-weight "
                                   f"layer(s)); re-quantizing would round twice")
        keep = qdq.resolve_keep(self.config.keep_float, weighted, "first,last")
        candidates = [n.name for n in weighted if n.name not in keep]
        fallback = []
        if self.config.max_drop is not None:
            from .mixed import fallback_until

            # Higher precision for a sensitive layer = int8 per-channel weights.
            fallback = fallback_until(
                graph, ctx, report, candidates,
                lambda fb: self._build(graph.copy(), candidates, set(fb), ctx)[0],
                self.config.max_drop, "int8 weights")
        result, layers = self._build(graph, candidates, set(fallback), ctx)
        for name in sorted(keep):
            report.skip(name, "kept in float (--keep-float; first/last by default)")
        data, sizes = pack_layers(layers)
        report.files["packed_weights.npz"] = data
        self._report_storage(result, layers, sizes, fallback, report)
        if self.config.format == "qonnx":
            from .qonnx import to_qonnx

            report.files["model_qonnx.onnx"] = to_qonnx(result).SerializeToString()
            report.note("QONNX export written to model_qonnx.onnx")
        return result

    def _build(self, graph, candidates, fallback: set, ctx):
        """Quantize ``graph`` in place; returns (graph, [(name, codes, alpha, bits)])."""
        nodes = {n.name: n for n in graph.nodes}
        layers = []
        for name in candidates:
            node = nodes[name]
            axis = qdq.weight_axis(graph, node)
            axis = 0 if axis is None else axis
            w = graph.constant(node.inputs[1])
            if name in fallback:
                codes, scale = qdq.quantize_weight(w, axis, 127)
                node.inputs[1] = qdq.weight_dq(graph, name + "_W", codes, scale, axis)
                continue
            codes, alpha = self.encode(np.moveaxis(w, axis, 0))
            codes = np.moveaxis(codes, 0, axis)
            node.inputs[1] = qdq.weight_dq(graph, name + "_W", codes, alpha, axis)
            self.rewrite_input(graph, node, ctx)
            layers.append((name, np.ascontiguousarray(np.moveaxis(codes, axis, 0)),
                           alpha, self.bits))
        return graph, layers

    def rewrite_input(self, graph, node, ctx) -> None:
        """Hook for activation binarization (binary pass)."""

    def _report_storage(self, graph, layers, sizes, fallback, report) -> None:
        code_bytes = sum(c.size for _, c, _, _ in layers)      # int8 codes in the model
        fp32_bytes = 4 * code_bytes
        alpha32 = sum(4 * a.size for _, _, a, _ in layers)
        # Measure what compress will measure: the refreshed graph (with value_info).
        model_bytes = graph.copy().refresh().to_onnx().ByteSize()
        low = sizes["packed_bytes"] + sizes["alpha_bytes"]
        storage = model_bytes - code_bytes - alpha32 + low
        report.changed = len(layers)
        report.extra.update({
            "bits": self.bits, "layers": [n for n, *_ in layers],
            "int8_fallback": sorted(fallback),
            "quantized_weight_params": code_bytes,
            "quantized_fp32_bytes": fp32_bytes,
            "quantized_packed_bytes": low,
            "quantized_layers_cr": round(fp32_bytes / max(low, 1), 3),
            "model_bytes_int8_codes": model_bytes,
            "storage_bytes": int(storage),
        })
        report.note(f"{len(layers)} layers {self.label} ({code_bytes:,} weights): "
                    f"{fp32_bytes:,} B fp32 -> {low:,} B packed "
                    f"({fp32_bytes / max(low, 1):.1f}x); true storage {storage:,} B")
