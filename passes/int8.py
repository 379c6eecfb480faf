"""int8: static post-training quantization to the QDQ format ONNX Runtime runs with
integer kernels (QLinearConv, QLinearAdd, QGemm, QLinearGlobalAveragePool, ...).

1. Plan: which nodes are quantized and which activation tensors get a
   QuantizeLinear→DequantizeLinear pair. Conv/Gemm/MatMul/Add/Mul/Concat/pooling are
   quantized; their float activation inputs and their output are quantized. A Relu that
   is the only reader of a quantized output is fused, as ONNX Runtime's own quantizer
   does: the output is quantized with the Relu output's range (uint8, zero point 0 — the
   QuantizeLinear clamps negatives, so the Relu is removed). Data-movement ops
   (MaxPool, Slice, Pad 0, Flatten, Reshape, Transpose, ...) reuse their input's
   scale, so ONNX Runtime drops their Q/DQ and runs them on 8-bit data.
2. Calibrate: one ONNX Runtime pass over the calibration data collects min/max and a
   histogram of every tensor that needs its own scale; the chosen calibrator
   (minmax, percentile, entropy, mse) turns each into a range.
3. Rewrite: weights become int8 initializers (symmetric, per output channel) behind a
   DequantizeLinear with ``axis``; biases int32 with scale s_x·s_w; Q/DQ pairs inserted.

MatMul. A MatMul with a constant weight ([..., K] x [K, N], any activation rank such as
[B, T, C] x [C, D]) is a weighted layer like Gemm: static QDQ, int8 weights per output
column (axis 1), the activation calibrated. A MatMul of two activations (attention QK^T
and AV) has no weight to prepare offline; by default both operands get calibrated QDQ too
(ONNX Runtime runs QLinearMatMul): in a transformer both are bounded — Q, K, V come from
LayerNorm-ed projections, the softmax output lies in [0, 1] — so calibrated ranges hold,
and a static range saves a min/max pass over each operand per run. Where calibration does
not describe the run-time ranges (no representative data, inputs of varying scale), or
there is no calibration at all (``--int8-mode dynamic``), static does not fit: then
``--int8-act-matmul dynamic`` quantizes each operand with its own range at run time
(DynamicQuantizeLinear → MatMulInteger → scale). Measured (tools/bench_quant_models.py,
2-block encoder, random calibration): static 0.9994 and act-matmul dynamic 0.9995 output
cosine vs float; on inputs 3x the calibrated scale both 0.979 (the other, static,
activations dominate), ``--int8-mode dynamic`` 1.0000.

Below opset 13 (a model the frontend could not upgrade) DequantizeLinear has no ``axis``:
weights fall back to per-tensor scales; below opset 10 the pass refuses.
Nodes of vendor domains (ORT contrib ops) are left in float and reported as skipped.
Already-quantized layers (integer ops, weights through DequantizeLinear) are skipped and
reported, and a tensor that is already the output of a DequantizeLinear or the input of
a QuantizeLinear never gets a second Q/DQ.

``--int8-pow2-scales`` makes every scale a power of two and activations int8 with zero
point 0, so requantisation s_x·s_w/s_y is a right shift (dynamic fixed point, VTA).
``--max-drop`` turns on mixed precision: layers are ranked by sensitivity and the most
sensitive fall back to float until top-1 on labelled data is within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxc.calibrate import qdq
from onnxc.calibrate.calibrators import CALIBRATORS, Scheme, clip_range
from onnxc.calibrate.stats import collect
from onnxc.errors import UnsupportedError, UsageError
from onnxc.options import positive_int
from onnxc.pipeline import CalibrationData, Option, Pass, Requirement, register_pass

MAX_CALIB = 512
# Nodes computed in int8 when all their float activation inputs are quantized.
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool",
               "AveragePool"}
# Ops that only move or select values: their output reuses the input's scale/zero point.
MOVE_OPS = {"MaxPool", "Slice", "Pad", "Flatten", "Reshape", "Transpose", "Squeeze",
            "Unsqueeze", "Identity", "Resize", "DepthToSpace", "SpaceToDepth"}


def _is_float_var(graph, tensor) -> bool:
    return graph.constant(tensor) is None and tensor.dtype is not None \
        and np.dtype(tensor.dtype) == np.float32


def _activation_inputs(graph, node) -> list:
    """Float, non-constant inputs that the quantized node reads as activations."""
    if node.op in ("Conv", "Gemm"):
        return [node.inputs[0]]
    if node.op == "MatMul" and qdq.weight_axis(graph, node) is not False:
        return [node.inputs[0]]
    if node.op == "Concat":
        return list(node.inputs)
    return [t for t in node.inputs[:2] if graph.constant(t) is None]


def _quantizable(graph, node) -> str | None:
    """None if ``node`` can be quantized, else the reason it cannot."""
    pre = qdq.prequantized_reason(graph, node)
    if pre:
        return pre
    if not qdq.is_standard(node):
        return f"{node.domain} op {node.op} is not understood by int8: left in float as is"
    if node.op in ("Conv", "Gemm") and qdq.weight_axis(graph, node) is False:
        return "weight is not a constant float tensor (or Gemm has transA)"
    if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0
                              or float(node.attrs.get("beta", 1.0)) != 1.0):
        return "Gemm with alpha/beta ≠ 1"
    if node.op in ("Add", "Mul") and any(graph.constant(t) is not None for t in node.inputs):
        return "constant operand (kept float)"
    plumbing = next((t for t in node.inputs if _from_integer_op(graph, t)), None)
    if plumbing is not None:
        # ConvInteger -> Cast -> Mul(x_scale · w_scale): that Mul is the dequantization
        # of an already-quantized layer, and its scale operand changes every run; a
        # static Q/DQ there would round the layer a second time (ddddocr's dynamically
        # quantized recogniser: centered output cosine 0.34).
        return (f"dequantizes an already-quantized layer ('{plumbing.name}' comes from "
                f"an integer op): kept as is")
    acts = _activation_inputs(graph, node)
    if not acts or not all(_is_float_var(graph, t) for t in acts):
        return "inputs are not float activations"
    if not node.outputs or not _is_float_var(graph, node.outputs[0]):
        return "output is not float"
    if all(qdq.already_quantized(graph, t) for t in acts + [node.outputs[0]]):
        return "already quantized (inputs and output through Q/DQ)"
    return None


# Ops that pass an integer kernel's accumulator or a run-time scale on unchanged.
_DEQUANT_VIEWS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity")


def _from_integer_op(graph, tensor, depth: int = 4) -> bool:
    """True if ``tensor`` is the (cast) accumulator of an integer kernel (ConvInteger,
    MatMulInteger) or a run-time quantization scale (DynamicQuantizeLinear's scale, or
    a product of scales): what the Mul that dequantizes such a layer reads. The
    dequantized result itself is an ordinary float activation."""
    producer = graph.producer(tensor) if tensor is not None else None
    if producer is None or depth == 0:
        return False
    if producer.op == "DynamicQuantizeLinear":
        return tensor is not producer.outputs[0]            # its scale / zero point
    if qdq.is_integer_op(producer) and producer.op not in qdq.QDQ_OPS:
        return True
    acts = [t for t in producer.inputs if graph.constant(t) is None]
    if producer.op in _DEQUANT_VIEWS:
        return any(_from_integer_op(graph, t, depth - 1) for t in acts)
    if producer.op == "Mul":                                  # x_scale · w_scale
        return bool(acts) and all(_is_scale(graph, t, depth - 1) for t in acts)
    return False


def _is_scale(graph, tensor, depth: int) -> bool:
    producer = graph.producer(tensor)
    if producer is None or depth == 0:
        return False
    if producer.op == "DynamicQuantizeLinear":
        return tensor is producer.outputs[1]
    if producer.op in _DEQUANT_VIEWS + ("Mul",):
        acts = [t for t in producer.inputs if graph.constant(t) is None]
        return bool(acts) and all(_is_scale(graph, t, depth - 1) for t in acts)
    return False


def _zero_pad(graph, node) -> bool:
    if node.op != "Pad":
        return True
    if node.attrs.get("mode", "constant") != "constant":
        return True        # reflect/edge copy existing values: the grid is kept
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = graph.constant(node.inputs[2])
        return v is not None and np.all(v == 0)
    return float(node.attrs.get("value", 0.0)) == 0.0


class Plan:
    """What to quantize, by name (valid on any copy of the graph)."""

    def __init__(self, graph, layers: set, signed: bool):
        # tensor name -> name of the tensor whose statistics define its scale
        self.params_from: dict = {}
        self.layers = set()          # quantized node names
        self.fused_relu: dict = {}   # pre-Relu tensor -> Relu node name (removed if unsigned)
        self.skipped: dict = {}      # node name -> reason
        self.int4: set = set()       # layers written with 4-bit weights (apply_plan)
        for node in graph.nodes:
            if node.name not in layers:
                continue
            reason = _quantizable(graph, node)
            if reason and not any(t.dtype is not None and np.dtype(t.dtype) != np.float32
                                  for t in node.outputs):
                self.skipped[node.name] = reason     # shape arithmetic is not news
            if reason:
                continue
            self.layers.add(node.name)
            for t in _activation_inputs(graph, node):
                if not qdq.already_quantized(graph, t):     # never round twice
                    self.params_from.setdefault(t.name, t.name)
            out = node.outputs[0]
            readers = list(out.outputs)
            if qdq.already_quantized(graph, out):
                continue
            if len(readers) == 1 and readers[0].op == "Relu" and not graph.is_graph_output(out):
                relu = readers[0]
                self.fused_relu[out.name] = relu.name
                key = relu.outputs[0].name
                self.params_from[key] = key
                if signed:    # int8 zero point 0: the Relu stays, same scale on both sides
                    self.params_from[out.name] = key
            else:
                self.params_from[out.name] = out.name
        # Tensors with their own statistics before data-movement ops share them: a
        # subset of these layers (float fallback) may need any of them.
        self.own = set(self.params_from.values())
        # Second walk, in topological order: data-movement ops (and Relu with zero
        # point 0) share their input's parameters so the runtime drops their Q/DQ.
        for node in graph.nodes:
            moves = qdq.is_standard(node) and (node.op in MOVE_OPS
                                               or (node.op == "Relu" and signed))
            if not moves or not node.inputs or node.inputs[0].name not in self.params_from:
                continue
            if not _zero_pad(graph, node) or any(o.outputs or graph.is_graph_output(o)
                                                 for o in node.outputs[1:]):
                continue
            if node.outputs[0].name in self.params_from and node.op == "Relu":
                continue     # a fused Relu already carries its own parameters
            if qdq.already_quantized(graph, node.outputs[0]):
                continue     # its reader quantizes it already: never round twice
            self.params_from[node.outputs[0].name] = self.params_from[node.inputs[0].name]

    def stat_tensors(self) -> list:
        return sorted(set(self.params_from.values()) | self.own)


class Int4Target(Requirement):
    """4-bit weights are an ONNX Runtime format here: the TVM/VTA backends take int8
    QDQ only, so a run that asks for both is refused before any pass runs."""

    def check(self, plan, owner):
        spec = owner.config.int4_weights
        backend = getattr(plan.backend, "name", "onnx")
        if spec in (None, "", "none") or backend == "onnx":
            return None
        return (f"int8 --int4-weights: target '{backend}' cannot run 4-bit (INT4) weights; "
                "use --target onnx, or leave --int4-weights out for int8 weights")


def resolve_int4(spec: str | None, layers: list) -> set:
    """Names of the layers with 4-bit weights: 'all', 'none', 'first', 'last' or names."""
    items = [s.strip() for s in str(spec or "none").split(",") if s.strip()]
    if "all" in items:
        return {n.name for n in layers}
    try:
        return qdq.resolve_keep(",".join(items), layers, "none")
    except UsageError as exc:
        raise UsageError(str(exc).replace("--keep-float", "--int4-weights").replace(
            "first/last/none", "all/first/last/none")) from None


@dataclass
class Prepared:
    """Static int8 planned and calibrated: ``build(layers)`` -> (graph, Plan) quantizes
    ``layers`` (node names, a subset of ``candidates``) of ``graph``."""

    graph: object
    weighted: list
    keep: set
    candidates: set
    data: object
    method: str
    scheme: Scheme
    per_channel: bool
    dynamic: list
    ranges: dict
    build: Callable


@register_pass
class Int8(Pass):
    name = "int8"
    summary = "static int8 PTQ (QDQ, per-channel weights, calibrated activations)"
    order = 60
    exact = False
    conflicts = ("ternary", "binary")
    # Static mode calibrates activation ranges; without --calib-data on random inputs.
    requires = (Int4Target(),         # (a refusal before the no-data warning)
                CalibrationData(when=lambda config: config.int8_mode == "static"))
    # The flags had no prefix before; the old spellings stay as aliases.
    options = (
        Option("--int8-calibrator", str, "minmax", "activation range calibrator",
               choices=CALIBRATORS, aliases=("--calibrator",)),
        Option("--int8-percentile", float, 99.99,
               "percentile for --int8-calibrator percentile", aliases=("--percentile",)),
        Option("--int8-pow2-scales", action="store_true", aliases=("--pow2-scales",),
               help="power-of-two scales and int8 zero-point-0 activations (shift requant)"),
        Option("--int8-act-type", str, "auto", "activation type (auto: uint8, int8 with pow2)",
               choices=("auto", "uint8", "int8"), aliases=("--act-type",)),
        Option("--int8-weight-granularity", str, "channel", "int8 weight scales",
               choices=("channel", "tensor"), aliases=("--weight-granularity",)),
        Option("--int8-reduce-range", str, "auto",
               "7-bit weights so u8·s8 kernels cannot saturate (auto: on x86 without VNNI)",
               choices=("auto", "on", "off"), aliases=("--reduce-range",)),
        Option("--int8-bias-correction", str, "on",
               "fold the mean output error of weight rounding into the int32 bias "
               "(per output channel, from the calibration inputs' channel means)",
               choices=("on", "off"), aliases=("--bias-correction",)),
        Option("--int8-act-matmul", str, "static",
               "MatMuls of two activations (attention QK^T, AV): static = calibrated "
               "QDQ on both (QLinearMatMul); dynamic = both operands quantized at run "
               "time (MatMulInteger), for inputs whose range calibration does not cover",
               choices=("static", "dynamic")),
        Option("--int8-mode", str, "static",
               "static: calibrated QDQ; dynamic: int8 weights, activations quantized at "
               "run time (MatMul/Gemm only; for MatMul-heavy models, no data needed)",
               choices=("static", "dynamic")),
        Option("--int8-cle", action="store_true",
               help="cross-layer equalization first (Conv→[Relu]→Conv pairs incl. "
                    "depthwise): balances per-channel weight ranges, exact in float"),
        Option("--int8-adaround", action="store_true",
               help="AdaRound: learn each layer's weight rounding (torch) from the "
                    "calibration data instead of rounding to nearest"),
        Option("--int8-adaround-iters", positive_int, 300,
               "AdaRound optimisation steps per layer"),
        Option("--int4-weights", str, None,
               "layers whose weights are stored in 4 bits (INT4, two per byte; opset 21, "
               "the model is upgraded): all, first, last, none or node names; activations "
               "stay 8-bit, ONNX Runtime widens the weights to int8 at load (same speed)"),
        Option("--int4-clip", str, "mse", "4-bit weight scales per output channel: mse = "
               "the range clipping with least squared error, max = max|w|",
               choices=("mse", "max")),
    ) + qdq.SHARED_OPTIONS

    def validate(self, ctx):
        p = self.config.int8_percentile
        if not 0 < p <= 100:
            raise UsageError(f"--int8-percentile {p} must be in (0, 100]")

    # -- options -------------------------------------------------------------------------
    def _scheme(self):
        cfg = self.config
        pow2 = cfg.int8_pow2_scales
        act = cfg.int8_act_type
        signed = act == "int8" or (act == "auto" and pow2)
        rr = cfg.int8_reduce_range
        reduce = rr == "on" or (rr == "auto" and not qdq.has_vnni())
        return Scheme(signed=signed, pow2=pow2), reduce

    def run(self, graph, ctx, report):
        cfg = self.config
        if cfg.int8_mode == "dynamic":
            return self._dynamic(graph, ctx, report)
        prep = self.prepare(graph, ctx, report)
        graph, weighted, keep, candidates = prep.graph, prep.weighted, prep.keep, \
            prep.candidates
        data, method, scheme, per_channel = prep.data, prep.method, prep.scheme, \
            prep.per_channel
        dynamic, build, ranges = prep.dynamic, prep.build, prep.ranges
        reduce = self._scheme()[1]
        correct = cfg.int8_bias_correction == "on"

        fallback = self.float_fallback(prep, ctx, report) if cfg.max_drop is not None \
            else []
        result, plan = build(candidates - set(fallback))
        for node in graph.nodes:
            if node.name not in candidates and qdq.prequantized_reason(graph, node):
                report.skip(node.name, qdq.prequantized_reason(graph, node))
        if dynamic:
            report.note(f"{len(dynamic)} activation x activation MatMul(s) quantized "
                        f"at run time (DynamicQuantizeLinear + MatMulInteger)")
        report.extra["dynamic_act_matmuls"] = dynamic
        for name, reason in plan.skipped.items():
            report.skip(name, reason)
        for name in sorted(keep):
            report.skip(name, "kept in float (--keep-float)")
        report.changed = len(plan.layers) + len(dynamic)
        already = sum("already quantized" in s["reason"] for s in report.skipped)
        if not report.changed and already:
            report.note(f"nothing left to quantize: {already} layer(s) already quantized, "
                        f"the rest cannot be (see skipped)")
        wq = [n for n in weighted if n.name in plan.layers]
        report.note(f"{len(plan.layers)} nodes quantized ({len(wq)} with quantized weights), "
                    f"{len(plan.params_from)} activation tensors, calibrator {method}, "
                    f"{len(data)} samples{' (RANDOM)' if data.synthetic else ''}")
        int4 = sorted(plan.int4)
        if int4:
            report.note(f"{len(int4)} of {len(wq)} layers with 4-bit weights (INT4 "
                        f"initializers, {cfg.int4_clip} scales per "
                        f"{'channel' if per_channel else 'tensor'}; Cast to int8 before "
                        f"DequantizeLinear, folded by ONNX Runtime at load)")
        report.extra["int4_layers"] = int4
        report.note(f"activations {'int8 zero-point 0' if scheme.signed else 'uint8'}, "
                    f"weights int8 per-{'channel' if per_channel else 'tensor'} "
                    f"{'[-63, 63] (reduced range: no VNNI)' if reduce else '[-127, 127]'}"
                    f"{', power-of-two scales' if scheme.pow2 else ''}"
                    f"{', bias correction' if correct else ''}")
        report.extra.update({
            "calibrator": method, "calibration_samples": len(data),
            "calibration_data": "random" if data.synthetic else data.source,
            "activation_type": "int8" if scheme.signed else "uint8",
            "weight_range": 63 if reduce else 127, "pow2_scales": scheme.pow2,
            "per_channel": per_channel, "bias_correction": correct,
            "quantized_layers": sorted(plan.layers),
            "float_layers": sorted(keep | set(fallback) | set(plan.skipped)),
            "float_fallback": fallback,
            "activation_ranges": {k: [float(v[0]), float(v[1])] for k, v in ranges.items()},
        })
        if scheme.pow2:
            report.extra["shifts"] = requant_shifts(result)
        if cfg.format == "qonnx":
            from onnxc.calibrate.qonnx import to_qonnx

            report.files["model_qonnx.onnx"] = to_qonnx(result).SerializeToString()
            report.note("QONNX export written to model_qonnx.onnx")
        return result


    def float_fallback(self, prep: "Prepared", ctx, report) -> list:
        """Nodes left in float so the accuracy drop stays within ``--max-drop``: the
        fallback groups (:func:`fallback_groups`) ranked by sensitivity, the most
        sensitive first (calibrate/mixed.py)."""
        from onnxc.calibrate.mixed import fallback_until

        layers = Plan(prep.graph, prep.candidates, prep.scheme.signed).layers
        groups = fallback_groups(prep.graph, layers, {n.name for n in prep.weighted})

        def members(keys) -> set:
            return {m for k in keys for m in groups[k]}

        chosen = fallback_until(prep.graph, ctx, report, list(groups),
                                lambda kept: prep.build(prep.candidates - members(kept))[0],
                                self.config.max_drop, "float", members=groups)
        nodes = [n.name for n in prep.graph.nodes if n.name in members(chosen)]
        mp = report.extra["mixed_precision"]
        mp["groups"] = {k: groups[k] for k in chosen}
        mp["fallback_nodes"] = nodes
        weighted = {n.name for n in prep.weighted}
        n_act = sum(n not in weighted for n in nodes)
        if n_act:
            report.note(f"float fallback: {len(nodes) - n_act} weighted layer(s) and "
                        f"{n_act} activation-only op(s) in {len(chosen)} group(s)")
        return nodes

    def prepare(self, graph, ctx, report) -> "Prepared":
        """Plan and calibrate static int8 once; ``build(layers)`` then writes the model
        with those layers quantized (mixed precision, ``onnxc qdebug``)."""
        cfg = self.config
        scheme, reduce = self._scheme()
        method = cfg.int8_calibrator
        percentile = cfg.int8_percentile
        per_channel = cfg.int8_weight_granularity == "channel"
        qdq.require_qdq_opset(graph, self.name)
        if per_channel and not qdq.per_channel_ok(graph):
            per_channel = False
            report.note(f"opset {graph.opset} (the upgrade to 13 failed, see the frontend "
                        f"notes): DequantizeLinear has no axis there, weights per-tensor")
        int4_wanted = str(cfg.int4_weights or "none").strip() not in ("", "none")
        if int4_wanted and not qdq.int4_ok(graph):
            graph = upgrade_opset(graph, qdq.INT4_OPSET, report)
        graph.name_nodes()
        if cfg.int8_cle:
            from onnxc.calibrate.equalize import equalize_checked

            graph = equalize_checked(graph, ctx, report)
        weighted = qdq.weighted_layers(graph)
        # Activation-only ops may be kept float too (what --max-drop / qdebug choose).
        keep = qdq.resolve_keep(cfg.keep_float, weighted, "none",
                                also=[n for n in graph.nodes if n.op in COMPUTE_OPS])
        candidates = {n.name for n in graph.nodes if n.op in COMPUTE_OPS
                      or (not qdq.is_standard(n) and n.op not in qdq.QDQ_OPS)} - keep
        act_matmuls = [n for n in graph.nodes if _act_matmul(graph, n)]
        act_dynamic = cfg.int8_act_matmul == "dynamic" and bool(act_matmuls)
        if act_dynamic and graph.opset < 11:
            act_dynamic = False
            report.note(f"opset {graph.opset} has no DynamicQuantizeLinear (opset 11+): "
                        f"activation x activation MatMuls quantized statically")
        if act_dynamic:
            candidates -= {n.name for n in act_matmuls}
        full = Plan(graph, candidates, scheme.signed)

        data = calibration_set(ctx, graph)
        correct = cfg.int8_bias_correction == "on"
        # Bias correction needs E[x] per input channel of every quantized weighted layer.
        layer_inputs = sorted({n.inputs[0].name for n in weighted if n.name in full.layers}) \
            if correct else []
        model = graph.to_onnx()
        stats = collect(model, full.stat_tensors(), data, progress=ctx.progress,
                        histograms=CALIBRATORS[method].histograms,
                        channel_means=layer_inputs)
        means = {name: stats[name].channel_mean() for name in layer_inputs}
        outputs = {t.name for t in graph.gs.outputs}

        def calibrated(tensors) -> dict:
            # Never clip what the user reads: graph outputs keep their observed range.
            return {name: clip_range(stats[name], "minmax" if name in outputs else method,
                                     scheme, percentile) for name in tensors}

        ranges = calibrated(stats)
        mixed = mixed_range_concats(graph, full, ranges)
        for name, reason in mixed.items():
            candidates.discard(name)
            report.skip(name, reason)
        if mixed:
            # Without those Concats a tensor that shared a Concat's scale (a Reshape of
            # its output) needs its own: calibrate what the smaller plan adds.
            missing = sorted(set(Plan(graph, candidates, scheme.signed).stat_tensors())
                             - set(stats))
            if missing:
                stats.update(collect(model, missing, data, progress=ctx.progress,
                                     histograms=CALIBRATORS[method].histograms))
                ranges.update(calibrated(missing))
        params = {name: scheme.params(*r) for name, r in ranges.items()}

        dynamic = [n.name for n in act_matmuls if n.name not in keep] if act_dynamic else []
        int4 = resolve_int4(cfg.int4_weights, weighted) - keep
        if int4 and scheme.pow2:
            raise UsageError("--int4-weights with --int8-pow2-scales: 4-bit weights have "
                             "per-channel MSE scales, not powers of two")
        rounded = None
        if cfg.int8_adaround:
            from onnxc.calibrate.adaround import adaround_codes

            rounded = adaround_codes(graph, [n for n in weighted if n.name in full.layers],
                                     params, scheme, reduce, per_channel, data,
                                     cfg.int8_adaround_iters, ctx, report,
                                     int4=int4, int4_clip=cfg.int4_clip)

        def build(layers: set):
            plan = Plan(graph, layers, scheme.signed)
            built = apply_plan(graph.copy(), plan, params, scheme, reduce, per_channel,
                               means if correct else None, rounded,
                               int4=int4, int4_clip=cfg.int4_clip)
            nodes = {n.name: n for n in built.nodes}
            for name in dynamic:                # run-time quantized attention MatMuls
                dynamic_act_matmul(built, nodes[name])
            return built, plan

        return Prepared(graph, weighted, keep, candidates, data, method, scheme,
                        per_channel, dynamic, ranges, build)

    def _dynamic(self, graph, ctx, report):
        """MatMul/Gemm → DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add bias):
        the pattern ONNX Runtime fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat."""
        _, reduce = self._scheme()
        if graph.opset < 11:
            raise UnsupportedError(f"int8 dynamic: the model's opset {graph.opset} has no "
                                   f"DynamicQuantizeLinear (opset 11+) and could not be "
                                   f"upgraded (see the frontend notes)")
        graph.name_nodes()
        weighted = qdq.weighted_layers(graph)
        keep = qdq.resolve_keep(self.config.keep_float, weighted, "none")
        done = []
        qdq.report_vendor_nodes(graph, report, "int8")
        qdq.report_prequantized(graph, report)
        # Decided before any rewrite: our own DynamicQuantizeLinear must not count.
        quantized_input = {n.name for n in weighted
                           if qdq.already_quantized(graph, n.inputs[0])}
        act = [n for n in graph.nodes if _act_matmul(graph, n) and n.name not in keep]
        for node in weighted:
            if node.name in keep:
                report.skip(node.name, "kept in float (--keep-float)")
                continue
            if node.op == "Conv":
                report.skip(node.name, "dynamic mode quantizes MatMul/Gemm only")
                continue
            reason = _quantizable(graph, node) if node.op == "Gemm" else None
            w = graph.constant(node.inputs[1])
            if reason or w.ndim != 2 or not _is_float_var(graph, node.inputs[0]):
                report.skip(node.name, reason or "needs a 2-D weight and a float input")
                continue
            if node.name in quantized_input:
                report.skip(node.name, "input already quantized (through Q/DQ): kept")
                continue
            if node.op == "Gemm" and node.attrs.get("transB", 0):
                w = w.T                                        # MatMulInteger wants K × N
            bias = graph.constant(node.inputs[2]) if node.op == "Gemm" \
                and len(node.inputs) > 2 else None
            dynamic_matmul(graph, node, w, bias, qdq.weight_qmax(reduce))
            done.append(node.name)
        # Without calibration there is no static choice for two activations either.
        for node in act:
            dynamic_act_matmul(graph, node)
        report.changed = len(done) + len(act)
        report.note(f"{len(done)} MatMul/Gemm with int8 weights"
                    f"{f' and {len(act)} activation x activation MatMul(s)' if act else ''}"
                    f", activations quantized at run time (dynamic)")
        report.extra.update({"mode": "dynamic", "quantized_layers": done,
                             "dynamic_act_matmuls": [n.name for n in act],
                             "weight_range": qdq.weight_qmax(reduce)})
        return graph


def dynamic_matmul(graph, node, w, bias, qmax: int) -> None:
    """Replace ``node`` (x @ w [+ bias]) by its dynamically quantized form, in place."""
    import onnx_graphsurgeon as gs

    x, y = node.inputs[0], node.outputs[0]
    base = node.name
    codes, w_scale = qdq.quantize_weight(w, 1, qmax)           # K × N, scale per column
    xq = graph.make_variable(base + "_xq", dtype=np.uint8)
    xs = graph.make_variable(base + "_xscale", dtype=np.float32)
    xz = graph.make_variable(base + "_xzp", dtype=np.uint8)
    acc = graph.make_variable(base + "_acc", dtype=np.int32)
    accf = graph.make_variable(base + "_accf", dtype=np.float32)
    scale = graph.make_variable(base + "_scale", dtype=np.float32)
    out = graph.make_variable(base + "_scaled", dtype=np.float32) if bias is not None else y
    const = qdq._const
    new = [
        gs.Node("DynamicQuantizeLinear", graph.unique_name(base + "_dql"), inputs=[x],
                outputs=[xq, xs, xz]),
        gs.Node("MatMulInteger", graph.unique_name(base + "_mmi"),
                inputs=[xq, const(graph, base + "_Wq", codes), xz,
                        const(graph, base + "_Wzp", np.zeros(codes.shape[1], np.int8))],
                outputs=[acc]),
        gs.Node("Cast", graph.unique_name(base + "_cast"), attrs={"to": 1}, inputs=[acc],
                outputs=[accf]),
        gs.Node("Mul", graph.unique_name(base + "_scales_mul"),
                inputs=[xs, const(graph, base + "_Wscale", w_scale)], outputs=[scale]),
        gs.Node("Mul", graph.unique_name(base + "_output_scale_mul"), inputs=[accf, scale],
                outputs=[out]),
    ]
    if bias is not None:
        new.append(gs.Node("Add", graph.unique_name(base + "_bias"),
                           inputs=[out, const(graph, base + "_B", bias.astype(np.float32))],
                           outputs=[y]))
    node.inputs.clear()
    node.outputs.clear()
    graph.gs.nodes.extend(new)


def _act_matmul(graph, node) -> bool:
    """A MatMul of two float activations (no constant operand), e.g. attention QK^T,
    neither of them quantized already."""
    return node.op == "MatMul" and qdq.is_standard(node) and len(node.inputs) == 2 \
        and all(_is_float_var(graph, t) and not qdq.already_quantized(graph, t)
                for t in node.inputs) \
        and bool(node.outputs) and _is_float_var(graph, node.outputs[0])


def dynamic_act_matmul(graph, node) -> None:
    """A @ B of two activations → each operand through DynamicQuantizeLinear (uint8, its
    own range per run), MatMulInteger (int32 accumulation, batched like MatMul), Cast,
    times s_A·s_B. In place."""
    import onnx_graphsurgeon as gs

    base, y = node.name, node.outputs[0]
    new, quantized = [], []
    for k, x in enumerate(node.inputs):
        q, s, z = (graph.make_variable(f"{base}_{k}{r}", dtype=dt)
                   for r, dt in (("q", np.uint8), ("s", np.float32), ("z", np.uint8)))
        new.append(gs.Node("DynamicQuantizeLinear", graph.unique_name(f"{base}_dql{k}"),
                           inputs=[x], outputs=[q, s, z]))
        quantized.append((q, s, z))
    (qa, sa, za), (qb, sb, zb) = quantized
    acc = graph.make_variable(base + "_acc", dtype=np.int32)
    accf = graph.make_variable(base + "_accf", dtype=np.float32)
    scale = graph.make_variable(base + "_scale", dtype=np.float32)
    new += [
        gs.Node("MatMulInteger", graph.unique_name(base + "_mmi"), inputs=[qa, qb, za, zb],
                outputs=[acc]),
        gs.Node("Cast", graph.unique_name(base + "_cast"), attrs={"to": 1}, inputs=[acc],
                outputs=[accf]),
        gs.Node("Mul", graph.unique_name(base + "_scales_mul"), inputs=[sa, sb],
                outputs=[scale]),
        gs.Node("Mul", graph.unique_name(base + "_output_scale_mul"), inputs=[accf, scale],
                outputs=[y]),
    ]
    node.inputs.clear()
    node.outputs.clear()
    graph.gs.nodes.extend(new)


def fallback_groups(graph, layers: set, weighted: set) -> dict:
    """Candidates of the float fallback, {group: [node names]} in graph order: each
    quantized weighted layer with the activation-only quantized ops it feeds before the
    next weighted layer (the hard-swish or squeeze-excite Mul, residual Add, pooling,
    Concat, a MatMul of two activations); an activation-only op with no weighted layer
    upstream is a group of its own. Activation-only ops are candidates because their
    rounding costs accuracy too (the Q/DQ pairs on their inputs and output), and grouped
    because one group is one sensitivity build: the search stays as short as over the
    weighted layers alone. An op reading several blocks joins the latest of them."""
    owner: dict = {}           # tensor name -> group
    position: dict = {}        # group -> graph position of its first node
    groups: dict = {}
    for i, node in enumerate(graph.nodes):
        if node.name in layers and node.name in weighted:
            group = node.name
            groups[group] = [group]
        else:
            owners = [owner[t.name] for t in node.inputs if t.name in owner]
            group = max(owners, key=position.get) if owners else None
            if node.name in layers:
                if group is None:
                    group = node.name
                    groups[group] = []
                groups[group].append(node.name)
        if group is not None:
            position.setdefault(group, i)
            for t in node.outputs:
                owner[t.name] = group
    return groups


# A Concat whose inputs' ranges differ more than this keeps float: one 8-bit scale for
# its output would leave the narrowest input fewer than 4 bits (a detector head
# concatenating boxes in pixels, 0..320, with class scores, 0..1, rounded every score
# to 0: output cosine 0.03 on YOLOv8n).
MAX_CONCAT_RANGE_RATIO = 16.0


def mixed_range_concats(graph, plan: Plan, ranges: dict) -> dict:
    """{Concat name: reason} for planned Concats whose calibrated input ranges differ
    by more than MAX_CONCAT_RANGE_RATIO. ONNX Runtime's QLinearConcat requantizes every
    input to the output's one scale, so per-input scales do not help there."""
    out = {}
    for node in graph.nodes:
        if node.op != "Concat" or node.name not in plan.layers:
            continue
        widths = []
        for t in node.inputs:
            src = plan.params_from.get(t.name)
            if src is None or src not in ranges:
                continue
            lo, hi = (float(v) for v in ranges[src])
            widths.append((max(hi, 0.0) - min(lo, 0.0), t.name, lo, hi))
        if len(widths) < 2:
            continue
        narrow, wide = min(widths), max(widths)
        if wide[0] > MAX_CONCAT_RANGE_RATIO * max(narrow[0], 1e-30):
            out[node.name] = (f"kept float: its inputs' ranges differ {wide[0] / max(narrow[0], 1e-30):.0f}x "
                              f"('{wide[1]}' [{wide[2]:.3g}, {wide[3]:.3g}], '{narrow[1]}' "
                              f"[{narrow[2]:.3g}, {narrow[3]:.3g}]): one int8 scale would "
                              f"erase the narrow one")
    return out


