"""Recurrent ops (LSTM, GRU, RNN) unrolled over their time steps, for TVM's importer.

TVM 0.27's Relax ONNX frontend has no converter for LSTM, GRU or RNN. Where the
sequence length is static (TVM builds static shapes anyway), each such node is replaced
by what the ONNX operator specification defines it to be: the input projection of all
steps at once (``X · Wᵀ + Wb + Rb``, one MatMul), then per time step a MatMul with the
recurrence weights, the gate activations and the state update (Mul/Add), for the
forward, reverse or both directions, from the initial states or zeros. ``Y``, ``Y_h``
and ``Y_c`` keep their names, so the rest of the graph is untouched.

Covered: both layouts, initial_h / initial_c, LSTM peepholes and ``input_forget``,
``clip``, GRU ``linear_before_reset``, the activations that are ONNX ops with their
default parameters (Sigmoid, Tanh, Relu, HardSigmoid, LeakyRelu, Elu, ThresholdedRelu,
Softsign, Softplus), ``sequence_lens`` absent or constant and equal to the sequence
length. A node outside that (a varying ``sequence_lens``, non-constant weights, explicit
activation alpha/beta, more than MAX_UNROLLED_STEPS steps) raises one line naming the
node and the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxc.errors import UnsupportedError

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"],
                       "RNN": ["Tanh"]}
# Time steps x directions one node may unroll to: each step is ~10 Relax ops that TVM
# compiles one by one (the corpus's 2-layer LSTM, 100 steps, builds in ~30 s); a long
# sequence would make a graph TVM takes far too long to build.
MAX_UNROLLED_STEPS = 1024
# The activations the spec lists that are ONNX ops of the same name (lower-cased key).
ACTIVATION_OPS = {n.lower(): n for n in ("Sigmoid", "Tanh", "Relu", "HardSigmoid",
                                          "LeakyRelu", "Elu", "ThresholdedRelu",
                                          "Softsign", "Softplus")}


def has_recurrent(model: onnx.ModelProto) -> bool:
    return any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")
               for n in model.graph.node)


def unroll_recurrent(model: onnx.ModelProto, notes: list | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with every top-level LSTM/GRU/RNN unrolled (``model`` itself
    when it has none). UnsupportedError naming the node when one cannot be."""
    if not has_recurrent(model):
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = _static_shapes(work)
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, counts = [], {}
    for index, node in enumerate(graph.node):
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        name = node.name or f"{node.op_type}_{index}"
        unroller = _Unroller(node, name, consts, shapes, opset)
        nodes += unroller.build()
        graph.initializer.extend(unroller.initializers)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del graph.node[:]
    graph.node.extend(nodes)
    if notes is not None:
        notes.append("recurrent ops unrolled over their time steps for TVM (no importer "
                     "for them): " + ", ".join(f"{n} {op}" for op, n in counts.items()))
    return work


