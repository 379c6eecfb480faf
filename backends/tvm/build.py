"""ONNX graph → Relax → (MetaSchedule) → ``tvm.compile`` → exported library.

:func:`compile_model` is the one entry point; the ``x86``/``arm``/``cuda`` backends
and other onnxc code (the VTA backend's host part, the benchmark suite) call it.

TVM 0.27's ONNX importer needs static shapes and folded shape computations, so a
graph that still has a symbolic batch dimension is re-canonicalised here with the
batch fixed (1 unless ``input_shapes`` says otherwise) before ``from_onnx``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxc.backends.artifact import random_input
from onnxc.errors import BackendError, UnsupportedError, UsageError, first_line
from onnxc.ir import Graph

from . import int_kernels
from . import targets as T
from .constants import FLOAT_TOLERANCE, LIBRARY, LIBRARY_TAR, QDQ_TOLERANCE, TARGET_FILE
from .int_lower import has_qdq, lower_qdq
from .tuning import TuningStats, tune
from .unroll_rnn import unroll_recurrent



@dataclass
class CompiledModel:
    """What :func:`compile_model` produced (paths are inside ``out_dir``)."""

    out_dir: str
    library: str                       # model.so or model.tar
    spec: T.TargetSpec
    inputs: list                       # [{"name", "shape", "dtype"}]
    outputs: list                      # [{"name", "dtype"}]
    tuning: TuningStats | None
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    files: list = field(default_factory=list)
    verification: dict | None = None   # x86: library vs ONNX Runtime
    lowering: dict | None = None       # QDQ -> integer kernels (int_lower.LoweringReport)
    module: object = None              # the IRModule handed to tvm.compile (benchmarks)

    @property
    def linked(self) -> bool:
        return self.library.endswith(".so")

    def runtime_info(self) -> dict:
        import tvm

        dev = "tvm.cuda()" if self.spec.device == "cuda" else "tvm.cpu()"
        name = os.path.basename(self.library)
        load = ("import numpy as np, tvm\nfrom tvm import relax\n"
                f"vm = relax.VirtualMachine(tvm.runtime.load_module('{name}'), {dev})\n"
                f"y = vm['main'](tvm.runtime.tensor(x, device={dev})).numpy()")
        if self.spec.device != "cuda":
            load = ("# TVM_NUM_THREADS: the cores to use (physical ones on a CPU with "
                    "hyper-threading), set before the first run. TVM's x86 default is half "
                    "the logical CPUs: one core of two without hyper-threading.\n"
                    "import os; os.environ.setdefault('TVM_NUM_THREADS', "
                    "str(os.cpu_count()))\n" + load)
        if not self.linked:
            load = ("# first link the objects on the device: see LINK.txt\n"
                    + load.replace(name, LIBRARY))
        info = {"name": "tvm", "version": tvm.__version__, "library": name,
                "target": self.spec.as_dict(), "inputs": self.inputs,
                "outputs": self.outputs, "load": load,
                "run": "onnxc run ARTIFACT_DIR --input x.npy --output y.npy"}
        if self.spec.device == "cuda":
            info["cuda_kernels_compile"] = (
                "the library carries the CUDA kernel source; TVM compiles it for the GPU "
                "when loading (NVRTC from the cuda-bindings package, or nvcc with "
                "TVM_CUDA_COMPILE_MODE=nvcc)")
        return info


# ----------------------------------------------------------------------------------------
# Import


def static_model(model, input_shapes: dict | None = None, notes: list | None = None,
                 batch: int = 1) -> onnx.ModelProto:
    """A static-shape, constant-folded ModelProto (symbolic batch → ``batch``)."""
    from onnxc import frontend

    notes = notes if notes is not None else []
    if isinstance(model, Graph):
        proto = model.to_onnx()
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        proto = frontend.load_model(model)
    shapes = dict(input_shapes or {})
    inits = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits or inp.name in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            fixed = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
            if any(v == -1 for v in fixed[1:]):
                raise UsageError(f"input '{inp.name}' has symbolic dims beyond the batch "
                                 f"axis; fix them with --input-shape {inp.name}:D1,D2,...")
            fixed[0] = batch
            shapes[inp.name] = fixed
            notes.append(f"input '{inp.name}': symbolic batch fixed to {batch} for TVM "
                         f"(use --input-shape to choose)")
    if not shapes:
        return proto
    return frontend.canonicalize(proto, shapes, notes=notes).to_onnx()


def io_signature(model: onnx.ModelProto) -> tuple[list, list]:
    inits = {t.name for t in model.graph.initializer}
    ins, outs = [], []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        ins.append({"name": vi.name, "shape": [d.dim_value for d in tt.shape.dim],
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        outs.append({"name": vi.name,
                     "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
    return ins, outs


def import_relax(model: onnx.ModelProto, inputs: list):
    """``relax.frontend.onnx.from_onnx`` with params bound; one-line errors."""
    from tvm.relax.frontend.onnx import from_onnx

    _check_importable(model)
    model, names = _identifier_inputs(model, [i["name"] for i in inputs])
    shape_dict = {names[i["name"]]: i["shape"] for i in inputs}
    dtype_dict = {names[i["name"]]: i["dtype"] for i in inputs}
    try:
        return from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict)
    except Exception as exc:  # the importer raises anything from KeyError to TVMError
        ops = sorted({n.op_type for n in model.graph.node})
        raise UnsupportedError(f"TVM's ONNX importer failed: {first_line(exc)} "
                               f"(ops in graph: {', '.join(ops)})") from None


def _check_importable(model: onnx.ModelProto) -> None:
    """Ops the importer has no converter for, named with a node of each, in one line.
    The importer itself names only ops, and inside If branches it checks nothing and
    fails later with a message naming no node (silero_vad: "Dynamic pads")."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}

    def walk(graph, path):
        missing: dict = {}
        for node in graph.node:
            if node.op_type not in known:
                missing.setdefault(node.op_type, node.name)
        if missing:
            where = f" in {', in '.join(path)}" if path else ""
            raise UnsupportedError("TVM's ONNX importer has no " + ", ".join(
                f"{op} (node '{name}')" for op, name in sorted(missing.items())) + where)
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                            list(attr.graphs)):
                    walk(sub, [f"the {attr.name} of {node.op_type} '{node.name}'"] + path)

    walk(model.graph, [])


