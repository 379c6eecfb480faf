"""prune: structured channel pruning with consumer propagation.

1. ``groups.DependencyGraph`` walks the graph once; one rule per op family
   (``rules.py``) couples the channels that must go together (residual adds,
   concat offsets, channel pads, depthwise convs, flatten into Gemm, ...).
   Groups touching an op with no rule are left whole and listed in the report.
2. A criterion (``criteria.py``) scores every coupled channel; ``thinet``
   (``thinet.py``) instead picks channels by reconstruction error on calibration
   data and re-fits the consumer weights by least squares.
3. ``allocate.py`` turns ``--prune-ratio`` / ``--prune-flops`` (uniform, global or
   sensitivity-guided) into the removed set, honouring the minimum channel count
   and ``--prune-multiple``.
4. Each rule slices its own weights (``groups.rewrite``); the result is a smaller,
   dense ONNX graph.

Users' guide: docs/pruning.md.
"""

from __future__ import annotations

import fnmatch
import json
import math

import numpy as np

from onnxc.errors import DataError, UnsupportedError, UsageError
from onnxc.options import fraction, positive_int
from onnxc.pipeline import CalibrationData, Option, Pass, register_pass

from .allocate import MAX_RATIO, Allocator
from .criteria import CRITERIA
from .criteria import scores as criterion_scores
from .groups import DependencyGraph, rewrite


def prunable_groups(dg, skip_patterns, report=None, residual=True):
    """Groups that may be pruned: not blocked, not skipped. Reports the others."""
    matched = {p: 0 for p in skip_patterns}
    out = []
    for g in dg.groups:
        hits = [p for p in skip_patterns if any(fnmatch.fnmatchcase(s, p) for s in g.sources)]
        for p in hits:
            matched[p] += 1
        if g.blocked:
            if report is not None:
                report.skip(g.label, f"left whole: {g.blocked}")
            continue
        if hits:
            if report is not None:
                report.skip(g.label, f"--prune-skip '{hits[0]}'")
            continue
        if g.residual and not residual:
            if report is not None:
                report.skip(g.label, "residual group (channels shared through Add/Sum by "
                            f"{len(g.sources)} layers); --prune-residual prunes it")
            continue
        out.append(g)
    unmatched = [p for p, n in matched.items() if n == 0]
    if unmatched:
        sample = ", ".join(sorted({s for g in dg.groups for s in g.sources})[:4])
        raise UsageError(f"--prune-skip '{unmatched[0]}' matches no prunable layer "
                         f"(layer names look like: {sample})")
    return out