# Fewer calibration samples than this: int8 says its ranges are unreliable.
FEW_CALIB_SAMPLES = 8


def calibration_set(ctx, graph):
    """The calibration samples: --calib-samples if given, else at most MAX_CALIB (more
    rarely moves a range, and statistics cost grows linearly)."""
    n = ctx.calib_samples
    if n is None and ctx.calibration is not None:
        n = min(len(ctx.calibration), MAX_CALIB)
    data = ctx.calibration_data(graph, n)
    if data.synthetic and ctx.calibration is not None:
        ctx.warn(f"calibration data '{data.source}' is synthetic: accuracy will suffer")
    if len(data) < FEW_CALIB_SAMPLES:
        fixed = data.synthetic and all(a is None for a in data.axes.values())
        # silero-vad's static [1, 576] input: one random sample set every range, and
        # the output Conv's (one value) clipped every other input's: cosine 0.06.
        ctx.warn(f"int8 calibrated on {len(data)} sample(s)"
                 + (" (the inputs have a fixed batch, so random calibration draws one)"
                    if fixed else "")
                 + ": ranges seen on so few inputs clip other inputs; give --calib-data "
                   "with more samples")
    if data.synthetic:
        made_up = _made_up_dims(graph, data)
        if made_up:
            # Ranges that grow with the input size (a detector's decoded box coordinates)
            # are calibrated at this size only: YOLOv8n calibrated at 64x64 and run at
            # 320x320 clipped its boxes at 73 px (centered output cosine 0.02 vs 0.89).
            ctx.warn(f"int8 calibrated on random inputs with symbolic dims set to "
                     f"{made_up}: activation ranges hold for that size; give --calib-data "
                     f"or --input-shape at the size the model will run")
    return data


