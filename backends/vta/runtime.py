"""Run a VTA artifact: host segments on ONNX Runtime, VTA layers in the simulator.

``vta/host.onnx`` is the model with every accelerated chain replaced by a
``onnxc.vta::VtaLayer`` node. It is cut, in topological order, into maximal host
segments (each becomes a small ONNX model run by ONNX Runtime) and VTA layers (each
runs its stored instruction stream — ``layer_XX.insn.bin``, ``.uop.bin``, ``.wgt.bin``,
``.acc.bin`` — in the simulator, one sample at a time, exactly as compiled).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx

from onnxc.errors import BackendError, DataError, UsageError
from onnxc.execution import in_slices

from . import PROGRAM_FILE, isa
from .config import VtaConfig
from .lower import Program, Tiling
from .partition import DOMAIN, OP
from .qlayer import QLayer


def save_layer(prog: Program, vta_dir: str, idx: int) -> dict:
    """Write one compiled layer; returns its program.json entry."""
    layer, cfg = prog.layer, prog.cfg
    stem = f"layer_{idx:02d}"
    files = {"insn": f"{stem}.insn.bin", "uop": f"{stem}.uop.bin", "wgt": f"{stem}.wgt.bin",
             "acc": f"{stem}.acc.bin", "layer": f"{stem}.npz"}
    with open(os.path.join(vta_dir, files["insn"]), "wb") as f:
        f.write(isa.encode_stream(prog.insns, cfg))
    for key, region in (("uop", "uop"), ("wgt", "weights"), ("acc", "params")):
        off, size = prog.regions[region]
        with open(os.path.join(vta_dir, files[key]), "wb") as f:
            f.write(prog.dram[off:off + size].tobytes())
    np.savez(os.path.join(vta_dir, files["layer"]), weight=layer.weight, bias=layer.bias,
             shift=layer.shift, stages=np.array([s for s, _ in layer.stages], np.int64),
             relus=np.array([r for _, r in layer.stages], bool))
    return {"index": idx, "name": layer.name, "kind": layer.kind, "input": layer.input_name,
            "output": layer.output_name, "in_shape": list(layer.in_shape),
            "out_shape": list(layer.out_shape), "stride": list(layer.stride),
            "pads": list(layer.pads), "regions": {k: list(v) for k, v in prog.regions.items()},
            "dram_bytes": int(len(prog.dram)), "tiling": prog.tiling.as_dict(),
            "files": files, "notes": layer.notes, "info": prog.info,
            "concat_inputs": list(layer.concat_inputs)}


def load_layer(vta_dir: str, entry: dict, cfg: VtaConfig) -> Program:
    """Rebuild a runnable Program from the files of one layer (no re-lowering)."""
    files = entry["files"]
    try:
        data = np.load(os.path.join(vta_dir, files["layer"]))
        stages = [(s, bool(r)) for s, r in zip(data["stages"], data["relus"])]
        layer = QLayer(entry["name"], entry["kind"], tuple(entry["in_shape"]),
                       data["weight"], data["bias"], data["shift"], tuple(entry["stride"]),
                       tuple(entry["pads"]), stages[0][1], entry["input"], entry["output"],
                       list(entry.get("notes", [])), extra_stages=stages[1:],
                       concat_inputs=list(entry.get("concat_inputs", [])))
        with open(os.path.join(vta_dir, files["insn"]), "rb") as f:
            insns = isa.decode_stream(f.read(), cfg)
        dram = np.zeros(entry["dram_bytes"], np.uint8)
        regions = {k: tuple(v) for k, v in entry["regions"].items()}
        for key, region in (("uop", "uop"), ("wgt", "weights"), ("acc", "params")):
            with open(os.path.join(vta_dir, files[key]), "rb") as f:
                blob = np.frombuffer(f.read(), np.uint8)
            off, size = regions[region]
            if blob.size != size:
                raise BackendError(f"{files[key]}: {blob.size} bytes, expected {size}")
            dram[off:off + size] = blob
    except (OSError, KeyError, ValueError) as exc:
        raise BackendError(f"VTA artifact layer {entry.get('index')}: cannot load ({exc})") \
            from None
    return Program(layer, cfg, insns, dram, regions, Tiling(**entry["tiling"]),
                   info=dict(entry.get("info", {})))


class VtaArtifact:
    """A loaded VTA artifact: ``run(feeds) -> [outputs]`` plus per-layer statistics."""

    kind = "vta"

    def __init__(self, path: str):
        self.path = path
        vta_dir = os.path.join(path, "vta")
        prog_file = os.path.join(path, PROGRAM_FILE)
        if not os.path.isfile(prog_file):
            raise UsageError(f"{path} is not a VTA artifact (no {PROGRAM_FILE}; compile with "
                             f"--target vta)")
        try:
            with open(prog_file) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise BackendError(f"{prog_file}: unreadable ({exc})") from None
        self.cfg = VtaConfig.from_dict(self.meta["config"], where=prog_file)
        self.programs = [load_layer(vta_dir, e, self.cfg) for e in self.meta["layers"]]
        host = onnx.load(os.path.join(vta_dir, "host.onnx"))
        plan, self.inputs, self.outputs = host_segments(host)
        self.host_runtime = "onnxruntime"
        self.host_note = None
        self.plan = []
        libs = self.meta.get("host_libraries", {})
        for item in plan:
            if item[0] == "vta":
                self.plan.append(item)
                continue
            _, model, needed, outs = item
            k = str(sum(p[0] == "host" for p in self.plan))
            runner = None
            if k in libs:
                try:
                    runner = _tvm_runner(os.path.join(path, libs[k]))
                    self.host_runtime = f"tvm {self.meta.get('host')}"
                except BackendError as exc:      # e.g. an ARM library on this x86 machine
                    self.host_note = f"host libraries not runnable here ({exc}); " \
                                     f"host part on ONNX Runtime"
            self.plan.append(("host", (runner or _ort_runner(model), needed, outs)))
        self.layer_stats: list = [None] * len(self.programs)

    device = "vta-sim"

    def random_inputs(self, seed: int = 0) -> dict:
        """Seeded inputs of the compiled shape (symbolic batch -> 1), as the TVM
        backend's artifacts offer, so the same runner/bench code can drive both."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"]]
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
        return feeds

    def qdq_model(self) -> onnx.ModelProto:
        """The quantized model the artifact was compiled from (for comparisons)."""
        return onnx.load(os.path.join(self.path, "model.onnx"))

    def run(self, feeds: dict, schedule="load-first") -> list:
        """Outputs for ``feeds``; a model compiled with a fixed batch runs chunk by chunk
        (the last chunk padded by repeating its final sample)."""
        fixed = self.inputs[0]["shape"][0] if self.inputs and self.inputs[0]["shape"] else None
        names = list(feeds)
        return in_slices(lambda *parts: self._run(dict(zip(names, parts)), schedule),
                         [np.asarray(feeds[k]) for k in names],
                         fixed if isinstance(fixed, int) else None)

    def _run(self, feeds: dict, schedule) -> list:
        env = {}
        for spec in self.inputs:
            if spec["name"] not in feeds:
                raise DataError(f"missing input '{spec['name']}'")
            env[spec["name"]] = np.asarray(feeds[spec["name"]]).astype(spec["dtype"],
                                                                          copy=False)
        for kind, item in self.plan:
            if kind == "host":
                runner, in_names, out_names = item
                outs = runner({n: env[n] for n in in_names}, out_names)
                env.update(zip(out_names, outs))
            else:
                prog = self.programs[item]
                names = prog.layer.concat_inputs or [prog.layer.input_name]
                x = np.concatenate([env[n] for n in names], axis=1)   # [N, ΣC, H, W]
                y, self.layer_stats[item] = prog.run(x, schedule=schedule)
                env[prog.layer.output_name] = y
        return [env[o["name"]] for o in self.outputs]


