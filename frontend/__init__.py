"""Frontend: load, check, fix shapes and canonicalise ONNX models; export from PyTorch.

``load_model`` accepts a path, bytes or a ``ModelProto`` and never modifies its
input. ``canonicalize`` returns the IR graph every pass and backend expects:
static shapes where asked, constants folded (onnxslim), ``Constant`` nodes turned
into initializers, initializers removed from graph inputs (old opset-9 style),
old opsets upgraded, shapes inferred.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxc.errors import ModelError, OnnxcError, UnsupportedError, UsageError, first_line
from onnxc.ir import Graph

# The standard domains; other domains are accepted where ONNX Runtime has a CPU kernel
# for the node (``ort_runnable``), e.g. its contrib ops in com.microsoft.
DEFAULT_DOMAINS = ("", "ai.onnx")
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"}
# QDQ with per-channel axis and the int8 kernels we target need opset 13.
TARGET_OPSET = 13


def load_model(source, load_external_data: bool = True) -> onnx.ModelProto:
    """Read a model from a path, bytes or ModelProto; one-line ModelError on failure."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return _check_nonempty(model, "<ModelProto>")
    if isinstance(source, (bytes, bytearray)):
        return _check_nonempty(_parse(bytes(source), "<bytes>"), "<bytes>")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelError(f"model path is a directory, not an .onnx file: {path}")
    with open(path, "rb") as f:
        data = f.read()
    model = _parse(data, path)
    if load_external_data and _uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(
                model, os.path.dirname(os.path.abspath(path)))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            first = first_line(exc)
            raise ModelError(f"{path}: cannot load external data: {first}") from exc
    return _check_nonempty(model, path)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{where}: file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{where}: not a valid ONNX protobuf ({first_line(exc)})") \
            from exc
    return model


