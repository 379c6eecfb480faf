"""Channel importance criteria. Each returns one score per class (higher = keep).

Filter criteria score each source layer's output filters, normalise them by that
layer's mean (so a residual group mixing layers of different scale is fair) and
average over every source slot of a class:

- ``l1`` / ``l2``: filter norms (Li et al., "Pruning Filters for Efficient ConvNets").
- ``fpgm``: distance of a filter to the others; filters near the geometric median are
  replaceable (He et al., "Filter Pruning via Geometric Median").
- ``bn_gamma``: |γ| of the BatchNormalization scaling the channel (Liu et al.,
  "Network Slimming"); needs BN still present (prune before fold_bn or without it).
- ``apoz``: 1 − average percentage of zeros after ReLU on calibration data (Hu et al.).

``thinet`` chooses channels by reconstruction error instead (see ``thinet.py``).

A new criterion is one function decorated with ``@register_criterion(name)``; prune
offers every registered name as ``--prune-criterion`` (and ``onnxc sensitivity
--criterion`` those that only score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from onnxc.errors import UsageError

from onnxc.passes._activations import stream


def filters(src) -> np.ndarray:
    """Output filters of a source layer as a (C_out, D) matrix."""
    w = np.asarray(src.node.inputs[1].values, np.float64)
    if src.kind == "conv":
        return w.reshape(w.shape[0], -1)
    if src.kind == "convT":
        # (C_in, C_out/g, k…) with output o = group·(C_out/g) + j
        g = int(src.node.attrs.get("group", 1))
        cin, cog = w.shape[:2]
        w = w.reshape(g, cin // g, cog, -1).transpose(0, 2, 1, 3)
        return w.reshape(g * cog, -1)
    if src.kind == "gemm":
        return w if int(src.node.attrs.get("transB", 0)) else w.T
    if src.kind == "rnn":
        # Unit j owns row j of every gate of W and R, in every direction.
        r = np.asarray(src.node.inputs[2].values, np.float64)
        hidden = r.shape[-1]
        parts = [m.reshape(m.shape[0], -1, hidden, m.shape[-1]).transpose(2, 0, 1, 3)
                 .reshape(hidden, -1) for m in (w, r)]
        return np.concatenate(parts, axis=1)
    return w.T                                     # matmul (K, N)


def _fpgm(f: np.ndarray, rng) -> np.ndarray:
    """Sum of distances to the other filters (to a 512-filter sample when wide)."""
    ref = f if len(f) <= 512 else f[rng.choice(len(f), 512, replace=False)]
    sq = (f ** 2).sum(1)[:, None] + (ref ** 2).sum(1)[None, :] - 2.0 * f @ ref.T
    return np.sqrt(np.maximum(sq, 0.0)).sum(1)


def _combine(dg, per_source: list) -> np.ndarray:
    """Average layer-normalised slot scores into class scores."""
    total = np.zeros(dg.num_classes)
    count = np.zeros(dg.num_classes)
    for src, v in per_source:
        v = v / (v.mean() + 1e-12)
        cls = dg.label[src.slots]
        np.add.at(total, cls, v)
        np.add.at(count, cls, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def filter_scores(dg, kind: str, rng) -> np.ndarray:
    per = []
    for src in dg.sources:
        if kind in ("l1", "l2") and src.kind in ("gemm", "matmul"):
            # Wide classifier matrices: reduce in place along the input axis, no copies.
            w = np.asarray(src.node.inputs[1].values)
            axis = 1 if (src.kind == "gemm" and int(src.node.attrs.get("transB", 0))) else 0
            v = np.abs(w).sum(axis, dtype=np.float64) if kind == "l1" \
                else np.sqrt(np.square(w, dtype=np.float64).sum(axis))
            per.append((src, v))
            continue
        f = filters(src)
        if kind == "l1":
            v = np.abs(f).sum(1)
        elif kind == "l2":
            v = np.sqrt((f ** 2).sum(1))
        else:
            v = _fpgm(f, rng)
        per.append((src, v))
    return _combine(dg, per)


def bn_gamma_scores(dg, rng) -> np.ndarray:
    bns = [m for m in dg.members if m.kind == "bn"]
    if not bns:
        raise UsageError("--prune-criterion bn_gamma needs BatchNormalization nodes, and "
                         "this graph has none (run prune without fold_bn, or pick l1/fpgm)")
    base = filter_scores(dg, "l1", rng)      # classes without a BN keep filter scores
    total = np.zeros(dg.num_classes)
    count = np.zeros(dg.num_classes)
    for m in bns:
        gamma = np.abs(np.asarray(m.node.inputs[1].values, np.float64))
        gamma = gamma / (gamma.mean() + 1e-12)
        cls = dg.label[m.slots]
        np.add.at(total, cls, gamma)
        np.add.at(count, cls, 1.0)
    return np.where(count > 0, total / np.maximum(count, 1), base)


def apoz_scores(dg, graph, dataset) -> np.ndarray:
    """1 − APoZ per class: ReLU outputs where the class has one, else its source outputs."""
    relu = {n.outputs[0].name for n in graph.nodes if n.op == "Relu"}
    watch = {name: info for name, info in dg.info.items() if name in relu}
    covered = np.zeros(dg.num_classes, bool)
    for info in watch.values():
        covered[dg.label[info.slots]] = True
    for src in dg.sources:
        name = src.node.outputs[0].name
        if not covered[dg.label[src.slots]].all() and name in dg.info:
            watch[name] = dg.info[name]
    zeros = {n: np.zeros(len(i.slots)) for n, i in watch.items()}
    seen = {n: 0 for n in watch}

    def visit(name, arr, _start):
        info = watch[name]
        x = np.moveaxis(arr, info.axis, 0).reshape(len(info.slots), -1)   # (C, rest)
        zeros[name] += (x <= 0).sum(1)
        seen[name] += x.shape[1]

    stream(graph, dataset, list(watch), visit)
    total = np.zeros(dg.num_classes)
    count = np.zeros(dg.num_classes)
    for name, info in watch.items():
        if name not in relu and name in seen:
            # Source outputs only count for classes with no ReLU output at all.
            mask = ~covered[dg.label[info.slots]]
        else:
            mask = np.ones(len(info.slots), bool)
        frac = zeros[name] / max(seen[name], 1)
        cls = dg.label[info.slots][mask]
        np.add.at(total, cls, 1.0 - frac[mask])
        np.add.at(count, cls, 1.0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Criterion:
    """``score(dg, graph, ctx, samples)`` gives one score per class (higher = keep).
    ``rewrite``, when set, replaces the plain slicing rewrite: it picks the channels
    itself within the allocated counts (see thinet)."""

    name: str
    score: Callable
    needs_data: bool = False       # reads calibration activations (random fallback warns)
    rewrite: Callable | None = None


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, needs_data: bool = False, rewrite: Callable | None = None):
    """Decorator: ``score(dg, graph, ctx, samples)`` becomes ``--prune-criterion NAME``."""
    def decorate(score):
        if name in CRITERIA:
            raise RuntimeError(f"pruning criterion registered twice: {name!r}")
        CRITERIA[name] = Criterion(name, score, needs_data, rewrite)
        return score
    return decorate


def calibration(ctx, graph, samples: int):
    """Up to ``samples`` calibration samples (random inputs, with a warning, without)."""
    if ctx.calibration is not None:
        return ctx.calibration.take(min(samples, len(ctx.calibration)))
    return ctx.calibration_data(graph, samples)


def scores(criterion: str, dg, graph, ctx, samples: int) -> np.ndarray:
    if criterion not in CRITERIA:
        raise UsageError(f"unknown --prune-criterion '{criterion}'")
    return CRITERIA[criterion].score(dg, graph, ctx, samples)


@register_criterion("l1")
def _l1(dg, graph, ctx, samples):
    return filter_scores(dg, "l1", ctx.rng(3))


@register_criterion("l2")
def _l2(dg, graph, ctx, samples):
    return filter_scores(dg, "l2", ctx.rng(3))


@register_criterion("fpgm")
def _fpgm_scores(dg, graph, ctx, samples):
    return filter_scores(dg, "fpgm", ctx.rng(3))


@register_criterion("bn_gamma")
def _bn_gamma(dg, graph, ctx, samples):
    return bn_gamma_scores(dg, ctx.rng(3))


@register_criterion("apoz", needs_data=True)
def _apoz(dg, graph, ctx, samples):
    return apoz_scores(dg, graph, ctx.calibration_data(graph, samples))


def _thinet_rewrite(graph, dg, groups, removed, ctx, report, samples, legal):
    """ThiNet picks, within each subgroup's allocated count, the channels whose removal
    its consumers reconstruct best, and refits them (``thinet.py``)."""
    from .thinet import thinet_prune

    counts = {id(sg): int(removed[sg].sum()) for g in groups for sg in g.subgroups}
    return thinet_prune(graph, dg, groups, counts, calibration(ctx, graph, samples), ctx,
                        report, legal)


@register_criterion("thinet", needs_data=True, rewrite=_thinet_rewrite)
def _thinet_allocation(dg, graph, ctx, samples):
    # Allocation ranks by l2; thinet then picks the channels within each subgroup.
    return filter_scores(dg, "l2", ctx.rng(3))
