"""lowrank: split layers with constant weights into cheaper low-rank sequences.

- Fully connected (Gemm / MatMul with a constant 2-D weight m, in × out, y = x·m + c):
  m ≈ a·b of rank r becomes two layers (x·a)·b + c, which pays when r·(in+out) < in·out.
  Plain truncated SVD, or data-aware (``--lowrank-data-aware``): the SVD of the weight
  whitened by the calibration inputs' second moment, then un-whitened, so the error is
  minimised on the activations the layer actually sees.
- 1×1 convolutions are matrices (N × C): the same SVD split, as two 1×1 convs.
- k×k convolutions, by ``--lowrank-method``:
  * ``tucker2`` (default; Kim et al. 2015): 1×1 (C→R1) → k×k (R1→R2, the original
    stride/pads/dilation) → 1×1 (R2→N, with the bias); HOSVD on the channel modes plus
    ``--lowrank-als-iters`` rounds of HOOI.
  * ``cp`` (Lebedev et al. 2015): 1×1 (C→R) → depthwise kh×1 → depthwise 1×kw → 1×1
    (R→N), rank-R CP by ALS.
  * ``svd``: k×k (C→r) → 1×1 (r→N), the SVD of the N × C·kh·kw unfolding.
- Ranks: ``--lowrank-energy`` (share of Σσ² kept per mode; the default, 0.9),
  ``--lowrank-flops F`` (remove the fraction F of the eligible layers' MACs: one energy
  threshold for all layers, found by bisection, so redundant layers give up more),
  ``--lowrank-rank R`` (fixed, capped per layer) or ``--lowrank-vbmf`` (empirical VBMF
  on the unfoldings, as Kim et al.).

With ``--lowrank-data-aware``, Tucker-2 and CP splits also refit their last 1×1 stage
(and bias) by least squares so each split conv reproduces the original conv's outputs on
calibration activations.

A layer is split only when that saves MACs (``--lowrank-force`` splits anyway, e.g. to
check exactness at full rank). Grouped convolutions, 1-D/3-D convolutions, transposed
inputs and non-constant weights are skipped and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.errors import UnsupportedError, UsageError
from onnxc.options import positive_int
from onnxc.pipeline import CalibrationData, Option, Pass, register_pass

from . import _lowrank_math as lm

METHODS = ("auto", "svd", "tucker2", "cp")
DEFAULT_ENERGY = 0.9
DEFAULT_ALS_ITERS = {"tucker2": 10, "cp": 50}
# Rows of 1×1-conv input activations kept for a data-aware fit (pixels are many and
# strongly correlated; this many estimate a C × C second moment well).
MAX_PIXEL_ROWS = 50_000
# Data-aware k×k conv splits refit their last 1×1 stage on this many calibration images,
# fetching the original outputs for this many layers per ONNX Runtime run (bounds memory).
CONV_REFIT_SAMPLES = 128
CONV_REFIT_CHUNK = 8


# ----------------------------------------------------------------------------------------
# One eligible layer: geometry, spectra, cost model, decomposition


@dataclass
class Layer:
    node: gs.Node
    kind: str                 # "fc": Gemm/MatMul; "conv1x1"; "conv": k×k conv
    method: str               # "svd", "tucker2" or "cp"
    weight: np.ndarray        # fc/conv1x1/svd: m (in × out); tucker2/cp: w (N × C × kh × kw)
    bias: np.ndarray | None
    macs: int                 # MACs per sample before the split
    params: int
    # geometry for the cost model
    rows: int = 1             # fc: rows per sample; convs: output pixels Ho·Wo
    in_pixels: int = 1        # convs: input pixels Hi·Wi
    mid_pixels: int = 1       # cp: pixels after the kh×1 stage (Ho·Wi)
    spectra: tuple = ()       # svd: (s,); tucker2: (s_out, s_in); cp: ()
    basis: np.ndarray | None = None   # svd: right singular vectors q (out × k)
    ranks: tuple = ()
    info: dict = field(default_factory=dict)
    multiple: int = 1         # ranks are rounded up to a multiple of this (capped at full)

    @property
    def name(self) -> str:
        return self.node.name

    def full_ranks(self) -> tuple:
        if self.method == "svd":
            return (min(self.weight.shape),)
        n, c, kh, kw = self.weight.shape
        if self.method == "tucker2":
            return (n, c)
        return (max(n, c) * max(kh, kw),)          # cp: no finite "full" rank; a cap

    def cost(self, ranks) -> tuple[int, int]:
        """(MACs per sample, weight params) after a split at ``ranks``."""
        if self.method == "svd":
            (r,) = ranks
            d_in, d_out = self.weight.shape
            return self.rows * r * (d_in + d_out), r * (d_in + d_out)
        n, c, kh, kw = self.weight.shape
        if self.method == "tucker2":
            r_out, r_in = ranks
            macs = self.in_pixels * c * r_in + self.rows * (r_in * r_out * kh * kw
                                                              + r_out * n)
            return macs, c * r_in + r_in * r_out * kh * kw + r_out * n
        (r,) = ranks
        macs = (self.in_pixels * c * r + self.mid_pixels * r * kh
                + self.rows * r * kw + self.rows * r * n)
        return macs, r * (c + kh + kw + n)

    def rounded(self, ranks) -> tuple:
        """``ranks`` rounded up to a multiple of ``multiple`` (capped at the full ranks):
        monotone in the ranks, so budget bisection over energy still works."""
        k = self.multiple
        return tuple(min(f, -(-r // k) * k) for r, f in zip(ranks, self.full_ranks()))

    def ranks_at_energy(self, energy: float) -> tuple:
        return self.rounded(lm.energy_rank(s, energy) for s in self.spectra)

    def ranks_fixed(self, rank: int) -> tuple:
        return self.rounded(min(rank, f) for f in self.full_ranks())

    def ranks_vbmf(self) -> tuple:
        if self.method == "svd":
            s = self.info.get("data_free_s", self.spectra[0])
            return self.rounded((lm.evbmf_rank(s, self.weight.shape),))
        n, c, kh, kw = self.weight.shape
        s_out, s_in = self.spectra
        return self.rounded((lm.evbmf_rank(s_out, (n, c * kh * kw)),
                             lm.evbmf_rank(s_in, (c, n * kh * kw))))

    def ranks_for_macs(self, budget: float) -> tuple:
        """Largest rank (R1 : R2 kept in the C : N ratio for Tucker-2) within ``budget``."""
        full = self.full_ranks()
        lo, hi = 1, max(full)
        scale = [f / max(full) for f in full]

        def at(k):
            # Rounded down to the multiple (at least one multiple): stays within budget.
            m = self.multiple
            return tuple(max(min(f, m), min(f, int(round(k * s)) // m * m))
                         for f, s in zip(full, scale))

        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(at(mid))[0] <= budget:
                lo = mid
            else:
                hi = mid - 1
        return at(lo)

    def pays(self, ranks) -> bool:
        return self.cost(ranks)[0] < self.macs


# ----------------------------------------------------------------------------------------


@register_pass
class LowRank(Pass):
    name = "lowrank"
    summary = "split FC/conv layers into low-rank sequences (SVD, Tucker-2, CP)"
    order = 40
    exact = False
    requires = (CalibrationData(when=lambda config: config.lowrank_data_aware),)
    options = (
        Option("--lowrank-method", str, "auto", choices=METHODS,
               help="conv decomposition: auto (= tucker2), svd, tucker2 or cp; FC layers "
                    "and 1x1 convs always use SVD"),
        Option("--lowrank-layers", str, "all", choices=("all", "conv", "fc"),
               help="which layers to split: all, conv (Conv only) or fc (Gemm/MatMul)"),
        Option("--lowrank-energy", float, None,
               help=f"keep this share of singular-value energy per mode, in (0, 1] "
                    f"(the default rule, {DEFAULT_ENERGY})"),
        Option("--lowrank-flops", float, None,
               help="remove this fraction of the eligible layers' MACs, in (0, 1)"),
        Option("--lowrank-rank", positive_int, None,
               help="fixed rank for every layer (capped)"),
        Option("--lowrank-vbmf", action="store_true",
               help="choose ranks by empirical VBMF (svd, tucker2)"),
        Option("--lowrank-data-aware", action="store_true",
               help="use calibration activations (--calib-data): whitened SVD for FC and "
                    "1x1 layers; Tucker-2/CP refit their last 1x1 to the conv's outputs"),
        Option("--lowrank-samples", positive_int, 256,
               help="calibration samples for --lowrank-data-aware"),
        Option("--lowrank-als-iters", int, None,
               help="ALS refinement rounds: HOOI for tucker2 (default 10), CP-ALS for cp "
                    "(default 50)"),
        Option("--lowrank-force", action="store_true",
               help="split eligible layers even where that does not save MACs"),
        Option("--lowrank-multiple", positive_int, None,
               help="round every rank up to a multiple of this; capped at the full rank "
                    "(default: the target's channel block, 8 for onnx/x86/arm/cuda, else "
                    "1; 1 turns rounding off)"),
    )

    # -- options ----------------------------------------------------------------------
    def validate(self, ctx) -> None:
        self._settings(ctx)

    def _settings(self, ctx=None) -> dict:
        cfg = self.config
        method, layers = cfg.lowrank_method, cfg.lowrank_layers
        energy, flops, rank = cfg.lowrank_energy, cfg.lowrank_flops, cfg.lowrank_rank
        vbmf, iters = cfg.lowrank_vbmf, cfg.lowrank_als_iters
        rules = [f for f, v in (("--lowrank-energy", energy), ("--lowrank-flops", flops),
                                ("--lowrank-rank", rank), ("--lowrank-vbmf", vbmf or None))
                 if v is not None]
        if len(rules) > 1:
            raise UsageError(f"choose one rank rule, not {' and '.join(rules)}")
        if energy is not None and not 0 < energy <= 1:
            raise UsageError(f"--lowrank-energy must be in (0, 1], got {energy}")
        if flops is not None and not 0 < flops < 1:
            raise UsageError(f"--lowrank-flops is the fraction of MACs to remove and must "
                             f"be in (0, 1), got {flops}")
        if iters is not None and not 0 <= iters <= 10_000:
            raise UsageError(f"--lowrank-als-iters must be in [0, 10000], got {iters}")
        conv_method = "tucker2" if method == "auto" else method
        if conv_method == "cp" and layers != "fc" and (energy is not None or vbmf
                                                        or not rules):
            raise UsageError("--lowrank-method cp has no singular-value spectrum to read "
                             "an energy or VBMF rank from; give --lowrank-rank or "
                             "--lowrank-flops")
        if not rules:
            energy = DEFAULT_ENERGY
        return {"conv_method": conv_method, "layers": layers, "energy": energy,
                "flops": flops, "rank": rank, "vbmf": vbmf, "iters": iters,
                "samples": cfg.lowrank_samples, "data_aware": cfg.lowrank_data_aware,
                "force": cfg.lowrank_force,
                # Default: the target's kernel block. Unrounded ranks are what ORT's
                # blocked kernels run worst: ResNet-56 at --lowrank-flops 0.5 ran 0.70x
                # as fast as the original with ranks as they fell (tools/bench_defaults.py).
                "multiple": cfg.lowrank_multiple or int(getattr(ctx, "channel_multiple", 1)
                                                        or 1)}

    # -- the pass ---------------------------------------------------------------------
    def run(self, graph, ctx, report):
        from threadpoolctl import threadpool_limits

        # Multi-threaded OpenBLAS makes the many small SVDs here ~50x slower on a busy
        # machine (threads spin waiting for cores); one thread is fast for all of them.
        with threadpool_limits(limits=1):
            return self._run(graph, ctx, report)

    def _run(self, graph, ctx, report):
        cfg = self._settings(ctx)
        graph.name_nodes()             # skips and refusals name the layer
        self._probe = None
        layers = self._find_layers(graph, cfg, report, ctx)
        if not layers:
            return self._nothing(graph, ctx, report, cfg, "no eligible layer (Conv/Gemm/"
                                 "MatMul with a constant float weight)"
                                 + _skip_summary(report))
        data = None
        if cfg["data_aware"]:
            n = cfg["samples"]
            if ctx.calibration is not None:
                n = min(n, len(ctx.calibration))
            data = ctx.calibration_data(graph, n)
            self._whiten(graph, ctx, layers, report, data)
        self._spectra(layers)
        chosen = self._choose_ranks(layers, cfg, report)
        if not chosen:
            return self._nothing(graph, ctx, report, cfg,
                                 f"no layer gets cheaper when split at the chosen ranks "
                                 f"({_rule_text(cfg)})" + _skip_summary(report)
                                 + ("; --lowrank-multiple 1 keeps the ranks unrounded"
                                    if cfg["multiple"] > 1 else ""))
        # Every check is done: only now is the graph edited.
        refit = [l for l in chosen if data is not None and l.kind == "conv"
                 and l.method != "svd"]
        original = graph.copy() if refit else None
        rows = []
        for start in range(0, len(chosen), CONV_REFIT_CHUNK):
            chunk = chosen[start:start + CONV_REFIT_CHUNK]
            self._conv_targets(original, [l for l in chunk if l in refit], data)
            for layer in chunk:
                if layer in refit:
                    self._conv_inputs(graph, layer, data)
                rows.append(self._split(graph, layer, cfg, ctx))
        self._report(report, layers, chosen, rows, cfg)
        return graph

    def _nothing(self, graph, ctx, report, cfg, why: str):
        """Nothing to split. A MACs budget the user asked for is then an error; under a
        rank rule the model is valid as it is: it goes on unchanged, and the pass says
        so (a note, a warning, and its skips in report.json)."""
        if cfg["flops"] is not None:
            raise UnsupportedError(f"--lowrank-flops {cfg['flops']} cannot be met: {why}")
        msg = f"lowrank changed nothing: {why}"
        report.note(msg)
        ctx.warn(msg)
        if not report.skipped:
            report.skip("lowrank", why)
        report.extra["lowrank"] = {"rule": _rule_text(cfg), "layers": [],
                                   "nothing_to_split": why}
        return graph

    # -- discovery --------------------------------------------------------------------
    def _find_layers(self, graph, cfg, report, ctx=None) -> list[Layer]:
        from onnxc.calibrate.qdq import prequantized_reason

        found = []
        for node in graph.nodes:
            if node.op in ("Gemm", "MatMul") and cfg["layers"] in ("all", "fc"):
                layer = self._fc_layer(graph, node, report)
            elif node.op == "Conv" and cfg["layers"] in ("all", "conv"):
                layer = self._conv_layer(graph, node, cfg, report, ctx)
            else:
                reason = prequantized_reason(graph, node)
                if reason and node.op != "DynamicQuantizeLinear":   # layers, not quantizers
                    report.skip(node.name, f"{reason}: left alone")
                elif node.op in ("If", "Loop", "Scan"):
                    report.skip(node.name, f"layers inside {node.op} subgraphs are not split")
                continue
            if layer is not None:
                layer.multiple = cfg["multiple"]
                found.append(layer)
        return found

    def _fc_layer(self, graph, node, report) -> Layer | None:
        if len(node.inputs) < 2:
            return None
        w = graph.constant(node.inputs[1])
        if w is None:
            if graph.constant(node.inputs[0]) is None:
                return None           # activation × activation: not a weight layer
            report.skip(node.name, "weight is the first operand; only x·W is handled")
            return None
        if w.ndim != 2 or w.dtype.kind != "f":
            report.skip(node.name, f"weight is not a 2-D float matrix (shape {w.shape})")
            return None
        x = node.inputs[0]
        if graph.constant(x) is not None:
            return None               # constant × constant: folding, not compression
        if x.shape is None or len(x.shape) < 2:
            report.skip(node.name, "input rank unknown")
            return None
        bias = None
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                report.skip(node.name, "Gemm with transA=1")
                return None
            m = w.T if int(node.attrs.get("transB", 0)) else w
            m = m.astype(np.float64) * float(node.attrs.get("alpha", 1.0))
            if len(node.inputs) > 2 and node.inputs[2] is not None \
                    and node.inputs[2].name:
                c = graph.constant(node.inputs[2])
                if c is None:
                    report.skip(node.name, "Gemm bias C is not constant")
                    return None
                bias = c.astype(np.float64) * float(node.attrs.get("beta", 1.0))
            rows = 1
        else:
            m = w.astype(np.float64)
            dims = [d if isinstance(d, (int, np.integer)) and d > 0 else 1
                    for d in x.shape[1:-1]]
            rows = int(np.prod(dims)) if dims else 1
        d_in, d_out = m.shape
        return Layer(node, "fc", "svd", m, bias, rows * d_in * d_out, d_in * d_out,
                     rows=rows, info={"dtype": w.dtype})

    def _conv_layer(self, graph, node, cfg, report, ctx=None) -> Layer | None:
        w = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.dtype.kind != "f":
            reason = None
            if w is None:
                from onnxc.calibrate.qdq import prequantized_reason

                reason = prequantized_reason(graph, node)
            report.skip(node.name, f"{reason}: left alone" if reason
                        else "Conv weight is not a constant float tensor")
            return None
        conv1d = w.ndim == 3
        if w.ndim not in (3, 4):
            report.skip(node.name, f"{w.ndim - 2}-D convolution (1-D and 2-D are split)")
            return None
        if conv1d and cfg["conv_method"] == "cp" and w.shape[2] > 1:
            report.skip(node.name, "1-D convolution: cp needs two spatial axes (tucker2 "
                                   "and svd split it)")
            return None
        group = int(node.attrs.get("group", 1))
        if group != 1:
            report.skip(node.name, f"grouped conv (group={group}): its per-group weights "
                                   f"are already small; left alone")
            return None
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = graph.constant(node.inputs[2])
            if bias is None:
                report.skip(node.name, "Conv bias is not constant")
                return None
        x, y = node.inputs[0], node.outputs[0]
        xs, ys = self._spatial(graph, x, w.ndim, ctx), self._spatial(graph, y, w.ndim, ctx)
        if xs is None or ys is None:
            report.skip(node.name, "conv input/output spatial shape unknown (also with "
                                   "the symbolic input dims made concrete)")
            return None
        if conv1d:
            w = w[:, :, None, :]                # (N, C, 1, k): the kh = 1 case of 2-D
            xs, ys = (1,) + xs, (1,) + ys
        n, c, kh, kw = w.shape
        in_px = int(xs[0]) * int(xs[1])
        out_px = int(ys[0]) * int(ys[1])
        macs = out_px * n * c * kh * kw
        info = {"dtype": w.dtype, "conv1d": conv1d}
        if kh == kw == 1:
            m = w.reshape(n, c).T.astype(np.float64)              # C × N
            return Layer(node, "conv1x1", "svd", m, bias, macs, w.size, rows=out_px,
                         in_pixels=in_px, info=info)
        method = cfg["conv_method"]
        if method == "svd":
            m = w.reshape(n, c * kh * kw).T.astype(np.float64)    # C·kh·kw × N
            info["kernel"] = (c, kh, kw)
            return Layer(node, "conv", "svd", m, bias, macs, w.size, rows=out_px,
                         in_pixels=in_px, info=info)
        mid_px = int(ys[0]) * int(xs[1])                          # after the kh×1 stage
        return Layer(node, "conv", method, w.astype(np.float64), bias, macs, w.size,
                     rows=out_px, in_pixels=in_px, mid_pixels=mid_px, info=info)

    def _spatial(self, graph, tensor, rank: int, ctx) -> tuple | None:
        """Spatial dims of a conv's input/output: declared, else from shape inference
        with the graph inputs' symbolic dims made concrete (the calibration data's
        shape when given, else 64: only ratios of pixel counts enter the cost model)."""
        shape = tensor.shape
        if shape is not None and len(shape) == rank and all(
                isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:]):
            return tuple(int(d) for d in shape[2:])
        if self._probe is None:
            self._probe = _probe_shapes(graph, ctx)
        probed = self._probe.get(tensor.name)
        if probed is None or len(probed) != rank:
            return None
        return tuple(probed[2:])

    # -- data-aware: calibration inputs of FC / 1×1 layers -------------------------------
    # Data-aware k×k splits refit their last stage so that, on calibration images, the
    # split layer fed by the network *as split so far* reproduces the original layer's
    # output (asymmetric reconstruction, Zhang et al. 2016): each refit also absorbs the
    # error of the splits before it, which compounds otherwise (a development comparison
    # on ResNet-20 at -50% MACs: clearly better top-1 than refitting on original inputs).
    def _conv_targets(self, original, layers, data) -> None:
        """Outputs of the original convs, a chunk of layers per run (bounds memory)."""
        from ._activations import collect

        if layers:
            ys = collect(original, [l.node.outputs[0].name for l in layers],
                         data.take(min(len(data), CONV_REFIT_SAMPLES)))
            for layer in layers:
                layer.info["y"] = ys[layer.node.outputs[0].name]

    def _conv_inputs(self, graph, layer, data) -> None:
        from ._activations import collect

        name = layer.node.inputs[0].name
        layer.info["x"] = collect(graph, [name],
                                  data.take(min(len(data), CONV_REFIT_SAMPLES)))[name]

    def _whiten(self, graph, ctx, layers, report, data) -> None:
        from ._activations import collect

        targets = [l for l in layers if l.method == "svd" and l.kind in ("fc", "conv1x1")]
        plain = [l for l in layers if l.method == "svd" and l.kind == "conv"]
        if plain:
            report.note(f"data-aware fit does not cover the svd split of k×k convs; "
                        f"{len(plain)} layer(s) use the data-free decomposition")
        if not targets:
            return
        acts = collect(graph, [l.node.inputs[0].name for l in targets], data)
        rng = ctx.rng(4)
        for layer in targets:
            x = acts[layer.node.inputs[0].name]
            if layer.kind == "conv1x1":
                x = np.moveaxis(x, 1, -1)                 # N × H × W × C: pixels are rows
            x = x.reshape(-1, layer.weight.shape[0])      # rows × in
            if len(x) > MAX_PIXEL_ROWS:
                x = x[rng.choice(len(x), MAX_PIXEL_ROWS, replace=False)]
            if len(x) < layer.weight.shape[0]:
                ctx.warn(f"lowrank: {len(x)} calibration rows for {layer.weight.shape[0]} "
                         f"inputs of '{layer.name}': the whitening relies on the ridge "
                         f"term for unseen directions (more --calib-samples help)")
            layer.info["x"] = x

    def _spectra(self, layers) -> None:
        for layer in layers:
            if layer.method == "svd":
                x = layer.info.pop("x", None)
                if x is not None:
                    layer.info["data_free_s"] = lm.fc_spectrum(layer.weight)[0]
                s, q = lm.fc_spectrum(layer.weight, x)
                layer.spectra, layer.basis = (s,), q
                layer.info["data_aware"] = x is not None
            elif layer.method == "tucker2":
                layer.spectra = lm.channel_spectra(layer.weight)

    # -- rank selection ----------------------------------------------------------------
    def _choose_ranks(self, layers, cfg, report) -> list[Layer]:
        force = cfg["force"]
        if cfg["flops"] is not None:
            self._budget_ranks(layers, cfg["flops"], force)
        for layer in layers:
            if cfg["flops"] is not None:
                continue                               # ranks set by _budget_ranks
            if cfg["rank"] is not None:
                layer.ranks = layer.ranks_fixed(cfg["rank"])
            elif cfg["vbmf"]:
                layer.ranks = layer.ranks_vbmf()
            else:
                layer.ranks = layer.ranks_at_energy(cfg["energy"])
        chosen = []
        for layer in layers:
            if not layer.ranks:
                report.skip(layer.name, "no rank within the MACs budget saves MACs")
            elif force or layer.pays(layer.ranks):
                chosen.append(layer)
            else:
                report.skip(layer.name, f"{layer.method} at rank "
                                        f"{'x'.join(map(str, layer.ranks))} would not save "
                                        f"MACs ({layer.cost(layer.ranks)[0]:,} vs "
                                        f"{layer.macs:,})")
        return chosen

    def _budget_ranks(self, layers, fraction, force) -> None:
        """Ranks meeting 'remove ``fraction`` of the eligible MACs'.

        Layers with spectra share one energy threshold e: their MACs after the split
        only grow with e, so bisection finds the largest e within budget. CP layers
        (no spectrum) each get the largest rank within their own share.
        """
        spectral = [l for l in layers if l.spectra]
        for layer in layers:
            if not layer.spectra:
                r = layer.ranks_for_macs((1 - fraction) * layer.macs)
                layer.ranks = r if layer.cost(r)[0] <= (1 - fraction) * layer.macs else ()
        if not spectral:
            return
        target = (1 - fraction) * sum(l.macs for l in spectral)

        def total(energy):
            out = 0
            for l in spectral:
                r = l.ranks_at_energy(energy)
                out += l.cost(r)[0] if force or l.pays(r) else l.macs
            return out

        lowest = total(1e-12)
        if lowest > target:
            floor = 1 - lowest / sum(l.macs for l in spectral)
            raise UsageError(f"--lowrank-flops {fraction} is out of reach: splitting at "
                             f"rank 1 removes at most {100 * floor:.1f}% of the eligible "
                             f"layers' MACs")
        lo, hi = 1e-12, 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(mid) <= target else (lo, mid)
        for l in spectral:
            l.ranks = l.ranks_at_energy(lo)
            l.info["energy"] = lo

    # -- rewriting ----------------------------------------------------------------------
    def _split(self, graph, layer, cfg, ctx) -> dict:
        iters = cfg["iters"]
        if layer.method == "svd":
            (r,) = layer.ranks
            a, b = lm.fc_factors(layer.weight, layer.basis, r)        # in × r, r × out
            err = lm.relative_error(layer.weight, a @ b)
            if layer.kind == "fc":
                self._rewrite_fc(graph, layer, a, b)
            else:
                self._rewrite_conv_svd(graph, layer, a, b)
        elif layer.method == "tucker2":
            r_out, r_in = layer.ranks
            iters = DEFAULT_ALS_ITERS["tucker2"] if iters is None else iters
            core, u_out, u_in = lm.tucker2(layer.weight, r_out, r_in, iters)
            err = lm.relative_error(layer.weight, lm.tucker2_reconstruct(core, u_out, u_in))
            n, c = layer.weight.shape[:2]
            stages = [(u_in.T.reshape(r_in, c, 1, 1), {}),
                      (core, _geometry(layer.node.attrs)),
                      (u_out.reshape(n, r_out, 1, 1), {})]
        else:
            (r,) = layer.ranks
            iters = DEFAULT_ALS_ITERS["cp"] if iters is None else iters
            a, b, kh, kw = lm.cp_als(layer.weight, r, iters, seed=ctx.seed)
            err = lm.relative_error(layer.weight, lm.cp_reconstruct(a, b, kh, kw))
            n, c, h, w = layer.weight.shape
            geo_h, geo_w = _separable_geometry(layer.node.attrs)
            stages = [(b.T.reshape(r, c, 1, 1), {}),
                      (kh.T.reshape(r, 1, h, 1), {**geo_h, "group": r}),
                      (kw.T.reshape(r, 1, 1, w), {**geo_w, "group": r}),
                      (a.reshape(n, r, 1, 1), {})]
        if layer.method != "svd":
            bias = layer.bias
            if "x" in layer.info:
                stages, bias = _refit_last_stage(stages, layer, ctx)
            self._conv_chain(graph, layer, stages, bias)
        macs, params = layer.cost(layer.ranks)
        row = {"node": layer.name, "op": layer.node.op, "method": layer.method,
               "ranks": list(layer.ranks), "macs_before": layer.macs, "macs_after": macs,
               "params_before": layer.params, "params_after": params,
               "weight_rel_error": round(err, 6)}
        if layer.info.get("data_aware"):
            row["data_aware"] = True
        if "refit_rel_error" in layer.info:
            row["data_aware"] = True
            row["output_rel_error_before_refit"] = layer.info["plain_rel_error"]
            row["output_rel_error"] = layer.info["refit_rel_error"]
        return row

    def _rewrite_fc(self, graph, layer, a, b) -> None:
        node, dtype = layer.node, layer.info["dtype"]
        x, y = node.inputs[0], node.outputs[0]
        mid = graph.make_variable(node.name + "_lowrank", dtype=y.dtype or np.float32)
        if node.op == "Gemm":
            # Two Gemms in the usual (out × in, transB=1) layout; the bias stays last.
            first = gs.Node("Gemm", graph.unique_name(node.name + "_lr_a"),
                            attrs={"transB": 1},
                            inputs=[x, graph.make_constant(node.name + "_lr_a_w",
                                                           a.T.astype(dtype))],
                            outputs=[mid])
            second_in = [mid, graph.make_constant(node.name + "_lr_b_w", b.T.astype(dtype))]
            if layer.bias is not None:
                second_in.append(graph.make_constant(node.name + "_lr_b_c",
                                                     layer.bias.astype(dtype)))
            second = gs.Node("Gemm", graph.unique_name(node.name + "_lr_b"),
                             attrs={"transB": 1}, inputs=second_in, outputs=[y])
        else:
            first = gs.Node("MatMul", graph.unique_name(node.name + "_lr_a"),
                            inputs=[x, graph.make_constant(node.name + "_lr_a_w",
                                                           a.astype(dtype))],
                            outputs=[mid])
            second = gs.Node("MatMul", graph.unique_name(node.name + "_lr_b"),
                             inputs=[mid, graph.make_constant(node.name + "_lr_b_w",
                                                              b.astype(dtype))],
                             outputs=[y])
        node.inputs.clear()
        node.outputs.clear()
        graph.gs.nodes.extend([first, second])

    def _rewrite_conv_svd(self, graph, layer, a, b) -> None:
        # First conv: the original geometry (k×k, stride, pads) with r outputs, no bias
        # (so padded zeros stay zero); second: 1×1, r -> N, with the bias.
        r = a.shape[1]
        n = b.shape[1]
        if layer.kind == "conv1x1":
            c, kh, kw = a.shape[0], 1, 1
        else:
            c, kh, kw = layer.info["kernel"]
        self._conv_chain(graph, layer, [
            (a.T.reshape(r, c, kh, kw), _geometry(layer.node.attrs)),
            (b.T.reshape(n, r, 1, 1), {}),
        ], layer.bias)

    def _conv_chain(self, graph, layer, stages, bias) -> None:
        """Replace the conv by convs ``stages`` = [(weight, attrs)]; ``bias`` goes last."""
        node, dtype = layer.node, layer.info["dtype"]
        x, y = node.inputs[0], node.outputs[0]
        current = x
        new_nodes = []
        for i, (weight, attrs) in enumerate(stages):
            last = i == len(stages) - 1
            suffix = "abcd"[i]
            if layer.info.get("conv1d"):
                weight = np.asarray(weight)[:, :, 0, :]      # back to (out, in, k)
            out = y if last else graph.make_variable(f"{node.name}_lr_{suffix}_out",
                                                     dtype=y.dtype or np.float32)
            inputs = [current, graph.make_constant(f"{node.name}_lr_{suffix}_w",
                                                   np.asarray(weight).astype(dtype))]
            if last and bias is not None:
                inputs.append(graph.make_constant(f"{node.name}_lr_{suffix}_b",
                                                  np.asarray(bias).astype(dtype)))
            attrs = {"kernel_shape": list(np.shape(weight)[2:]), **attrs}
            new_nodes.append(gs.Node("Conv", graph.unique_name(f"{node.name}_lr_{suffix}"),
                                     attrs=attrs, inputs=inputs, outputs=[out]))
            current = out
        node.inputs.clear()
        node.outputs.clear()
        graph.gs.nodes.extend(new_nodes)

    # -- report -----------------------------------------------------------------------
    def _report(self, report, layers, chosen, rows, cfg) -> None:
        report.changed = len(chosen)
        eligible = sum(l.macs for l in layers)
        saved = sum(r["macs_before"] - r["macs_after"] for r in rows)
        params_saved = sum(r["params_before"] - r["params_after"] for r in rows)
        by_method = {}
        for r in rows:
            by_method[r["method"]] = by_method.get(r["method"], 0) + 1
        report.note(f"split {len(chosen)} of {len(layers)} eligible layer(s) ("
                    + ", ".join(f"{k} {v}" for k, v in sorted(by_method.items()))
                    + f") by {_rule_text(cfg)}")
        report.note(f"eligible layers' MACs {eligible:,} -> {eligible - saved:,} "
                    f"({-100 * saved / max(eligible, 1):+.1f}%), weight params "
                    f"-{params_saved:,}")
        energies = {round(l.info["energy"], 4) for l in chosen if "energy" in l.info}
        if energies:
            report.note(f"budget met at energy threshold {min(energies):.4f}")
        report.extra["lowrank"] = {"rule": _rule_text(cfg), "eligible_macs": eligible,
                                   "eligible_macs_after": eligible - saved, "layers": rows}


# ----------------------------------------------------------------------------------------
# helpers


# Size given to symbolic input dims other than the calibration data's, to probe shapes.
PROBE_DIM = 64


def _probe_shapes(graph, ctx) -> dict:
    """{tensor name: concrete shape} from ONNX shape inference (with data propagation)
    on the graph with its inputs' symbolic dims set: to the calibration samples' dims
    when there are any, else 1 for a leading dim and PROBE_DIM for the others."""
    given = {}
    if ctx is not None and getattr(ctx, "calibration", None) is not None:
        sample = ctx.calibration.take(1).inputs
        given = {k: np.shape(v) for k, v in sample.items()}

    def dim(name, axis):
        shape = given.get(name)
        return int(shape[axis]) if shape is not None and axis < len(shape) \
            else (1 if axis == 0 else PROBE_DIM)

    # Declared symbolic shapes would stay symbolic: inference fills them anew.
    return graph.concrete_shapes(dim, fresh=True)


def _geometry(attrs) -> dict:
    """The original conv's spatial attributes (everything but kernel_shape and group)."""
    return {k: v for k, v in attrs.items() if k not in ("kernel_shape", "group")}


