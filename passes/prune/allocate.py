"""How many channels each subgroup loses, and which.

- uniform: every subgroup loses ``ratio`` of its classes (its lowest-scored ones);
- global: classes are ranked across groups by score normalised per group, and the
  lowest ``ratio`` share of all candidates goes (each subgroup capped at MAX_RATIO);
- FLOPs target: the ratio (uniform) or share (global) is bisected until the MAC
  estimate reaches the target; with per-group sensitivity curves, ratios are raised
  greedily where output error grows least per MAC saved.

Every count is then constrained: kept rounded *up* to a multiple of ``multiple`` per
subgroup (never more pruning than asked), at least ``min_channels`` kept per group,
and no tensor emptied.
"""

from __future__ import annotations

import math

import numpy as np

MAX_RATIO = 0.9   # global ranking never strips a group beyond this
# Default rounding: ONNX Runtime's CPU convs work in NCHWc blocks of 8 channels (AVX2),
# and its NCHWc transformer only takes a conv whose input channel count is a multiple
# of the block (or below it, read from a plain NCHW buffer, i.e. after a reorder). So
# 31 kept channels cost as much as 32, and 7 kept of 16 cost a reorder per block on
# top: ResNet-56 at --prune-flops 0.5 ran 1.57x faster than the original with stage 1
# at 7 of 16, 1.68x at 8 of 16 (1 thread, same run). Applied to subgroups of at
# least 16 channels that are multiples of 8; an explicit --prune-multiple replaces it.
AUTO_MULTIPLE, AUTO_MIN_SIZE = 8, 16


def kept_count(size: int, n_remove: int, multiple: int) -> int:
    keep = max(size - n_remove, 0)   # a subgroup may go entirely; tensors never do
    if multiple > 1:
        keep = int(math.ceil(keep / multiple) * multiple)
    return min(keep, size)


