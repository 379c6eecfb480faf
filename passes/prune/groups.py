"""Dependency groups: which channels must be removed together, found in one walk.

Every channel position of every activation tensor is a *slot*. Walking the graph
once in topological order, each op's rule (``rules.py``) says how its output slots
relate to its input slots: a Relu passes them through, a residual Add makes the
slots of both inputs equal, a Concat places them at offsets, a channel Pad adds
fresh zero slots around them, a Conv creates fresh output slots (a *source*) and
consumes its input slots. Slots that must go together end up in one connected
component, a *class*: removing a class removes every slot in it, everywhere, so
the rewritten graph is consistent by construction.

A *group* is the set of classes owned by the same source layers (e.g. the whole
residual trunk of a ResNet, including the channels its shortcut Pads add). A
group touching an op without a rule, a graph input or a graph output is *blocked*
and left whole, with the reason. Classes of a group that sit in exactly the same
tensors form a *subgroup*; ratios and rounding apply per subgroup so every tensor
keeps a channel count that respects ``--prune-min-channels``/``--prune-multiple``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class TensorInfo:
    axis: int              # channel axis of the tensor
    slots: np.ndarray      # (C,) slot id per position along ``axis``


@dataclass
class Source:
    """A layer whose output channels are created here (Conv, Gemm, ...)."""

    node: gs.Node
    slots: np.ndarray      # (C_out,) slot of each output channel
    kind: str              # "conv", "convT", "gemm", "matmul"


@dataclass
class Member:
    """A per-channel layer inside a class (BatchNormalization, depthwise conv)."""

    node: gs.Node
    slots: np.ndarray
    kind: str              # "bn", "depthwise"


@dataclass
class Consumer:
    """A layer reading channels through its weights (input side of Conv, Gemm...)."""

    node: gs.Node
    slots: np.ndarray      # (C_in,) slot of each input position (features for Gemm)
    kind: str


@dataclass
class MacNode:
    """A MAC-carrying node and the slots its cost scales with."""

    node: gs.Node
    macs: int
    in_slots: np.ndarray | None
    out_slots: np.ndarray | None


@dataclass
class Group:
    gid: int
    classes: np.ndarray                     # class ids (sorted)
    sources: list = field(default_factory=list)   # source node names
    subgroups: list = field(default_factory=list)  # list of class-id arrays
    blocked: str | None = None              # reason the group is left whole
    residual: bool = False                  # channels shared by several sources (Add/Sum)

    @property
    def label(self) -> str:
        names = self.sources[:3]
        more = f" (+{len(self.sources) - 3} more)" if len(self.sources) > 3 else ""
        return ", ".join(names) + more


# Ops that may read a tensor whose channel axis merges the batch with heads (torch's
# [T, B*H, Dh] before [B, H, T, Dh]): they never index positions along that axis.
BATCHY_SAFE = frozenset((
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MatMul", "Softmax", "LogSoftmax",
    "Mul", "Div", "Add", "Sub", "Cast", "Identity", "Dropout", "Shape", "Relu", "Gelu",
    "Erf", "Sqrt", "Exp", "Tanh", "Sigmoid"))


class DependencyGraph:
    """Slots, their couplings and the per-op records the pruner needs."""

    def __init__(self, graph):
        from .rules import rule_for

        self.graph = graph
        self.count = 0
        self._edges: list = []
        self.info: dict[str, TensorInfo] = {}
        self.fixed: list = []          # [(slots, reason)]
        self.sources: list[Source] = []
        self.members: list[Member] = []
        self.consumers: list[Consumer] = []
        self.mac_nodes: list[MacNode] = []
        self.grouped: list = []        # [(in slots (G, C_in/G), out slots (G, C_out/G))]
        self.rules: dict = {}          # id(node) -> rule instance (for the rewrite)
        self.attention: list = []      # head slots coupled by activation×activation MatMuls
        self._fixed_mark = np.zeros(0, bool)   # slots fixed so far (during the walk)
        self._probes: dict = {}        # probe batch -> {tensor name: concrete shape}
        self._probe_fallback: set = set()   # probe batches that ran the slow inference

        graph.gs.toposort()
        for tensor in graph.gs.inputs:
            info = self.fresh_info(tensor)
            if info is not None:
                self.fix(info.slots, f"channels of graph input '{tensor.name}'")
        self.batchy: set = set()       # tensors whose channel axis also carries the batch
        for node in graph.gs.nodes:
            rule = rule_for(node)
            if node.op not in BATCHY_SAFE and any(
                    isinstance(t, gs.Variable) and t.name in self.batchy for t in node.inputs):
                reason = "channel axis merged with the batch (e.g. [B*heads, T, d])"
            else:
                reason = rule.propagate(self, node)
            if reason:
                self.block_node(node, reason)
            else:
                self.rules[id(node)] = rule
                self._mark_batchy(node)
        for tensor in graph.gs.outputs:
            info = self.info.get(tensor.name)
            if info is not None:
                self.fix(info.slots, f"reaches graph output '{tensor.name}'")
        self._solve()

    def _mark_batchy(self, node) -> None:
        """An output whose tracked axis grows with the batch (probed at 1 and 2) holds the
        heads once per sample: only ops in BATCHY_SAFE may read it."""
        if not any(isinstance(t, gs.Variable) and t.name in self.batchy
                   for t in node.inputs) and node.op not in ("Reshape", "Transpose"):
            return
        for t in node.outputs:
            info = self.info.get(t.name)
            if info is None:
                continue
            p1, p2 = self.probe_shape(t, 1), self.probe_shape(t, 2)
            if p1 is not None and p2 is not None and info.axis < len(p1) \
                    and p1[info.axis] != p2[info.axis]:
                self.batchy.add(t.name)

    # ---- used by rules ----------------------------------------------------------------
    def new_slots(self, n: int) -> np.ndarray:
        out = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
        assert a.shape == b.shape
        if a.size:
            self._edges.append((a, b))

    def fix(self, slots: np.ndarray, reason: str) -> None:
        if len(slots):
            slots = np.asarray(slots, np.int64)
            self.fixed.append((slots, reason))
            if len(self._fixed_mark) < self.count:
                self._fixed_mark = np.concatenate(
                    [self._fixed_mark, np.zeros(self.count - len(self._fixed_mark), bool)])
            self._fixed_mark[slots] = True

    def all_fixed(self, slots: np.ndarray) -> bool:
        """True when every slot is already fixed (so whatever it is coupled to later stays
        whole too): e.g. the token axis of a transformer's residual stream."""
        slots = np.asarray(slots, np.int64)
        return bool(len(slots)) and bool(np.all(slots < len(self._fixed_mark))) \
            and bool(self._fixed_mark[slots].all())

    def probe_shape(self, tensor, value: int):
        """Concrete shape of ``tensor`` when every symbolic dim of the graph inputs is
        ``value`` (ONNX shape inference with data propagation, so Reshape targets
        computed from Shape subgraphs resolve). None if it does not resolve.

        Reshape rules read shapes at batch 1: an axis that merges the batch with heads
        (torch's ``[T, B*H, Dh]``) then shows its per-sample size, which is what its
        slots describe; a second probe tells batch-dependent target entries apart."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.values.shape)
        name = getattr(tensor, "name", None)
        if value not in self._probes:
            # ONNX data propagation first; ONNX Runtime's symbolic inference (slow to
            # import, evaluates Div/Mod on shapes: Swin's window counts) only when a
            # tensor asked about is left open.
            self._probes[value] = self._infer_probe(value, None)
        shapes = self._probes[value]
        if name not in shapes and value not in self._probe_fallback:
            self._probe_fallback.add(value)
            for k, v in self._infer_probe(value, _ort_symbolic_shapes).items():
                shapes.setdefault(k, v)
        return shapes.get(name)

    def _infer_probe(self, value: int, infer) -> dict:
        """{tensor name: concrete shape} with every symbolic input dim set to ``value``
        (``infer`` None: ONNX inference with data propagation)."""
        return self.graph.concrete_shapes(lambda name, axis: value, infer)

    def info_of(self, tensor) -> TensorInfo | None:
        """Channel info of a variable tensor (None for constants / unknown shapes)."""
        if isinstance(tensor, gs.Constant) or tensor is None or tensor.name == "":
            return None
        info = self.info.get(tensor.name)
        if info is None:
            # Produced by something we never tracked (e.g. a Shape subgraph): treat its
            # channels as fixed so anything coupled to them stays whole.
            info = self.fresh_info(tensor)
            if info is not None:
                self.fix(info.slots, f"tensor '{tensor.name}' has untracked channels")
        return info

    def fresh_info(self, tensor, axis: int = 1) -> TensorInfo | None:
        shape = tensor.shape
        if shape is None or len(shape) < 2 or not isinstance(shape[axis], (int, np.integer)) \
                or shape[axis] <= 0:
            return None
        info = TensorInfo(axis, self.new_slots(int(shape[axis])))
        self.info[tensor.name] = info
        return info

    def set_info(self, tensor, axis: int, slots: np.ndarray) -> None:
        self.info[tensor.name] = TensorInfo(axis, np.asarray(slots, np.int64))

    def block_node(self, node, reason: str) -> None:
        """An op without a (applicable) rule: every channel touching it stays."""
        why = f"'{node.name}' ({node.op}): {reason}"
        for t in node.inputs:
            info = self.info.get(t.name) if isinstance(t, gs.Variable) else None
            if info is not None:
                self.fix(info.slots, why)
        for t in node.outputs:
            if t.name in self.info:
                self.fix(self.info[t.name].slots, why)
            else:
                info = self.fresh_info(t, _feature_axis(node, t))
                if info is not None:
                    self.fix(info.slots, why)

    # ---- solving ------------------------------------------------------------------------
    def _solve(self) -> None:
        n = self.count
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, np.int64)
        adj = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        _, self.label = connected_components(adj, directed=False)   # (slots,) class id
        self.num_classes = int(self.label.max()) + 1 if n else 0

        # Which classes are fixed, and why (first reason wins).
        self.fixed_reason: dict[int, str] = {}
        for slots, reason in self.fixed:
            for c in np.unique(self.label[slots]):
                self.fixed_reason.setdefault(int(c), reason)

        # Groups: classes linked by sharing a source layer.
        src_classes = [np.unique(self.label[s.slots]) for s in self.sources]
        owned = np.zeros(self.num_classes, bool)
        ea, eb = [], []
        for cl in src_classes:
            owned[cl] = True
            ea.append(cl[:-1])
            eb.append(cl[1:])
        ea = np.concatenate(ea) if ea else np.zeros(0, np.int64)
        eb = np.concatenate(eb) if eb else np.zeros(0, np.int64)
        k = self.num_classes
        cadj = coo_matrix((np.ones(len(ea), np.int8), (ea, eb)), shape=(k, k))
        _, glabel = connected_components(cadj, directed=False)
        self.class_group = np.full(k, -1, np.int64)
        gids = {}
        self.groups: list[Group] = []
        for c in np.flatnonzero(owned):
            g = gids.setdefault(int(glabel[c]), len(gids))
            if g == len(self.groups):
                self.groups.append(Group(g, np.zeros(0, np.int64)))
            self.class_group[c] = g
        for g in self.groups:
            g.classes = np.flatnonzero(self.class_group == g.gid)
        n_src = np.zeros(k, np.int64)          # distinct sources per class
        for s, cl in zip(self.sources, src_classes):
            n_src[cl] += 1
            grp = self.groups[self.class_group[cl[0]]]
            if s.node.name not in grp.sources:
                grp.sources.append(s.node.name)
        # Separate q, k and v projections share each head's class through the attention
        # MatMuls, not through a residual sum: that alone does not make a group residual.
        heads = np.zeros(k, bool)
        for slots in self.attention:
            heads[self.label[slots]] = True
        for g in self.groups:
            reasons = [self.fixed_reason[int(c)] for c in g.classes
                       if int(c) in self.fixed_reason]
            g.blocked = reasons[0] if reasons else None
            g.residual = bool(((n_src[g.classes] > 1) & ~heads[g.classes]).any())
        self.head_class = heads
        # Channels a class holds in the weights that read or write it (a head: Dh in
        # q, k, v and the output projection): rounding applies to channels, not heads.
        self.class_width = np.full(k, np.iinfo(np.int64).max, np.int64)
        for rec in self.sources + self.consumers:
            cnt = np.bincount(self.label[rec.slots], minlength=k)
            hit = cnt > 0
            self.class_width[hit] = np.minimum(self.class_width[hit], cnt[hit])

        # Subgroups: classes of a group found in exactly the same set of tensors.
        signature: dict[int, list] = {}
        for t_index, info in enumerate(self.info.values()):
            for c in np.unique(self.label[info.slots]):
                if owned[c]:
                    signature.setdefault(int(c), []).append(t_index)
        # Grouped convs must lose as many channels in each group: split subgroups by
        # conv group too, so a uniform ratio treats each group alike.
        for k_index, (slots_in, slots_out) in enumerate(self.grouped):
            for side, slots in enumerate((slots_in, slots_out)):
                for gi, row in enumerate(slots):
                    for c in np.unique(self.label[row]):
                        if owned[c]:
                            signature.setdefault(int(c), []).append((k_index, side, gi))
        for g in self.groups:
            buckets: dict = {}
            for c in g.classes:
                buckets.setdefault(tuple(signature.get(int(c), ())), []).append(int(c))
            g.subgroups = [np.array(v, np.int64) for v in buckets.values()]

    # ---- queries ---------------------------------------------------------------------
    def keep(self, tensor_name: str, removed: np.ndarray) -> np.ndarray | None:
        """Positions kept on the channel axis of a tensor (None if untracked/unchanged)."""
        info = self.info.get(tensor_name)
        if info is None:
            return None
        gone = removed[self.label[info.slots]]
        if not gone.any():
            return None
        return np.flatnonzero(~gone)

    def estimate_macs(self, removed: np.ndarray) -> int:
        """MACs after removing ``removed`` classes (bilinear in kept in/out fractions)."""
        total = 0.0
        for m in self.mac_nodes:
            f = 1.0
            if m.in_slots is not None and len(m.in_slots):
                f *= 1.0 - removed[self.label[m.in_slots]].mean()
            if m.out_slots is not None and len(m.out_slots):
                f *= 1.0 - removed[self.label[m.out_slots]].mean()
            total += m.macs * f
        return int(round(total))

    def param_terms(self) -> list:
        """(size, in_slots, out_slots) per weight tensor the pruner slices: a tensor of
        ``size`` values keeps the kept fraction of its tracked in/out channels. Built
        once; MatMul weights whose tracked axis is a row axis never shrink."""
        if getattr(self, "_param_terms", None) is None:
            terms = []
            for m in self.mac_nodes:
                ins = m.node.inputs
                w = ins[1] if len(ins) > 1 else None
                if not isinstance(w, gs.Constant) or m.node.op in ("LSTM", "GRU", "RNN"):
                    continue
                if m.node.op == "MatMul" and m.out_slots is None:
                    continue                       # rows pass through; weight unchanged
                terms.append((int(w.values.size), m.in_slots, m.out_slots))
                b = ins[2] if len(ins) > 2 else None
                if isinstance(b, gs.Constant):
                    # The bias follows the output channels (depthwise ConvTranspose:
                    # the outputs follow the inputs).
                    along = m.out_slots if m.out_slots is not None else m.in_slots
                    if along is not None and b.values.size == len(along):
                        terms.append((int(b.values.size), None, along))
            for src in self.sources:
                if src.kind != "rnn":
                    continue
                ins = next((c.slots for c in self.consumers if c.node is src.node), None)
                w, r = src.node.inputs[1], src.node.inputs[2]
                terms.append((int(w.values.size), ins, src.slots))     # W: units × in
                terms.append((int(r.values.size), src.slots, src.slots))   # R: units²
                for t in src.node.inputs[3:4] + src.node.inputs[7:8]:    # B, peepholes
                    if isinstance(t, gs.Constant):
                        terms.append((int(t.values.size), None, src.slots))
            for mem in self.members:
                if mem.kind != "bn":
                    continue
                for t in mem.node.inputs[1:5]:
                    if isinstance(t, gs.Constant) and t.values.size == len(mem.slots):
                        terms.append((int(t.values.size), None, mem.slots))
            self._param_terms = terms
        return self._param_terms

    def params_removed(self, removed: np.ndarray) -> int:
        """Parameters the rewrite removes for ``removed`` (weights, biases, BN vectors;
        small broadcast constants sliced by elementwise rules are not counted)."""
        total = 0.0
        for size, ins, outs in self.param_terms():
            f = 1.0
            if ins is not None and len(ins):
                f *= 1.0 - removed[self.label[ins]].mean()
            if outs is not None and len(outs):
                f *= 1.0 - removed[self.label[outs]].mean()
            total += size * (1.0 - f)
        return int(round(total))

    def tensors_emptied(self, removed: np.ndarray) -> list:
        """Names of tracked tensors that would lose every channel."""
        return [name for name, info in self.info.items()
                if len(info.slots) and removed[self.label[info.slots]].all()]


def _ort_symbolic_shapes(model):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    out = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if out is None:
        raise ValueError("symbolic shape inference gave up")
    return out


def _feature_axis(node, tensor) -> int:
    """Axis to track on the output of an op without a rule: the features of a
    LayerNormalization or an embedding lookup (so the residual stream of a transformer
    is reported as such), else axis 1."""
    r = len(tensor.shape) if tensor.shape is not None else 0
    if r >= 2 and node.op in ("LayerNormalization", "SimplifiedLayerNormalization",
                              "SkipLayerNormalization", "RMSNormalization"):
        return int(node.attrs.get("axis", -1)) % r
    if r >= 2 and node.op == "Gather" and isinstance(node.inputs[0], gs.Constant):
        return r - 1
    return 1


class Rewriter:
    """Hands each rule the kept positions of its inputs/outputs."""

    def __init__(self, graph, dg: DependencyGraph, removed: np.ndarray):
        self.graph, self.dg, self.removed = graph, dg, removed

    def keep_in(self, node, i: int):
        t = node.inputs[i]
        return None if isinstance(t, gs.Constant) else self.dg.keep(t.name, self.removed)

    def keep_out(self, node, i: int):
        return self.dg.keep(node.outputs[i].name, self.removed)


def rewrite(graph, dg: DependencyGraph, removed: np.ndarray) -> None:
    """Remove the ``removed`` classes from every layer that holds them (in place)."""
    rw = Rewriter(graph, dg, removed)
    for node in list(graph.gs.nodes):
        rule = dg.rules.get(id(node))
        if rule is not None:
            rule.apply(rw, node)
