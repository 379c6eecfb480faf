"""One small channel rule per op family.

A rule has two halves, kept side by side so they cannot drift apart:

- ``propagate(dg, node)`` runs during the dependency walk: it reads the channel
  info (axis + slots) of the node's inputs, sets its outputs' info, couples slots
  with ``dg.union`` and records sources/consumers/MACs. It returns ``None`` or a
  one-line reason why the op cannot be pruned through (the walk then keeps every
  channel touching it).
- ``apply(rw, node)`` runs during the rewrite: ``rw.keep_in(node, i)`` /
  ``rw.keep_out(node, i)`` give the kept positions on the channel axis (None when
  unchanged) and the rule slices its constants and fixes its attributes.

Adding an op: write a class with ``ops = (...)`` decorated by ``@rule``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .groups import Consumer, MacNode, Member, Source, TensorInfo

RULES: dict = {}


def rule(cls):
    for op in cls.ops:
        RULES[op] = cls
    return cls


def rule_for(node):
    return RULES.get(node.op, NoRule)()


# ---- helpers ---------------------------------------------------------------------------


def _const(t):
    if t is None or (isinstance(t, gs.Variable) and t.name == ""):
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    prod = t.inputs[0] if len(t.inputs) else None
    if prod is not None and prod.op == "Constant" and "value" in prod.attrs:
        v = prod.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    return None


def _input(node, i):
    """Input i, or None when absent or given as the empty name."""
    if len(node.inputs) <= i:
        return None
    t = node.inputs[i]
    return None if (isinstance(t, gs.Variable) and t.name == "") else t


def _rank(t):
    return None if t is None or t.shape is None else len(t.shape)


def _axes(node, attr="axes", input_index=1):
    """Axes from the opset>=13 input or the older attribute; None if not constant."""
    t = _input(node, input_index)
    if t is not None:
        v = _const(t)
        return None if v is None else [int(a) for a in np.ravel(v)]
    v = node.attrs.get(attr)
    return [] if v is None else [int(a) for a in v]


def _set_input(rw, node, i, values, tag):
    const = rw.graph.make_constant(f"{node.name}_{tag}_pruned", np.ascontiguousarray(values))
    while len(node.inputs) <= i:
        node.inputs.append(gs.Variable.empty())
    node.inputs[i] = const


def _index_array(values, dtype) -> np.ndarray:
    """``values`` as ``dtype`` (int32 or int64), clipped to its range: an int32 "to the
    end" bound (INT32_MAX) read back as a Python int must not wrap."""
    info = np.iinfo(dtype)
    return np.clip(np.asarray(values, np.int64), info.min, info.max).astype(dtype)


class Rule:
    ops: tuple = ()

    def propagate(self, dg, node):
        raise NotImplementedError

    def apply(self, rw, node) -> None:
        pass


class NoRule(Rule):
    REASONS = {
        "LRN": "LRN mixes neighbouring channels",
        "DepthToSpace": "DepthToSpace moves channels into space",
        "SpaceToDepth": "SpaceToDepth moves space into channels",
        "GroupNormalization": "GroupNormalization normalises across channel groups",
        "LayerNormalization": "LayerNormalization normalises across features",
    }

    def propagate(self, dg, node):
        return self.REASONS.get(node.op, f"no channel rule for {node.op}")


# ---- channel pass-through ---------------------------------------------------------------


@rule
class PassThrough(Rule):
    """Per-element or per-channel ops: output channel i is input channel i."""

    ops = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
           "Elu", "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish",
           "Exp", "Log", "Abs", "Neg", "Sqrt", "Erf", "Floor", "Ceil", "Round", "Sign",
           "Reciprocal", "Sin", "Cos", "Clip", "Identity", "Dropout", "Cast",
           "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
           "GlobalLpPool", "MaxRoiPool")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        if info is None:
            return "input channels unknown (no shape)"
        if node.op in ("MaxPool", "Dropout") and len(node.outputs) > 1 \
                and (node.outputs[1].outputs or dg.graph.is_graph_output(node.outputs[1])):
            return "second output (indices/mask) is used"
        for t in node.inputs[1:]:   # Clip's min/max must be scalars
            if isinstance(t, gs.Variable) and t.name and dg.info.get(t.name) is not None:
                return "bounds are per-channel activations"
        dg.set_info(node.outputs[0], info.axis, info.slots)
        return None


@rule
class Normalization(Rule):
    """BatchNormalization / InstanceNormalization: per-channel parameters are sliced."""

    ops = ("BatchNormalization", "InstanceNormalization")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        if info is None or info.axis != 1:
            return "channel axis is not axis 1"
        if node.op == "BatchNormalization" and len(node.outputs) > 1 and any(
                o.outputs for o in node.outputs[1:]):
            return "training-mode BatchNormalization"
        if any(_const(t) is None for t in node.inputs[1:]):
            return "parameters are not constant"
        dg.set_info(node.outputs[0], 1, info.slots)
        if node.op == "BatchNormalization":
            dg.members.append(Member(node, info.slots, "bn"))
        return None

    def apply(self, rw, node):
        keep = rw.keep_out(node, 0)
        if keep is None:
            return
        for i in range(1, len(node.inputs)):
            _set_input(rw, node, i, _const(node.inputs[i])[keep], f"p{i}")


@rule
class Elementwise(Rule):
    """Binary/n-ary broadcasting ops: channel tensors are coupled, constants sliced."""

    ops = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "PRelu", "Where")

    def propagate(self, dg, node):
        out = node.outputs[0]
        ranks = [_rank(t) for t in node.inputs]
        if out.shape is None or any(r is None for r in ranks):
            return "shapes unknown"
        r = len(out.shape)
        chan = []                       # (info, mapped axis, tensor, rank) of variable inputs
        for t, rt in zip(node.inputs, ranks):
            if isinstance(t, gs.Constant) or _const(t) is not None:
                continue
            info = dg.info_of(t)
            if info is None:
                if rt == 0 or all(d == 1 for d in t.shape):
                    continue            # a scalar activation broadcasts over channels
                return "an input's channels are unknown"
            chan.append((info, info.axis + (r - rt), t, rt))
        if not chan:
            return "no activation input"
        full = [c for c in chan if len(c[0].slots) > 1] or chan
        # Prefer an input whose channels may go (attention scores, not an additive
        # mask [B, 1, 1, T] tracked on its fixed token axis).
        full = [c for c in full if not dg.all_fixed(c[0].slots)] or full
        ref, axis = full[0][0].slots, full[0][1]
        c_out = len(ref)
        for info, a, t, rt in chan:
            n = len(info.slots)
            if n == 1 and c_out > 1:
                continue                # broadcast along channels
            if a != axis and dg.all_fixed(info.slots) and axis - (r - rt) >= 0 \
                    and t.shape[axis - (r - rt)] == 1:
                continue                # broadcast along the channels; its own axis stays
            if a != axis or n != c_out:
                return "inputs disagree on the channel axis"
            dg.union(info.slots, ref)
        self.sliced = []                # (input index, axis in the constant)
        for i, (t, rt) in enumerate(zip(node.inputs, ranks)):
            v = _const(t)
            if v is None:
                continue
            ca = axis - (r - v.ndim)
            if 0 <= ca < v.ndim and v.shape[ca] != 1:
                if v.shape[ca] != c_out:
                    return "constant does not match the channel count"
                self.sliced.append((i, ca))
        dg.set_info(out, axis, ref)
        return None

    def apply(self, rw, node):
        keep = rw.keep_out(node, 0)
        if keep is None:
            return
        for i, ca in self.sliced:
            _set_input(rw, node, i, np.take(_const(node.inputs[i]), keep, axis=ca), f"c{i}")


