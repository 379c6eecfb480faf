"""Integer dot-product intrinsics and MetaSchedule design spaces for the integer path.

After :mod:`int_lower` the convolutions and matmuls are uint8/int8 x int8 -> int32.
MetaSchedule tensorizes them with ``MultiLevelTilingWithIntrin`` when the design space
names a dot-product intrinsic the target has:

=================  ============================  ==============================
target             intrinsic                     activations
=================  ============================  ==============================
x86 AVX-512 VNNI   ``dot_16x4_vnni`` (vpdpbusd)  uint8 (u8 x s8)
                   (8-wide: ``onnxc_dot_8x4_vnni``)
x86 without VNNI   none: plain MultiLevelTiling  uint8 (int32 multiply-add)
aarch64 +dotprod   ``dot_4x4_i8i8s32_sdot``      int8 (s8 x s8)
aarch64 NEON       ``dot_4x4_i8i8s32_neon``      int8 (s8 x s8)
CUDA               ``dp4a_u8s8s32``              uint8 (u8 x s8)
=================  ============================  ==============================

Two traps this module steps around:

- The wheel's ``dot_16x4_vnni`` does not compile under its LLVM 22: it passes the
  operands of ``llvm.x86.avx512.vpdpbusd.512`` as ``<16 x i32>`` where LLVM now
  declares ``<64 x i8>``, the LLVM verifier rejects the call, and in tuning this shows
  only as every candidate hitting the builder timeout. :func:`register_intrinsics`
  re-registers that name with the stock description and an implementation passing the
  operands reinterpreted as ``uint8x64`` / ``int8x64``. It overrides the stock name so
  MetaSchedule's own x86 default space (which picks it on any avx512vnni target) and
  every database trace naming it get the working one. Every process that tunes or
  replays tuning records must call it (the tuning builder's worker initializer does).
- On AVX-512 without VNNI MetaSchedule's default space picks ``dot_16x4_avx512``
  (vpmaddubsw), which saturates its int16 pair sums with full-range uint8 inputs: not
  exact. :func:`design_space` leaves it out (plain tiling; LLVM vectorizes the int32
  multiply-add exactly).

SDOT multiplies int8 by int8, so for ARM the lowering feeds the convolutions int8
activations: ``x_s8 = x_u8 - 128`` with zero point ``z - 128`` is the same real value,
so the ARM artifact computes exactly what the x86 one does.
"""

from __future__ import annotations

import sys

VNNI = "dot_16x4_vnni"
VNNI_8 = "onnxc_dot_8x4_vnni"
SDOT = "dot_4x4_i8i8s32_sdot"
NEON = "dot_4x4_i8i8s32_neon"
DP4A = "dp4a_u8s8s32"

_REGISTERED = []


def register_intrinsics() -> None:
    """Import TVM's tensor intrinsics and replace ``dot_16x4_vnni`` by a working copy."""
    if _REGISTERED:
        return
    import inspect

    from .tuning import _fast_stack, import_tensor_intrinsics

    import_tensor_intrinsics()
    original = inspect.stack
    inspect.stack = _fast_stack        # TVMScript parsing without source lookups (fast)
    try:
        _register_vnni()
    finally:
        inspect.stack = original
    _REGISTERED.append(True)


def _register_vnni() -> None:
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc

    TensorIntrin.register(VNNI, dot_product_16x4_u8i8i32_desc, _vnni_dot(16)[1],
                          override=True)
    # The same dot product on 8 outputs (256-bit vpdpbusd, AVX512-VL): for convs whose
    # output channels are a multiple of 8 but not of 16 (pruned layers), which the
    # 16-wide tile would compute half on zero padding.
    TensorIntrin.register(VNNI_8, *_vnni_dot(8), override=True)


def _vnni_dot(n: int) -> tuple:
    """(description, implementation) of C[n] += A[4] . B[n, 4] (u8 x s8 -> s32) with one
    ``vpdpbusd`` on n int32 lanes (n = 16: zmm, 8: ymm), its operands passed as the byte
    vectors LLVM 22 declares."""
    from tvm.script import tirx as T

    nb = 4 * n
    u8, s8, s32 = f"uint8x{nb}", f"int8x{nb}", f"int32x{n}"
    name = f"llvm.x86.avx512.vpdpbusd.{32 * n}"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((n, 4), "int8", offset_factor=1),
             C: T.Buffer((n,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:4], B[0:n, 0:4])
            T.writes(C[0:n])
            for i in T.serial(0, n):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((n, 4), "int8", offset_factor=1),
             C: T.Buffer((n,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:4], B[0:n, 0:4])
            T.writes(C[0:n])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, n)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name), C.vload([0], dtype=s32),
                T.reinterpret(T.broadcast(a_i32, n), dtype=u8), B.vload([0, 0], dtype=s8),
                dtype=s32)

    return desc, impl