def _separable_geometry(attrs) -> tuple[dict, dict]:
    """Split 2-D stride/pads/dilation into an (h × 1) part and a (1 × w) part."""
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))          # top, left, bottom, right
    h = {"strides": [strides[0], 1], "dilations": [dil[0], 1]}
    w = {"strides": [1, strides[1]], "dilations": [1, dil[1]]}
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "", b"NOTSET"):
        # SAME_*/VALID pad each axis independently, so each 1-D stage can keep it.
        h["auto_pad"] = w["auto_pad"] = auto_pad
    else:
        h["pads"] = [pads[0], 0, pads[2], 0]
        w["pads"] = [0, pads[1], 0, pads[3]]
    return h, w


def _refit_last_stage(stages, layer, ctx):
    """Data-aware conv split: keep the first stages, refit the last 1×1 (R -> N) and the
    bias by least squares so the split layer's output matches the original conv's output
    on calibration activations (per pixel: y ≈ a·z + b, z = the first stages' output)."""
    x, y = layer.info.pop("x"), layer.info.pop("y")          # n × C × H × W, n × N × Ho × Wo
    z = _run_stages(stages[:-1], x)                          # n × R × Ho × Wo
    r, n_out = z.shape[1], y.shape[1]
    z_rows = np.moveaxis(z, 1, -1).reshape(-1, r)
    y_rows = np.moveaxis(y, 1, -1).reshape(-1, n_out)
    if len(z_rows) > MAX_PIXEL_ROWS:
        pick = ctx.rng(5).choice(len(z_rows), MAX_PIXEL_ROWS, replace=False)
        z_rows, y_rows = z_rows[pick], y_rows[pick]
    old = stages[-1][0].reshape(n_out, r)
    bias0 = np.zeros(n_out) if layer.bias is None else np.asarray(layer.bias, np.float64)
    m, c = lm.ridge_fit(z_rows, y_rows, ridge=1e-6)          # R × N, N
    norm = max(float(np.linalg.norm(y_rows)), 1e-30)
    layer.info["plain_rel_error"] = round(float(
        np.linalg.norm(z_rows @ old.T + bias0 - y_rows)) / norm, 5)
    layer.info["refit_rel_error"] = round(float(
        np.linalg.norm(z_rows @ m + c - y_rows)) / norm, 5)
    return stages[:-1] + [(m.T.reshape(stages[-1][0].shape), stages[-1][1])], c