class Allocator:
    def __init__(self, dg, groups, scores, min_channels=1, multiple=None, auto_multiple=None):
        self.dg = dg
        # the target's channel block (compress sets it per target), else ORT's 8
        self.auto_multiple = auto_multiple or AUTO_MULTIPLE
        self.groups = groups
        self.scores = np.nan_to_num(scores, nan=np.inf)
        self.min_channels = min_channels
        self.multiple = multiple
        self.subgroups = [sg for g in groups for sg in g.subgroups]
        # Global ranking: scores relative to their group's mean.
        self.norm = self.scores.copy()
        for g in groups:
            s = self.scores[g.classes]
            finite = s[np.isfinite(s)]
            self.norm[g.classes] = s / (finite.mean() + 1e-12) if finite.size else s
        cand = np.concatenate([g.classes for g in groups]) if groups else np.zeros(0, int)
        self.candidate = np.zeros(dg.num_classes, bool)
        self.candidate[cand] = True
        self.sorted_norm = np.sort(self.norm[cand])

    # ---- selections ------------------------------------------------------------------
    def _remove(self, counts) -> np.ndarray:
        removed = np.zeros(self.dg.num_classes, bool)
        for sg, n in zip(self.subgroups, counts):
            if n > 0:
                order = np.argsort(self.scores[sg], kind="stable")
                removed[sg[order[:n]]] = True
        for g in self.groups:                  # at least min_channels per group
            short = self.min_channels - int((~removed[g.classes]).sum())
            if short > 0:
                gone = g.classes[removed[g.classes]]
                back = gone[np.argsort(-self.scores[gone], kind="stable")[:short]]
                removed[back] = False
        return self.legal(removed)

    def legal(self, removed: np.ndarray) -> np.ndarray:
        """Equal per-group counts for grouped convs, and no tensor emptied."""
        removed = self._no_empty_tensors(self._equal_groups(removed))
        return self._equal_groups(removed)   # (giving back never empties a tensor)

    def _equal_groups(self, removed: np.ndarray) -> np.ndarray:
        """Grouped convs need the same number of channels in every group: give back the
        best-scored extra removals of groups that lost more than the least-hit one.
        Subgroups are split per conv group, so uniform ratios rarely need this; where
        grouped convs read one tensor at different group boundaries (ShuffleNet's
        trunk) it can give back everything."""
        label = self.dg.label
        changed = bool(self.dg.grouped)
        while changed:
            changed = False
            for slots_in, slots_out in self.dg.grouped:
                for slots in (slots_in, slots_out):       # (G, n)
                    cnt = removed[label[slots]].sum(1)
                    if cnt.min() == cnt.max():
                        continue
                    changed = True
                    for gi in np.flatnonzero(cnt > cnt.min()):
                        cls = np.unique(label[slots[gi]])
                        back = cls[removed[cls]]
                        back = back[np.argsort(-self.scores[back], kind="stable")]
                        removed[back[:int(cnt[gi] - cnt.min())]] = False
        return removed

    def remove_counts(self, counts) -> np.ndarray:
        """Removal of ``counts`` lowest-scored classes per subgroup (allocator order)."""
        return self._remove(counts)

    def constrain(self, sg, n) -> int:
        return self._constrain(sg, n)

    def _constrain(self, sg, n) -> int:
        m = self.multiple
        if getattr(self.dg, "head_class", None) is not None and self.dg.head_class[sg].all():
            # Whole attention heads of Dh channels: any head count keeps a multiple of
            # 8 channels when Dh is one, so round the count only as far as M needs.
            width = int(self.dg.class_width[sg].min())
            m = 1 if m is None else m // math.gcd(m, width)
        elif m is None:
            a = self.auto_multiple
            m = a if len(sg) >= max(AUTO_MIN_SIZE, a) and len(sg) % a == 0 else 1
        return len(sg) - kept_count(len(sg), int(n), m)

    def uniform_counts(self, ratio: float) -> list:
        return [self._constrain(sg, math.floor(ratio * len(sg) + 1e-9))
                for sg in self.subgroups]

    def global_counts(self, share: float) -> list:
        if not len(self.sorted_norm) or share <= 0:
            return [0] * len(self.subgroups)
        k = int(math.floor(share * len(self.sorted_norm) + 1e-9))
        if k <= 0:
            return [0] * len(self.subgroups)
        thr = self.sorted_norm[min(k, len(self.sorted_norm)) - 1]
        counts = []
        for g in self.groups:
            below = g.classes[self.norm[g.classes] <= thr]
            cap = int(math.floor(MAX_RATIO * len(g.classes)))
            if len(below) > cap:   # never strip a whole group: keep its best of the worst
                below = below[np.argsort(self.norm[below], kind="stable")[:cap]]
            for sg in g.subgroups:
                counts.append(self._constrain(sg, np.isin(sg, below).sum()))
        return counts

    def select(self, ratio: float, use_global: bool) -> np.ndarray:
        counts = self.global_counts(ratio) if use_global else self.uniform_counts(ratio)
        return self._remove(counts)

    def for_flops(self, flops: float, use_global: bool,
                  base_macs: int) -> tuple[np.ndarray, float, bool]:
        """Removal reaching ``flops`` share of MACs removed (or as close as allowed) with
        one ratio for every group (or one global share).

        Per group, rounding makes the ratio move in coarse steps (blocks of 8 channels
        in every group at once), so the lowest ratio reaching the target can overshoot
        it by several percent of MACs, all taken from the same layers (ResNet-56: every
        stage-3 block at 24 of 64 channels, -53.9%). Instead, the highest uniform ratio
        *short* of the target is kept and topped up by the greedy allocation, which
        cuts a step deeper only where the criterion says it hurts least, until the
        target is reached. Returns (removal, ratio, topped up)."""
        target = (1.0 - flops) * base_macs
        hi_r = 0.999 if use_global else 0.95
        removed_hi = self.select(hi_r, use_global)
        if self.dg.estimate_macs(removed_hi) > target:
            return removed_hi, hi_r, False        # cannot reach: prune as far as allowed
        lo, hi = 0.0, hi_r
        for _ in range(30):
            mid = (lo + hi) / 2
            if self.dg.estimate_macs(self.select(mid, use_global)) <= target:
                hi = mid
            else:
                lo = mid
        if use_global:
            return self.select(hi, True), hi, False
        start = self.uniform_counts(lo)
        removed, _ = self._greedy(target, None, 0, None, start)
        if self.dg.estimate_macs(removed) > target:    # (cannot happen: hi is reachable)
            return self.select(hi, False), hi, False
        return removed, hi, True

    def for_budgets(self, base_macs: int, base_params: int, flops=None, params=None,
                    use_global: bool = False, curves=None) -> tuple[np.ndarray, str]:
        """Removal meeting a MAC budget and/or a parameter budget (shares to remove).

        Global ranking: the share is bisected until both are met. Otherwise per-group
        ratios are raised greedily (``_greedy``). Returns the removal and a short
        description of the allocation.
        """
        tm = None if flops is None else (1.0 - flops) * base_macs
        tp = None if params is None else (1.0 - params) * base_params

        def met(removed):
            return (tm is None or self.dg.estimate_macs(removed) <= tm) and \
                (tp is None or base_params - self.dg.params_removed(removed) <= tp)

        if use_global and curves is None:
            hi = 0.999
            if not met(self.select(hi, True)):
                return self.select(hi, True), f"global share {hi:.3f}"
            lo = 0.0
            for _ in range(30):
                mid = (lo + hi) / 2
                if met(self.select(mid, True)):
                    hi = mid
                else:
                    lo = mid
            return self.select(hi, True), f"global share {hi:.3f}"
        return self._greedy(tm, tp, base_params, curves)

    def _group_states(self, gi, curves):
        """Distinct removals of group ``gi`` by increasing ratio: [(ratio, counts)]."""
        g = self.groups[gi]
        if curves is not None:
            if gi not in curves:
                return [(0.0, [0] * len(g.subgroups))]
            ratios = [0.0] + sorted(r for r in curves[gi] if r > 0)
        else:
            ratios = list(np.arange(0, 64) / 64.0)
            ratios = [r for r in ratios if r <= MAX_RATIO + 1e-9]
        states, seen = [], set()
        for r in ratios:
            counts = [self._constrain(sg, math.floor(r * len(sg) + 1e-9))
                      for sg in g.subgroups]
            if tuple(counts) not in seen:
                seen.add(tuple(counts))
                states.append((float(r), counts))
        return states

    def _greedy(self, tm, tp, base_params, curves, start=None) -> tuple[np.ndarray, str]:
        """Raise, one step at a time, the ratio of the group whose damage grows least
        per unit of budget progress, until every budget is met.

        Damage: the measured output error of ``curves`` (``onnxc sensitivity``) at
        that ratio; without curves, −log of the share of the group's importance kept
        (criterion scores, normalised per group), so a group whose weakest channels
        carry little of its score is cut first, and deep cuts cost ever more.
        Progress: MACs and parameters saved, each relative to what is still missing
        from its budget, so the budget furthest from being met weighs most (ResNet
        stages cost the same MACs but the last holds most parameters).
        """
        dg = self.dg
        n = len(self.groups)
        states = [self._group_states(gi, curves) for gi in range(n)]
        level = [0] * n
        if start is not None:
            # Begin at the furthest state of each group not beyond its ``start`` counts.
            it = iter(start)
            for gi, g in enumerate(self.groups):
                want = [next(it) for _ in g.subgroups]
                level[gi] = max(i for i, (_, c) in enumerate(states[gi])
                                if all(a <= b for a, b in zip(c, want)))
        order = [[np.argsort(self.scores[sg], kind="stable") for sg in g.subgroups]
                 for g in self.groups]
        mass = []
        for g in self.groups:
            v = self.norm[g.classes]
            mass.append(float(v[np.isfinite(v)].sum()) or 1.0)

        def fill(removed, gi, counts):
            g = self.groups[gi]
            removed[g.classes] = False
            for sg, o, k in zip(g.subgroups, order[gi], counts):
                if k > 0:
                    removed[sg[o[:k]]] = True

        def damage(gi, st):
            r, counts = states[gi][st]
            if curves is not None:
                return curves[gi].get(r, 0.0) if r > 0 else 0.0
            g = self.groups[gi]
            tot = 0.0
            for sg, o, k in zip(g.subgroups, order[gi], counts):
                v = self.norm[sg[o[:k]]]
                tot += float(v[np.isfinite(v)].sum())
            # −log of the importance kept: removing the last strong channels of a group
            # costs ever more (a layer keeping 12% of its score is far worse than two
            # keeping 35%), and attenuation through a deep chain multiplies, so logs add.
            return -math.log(max(1.0 - tot / mass[gi], 1e-6))

        # Groups whose MAC/parameter terms overlap: raising one changes the other's
        # savings (a conv between two groups); everyone else's cached step stays valid.
        terms = [(m.in_slots, m.out_slots) for m in dg.mac_nodes] + \
            [(i, o) for _, i, o in dg.param_terms()]
        owner = np.full(dg.num_classes, -1)
        for gi, g in enumerate(self.groups):
            owner[g.classes] = gi
        touch = [set() for _ in range(n)]
        for ti, (i, o) in enumerate(terms):
            for sl in (i, o):
                if sl is not None and len(sl):
                    for gi in np.unique(owner[dg.label[sl]]):
                        if gi >= 0:
                            touch[gi].add(ti)
        linked = [{hj for hj in range(n) if touch[gi] & touch[hj]} | {gi}
                  for gi in range(n)]

        removed = np.zeros(dg.num_classes, bool)
        for gi in range(n):
            if level[gi]:
                fill(removed, gi, states[gi][level[gi]][1])
        macs = dg.estimate_macs(removed)
        gone = dg.params_removed(removed) if tp is not None else 0
        step = [None] * n          # cached (MACs saved, params saved, damage added)

        def missing(m, p):
            return (0.0 if tm is None else max(m - tm, 0.0),
                    0.0 if tp is None else max(p - tp, 0.0))

        while True:
            need_m, need_p = missing(macs, base_params - gone)
            if need_m <= 0 and need_p <= 0:
                break
            best = None
            for gi in range(n):
                st = level[gi] + 1
                if st >= len(states[gi]):
                    continue
                if step[gi] is None:
                    trial = removed.copy()
                    fill(trial, gi, states[gi][st][1])
                    step[gi] = (macs - dg.estimate_macs(trial),
                                dg.params_removed(trial) - gone,
                                damage(gi, st) - damage(gi, level[gi]))
                dm, dp, dd = step[gi]
                gain = (dm / need_m if need_m > 0 else 0.0) + \
                    (dp / need_p if need_p > 0 else 0.0)
                if gain <= 0:
                    continue
                cost = dd / gain
                if best is None or cost < best[0]:
                    best = (cost, gi)
            if best is None:
                break                                   # every group at its limit
            gi = best[1]
            level[gi] += 1
            fill(removed, gi, states[gi][level[gi]][1])
            macs = dg.estimate_macs(removed)
            gone = dg.params_removed(removed)
            for hj in linked[gi]:
                step[hj] = None
        counts = []
        for gi in range(n):
            counts += states[gi][level[gi]][1]
        ratios = [states[gi][level[gi]][0] for gi in range(n)]
        desc = (f"per-group ratios {min(ratios):.2f}-{max(ratios):.2f} "
                f"(mean {np.mean(ratios):.2f}), "
                f"{'sensitivity' if curves is not None else 'criterion'}-guided")
        return self._remove(counts), desc

    # ---- safety --------------------------------------------------------------------------
    def _no_empty_tensors(self, removed: np.ndarray) -> np.ndarray:
        """Give back the best removed class of any tensor that would lose everything."""
        while True:
            empty = self.dg.tensors_emptied(removed)
            if not empty:
                return removed
            for name in empty:
                cls = np.unique(self.dg.label[self.dg.info[name].slots])
                cls = cls[removed[cls]]
                if len(cls):
                    removed[cls[np.argmax(self.scores[cls])]] = False
