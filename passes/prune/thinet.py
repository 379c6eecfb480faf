"""ThiNet-style data-driven pruning: pick channels by reconstruction error, then re-fit
the consumers by least squares (Luo et al., "ThiNet"; He et al., "Channel Pruning
for Accelerating Very Deep Neural Networks").

For each group (in graph order), on calibration activations:

1. Every consumer layer L of the group (Conv with group 1, Gemm, MatMul) is sampled
   at random output positions: input patches X_L (S × C_in·k·k) from the *current*
   (already partly pruned) model, targets Y_L (S × O) from the *original* model,
   so the refit also absorbs error accumulated upstream.
2. Channel c contributes X_L[:, F_c] · W_L[F_c] to L's output. The greedy ThiNet
   selection removes, one at a time, the class that least increases
   ‖Σ_removed contributions‖² summed over all consumers (kept as a Gram matrix).
3. Removal is applied by zeroing the consumers' input weights of removed classes
   (equivalent to removing them) and every consumer is re-fitted by ridge least
   squares on its kept inputs, bias included.

The graph keeps its shapes until the end; ``groups.rewrite`` then slices out the
zeroed channels exactly as for the other criteria.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.passes._activations import stream

CHUNKS = 6               # activation re-collections over the whole run
MAX_ROWS = 8192          # sampled output positions per consumer (rows of the LS problem)
ROWS_PER_WEIGHT = 10     # aim for this many rows per fitted weight of one output
RIDGE = 1e-4             # relative ridge: λ = RIDGE · mean diagonal of XᵀX


class _Layer:
    """A consumer with its weights viewed as (O, C_in, K) and sampling positions."""

    def __init__(self, dg, cons, n_images, rng):
        node = cons.node
        self.cons, self.node = cons, node
        self.slots = cons.slots
        w = np.asarray(node.inputs[1].values)
        self.kind = cons.kind
        self.refit = False
        if self.kind == "conv":
            self.w = w.reshape(w.shape[0], w.shape[1], -1).astype(np.float64)   # (O, C, K)
            self.kernel = list(w.shape[2:])
            a = node.attrs
            self.strides = list(a.get("strides", [1] * len(self.kernel)))
            self.dil = list(a.get("dilations", [1] * len(self.kernel)))
            self.pads = list(a.get("pads", [0] * 2 * len(self.kernel)))
            ok_pad = a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            out = node.outputs[0].shape
            self.refit = len(self.kernel) == 2 and ok_pad and out is not None \
                and all(isinstance(d, (int, np.integer)) for d in out[2:])
            if self.refit:
                ho, wo = int(out[2]), int(out[3])
                feats = self.w.shape[1] * self.w.shape[2] + 1
                want = math.ceil(ROWS_PER_WEIGHT * feats / max(n_images, 1))
                per = int(min(ho * wo, max(4, want)))
                per = max(1, min(per, MAX_ROWS // max(n_images, 1)))
                self.img = np.repeat(np.arange(n_images), per)                     # (S,)
                pos = np.stack([rng.choice(ho * wo, per, replace=False)
                                for _ in range(n_images)]).ravel()
                self.oh, self.ow = pos // wo, pos % wo
        elif self.kind in ("gemm", "matmul"):
            trans = self.kind == "gemm" and int(node.attrs.get("transB", 0))
            wk = w if trans else w.T                                             # (O, C)
            self.w = wk.astype(np.float64)[:, :, None]
            self.refit = int(node.attrs.get("transA", 0)) == 0 and \
                (node.inputs[0].shape is not None and len(node.inputs[0].shape) == 2)
            self.img = np.arange(n_images)
        self.x = None
        self.y = None

    # -- sampling ------------------------------------------------------------------------
    def take_input(self, arr, start):
        """Rows of X (S_batch × C × K) for the samples of this batch."""
        sel = (self.img >= start) & (self.img < start + len(arr))
        if self.kind != "conv":
            return sel, arr[self.img[sel] - start][:, :, None].astype(np.float32)
        b = self.img[sel] - start
        (pt, pl, pb, pr), (sh, sw), (dh, dw) = self.pads, self.strides, self.dil
        xp = np.pad(arr, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        kh, kw = self.kernel
        ih = self.oh[sel][:, None] * sh + np.arange(kh)[None, :] * dh               # (S, kh)
        iw = self.ow[sel][:, None] * sw + np.arange(kw)[None, :] * dw               # (S, kw)
        patch = xp[b[:, None, None], :, ih[:, :, None], iw[:, None, :]]            # (S,kh,kw,C)
        return sel, patch.transpose(0, 3, 1, 2).reshape(len(b), arr.shape[1], kh * kw)

    def take_output(self, arr, start):
        sel = (self.img >= start) & (self.img < start + len(arr))
        b = self.img[sel] - start
        if self.kind != "conv":
            return sel, arr[b].astype(np.float64)
        return sel, arr[b, :, self.oh[sel], self.ow[sel]].astype(np.float64)      # (S, O)

    # -- weights -------------------------------------------------------------------------
    def zero_inputs(self, dead_pos):
        """Zero weights reading input positions ``dead_pos`` (same as removing them)."""
        if len(dead_pos):
            self.w[:, dead_pos] = 0.0

    def write(self, graph):
        node = self.node
        old = np.asarray(node.inputs[1].values)
        if self.kind == "conv":
            new = self.w.reshape(old.shape)
        elif self.kind == "gemm" and int(node.attrs.get("transB", 0)):
            new = self.w[:, :, 0]
        else:
            new = self.w[:, :, 0].T
        node.inputs[1] = graph.make_constant(f"{node.name}_w_thinet", new.astype(old.dtype))
        bias = getattr(self, "bias", None)
        if bias is not None and self.kind in ("conv", "gemm"):
            while len(node.inputs) < 3:
                node.inputs.append(gs.Variable.empty())
            node.inputs[2] = graph.make_constant(f"{node.name}_b_thinet",
                                                 bias.astype(old.dtype))
            if self.kind == "gemm":
                node.attrs["beta"] = 1.0     # the fitted bias is the whole bias


def thinet_prune(graph, dg, groups, counts, dataset, ctx, report, legal=None):
    rng = ctx.rng(7)
    n = len(dataset)
    removed = np.zeros(dg.num_classes, bool)
    todo = [g for g in groups if any(counts[id(sg)] for sg in g.subgroups)]
    group_ids = {g.gid for g in todo}
    # Consumers reading any class of a group being pruned.
    layers = []
    for cons in dg.consumers:
        cls = dg.label[cons.slots]
        gids = set(dg.class_group[cls].tolist()) & group_ids
        if gids and cons.kind in ("conv", "gemm", "matmul"):
            layer = _Layer(dg, cons, n, rng)
            layer.gids = gids
            layers.append(layer)
    if any(layer.kind == "gemm" and layer.node.attrs.get("alpha", 1.0) != 1.0
           for layer in layers):
        report.note("thinet: Gemm with alpha != 1 is not re-fitted")
        for layer in layers:
            if layer.kind == "gemm" and layer.node.attrs.get("alpha", 1.0) != 1.0:
                layer.refit = False
    # Targets from the original model.
    by_out = {}
    for layer in layers:
        if layer.refit:
            by_out.setdefault(layer.node.outputs[0].name, []).append(layer)
    ys = {id(layer): [] for layer in layers}

    def visit_y(name, arr, start):
        for layer in by_out[name]:
            _, y = layer.take_output(arr, start)
            ys[id(layer)].append(y)

    stream(graph, dataset, list(by_out), visit_y)
    for layer in layers:
        if layer.refit:
            layer.y = np.concatenate(ys[id(layer)])

    order = sorted(todo, key=lambda g: min(
        (i for i, nd in enumerate(graph.nodes) if nd.name in g.sources), default=0))
    # Activations are re-collected from the partly pruned model once per chunk of
    # groups (not per group): each collection is a full ORT pass over the samples.
    size = max(1, math.ceil(len(order) / CHUNKS))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    refits = 0
    for chunk in chunks:
        mine = {g.gid: [layer for layer in layers if g.gid in layer.gids] for g in chunk}
        live = {id(layer): layer for g in chunk for layer in mine[g.gid] if layer.refit}
        _collect_inputs(graph, dataset, list(live.values()))
        for g in chunk:
            chosen = _select_ls(dg, g, counts, [la for la in mine[g.gid] if la.refit],
                                removed)
            removed[chosen] = True
            if legal is not None:      # e.g. equal per-group counts of grouped convs
                removed = legal(removed)
            for layer in mine[g.gid]:
                layer.zero_inputs(np.flatnonzero(removed[dg.label[layer.slots]]))
        for layer in {id(la): la for g in chunk for la in mine[g.gid]}.values():
            if layer.refit:
                _refit(layer, removed, dg)
                refits += 1
            layer.write(graph)
        for layer in live.values():
            layer.x = None
    report.note(f"thinet: {len(order)} groups chosen by reconstruction error on {n} "
                f"calibration samples; {refits} consumer re-fits by least squares")
    from .groups import rewrite

    rewrite(graph, dg, removed)
    return graph, removed


def _collect_inputs(graph, dataset, live) -> None:
    xs = {id(layer): [] for layer in live}
    by_in = {}
    for layer in live:
        by_in.setdefault(layer.node.inputs[0].name, []).append(layer)

    def visit(name, arr, start):
        for layer in by_in[name]:
            xs[id(layer)].append(layer.take_input(arr, start)[1])

    stream(graph, dataset, list(by_in), visit)
    for layer in live:
        layer.x = np.concatenate(xs[id(layer)]).astype(np.float64)         # (S, C, K)


def _select(dg, g, counts, live) -> np.ndarray:
    """Greedy ThiNet choice of classes to remove in every subgroup of ``g``."""
    cls = g.classes
    index = {int(c): i for i, c in enumerate(cls)}
    gram = np.zeros((len(cls), len(cls)))
    for layer in live:
        lab = dg.label[layer.slots]                                       # (C,)
        pos = np.flatnonzero(np.isin(lab, cls))
        if not len(pos):
            continue
        # <X_p W_pᵀ, X_q W_qᵀ> over (sample, output) = Σ_kk' (XᵀX)[pk,qk'] (WᵀW)[pk,qk']
        x = layer.x[:, pos, :].reshape(len(layer.x), -1)                  # (S, P·K)
        w = layer.w[:, pos, :].reshape(layer.w.shape[0], -1)               # (O, P·K)
        k = layer.w.shape[2]
        prod = (x.T @ x) * (w.T @ w)                                        # (P·K, P·K)
        g_pos = prod.reshape(len(pos), k, len(pos), k).sum(axis=(1, 3)) / len(x)   # (P, P)
        onehot = np.zeros((len(cls), len(pos)))
        onehot[[index[int(c)] for c in lab[pos]], np.arange(len(pos))] = 1.0
        gram += onehot @ g_pos @ onehot.T
    chosen = []
    if not gram.any():          # no re-fittable consumer saw data: fall back to order
        for sg in g.subgroups:
            chosen += list(sg[:counts[id(sg)]])
        return np.array(chosen, np.int64)
    picked = np.zeros(len(cls), bool)
    acc = np.zeros(len(cls))    # Σ_{t chosen} gram[t, :]
    for sg in g.subgroups:
        idx = np.array([index[int(c)] for c in sg])
        for _ in range(counts[id(sg)]):
            cand = idx[~picked[idx]]
            cost = np.diag(gram)[cand] + 2.0 * acc[cand]
            best = cand[int(np.argmin(cost))]
            picked[best] = True
            acc += gram[best]
            chosen.append(int(cls[best]))
    return np.array(chosen, np.int64)


def _select_ls(dg, g, counts, live, removed) -> np.ndarray:
    """Backward elimination aware of the re-fit: remove, one at a time, the class whose
    features raise the consumers' least-squares residual least.

    With A = XᵀX + λI over a consumer's alive features, β = A⁻¹XᵀY and S = A⁻¹,
    dropping feature block I raises the residual by tr(β_Iᵀ S_II⁻¹ β_I); afterwards
    S ← S − S_:I S_II⁻¹ S_I: and β ← β − S_:I S_II⁻¹ β_I (the block-downdate that
    re-solves without I).
    """
    states = []
    for layer in live:
        lab = dg.label[layer.slots]
        alive = np.flatnonzero(~removed[lab])
        k = layer.w.shape[2]
        x = layer.x[:, alive, :].reshape(len(layer.x), -1)                  # (S, F)
        if x.shape[1] + 1 > 0.8 * len(x):
            continue
        a = np.concatenate([x, np.ones((len(x), 1))], 1)
        ata = a.T @ a
        lam = RIDGE * float(np.mean(np.diag(ata))) + 1e-12
        inv = np.linalg.inv(ata + lam * np.eye(len(ata)))
        beta = inv @ (a.T @ layer.y)                                         # (F+1, O)
        feats = {}                 # class -> feature indices in this layer's system
        for j, p in enumerate(alive):
            feats.setdefault(int(lab[p]), []).extend(range(j * k, (j + 1) * k))
        states.append([inv, beta, {c: np.array(f) for c, f in feats.items()}])
    if not states:
        return _select(dg, g, counts, live)

    def cost(c):
        total = 0.0
        for inv, beta, feats in states:
            f = feats.get(c)
            if f is None:
                continue
            m = inv[np.ix_(f, f)]
            total += float(np.sum(beta[f] * np.linalg.solve(m, beta[f])))
        return total

    chosen = []
    for sg in g.subgroups:
        left = [int(c) for c in sg]
        for _ in range(counts[id(sg)]):
            best = min(left, key=cost)
            left.remove(best)
            chosen.append(best)
            for st in states:
                inv, beta, feats = st
                f = feats.pop(best, None)
                if f is None:
                    continue
                m_inv = np.linalg.inv(inv[np.ix_(f, f)])
                col = inv[:, f]                                             # (F+1, |f|)
                st[1] = beta - col @ (m_inv @ beta[f])
                st[0] = inv - col @ m_inv @ col.T
    return np.array(chosen, np.int64)


def _refit(layer, removed, dg) -> None:
    """Ridge least squares of the kept input weights (and bias) onto original outputs."""
    alive = np.flatnonzero(~removed[dg.label[layer.slots]])
    o = layer.w.shape[0]
    x = layer.x[:, alive, :].reshape(len(layer.x), -1)                      # (S, F)
    if x.shape[1] + 1 > 0.8 * len(x):
        return                      # too few samples for this many weights: keep them
    has_bias = layer.kind != "matmul"
    a = np.concatenate([x, np.ones((len(x), 1))], 1) if has_bias else x
    ata = a.T @ a
    lam = RIDGE * float(np.mean(np.diag(ata))) + 1e-12
    sol = np.linalg.solve(ata + lam * np.eye(len(ata)), a.T @ layer.y)       # (F(+1), O)
    w = np.zeros_like(layer.w)
    w[:, alive, :] = sol[:x.shape[1]].T.reshape(o, len(alive), -1)
    layer.w = w
    if has_bias:
        layer.bias = sol[-1]