@register_pass
class Prune(Pass):
    name = "prune"
    summary = "remove whole channels/filters, rewriting every consumer (structured)"
    order = 30
    exact = False
    requires = (CalibrationData(when=lambda c: CRITERIA[c.prune_criterion].needs_data),)
    options = (
        Option("--prune-ratio", fraction, None, "share of channels removed in each group, "
               "in [0, 1) (default 0.5 when --prune-flops is not given)"),
        Option("--prune-flops", fraction, None, "share of MACs to remove, in [0, 1); "
               "per-group ratios are allocated to reach it"),
        Option("--prune-params", fraction, None, "share of parameters to remove, in [0, 1); "
               "alone or with --prune-flops (both budgets are met)"),
        Option("--prune-global", None, None, "rank channels across groups instead of the "
               "same ratio in each", action="store_true"),
        Option("--prune-skip", str, None, "comma-separated glob(s) of layer names whose "
               "group is left whole, e.g. '/conv1/*,*downsample*'"),
        Option("--prune-residual", None, None, "also prune groups whose channels several "
               "layers share through residual Add/Sum (e.g. a ResNet trunk); off by "
               "default: every block reads and writes them", action="store_true"),
        Option("--prune-criterion", str, "l1", "channel importance", choices=CRITERIA),
        Option("--prune-min-channels", positive_int, 1, "keep at least this many channels per group"),
        Option("--prune-multiple", positive_int, None, "round kept channel counts up to a multiple "
               "of this (e.g. 16 for VTA); default: 8 for groups of >= 16 channels "
               "(CPU SIMD blocks), 1 disables"),
        Option("--prune-ort-layout", None, None, "rewrite zero channel Pads (ResNet "
               "option-A shortcuts) as exact 1x1 selection convs so ONNX Runtime keeps the "
               "residual trunk in its NCHWc conv blocks", action="store_true"),
        Option("--prune-samples", positive_int, 256, "calibration samples for apoz/thinet"),
        Option("--prune-sensitivity", str, None, "JSON from 'onnxc sensitivity --json' to "
               "allocate --prune-flops by measured per-group error"),
        Option("--prune-group-ratios", str, None, "per-group ratios, 'LAYER=R,LAYER=R,...' "
               "with LAYER any producing layer of the group (what 'onnxc search' recipes "
               "record); unlisted groups use --prune-ratio, else stay whole"),
    )

    def validate(self, ctx):
        cfg = self.config
        if cfg.prune_ratio is not None and cfg.prune_flops is not None:
            raise UsageError("give either --prune-ratio or --prune-flops, not both")
        if cfg.prune_ratio is not None and cfg.prune_params is not None:
            raise UsageError("give either --prune-ratio or --prune-params, not both")
        if cfg.prune_group_ratios is not None:
            if cfg.prune_flops is not None or cfg.prune_params is not None:
                raise UsageError("--prune-group-ratios fixes every group's ratio: give no "
                                 "--prune-flops/--prune-params with it")
            parse_group_ratios(cfg.prune_group_ratios)
        if cfg.prune_sensitivity is not None:
            if cfg.prune_flops is None and cfg.prune_params is None:
                raise UsageError("--prune-sensitivity needs --prune-flops or --prune-params")
            load_curves(cfg.prune_sensitivity)

    def run(self, graph, ctx, report):
        cfg = self.config
        ratio, flops, params = cfg.prune_ratio, cfg.prune_flops, cfg.prune_params
        group_ratios = cfg.prune_group_ratios
        if group_ratios is not None:
            group_ratios = parse_group_ratios(group_ratios)
        elif ratio is None and flops is None and params is None:
            ratio = 0.5
            report.note("no --prune-ratio/--prune-flops given: pruning 50% per group")
        criterion = cfg.prune_criterion
        use_global = cfg.prune_global
        skip = [p.strip() for p in (cfg.prune_skip or "").split(",") if p.strip()]
        min_ch = cfg.prune_min_channels
        multiple = cfg.prune_multiple
        samples = cfg.prune_samples

        graph.name_nodes()
        dg = DependencyGraph(graph)
        groups = prunable_groups(dg, skip, report, residual=cfg.prune_residual)
        if not groups:
            why = nothing_to_prune_reason(graph, dg, skip)
            if flops is not None or params is not None or group_ratios:
                # A budget or named groups the user asked for cannot be met: an error.
                asked = "--prune-flops" if flops is not None else "--prune-params" \
                    if params is not None else "--prune-group-ratios"
                raise UnsupportedError(f"{asked} cannot be met: nothing to prune, no channel "
                                       f"group can be removed ({why})")
            # A ratio applies to the groups there are: with none, the model is valid as it
            # is, and the pass says it changed nothing and why.
            msg = f"prune changed nothing: no channel group can be removed ({why})"
            report.note(msg)
            ctx.warn(msg)
            if not report.skipped:
                report.skip("prune", why)
            report.extra.update({"criterion": criterion, "groups": len(dg.groups),
                                 "prunable_groups": 0, "channels_removed": 0,
                                 "per_group": [], "nothing_to_prune": why})
            return graph

        score = criterion_scores(criterion, dg, graph, ctx, samples)
        alloc = Allocator(dg, groups, score, min_ch, multiple,
                          auto_multiple=getattr(ctx, "channel_multiple", None))
        base = dg.estimate_macs(np.zeros(dg.num_classes, bool))
        before = graph.stats(with_bytes=False)
        base_params = before.params
        curves = None
        if cfg.prune_sensitivity:
            curves = match_curves(load_curves(cfg.prune_sensitivity), groups)
        if group_ratios is not None:
            counts = per_group_counts(alloc, groups, group_ratios, ratio or 0.0)
            removed = alloc.remove_counts(counts)
            report.note(f"--prune-group-ratios: {len(group_ratios)} group(s) named"
                        + (f", the others at --prune-ratio {ratio}" if ratio else
                           ", the others whole"))
        elif params is not None or curves is not None:
            removed, how = alloc.for_budgets(base, base_params, flops, params,
                                             use_global, curves)
            est, est_p = dg.estimate_macs(removed), base_params - dg.params_removed(removed)
            asked = " ".join(f"{flag} {v}" for flag, v in (("--prune-flops", flops),
                                                             ("--prune-params", params))
                             if v is not None)
            report.note(f"{asked}: {how}; estimated MACs {base:,} -> {est:,} "
                        f"(-{100 * (1 - est / max(base, 1)):.1f}%), params "
                        f"{base_params:,} -> {est_p:,} "
                        f"(-{100 * (1 - est_p / max(base_params, 1)):.1f}%)")
            short = []
            if flops is not None and est > (1.0 - flops) * base * 1.001:
                short.append(f"MACs -{100 * (1 - est / max(base, 1)):.1f}% < "
                             f"-{100 * flops:.1f}%")
            if params is not None and est_p > (1.0 - params) * base_params * 1.001:
                short.append(f"params -{100 * (1 - est_p / max(base_params, 1)):.1f}% < "
                             f"-{100 * params:.1f}%")
            if short:
                msg = (f"prune budget not reachable ({'; '.join(short)}): the prunable "
                       f"groups are cut as far as allowed (max ratio {MAX_RATIO}, "
                       f"--prune-min-channels, --prune-multiple; left-whole groups keep "
                       f"their channels)")
                report.note(msg)
                ctx.warn(msg)
        elif flops is not None:
            removed, level, topped = alloc.for_flops(flops, use_global, base)
            est = dg.estimate_macs(removed)
            how = f"ratio {level:.3f} ({'global share' if use_global else 'per group'})"
            if topped:
                how = (f"largest uniform ratio short of the target (just under {level:.3f}),"
                       f" topped up where the criterion says it hurts least")
            report.note(f"--prune-flops {flops}: {how}; "
                        f"estimated MACs {base:,} -> {est:,} "
                        f"(-{100 * (1 - est / max(base, 1)):.1f}%)")
            if est > (1.0 - flops) * base * 1.001:
                msg = (f"prune budget not reachable: MACs -{100 * (1 - est / max(base, 1)):.1f}%"
                       f" < -{100 * flops:.1f}% (groups cut as far as allowed)")
                report.note(msg)
                ctx.warn(msg)
        else:
            removed = alloc.select(ratio, use_global)

        custom = CRITERIA[criterion].rewrite
        if custom is not None:
            graph, removed = custom(graph, dg, groups, removed, ctx, report, samples,
                                    alloc.legal)
        else:
            rewrite(graph, dg, removed)

        per_group = []
        for g in groups:
            n = int(removed[g.classes].sum())
            if n:
                per_group.append({"group": g.label, "channels": int(len(g.classes)),
                                  "removed": n})
        graph.refresh()            # shapes are stale after the rewrite: MACs need them
        if cfg.prune_ort_layout:
            from .layout import channel_pads_as_convs

            n_pads = channel_pads_as_convs(graph)
            report.note(f"--prune-ort-layout: {n_pads} channel Pad shortcut(s) now 1x1 "
                        f"selection convs (exact; ORT keeps the trunk in NCHWc)")
            if n_pads:
                graph.refresh()
        after = graph.stats(with_bytes=False)
        report.note(f"achieved: MACs {before.macs:,} -> {after.macs:,} "
                    f"(-{100 * (1 - after.macs / max(before.macs, 1)):.1f}%), params "
                    f"{before.params:,} -> {after.params:,} "
                    f"(-{100 * (1 - after.params / max(before.params, 1)):.1f}%)")
        report.changed = int(removed.sum())
        report.extra.update({"criterion": criterion, "groups": len(dg.groups),
                             "prunable_groups": len(groups),
                             "channels_removed": int(removed.sum()),
                             "estimated_macs": dg.estimate_macs(removed),
                             "macs_removed_share": 1 - after.macs / max(before.macs, 1),
                             "params_removed_share": 1 - after.params / max(before.params, 1),
                             "per_group": per_group})
        report.note(f"{int(removed.sum())} of {sum(len(g.classes) for g in groups)} "
                    f"prunable channels removed in {len(per_group)} of {len(groups)} "
                    f"groups ({len(dg.groups) - len(groups)} left whole), "
                    f"criterion {criterion}")
        return graph