def _made_up_dims(graph, data) -> str:
    """"'images' [N, 3, 64, 64]"-style text for inputs whose non-batch symbolic dims the
    random calibration set chose, '' when there are none."""
    parts = []
    for t in graph.gs.inputs:
        arr = data.inputs.get(t.name)
        if arr is None or t.shape is None:
            continue
        batch = data.axes.get(t.name)
        if any(i != batch and not (isinstance(d, (int, np.integer)) and d > 0)
               for i, d in enumerate(t.shape)):
            dims = [str(d) for d in np.shape(arr)]
            if batch is not None and batch < len(dims):
                dims[batch] = "N"
            parts.append(f"'{t.name}' [{', '.join(dims)}]")
    return ", ".join(parts)


def apply_plan(graph, plan: Plan, params: dict, scheme: Scheme, reduce: bool,
               per_channel: bool, means: dict | None = None, rounded: dict | None = None,
               int4: set = frozenset(), int4_clip: str = "mse"):
    """Rewrite ``graph`` (a copy) into QDQ form following ``plan``. ``means`` (input
    tensor name -> per-channel mean) turns on bias correction; ``rounded`` (node name ->
    codes on the layer's weight scales, AdaRound) replaces round-to-nearest; layers in
    ``int4`` get 4-bit weights (``plan.int4`` says which were written)."""
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    qparams = {t: params[src] for t, src in plan.params_from.items()}
    qmax = qdq.weight_qmax(reduce)
    # Weights and biases first: they need the input's scale. Layers in graph order, so
    # the short names w<j>/b<j> are the same on every run.
    layer = 0
    for node in [n for n in graph.nodes if n.name in plan.layers]:
        axis = qdq.weight_axis(graph, node)
        if axis is False or node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        axis = axis if per_channel else None
        w = graph.constant(node.inputs[1])
        four = node.name in int4
        codes, w_scale = qdq.quantize_weight_int4(w, axis, int4_clip) if four \
            else qdq.quantize_weight(w, axis, qmax, scheme.pow2)
        if rounded and node.name in rounded and rounded[node.name].shape == codes.shape:
            codes = rounded[node.name]
        # ORT fuses DQ(W)→Conv without a weight zero point, but not DQ(W)→Gemm/MatMul.
        node.inputs[1] = (qdq.weight_dq_int4 if four else qdq.weight_dq)(
            graph, f"w{layer}", codes, w_scale, axis, zero_point=node.op != "Conv")
        if four:
            plan.int4.add(node.name)
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2:
            b = graph.constant(node.inputs[2])
            n_out = w.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) \
                else w.shape[1]
            if b is not None and b.ndim == 1 and b.size == n_out:
                mean_x = (means or {}).get(node.inputs[0].name)
                if mean_x is not None:
                    b = b + weight_error_bias(node, w, qdq.dequantize(codes, w_scale, axis),
                                              mean_x)
                x_scale = qparams[node.inputs[0].name][0]
                # Per-tensor weights keep a scalar bias scale (opset < 13 has no axis).
                bq = qdq.bias_dq(graph, f"b{layer}", b.astype(np.float32), x_scale,
                                 np.broadcast_to(w_scale, (n_out,)).astype(np.float32)
                                 if per_channel else np.float32(w_scale))
                if bq is not None:
                    node.inputs[2] = bq
        layer += 1
    # Fuse Relu into the preceding quantized output (uint8: Q clamps at zero point 0).
    if not scheme.signed:
        for pre, relu_name in plan.fused_relu.items():
            relu = nodes[relu_name]
            producer = tensors[pre].inputs[0]
            relu_out = relu.outputs[0]
            producer.outputs[0] = relu_out
            relu.inputs.clear()
            relu.outputs.clear()
    tensors = graph.tensors()
    for k, (tname, (scale, zp)) in enumerate(qparams.items()):
        tensor = tensors.get(tname)
        if tensor is None:
            continue               # the pre-Relu tensor of a removed Relu
        qdq.insert_qdq(graph, tensor, scale, zp, scheme.dtype, base=f"a{k}")
    return graph


