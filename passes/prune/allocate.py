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
# Default rounding: CPU kernels (ONNX Runtime's NCHWc on AVX2) work in blocks of 8
# channels, so e.g. 31 kept channels cost as much as 32. Applied to subgroups of at
# least 32 channels that are multiples of 8; an explicit --prune-multiple replaces it.
AUTO_MULTIPLE, AUTO_MIN_SIZE = 8, 32


def kept_count(size: int, n_remove: int, multiple: int) -> int:
    keep = max(size - n_remove, 0)   # a subgroup may go entirely; tensors never do
    if multiple > 1:
        keep = int(math.ceil(keep / multiple) * multiple)
    return min(keep, size)


class Allocator:
    def __init__(self, dg, groups, scores, min_channels=1, multiple=None):
        self.dg = dg
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

    def _constrain(self, sg, n) -> int:
        m = self.multiple
        if m is None:
            m = AUTO_MULTIPLE if len(sg) >= AUTO_MIN_SIZE and len(sg) % AUTO_MULTIPLE == 0 \
                else 1
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

    def for_flops(self, flops: float, use_global: bool, base_macs: int,
                  curves=None) -> tuple[np.ndarray, float]:
        """Removal reaching ``flops`` share of MACs removed (or as close as allowed)."""
        target = (1.0 - flops) * base_macs
        if curves is not None:
            return self._by_sensitivity(target, curves)
        hi_r = 0.999 if use_global else 0.95
        removed_hi = self.select(hi_r, use_global)
        if self.dg.estimate_macs(removed_hi) > target:
            return removed_hi, hi_r               # cannot reach: prune as far as allowed
        lo, hi = 0.0, hi_r
        for _ in range(30):
            mid = (lo + hi) / 2
            if self.dg.estimate_macs(self.select(mid, use_global)) <= target:
                hi = mid
            else:
                lo = mid
        return self.select(hi, use_global), hi

    def _by_sensitivity(self, target, curves) -> tuple[np.ndarray, float]:
        """Greedy: raise the ratio of the group whose error grows least per MAC saved.

        ``curves[group index]`` maps ratio -> output error measured by ``sensitivity``.
        """
        ratios = {gi: 0.0 for gi in curves}
        steps = sorted({r for c in curves.values() for r in c})

        def removal():
            counts = []
            for gi, g in enumerate(self.groups):
                r = ratios.get(gi, 0.0)
                counts += [self._constrain(sg, math.floor(r * len(sg) + 1e-9))
                           for sg in g.subgroups]
            return self._remove(counts)

        current = removal()
        macs = self.dg.estimate_macs(current)
        while macs > target:
            best = None
            for gi, c in curves.items():
                nxt = [r for r in steps if r > ratios[gi] and r in c]
                if not nxt:
                    continue
                r = nxt[0]
                old = ratios[gi]
                ratios[gi] = r
                trial = removal()
                saved = macs - self.dg.estimate_macs(trial)
                ratios[gi] = old
                if saved <= 0:
                    continue
                cost = (c[r] - c.get(old, 0.0)) / saved
                if best is None or cost < best[0]:
                    best = (cost, gi, r)
            if best is None:
                break
            ratios[best[1]] = best[2]
            current = removal()
            macs = self.dg.estimate_macs(current)
        return current, max(ratios.values()) if ratios else 0.0

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
