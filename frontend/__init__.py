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

# Domains ONNX Runtime can execute; anything else is a custom op we cannot verify.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
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


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """onnx.checker plus a domain check, each failure as one clear line."""
    for opset in model.opset_import:
        if opset.domain not in KNOWN_DOMAINS:
            ops = sorted({n.op_type for n in model.graph.node if n.domain == opset.domain})
            raise UnsupportedError(
                f"{where}: op(s) {', '.join(ops) or '?'} from unknown domain "
                f"'{opset.domain}' cannot be executed or verified")
    for node in model.graph.node:
        if node.domain not in KNOWN_DOMAINS:
            raise UnsupportedError(f"{where}: node '{node.name}' uses op '{node.op_type}' "
                                   f"from unknown domain '{node.domain}'")
    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = first_line(exc)
        raise ModelError(f"{where}: fails the ONNX checker: {first}") from exc


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
        # Intermediate shapes may have been computed for the old dims.
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape") if _has_symbolic(out) else None
    return model


def _has_symbolic(value_info) -> bool:
    return any(not d.HasField("dim_value") for d in value_info.type.tensor_type.shape.dim)


def _strip_initializer_inputs(model: onnx.ModelProto) -> None:
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    if model.ir_version < 4:
        model.ir_version = 4


def _upgrade_opset(model: onnx.ModelProto, notes: list) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= TARGET_OPSET:
        return model
    try:
        from onnx import version_converter

        upgraded = version_converter.convert_version(model, TARGET_OPSET)
        onnx.checker.check_model(upgraded)
        notes.append(f"opset upgraded {opset} -> {TARGET_OPSET}")
        return upgraded
    except Exception as exc:  # the converter lacks adapters for some old ops
        notes.append(f"opset {opset} kept: upgrade to {TARGET_OPSET} failed "
                     f"({first_line(exc, 120)})")
        return model


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

    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model, skip_fusion_patterns=list(DEFAULT_FUSION_PATTERNS),
                                 skip_optimizations=["weight_tying"], model_check=False)
        if slim is not None and len(slim.graph.node):
            return slim
        notes.append("constant folding produced nothing; kept the model as loaded")
    except Exception as exc:  # onnxslim gives up on some graphs: keep going unfolded
        notes.append(f"constant folding skipped: {first_line(exc, 120)}")
    return model


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
                 fold: bool = True, notes: list | None = None) -> Graph:
    """Model -> canonical IR graph. ``notes`` collects what was changed or skipped."""
    notes = notes if notes is not None else []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _strip_initializer_inputs(work)
    if input_shapes:
        fix_input_shapes(work, input_shapes)
    work = _upgrade_opset(work, notes)
    if fold:
        work = _fold_constants(work, notes)
    try:
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:
        notes.append(f"shape inference incomplete: {first_line(exc, 120)}")
    graph = Graph.from_onnx(work)
    moved = _constants_to_initializers(graph)
    if moved:
        notes.append(f"{moved} Constant node(s) turned into initializers")
    graph.refresh()
    _check_symbolic(graph)
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
         notes: list | None = None) -> Graph:
    """Load, check and canonicalise in one call (what ``onnxc compress`` does)."""
    model = load_model(source)
    where = source if isinstance(source, (str, os.PathLike)) else "model"
    try:
        if check:
            check_model(model, str(where))
        return canonicalize(model, input_shapes, notes=notes)
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
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            training = (torch.onnx.TrainingMode.PRESERVE if keep_batchnorm
                        else torch.onnx.TrainingMode.EVAL)
            torch.onnx.export(module, tuple(example_inputs), path, dynamo=False,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, opset_version=opset,
                              training=training)
        return onnx.load(path)
