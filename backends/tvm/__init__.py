"""Targets ``x86``, ``arm``, ``cuda``: lowering through Apache TVM (Relax).

canonical graph → static shapes → ``relax.frontend.onnx.from_onnx`` (params bound)
→ optional MetaSchedule tuning against a persistent database → ``tvm.compile`` →
``model.so`` (or ``model.tar`` + LINK.txt where no cross compiler is found) and
``target.json`` (target dict, inputs/outputs, how to load). x86 artifacts are
checked against ONNX Runtime on the compressed ONNX model before they are written.

Python API for other onnxc code (TVM is imported lazily, only when used):

- :func:`compile_model` — compile an ONNX model / IR graph for a target into a dir.
- :func:`x86_latency` — compile for this host (optionally tuned) and time it.
- :func:`load_artifact`, :func:`benchmark` — run or time an artifact directory (any
  target: see :mod:`onnxc.backends.artifact`).
"""

from __future__ import annotations

import os
import tempfile

from onnxc.backends import Backend, Option, register_backend
from onnxc.options import non_negative_int, positive

from .constants import TARGET_FILE
from .targets import DEFAULT_CUDA_ARCH


def runtime_threads(environ=os.environ) -> int:
    """The CPU threads TVM's runtime is given in this process: the physical cores this
    process may use, unless TVM_NUM_THREADS / OMP_NUM_THREADS say otherwise."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if environ.get(var, "").strip().isdigit():
            return max(1, int(environ[var]))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    try:
        import psutil     # (a TVM dependency) physical cores, not hyper-thread siblings
        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


# Without TVM_NUM_THREADS, TVM's x86 runtime takes half the logical CPUs, assuming every
# core has a hyper-thread sibling: on a machine without SMT (this 2-core VM: 1 thread
# per core) it runs every kernel on one core while ONNX Runtime uses both. Measured on
# ResNet-56 prune50+int8 bs 1 (docs/tvm.md, Threads): 1.15 ms unset, 0.51 ms with 2
# threads. The variable is
# read when TVM's thread pool starts (the first parallel kernel of a process) and is
# inherited by the MetaSchedule runner's processes, so tuning measures the same way the
# artifact then runs. Set here, before any TVM code runs in an onnxc process.
os.environ.setdefault("TVM_NUM_THREADS", str(runtime_threads()))

TUNE_OPTIONS = (
    Option("--tune-trials", non_negative_int, 0, "MetaSchedule trials in total (0: no tuning)"),
    Option("--tune-trials-per-task", int, None,
           "trial cap per task (default: trials spread evenly over untuned tasks)"),
    Option("--tune-minutes", positive, None, "wall-clock tuning budget in minutes, spread over "
           "the tasks by weight (occurrences x FLOPs), heaviest first; with --tune-trials "
           "both limits hold"),
    Option("--tune-db", str, None, "tuning database directory, reused across runs and "
           "models (default: ~/.cache/onnxc/tvm-tuning or $ONNXC_TUNE_DB)"),
    Option("--tune-refine", bool, False, "tune tasks the database already has too, starting "
           "the search from their best records (adds --tune-trials to earlier runs' instead "
           "of skipping those tasks)", action="store_true"),
    Option("--tune-equality", str, "auto", "when two kernels share tuning records: structural "
           "(identical kernels), anchor-block (same conv/matmul, any fused epilogue), or auto "
           "(anchor-block for quantized graphs, whose baked-in scales make every kernel "
           "distinct)", choices=("auto", "structural", "anchor-block")),
    Option("--rpc-tracker", str, None, "measure on remote devices: TVM RPC tracker HOST:PORT"),
    Option("--rpc-key", str, None, "device key the RPC servers registered with the tracker"),
)
COMMON_OPTIONS = (
    Option("--target-json", str, None, "TVM target as a JSON object (or a file holding one); "
           "replaces the preset's target dict"),
    Option("--cross-cc", str, None, "compiler that links model.so (default: g++ for this "
           "host, aarch64-linux-gnu-g++ for arm); a missing explicit one is an error"),
    Option("--tvm-tolerance", float, None, "max relative error of an x86 library vs ONNX "
           "Runtime on the compressed model (default 1e-4; 5e-2 for int8 QDQ graphs)"),
) + TUNE_OPTIONS


def tuned_state(stats) -> str:
    """'untuned', 'partly tuned' (some kernels on default schedules) or 'tuned'."""
    if stats is None or (stats.trials == 0 and stats.cached == 0):
        return "untuned"
    if stats.untuned_kernels or stats.cached + stats.tuned < stats.tasks \
            or stats.stopped_by == "minutes":
        return "partly tuned"
    return "tuned"


def how_to_tune(preset: str) -> str:
    """How to tune an ``arm``/``cuda`` build on the device itself (it cannot run here)."""
    return ("measure on the device through a TVM RPC tracker: on some host "
            "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`; on each device "
            "`python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY`; then rebuild "
            f"with `onnxc compress ... --target {preset} --tune-minutes 60 "
            "--rpc-tracker HOST:9190 --rpc-key KEY` (records go to --tune-db and are "
            "reused by later builds)")


class _TvmBackend(Backend):
    preset = ""
    # Rank / channel rounding default (lowrank, prune): TVM's tensorized int8 kernels
    # take the output channels in blocks (VNNI 16x4 on x86, 4x4 sdot on ARM, dp4a on
    # CUDA) and its fp32 kernels vectorise along them; 8 keeps narrow layers on whole
    # vectors and lets layers of one stage share tuning tasks.
    channel_multiple = 8

    artifact_marker = TARGET_FILE

    @classmethod
    def load_artifact(cls, path):
        from .runtime import load

        return load(path)

    def validate(self, ctx) -> None:
        # Resolve the target now so bad flags fail before any pass runs.
        from . import targets

        cfg = self.config
        spec = targets.resolve(self.preset, cfg)
        spec.tvm_target()
        from onnxc.errors import UsageError

        if cfg.tune_trials > 0 or cfg.tune_minutes:
            from .tuning import parse_tracker

            if cfg.rpc_tracker:
                parse_tracker(cfg.rpc_tracker)
                if not cfg.rpc_key:
                    raise UsageError("--rpc-tracker needs --rpc-key (the device key servers "
                                     "registered)")
            elif not spec.runs_here:
                raise UsageError(
                    f"tuning for {self.preset} measures on the device: give --rpc-tracker "
                    f"HOST:PORT --rpc-key KEY of a TVM RPC tracker with such a device "
                    f"(this machine cannot run {self.preset} code)")

    def build(self, graph, ctx, out_dir, report) -> None:
        from .build import compile_model

        options = dict(self.config, seed=ctx.seed)
        result = compile_model(graph, self.preset, out_dir, options, log=ctx.log,
                               tolerance=self.config.tvm_tolerance)
        for note in result.notes:
            ctx.log(f"  tvm: {note}")
        info = result.runtime_info()
        info["seconds"] = result.seconds
        info["notes"] = result.notes
        info["tuning"] = result.tuning.as_dict() if result.tuning else None
        info["tuned"] = tuned_state(result.tuning)
        if self.preset in ("arm", "cuda") and not result.spec.runs_here:
            info["how_to_tune"] = how_to_tune(self.preset)
        info["verification"] = result.verification
        report["runtime"] = info
        if result.verification:
            ctx.log(f"  tvm: library vs ONNX Runtime max rel err "
                    f"{result.verification['max_rel']:.2e}")


@register_backend
class X86Backend(_TvmBackend):
    name = preset = "x86"
    summary = "TVM (Relax) shared library for this host's x86 CPU"
    options = (Option("--mcpu", str, None, "LLVM CPU name (default: this host's, e.g. "
                      "znver3; arm: e.g. cortex-a72)"),) + COMMON_OPTIONS


@register_backend
class ArmBackend(_TvmBackend):
    name = preset = "arm"
    summary = "TVM (Relax) shared library for aarch64 Linux (NEON), cross-compiled"
    options = X86Backend.options


@register_backend
class CudaBackend(_TvmBackend):
    name = preset = "cuda"
    summary = f"TVM (Relax) library with CUDA kernels (--cuda-arch, default {DEFAULT_CUDA_ARCH})"
    options = (Option("--cuda-arch", str, DEFAULT_CUDA_ARCH, "CUDA architecture"),) \
        + COMMON_OPTIONS


# ----------------------------------------------------------------------------------------
# Python API


def compile_model(*args, **kwargs):
    """See :func:`onnxc.backends.tvm.build.compile_model`."""
    from .build import compile_model as impl

    return impl(*args, **kwargs)


def load_artifact(path):
    from onnxc.backends.artifact import load_artifact as impl

    return impl(path)


def benchmark(*args, **kwargs):
    from onnxc.backends.artifact import benchmark as impl

    return impl(*args, **kwargs)


def x86_latency(model, input_shapes: dict | None = None, tune_trials: int = 0,
                tune_db: str | None = None, warmup: int = 5, repeat: int = 30,
                out_dir: str | None = None, log=None, **options) -> dict:
    """Compile ``model`` for this host's CPU (tuned when ``tune_trials`` > 0) and time it.

    Returns the :func:`benchmark` figures plus ``compile`` seconds and ``tuning``
    stats. The artifact goes to ``out_dir`` (a temporary directory by default).
    """
    from onnxc.backends.artifact import benchmark as bench

    from .build import compile_model as impl
    from .runtime import load

    opts = dict(options, tune_trials=tune_trials, tune_db=tune_db)
    with tempfile.TemporaryDirectory(prefix="onnxc-tvm-") as tmp:
        where = out_dir or os.path.join(tmp, "artifact")
        result = impl(model, "x86", where, opts, input_shapes=input_shapes, log=log)
        figures = bench(load(where), warmup=warmup, repeat=repeat)
    figures["compile_seconds"] = result.seconds
    figures["tuning"] = result.tuning.as_dict() if result.tuning else None
    figures["verification"] = result.verification
    return figures


from . import commands  # noqa: E402,F401  (registers onnxc run, onnxc bench)