# ---- layers with weights ----------------------------------------------------------------


@rule
class Conv(Rule):
    """Conv: normal (source + consumer), depthwise (per-channel member), grouped
    (source + consumer whose groups must stay equal in size)."""

    ops = ("Conv",)

    def propagate(self, dg, node):
        w = _const(node.inputs[1])
        if w is None:
            return "weights are not constant"
        b = _input(node, 2)
        if b is not None and _const(b) is None:
            return "bias is not constant"
        info = dg.info_of(node.inputs[0])
        if info is None or info.axis != 1:
            return "input channels unknown"
        g = int(node.attrs.get("group", 1))
        c_in, c_out, cig = len(info.slots), w.shape[0], w.shape[1]
        if c_in != cig * g or c_out % g:
            return "weight shape does not match the input channels"
        out = dg.new_slots(c_out)
        macs = _node_macs(node)
        if g == 1:
            self.kind = "normal"
            dg.sources.append(Source(node, out, "conv"))
            dg.consumers.append(Consumer(node, info.slots, "conv"))
            dg.mac_nodes.append(MacNode(node, macs, info.slots, out))
        elif cig == 1:
            # Depthwise (channel multiplier m): input channel i feeds outputs i·m … i·m+m−1.
            self.kind = "depthwise"
            dg.union(out, np.repeat(info.slots, c_out // g))
            dg.members.append(Member(node, out, "depthwise"))
            dg.mac_nodes.append(MacNode(node, macs, None, out))
        else:
            # Grouped: every group must keep as many inputs (and outputs) as the others;
            # the allocator equalises the counts, the rewrite picks each group's own.
            self.kind = "grouped"
            self.cig, self.cog, self.g = cig, c_out // g, g
            dg.sources.append(Source(node, out, "conv"))
            dg.consumers.append(Consumer(node, info.slots, "grouped"))
            dg.grouped.append((info.slots.reshape(g, cig), out.reshape(g, c_out // g)))
            dg.mac_nodes.append(MacNode(node, macs, info.slots, out))
        dg.set_info(node.outputs[0], 1, out)
        return None

    def apply(self, rw, node):
        ki, ko = rw.keep_in(node, 0), rw.keep_out(node, 0)
        if ki is None and ko is None:
            return
        w = _const(node.inputs[1])           # (C_out, C_in/group, k…)
        b = _const(_input(node, 2)) if _input(node, 2) is not None else None
        if ko is not None:
            w = w[ko]
            b = None if b is None else b[ko]
        if self.kind == "normal" and ki is not None:
            w = w[:, ki]
        elif self.kind == "depthwise" and ki is not None:
            node.attrs["group"] = len(ki)
        elif self.kind == "grouped" and ki is not None:
            # Output channel o (of group o // cog) keeps its own group's kept inputs.
            groups = (ko if ko is not None else np.arange(self.g * self.cog)) // self.cog
            own = [ki[(ki >= gi * self.cig) & (ki < (gi + 1) * self.cig)] - gi * self.cig
                   for gi in range(self.g)]
            w = np.stack([w[r, own[gi]] for r, gi in enumerate(groups)])
        _set_input(rw, node, 1, w, "w")
        if b is not None:
            _set_input(rw, node, 2, b, "b")


@rule
class ConvTranspose(Rule):
    """ConvTranspose, weights (C_in, C_out/group, k…)."""

    ops = ("ConvTranspose",)

    def propagate(self, dg, node):
        w = _const(node.inputs[1])
        b = _input(node, 2)
        if w is None or (b is not None and _const(b) is None):
            return "weights are not constant"
        info = dg.info_of(node.inputs[0])
        if info is None or info.axis != 1:
            return "input channels unknown"
        g = int(node.attrs.get("group", 1))
        c_in, cog = w.shape[0], w.shape[1]
        if len(info.slots) != c_in or c_in % g:
            return "weight shape does not match the input channels"
        cig = c_in // g
        out = dg.new_slots(cog * g)
        macs = _node_macs(node)
        if g == 1:
            self.kind = "normal"
            dg.sources.append(Source(node, out, "convT"))
            dg.consumers.append(Consumer(node, info.slots, "convT"))
            dg.mac_nodes.append(MacNode(node, macs, info.slots, out))
        elif cig == 1:
            self.kind = "depthwise"
            dg.union(out, np.repeat(info.slots, cog))
            dg.members.append(Member(node, out, "depthwise"))
            dg.mac_nodes.append(MacNode(node, macs, info.slots, None))
        else:
            self.kind, self.cog = "grouped", cog
            o, i = out.reshape(g, cog), info.slots.reshape(g, cig)
            dg.union(o[1:], np.broadcast_to(o[0], o[1:].shape))
            dg.union(i[1:], np.broadcast_to(i[0], i[1:].shape))
            dg.sources.append(Source(node, out, "convT"))
            dg.consumers.append(Consumer(node, info.slots, "grouped"))
            dg.mac_nodes.append(MacNode(node, macs, info.slots, out))
        dg.set_info(node.outputs[0], 1, out)
        return None

    def apply(self, rw, node):
        ki, ko = rw.keep_in(node, 0), rw.keep_out(node, 0)
        if ki is None and ko is None:
            return
        w = _const(node.inputs[1])
        b = _const(_input(node, 2)) if _input(node, 2) is not None else None
        if ki is not None:
            w = w[ki]
        if self.kind == "normal" and ko is not None:
            w = w[:, ko]
        elif self.kind == "depthwise" and ki is not None:
            node.attrs["group"] = len(ki)
        elif self.kind == "grouped" and ko is not None:
            w = w[:, ko[ko < self.cog]]
        if b is not None and ko is not None:
            _set_input(rw, node, 2, b[ko], "b")
        _set_input(rw, node, 1, w, "w")


@rule
class Gemm(Rule):
    """Gemm: input features are consumed (rows of B), hidden units are a source."""

    ops = ("Gemm",)

    def propagate(self, dg, node):
        w = _const(node.inputs[1])
        c = _input(node, 2)
        if w is None or w.ndim != 2:
            return "weights are not constant"
        if c is not None and _const(c) is None:
            return "bias is not constant"
        if int(node.attrs.get("transA", 0)):
            return "transposed activation input"
        info = dg.info_of(node.inputs[0])
        if info is None or info.axis != 1:
            return "input features unknown"
        self.trans_b = int(node.attrs.get("transB", 0))
        k, n = (w.shape[1], w.shape[0]) if self.trans_b else w.shape
        if len(info.slots) != k:
            return "weight shape does not match the input features"
        out = dg.new_slots(n)
        dg.sources.append(Source(node, out, "gemm"))
        dg.consumers.append(Consumer(node, info.slots, "gemm"))
        dg.mac_nodes.append(MacNode(node, _node_macs(node), info.slots, out))
        dg.set_info(node.outputs[0], 1, out)
        return None

    def apply(self, rw, node):
        ki, ko = rw.keep_in(node, 0), rw.keep_out(node, 0)
        if ki is None and ko is None:
            return
        w = _const(node.inputs[1])           # (K, N), or (N, K) with transB
        in_axis, out_axis = (1, 0) if self.trans_b else (0, 1)
        # Slice the output axis first: classifiers are wide, and take() copies.
        if ko is not None:
            w = np.take(w, ko, axis=out_axis)
            c = _const(_input(node, 2)) if _input(node, 2) is not None else None
            n_out = len(rw.dg.info[node.outputs[0].name].slots)
            if c is not None and c.ndim and c.shape[-1] == n_out:
                _set_input(rw, node, 2, c[..., ko], "c")
        if ki is not None:
            w = np.take(w, ki, axis=in_axis)
        _set_input(rw, node, 1, w, "w")


@rule
class MatMul(Rule):
    """MatMul by a constant (K, N): features on the last axis are consumed, N produced.
    Activation × activation (attention's QKᵀ and ·V): heads on a batch axis of both
    inputs are coupled and stay on that axis of the output."""

    ops = ("MatMul",)

    def propagate(self, dg, node):
        w = _const(node.inputs[1])
        if _const(node.inputs[0]) is not None:
            return "constant times an activation"
        if w is None:
            self.kind = "acts"
            return self._acts(dg, node)
        if w.ndim != 2:
            return "batched constant matrix"
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            if r is None or r < 2 or node.inputs[0].shape[-1] != w.shape[0]:
                return "input features unknown"
            info = None              # untracked input (e.g. symbolic axis 1): a source
        if info is not None and info.axis != r - 1 and not dg.all_fixed(info.slots):
            # The tracked axis is a row/batch axis: it passes through unchanged.
            self.kind = "rows"
            dg.set_info(node.outputs[0], info.axis, info.slots)
            dg.mac_nodes.append(MacNode(node, _node_macs(node), info.slots, None))
            return None
        if info is not None and info.axis == r - 1:
            if len(info.slots) != w.shape[0]:
                return "weight shape does not match the input features"
            ins = info.slots
        else:
            # Rows that can never be pruned (a transformer's token axis, fixed by the
            # LayerNormalization or embedding before): the features are what matters.
            ins = None
        self.kind = "features"
        out = dg.new_slots(w.shape[1])
        dg.sources.append(Source(node, out, "matmul"))
        if ins is not None:
            dg.consumers.append(Consumer(node, ins, "matmul"))
        dg.mac_nodes.append(MacNode(node, _node_macs(node), ins, out))
        dg.set_info(node.outputs[0], r - 1, out)
        return None

    def _acts(self, dg, node):
        a, b = node.inputs[0], node.inputs[1]
        ra, rb, ro = _rank(a), _rank(b), _rank(node.outputs[0])
        if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
            return "shapes unknown"
        placed = []                                  # (info, output axis)
        for t, rt, row_or_col in ((a, ra, ro - 2), (b, rb, ro - 1)):
            info = dg.info_of(t)
            if info is None:
                continue
            if info.axis < rt - 2:
                placed.append((info, info.axis + ro - rt))
            elif (t is a and info.axis == rt - 2) or (t is b and info.axis == rt - 1):
                placed.append((info, row_or_col))
            else:
                return "contracts over tracked channels"
        if not placed:
            return "input channels unknown"
        axis = placed[0][1]
        full = [p for p in placed if len(p[0].slots) > 1] or placed
        ref = full[0][0].slots
        for info, ax in placed:
            if len(info.slots) == 1 and len(ref) > 1:
                continue                             # broadcast along the head axis
            if ax != axis or len(info.slots) != len(ref):
                return "inputs are tracked on different axes"
            dg.union(info.slots, ref)
        dg.set_info(node.outputs[0], axis, ref)
        dg.attention.append(ref)
        dg.mac_nodes.append(MacNode(node, _node_macs(node), None, ref))
        return None

    def apply(self, rw, node):
        if self.kind != "features":
            return
        ki, ko = rw.keep_in(node, 0), rw.keep_out(node, 0)
        if ki is None and ko is None:
            return
        w = _const(node.inputs[1])           # (K, N)
        if ki is not None:
            w = w[ki]
        if ko is not None:
            w = w[:, ko]
        _set_input(rw, node, 1, w, "w")


@rule
class Recurrent(Rule):
    """LSTM / GRU / RNN: hidden unit j is a source slot. Removing it drops row j of
    every gate in W [dirs, G·H, in] and R [dirs, G·H, H] (gate-major: rows g·H + j),
    column j of R, its entries of B [dirs, 2·G·H] and of the LSTM peepholes P
    [dirs, 3·H], and entry j of the initial states. The input features are consumed
    through W's last axis. Y [.., dirs, .., H] and Y_h/Y_c [.., dirs, .., H] carry the
    units on their last axis (both directions share a position, so they go together).

    An initial state that is a graph input keeps its shape (a streaming caller feeds
    back the state it got): its units are fixed. A computed initial state (torch's
    zeros from ConstantOfShape) is narrowed by a Gather on the kept units; one whose
    units are tracked upstream is coupled instead. linear_before_reset does not change
    which weights a unit owns."""

    ops = ("LSTM", "GRU", "RNN")
    GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}

    def propagate(self, dg, node):
        w, r = _const(_input(node, 1)), _const(_input(node, 2))
        if w is None or r is None:
            return "weights are not constant"
        n_gates = self.GATES[node.op]
        hidden = int(node.attrs.get("hidden_size", r.shape[-1] if r.ndim == 3 else 0))
        if w.ndim != 3 or r.ndim != 3 or w.shape[1] != n_gates * hidden \
                or r.shape[1:] != (n_gates * hidden, hidden):
            return "weight shapes do not match hidden_size"
        b = _input(node, 3)
        if b is not None and _const(b) is None:
            return "bias is not constant"
        peep = _input(node, 7) if node.op == "LSTM" else None
        if peep is not None and _const(peep) is None:
            return "peepholes are not constant"
        x = node.inputs[0]
        info = dg.info.get(x.name) if isinstance(x, gs.Variable) else None
        ins = None
        if info is not None:
            if info.axis == (_rank(x) or 0) - 1:
                if len(info.slots) != w.shape[2]:
                    return "weight shape does not match the input features"
                ins = info.slots
            elif not dg.all_fixed(info.slots):
                return "input tracked on a non-feature axis"
        out = dg.new_slots(hidden)
        self.out, self.n_gates, self.tracks_input = out, n_gates, ins is not None
        self.state_gather = []              # initial-state inputs narrowed by a Gather
        for i in (5, 6) if node.op == "LSTM" else (5,):
            t = _input(node, i)
            if t is None or _const(t) is not None:
                continue                    # absent (zeros) or constant: sliced in apply
            source = _state_source(dg.graph, t)
            if source is not None:
                dg.fix(out, f"'{node.name}' ({node.op}): initial state "
                            f"'{t.name}' comes from graph input '{source}' (the "
                            f"caller's state keeps its units)" if source != t.name else
                       f"'{node.name}' ({node.op}): initial state '{t.name}' is a graph "
                       f"input (the caller's state keeps its units)")
                continue
            s = dg.info.get(t.name)
            if s is not None and s.axis == (_rank(t) or 3) - 1 and len(s.slots) == hidden:
                dg.union(s.slots, out)
            elif s is not None and not dg.all_fixed(s.slots):
                return f"initial state '{t.name}' is tracked on another axis"
            else:
                self.state_gather.append(i)
        dg.sources.append(Source(node, out, "rnn"))
        if ins is not None:
            dg.consumers.append(Consumer(node, ins, "rnn"))
        from onnxc.ir import rnn_macs

        macs_x, macs_h = rnn_macs(node)
        dg.mac_nodes.append(MacNode(node, macs_x, ins, out))
        dg.mac_nodes.append(MacNode(node, macs_h, out, out))
        for k, o in enumerate(node.outputs):
            if isinstance(o, gs.Variable) and o.name and k < 3:
                dg.set_info(o, (_rank(o) or (4 if k == 0 else 3)) - 1, out)
        return None

    def apply(self, rw, node):
        gone = rw.removed[rw.dg.label[self.out]]
        ki = rw.keep_in(node, 0) if self.tracks_input else None
        if not gone.any() and ki is None:
            return
        hidden = len(self.out)
        ko = np.flatnonzero(~gone)

        def gate_rows(n):                   # rows of n gate blocks of ``hidden`` each
            return np.concatenate([g * hidden + ko for g in range(n)])

        w = _const(node.inputs[1])[:, gate_rows(self.n_gates)]
        if ki is not None:
            w = w[:, :, ki]
        _set_input(rw, node, 1, w, "W")
        if not gone.any():
            return
        r = _const(node.inputs[2])[:, gate_rows(self.n_gates)][:, :, ko]
        _set_input(rw, node, 2, r, "R")
        if _input(node, 3) is not None:
            _set_input(rw, node, 3, _const(node.inputs[3])[:, gate_rows(2 * self.n_gates)],
                       "B")
        if node.op == "LSTM" and _input(node, 7) is not None:
            _set_input(rw, node, 7, _const(node.inputs[7])[:, gate_rows(3)], "P")
        for i in (5, 6) if node.op == "LSTM" else (5,):
            t = _input(node, i)
            if t is not None and _const(t) is not None:
                _set_input(rw, node, i, np.take(_const(t), ko, axis=-1), f"h{i}")
            elif i in self.state_gather:
                g = rw.graph
                narrowed = g.make_variable(f"{node.name}_state{i}_pruned",
                                           t.dtype or np.float32, None)
                g.gs.nodes.append(gs.Node(
                    "Gather", g.unique_name(f"{node.name}_state{i}_pruned"),
                    attrs={"axis": (_rank(t) or 3) - 1},
                    inputs=[t, g.make_constant(f"{node.name}_state{i}_keep",
                                               ko.astype(np.int64))],
                    outputs=[narrowed]))
                node.inputs[i] = narrowed
        node.attrs["hidden_size"] = int(len(ko))


# Ops that select or reshape a state without computing on it (silero: Gather(state, 0)).
_STATE_VIEWS = ("Gather", "Slice", "Split", "Squeeze", "Unsqueeze", "Identity", "Reshape",
                "Transpose", "Cast")


def _state_source(graph, tensor, depth=8):
    """Name of the graph input ``tensor`` is a view of (itself, or through Gather/Slice/
    Squeeze/...), else None."""
    inputs = {id(t): t.name for t in graph.gs.inputs}
    for _ in range(depth):
        if id(tensor) in inputs:
            return inputs[id(tensor)]
        prod = tensor.inputs[0] if len(tensor.inputs) else None
        if prod is None or prod.op not in _STATE_VIEWS or not prod.inputs:
            return None
        tensor = prod.inputs[0]
    return None


# ---- channel layout ops -----------------------------------------------------------------


@rule
class Concat(Rule):
    """Concat on the channel axis places each input's slots at its offset."""

    ops = ("Concat",)

    def propagate(self, dg, node):
        out = node.outputs[0]
        r = _rank(out)
        if r is None:
            return "shape unknown"
        axis = int(node.attrs.get("axis", 0)) % r
        infos = []
        for t in node.inputs:
            if _const(t) is not None:
                if t.shape is None or axis >= len(t.shape):
                    return "constant input of unknown shape"
                # A constant's channels can never be removed: fresh, fixed slots.
                s = dg.new_slots(int(t.shape[axis]))
                dg.fix(s, f"'{node.name}' (Concat): concatenates a constant")
                infos.append(TensorInfo(axis, s))
                continue
            info = dg.info_of(t)
            if info is None:
                return "an input's channels are unknown"
            infos.append(info)
        if all(i.axis == axis for i in infos):
            dg.set_info(out, axis, np.concatenate([i.slots for i in infos]))
            return None
        first = infos[0]
        if all(i.axis == first.axis and len(i.slots) == len(first.slots) for i in infos):
            for i in infos[1:]:        # concatenating along another axis couples channels
                dg.union(i.slots, first.slots)
            dg.set_info(out, first.axis, first.slots)
            return None
        return "inputs disagree on the channel axis"


@rule
class Split(Rule):
    """Split on the channel axis hands each output its slice of slots."""

    ops = ("Split",)

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        axis = int(node.attrs.get("axis", 0)) % r
        outs = node.outputs
        if axis != info.axis:
            for o in outs:
                dg.set_info(o, info.axis, info.slots)
            self.sizes = None
            return None
        split = _input(node, 1)
        if split is not None:
            sizes = _const(split)
            if sizes is None:
                return "split sizes are not constant"
        elif "split" in node.attrs:
            sizes = node.attrs["split"]
        else:
            c = len(info.slots)
            if c % len(outs):
                return "uneven implicit split"
            sizes = [c // len(outs)] * len(outs)
        sizes = [int(s) for s in np.ravel(sizes)]
        if sum(sizes) != len(info.slots) or len(sizes) != len(outs):
            return "split sizes do not match the channels"
        self.sizes, off = sizes, 0
        for o, s in zip(outs, sizes):
            dg.set_info(o, axis, info.slots[off:off + s])
            off += s
        return None

    def apply(self, rw, node):
        if self.sizes is None:
            return
        new = []
        for k, s in enumerate(self.sizes):
            keep = rw.keep_out(node, k)
            new.append(s if keep is None else len(keep))
        if new == self.sizes:
            return
        node.attrs.pop("num_outputs", None)
        if rw.graph.opset >= 13:
            node.attrs.pop("split", None)
            _set_input(rw, node, 1, np.array(new, np.int64), "split")
        else:
            node.attrs["split"] = new


@rule
class Slice(Rule):
    """Slice: a contiguous range on the channel axis is re-indexed; others pass through."""

    ops = ("Slice",)

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        vals = [_const(_input(node, i)) if _input(node, i) is not None else None
                for i in range(1, 5)]
        if vals[0] is None or vals[1] is None or any(
                _input(node, i + 1) is not None and vals[i] is None for i in (2, 3)):
            return "slice bounds are not constant"
        starts, ends = [int(v) for v in vals[0]], [int(v) for v in vals[1]]
        axes = [int(a) % r for a in vals[2]] if vals[2] is not None \
            else list(range(len(starts)))
        steps = [int(s) for s in vals[3]] if vals[3] is not None else [1] * len(starts)
        self.j = axes.index(info.axis) if info.axis in axes else None
        if self.j is None:
            dg.set_info(node.outputs[0], info.axis, info.slots)
            return None
        if steps[self.j] != 1:
            return "strided Slice on the channel axis"
        self.c_in = len(info.slots)
        self.sel = np.arange(self.c_in)[slice(starts[self.j], ends[self.j], 1)]
        self.starts, self.ends = starts, ends
        # Rewritten bounds keep the original index dtype: Slice binds starts/ends/axes/
        # steps to one type (Tind), so int64 bounds beside int32 axes do not load.
        self.dtypes = (vals[0].dtype, vals[1].dtype)
        dg.set_info(node.outputs[0], info.axis, info.slots[self.sel])
        return None

    def apply(self, rw, node):
        if self.j is None:
            return
        keep = rw.keep_in(node, 0)
        if keep is None:
            return
        lo = self.sel[0] if len(self.sel) else 0
        new_start = int(np.sum(keep < lo))
        new_len = int(np.isin(keep, self.sel).sum())
        starts, ends = list(self.starts), list(self.ends)
        starts[self.j], ends[self.j] = new_start, new_start + new_len
        _set_input(rw, node, 1, _index_array(starts, self.dtypes[0]), "starts")
        _set_input(rw, node, 2, _index_array(ends, self.dtypes[1]), "ends")


@rule
class Pad(Rule):
    """Pad: zero channels padded on the channel axis are fresh slots; pads are recounted."""

    ops = ("Pad",)

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        if _input(node, 3) is not None:
            return "Pad with explicit axes"
        pads = _const(_input(node, 1)) if _input(node, 1) is not None \
            else node.attrs.get("pads")
        if pads is None:
            return "pads are not constant"
        pads = [int(p) for p in np.ravel(pads)]
        self.pads, self.axis = pads, info.axis
        p0, p1 = pads[info.axis], pads[info.axis + r]
        if p0 == 0 and p1 == 0:
            dg.set_info(node.outputs[0], info.axis, info.slots)
            return None
        if node.attrs.get("mode", "constant") != "constant":
            return "non-constant Pad on the channel axis"
        if p0 < 0 or p1 < 0:
            return "negative Pad (crop) on the channel axis"
        self.c_in, self.r = len(info.slots), r
        # Padded channels hold the pad value; they are removable like any other slot.
        slots = np.concatenate([dg.new_slots(p0), info.slots, dg.new_slots(p1)])
        dg.set_info(node.outputs[0], info.axis, slots)
        return None

    def apply(self, rw, node):
        keep = rw.keep_out(node, 0)
        if keep is None or not hasattr(self, "c_in"):
            return
        pads = list(self.pads)
        p0 = pads[self.axis]
        pads[self.axis] = int(np.sum(keep < p0))
        pads[self.axis + self.r] = int(np.sum(keep >= p0 + self.c_in))
        if _input(node, 1) is not None:
            _set_input(rw, node, 1, np.array(pads, np.int64), "pads")
        else:
            node.attrs["pads"] = pads


@rule
class Flatten(Rule):
    """Flatten: channel c becomes the block of features c·inner … c·inner+inner−1."""

    ops = ("Flatten",)

    def propagate(self, dg, node):
        x = node.inputs[0]
        info = dg.info_of(x)
        r = _rank(x)
        if info is None or r is None:
            return "input channels unknown"
        axis = int(node.attrs.get("axis", 1)) % max(r, 1)
        if info.axis < axis:
            return "channel axis ends up in the leading dimension"
        dims = list(x.shape)
        between, after = dims[axis:info.axis], dims[info.axis + 1:]
        if not all(isinstance(d, (int, np.integer)) for d in between + after):
            return "trailing dims are symbolic"
        inner = int(np.prod(after)) if after else 1
        outer = int(np.prod(between)) if between else 1
        dg.set_info(node.outputs[0], 1, np.tile(np.repeat(info.slots, inner), outer))
        return None


@rule
class Reshape(Rule):
    """Reshape that keeps the channel axis (e.g. N×C → N×C×1×1) or flattens the
    channel with everything after it (N×C×H×W → N×CHW); otherwise the general factor
    rule below (attention heads). A split of a non-last channel axis regroups
    channels (e.g. ShuffleNet's channel shuffle) and has no rule."""

    ops = ("Reshape",)

    def propagate(self, dg, node):
        self.mode = None
        reason = self._flatten(dg, node)
        if reason is None:
            self.mode = "flatten"
            return None
        why = self._factors(dg, node)
        if why is None:
            self.mode = "factors"
            return None
        return why if reason == "shapes unknown" else f"{reason}; {why}"

    def _flatten(self, dg, node):
        x, out = node.inputs[0], node.outputs[0]
        info = dg.info_of(x)
        target = _const(node.inputs[1])
        if info is None or x.shape is None or out.shape is None:
            return "shapes unknown"
        if target is None:
            return "target shape is not constant"
        a = info.axis
        din, dout = list(x.shape), list(out.shape)
        if dout[:a] != din[:a] or len(dout) <= a:
            return "Reshape regroups the channel axis"
        c = len(info.slots)
        after = din[a + 1:]
        if not all(isinstance(d, (int, np.integer)) for d in after + dout[a + 1:]):
            return "trailing dims are symbolic"
        inner = int(np.prod(after)) if after else 1
        tail_out = int(np.prod(dout[a + 1:])) if len(dout) > a + 1 else 1
        self.a = a
        if dout[a] == c and tail_out == inner:
            dg.set_info(out, a, info.slots)
        elif dout[a] == c * inner and tail_out == 1:
            dg.set_info(out, a, np.repeat(info.slots, inner))
        else:
            return "Reshape regroups the channel axis (e.g. a channel shuffle)"
        return None

    def _factors(self, dg, node):
        """Follow the channel axis through split and merged dims, on shapes probed at
        batch 1 (so torch's [T, B, E] -> [T, B*H, Dh] reads as E -> (H, Dh)). A split
        axis keeps one factor tracked — the outermost one that no Gather/Split/Slice
        later selects from (heads, not torch's fused q/k/v axis) — and the slots of
        the other factors are coupled (a head goes whole, q/k/v heads together)."""
        x, out = node.inputs[0], node.outputs[0]
        info = dg.info_of(x)
        if info is None:
            return "input channels unknown"
        din, dout = dg.probe_shape(x, 1), dg.probe_shape(out, 1)
        if din is None or dout is None:
            return "shapes do not resolve"
        a, c = info.axis, len(info.slots)
        if a >= len(din) or din[a] != c:
            return "channel count disagrees with the probed shape"
        group = next((g for g in _factor_groups(din, dout) if a in g[0]), None)
        if group is None or not [j for j in group[1] if dout[j] > 1]:
            return "the channel axis disappears"
        gi, gj = group
        size = int(np.prod([din[i] for i in gi]))
        if size > (1 << 22):
            return "channel axis merged with a very large dim"
        inner_a = int(np.prod([din[i] for i in gi if i > a]))
        pos = np.arange(size)
        chan = (pos // inner_a) % c                     # input channel at each position
        selected = _selected_axes(out, set(gj))
        cands = [j for j in gj if dout[j] > 1 and j not in selected]
        if not cands:
            return "every factor of the channel axis is selected from (Gather/Split/Slice)"

        def pairs_for(j):
            stride = int(np.prod([dout[i] for i in gj if i > j]))
            coord = (pos // stride) % dout[j]           # output index on axis j
            # (output index, input channel) pairs, sorted: each output index's channels.
            return np.unique(np.stack([coord, chan], 1), axis=0)

        def one_slot_each(pairs):
            return len(np.unique(np.stack([pairs[:, 0], info.slots[pairs[:, 1]]], 1),
                                 axis=0)) == len(np.unique(pairs[:, 0]))

        # A factor whose every index already holds one slot needs no coupling (a static
        # batch merged with heads, [2*H, T, Dh] -> [2, H, T, Dh]: the H factor); else the
        # outermost one (heads before their features).
        k = next((j for j in cands if one_slot_each(pairs_for(j))), cands[0])
        pairs = pairs_for(k)
        new = info.slots[pairs[np.searchsorted(pairs[:, 0], np.arange(dout[k])), 1]]
        why = _batch_outer(dg, x, out, info, k, pairs, dout[k])
        if why:
            return why
        split = not one_slot_each(pairs)               # some output index holds 2+ slots
        if split and a != len(din) - 1:
            return "splits a channel axis that is not the last (e.g. a channel shuffle)"
        if split:
            dg.union(info.slots[pairs[:, 1]], new[pairs[:, 0]])
        self.k = k
        self.fixed_target = self._target(dg, node)
        if isinstance(self.fixed_target, str):
            return self.fixed_target
        dg.set_info(out, k, new)
        return None

    def _target(self, dg, node):
        """The target as a constant array; a computed target (Shape → Gather → Concat
        ...) is rebuilt from the probes: batch-dependent entries become 0 (copy the
        input's dim) or one -1. Returns a reason string when neither is possible."""
        target = _const(node.inputs[1])
        if target is not None:
            return None
        x, out = node.inputs[0], node.outputs[0]
        p1, p2 = dg.probe_shape(out, 1), dg.probe_shape(out, 2)
        i1, i2 = dg.probe_shape(x, 1), dg.probe_shape(x, 2)
        if p1 is None or p2 is None or i1 is None or i2 is None:
            return "target shape is computed and does not resolve at two batch sizes"
        t = np.array(p1, np.int64)
        dyn = [i for i in range(len(p1)) if p1[i] != p2[i]]
        if len(dyn) > 1:
            if int(node.attrs.get("allowzero", 0)):
                return "computed target with several batch-dependent dims and allowzero"
            for i in list(dyn):
                if i < len(i1) and i1[i] == p1[i] and i2[i] == p2[i]:
                    t[i] = 0
                    dyn.remove(i)
        if len(dyn) > 1:
            return "computed target with several batch-dependent dims"
        for i in dyn:
            t[i] = -1
        return t

    def apply(self, rw, node):
        keep = rw.keep_out(node, 0)
        if keep is None:
            return
        if self.mode == "flatten":
            target = _const(node.inputs[1]).copy()
            if target[self.a] > 0:        # explicit feature count: rewrite it
                target[self.a] = len(keep)
                _set_input(rw, node, 1, target.astype(np.int64), "shape")
            return
        target = self.fixed_target if self.fixed_target is not None \
            else _const(node.inputs[1])
        target = np.array(target, np.int64).copy()
        if target[self.k] > 0:
            target[self.k] = len(keep)
        _set_input(rw, node, 1, target, "shape")


def _batch_outer(dg, x, out, info, k, pairs, n1):
    """When output axis k grows with the batch (torch's [T, B*H, Dh]), check on the
    batch-2 probe that the batch is its outer factor: index v then holds the channels
    index v mod n1 held at batch 1, so the slots describe every sample alike."""
    din2, dout2 = dg.probe_shape(x, 2), dg.probe_shape(out, 2)
    if din2 is None or dout2 is None or dout2[k] == n1:
        return None
    c = len(info.slots)
    a = info.axis
    group = next((g for g in _factor_groups(din2, dout2) if a in g[0] and k in g[1]), None)
    if group is None or dout2[k] % n1 or din2[a] % c:
        return "the channel axis merges with the batch in a way that cannot be followed"
    gi, gj = group
    size = int(np.prod([din2[i] for i in gi]))
    if size > (1 << 22):
        return "channel axis merged with a very large dim"
    pos = np.arange(size)
    chan = (pos // int(np.prod([din2[i] for i in gi if i > a]))) % c
    coord = (pos // int(np.prod([dout2[j] for j in gj if j > k]))) % dout2[k]
    got = {(int(v) % n1, int(ch)) for v, ch in zip(coord, chan)}
    if got != {(int(v), int(ch)) for v, ch in pairs}:
        return "the batch is not the outer factor of the merged channel axis"
    return None


def _factor_groups(din, dout):
    """Pair runs of input and output dims with equal products (1-dims alone)."""
    groups, i, j, n, m = [], 0, 0, len(din), len(dout)
    while i < n or j < m:
        if i < n and din[i] == 1 and (j >= m or dout[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and dout[j] == 1 and (i >= n or din[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            return []
        gi, gj, pi, pj = [i], [j], din[i], dout[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i)
                pi *= din[i]
                i += 1
            elif pj < pi and j < m:
                gj.append(j)
                pj *= dout[j]
                j += 1
            else:
                return []
        groups.append((gi, gj))
    return groups


_MOVERS = ("Unsqueeze", "Squeeze", "Transpose", "Identity")


def _selected_axes(tensor, axes, depth=6):
    """Which of ``axes`` of ``tensor`` a later Gather/Split/Slice selects from,
    following Unsqueeze/Squeeze/Transpose (torch's fused q/k/v chunk axis)."""
    found = set()
    r = _rank(tensor)
    if r is None or depth == 0:
        return found
    for n in tensor.outputs:
        for ax in axes:
            if n.op == "Gather" and n.inputs[0] is tensor \
                    and int(n.attrs.get("axis", 0)) % r == ax:
                found.add(ax)
            elif n.op == "Split" and int(n.attrs.get("axis", 0)) % r == ax:
                found.add(ax)
            elif n.op == "Slice" and n.inputs[0] is tensor:
                sl = _const(_input(n, 3)) if _input(n, 3) is not None else None
                starts = _const(_input(n, 1)) if _input(n, 1) is not None else None
                sl_axes = [int(v) % r for v in np.ravel(sl)] if sl is not None else \
                    (list(range(len(np.ravel(starts)))) if starts is not None else [])
                if ax in sl_axes:
                    found.add(ax)
            elif n.op in _MOVERS:
                moved = _moved_axis(n, ax, r)
                if moved is not None and _selected_axes(n.outputs[0], {moved}, depth - 1):
                    found.add(ax)
    return found


def _moved_axis(node, ax, r):
    """Where axis ``ax`` of the input of an Unsqueeze/Squeeze/Transpose ends up."""
    if node.op == "Identity":
        return ax
    if node.op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", list(range(r))[::-1])]
        return perm.index(ax)
    axes = _axes(node)
    if axes is None:
        return None
    if node.op == "Squeeze":
        if not axes:
            axes = [i for i, d in enumerate(node.inputs[0].shape or []) if d == 1]
        axes = [a % r for a in axes]
        return None if ax in axes else ax - sum(a < ax for a in axes)
    ro = r + len(axes)
    axes = [a % ro for a in axes]
    return [p for p in range(ro) if p not in axes][ax]


@rule
class Expand(Rule):
    """Expand: tracked channels pass through (never broadcast). An input whose channels
    can never go (e.g. an attention padding mask) broadcast along exactly one axis gets
    fresh slots there: torch expands the mask [B, 1, 1, T] over the heads, and the Add
    into the scores then couples them with the heads, so the expand size is rewritten."""

    ops = ("Expand",)

    def propagate(self, dg, node):
        x, out = node.inputs[0], node.outputs[0]
        self.k = self.through = None
        if _const(x) is not None:
            return "broadcasts a constant"
        info = dg.info_of(x)
        px, po = dg.probe_shape(x, 1), dg.probe_shape(out, 1)
        if px is None or po is None or len(po) < len(px):
            return "shapes do not resolve"
        off = len(po) - len(px)
        if info is not None and not dg.all_fixed(info.slots):
            if px[info.axis] != po[info.axis + off]:
                return "broadcasts the channel axis"
            self.through = info.axis + off
            dg.set_info(out, info.axis + off, info.slots)
            return None
        grown = [j for j in range(len(po)) if (j < off or px[j - off] == 1) and po[j] > 1]
        if len(grown) != 1:
            if info is not None and px[info.axis] == po[info.axis + off]:
                self.through = info.axis + off
                dg.set_info(out, info.axis + off, info.slots)
                return None
            return "broadcasts along several axes"
        shape = _const(node.inputs[1])
        if shape is None:
            # Computed: the probed output shape, batch-dependent entries as 1 (Expand
            # keeps the input's dim there) when the input has that dim.
            p2, x2 = dg.probe_shape(out, 2), dg.probe_shape(x, 2)
            if p2 is None or x2 is None:
                return "expand shape is computed and does not resolve at two batch sizes"
            shape = np.array(po, np.int64)
            for j in range(len(po)):
                if po[j] != p2[j]:
                    if j < off or (px[j - off], x2[j - off]) != (po[j], p2[j]):
                        return "expand shape has a batch-dependent dim the input lacks"
                    shape[j] = 1
        self.shape = np.array(shape, np.int64).ravel()
        self.k = grown[0]
        if self.k - (len(po) - len(self.shape)) < 0:
            return "expand shape shorter than the output"
        dg.set_info(out, self.k, dg.new_slots(po[self.k]))
        return None

    def apply(self, rw, node):
        if self.through is not None:
            self._pass_through(rw, node)
            return
        keep = rw.keep_out(node, 0)
        if keep is None or self.k is None:
            return
        shape = self.shape.copy()
        ro = len(rw.dg.probe_shape(node.outputs[0], 1))
        shape[self.k - (ro - len(shape))] = len(keep)
        _set_input(rw, node, 1, shape, "shape")

    def _pass_through(self, rw, node):
        """A constant expand shape naming the channel count there (magika's LayerNorm
        expands to the shape its Reshape was given) gets 1, which keeps the input's dim,
        however many channels remain."""
        if rw.keep_in(node, 0) is None:
            return
        shape = _const(node.inputs[1])
        ro = len(rw.dg.probe_shape(node.outputs[0], 1))
        if shape is not None:
            shape = np.array(shape).ravel()
            j = self.through - (ro - len(shape))
            if 0 <= j and shape[j] != 1:
                shape = shape.copy()
                shape[j] = 1
                _set_input(rw, node, 1, shape, "shape")
            return
        # Computed (magika: Concat(batch, [1], [256])): Min with a mask that is 1 at
        # the channel entry and the largest int elsewhere, for this Expand only.
        src = node.inputs[1]
        n = len(src.shape) == 1 and src.shape[0]
        if not isinstance(n, (int, np.integer)) or not n or not 0 <= self.through - (ro - n):
            return
        mask = np.full(int(n), np.iinfo(np.int64).max, np.int64)
        mask[self.through - (ro - n)] = 1
        g = rw.graph
        out = g.make_variable(f"{node.name}_shape_pruned", np.int64, [int(n)])
        g.gs.nodes.append(gs.Node("Min", g.unique_name(f"{node.name}_shape_pruned"),
                                  inputs=[src, g.make_constant(f"{node.name}_shape_mask", mask)],
                                  outputs=[out]))
        node.inputs[1] = out


@rule
class Shape(Rule):
    """Shape is harmless when what is read of it (Gather/Slice with constant indices)
    never includes the channel axis; otherwise the channel count flows into values."""

    ops = ("Shape",)

    def propagate(self, dg, node):
        x = node.inputs[0]
        info = dg.info.get(x.name) if isinstance(x, gs.Variable) else None
        if info is None:
            return None
        r = _rank(x)
        if r is None:
            return "Shape reads the channel count"
        start = int(node.attrs.get("start", 0))
        start = start % r if start < 0 else min(start, r)
        end = node.attrs.get("end")
        end = r if end is None else (int(end) % r if int(end) < 0 else min(int(end), r))
        dims = list(range(start, max(start, end)))
        if info.axis not in dims:
            return None
        pos = dims.index(info.axis)
        n = len(dims)
        for use in node.outputs[0].outputs:
            if use.op == "Gather" and use.inputs[0] is node.outputs[0]:
                idx = _const(use.inputs[1])
                if idx is not None and pos not in {int(v) % n for v in np.ravel(idx)}:
                    continue
            elif use.op == "Slice" and use.inputs[0] is node.outputs[0]:
                st = _const(_input(use, 1)) if _input(use, 1) is not None else None
                en = _const(_input(use, 2)) if _input(use, 2) is not None else None
                stp = _const(_input(use, 4)) if _input(use, 4) is not None else None
                if st is not None and en is not None and (stp is None or int(
                        np.ravel(stp)[0]) == 1):
                    lo, hi = int(np.ravel(st)[0]), int(np.ravel(en)[0])
                    lo = max(lo + n, 0) if lo < 0 else min(lo, n)
                    hi = max(hi + n, 0) if hi < 0 else min(hi, n)
                    if not lo <= pos < hi:
                        continue
            return "Shape reads the channel count"
        return None


@rule
class Gather(Rule):
    """Gather along an axis other than the channels (torch's q/k/v = qkv[0], [1], [2];
    a class token x[:, 0]): the channel axis moves by the index rank."""

    ops = ("Gather",)

    def propagate(self, dg, node):
        data, idx = node.inputs[0], node.inputs[1]
        if _const(data) is not None:
            return "Gather from a constant table (embedding lookup)"
        info = dg.info_of(data)
        r, ri = _rank(data), _rank(idx)
        if info is None or r is None or ri is None:
            return "input channels unknown"
        axis = int(node.attrs.get("axis", 0)) % r
        if axis == info.axis:
            return "Gather selects channels"
        new = info.axis if info.axis < axis else info.axis - 1 + ri
        dg.set_info(node.outputs[0], new, info.slots)
        return None


@rule
class Transpose(Rule):
    ops = ("Transpose",)

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        perm = [int(p) for p in node.attrs.get("perm", list(range(r))[::-1])]
        dg.set_info(node.outputs[0], perm.index(info.axis), info.slots)
        return None


@rule
class Squeeze(Rule):
    ops = ("Squeeze", "Unsqueeze")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r, ro = _rank(node.inputs[0]), _rank(node.outputs[0])
        if info is None or r is None or ro is None:
            return "shapes unknown"
        axes = _axes(node)
        if axes is None:
            return "axes are not constant"
        if node.op == "Squeeze":
            if not axes:
                axes = [i for i, d in enumerate(node.inputs[0].shape) if d == 1]
            axes = [a % r for a in axes]
            if info.axis in axes:
                return "squeezes the channel axis"
            new = info.axis - sum(a < info.axis for a in axes)
        else:
            axes = [a % ro for a in axes]
            new = [p for p in range(ro) if p not in axes][info.axis]
        dg.set_info(node.outputs[0], new, info.slots)
        return None


@rule
class Resize(Rule):
    """Resize/Upsample with scale 1 (or size C) on the channel axis."""

    ops = ("Resize", "Upsample")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        if info is None:
            return "input channels unknown"
        scales = _input(node, 2 if node.op == "Resize" else 1)
        sizes = _input(node, 3) if node.op == "Resize" else None
        if scales is not None and _const(scales) is not None and _const(scales).size:
            if float(np.ravel(_const(scales))[info.axis]) != 1.0:
                return "resizes the channel axis"
        elif sizes is not None:
            s = _const(sizes)
            if s is None or int(np.ravel(s)[info.axis]) != len(info.slots):
                return "sizes are not constant or resize the channel axis"
            self.sizes = s
        elif node.op == "Upsample" and "scales" in node.attrs:
            if float(node.attrs["scales"][info.axis]) != 1.0:
                return "resizes the channel axis"
        else:
            return "scales are not constant"
        self.axis = info.axis
        dg.set_info(node.outputs[0], info.axis, info.slots)
        return None

    def apply(self, rw, node):
        keep = rw.keep_out(node, 0)
        if keep is None or not hasattr(self, "sizes"):
            return
        s = np.array(self.sizes, np.int64).copy()
        s[self.axis] = len(keep)
        _set_input(rw, node, 3, s, "sizes")


@rule
class Reduce(Rule):
    """Reductions over non-channel axes (e.g. ReduceMean over H, W) pass channels."""

    ops = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        if node.op in ("ArgMax", "ArgMin"):
            axes = [int(node.attrs.get("axis", 0))]
        else:
            axes = _axes(node)
            if axes is None:
                return "axes are not constant"
        if not axes:
            return "reduces over every axis"
        axes = [a % r for a in axes]
        if info.axis in axes:
            return "reduces over the channel axis"
        keep = int(node.attrs.get("keepdims", 1))
        new = info.axis if keep else info.axis - sum(a < info.axis for a in axes)
        dg.set_info(node.outputs[0], new, info.slots)
        return None


@rule
class Softmax(Rule):
    ops = ("Softmax", "LogSoftmax", "Hardmax")

    def propagate(self, dg, node):
        info = dg.info_of(node.inputs[0])
        r = _rank(node.inputs[0])
        if info is None or r is None:
            return "input channels unknown"
        default = -1 if dg.graph.opset >= 13 else 1
        axis = int(node.attrs.get("axis", default)) % r
        if axis == info.axis or (dg.graph.opset < 13 and axis <= info.axis):
            return f"{node.op} normalises over the channel axis"
        dg.set_info(node.outputs[0], info.axis, info.slots)
        return None


def _node_macs(node) -> int:
    from onnxc.ir import node_macs

    return node_macs(node)
