"""The ONNX Runtime execution layer: every onnxc code path that runs a model on ORT.

- :func:`session` — a quiet CPU ``InferenceSession`` (optimisation level, threads,
  spinning) whose load errors are one line.
- :func:`batch_layout` — which axis of each model input is the batch. Only a symbolic
  dim shared by inputs is a batch (``x[N,T,F]`` and ``state[2,N,H]`` share ``N``); an
  input without it (a PReLU slope, an ``Expand`` shape, ``B`` of ``A[2,3]·B[3,4]``) is
  passed whole to every run. A single input is batched on its only symbolic dim, or has
  a fixed batch of its static first dim.
- :func:`slices` / :func:`in_slices` — cut inputs along their batch axes into runs of a
  fixed size, padding the last one by repeating its final sample (numpy or torch).
- :class:`Runner` — a session over a graph or ModelProto: ``run`` joins the outputs of
  all slices, ``stream`` hands each slice's outputs to a callback.
- :func:`capture_model` — a copy of a model whose outputs are intermediate tensors, to
  read activations (calibration, pruning criteria, data-aware passes).

Rows never mix (BN runs on its running statistics), so slicing and padding change
nothing in the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import BackendError, first_line

# ONNX Runtime graph optimisation levels by the name onnxc code uses.
OPTIMIZATION_LEVELS = ("all", "basic", "none")


def session(model, optimize: bool | str = True, threads: int | None = None,
            spinning: bool = True):
    """CPU ``InferenceSession`` of ``model`` (ModelProto, IR graph or serialized bytes).

    ``optimize``: True / "all" (as deployed), "basic" (constant folding and redundant
    node removal only: QDQ stays as written), False / "none" (op by op as written: ORT's
    own fusions, e.g. Conv+BatchNormalization, cannot hide a wrong rewrite).
    ``spinning=False`` stops idle worker threads from busy-waiting, for sessions timed
    interleaved in one process.
    """
    import onnxruntime as ort

    from .ir import Graph

    level = {True: "all", False: "none"}.get(optimize, optimize)
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimize must be one of {OPTIMIZATION_LEVELS}, got {optimize!r}")
    opts = ort.SessionOptions()
    # Fatal only: ORT would print its own copy of every error we turn into one line.
    opts.log_severity_level = 4
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if isinstance(model, Graph):
        model = model.to_onnx()
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


# ----------------------------------------------------------------------------------------
# Batch layout


def _is_static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d > 0


def _unnamed(d) -> bool:
    """A symbolic dim without a name of its own (None, or one shape inference made up)."""
    return d is None or (isinstance(d, str) and (not d or d.startswith("unk__")))


@dataclass(frozen=True)
class BatchLayout:
    """Batch axis of each input (None: passed whole), the batch dim's symbolic name
    (to find it in outputs) and the static batch size a model requires, if any."""

    axes: dict                  # input name -> axis | None
    dim: str | None = None
    fixed: int | None = None


def batch_layout(inputs) -> BatchLayout:
    """Batch layout of ``inputs``: [(name, shape)] with dims ints, symbolic names (str) or
    None (ORT ``get_inputs()`` and onnx-graphsurgeon use this form).

    1. A symbolic name shared by several inputs is the batch (the one most inputs share;
       on a tie the one nearest the front); each input's first axis with it is its batch
       axis, inputs without it have none.
    2. Else inputs whose first dim is symbolic are batched on axis 0; an input whose
       only symbolic dim is unnamed and stands elsewhere (``state[2, ?, 128]`` beside
       ``x[?, ?]``: a converter dropped the names) is batched there, the others not.
       A single input whose only symbolic dim stands elsewhere (``x[T, N, F]``) is
       batched there.
    3. Else (all static): a single input has a fixed batch of its first dim; several
       inputs have no batch at all (each run gets them whole).
    """
    inputs = [(name, list(shape or [])) for name, shape in inputs]
    where: dict = {}                     # symbolic name -> {input: first axis}
    for name, shape in inputs:
        for axis, d in enumerate(shape):
            if isinstance(d, str) and d:
                where.setdefault(d, {}).setdefault(name, axis)
    shared = [d for d, found in where.items() if len(found) > 1]
    if shared:
        dim = max(shared, key=lambda d: (len(where[d]), -sum(where[d].values())))
        return BatchLayout({name: where[dim].get(name) for name, _ in inputs}, dim)
    leading = {name: 0 for name, shape in inputs if shape and not _is_static(shape[0])}
    if leading:
        for name, shape in inputs:
            symbolic = [axis for axis, d in enumerate(shape) if not _is_static(d)]
            if name not in leading and len(symbolic) == 1 and _unnamed(shape[symbolic[0]]):
                leading[name] = symbolic[0]
        names = {shape[leading[name]] for name, shape in inputs if name in leading}
        dim = names.pop() if len(names) == 1 and isinstance(next(iter(names)), str) else None
        return BatchLayout({name: leading.get(name) for name, _ in inputs}, dim)
    if len(inputs) == 1 and inputs[0][1]:
        (name, shape), = inputs
        symbolic = [axis for axis, d in enumerate(shape) if not _is_static(d)]
        if len(symbolic) == 1:
            d = shape[symbolic[0]]
            return BatchLayout({name: symbolic[0]}, d if isinstance(d, str) else None)
        if not symbolic:
            return BatchLayout({name: 0}, None, int(shape[0]))
    return BatchLayout({name: None for name, _ in inputs})


def graph_layout(graph) -> BatchLayout:
    """Batch layout of an IR graph's inputs (the recorded one, see :func:`record_layout`,
    when --input-shape fixed the batch away)."""
    shapes = [(t.name, t.shape) for t in graph.gs.inputs]
    recorded = recorded_layout(graph._meta, dict(shapes)) if graph._meta is not None else None
    return recorded or batch_layout(shapes)


# Metadata key of a model whose input shapes onnxc fixed: the batch axes of its inputs and
# outputs as the model declared them before (JSON {"inputs": {name: axis|null},
# "outputs": {name: axis}}). Once ``state[1, N, 64]`` is ``[1, 1, 64]`` beside
# ``x[1, 20, 40]``, the shapes alone no longer say that the batch is axis 1 of one and
# axis 0 of the other; with this, data of many samples still runs in slices of the fixed
# batch (ONNX Runtime ignores metadata).
BATCH_AXES_KEY = "onnxc.batch_axes"


def proto_shapes(values) -> list:
    """[(name, dims)] of ValueInfoProtos, dims as ints, symbolic names or None."""
    return [(v.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in v.type.tensor_type.shape.dim]) for v in values]


def declared_layout(model: onnx.ModelProto) -> tuple:
    """(input axes, output axes) of a ModelProto's batch as declared (a layout it records
    wins: the model was fixed by onnxc before)."""
    import json

    for prop in model.metadata_props:
        if prop.key == BATCH_AXES_KEY:
            try:
                record = json.loads(prop.value)
                return dict(record["inputs"]), dict(record.get("outputs") or {})
            except (ValueError, KeyError, TypeError):
                break
    inits = {t.name for t in model.graph.initializer}
    layout = batch_layout([(n, d) for n, d in proto_shapes(model.graph.input)
                           if n not in inits])
    outputs = {}
    if layout.dim:
        outputs = {n: d.index(layout.dim) for n, d in proto_shapes(model.graph.output)
                   if layout.dim in d}
    return layout.axes, outputs


def record_layout(meta: onnx.ModelProto, before: tuple, shapes: dict) -> None:
    """Record in ``meta`` the batch axes ``before`` (see :func:`declared_layout`) that a
    model had before its input shapes were fixed to ``shapes``, when those no longer
    give the same axes."""
    import json

    axes = {n: a for n, a in before[0].items() if n in shapes}
    if batch_layout(list(shapes.items())).axes == {n: axes.get(n) for n in shapes}:
        return
    keep = [p for p in meta.metadata_props if p.key != BATCH_AXES_KEY]
    del meta.metadata_props[:]
    meta.metadata_props.extend(keep)
    meta.metadata_props.add(key=BATCH_AXES_KEY,
                            value=json.dumps({"inputs": axes, "outputs": before[1]}))


def recorded_layout(model: onnx.ModelProto, shapes: dict) -> BatchLayout | None:
    """The layout a model records (:data:`BATCH_AXES_KEY`) for inputs of ``shapes``
    (name -> dims), its fixed batch the inputs' size on those axes; None without one."""
    if not any(p.key == BATCH_AXES_KEY for p in model.metadata_props):
        return None
    axes = declared_layout(model)[0]
    axes = {n: a if a is not None and a < len(shapes[n] or []) else None
            for n, a in ((n, axes.get(n)) for n in shapes)}
    sizes = {shapes[n][a] for n, a in axes.items() if a is not None}
    if not sizes:
        return None
    size = next(iter(sizes))
    return BatchLayout(axes, None, size if len(sizes) == 1 and _is_static(size) else None)


