"""gap: replace a flatten-into-FC classifier head by GlobalAveragePool → FC.

VGG, AlexNet, ZFNet and LeNet-style nets flatten a C×H×W feature map (H·W > 1) into
fully connected layers; the first FC alone holds most of the weights (VGG-19: 103 M of
144 M). Following VGG-GAP / Network-in-Network, the map is averaged per channel instead
(C values) and the FC that read C·H·W values is refitted to read C:

- default: the first FC becomes C → hidden; the later FC layers stay, the last one is
  refitted so the logits match (when there are several);
- ``--gap-collapse``: the whole FC stack becomes one FC C → classes;
- ``--gap-grid K`` (K > 1): not a global average but the averages of a K×K grid of
  regions (AveragePool), so the FC reads C·K² values and keeps coarse positions — for
  heads that lean on where things are in the map, which one average per channel loses.

Fitting: with calibration data (``--calib-data``) the new FC weights are a ridge least-
squares fit on calibration activations, so the new head's outputs match the old head's
(first-FC pre-activations, then logits); VGG-GAP needed retraining, this starts close
without any. Without data the first FC's weights are summed over the H·W positions
(exact when the map is spatially constant) and a warning says so.

The head must be a plain chain: Flatten/Reshape → FC (Gemm, or MatMul [+ Add]) →
elementwise activation → … → FC [→ Softmax/LogSoftmax] → graph output, each tensor
read once. Anything else is reported and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.errors import UnsupportedError, UsageError
from onnxc.options import positive_int
from onnxc.pipeline import CalibrationData, Option, Pass, register_pass

from ._lowrank_math import ridge_fit

_ACTIVATIONS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu"}
_FINAL = {"Softmax", "LogSoftmax"}
FORMS = ("hidden", "collapse", "auto")
AUTO_NEEDS_DATA = ("gap: --gap-form auto chooses on held-out calibration data and needs "
                   "--calib-data")
# Ridge strengths (relative to the mean feature power) tried on the held-out share of the
# calibration set; the pooled features are few (C) but strongly correlated.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
HELD_OUT_SHARE = 0.2
MIN_SELECT_SAMPLES = 50      # below this, no held-out split: ridge 1e-3, form as asked
RELU_FIT_ITERS = 10          # alternating-projection rounds of the ReLU-aware first-FC fit


@dataclass
class Step:
    """One element of the head: an FC (y = x·m + c) or an elementwise activation."""

    kind: str                  # "fc" | "act" | "final"
    nodes: list
    m: np.ndarray | None = None       # in × out
    c: np.ndarray | None = None       # out
    op: str = ""
    attrs: dict = field(default_factory=dict)
    clip: tuple = (None, None)        # Clip's constant min/max inputs

    def apply(self, x: np.ndarray) -> np.ndarray:
        """numpy forward (rows × features), used to fit and to measure the new head."""
        if self.kind == "fc":
            return x @ self.m + (0 if self.c is None else self.c)
        if self.op == "Relu":
            return np.maximum(x, 0)
        if self.op == "LeakyRelu":
            a = float(self.attrs.get("alpha", 0.01))
            return np.where(x >= 0, x, a * x)
        if self.op == "Sigmoid":
            return 1 / (1 + np.exp(-x))
        if self.op == "Tanh":
            return np.tanh(x)
        if self.op == "Elu":
            a = float(self.attrs.get("alpha", 1.0))
            return np.where(x >= 0, x, a * (np.exp(np.minimum(x, 0)) - 1))
        if self.op == "Clip":
            lo, hi = self.clip
            return np.clip(x, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        return x            # final Softmax: not part of the logits being matched


@dataclass
class Head:
    flatten: gs.Node
    fmap: gs.Variable          # N × C × H × W
    steps: list
    channels: int
    positions: int             # H·W
    height: int = 0
    width: int = 0

    @property
    def fcs(self) -> list:
        return [s for s in self.steps if s.kind == "fc"]

    def params(self) -> int:
        return _fc_params(self.steps)


@register_pass
class GlobalAveragePoolHead(Pass):
    name = "gap"
    summary = "replace a flatten->FC classifier head by GlobalAveragePool->FC (fitted)"
    order = 20
    exact = False
    # Without data the fit is data-free (and warns), except --gap-form auto, which chooses
    # on held-out data: that fails before any pass runs.
    requires = (CalibrationData(when=lambda config: config.gap_form == "auto", fallback=None,
                                message=AUTO_NEEDS_DATA),)
    options = (
        Option("--gap-collapse", action="store_true",
               help="replace the whole FC stack by one FC (channels -> classes); "
                    "same as --gap-form collapse"),
        Option("--gap-form", str, None, choices=FORMS,
               help="hidden (default: keep the FC stack, first FC reads C values), "
                    "collapse (one FC), or auto (needs data: fit both, keep the one with "
                    "the lower logit error on the held-out 20%% of the calibration set)"),
        Option("--gap-grid", positive_int, 1,
               help="pool to a K x K grid of regional averages (AveragePool) instead of "
                    "one global average (K=1, default); H and W must be divisible by K"),
        Option("--gap-samples", positive_int, 512, help="calibration samples for the fit"),
        Option("--gap-data-free", action="store_true",
               help="ignore calibration data: sum the first FC's weights over positions"),
        Option("--gap-fit", str, "lstsq", choices=("lstsq", "kl"),
               help="how the logit layer is fitted: lstsq (match the logits) or kl "
                    "(then minimise KL to the old head's softmax: better argmax)"),
    )

    def validate(self, ctx) -> None:
        self._form()

    def _form(self) -> str:
        form, collapse = self.config.gap_form, self.config.gap_collapse
        if collapse and form not in (None, "collapse"):
            raise UsageError(f"--gap-collapse contradicts --gap-form {form}")
        return "collapse" if collapse else (form or "hidden")

    def run(self, graph, ctx, report):
        heads, reasons = self._find_heads(graph)
        for node, reason in reasons:
            report.skip(node, reason)
        if not heads:
            detail = f": {reasons[0][0]}: {reasons[0][1]}" if reasons else \
                " (no Flatten/Reshape of a 4-D feature map into a Gemm/MatMul)"
            raise UnsupportedError("gap: no plain classifier head to replace" + detail)
        form = self._form()
        collapse = form == "collapse"
        data_free = self.config.gap_data_free or ctx.calibration is None
        if form == "auto" and data_free:
            raise UsageError(AUTO_NEEDS_DATA)
        grid = self.config.gap_grid
        for head in heads:
            if head.height % grid or head.width % grid:
                raise UsageError(f"gap: --gap-grid {grid} does not divide the "
                                 f"{head.height}x{head.width} map '{head.fmap.name}'")
            if grid * grid >= head.positions:
                raise UsageError(f"gap: --gap-grid {grid} keeps the whole "
                                 f"{head.height}x{head.width} map '{head.fmap.name}': "
                                 f"nothing to pool")
        for head in heads:
            nonlinear = any(s.kind == "act" for s in head.steps)
            if collapse and data_free and nonlinear:
                raise UsageError("gap: --gap-collapse of a head with activations needs "
                                 "calibration data (--calib-data); without it only the "
                                 "first FC can be refitted")
        if data_free and not self.config.gap_data_free:
            ctx.warn("gap: no --calib-data: data-free fit (first FC's weights summed over "
                     "positions); logits will move more than with a data fit")
        acts = {} if data_free else self._activations(graph, ctx, heads, grid)
        kl = self.config.gap_fit == "kl"

        summaries = []
        for head in heads:
            before = head.params()
            if data_free:
                steps, fit = self._fit_data_free(head, collapse, grid), None
            else:
                steps, fit = self._fit_data(head, acts, form, kl, grid)
            self._rewrite(graph, head, steps, grid)
            after = _fc_params(steps)
            row = {"flatten": head.flatten.name, "channels": head.channels,
                   "positions": head.positions, "grid": grid,
                   "pooled_features": head.channels * grid * grid,
                   "fc_layers_before": len(head.fcs),
                   "fc_layers_after": sum(s.kind == "fc" for s in steps),
                   "head_params_before": before, "head_params_after": after,
                   "fit": "data-free" if data_free else
                   ("least-squares + KL" if kl else "least-squares"),
                   "form": "collapse" if _collapsed(head, steps) else "hidden"}
            if fit:
                row.update(fit)
            summaries.append(row)
            pool = "GAP" if grid == 1 else f"{grid}x{grid} average pool"
            report.note(f"head at '{head.flatten.name}': {head.channels}x{head.positions} "
                        f"-> {pool}, {row['fc_layers_before']} -> {row['fc_layers_after']} FC, "
                        f"head params {before:,} -> {after:,} "
                        f"({-100 * (before - after) / max(before, 1):+.1f}%)"
                        + (f", calibration logit rel. error {fit['logit_rel_error']:.3f}"
                           if fit else ", data-free fit")
                        + (f", argmax agreement {100 * fit['argmax_agreement']:.1f}%"
                           if fit and fit["argmax_agreement"] is not None else ""))
        report.changed = len(heads)
        report.extra["gap"] = summaries
        return graph

    # -- discovery ----------------------------------------------------------------------
    def _find_heads(self, graph):
        heads, reasons = [], []
        for node in graph.nodes:
            if node.op not in ("Flatten", "Reshape") or not node.inputs:
                continue
            x, y = node.inputs[0], node.outputs[0]
            consumers = list(y.outputs)
            if not any(c.op in ("Gemm", "MatMul") for c in consumers):
                continue
            if x.shape is None or len(x.shape) != 4 or \
                    not all(isinstance(d, (int, np.integer)) for d in x.shape[1:]):
                reasons.append((node.name, "flattened tensor is not a 4-D map of known size"))
                continue
            c, h, w = (int(d) for d in x.shape[1:])
            if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
                reasons.append((node.name, "Flatten axis is not 1"))
                continue
            if node.op == "Reshape" and (y.shape is None or len(y.shape) != 2
                                         or y.shape[1] != c * h * w):
                reasons.append((node.name, "Reshape does not give N × C·H·W"))
                continue
            if h * w == 1:
                reasons.append((node.name, f"feature map is already {c}x1x1 (global pool "
                                           f"head); nothing to replace"))
                continue
            steps, why = self._walk(graph, y, c * h * w)
            if steps is None:
                reasons.append((node.name, f"not a plain classifier head: {why}"))
                continue
            heads.append(Head(node, x, steps, c, h * w, h, w))
        return heads, reasons

    def _walk(self, graph, tensor, width):
        """Follow single-consumer FC/activation nodes from the flattened tensor to a graph
        output; (steps, None) or (None, reason)."""
        steps = []
        while True:
            if graph.is_graph_output(tensor):
                break
            consumers = list(tensor.outputs)
            if len(consumers) != 1:
                return None, f"'{tensor.name}' is read by {len(consumers)} nodes"
            node = consumers[0]
            if steps and steps[-1].kind == "final":
                return None, f"{steps[-1].op} is followed by {node.op}"
            if node.op in ("Gemm", "MatMul"):
                step = _fc_step(graph, node, tensor, width)
                if isinstance(step, str):
                    return None, step
                width = step.m.shape[1]
            elif node.op == "Add" and steps and steps[-1].kind == "fc" \
                    and len(steps[-1].nodes) == 1 and steps[-1].nodes[0].op == "MatMul":
                other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
                bias = graph.constant(other)
                if bias is None or bias.size not in (1, width):
                    return None, f"Add '{node.name}' is not a constant bias"
                prev = steps[-1]
                prev.c = np.broadcast_to(bias.astype(np.float64).reshape(-1), (width,)) \
                    + (0 if prev.c is None else prev.c)
                prev.nodes.append(node)
                tensor = node.outputs[0]
                continue
            elif node.op in _ACTIVATIONS:
                step = Step("act", [node], op=node.op, attrs=dict(node.attrs))
                if node.op == "Clip":
                    bounds = [graph.constant(t) if t is not None and t.name else None
                              for t in list(node.inputs[1:3]) + [None] * 2][:2]
                    if any(t is not None and t.name and b is None
                           for t, b in zip(node.inputs[1:3], bounds)):
                        return None, "Clip bounds are not constant"
                    lo = bounds[0] if bounds[0] is not None else node.attrs.get("min")
                    hi = bounds[1] if bounds[1] is not None else node.attrs.get("max")
                    step.clip = (None if lo is None else float(lo),
                                 None if hi is None else float(hi))
            elif node.op in _FINAL:
                step = Step("final", [node], op=node.op, attrs=dict(node.attrs))
            else:
                return None, f"{node.op} '{node.name}' inside the head"
            steps.append(step)
            tensor = node.outputs[0]
        if not steps or not any(s.kind == "fc" for s in steps):
            return None, "no FC layer"
        last_fc = max(i for i, s in enumerate(steps) if s.kind == "fc")
        if any(s.kind == "act" for s in steps[last_fc + 1:]):
            return None, "an activation follows the last FC (logits are not linear)"
        return steps, None

    # -- fitting ------------------------------------------------------------------------
    def _activations(self, graph, ctx, heads, grid=1) -> dict:
        from ._activations import collect

        n = self.config.gap_samples
        if ctx.calibration is not None:
            n = min(n, len(ctx.calibration))
        data = ctx.calibration_data(graph, n)
        names = []
        for head in heads:
            names.append(head.fmap.name)
            names += [s.nodes[-1].outputs[0].name for s in head.fcs]
        acts = collect(graph, names, data)
        smallest = min(h.channels for h in heads) * grid * grid
        if n <= smallest:
            ctx.warn(f"gap: {n} calibration samples for {smallest} pooled features: the "
                     f"fit is underdetermined and leans on the ridge term")
        return acts

    def _fit_data_free(self, head, collapse, grid=1) -> list:
        first = head.fcs[0]
        # m: (C·H·W) × out with rows in (c, y, x) order, as Flatten lays them out; summed
        # over the positions of each grid region (all of them for GAP): exact when the
        # map is constant within each region.
        k = grid
        m = first.m.reshape(head.channels, k, head.height // k, k, head.width // k, -1) \
            .sum(axis=(2, 4)).reshape(head.channels * k * k, -1)        # C·k² × out
        new_first = Step("fc", first.nodes, m=m, c=first.c)
        steps = [new_first if s is first else s for s in head.steps]
        if collapse:   # only reached for linear stacks: compose them exactly
            steps = _compose_linear(steps)
        return steps

    def _fit_data(self, head, acts, form, kl=False, grid=1):
        fmap = acts[head.fmap.name].astype(np.float64)          # n × C × H × W
        g = _pool(fmap, grid)                                   # n × C·grid²
        fcs = head.fcs
        logits = acts[fcs[-1].nodes[-1].outputs[0].name].reshape(len(g), -1)
        logits = logits.astype(np.float64)                      # n × classes
        hidden = acts[fcs[0].nodes[-1].outputs[0].name].reshape(len(g), -1) \
            .astype(np.float64) if len(fcs) > 1 else None      # first FC's outputs
        forms = ["collapse"] if len(fcs) == 1 else \
            (["hidden", "collapse"] if form == "auto" else [form])
        relu = _relu_after_first_fc(head)
        # (form, ReLU-aware first-FC fit) pairs to try; the ReLU-aware fit lowers the
        # error after the ReLU, which usually but not always lowers the logit error.
        variants = [(f, r) for f in forms
                    for r in ((False, True) if f == "hidden" and relu else (False,))]
        # Choose the form and the ridge on a held-out share of the calibration samples
        # (the last 20%: a caller that adds flipped copies keeps each pair together at
        # an even boundary), scored by the logit error there, then refit on all samples.
        n = len(g)
        held = int(HELD_OUT_SHARE * n) // 2 * 2 if n >= MIN_SELECT_SAMPLES else 0
        tried = []
        if held:
            fit_rows, test_rows = slice(0, n - held), slice(n - held, n)
            for f, r in variants:
                for ridge in RIDGES:
                    steps = self._fit_form(head, f, g[fit_rows], hidden[fit_rows]
                                           if hidden is not None else None,
                                           logits[fit_rows], ridge, kl=False, relu_fit=r)
                    out = _head_logits(steps, g[test_rows])
                    ref = logits[test_rows]
                    tried.append({"form": f, "relu_fit": r, "ridge": ridge,
                                  "held_out_logit_rel_error":
                                  round(float(np.linalg.norm(out - ref)
                                              / max(np.linalg.norm(ref), 1e-30)), 5),
                                  "held_out_argmax_agreement": round(float(np.mean(
                                      out.argmax(1) == ref.argmax(1))), 5)})
            best = min(tried, key=lambda t: t["held_out_logit_rel_error"])
            chosen_form, relu_fit, ridge = best["form"], best["relu_fit"], best["ridge"]
        else:
            (chosen_form, relu_fit), ridge = variants[-1], 1e-3
        steps = self._fit_form(head, chosen_form, g, hidden, logits, ridge, kl, relu_fit)
        new_logits = _head_logits(steps, g)
        err = np.linalg.norm(new_logits - logits) / max(np.linalg.norm(logits), 1e-30)
        agree = float(np.mean(new_logits.argmax(1) == logits.argmax(1))) \
            if logits.shape[1] > 1 else None
        fit = {"calibration_samples": n, "logit_rel_error": round(float(err), 5),
               "argmax_agreement": agree, "ridge": ridge, "relu_fit": relu_fit}
        if chosen_form == "hidden":
            # Error of the new first hidden layer (after its activation) on the
            # calibration set: what the first fit controls.
            new_h, old_h = g @ steps[head.steps.index(fcs[0])].m, hidden
            new_h = new_h + steps[head.steps.index(fcs[0])].c
            act = head.steps[head.steps.index(fcs[0]) + 1]
            if act.kind == "act":
                new_h, old_h = act.apply(new_h), act.apply(old_h)
            fit["hidden_rel_error"] = round(float(np.linalg.norm(new_h - old_h) / max(
                np.linalg.norm(old_h), 1e-30)), 5)
        if tried:
            fit["held_out_samples"] = held
            fit["held_out"] = tried
            fit["held_out_logit_rel_error"] = best["held_out_logit_rel_error"]
        return steps, fit

    def _fit_form(self, head, form, g, hidden, logits, ridge, kl, relu_fit=False):
        """Steps of the new head fitted on pooled features ``g`` (n × C): ``collapse`` =
        one FC to the logits; ``hidden`` = the first FC fitted to the old first FC's
        outputs ``hidden`` (pre-activation; after a ReLU only its output is matched), the
        later FCs kept, the last refitted to the logits on the new penultimate activations
        (absorbing what the first could not reproduce)."""
        fcs = head.fcs
        if form == "collapse":
            m, c = _logit_fit(g, logits, kl, ridge)
            last = len(head.steps) - 1 - [s.kind for s in head.steps][::-1].index("fc")
            return [Step("fc", fcs[0].nodes, m=m, c=c)] + head.steps[last + 1:]
        m, c = ridge_fit(g, hidden, ridge)
        if relu_fit:
            # Only the ReLU's output matters: where the old pre-activation is <= 0, any
            # value <= 0 is as good as it. Alternate between those targets (the current
            # prediction clipped at 0) and the least-squares fit; each round lowers the
            # error (alternating minimisation).
            active = hidden > 0
            for _ in range(RELU_FIT_ITERS):
                target = np.where(active, hidden, np.minimum(g @ m + c, 0))
                m, c = ridge_fit(g, target, ridge)
        first = Step("fc", fcs[0].nodes, m=m, c=c)
        steps = [first if s is fcs[0] else s for s in head.steps]
        last = max(i for i, s in enumerate(steps) if s.kind == "fc")
        h = g
        for s in steps[:last]:
            h = s.apply(h)
        m, c = _logit_fit(h, logits, kl, ridge)
        steps[last] = Step("fc", steps[last].nodes, m=m, c=c)
        return steps

    # -- rewriting ----------------------------------------------------------------------
    def _rewrite(self, graph, head, steps, grid=1) -> None:
        out = (head.steps[-1].nodes[-1]).outputs[0]            # the head's graph output
        dtype = head.fmap.dtype or np.float32
        base = head.flatten.name
        pooled = graph.make_variable(base + "_gap", dtype=dtype)
        flat = graph.make_variable(base + "_gap_flat", dtype=dtype)
        if grid == 1:
            pool = gs.Node("GlobalAveragePool", graph.unique_name(base + "_gap"),
                           inputs=[head.fmap], outputs=[pooled])
        else:
            region = [head.height // grid, head.width // grid]
            pool = gs.Node("AveragePool", graph.unique_name(base + "_gap"),
                           attrs={"kernel_shape": region, "strides": region},
                           inputs=[head.fmap], outputs=[pooled])
        new_nodes = [
            pool,
            gs.Node("Flatten", graph.unique_name(base + "_gap_flatten"), attrs={"axis": 1},
                    inputs=[pooled], outputs=[flat]),
        ]
        current = flat
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            target = out if last else graph.make_variable(f"{base}_gap_h{i}", dtype=dtype)
            name = graph.unique_name(f"{base}_gap_{step.kind}{i}")
            if step.kind == "fc":
                inputs = [current, graph.make_constant(name + "_w",
                                                       step.m.T.astype(np.float32))]
                if step.c is not None:
                    inputs.append(graph.make_constant(
                        name + "_b", np.broadcast_to(step.c, (step.m.shape[1],))
                        .astype(np.float32)))
                new_nodes.append(gs.Node("Gemm", name, attrs={"transB": 1},
                                         inputs=inputs, outputs=[target]))
            else:
                original = step.nodes[0]
                new_nodes.append(gs.Node(original.op, name, attrs=dict(original.attrs),
                                         inputs=[current] + list(original.inputs[1:]),
                                         outputs=[target]))
            current = target
        for step in head.steps:
            for node in step.nodes:
                node.inputs.clear()
                node.outputs.clear()
        graph.gs.nodes.extend(new_nodes)


# ----------------------------------------------------------------------------------------


def _fc_step(graph, node, x, width):
    """Step for an FC node reading ``x`` (rows × width), or the reason it is not one."""
    if node.inputs[0] is not x or len(node.inputs) < 2:
        return f"{node.op} '{node.name}' reads the features as its weight operand"
    w = graph.constant(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return f"{node.op} '{node.name}' has no constant 2-D weight"
    c = None
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return f"Gemm '{node.name}' has transA=1"
        m = (w.T if int(node.attrs.get("transB", 0)) else w).astype(np.float64)
        m = m * float(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = graph.constant(node.inputs[2])
            if c is None or c.size not in (1, m.shape[1]):
                return f"Gemm '{node.name}' bias is not a constant vector"
            c = np.broadcast_to(c.astype(np.float64).reshape(-1) *
                                float(node.attrs.get("beta", 1.0)), (m.shape[1],))
    else:
        m = w.astype(np.float64)
    if m.shape[0] != width:
        return f"{node.op} '{node.name}' expects {m.shape[0]} inputs, gets {width}"
    return Step("fc", [node], m=m, c=c)


def _pool(fmap: np.ndarray, grid: int) -> np.ndarray:
    """n × C × H × W -> n × C·grid² region averages, in the order Flatten gives the
    pooled n × C × grid × grid map (grid 1: the global average per channel)."""
    n, c, h, w = fmap.shape
    return fmap.reshape(n, c, grid, h // grid, grid, w // grid).mean(axis=(3, 5)) \
        .reshape(n, c * grid * grid)


def _fc_params(steps) -> int:
    return sum(s.m.size + (0 if s.c is None else np.size(s.c)) for s in steps
               if s.kind == "fc")


def _relu_after_first_fc(head) -> bool:
    i = head.steps.index(head.fcs[0])
    return i + 1 < len(head.steps) and head.steps[i + 1].op == "Relu"


def _head_logits(steps, g: np.ndarray) -> np.ndarray:
    out = g
    for s in steps:
        out = s.apply(out) if s.kind != "final" else out
    return out


def _collapsed(head, steps) -> bool:
    return len(head.fcs) > 1 and sum(s.kind == "fc" for s in steps) == 1


def _logit_fit(x, logits, kl: bool, ridge: float = 1e-3):
    """Fit the logit layer: ridge least squares on the logits; with ``kl``, refine that by
    minimising KL(softmax(old logits) ‖ softmax(x·m + c)) (+ the same small ridge) with
    L-BFGS. Least squares weighs every logit alike, down to the irrelevant low ones; KL
    weighs them by the old head's probabilities, which is what decides the argmax."""
    m, c = ridge_fit(x, logits, ridge)
    if not kl:
        return m, c
    from scipy.optimize import minimize

    n, d = x.shape
    k = logits.shape[1]
    xb = np.hstack([x, np.ones((n, 1))])                         # n × (d+1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)                                 # old head's softmax
    lam = ridge * float(np.mean(x * x))

    def loss(flat):
        w = flat.reshape(d + 1, k)
        z = xb @ w
        z -= z.max(1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(1, keepdims=True))
        value = -float((p * log_q).sum()) / n + lam * float((w[:-1] ** 2).sum())
        grad = xb.T @ (np.exp(log_q) - p) / n
        grad[:-1] += 2 * lam * w[:-1]
        return value, grad.ravel()

    start = np.vstack([m, c[None]]).ravel()
    w = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
    w = w.reshape(d + 1, k)
    return w[:-1], w[-1]


def _compose_linear(steps) -> list:
    """Multiply consecutive FC layers (no activation between them) into one."""
    out = []
    for s in steps:
        if s.kind == "fc" and out and out[-1].kind == "fc":
            prev = out.pop()
            c_prev = 0 if prev.c is None else prev.c
            c = c_prev @ s.m + (0 if s.c is None else s.c)
            out.append(Step("fc", prev.nodes + s.nodes, m=prev.m @ s.m,
                            c=None if np.ndim(c) == 0 and c == 0 else c))
        else:
            out.append(s)
    return out