# ---- nothing to prune ----------------------------------------------------------------------

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


def nothing_to_prune_reason(graph, dg, skip) -> str:
    """Why no group is prunable, naming a node of the model where there is one."""
    if any(g.residual and not g.blocked for g in dg.groups):
        first = next(g for g in dg.groups if g.residual and not g.blocked)
        return (f"only residual groups are left, e.g. '{first.label}'; --prune-residual "
                f"prunes them")
    if skip and dg.groups and all(not g.blocked for g in dg.groups):
        return "every group is excluded by --prune-skip"
    blocked = [g for g in dg.groups if g.blocked]
    if blocked:
        g = blocked[0]
        more = f"; {len(blocked) - 1} more group(s) left whole, see report.json skipped" \
            if len(blocked) > 1 else ""
        return f"the group of '{g.label}': {g.blocked}{more}"
    nodes = graph.gs.nodes
    from onnxc.calibrate.qdq import prequantized_reason

    quant = next((n for n in nodes if n.op != "DynamicQuantizeLinear"
                  and prequantized_reason(graph, n)), None)
    if quant is not None:
        return (f"the layers are {prequantized_reason(graph, quant)}, e.g. '{quant.name}'; "
                f"no float Conv/Gemm/MatMul/LSTM/GRU weights are left")
    sub = next((n for n in nodes if n.op in ("If", "Loop", "Scan")), None)
    if sub is not None:
        return (f"the layers sit inside the subgraphs of '{sub.name}' ({sub.op}), "
                f"which prune does not enter")
    layer = next((n for n in nodes if n.op in _WEIGHT_OPS), None)
    if layer is not None:
        return f"'{layer.name}' ({layer.op}) has no constant weights"
    return "the graph has no Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU layer"