def _static_shapes(model: onnx.ModelProto) -> dict:
    """name -> dims (ints, None where unknown) of every tensor shape inference knows."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - fall back to what the model declares
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                            for d in vi.type.tensor_type.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


class _Unroller:
    def __init__(self, node, name, consts, shapes, opset):
        self.node, self.name, self.consts, self.shapes, self.opset = \
            node, name, consts, shapes, opset
        self.op = node.op_type
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.nodes: list = []
        self.initializers: list = []
        self._serial = 0
        self._cached: dict = {}

    # ---- small graph-building helpers ---------------------------------------------------
    def fail(self, reason: str):
        raise UnsupportedError(f"{self.op} '{self.name}': cannot unroll it for TVM "
                               f"(TVM has no {self.op} importer): {reason}")

    def fresh(self, what: str) -> str:
        self._serial += 1
        return f"{self.name}/unroll/{what}_{self._serial}"

    def const(self, value: np.ndarray, what: str, key=None) -> str:
        """An initializer; one per ``key`` (weights reused by every time step)."""
        if key is not None and (what, key) in self._cached:
            return self._cached[(what, key)]
        name = self.fresh(what)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        if key is not None:
            self._cached[(what, key)] = name
        return name

    def ints(self, values, what: str) -> str:
        arr = np.array(values, np.int64)
        return self.const(arr, what, key=(arr.shape, tuple(arr.ravel().tolist())))

    def add(self, op: str, inputs: list, output: str | None = None, n_out: int = 1,
            **attrs):
        outs = [output] if output else [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def unsqueeze(self, x: str, axes: list, output: str | None = None) -> str:
        if self.opset >= 13:
            return self.add("Unsqueeze", [x, self.ints(axes, "axes")], output)
        return self.add("Unsqueeze", [x], output, axes=axes)

    def split(self, x: str, sizes: list, axis: int) -> list:
        if self.opset >= 13:
            return self.add("Split", [x, self.ints(sizes, "split")], n_out=len(sizes),
                            axis=axis)
        return self.add("Split", [x], n_out=len(sizes), axis=axis, split=sizes)

    def gather(self, x: str, index: int) -> str:
        """x[index] along axis 0 (the axis removed)."""
        return self.add("Gather", [x, self.ints(index, "t")], axis=0)

    def activation(self, which: int, x: str, direction: int) -> str:
        op = self.activations[direction * len(DEFAULT_ACTIVATIONS[self.op]) + which]
        return self.add(op, [x])

    def clipped(self, x: str) -> str:
        if self.clip is None:
            return x
        if self.opset >= 11:
            lo = self.const(np.array(-self.clip, self.dtype), "clip_min", key=0)
            hi = self.const(np.array(self.clip, self.dtype), "clip_max", key=0)
            return self.add("Clip", [x, lo, hi])
        return self.add("Clip", [x], min=-self.clip, max=self.clip)

    # ---- checks --------------------------------------------------------------------------
    def _input(self, i: int) -> str:
        return self.node.input[i] if len(self.node.input) > i else ""

    def _weight(self, i: int, what: str) -> np.ndarray | None:
        name = self._input(i)
        if not name:
            return None
        if name not in self.consts:
            self.fail(f"its {what} '{name}' is not a constant")
        return self.consts[name]

    def _check(self):
        a = self.attrs
        self.hidden = int(a.get("hidden_size") or 0)
        self.direction = a.get("direction", b"forward")
        self.direction = self.direction.decode() if isinstance(self.direction, bytes) \
            else str(self.direction)
        if self.direction not in ("forward", "reverse", "bidirectional"):
            self.fail(f"direction '{self.direction}'")
        self.num_dir = 2 if self.direction == "bidirectional" else 1
        self.layout = int(a.get("layout", 0))
        self.clip = float(a["clip"]) if "clip" in a else None
        if a.get("activation_alpha") or a.get("activation_beta"):
            self.fail("explicit activation_alpha/activation_beta")
        names = [s.decode() if isinstance(s, bytes) else str(s)
                 for s in a.get("activations") or []]
        per_dir = len(DEFAULT_ACTIVATIONS[self.op])
        if not names:
            names = DEFAULT_ACTIVATIONS[self.op] * self.num_dir
        elif len(names) == per_dir and self.num_dir == 2:
            names = names * 2
        if len(names) != per_dir * self.num_dir:
            self.fail(f"{len(names)} activations for {self.num_dir} direction(s)")
        unknown = [n for n in names if n.lower() not in ACTIVATION_OPS]
        if unknown:
            self.fail(f"activation {unknown[0]}")
        self.activations = [ACTIVATION_OPS[n.lower()] for n in names]
        if self.op == "LSTM" and int(a.get("input_forget", 0)) not in (0, 1):
            self.fail("input_forget")
        self.W = self._weight(1, "W")
        self.R = self._weight(2, "R")
        self.B = self._weight(3, "B")
        self.P = self._weight(7, "P") if self.op == "LSTM" else None
        if self.W is None or self.R is None:
            self.fail("W or R missing")
        self.dtype = self.W.dtype
        if not self.hidden:
            self.hidden = self.R.shape[-1]
        x = self.shapes.get(self._input(0))
        if not x or len(x) != 3 or any(d is None for d in x):
            self.fail(f"the shape of its input '{self._input(0)}' is not static "
                      f"({x}); give it with --input-shape")
        self.steps, self.batch = (x[1], x[0]) if self.layout else (x[0], x[1])
        if self.steps * self.num_dir > MAX_UNROLLED_STEPS:
            self.fail(f"{self.steps} time steps x {self.num_dir} direction(s) is more than "
                      f"the {MAX_UNROLLED_STEPS} steps unrolled for TVM; give a shorter "
                      f"sequence with --input-shape")
        lens = self._input(4)
        if lens:
            if lens not in self.consts:
                self.fail(f"sequence_lens '{lens}' is not a constant")
            if np.any(self.consts[lens] != self.steps):
                self.fail(f"sequence_lens {self.consts[lens].tolist()} differ from the "
                          f"sequence length {self.steps}")

    # ---- the unrolled computation ----------------------------------------------------------
    def build(self) -> list:
        self._check()
        g, h = GATES[self.op], self.hidden
        outputs = list(self.node.output) + [""] * (3 - len(self.node.output))
        x = self._input(0)
        if self.layout:
            x = self.add("Transpose", [x], perm=[1, 0, 2])
        initial = []
        for i in ((5, 6) if self.op == "LSTM" else (5,)):
            state = self._input(i)
            if state and self.layout:
                state = self.add("Transpose", [state], perm=[1, 0, 2])
            initial.append(state)
        bias = self.B if self.B is not None else np.zeros((self.num_dir, 2 * g * h), self.dtype)
        per_dir_y, last_h, last_c = [], [], []
        for d in range(self.num_dir):
            wb, rb = bias[d, :g * h], bias[d, g * h:]
            in_bias = wb + rb
            if self.op == "GRU" and self.attrs.get("linear_before_reset", 0):
                in_bias = wb + np.concatenate([rb[:2 * h], np.zeros(h, self.dtype)])
            proj = self.add("MatMul", [x, self.const(self.W[d].T.copy(), "WT")])
            proj = self.add("Add", [proj, self.const(in_bias.astype(self.dtype), "bias")])
            states = [self.gather(s, d) if s else
                      self.const(np.zeros((self.batch, h), self.dtype), "zeros", key=0)
                      for s in initial]
            reverse = self.direction == "reverse" or d == 1
            order = range(self.steps - 1, -1, -1) if reverse else range(self.steps)
            ys = {}
            for t in order:
                xt = self.gather(proj, t)
                states = getattr(self, f"_{self.op.lower()}_step")(xt, states, d, rb)
                ys[t] = states[0]
            last_h.append(states[0])
            if self.op == "LSTM":
                last_c.append(states[1])
            if outputs[0]:
                steps = [self.unsqueeze(ys[t], [0, 1]) for t in range(self.steps)]
                per_dir_y.append(self.add("Concat", steps, axis=0))
        if outputs[0]:
            y = per_dir_y[0] if self.num_dir == 1 else self.add("Concat", per_dir_y, axis=1)
            if self.layout:                   # [T, D, N, H] -> [N, T, D, H]
                self.add("Transpose", [y], outputs[0], perm=[2, 0, 1, 3])
            else:
                self.add("Identity", [y], outputs[0])
        for out, finals in ((outputs[1], last_h), (outputs[2], last_c)):
            if not out or not finals:
                continue
            stacked = [self.unsqueeze(s, [0]) for s in finals]
            y = stacked[0] if len(stacked) == 1 else self.add("Concat", stacked, axis=0)
            if self.layout:                   # [D, N, H] -> [N, D, H]
                self.add("Transpose", [y], out, perm=[1, 0, 2])
            else:
                self.add("Identity", [y], out)
        return self.nodes

    def _recur(self, h_prev: str, d: int, rows: slice) -> str:
        """h_prev · R[d][rows]ᵀ."""
        return self.add("MatMul", [h_prev, self.const(self.R[d][rows].T.copy(), "RT",
                                                      key=(d, rows.start, rows.stop))])

    def _rnn_step(self, xt, states, d, rb):
        pre = self.clipped(self.add("Add", [xt, self._recur(states[0], d, slice(None))]))
        return [self.activation(0, pre, d)]

    def _lstm_step(self, xt, states, d, rb):
        h = self.hidden
        h_prev, c_prev = states
        pre = self.add("Add", [xt, self._recur(h_prev, d, slice(None))])
        i, o, f, c = self.split(pre, [h] * 4, axis=1)          # gate order i, o, f, c
        p = self.P[d] if self.P is not None else None
        if p is not None:
            i = self.add("Add", [i, self.add("Mul", [c_prev, self.const(p[:h], "Pi", d)])])
            f = self.add("Add", [f, self.add("Mul", [c_prev,
                                                     self.const(p[2 * h:], "Pf", d)])])
        it = self.activation(0, self.clipped(i), d)
        if int(self.attrs.get("input_forget", 0)):
            ft = self.add("Sub", [self.const(np.array(1, self.dtype), "one", 0), it])
        else:
            ft = self.activation(0, self.clipped(f), d)
        ct = self.activation(1, self.clipped(c), d)
        c_new = self.add("Add", [self.add("Mul", [ft, c_prev]), self.add("Mul", [it, ct])])
        if p is not None:
            o = self.add("Add", [o, self.add("Mul", [c_new, self.const(p[h:2 * h], "Po", d)])])
        ot = self.activation(0, self.clipped(o), d)
        h_new = self.add("Mul", [ot, self.activation(2, c_new, d)])
        return [h_new, c_new]

    def _gru_step(self, xt, states, d, rb):
        h = self.hidden
        h_prev = states[0]
        xz, xr, xh = self.split(xt, [h] * 3, axis=1)            # gate order z, r, h
        if self.attrs.get("linear_before_reset", 0):
            # Rbh sits inside the reset gate's product; Rbz, Rbr are in the input bias.
            rbh = np.concatenate([np.zeros(2 * h, self.dtype), rb[2 * h:]])
            rec = self.add("Add", [self._recur(h_prev, d, slice(None)),
                                   self.const(rbh.astype(self.dtype), "Rbh", d)])
            hz, hr, hh = self.split(rec, [h] * 3, axis=1)
            zt = self.activation(0, self.clipped(self.add("Add", [xz, hz])), d)
            rt = self.activation(0, self.clipped(self.add("Add", [xr, hr])), d)
            pre_h = self.add("Add", [xh, self.add("Mul", [rt, hh])])
        else:
            hz, hr = self.split(self._recur(h_prev, d, slice(0, 2 * h)), [h, h], axis=1)
            zt = self.activation(0, self.clipped(self.add("Add", [xz, hz])), d)
            rt = self.activation(0, self.clipped(self.add("Add", [xr, hr])), d)
            reset = self.add("Mul", [rt, h_prev])
            pre_h = self.add("Add", [xh, self._recur(reset, d, slice(2 * h, 3 * h))])
        ht = self.activation(1, self.clipped(pre_h), d)
        # H = (1 - z) * h~ + z * H_prev = h~ + z * (H_prev - h~)
        h_new = self.add("Add", [ht, self.add("Mul", [zt, self.add("Sub", [h_prev, ht])])])
        return [h_new]