# ----------------------------------------------------------------------------------------
# What the target has


def _features(target) -> set:
    keys = set()
    for attr in ("mattr",):
        for item in (target.attrs.get(attr) or []):
            keys.add(str(item).lstrip("+"))
    return keys


def _has(target, feature: str) -> bool:
    from tvm.target import codegen

    if feature in _features(target):
        return True
    try:
        return bool(codegen.llvm_cpu_has_features([feature], target))
    except Exception:    # a target LLVM cannot answer for (e.g. no mcpu): mattr only
        return False


def intrinsic(target) -> str | None:
    """The dot-product intrinsic the integer kernels are tensorized with on ``target``."""
    kind = target.kind.name
    if kind == "cuda":
        return DP4A
    if kind != "llvm":
        return None
    triple = str(target.attrs.get("mtriple") or "")
    if triple.startswith(("aarch64", "arm64")):
        return SDOT if _has(target, "dotprod") else NEON
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return None
    return VNNI if _has(target, "avx512vnni") else None


PACKING = {VNNI: (16, 4), SDOT: (4, 4), NEON: (4, 4), DP4A: (1, 4)}
# A narrower tile of the same instruction, for output channel counts the main tile does
# not divide (pruned layers rounded to 8): (intrinsic, (output, reduction)).
NARROW = {VNNI: (VNNI_8, (8, 4))}


def packing(target) -> list | None:
    """The (output, reduction) tiles of the target intrinsics' weight operand, the widest
    first (a conv takes the first whose output tile divides its channels), or None."""
    name = intrinsic(target)
    if name not in PACKING:
        return None
    return [PACKING[name]] + ([NARROW[name][1]] if name in NARROW else [])


def activation_dtype(target) -> str:
    """uint8 for u8 x s8 intrinsics (VNNI, DP4A, plain x86); int8 for ARM's SDOT/NEON."""
    return "int8" if intrinsic(target) in (SDOT, NEON) else "uint8"


def convert_layout(mod, target):
    """Integer convs to NHWC activations x OHWI weights where an intrinsic will be used.

    MetaSchedule's auto-tensorization maps a dot-product intrinsic onto a conv block
    only when the reduction channel is the innermost axis of both operands: on the
    NCHW/OIHW convs the importer writes it reports "The workload cannot be tensorized"
    (checked on a 16->16 3x3 conv: 0 of 3 design spaces tensorized with NCHW, 3 of 3
    with NHWC/OHWI). Relax's ConvertLayout rewrites the whole graph and cancels the
    transposes between consecutive convs and elementwise ops; the weight transposes
    are constants and fold at compile time.
    """
    from tvm import relax

    if intrinsic(target) is None:
        return mod
    return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)


# ----------------------------------------------------------------------------------------
# Design space


