"""The one graph IR: a thin wrapper over ``onnx_graphsurgeon.Graph``.

Passes edit ``graph.gs`` (onnx-graphsurgeon's mutable Node/Variable/Constant
objects) directly and use the helpers here for what every pass needs:
producer/consumer lookup, constant access, shapes and per-node statistics.
After a pass, the pass manager calls :meth:`Graph.refresh`, which cleans up,
topologically sorts and re-runs ONNX shape inference so shapes stay correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Ops whose constant inputs are learned weights rather than shape/index data.
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
              "InstanceNormalization", "LayerNormalization", "Add", "Mul", "Sub",
              "Div", "PRelu", "DequantizeLinear", "QLinearConv", "ConvInteger",
              "MatMulInteger", "QLinearMatMul"}


@dataclass
class NodeStats:
    name: str
    op: str
    input_shape: tuple | None
    output_shape: tuple | None
    params: int
    macs: int


@dataclass
class GraphStats:
    nodes: int
    params: int
    macs: int
    bytes: int            # serialized model size in bytes (what ships)
    weight_bytes: int     # bytes of all constant tensors
    per_node: list[NodeStats] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "params": self.params, "macs": self.macs,
                "bytes": self.bytes, "weight_bytes": self.weight_bytes}


# Sub-byte element types (int8 --int4-weights) are numpy arrays of ml_dtypes int4/uint4
# here, one byte per element; ONNX stores two per byte, which export writes.


def packed_nbytes(values: np.ndarray) -> int:
    """Bytes a constant takes in the serialized model (4-bit types: two per byte)."""
    if values.dtype.kind == "V" and values.dtype.name in ("int4", "uint4"):
        return (values.size + 1) // 2
    return values.nbytes


class _SubbyteAsProto:
    """While exporting: 4-bit numpy constants become packed TensorProtos (graphsurgeon's
    LazyValues, which its exporter writes unchanged), restored afterwards."""

    def __init__(self, gs_graph):
        self.graph = gs_graph
        self.swapped = []

    def __enter__(self):
        from onnx_graphsurgeon.ir.tensor import LazyValues

        for t in self.graph.tensors().values():
            if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues) \
                    and t._values.dtype.name in ("int4", "uint4"):
                self.swapped.append((t, t._values))
                t._values = LazyValues(onnx.numpy_helper.from_array(t._values, t.name))
        return self

    def __exit__(self, *exc):
        for t, values in self.swapped:
            t._values = values
        return False


def _dims(tensor) -> tuple | None:
    """Concrete dims of a tensor; symbolic dims (e.g. batch 'N') count as 1."""
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else 1 for d in shape)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


class Graph:
    """ONNX graph with producer/consumer lookup, constants, shapes and stats."""

    def __init__(self, gs_graph: gs.Graph, model_meta: onnx.ModelProto | None = None):
        self.gs = gs_graph
        # ModelProto fields that graphsurgeon does not carry (ir_version, metadata).
        self._meta = model_meta

    # ---- conversion -----------------------------------------------------------------
    @classmethod
    def from_onnx(cls, model: onnx.ModelProto) -> "Graph":
        meta = onnx.ModelProto()
        meta.CopyFrom(model)
        meta.graph.Clear()
        return cls(gs.import_onnx(model), meta)

    def to_onnx(self, infer_shapes: bool = False) -> onnx.ModelProto:
        with _SubbyteAsProto(self.gs):
            model = gs.export_onnx(self.gs, do_type_check=False)
        if self._meta is not None:
            model.ir_version = max(self._meta.ir_version, model.ir_version) \
                if self._meta.ir_version else model.ir_version
            model.producer_name = "onnxc"
            del model.metadata_props[:]
            model.metadata_props.extend(self._meta.metadata_props)
        if infer_shapes:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        return model

    def copy(self) -> "Graph":
        """Deep copy: constant values too, so in-place edits never leak across copies."""
        dup = self.gs.copy()
        for t in dup.tensors().values():
            if isinstance(t, gs.Constant):
                t.values = np.array(t.values, copy=True)
        return Graph(dup, self._meta)

    def refresh(self) -> "Graph":
        """Restore invariants after edits: drop dead nodes, toposort, re-infer shapes.

        Shape inference runs on a weightless skeleton (large constants become typed
        graph inputs), so a 500 MB model is not serialised just to learn its shapes.
        """
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        outputs = set(id(t) for t in self.gs.outputs)
        inputs = set(id(t) for t in self.gs.inputs)
        variables = {}
        for tensor in self.gs.tensors().values():
            if isinstance(tensor, gs.Variable):
                variables[tensor.name] = tensor
                if id(tensor) not in outputs and id(tensor) not in inputs:
                    tensor.shape = None        # stale after edits: recompute
        inferred = onnx.shape_inference.infer_shapes(self._skeleton(), data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tensor = variables.get(vi.name)
            if tensor is None or not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type and tensor.dtype is None:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if tt.HasField("shape") and (tensor.shape is None or id(tensor) in outputs):
                dims = [d.dim_value if d.HasField("dim_value") else
                        (d.dim_param or None) for d in tt.shape.dim]
                if id(tensor) not in outputs or tensor.shape is None \
                        or len(tensor.shape) != len(dims):
                    tensor.shape = dims
        return self

    def _skeleton(self) -> onnx.ModelProto:
        """The graph with every large constant turned into a typed input (no weights)."""
        skeleton = self.gs.copy()
        stubs = {}
        for node in skeleton.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and t.values.size > 64 \
                        and t.values.dtype.kind != "i":   # int tensors may feed Reshape etc.
                    if t.name not in stubs:
                        stubs[t.name] = gs.Variable(t.name, dtype=t.values.dtype,
                                                    shape=list(t.shape))
                    node.inputs[i] = stubs[t.name]
        skeleton.inputs.extend(stubs.values())
        with _SubbyteAsProto(skeleton):
            model = gs.export_onnx(skeleton, do_type_check=False)
        if self._meta is not None and self._meta.ir_version:
            model.ir_version = max(self._meta.ir_version, model.ir_version)
        return model

    def concrete_shapes(self, dim_of, infer=None, fresh: bool = False) -> dict:
        """{tensor name: concrete shape} from shape inference on the graph with each
        symbolic input dim set to ``dim_of(input name, axis)``; {} where inference fails.

        ``infer`` takes and returns a ModelProto (default: ONNX inference with data
        propagation); ``fresh`` drops the declared value_info and output shapes first, so
        symbolic ones are inferred anew instead of kept."""
        try:
            model = self._skeleton()
            for inp in model.graph.input[:len(self.gs.inputs)]:
                for i, d in enumerate(inp.type.tensor_type.shape.dim):
                    if not d.HasField("dim_value"):
                        d.dim_value = int(dim_of(inp.name, i))
            if fresh:
                del model.graph.value_info[:]
                for out in model.graph.output:
                    out.type.tensor_type.ClearField("shape")
            model = (infer or (lambda m: onnx.shape_inference.infer_shapes(
                m, data_prop=True)))(model)
        except Exception:     # inference fails on some graphs: shapes stay unknown
            return {}
        shapes = {}
        for vi in list(model.graph.value_info) + list(model.graph.output) \
                + list(model.graph.input):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
        return shapes

    # ---- lookup ------------------------------------------------------------------------
    @property
    def nodes(self) -> list[gs.Node]:
        return self.gs.nodes

    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    def tensors(self) -> dict:
        return self.gs.tensors()

    @staticmethod
    def producer(tensor) -> gs.Node | None:
        return tensor.inputs[0] if len(tensor.inputs) else None

    @staticmethod
    def consumers(tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor) -> bool:
        return any(t is tensor for t in self.gs.outputs)

    @staticmethod
    def constant(tensor) -> np.ndarray | None:
        """Value of a constant tensor (initializer or Constant node), else None."""
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        prod = tensor.inputs[0] if len(tensor.inputs) else None
        if prod is not None and prod.op == "Constant" and "value" in prod.attrs:
            val = prod.attrs["value"]
            return np.asarray(val.values if isinstance(val, gs.Constant) else val)
        return None

    def make_constant(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique_name(name), np.ascontiguousarray(values))

    def make_variable(self, name: str, dtype=np.float32, shape=None) -> gs.Variable:
        return gs.Variable(self.unique_name(name), dtype=dtype, shape=shape)

    def unique_name(self, base: str) -> str:
        taken = self._names()
        if base not in taken:
            taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        taken.add(f"{base}_{i}")
        return f"{base}_{i}"

    def name_nodes(self) -> "Graph":
        """Give unnamed nodes stable unique names: plans, skips and reports refer to
        nodes by name."""
        for node in self.gs.nodes:
            if not node.name:
                node.name = self.unique_name(f"{node.op}_{node.outputs[0].name}"
                                             if node.outputs else node.op)
        return self

    def _names(self) -> set:
        # Cached per call site generation; cheap enough to rebuild when invalidated.
        cache = getattr(self, "_name_cache", None)
        if cache is None or cache[0] is not self.gs or cache[1] != len(self.gs.nodes):
            names = set(self.tensors().keys()) | {n.name for n in self.gs.nodes}
            self._name_cache = (self.gs, len(self.gs.nodes), names)
            cache = self._name_cache
        return cache[2]

    def replace_tensor(self, old, new, consumers=None) -> None:
        """Point the consumers of ``old`` (all, or just ``consumers``) and the graph
        outputs at ``new``."""
        for node in list(old.outputs if consumers is None else consumers):
            for i, t in enumerate(node.inputs):
                if t is old:
                    node.inputs[i] = new
        for i, t in enumerate(self.gs.outputs):
            if t is old:
                # Keep the public output name stable for users of the artifact.
                name = old.name
                old.name = self.unique_name(name + "_replaced")
                new.name = name
                if new.dtype is None:
                    new.dtype = old.dtype
                self.gs.outputs[i] = new

    # ---- statistics --------------------------------------------------------------------
    def node_stats(self, node: gs.Node) -> NodeStats:
        params = 0
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.values.dtype.kind in "fiu" \
                    and t.values.dtype not in (np.int64, np.int32):
                params += int(np.prod(t.shape)) if t.shape is not None else 0
        in_shape = _dims(node.inputs[0]) if node.inputs else None
        out_shape = _dims(node.outputs[0]) if node.outputs else None
        return NodeStats(node.name, node.op, in_shape, out_shape,
                         params if node.op in WEIGHT_OPS else 0, node_macs(node))

    def stats(self, with_bytes: bool = True, model_bytes: int | None = None) -> GraphStats:
        """Totals and per-node figures; ``model_bytes`` avoids a second export when the
        caller already serialised the graph."""
        per_node = [self.node_stats(n) for n in self.gs.nodes]
        weight_bytes = 0
        params = 0
        for t in self.tensors().values():
            if isinstance(t, gs.Constant):
                values = t.values
                weight_bytes += packed_nbytes(values)
                if (values.dtype.kind in "fiu" or values.dtype.name in ("int4", "uint4")) \
                        and values.dtype not in (np.int64, np.int32):
                    params += values.size
        if model_bytes is not None:
            size = model_bytes
        else:
            size = self.to_onnx().ByteSize() if with_bytes else 0
        return GraphStats(len(self.gs.nodes), params, sum(s.macs for s in per_node),
                          size, weight_bytes, per_node)


def node_macs(node: gs.Node) -> int:
    """Multiply-accumulates of one node per inference (symbolic batch counted as 1)."""
    op = node.op
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_idx = 3 if op == "QLinearConv" else 1
        if len(node.inputs) <= w_idx or not node.outputs:
            return 0
        w = _dims(node.inputs[w_idx])
        out = _dims(node.outputs[0])
        if w is None or out is None:
            return 0
        # out elements × (Cin/group · kh · kw)
        return _prod(out) * _prod(w[1:])
    if op == "ConvTranspose":
        w = _dims(node.inputs[1])
        x = _dims(node.inputs[0])
        if w is None or x is None:
            return 0
        # every input element scatters into (Cout/group · kh · kw) outputs
        return _prod(x) * _prod(w[1:])
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
        if not node.outputs:
            return 0
        a = _dims(node.inputs[a_idx])
        out = _dims(node.outputs[0])
        if a is None or out is None or len(a) == 0:
            return 0
        k = a[0] if (op == "Gemm" and node.attrs.get("transA", 0)) else a[-1]
        return _prod(out) * int(k)
    if op in _RNN_GATES:
        return sum(rnn_macs(node))
    return 0


_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_macs(node: gs.Node) -> tuple[int, int]:
    """(input, recurrent) multiply-accumulates of an LSTM/GRU/RNN: every step and
    direction multiplies x by W [G·H, in] and h by R [G·H, H]."""
    x = _dims(node.inputs[0]) if node.inputs else None
    w = _dims(node.inputs[1]) if len(node.inputs) > 1 else None
    r = _dims(node.inputs[2]) if len(node.inputs) > 2 else None
    if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
        return 0, 0
    steps_batch = x[0] * x[1]          # T·B (layout 0) or B·T (layout 1)
    return steps_batch * _prod(w), steps_batch * _prod(r)