# ----------------------------------------------------------------------------------------
# Slicing


def take(x, axis: int, start: int, stop: int):
    """``x[start:stop]`` along ``axis`` (numpy arrays and torch tensors)."""
    return x[(slice(None),) * axis + (slice(start, stop),)]


def slices(inputs: list, axes: list, size: int, pad: bool = True, concat=np.concatenate):
    """Yield ``(start, count, parts)``: ``inputs`` cut into runs of ``size`` samples along
    their ``axes`` (None: the input goes whole into every run). With ``pad`` the last run
    is filled up to ``size`` by repeating its final sample; ``count`` is the real ones."""
    first = next(i for i, a in enumerate(axes) if a is not None)
    n = inputs[first].shape[axes[first]]
    for start in range(0, n, size):
        count = min(size, n - start)
        parts = []
        for x, axis in zip(inputs, axes):
            if axis is None:
                parts.append(x)
                continue
            part = take(x, axis, start, start + count)
            if pad and count < size:
                part = concat([part] + [take(part, axis, count - 1, count)] * (size - count),
                              axis)
            parts.append(part)
        yield start, count, parts


def in_slices(fn, inputs: list, size: int | None, pad: bool = True,
              concat=np.concatenate, axes: list | None = None,
              out_axes: list | None = None) -> list:
    """``fn(*inputs)`` run on slices of ``size`` samples and joined, for graphs whose
    batch is fixed (``pad``: the last slice is padded and the results trimmed) or too
    large for one run. ``axes``/``out_axes``: batch axis of each input/output (default
    0; None: not batched). ``fn`` returns a list of arrays/tensors; ``concat`` joins them
    (np.concatenate or torch.cat)."""
    axes = [0] * len(inputs) if axes is None else list(axes)
    batched = [i for i, a in enumerate(axes) if a is not None]
    if not batched:
        return fn(*inputs)
    n = inputs[batched[0]].shape[axes[batched[0]]]
    if not size or n in (0, size) or (n < size and not pad):
        return fn(*inputs)
    parts = [fn(*part) for _, _, part in slices(inputs, axes, size, pad, concat)]
    out_axes = [0] * len(parts[0]) if out_axes is None else out_axes
    joined = []
    for i, axis in enumerate(out_axes):
        if axis is None or np.ndim(parts[0][i]) <= axis:     # not batched: same each run
            joined.append(parts[0][i])
        else:
            joined.append(take(concat([p[i] for p in parts], axis), axis, 0, n))
    return joined


