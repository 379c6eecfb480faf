"""MetaSchedule tuning with a persistent database (``--tune-trials``, ``--tune-db``).

The database directory (default ``~/.cache/onnxc/tvm-tuning``) is one MetaSchedule
JSON database shared by every run and model. Before tuning, the module's tasks are
extracted and every task that already has a tuning record for this target is
skipped, so a second compile of the same workloads runs no trials (MetaSchedule on
its own would spend the whole budget again). ``--tune-refine`` tunes those tasks
too: MetaSchedule's evolutionary search seeds its population from the best records
the database holds for a workload, so a refine run continues the earlier search
instead of starting over. Measurements run locally or, with
``--rpc-tracker host:port --rpc-key KEY``, on devices behind a TVM RPC tracker.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from onnxc.errors import BackendError, UsageError, first_line

from . import int_kernels

DEFAULT_DB = os.path.join(os.environ.get("XDG_CACHE_HOME",
                                         os.path.join(os.path.expanduser("~"), ".cache")),
                          "onnxc", "tvm-tuning")


@dataclass
class TuningStats:
    db: str
    tasks: int              # distinct tuning tasks in the module
    cached: int             # tasks whose records were already in the database
    tuned: int              # tasks tuned in this run
    trials: int             # candidates measured in this run
    trials_requested: int
    seconds: float
    runner: str
    trials_in_db: int = 0   # measured records of this module's tasks (all runs so far)
    weight_prepack: bool = False
    equality: str = "structural"   # MetaSchedule module equality the tasks were keyed by

    def as_dict(self) -> dict:
        return dict(vars(self), seconds=round(self.seconds, 2))


def default_db() -> str:
    return os.environ.get("ONNXC_TUNE_DB", DEFAULT_DB)


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--rpc-tracker '{text}' must look like HOST:PORT")
    return host, int(port)


def check_tracker(host: str, port: int, key: str) -> None:
    """Fail early, in one line, when the tracker is unreachable or has no such device."""
    import socket

    from tvm import rpc

    try:   # TVM's own connect retries for a minute; a refused port should fail at once
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise BackendError(f"cannot reach the RPC tracker at {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    try:
        tracker = rpc.connect_tracker(host, port)
        summary = tracker.summary()
    except Exception as exc:
        raise BackendError(f"cannot reach the RPC tracker at {host}:{port}: "
                           f"{first_line(exc)}") from None
    # summary(): {"server_info": [{"key": "server:KEY", ...}], "queue_info": {KEY: {...}}}
    names = {str(s.get("key", "")).split(":")[-1] for s in summary.get("server_info", [])}
    names |= set(summary.get("queue_info", {}) or {})
    if key not in names:
        raise BackendError(f"no RPC server registered under key '{key}' at tracker "
                           f"{host}:{port} (keys: {', '.join(sorted(names)) or 'none'})")


def _runner_checks(spec, options):
    """Refuse what cannot be measured, before any tuning work: (host, port, key) or None."""
    tracker = options.get("rpc_tracker")
    if not tracker:
        if not spec.runs_here:
            raise UsageError(
                f"tuning for {spec.preset} measures on the device: give --rpc-tracker "
                f"HOST:PORT --rpc-key KEY of a TVM RPC tracker with such a device "
                f"(this machine cannot run {spec.preset} code)")
        return None
    key = options.get("rpc_key")
    if not key:
        raise UsageError("--rpc-tracker needs --rpc-key (the device key servers registered)")
    host, port = parse_tracker(tracker)
    check_tracker(host, port, key)
    return host, port, key


def _runner(spec, options):
    import tvm.s_tir.meta_schedule as ms

    remote = _runner_checks(spec, options)
    if remote is None:
        return ms.runner.LocalRunner(timeout_sec=300), "local"
    host, port, key = remote
    runner = _bounded_rpc_runner()(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                       tracker_key=key, session_timeout_sec=RPC_SESSION_SEC),
        evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=50,
            enable_cpu_cache_flush=spec.device == "cpu"),
        max_workers=1)
    return runner, f"rpc {host}:{port} key {key}"


RPC_SESSION_SEC = 120
_BOUNDED_RPC_RUNNER = []


def _bounded_rpc_runner():
    """MetaSchedule's RPCRunner with a time limit per candidate that actually holds.

    TVM's RPCRunner runs each candidate in a worker pool created *without* a timeout:
    its ``session_timeout_sec`` only limits the session on the server, and the result
    is awaited with no limit. A session that never answers (a server that stopped
    re-registering with the tracker, a lost connection) therefore blocked tuning
    forever. This subclass gives the pool a timeout, so such a candidate is recorded as
    failed ("RPCRunner: Timeout") and tuning goes on.
    """
    if _BOUNDED_RPC_RUNNER:
        return _BOUNDED_RPC_RUNNER[0]
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object
    from tvm.support.popen_pool import PopenPoolExecutor

    @derived_object
    class BoundedRPCRunner(ms.runner.RPCRunner._cls):
        def __init__(self, *args, max_workers=1, **kwargs):
            super().__init__(*args, max_workers=max_workers, **kwargs)
            self.pool.shutdown()
            # connect + upload + the session itself
            self.pool = PopenPoolExecutor(max_workers=max_workers,
                                          timeout=self.rpc_config.session_timeout_sec + 60)

    _BOUNDED_RPC_RUNNER.append(BoundedRPCRunner)
    return BoundedRPCRunner


def _shutdown_pool(runner) -> None:
    """Stop a runner's worker processes now rather than in a garbage-collector pass.

    ``PopenPoolExecutor.__del__`` shuts the pool down with locks held by other threads
    possibly taken (TVM's own docstring warns it can deadlock); when that happened
    during the compile after tuning, the process hung. An explicit shutdown right after
    tuning leaves nothing for the collector to do.
    """
    pool = getattr(runner, "pool", None)
    if pool is not None and not getattr(pool, "_shutdown", False):
        pool.shutdown(wait=False)


def _progress_callback(total_tasks: int, budget: int, log):
    """A MeasureCallback printing trials done / budget and the best time per task."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.best = {}
            self.started = time.perf_counter()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            ok = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results
                  if r.error_msg is None and r.run_secs]
            self.done += len(measure_candidates)
            if ok:
                self.best[task_id] = min(self.best.get(task_id, math.inf), min(ok))
            name = task_scheduler.tasks_[task_id].ctx.task_name
            best = self.best.get(task_id)
            errors = [r.error_msg for r in builder_results if r.error_msg] + \
                [r.error_msg for r in runner_results if r.error_msg]
            if errors and not ok:
                lines = [ln for ln in str(errors[0]).strip().splitlines() if ln.strip()]
                log(f"  tune: {len(errors)} candidate(s) of {name[:40]} failed: "
                    f"{lines[-1][:200] if lines else '?'}")
            log(f"  tune: {self.done}/{budget} trials  task {task_id + 1}/{total_tasks} "
                f"{name[:40]}  best {best * 1e3:.3f} ms" if best is not None else
                f"  tune: {self.done}/{budget} trials  task {task_id + 1}/{total_tasks} "
                f"{name[:40]}  (no valid measurement yet)")
            log(f"        elapsed {time.perf_counter() - self.started:.0f} s")

    return Progress()