def host_segments(model: onnx.ModelProto):
    """Cut the host model at its VtaLayer nodes.

    Returns (plan, inputs, outputs): ``plan`` in execution order holds
    ``("host", ModelProto, input names, output names)`` for each maximal run of host
    nodes and ``("vta", layer index)`` for each VTA layer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    value_info = {v.name: v for v in list(graph.value_info) + list(graph.input)
                  + list(graph.output)}
    nodes = list(graph.node)
    readers: dict = {}                  # tensor -> indices of the nodes reading it
    for i, n in enumerate(nodes):
        for t in n.input:
            readers.setdefault(t, []).append(i)
    plan, run = [], []
    # Nodes computing only from initializers (weight DequantizeLinear, shape constants)
    # are copied into every segment that reads them, so segments exchange activations only.
    const_of: dict = {}
    for i, n in enumerate(nodes):
        if n.domain != DOMAIN and all(not t or t in inits or t in const_of for t in n.input):
            for t in n.output:
                const_of[t] = i

    def vi(name):
        if name in value_info:
            return value_info[name]
        raise BackendError(f"VTA host graph: no type for tensor '{name}'")

    def flush():
        if not run:
            return
        # pull in the constant producers of what the segment reads (before the readers)
        pulled, stack = [], [t for i in run for t in nodes[i].input]
        while stack:
            t = stack.pop()
            j = const_of.get(t)
            if j is not None and j not in run and j not in pulled:
                pulled.append(j)
                stack.extend(nodes[j].input)
        run[:0] = sorted(pulled)
        members = set(run)
        produced = {t for i in run for t in nodes[i].output}
        needed = []
        for i in run:
            for t in nodes[i].input:
                if t and t not in produced and t not in inits and t not in needed:
                    needed.append(t)
        outs = [t for i in run for t in nodes[i].output
                if t in graph_outputs or (t not in const_of and any(
                    r not in members for r in readers.get(t, [])))]
        seen: set = set()
        used = [inits[t] for i in run for t in nodes[i].input
                if t in inits and not (t in seen or seen.add(t))]
        sub = onnx.helper.make_graph([nodes[i] for i in run], f"host_{len(plan)}",
                                     [vi(t) for t in needed], [vi(t) for t in outs], used)
        m = onnx.helper.make_model(sub, opset_imports=[o for o in model.opset_import
                                                       if o.domain != DOMAIN])
        m.ir_version = model.ir_version
        plan.append(("host", m, needed, outs))
        run.clear()

    for i, n in enumerate(nodes):
        if n.domain == DOMAIN and n.op_type == OP:
            flush()
            plan.append(("vta", next(a.i for a in n.attribute if a.name == "layer")))
        elif i not in const_of.values() or any(t in graph_outputs for t in n.output):
            run.append(i)
    flush()
    inputs = []
    for i in graph.input:
        if i.name in inits:
            continue
        elem = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in i.type.tensor_type.shape.dim]
        inputs.append({"name": i.name, "shape": dims, "dtype": np.dtype(elem).name})
    outputs = [{"name": o.name} for o in graph.output]
    return plan, inputs, outputs


def _ort_runner(model):
    from onnxc.execution import session

    ort = session(model)
    return lambda feeds, outs: ort.run(outs, feeds)


def _tvm_runner(lib_dir):
    """Run a TVM-compiled host segment (compiled for one sample) on any batch."""
    from onnxc.backends.tvm.runtime import load

    art = load(lib_dir)
    names = [o["name"] for o in art.outputs]

    b = art.inputs[0]["shape"][0] if art.inputs and art.inputs[0]["shape"] else 1
    b = b if isinstance(b, int) and b > 0 else 1

    def run(feeds, outs):
        keys = list(feeds)
        # the library's compiled batch; the last chunk is padded
        got = in_slices(lambda *parts: art.run(dict(zip(keys, parts))),
                        [feeds[k] for k in keys], b)
        return [dict(zip(names, got))[o] for o in outs]
    return run


def load_artifact(path: str) -> VtaArtifact:
    return VtaArtifact(os.fspath(path))