# ----------------------------------------------------------------------------------------
# Runner


class Runner:
    """ONNX Runtime session over an IR graph or ModelProto, batching to its inputs."""

    def __init__(self, model, threads: int | None = None, optimize: bool | str = True,
                 spinning: bool = True):
        from .ir import Graph

        self.model = model.to_onnx() if isinstance(model, Graph) else model
        self.session = session(self.model, optimize, threads, spinning)
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        shapes = {i.name: i.shape for i in inputs}
        self.layout = recorded_layout(self.model, shapes) or batch_layout(list(shapes.items()))
        self.fixed_batch = self.layout.fixed
        self._recorded_out_axes = declared_layout(self.model)[1] \
            if self.layout.dim is None else {}

    def output_axes(self, names: list | None = None) -> list:
        """Batch axis of each output: where its declared shape has the batch dim, else 0."""
        shapes = {o.name: o.shape or [] for o in self.session.get_outputs()}
        dim = self.layout.dim
        return [shapes[n].index(dim) if dim and dim in shapes.get(n, [])
                else self._recorded_out_axes.get(n, 0) for n in (names or self.output_names)]

    def _run(self, names, feeds: dict) -> list:
        try:
            return self.session.run(names, feeds)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed to run the model: "
                               f"{first_line(exc)}") from exc

    def _feeds(self, feeds: dict) -> tuple[list, list, list]:
        names = [k for k in feeds if k in self.input_names]
        return names, [feeds[k] for k in names], [self.layout.axes.get(k) for k in names]

    def run(self, feeds: dict, batch_size: int = 64, outputs: list | None = None) -> list:
        """Outputs (all, or ``outputs`` by name) for ``feeds``, run in slices of the
        model's fixed batch (padded) or of ``batch_size``."""
        names, values, axes = self._feeds(feeds)
        return in_slices(lambda *parts: self._run(outputs, dict(zip(names, parts))), values,
                         self.fixed_batch or batch_size, pad=bool(self.fixed_batch),
                         axes=axes, out_axes=self.output_axes(outputs))

    def stream(self, feeds: dict, visit, batch_size: int = 64,
               outputs: list | None = None) -> None:
        """``visit(start, {output name: array})`` for each slice of ``feeds`` in order,
        padding trimmed; large activation sets never sit in memory together."""
        names, values, axes = self._feeds(feeds)
        outputs = outputs or self.output_names
        out_axes = self.output_axes(outputs)
        if all(a is None for a in axes):
            visit(0, dict(zip(outputs, self._run(outputs, feeds))))
            return
        size = self.fixed_batch or batch_size
        for start, count, parts in slices(values, axes, size, pad=bool(self.fixed_batch)):
            got = self._run(outputs, dict(zip(names, parts)))
            visit(start, {n: take(v, a, 0, count) if count < size and np.ndim(v) > a else v
                          for n, v, a in zip(outputs, got, out_axes)})


# ----------------------------------------------------------------------------------------
# Intermediate tensors


def capture_model(model, names: list, keep_outputs: bool = False) -> onnx.ModelProto:
    """ModelProto whose outputs are the tensors ``names`` (plus the model's own outputs
    with ``keep_outputs``), so one run reads intermediate activations.

    From an IR graph, only what the wanted tensors need is kept (ORT then computes just
    that prefix) and a graph mid-edit is sorted; a ModelProto gets the names appended as
    untyped outputs (ORT infers their types)."""
    from .ir import Graph

    names = list(dict.fromkeys(names))              # unique, order kept
    if isinstance(model, Graph):
        probe = model.gs.copy()
        tensors = probe.tensors()
        wanted = {t.name: t for t in probe.outputs} if keep_outputs else {}
        for name in names:
            tensor = wanted.setdefault(name, tensors[name])
            if tensor.dtype is None:
                tensor.dtype = np.float32
        probe.outputs = list(wanted.values())
        probe.cleanup(remove_unused_graph_inputs=False).toposort()
        return Graph(probe, model._meta).to_onnx()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if not keep_outputs:
        del work.graph.output[:]
    present = {o.name for o in work.graph.output}
    for name in names:
        if name not in present:
            work.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return work