def design_space(target):
    """A ``PostOrderApply`` space: the target's defaults plus its integer intrinsic.

    ``MultiLevelTilingWithIntrin`` goes before the plain ``MultiLevelTiling`` rule so
    integer conv/matmul blocks are tensorized where the intrinsic fits (the tiled
    fallback still covers blocks it does not match, and every float block).
    """
    import tvm.s_tir.meta_schedule as ms

    register_intrinsics()
    kind = target.kind.name
    name = intrinsic(target)
    base = "cuda" if kind == "cuda" else "llvm"
    rules = list(ms.schedule_rule.ScheduleRule.create(base))
    postprocs = list(ms.postproc.Postproc.create(base))
    if name is not None:
        if kind == "cuda":
            tiling = ms.schedule_rule.MultiLevelTilingWithIntrin(
                name, structure="SSSRRSRS",
                tile_binds=["blockIdx.x", "vthread.x", "threadIdx.x"],
                max_innermost_factor=64, vector_load_lens=[1, 2, 3, 4],
                reuse_read=ms.schedule_rule.ReuseType(req="must", levels=[4], scope="shared"),
                reuse_write=ms.schedule_rule.ReuseType(req="must", levels=[3], scope="local"))
        else:
            tiling = ms.schedule_rule.MultiLevelTilingWithIntrin(
                name, structure="SSRSRS", tile_binds=None, max_innermost_factor=64,
                vector_load_lens=None, reuse_read=None,
                reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2],
                                                       scope="global"))
        at = next((i for i, r in enumerate(rules)
                   if type(r).__name__ == "MultiLevelTiling"), len(rules))
        rules.insert(at, tiling)
        if name in NARROW:    # kernels packed for the narrow tile (the wide one fails there)
            rules.insert(at + 1, ms.schedule_rule.MultiLevelTilingWithIntrin(
                NARROW[name][0], structure="SSRSRS", tile_binds=None,
                max_innermost_factor=64, vector_load_lens=None, reuse_read=None,
                reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2],
                                                       scope="global")))
        # before RewriteLayout, as in TVM's own VNNI defaults: a layout-rewrite block
        # inside the tensorized block would no longer match the intrinsic
        at = next((i for i, p in enumerate(postprocs)
                   if type(p).__name__ == "RewriteLayout"), len(postprocs))
        postprocs.insert(at, ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs=base)


def describe(target) -> str:
    name = intrinsic(target)
    if name in NARROW:
        name += f" ({NARROW[name][0]} where the output channels are not a multiple of " \
                f"{PACKING[name][0]})"
    return f"integer kernels tensorized with {name}" if name else \
        "integer kernels without a dot-product intrinsic (plain tiling)"



# ----------------------------------------------------------------------------------------
# Without tuning: one tensorized schedule from the design space


def untuned_schedules(mod, target, log=None) -> dict:
    """Give each integer conv/matmul kernel a tensorized schedule without measuring.

    For targets that cannot be measured here (ARM, CUDA without a device) and for
    builds without tuning, the integer kernels would otherwise run TVM's default
    loops: no dot-product instruction at all. This takes the first design space of
    ``design_space(target)`` that MultiLevelTilingWithIntrin tensorized (its tile sizes
    are MetaSchedule's sampled defaults, not tuned ones), applies the target's
    postprocessors and uses it, the way a database record would be applied. Kernels
    already scheduled (from a tuning database) are left alone. Returns
    ``{"tensorized": n, "kernels": m}``.
    """
    import tvm

    log = log or (lambda m: None)
    name = intrinsic(target)
    counts = {"tensorized": 0, "kernels": 0}
    if name is None:
        return counts
    space = design_space(target)
    config = dict(target.export())
    if target.kind.name == "llvm" and not target.attrs.get("num-cores"):
        # MetaSchedule's CPU rules need a core count; the cross targets do not say one.
        # It only bounds the parallel loop split of the one schedule taken here.
        config["num-cores"] = 4
    if target.kind.name == "cuda":   # limits every CUDA GPU since sm_50 meets
        config.setdefault("max_threads_per_block", 1024)
        config.setdefault("max_shared_memory_per_block", 49152)
        config.setdefault("thread_warp_size", 32)
    if config != dict(target.export()):
        host = config.pop("host", None)
        target = tvm.target.Target(config, host=host) if host else tvm.target.Target(config)
    updates, messages = {}, []
    with _quiet_stderr():
        _pick_schedules(mod, target, space, counts, updates, messages.append)
    for message in messages:
        log(message)
    for gvar, func in updates.items():
        mod[gvar] = func
    return counts