def _check_nonempty(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    # A text file can occasionally parse as a protobuf with unknown fields only.
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise ModelError(f"{where}: not an ONNX model (no graph, nodes or opset)")
    return model


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def ort_kernels() -> set:
    """(domain, op_type) pairs ONNX Runtime's CPU execution provider has a kernel for."""
    global _ORT_KERNELS
    if _ORT_KERNELS is None:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        _ORT_KERNELS = {("" if k.domain == "ai.onnx" else k.domain, k.op_name)
                        for k in ort_c.get_all_opkernel_def()
                        if k.provider == "CPUExecutionProvider"}
    return _ORT_KERNELS


_ORT_KERNELS = None
_ORT_SCHEMAS = None


def ort_schemas() -> dict:
    """(domain, op_type) -> ONNX Runtime's schema, for ops beyond the standard domains."""
    global _ORT_SCHEMAS
    if _ORT_SCHEMAS is None:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        _ORT_SCHEMAS = {(s.domain, s.name): s for s in ort_c.get_all_operator_schema()
                        if s.domain not in STANDARD_DOMAINS}
    return _ORT_SCHEMAS


def _type_vendor_outputs(graph: Graph) -> int:
    """Give outputs of vendor ops (ONNX shape inference does not know them) the element
    type their ONNX Runtime schema implies: the type bound to the same type variable on
    an input (FusedConv, Gelu: T -> T), or a fixed one. Without a type, every tensor
    downstream stays untyped and passes cannot tell float activations. Returns how many
    tensors got a type."""
    typed = 0
    for node in graph.nodes:
        if node.domain in (None, "", "ai.onnx"):
            continue
        schema = ort_schemas().get((node.domain, node.op))
        if schema is None or not schema.outputs:
            continue
        bound = {}
        for k, tensor in enumerate(node.inputs):
            formal = schema.inputs[min(k, len(schema.inputs) - 1)] if schema.inputs else None
            if formal is not None and tensor is not None and tensor.dtype is not None:
                bound.setdefault(formal.typeStr, tensor.dtype)
        for k, tensor in enumerate(node.outputs):
            formal = schema.outputs[min(k, len(schema.outputs) - 1)]
            if tensor.dtype is None:
                dtype = bound.get(formal.typeStr) or _fixed_dtype(formal.typeStr)
                if dtype is not None:
                    tensor.dtype = dtype
                    typed += 1
    return typed


def _fixed_dtype(type_str: str):
    """'tensor(float)' -> np.float32; a type variable ('T') -> None."""
    if not (type_str.startswith("tensor(") and type_str.endswith(")")):
        return None
    enum = getattr(onnx.TensorProto, type_str[7:-1].upper(), None)
    return onnx.helper.tensor_dtype_to_np_dtype(enum) if enum else None


def ort_runnable(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """True if ONNX Runtime can execute ``node``: a standard op, a CPU kernel of another
    domain (contrib ops), or a function the model itself defines."""
    if node.domain in STANDARD_DOMAINS:
        return True
    if any(f.domain == node.domain and f.name == node.op_type for f in model.functions):
        return True
    return (node.domain, node.op_type) in ort_kernels()


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """onnx.checker plus a runnability check, each failure as one clear line.

    A model is accepted when ONNX Runtime can run every node: declaring a domain no node
    uses costs nothing, and vendor ops ONNX Runtime implements (com.microsoft Gelu,
    FusedConv, ...) run; passes leave nodes they do not understand alone and report them.
    """
    for node in model.graph.node:
        if not ort_runnable(model, node):
            raise UnsupportedError(f"{where}: node '{node.name}' uses op '{node.op_type}' "
                                   f"from domain '{node.domain}', which ONNX Runtime "
                                   f"cannot run")
    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = first_line(exc)
        raise ModelError(f"{where}: fails the ONNX checker: {first}") from exc


def _check_input_shapes_declared(model: onnx.ModelProto) -> None:
    """A graph input without a shape (ONNX Runtime runs it; the checker does not) needs
    its dims from the user: say so instead of the checker's generic message."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits and vi.type.HasField("tensor_type") \
                and not vi.type.tensor_type.HasField("shape"):
            raise UsageError(f"input '{vi.name}' declares no shape; give it with "
                             f"--input-shape {vi.name}:D1,D2,...")


def parse_input_shapes(specs) -> dict:
    """``['x:1,3,224,224', 'y:1,10']`` -> {'x': [1,3,224,224], 'y': [1,10]}."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UsageError(f"--input-shape '{spec}' must look like NAME:D1,D2,...")
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape '{spec}': dims must be integers") from None
        if any(v <= 0 for v in values):
            raise UsageError(f"--input-shape '{spec}': dims must be positive")
        shapes[name] = values
    return shapes


def fix_input_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """Set the given graph inputs to static shapes (in place on a copy owned by caller)."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UsageError(f"--input-shape names '{name}', which is not a graph input "
                             f"(inputs: {', '.join(inputs)})")
        tshape = inputs[name].type.tensor_type.shape
        if len(tshape.dim) and len(tshape.dim) != len(dims):
            raise UsageError(f"--input-shape {name}: rank {len(dims)} does not match the "
                             f"model's rank {len(tshape.dim)}")
        del tshape.dim[:]
        for d in dims:
            tshape.dim.add().dim_value = d
    if shapes:
        # Intermediate shapes may have been computed for the old dims. Outputs keep their
        # rank (the checker wants a shape on every graph output) with symbolic dims made
        # unknown, for shape inference to fill in.
        del model.graph.value_info[:]
        for out in model.graph.output:
            for d in out.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
    return model


def _strip_initializer_inputs(model: onnx.ModelProto) -> None:
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4


def _upgrade_opset(model: onnx.ModelProto, notes: list) -> onnx.ModelProto:
    """Upgrade the default domain to TARGET_OPSET. When the version converter (or the
    checker on its result) fails, repair what commonly blocks it — value_info entries
    without a type or shape, graph outputs declared without a shape — and try again; a
    model that still cannot be upgraded keeps its opset (passes then use only what that
    opset allows, e.g. int8 falls back to per-tensor weight scales below opset 13)."""
    opset = default_opset(model)
    if opset is None or opset >= TARGET_OPSET:
        return model
    try:
        return _convert(model, opset, notes)
    except Exception as exc:  # noqa: BLE001  (converter and checker raise many types)
        first = first_line(exc, 120)
    repaired = onnx.ModelProto()
    repaired.CopyFrom(model)
    fixes = repair_value_info(repaired, drop_all=True)
    try:
        upgraded = _convert(repaired, opset, notes)
        notes.append(f"the first upgrade attempt failed ({first}); after repairing "
                     f"{', '.join(fixes) or 'value_info'} it succeeded")
        return upgraded
    except Exception as exc:  # noqa: BLE001  the converter lacks adapters for some old ops
        notes.append(f"opset {opset} kept: upgrade to {TARGET_OPSET} failed "
                     f"({first_line(exc, 120)})")
        return model


def _convert(model: onnx.ModelProto, opset: int, notes: list) -> onnx.ModelProto:
    from onnx import version_converter

    upgraded = version_converter.convert_version(model, TARGET_OPSET)
    onnx.checker.check_model(upgraded)
    notes.append(f"opset upgraded {opset} -> {TARGET_OPSET}")
    return upgraded


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)


def repair_value_info(model: onnx.ModelProto, drop_all: bool = False) -> list:
    """Repair, in place, the type annotations that make the checker or the version
    converter fail although ONNX Runtime runs the model: intermediate value_info
    without a tensor type or shape (all of them with ``drop_all``: they are re-inferred
    anyway) and graph outputs declared without a shape (given the shape ONNX shape
    inference, or else ONNX Runtime, finds). Returns what was repaired, for notes."""
    fixes = []
    keep = [] if drop_all else [vi for vi in model.graph.value_info if _typed_with_shape(vi)]
    dropped = len(model.graph.value_info) - len(keep)
    if dropped:
        keep = [onnx.ValueInfoProto.FromString(vi.SerializeToString()) for vi in keep]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        fixes.append(f"dropped {dropped} value_info entr{'y' if dropped == 1 else 'ies'}")
    shapeless = [o for o in model.graph.output
                 if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if shapeless:
        found = _output_shapes(model)
        for out in shapeless:
            if out.name in found:
                out.type.tensor_type.shape.CopyFrom(found[out.name])
        named = [o.name for o in shapeless if o.name in found]
        if named:
            fixes.append(f"shape of output(s) {', '.join(named)} re-inferred")
    return fixes


def _typed_with_shape(vi: onnx.ValueInfoProto) -> bool:
    if vi.type.HasField("tensor_type"):
        return bool(vi.type.tensor_type.elem_type) and vi.type.tensor_type.HasField("shape")
    return vi.type.WhichOneof("value") is not None


def _output_shapes(model: onnx.ModelProto) -> dict:
    """Graph output name -> TensorShapeProto, from ONNX shape inference, else from an
    ONNX Runtime session (whose own inference knows its contrib ops)."""
    found = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
            if vi.type.tensor_type.HasField("shape") and vi.name not in found:
                found[vi.name] = vi.type.tensor_type.shape
    except Exception:  # noqa: BLE001  inference is best effort here; ORT is the fallback
        pass
    names = {o.name for o in model.graph.output}
    if names <= set(found):
        return found
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        for out in session.get_outputs():
            if out.name in found or out.shape is None:
                continue
            shape = onnx.TensorShapeProto()
            for d in out.shape:
                dim = shape.dim.add()
                if isinstance(d, int) and d >= 0:
                    dim.dim_value = d
                elif isinstance(d, str) and d:
                    dim.dim_param = d
            found[out.name] = shape
    except Exception:  # noqa: BLE001  ORT refusing the model is reported by the verifier
        pass
    return found


def _materialize_constant_of_shape(model: onnx.ModelProto) -> int:
    """ConstantOfShape(constant shape) -> initializer: cheap, and old zoo graphs store
    every weight this way, which would otherwise send a 500 MB model through onnxslim."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    keep, made = [], 0
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            fill = (numpy_helper.to_array(node.attribute[0].t) if node.attribute
                    else np.zeros(1, np.float32))
            value = np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            made += 1
        else:
            keep.append(node)
    if made:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return made


def _needs_folding(model: onnx.ModelProto) -> bool:
    """True if some node computes from constants only, or reads a shape."""
    constant = {t.name for t in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            return True
        if node.op_type != "Constant" and node.input \
                and all(i in constant or i == "" for i in node.input):
            return True
    return False


def _fold_constants(model: onnx.ModelProto, notes: list) -> onnx.ModelProto:
    """Constant folding + shape inference with onnxslim, fusions off (passes do those)."""
    made = _materialize_constant_of_shape(model)
    if made:
        notes.append(f"{made} ConstantOfShape weight(s) turned into initializers")
    if not _needs_folding(model):
        return model
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    # A declared graph-output shape is a claim ONNX Runtime never checks, but onnxslim
    # trusts it (e.g. rewrites the last Reshape's target to it): ddddocr declares [1, seqlen]
    # for a [seq, 1, classes] output. Fold without the claims; the outputs' shapes are
    # re-inferred from the graph afterwards.
    declared = {o.name: onnx.TensorShapeProto.FromString(o.type.tensor_type.shape
                                                         .SerializeToString())
                for o in model.graph.output if o.type.tensor_type.HasField("shape")}
    model = _without_output_shapes(model)
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model, skip_fusion_patterns=list(DEFAULT_FUSION_PATTERNS),
                                 skip_optimizations=["weight_tying"], model_check=False)
        if slim is not None and len(slim.graph.node):
            return _reshape_outputs(slim, declared, notes)
        notes.append("constant folding produced nothing; kept the model as loaded")
    except Exception as exc:  # onnxslim gives up on some graphs: keep going unfolded
        notes.append(f"constant folding skipped: {first_line(exc, 120)}")
    return _reshape_outputs(model, declared, notes)


def _without_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose graph outputs keep their element type, not their shape."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for out in bare.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return bare


def _reshape_outputs(model: onnx.ModelProto, declared: dict, notes: list) -> onnx.ModelProto:
    """Give the graph outputs the shapes inference finds; where it finds none, the
    declared one back. Notes the outputs whose declared shape was wrong."""
    repair_value_info(model)
    wrong = []
    for out in model.graph.output:
        want = declared.get(out.name)
        if want is None:
            continue
        tensor_type = out.type.tensor_type
        if not tensor_type.HasField("shape"):
            tensor_type.shape.CopyFrom(want)
        elif _conflicts(tensor_type.shape, want):
            wrong.append(out.name)
    if wrong:
        notes.append(f"declared shape of output(s) {', '.join(wrong)} does not match the "
                     f"graph; re-inferred")
    return model


def _conflicts(found: onnx.TensorShapeProto, declared: onnx.TensorShapeProto) -> bool:
    """Rank differs or a fixed dim differs."""
    if len(found.dim) != len(declared.dim):
        return True
    return any(a.HasField("dim_value") and b.HasField("dim_value")
               and a.dim_value != b.dim_value for a, b in zip(found.dim, declared.dim))


class _quiet:
    """Silence onnxslim's stdout chatter (it prints tables)."""

    def __enter__(self):
        import contextlib

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _constants_to_initializers(graph: Graph) -> int:
    import onnx_graphsurgeon as gs

    moved = 0
    for node in list(graph.gs.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        value = None
        if "value" in node.attrs:
            v = node.attrs["value"]
            value = np.asarray(v.values if isinstance(v, gs.Constant) else v)
        elif "value_float" in node.attrs:
            value = np.array(node.attrs["value_float"], dtype=np.float32)
        elif "value_floats" in node.attrs:
            value = np.array(node.attrs["value_floats"], dtype=np.float32)
        elif "value_int" in node.attrs:
            value = np.array(node.attrs["value_int"], dtype=np.int64)
        elif "value_ints" in node.attrs:
            value = np.array(node.attrs["value_ints"], dtype=np.int64)
        if value is None:
            continue
        out = node.outputs[0]
        if graph.is_graph_output(out):
            continue
        const = gs.Constant(out.name + "_init", value)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
        moved += 1
    return moved


def canonicalize(model: onnx.ModelProto, input_shapes: dict | None = None,
                 fold: bool = True, notes: list | None = None,
                 static_shapes: bool = True, declared: tuple | None = None) -> Graph:
    """Model -> canonical IR graph. ``notes`` collects what was changed or skipped.
    ``static_shapes=False`` (a runtime target) keeps symbolic dims beyond the batch.
    ``declared``: the batch axes of the model before its input shapes were fixed
    (:func:`onnxc.execution.declared_layout`; default: ``model``'s own), recorded in the
    graph where ``input_shapes`` fix them away."""
    from onnxc.execution import declared_layout, record_layout

    notes = notes if notes is not None else []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _strip_initializer_inputs(work)
    if input_shapes:
        declared = declared or declared_layout(work)
        fix_input_shapes(work, input_shapes)
    work = _upgrade_opset(work, notes)
    if fold:
        work = _fold_constants(work, notes)
    try:
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:
        notes.append(f"shape inference incomplete: {first_line(exc, 120)}")
    graph = Graph.from_onnx(work)
    if declared is not None:
        record_layout(graph._meta, declared, {t.name: t.shape for t in graph.gs.inputs})
    moved = _constants_to_initializers(graph)
    if moved:
        notes.append(f"{moved} Constant node(s) turned into initializers")
    graph.refresh()
    for _ in range(len(graph.nodes)):        # each round types what the last one unlocked
        if not _type_vendor_outputs(graph):
            break
        graph.refresh()
    if static_shapes:
        _check_symbolic(graph)
    else:
        kept = [f"{t.name}{list(t.shape)}" for t in graph.gs.inputs
                if any(not isinstance(d, (int, np.integer)) for d in (t.shape or [])[1:])]
        if kept:
            notes.append(f"symbolic dims kept (the target runs them): {', '.join(kept)}")
    _check_finite_weights(graph)
    return graph


# Ops whose constant inputs are learned parameters: NaN/Inf there is a broken model
# (every pass that reads weights — SVD, criteria, calibration — would fail on it).
# Other constants may hold ±inf on purpose (masks, Clip bounds) and are left alone.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu")


def _check_finite_weights(graph: Graph) -> None:
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS:
            continue
        for tensor in node.inputs[1:]:
            value = Graph.constant(tensor) if tensor is not None else None
            if value is not None and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ModelError(f"weight '{tensor.name}' of {node.op} '{node.name}' holds "
                                 f"NaN or Inf")


def _check_symbolic(graph: Graph) -> None:
    """Only the leading dim and the batch dim (a symbolic dim inputs share, e.g. N of a
    recurrent state [2, N, H]) may stay symbolic; others need --input-shape."""
    from onnxc.execution import graph_layout

    batch = graph_layout(graph).axes
    for tensor in graph.gs.inputs:
        shape = tensor.shape or []
        for axis, d in enumerate(shape):
            if axis not in (0, batch.get(tensor.name)) \
                    and not isinstance(d, (int, np.integer)):
                raise UsageError(
                    f"input '{tensor.name}' has symbolic dim '{d}' at axis {axis}; "
                    f"fix it with --input-shape {tensor.name}:" +
                    ",".join(str(x) if isinstance(x, (int, np.integer)) else "?"
                             for x in shape))


def load(source, input_shapes: dict | None = None, check: bool = True,
         notes: list | None = None, static_shapes: bool = True) -> Graph:
    """Load, check and canonicalise in one call (what ``onnxc compress`` does).
    ``static_shapes``: the target compiles for fixed shapes, so only the batch dim may
    stay symbolic (else --input-shape is asked for)."""
    model = load_model(source)
    where = source if isinstance(source, (str, os.PathLike)) else "model"
    notes = notes if notes is not None else []
    try:
        fixes = repair_value_info(model)      # load_model's copy: the input is untouched
        if fixes:
            notes.append("type annotations repaired: " + ", ".join(fixes))
        declared = None
        if input_shapes:                      # may give a shapeless input its shape
            from onnxc.execution import declared_layout

            declared = declared_layout(model)
            fix_input_shapes(model, input_shapes)
        _check_input_shapes_declared(model)
        if check:
            check_model(model, str(where))
        return canonicalize(model, input_shapes, notes=notes, static_shapes=static_shapes,
                            declared=declared)
    except OnnxcError:
        raise
    except UnicodeDecodeError as exc:
        # Protobuf parses any bytes into a string field; decoding fails on first access.
        raise ModelError(f"{where}: a name or string field is not valid UTF-8 "
                         f"(corrupted file?)") from exc
    except Exception as exc:  # passed the checker but breaks shape inference / the IR
        msg = first_line(exc, 200) if str(exc).strip() else ""
        raise UnsupportedError(f"{where}: cannot canonicalise the model "
                               f"({type(exc).__name__}: {msg})") from exc


def from_torch(module, example_inputs, input_names=None, output_names=None,
               dynamic_batch: bool = True, opset: int = 17,
               keep_batchnorm: bool = False) -> onnx.ModelProto:
    """Export a PyTorch module to ONNX (TorchScript exporter: no onnxscript needed).

    The exporter folds BatchNormalization into the preceding Conv in eval mode;
    ``keep_batchnorm=True`` keeps it as a node (for onnxc's own ``fold_bn``).
    """
    import tempfile

    import torch

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    input_names = input_names or [f"input{i}" if i else "input"
                                  for i in range(len(example_inputs))]
    output_names = output_names or ["output"]
    dynamic_axes = ({n: {0: "N"} for n in list(input_names) + list(output_names)}
                    if dynamic_batch else None)
    module = module.eval()
    # nn.TransformerEncoder(Layer) in eval mode takes a fused "fast path"
    # (aten::_transformer_encoder_layer_fwd) that has no ONNX export; the regular path
    # computes the same thing from exportable ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                training = (torch.onnx.TrainingMode.PRESERVE if keep_batchnorm
                            else torch.onnx.TrainingMode.EVAL)
                torch.onnx.export(module, tuple(example_inputs), path, dynamo=False,
                                  input_names=list(input_names),
                                  output_names=list(output_names),
                                  dynamic_axes=dynamic_axes, opset_version=opset,
                                  training=training)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return onnx.load(path)