def _run_stages(stages, x: np.ndarray) -> np.ndarray:
    """Run a chain of convs ``[(weight, attrs)]`` on x with ONNX Runtime."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxc.execution import Runner

    nodes, inits, current = [], [], "x"
    for i, (weight, attrs) in enumerate(stages):
        weight = np.asarray(weight, np.float32)
        if x.ndim == 3 and weight.ndim == 4:
            weight = weight[:, :, 0, :]                       # a 1-D conv's (out, in, k)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        attrs = {"kernel_shape": list(np.shape(weight)[2:]), **attrs}
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"z{i}"], **attrs))
        current = f"z{i}"
    graph = helper.make_graph(
        nodes, "stages", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["N"] + list(x.shape[1:]))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return Runner(model).run({"x": np.asarray(x, np.float32)})[0]


def _rule_text(cfg) -> str:
    if cfg["flops"] is not None:
        text = f"MACs budget -{100 * cfg['flops']:.0f}%"
    elif cfg["rank"] is not None:
        text = f"fixed rank {cfg['rank']}"
    elif cfg["vbmf"]:
        text = "VBMF ranks"
    else:
        text = f"energy {cfg['energy']}"
    multiple = cfg.get("multiple", 1)
    return text + (f", ranks rounded up to multiples of {multiple}" if multiple > 1 else "")


def _skip_summary(report) -> str:
    if not report.skipped:
        return ""
    reasons = {}
    for s in report.skipped:
        reasons.setdefault(s["reason"], []).append(s["node"])
    first, nodes = next(iter(reasons.items()))
    more = f" (+{len(report.skipped) - len(nodes)} other skip(s))" \
        if len(report.skipped) > len(nodes) else ""
    return f"; e.g. {nodes[0]}: {first}{more}"