class _quiet_stderr:
    """Hold back the C++ warnings of sampled candidates whose tensorization failed.

    RewriteTensorize logs each failure with the kernel's whole IR on the process's
    stderr (file descriptor 2, below Python); a candidate that fails is simply not
    taken, so those pages of IR are noise in a build's output.
    """

    def __enter__(self):
        import os
        import tempfile

        sys.stderr.flush()
        self.saved = os.dup(2)
        self.sink = tempfile.TemporaryFile()
        os.dup2(self.sink.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.sink.close()
        return False


class stderr_without:
    """Pass the process's stderr (file descriptor 2, where TVM's C++ logs go) through,
    without the lines containing any of ``texts``; ``dropped`` counts them.

    Tuning the integer kernels samples many candidates whose tensorization fails (the
    sampled schedule inlined the zero-point pad, say); MetaSchedule discards them, but
    RewriteTensorize logs a "Tensorize failed" warning for each: thousands of lines in
    a 10-minute run, burying onnxc's progress and any real error.
    """

    def __init__(self, *texts: str):
        self.texts = [t.encode() for t in texts]
        self.dropped = 0

    def __enter__(self):
        import os
        import threading

        sys.stderr.flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)

        saved = self.saved

        def forward():
            # Runs until every write end is closed: worker processes started inside the
            # block inherited one, so it may outlive the block; it owns ``saved``.
            with os.fdopen(read, "rb") as pipe:
                for line in pipe:
                    if any(t in line for t in self.texts):
                        self.dropped += 1
                    else:
                        os.write(saved, line)
            os.close(saved)

        self.thread = threading.Thread(target=forward, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import os

        sys.stderr.flush()
        os.dup2(self.saved, 2)      # the pipe's write end closes here (and in workers, later)
        self.thread.join(timeout=2)
        return False


# TVM warnings about sampled tuning candidates, one line each, that change nothing the
# user can act on: a candidate that did not tensorize is discarded; a vectorize
# annotation inside a vectorized loop is ignored by the build.
TUNING_NOISE = ("Tensorize failed", "Detect vectorize inside vectorized loop")


def _pick_schedules(mod, target, space, counts, updates, log):
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import tirx

    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        if "conv2d" not in gvar.name_hint and "matmul" not in gvar.name_hint:
            continue
        counts["kernels"] += 1
        # The weights are packed already; without layout-free buffers RewriteLayout
        # leaves them alone (a layout rewrite inside a failed tensorization would make
        # the kernel unbuildable).
        plain = func.with_attr("layout_free_buffers", []).with_attr("global_symbol", "main")
        sub = tvm.IRModule({"main": plain})
        for seed in SEEDS:    # a few samplings of the space before giving up
            try:
                ctx = ms.TuneContext(mod=sub, target=target, space_generator=space.clone(),
                                     task_name=gvar.name_hint, rand_state=seed)
                candidates = ctx.generate_design_space()
            except Exception as exc:   # a block the rules cannot handle: default loops
                log(f"  tvm: {gvar.name_hint}: no design space "
                    f"({str(exc).splitlines()[0]})")
                break
            if _take_first(candidates, ctx, target, gvar, updates):
                counts["tensorized"] += 1
                break


SEEDS = (1, 2, 3)


def _take_first(candidates, ctx, target, gvar, updates) -> bool:
    for sch in candidates:
        if "meta_schedule.auto_tensorize" not in str(sch.trace):
            continue
        # RewriteTensorize only logs a failed tensorization (its mark stays); a sampled
        # vectorization around the intrinsic can fail to build ("Cannot broadcast
        # lanes=16 ... to 64"): such candidates are not taken.
        if all(post.apply(sch) for post in ctx.space_generator.postprocs) \
                and _tensorized(sch.mod.script()) and _builds(sch.mod, target):
            scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            updates[gvar] = scheduled.with_attr("global_symbol", gvar.name_hint)
            return True
    return False


def _tensorized(script: str) -> bool:
    """Whether a scheduled kernel calls its dot-product intrinsic. RewriteTensorize drops
    its mark even when the block did not match the intrinsic (e.g. a zero-point pad
    inlined into the conv's input: ``if_then_else`` is not ``A[k]``), leaving scalar
    loops: only the intrinsic's own call in the body says it was applied."""
    return "meta_schedule.auto_tensorize" not in script and (
        "call_llvm_pure_intrin" in script or "__dp4a" in script)


def _builds(mod, target) -> bool:
    import tvm

    try:
        tvm.compile(mod, target)
        return True
    except Exception:
        return False


def schedule_integer_kernels(mod, target, pipelined: bool, log=None):
    """The build step: legalize and fuse (unless tuning did), then tensorize what is left.

    After tuning (``pipelined``) only the integer kernels without a database record get
    :func:`untuned_schedules`; otherwise all of them.
    """
    import tvm
    from tvm import relax

    cpu = target.kind.name == "llvm"
    with target:
        if not pipelined:
            mod = tvm.transform.Sequential([
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.pipeline.zero_pipeline(),
                *([relax.transform.AttachAttrLayoutFreeBuffers()] if cpu else []),
            ])(mod)
        counts = untuned_schedules(mod, target, log)
    return mod, counts