def _round_starts(total_tasks: int, log):
    """A logging handler announcing each round MetaSchedule starts.

    The measure callback above hears of a round only when the scheduler joins its
    results, and the gradient-based scheduler joins nothing until it has started a
    round on every task: without this, a 14-task model shows no progress for its first
    quarter of an hour. The scheduler logs "TaskScheduler picks Task #k: "name"" when
    it starts a round; this turns that into a progress line.
    """
    import logging
    import re

    picks = re.compile(r'picks Task #(\d+): "([^"]*)"')

    class RoundStarts(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.rounds = 0

        def emit(self, record):
            found = picks.search(record.getMessage())
            if found:
                self.rounds += 1
                log(f"  tune: round {self.rounds}: task {int(found.group(1)) + 1}/"
                    f"{total_tasks} {found.group(2)[:40]} (building, measuring)")

    return RoundStarts()


def _fast_stack(context: int = 1):
    """``inspect.stack()`` without source lookup: frames with their code's file name."""
    import inspect

    frame = sys._getframe(1)
    frames = []
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                        frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` cheaply (also run in each build worker).

    Every TVMScript ``@T.prim_func`` calls ``inspect.stack()``, which resolves each
    frame's source file against all of ``sys.modules``; the hundreds of intrinsics
    MetaSchedule imports then cost over a minute of CPU per process, and the builder
    restarts its worker for every batch of candidates. TVMScript only uses the frames
    themselves, so a stack without source lookup is enough during this import.
    """
    import inspect

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def _has_record(db, task, target) -> bool:
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return False
    return db.query_tuning_record(mod, target, task.task_name) is not None


def _records_for(db, tasks) -> int:
    """How many measured candidates the database holds for these tasks' workloads."""
    from tvm_ffi import structural_hash

    wanted = {structural_hash(t.dispatched[0]) for t in tasks}
    return sum(1 for rec in db.get_all_tuning_records()
               if structural_hash(rec.workload.mod) in wanted)


def _tune_contexts(tasks, db_dir: str, seed: int, space="post-order-apply"):
    """``extracted_tasks_to_tune_contexts``, safe when others log through MetaSchedule.

    It (re)configures logging with ``logging.config.dictConfig``, listing the handlers
    already on the ``tvm.s_tir.meta_schedule`` logger by ``handler.get_name()``. A
    handler someone else attached has no name (pytest attaches its unnamed
    LogCaptureHandler to non-propagating loggers), so a second tuning run in the same
    process died with "'NoneType' object has no attribute 'format'". Unnamed handlers
    are taken off for the call and put back after it.
    """
    import logging

    import tvm.s_tir.meta_schedule as ms

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if h.get_name() is None]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        return ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, work_dir=db_dir, seed=seed, space=space)
    finally:
        for handler in foreign:
            logger.addHandler(handler)


def tune(mod, target, spec, trials: int, options: dict, log):
    """Tune ``mod``'s tasks not yet in the database; return (module with schedules, stats).

    Options besides the CLI ones: ``cpu_weight_prepack`` (default True on CPU targets)
    lets tuned conv/dense schedules choose their weight layout, the rewrite being folded
    into the bound constant weights at compile time (measured on ResNet-56 bs 1: 4.4 ms
    without, 3.6 ms with). It changes the tasks, so records made without it do not apply.
    ``tune_db_only`` applies what the database holds without tuning missing tasks (the
    benchmark measures from a database filled by an earlier, low-priority run).
    """
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import relax

    log = log or (lambda m: print(m, file=sys.stderr))
    started = time.perf_counter()
    integer = bool(options.get("integer_kernels"))   # set by build.py after int_lower
    if integer:   # the working VNNI intrinsic, before any record is tuned or replayed
        int_kernels.register_intrinsics()
    db_dir = os.path.abspath(os.path.expanduser(options.get("tune_db") or default_db()))
    try:
        os.makedirs(db_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--tune-db {db_dir}: cannot create it ({exc.strerror})") from None
    if not os.access(db_dir, os.W_OK):
        raise UsageError(f"--tune-db {db_dir} is not writable")
    db_only = bool(options.get("tune_db_only"))
    if not db_only:
        _runner_checks(spec, options)          # bad flags / unreachable tracker: fail now
    prepack = options.get("cpu_weight_prepack")
    prepack = spec.device == "cpu" if prepack is None else bool(prepack)

    # MetaSchedule's console handler takes this logger's level: keep its INFO chatter
    # (schedules, tables) in <tune-db>/logs and show onnxc's progress lines instead.
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
            *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
        ])(mod)
    equality = _equality(mod, options.get("tune_equality") or "auto")
    if equality != "structural":
        # Records keyed by another equality live apart: an anchor-block lookup would
        # otherwise also match structural records of float kernels, whose traces
        # (fused with other epilogues) MetaSchedule cannot replay on a quantized kernel.
        db_dir = os.path.join(db_dir, equality)
        os.makedirs(db_dir, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(mod, target, module_equality=equality)
    db = ms.database.JSONDatabase(work_dir=db_dir, module_equality=equality)
    missing = [t for t in tasks if not _has_record(db, t, target)]
    cached = len(tasks) - len(missing)
    refine = bool(options.get("tune_refine")) and cached > 0
    todo = list(tasks) if refine else missing
    per_task = int(options.get("tune_trials_per_task") or
                   max(1, math.ceil(trials / max(1, len(todo)))))
    budget = min(trials, per_task * len(todo))
    if db_only or not todo:
        runner, runner_name = None, "none (database only)" if db_only else "none needed"
    else:
        runner, runner_name = _runner(spec, options)
    try:
        log(f"  tune: {len(tasks)} tasks ({equality}), {cached} already in {db_dir}, "
            + (f"{len(missing)} left untuned (database only)" if db_only else
               f"{len(todo)} to tune with up to {budget} trials ({runner_name})"
               + (", refining the cached ones" if refine else "")))
        measured = 0
        if todo and not db_only:
            import_tensor_intrinsics()
            try:
                contexts, weights = _tune_contexts(
                    todo, db_dir, int(options.get("seed") or 0),
                    int_kernels.design_space(target) if integer else "post-order-apply")
            except Exception as exc:
                raise BackendError(f"MetaSchedule could not set up tuning: "
                                   f"{first_line(exc)}") from None
            progress = _progress_callback(len(contexts), budget, log)
            callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [progress]
            ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
            starts = _round_starts(len(contexts), log)
            ms_logger.addHandler(starts)
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=db_dir,
                    max_trials_global=trials, max_trials_per_task=per_task,
                    num_trials_per_iter=min(64, per_task),
                    # Generous timeouts: each build worker re-imports TVM's tensor
                    # intrinsics (tens of seconds on a loaded 2-core machine), and a timeout
                    # counts as a failed candidate, not a slow one.
                    builder=ms.builder.LocalBuilder(
                        max_workers=int(options.get("tune_build_workers") or 1),
                        timeout_sec=600, initializer=int_kernels.register_intrinsics
                        if integer else import_tensor_intrinsics),
                    runner=runner,
                    database=db, measure_callbacks=callbacks)
            except (UsageError, BackendError):
                raise
            except Exception as exc:
                raise BackendError(f"MetaSchedule tuning failed: {first_line(exc)}") from None
            finally:
                ms_logger.removeHandler(starts)
            measured = progress.done
    finally:
        # now, not in a garbage-collector pass (see _shutdown_pool)
        if runner is not None:
            _shutdown_pool(runner)
    # The database in scope (with its equality, and this run's records) is the one
    # applied; given only a work dir, the pass would reopen it with structural equality
    # and miss anchor-block records.
    with target, db, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if prepack:
            # Tuned schedules that rewrite a weight's layout get a separate preprocess
            # step; the weights are bound constants, so it folds away at compile time.
            mod = tvm.transform.Sequential([
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
            ])(mod)
    in_db = _records_for(db, tasks)
    stats = TuningStats(db_dir, len(tasks), cached, 0 if db_only else len(todo), measured,
                        trials, time.perf_counter() - started, runner_name, in_db, prepack,
                        equality)
    log(f"  tune: done in {stats.seconds:.0f} s: {measured} trials measured, "
        + (f"{cached}/{len(tasks)} tasks had records before (refined)"
           if refine and not db_only else
           f"{cached}/{len(tasks)} tasks from the database"))
    return mod, stats


def _equality(mod, choice: str) -> str:
    """MetaSchedule's module equality for this module's tasks.

    A QDQ graph legalizes every QuantizeLinear with its scale and zero point baked in
    as literals, so each fused conv+requantize kernel is structurally unique: ResNet-56
    int8 is 61 tasks under structural equality, 12 under anchor-block (tasks with the
    same conv share one search, and its schedule is replayed on the conv of each
    kernel). Float graphs keep structural equality: their records stay valid and
    identical kernels are already shared.
    """
    if choice != "auto":
        return choice
    from tvm import tirx

    quantized = any(isinstance(func, tirx.PrimFunc) and "quantize" in gv.name_hint
                    for gv, func in mod.functions.items())
    return "anchor-block" if quantized else "structural"


def merge_databases(dst_dir: str, src_dirs: list) -> int:
    """Copy every tuning record of the ``src_dirs`` databases into ``dst_dir``'s.

    For databases filled separately (other machines, or parallel tuning runs: two
    processes must not append to one JSON database at once, since each numbers the
    workloads it appends on its own). Returns the number of records copied.
    """
    import tvm.s_tir.meta_schedule as ms

    os.makedirs(dst_dir, exist_ok=True)
    dst = ms.database.JSONDatabase(work_dir=dst_dir)
    copied = 0
    for src_dir in src_dirs:
        if not os.path.isfile(os.path.join(src_dir, "database_workload.json")):
            raise UsageError(f"{src_dir} is not a tuning database (no database_workload.json)")
        src = ms.database.JSONDatabase(work_dir=src_dir)
        for rec in src.get_all_tuning_records():
            workload = dst.commit_workload(rec.workload.mod)
            dst.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
            copied += 1
    return copied