def upgrade_opset(graph, opset: int, report):
    """``graph`` converted to ``opset`` by ONNX's version converter (node names kept)."""
    import onnx
    from onnx import version_converter

    from onnxc.ir import Graph

    before = graph.opset
    try:
        model = version_converter.convert_version(graph.to_onnx(), opset)
        model.ir_version = max(model.ir_version, 10)      # opset 21 needs IR 10
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001  (the converter raises many types)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UnsupportedError(f"int8 --int4-weights: INT4 needs opset {opset}; the "
                               f"upgrade from opset {before} failed ({first})") from None
    report.note(f"opset {before} upgraded to {opset} (INT4 weights)")
    return Graph.from_onnx(model)


def weight_error_bias(node, w: np.ndarray, w_hat: np.ndarray, mean_x: np.ndarray):
    """Per output channel E[y(W) − y(Ŵ)] = Σ (W − Ŵ)·E[x]: the mean shift rounding the
    weights causes (bias correction, Nagel et al. 2019, "Data-free quantization"). With
    7-bit weights (reduced range) this shift is large enough to flip a few predictions;
    adding it to the bias removes it. E[x] is per input channel, so zero padding at the
    borders is ignored (a small second-order error)."""
    err = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    mean_x = np.asarray(mean_x, np.float64).reshape(-1)
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        n_out, n_in = err.shape[0], err.shape[1]
        if mean_x.size != n_in * groups:
            return np.zeros(n_out, np.float32)
        # Output channel o of group o // (n_out / groups) reads that group's inputs.
        mx = mean_x.reshape(groups, n_in)[np.arange(n_out) // (n_out // groups)]
        d = (err.reshape(n_out, n_in, -1).sum(2) * mx).sum(1)
    elif node.op == "Gemm" and node.attrs.get("transB", 0):
        d = err @ mean_x if mean_x.size == err.shape[1] else np.zeros(err.shape[0])
    else:                                            # Gemm(transB=0) / MatMul: K × N
        d = mean_x @ err if mean_x.size == err.shape[0] else np.zeros(err.shape[1])
    return d.astype(np.float32)


def requant_shifts(graph) -> dict:
    """Per quantized Conv/Gemm: right shift k with s_x·s_w / s_y = 2^-k (pow2 scales)."""
    shifts = {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not node.outputs:
            continue
        x_dq = graph.producer(node.inputs[0])
        w_dq = graph.producer(node.inputs[1])
        readers = node.outputs[0].outputs
        if not (x_dq and w_dq and x_dq.op == w_dq.op == "DequantizeLinear"
                and len(readers) == 1 and readers[0].op == "QuantizeLinear"):
            continue
        sx = float(graph.constant(x_dq.inputs[1]))
        sw = graph.constant(w_dq.inputs[1]).astype(np.float64)
        sy = float(graph.constant(readers[0].inputs[1]))
        k = -np.log2(sx * sw / sy)
        shifts[node.name] = sorted({int(round(v)) for v in np.atleast_1d(k)})
    return shifts