# ---- per-group ratios ----------------------------------------------------------------------


def parse_group_ratios(text: str) -> dict:
    """'LAYER=R,LAYER=R' -> {layer: ratio}; one-line UsageError on anything else."""
    out = {}
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        name, sep, value = item.rpartition("=")
        try:
            r = float(value)
        except ValueError:
            r = None
        if not sep or not name or r is None or not 0.0 <= r < 1.0:
            raise UsageError(f"--prune-group-ratios: '{item}' is not LAYER=RATIO with "
                             f"RATIO in [0, 1)")
        out[name.strip()] = r
    return out


def per_group_counts(alloc, groups, ratios: dict, default: float) -> list:
    """Channels removed per subgroup (allocator order) for explicit per-group ratios.

    A group is named by any of its producing layers; a name matching no prunable group
    is an error (a recipe replayed on another model must not silently prune less)."""
    used = set()
    counts = []
    for g in groups:
        hits = [s for s in g.sources if s in ratios]
        used.update(hits)
        r = ratios[hits[0]] if hits else default
        # 1e-6: a ratio written with 9 significant digits (group_ratios_spec) still
        # floors to the count it was computed from
        counts += [alloc.constrain(sg, math.floor(r * len(sg) + 1e-6)) for sg in g.subgroups]
    unknown = sorted(set(ratios) - used)
    if unknown:
        sample = ", ".join(g.sources[0] for g in groups[:3])
        raise UsageError(f"--prune-group-ratios: '{unknown[0]}' is not a layer of any "
                         f"prunable group (e.g. {sample})")
    return counts


def group_ratios_spec(groups, removed) -> str:
    """The --prune-group-ratios text that reproduces ``removed`` (channels per group,
    named by the group's first layer): ratio = removed / size, exact in float for the
    floor rounding of :func:`per_group_counts`."""
    items = []
    for g in groups:
        n = int(removed[g.classes].sum())
        if n:
            items.append(f"{g.sources[0]}={n / len(g.classes):.9g}")
    return ",".join(items)


# ---- sensitivity curves -------------------------------------------------------------------


def load_curves(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return {tuple(row["sources"]): {float(r): float(e) for r, e in row["error"].items()}
                for row in data["groups"]}
    except FileNotFoundError:
        raise DataError(f"--prune-sensitivity: file not found: {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--prune-sensitivity {path}: not a sensitivity JSON "
                        f"written by 'onnxc sensitivity --json' ({exc})") from None


def match_curves(curves: dict, groups) -> dict:
    """Per prunable-group index -> {ratio: error}; groups missing from the file stay."""
    out = {}
    for gi, g in enumerate(groups):
        c = curves.get(tuple(g.sources))
        if c is not None:
            out[gi] = c
    if not out:
        raise DataError("--prune-sensitivity: no group of this model appears in the file "
                        "(was it measured on another model or pass list?)")
    return out


from . import sensitivity  # noqa: E402,F401  (registers onnxc sensitivity)