def _identifier_inputs(model: onnx.ModelProto, names: list) -> tuple:
    """Rename graph inputs to C identifiers (e.g. 'gpu_0/data_0' -> 'gpu_0_data_0').

    TVM's CUDA codegen uses input names for kernel parameters verbatim, so a '/' in a
    name produces CUDA that does not compile. The VM takes inputs by position, so the
    artifact keeps the original names in target.json.
    """
    mapping, taken = {}, set()
    for name in names:
        new = re.sub(r"\W", "_", name)
        if not new or new[0].isdigit():
            new = "in_" + new
        while new in taken:
            new += "_"
        taken.add(new)
        mapping[name] = new
    if all(k == v for k, v in mapping.items()):
        return model, mapping
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for vi in renamed.graph.input:
        vi.name = mapping.get(vi.name, vi.name)
    for node in renamed.graph.node:
        for k, name in enumerate(node.input):
            if name in mapping:
                node.input[k] = mapping[name]
    for vi in renamed.graph.output:
        vi.name = mapping.get(vi.name, vi.name)
    return renamed, mapping


# ----------------------------------------------------------------------------------------
# Compile and export


def compile_model(model, target="x86", out_dir: str = ".", options: dict | None = None,
                  input_shapes: dict | None = None, log=None, verify: bool = True,
                  verify_samples: int = 4, tolerance: float | None = None) -> CompiledModel:
    """Compile an ONNX model (path, ModelProto or IR Graph) for ``target`` into ``out_dir``.

    ``target`` is a preset name (``x86``, ``arm``, ``cuda``) or a ready
    :class:`TargetSpec`; ``options`` are the backend options by dest name
    (``tune_trials``, ``tune_db``, ``mcpu``, ``cuda_arch``, ``target_json``,
    ``rpc_tracker``, ``rpc_key``, ``cross_cc``). Writes the library, ``target.json``
    and, for x86 when ``verify``, checks the library against ONNX Runtime: within
    ``tolerance`` relative (default 1e-4; 5e-2 for QDQ graphs: a one-quantization-step
    difference from ONNX Runtime's integer kernels is allowed; QDQ graphs are lowered to
    integer kernels with ORT's requantization, see int_lower.py, unless
    ``int_lowering`` is False).
    """
    import tvm

    log = log or (lambda msg: None)
    options = dict(options or {})
    spec = target if isinstance(target, T.TargetSpec) else T.resolve(target, options)
    tvm_target = spec.tvm_target()
    notes = list(spec.notes)
    seconds = {}

    start = time.perf_counter()
    model = static_model(model, input_shapes, notes)
    inputs, outputs = io_signature(model)
    # TVM has no LSTM/GRU/RNN importer: unrolled for it; verified against the model as is
    mod = import_relax(unroll_recurrent(model, notes), inputs)
    lowering = None
    if options.get("int_lowering", True) and has_qdq(mod):
        # QDQ graphs: integer conv/matmul/add kernels instead of float QDQ arithmetic
        mod, report = lower_qdq(mod, int_kernels.activation_dtype(tvm_target),
                                int_kernels.packing(tvm_target))
        lowering = dict(report.as_dict(), kernels=int_kernels.describe(tvm_target))
        notes.append(report.summary())
        options["integer_kernels"] = report.lowered > 0
    seconds["import"] = time.perf_counter() - start

    stats = None
    trials = int(options.get("tune_trials") or 0)
    if trials > 0 or options.get("tune_minutes") or options.get("tune_db_only"):
        start = time.perf_counter()
        mod, stats = tune(mod, tvm_target, spec, trials, options, log)
        seconds["tune"] = time.perf_counter() - start

    start = time.perf_counter()
    if options.get("integer_kernels") and options.get("int_schedules", True):
        # kernels without a tuning record still get the target's dot-product instruction
        try:
            mod, counts = int_kernels.schedule_integer_kernels(mod, tvm_target,
                                                              stats is not None, log)
        except Exception as exc:
            raise BackendError(f"scheduling the integer kernels failed: "
                               f"{first_line(exc)}") from None
        lowering["untuned_tensorized"] = counts["tensorized"]
        lowering["integer_kernels"] = counts["kernels"]
        seconds["int_schedules"] = time.perf_counter() - start
        start = time.perf_counter()
    compiled_module = mod
    try:
        with tvm.transform.PassContext(opt_level=3):
            executable = tvm.compile(mod, tvm_target)
    except Exception as exc:
        raise BackendError(f"TVM failed to compile for {spec.preset}: "
                           f"{first_line(exc)}") from None
    seconds["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    files = []
    library = _export(executable, spec, out_dir, files)
    if spec.device == "cuda":
        notes += _cuda_device_code(executable, spec, out_dir, files, log)
    seconds["export"] = time.perf_counter() - start

    result = CompiledModel(out_dir, library, spec, inputs, outputs, stats,
                           {k: round(v, 3) for k, v in seconds.items()}, notes, files,
                           lowering=lowering, module=compiled_module)
    with open(os.path.join(out_dir, TARGET_FILE), "w") as f:
        json.dump({"onnxc_tvm": 1, **result.runtime_info(),
                   "tuning": stats.as_dict() if stats else None,
                   "integer_lowering": lowering}, f, indent=2)
        f.write("\n")
    files.append(TARGET_FILE)
    if tolerance is None:
        qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        tolerance = QDQ_TOLERANCE if qdq else FLOAT_TOLERANCE
    if verify and spec.runs_here and result.linked:
        result.verification = verify_against_onnxruntime(result, model, verify_samples)
        if result.verification["max_rel"] > tolerance:
            raise BackendError(
                f"the {spec.preset} library differs from ONNX Runtime: max relative error "
                f"{result.verification['max_rel']:.2e} > {tolerance:.0e}")
    return result


def _export(executable, spec: T.TargetSpec, out_dir: str, files: list) -> str:
    from tvm.support import cc

    if spec.compiler is None:
        path = os.path.join(out_dir, LIBRARY_TAR)
        try:
            executable.export_library(path)
        except Exception as exc:
            raise BackendError(f"exporting the library failed: {first_line(exc)}") from None
        with open(os.path.join(out_dir, "LINK.txt"), "w") as f:
            gxx = T.CROSS_COMPILERS.get(spec.arch, "g++")
            f.write(f"No cross compiler for {spec.arch} was found where this artifact was\n"
                    f"built, so {LIBRARY_TAR} holds the compiled object files. On the "
                    f"device (or with a {spec.arch} cross toolchain):\n\n"
                    f"  mkdir objs && tar -xf {LIBRARY_TAR} -C objs\n"
                    f"  g++ -shared -fPIC -o {LIBRARY} objs/*.o    "
                    f"# or {gxx} when cross-compiling\n\n"
                    f"then load {LIBRARY} with tvm.runtime.load_module.\n")
        files += [LIBRARY_TAR, "LINK.txt"]
        return path
    path = os.path.join(out_dir, LIBRARY)
    native = os.path.basename(spec.compiler) in ("g++", "c++") and spec.runs_here \
        or spec.device == "cuda"
    fcompile = None if native else cc.cross_compiler(spec.compiler)
    try:
        executable.export_library(path, fcompile=fcompile)
    except Exception as exc:
        raise BackendError(f"linking the library with {spec.compiler} failed: "
                           f"{first_line(exc)}") from None
    files.append(LIBRARY)
    return path


def cuda_kernel_source(executable) -> str:
    """The CUDA C source of every device kernel in a compiled executable."""
    sources = []

    def walk(mod):
        if mod.kind == "cuda":
            sources.append(mod.inspect_source("cuda") or mod.inspect_source(""))
        for sub in mod.imports:
            walk(sub)

    walk(executable.mod)
    return "\n".join(s for s in sources if s)


def _cuda_device_code(executable, spec, out_dir, files, log) -> list:
    """Write the kernels' CUDA source; with nvcc, also their PTX for the requested arch.

    The pip TVM compiles CUDA kernels only where a CUDA driver is present, so here the
    library carries the kernel source and the GPU host compiles it at load time. nvcc
    ahead of time proves the kernels compile for the arch and ships the PTX beside it.
    """
    notes = []
    source = cuda_kernel_source(executable)
    if not source:
        raise BackendError("the CUDA build produced no device kernels")
    cu = os.path.join(out_dir, "kernels.cu")
    with open(cu, "w") as f:
        f.write(source)
    files.append("kernels.cu")
    arch = spec.target.get("arch", T.DEFAULT_CUDA_ARCH)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        notes.append("nvcc not found: CUDA kernels not compiled ahead of time (the GPU host "
                     "compiles kernels.cu's code at load time)")
        return notes
    ptx = f"kernels.{arch}.ptx"
    log(f"  tvm: compiling {source.count('__global__')} CUDA kernels for {arch} with nvcc")
    proc = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-w", cu, "-o",
                           os.path.join(out_dir, ptx)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        err = next((ln for ln in lines if "error" in ln), lines[0] if lines else "?")
        raise BackendError(f"nvcc failed to compile the CUDA kernels for {arch}: {err}")
    files.append(ptx)
    return notes


# ----------------------------------------------------------------------------------------
# Verification


def verify_against_onnxruntime(result: CompiledModel, model: onnx.ModelProto,
                               samples: int = 4, seed: int = 0) -> dict:
    """Run the library and ONNX Runtime on the same random inputs; compare outputs."""
    from onnxc.execution import Runner
    from onnxc.verify import compare_outputs

    from .runtime import load

    rng = np.random.default_rng(seed)
    art = load(result.out_dir)
    ort = Runner(model)
    refs, outs = [], []
    for _ in range(samples):
        feeds = {i["name"]: random_input(rng, i) for i in result.inputs}
        refs.append(ort.session.run(None, feeds))
        outs.append(art.run(feeds))
    ref = [np.concatenate([r[k] for r in refs]) for k in range(len(refs[0]))]
    out = [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    cmp = compare_outputs(ref, out)
    return {"against": "onnxruntime", "samples": samples, "max_rel": cmp.max_rel,
            "max_abs": cmp.max_abs}
