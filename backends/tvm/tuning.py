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

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

from onnxc.errors import BackendError, UsageError, first_line

from . import int_kernels, int_lower

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
    kernels: int = 0        # tunable kernels in the module (tasks dedupe them)
    minutes: float | None = None   # --tune-minutes budget, if any
    stopped_by: str = ""    # what ended tuning: "trials", "minutes", "search", "failed" or ""
    not_replayed: list = field(default_factory=list)   # kernels whose record did not replay
    fallback_tuned: int = 0         # of those, kernels tuned on their own (fallback database)
    untuned_kernels: list = field(default_factory=list)  # kernels built without a schedule
    per_task: list = field(default_factory=list)   # [{"task", "weight", "trials", "seconds",
                                                   #   "best_ms"}] of this run's tasks
    measured_on: str = ""   # the CPU (local runner) or RPC device the trials ran on
    # why the tensorized integer design space was given up for the default one, if it was
    space_fallbacks: list = field(default_factory=list)

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


class _TimeUp(Exception):
    """A task's share of ``--tune-minutes`` is spent (raised through MetaSchedule)."""


def _progress_callback(total_tasks: int, budget: int, log, stop_at=None, deadline=None,
                       index=None):
    """A MeasureCallback printing trials done / budget and the best time per task.

    With ``stop_at`` (a ``time.perf_counter()`` value), a round that ends past it ends
    the tuning run (``--tune-minutes``; one task per run): the callback raises
    :class:`_TimeUp` after the round's records are in the database (the database
    callback runs first). Terminating the task from here instead is not possible: the
    round-robin scheduler joins a round and then hands the same task out again, and
    MetaSchedule stops on a terminated task with a check failure.
    """
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.best = {}
            self.trials = {}
            self.started = time.perf_counter()
            self.time_up = False

        def rows(self, contexts, weights) -> list:
            return [{"task": ctx.task_name, "weight": float(w),
                     "trials": self.trials.get(k, 0),
                     "best_ms": None if self.best.get(k) is None
                     else round(self.best[k] * 1e3, 4)}
                    for k, (ctx, w) in enumerate(zip(contexts, weights))]

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            ok = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results
                  if r.error_msg is None and r.run_secs]
            self.done += len(measure_candidates)
            self.trials[task_id] = self.trials.get(task_id, 0) + len(measure_candidates)
            if ok:
                self.best[task_id] = min(self.best.get(task_id, math.inf), min(ok))
            name = task_scheduler.tasks_[task_id].ctx.task_name
            shown = (index if index is not None else task_id) + 1
            best = self.best.get(task_id)
            errors = [r.error_msg for r in builder_results if r.error_msg] + \
                [r.error_msg for r in runner_results if r.error_msg]
            if errors and not ok:
                lines = [ln for ln in str(errors[0]).strip().splitlines() if ln.strip()]
                log(f"  tune: {len(errors)} candidate(s) of {name[:40]} failed: "
                    f"{lines[-1][:200] if lines else '?'}")
            head = f"  tune: {self.done}/{budget} trials" if budget < UNLIMITED_TRIALS \
                else f"  tune: {self.done} trials"
            log(f"{head}  task {shown}/{total_tasks} {name[:40]}  best {best * 1e3:.3f} ms"
                if best is not None else
                f"{head}  task {shown}/{total_tasks} {name[:40]}  (no valid measurement yet)")
            now = time.perf_counter()
            log(f"        elapsed {now - self.started:.0f} s"
                + (f", {max(0.0, deadline - now) / 60:.1f} min of the budget left"
                   if deadline is not None else ""))
            if stop_at is not None and now >= stop_at:
                self.time_up = True
                raise _TimeUp()

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


FALLBACK_DIR = "fallback"     # <tune-db>/fallback: kernels a shared record did not fit
UNLIMITED_TRIALS = 1_000_000   # --tune-minutes alone: time, not trials, ends tuning
MIN_SHARE_SECONDS = 10         # a task's --tune-minutes share worth a round (build + run)
MIN_ROUND = 4                  # fewest candidates per round under --tune-minutes


def tune(mod, target, spec, trials: int, options: dict, log):
    """Tune ``mod``'s tasks not yet in the database; return (module with schedules, stats).

    Options besides the CLI ones: ``cpu_weight_prepack`` (default True on CPU targets)
    lets tuned conv/dense schedules choose their weight layout, the rewrite being folded
    into the bound constant weights at compile time (measured on ResNet-56 bs 1: 4.4 ms
    without, 3.6 ms with). It changes the tasks, so records made without it do not apply.
    ``tune_db_only`` applies what the database holds without tuning missing tasks (the
    benchmark measures from a database filled by an earlier, low-priority run).

    ``tune_minutes`` is a wall-clock budget for the tuning rounds (the clock starts
    after the set-up): tasks are tuned one after the other, the heaviest first, each
    given the remaining time in proportion to its weight (occurrences × FLOPs); a
    task's round that ends past its share ends that task, and a task whose share is
    below ``MIN_SHARE_SECONDS`` is left untuned (its time goes to the others).

    A record is applied kernel by kernel. One that does not replay on a kernel (an
    anchor-block record tuned on a kernel with another fused epilogue, seen as
    ``ScheduleError … cache-read``) is skipped: that kernel is tuned on its own into
    ``<tune-db>/fallback`` (structural equality) within what is left of the budget, or
    built with TVM's default schedule; ``stats.not_replayed`` / ``untuned_kernels`` say so.
    """
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import relax

    log = log or (lambda m: print(m, file=sys.stderr))
    started = time.perf_counter()
    integer = bool(options.get("integer_kernels"))   # set by build.py after int_lower
    if integer:   # the working VNNI intrinsic, before any record is tuned or replayed
        int_kernels.register_intrinsics()
    base_dir = os.path.abspath(os.path.expanduser(options.get("tune_db") or default_db()))
    db_dir = base_dir
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
    minutes = float(options.get("tune_minutes") or 0) or None
    if trials <= 0 and minutes:
        trials = UNLIMITED_TRIALS

    # MetaSchedule's console handler takes this logger's level: keep its INFO chatter
    # (schedules, tables) in <tune-db>/logs and show onnxc's progress lines instead.
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    mod = prepare_module(mod, target, prepack)
    equality = _equality(mod, options.get("tune_equality") or "auto")
    if equality != "structural":
        # Records keyed by another equality live apart: an anchor-block lookup would
        # otherwise also match structural records of float kernels, whose traces
        # (fused with other epilogues) MetaSchedule cannot replay on a quantized kernel.
        db_dir = os.path.join(db_dir, equality)
        os.makedirs(db_dir, exist_ok=True)
    tasks = ms.relax_integration.extract_tasks(mod, target, module_equality=equality)
    kernels = sum(int(t.weight) for t in tasks)
    db = open_database(db_dir, equality, log)
    missing = [t for t in tasks if not _has_record(db, t, target)]
    cached = len(tasks) - len(missing)
    refine = bool(options.get("tune_refine")) and cached > 0
    todo = list(tasks) if refine else missing
    per_task = int(options.get("tune_trials_per_task") or
                   (UNLIMITED_TRIALS if trials >= UNLIMITED_TRIALS else
                    max(1, math.ceil(trials / max(1, len(todo))))))
    budget = min(trials, per_task * len(todo))
    runners = _Runners(spec, options)
    session = _Session(log, trials, per_task, minutes, options, runners, target, integer)
    try:
        limit = (f"up to {budget} trials" if budget < UNLIMITED_TRIALS else "no trial cap") \
            + (f" in {minutes:g} min" if minutes else "")
        log(f"  tune: {kernels} kernels -> {len(tasks)} tasks ({equality}), {cached} already "
            f"in {db_dir} (this or other models), "
            + (f"{len(missing)} left untuned (database only)" if db_only else
               f"{len(todo)} to tune with {limit}"
               + (f" ({runners.label()})" if todo else "")
               + (", refining the cached ones" if refine else "")))
        if todo and not db_only:
            quiet = int_kernels.stderr_without(*int_kernels.TUNING_NOISE) if integer else None
            with quiet or contextlib.nullcontext():
                session.tune(todo, db, db_dir)
            if quiet is not None and quiet.dropped:
                log(f"  tune: {quiet.dropped} TVM warnings about discarded or adjusted "
                    f"sampled candidates held back ({', '.join(int_kernels.TUNING_NOISE)})")
        # The database in scope (with its equality, and this run's records) is the one
        # applied, kernel by kernel (see apply_database).
        mod, failed = apply_database(mod, db, target)
        not_replayed = [name for name, _ in failed]
        untuned, fallback_tuned = [], 0
        if failed:
            for name, err in failed:
                log(f"  tune: the record for {name[:60]} does not replay on it ({err}); "
                    f"skipped")
            mod, untuned, fallback_tuned = _fallback(mod, failed, target, base_dir,
                                                     session, db_only, log)
    finally:
        # now, not in a garbage-collector pass (see _shutdown_pool)
        runners.shutdown()
    if prepack:
        with target, tvm.transform.PassContext(opt_level=3):
            # Tuned schedules that rewrite a weight's layout get a separate preprocess
            # step; the weights are bound constants, so it folds away at compile time.
            mod = tvm.transform.Sequential([
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.LiftTransformParams(),
                relax.transform.FoldConstant(),
            ])(mod)
    in_db = _records_for(db, tasks)
    stats = TuningStats(db_dir, len(tasks), cached, 0 if db_only else len(todo),
                        session.measured, trials if trials < UNLIMITED_TRIALS else 0,
                        time.perf_counter() - started, runners.name(), in_db, prepack,
                        equality, kernels, minutes, session.stopped_by, not_replayed,
                        fallback_tuned, untuned, session.rows, _measured_on(runners),
                        session.fallbacks)
    log(f"  tune: done in {stats.seconds:.0f} s: {session.measured} trials measured, "
        + (f"{cached}/{len(tasks)} tasks had records before (refined)"
           if refine and not db_only else
           f"{cached}/{len(tasks)} tasks from the database")
        + (f"; stopped by the {minutes:g}-minute budget" if session.stopped_by == "minutes"
           else "")
        + (f"; {len(untuned)} kernel(s) built untuned" if untuned else ""))
    return mod, stats


def open_database(db_dir: str, equality: str, log):
    """MetaSchedule's JSON database in ``db_dir``, repaired if TVM cannot load it.

    Loading replays every record's trace on its workload, and one record that does not
    replay (written by another TVM version, or a damaged line) makes the whole load
    fail. Then the records are read one by one, the files are kept beside as
    ``*.unreadable-<time>`` and a database of the loadable records takes their place,
    so a shared database costs at worst its bad records, never the build.
    """
    import json

    import tvm.s_tir.meta_schedule as ms

    try:
        return ms.database.JSONDatabase(work_dir=db_dir, module_equality=equality)
    except Exception as exc:     # noqa: BLE001 - TVM raises RuntimeError/ValueError alike
        reason = first_line(exc)[:160]
    paths = [os.path.join(db_dir, f"database_{kind}.json")
             for kind in ("workload", "tuning_record")]
    workloads, records, bad = [], [], 0
    try:
        with open(paths[0]) as f:
            for line in f:
                if line.strip():
                    try:
                        workloads.append(ms.database.Workload.from_json(json.loads(line)))
                    except Exception:      # noqa: BLE001 - an unreadable workload
                        workloads.append(None)
        with open(paths[1]) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    index, record = json.loads(line)
                    records.append(ms.database.TuningRecord.from_json(
                        record, workloads[index]))
                except Exception:          # noqa: BLE001 - the record does not load
                    bad += 1
    except OSError as exc:
        raise BackendError(f"the tuning database {db_dir} cannot be read "
                           f"({exc.strerror}); give another --tune-db") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in paths:
        if os.path.exists(path):
            os.replace(path, f"{path}.unreadable-{stamp}")
    db = ms.database.JSONDatabase(work_dir=db_dir, module_equality=equality)
    for rec in records:
        workload = db.commit_workload(rec.workload.mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
    log(f"  tune: TVM could not load the tuning database {db_dir} ({reason}); kept "
        f"{len(records)} records, dropped {bad} that do not load (the old files are "
        f"*.unreadable-{stamp})")
    return db


def prepare_module(mod, target, prepack: bool):
    """The Relax module as MetaSchedule sees it: legalized, fused, its kernels extracted
    (with layout-free weights marked when ``prepack``)."""
    import tvm
    from tvm import relax

    with target:
        mod = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
            *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
        ])(mod)
    if prepack:
        # The integer lowering packs its conv weights at compile time already. Marked
        # layout-free, they would get a second layout rewrite whose indices are not plain
        # variables, and MetaSchedule's RemoveWeightLayoutRewriteBlock fails the whole
        # tuning run on it ("Check failed: (ind.as<PrimVar>())", seen on ResNet-56 int8).
        from tvm import tirx

        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and int_lower.PACKED_CONV in gv.name_hint:
                mod[gv] = func.with_attr("layout_free_buffers", [])
    return mod


def apply_database(mod, db, target, only=None):
    """Schedule each PrimFunc of ``mod`` from ``db``; return (module, [(name, error)]).

    What ``relax.transform.MetaScheduleApplyDatabase`` does, one kernel at a time, so a
    record that does not replay on one kernel fails that kernel only (left unscheduled,
    listed) instead of the build. As there: a record whose workload is the kernel itself
    is replayed as is; one found through anchor-block equality (a sibling kernel with
    the same conv/matmul and another fused epilogue) is transferred with MetaSchedule's
    ``schedule_using_anchor_trace``. (``Database.query_schedule`` must not be used for
    that: it returns the *record's* kernel, not the one asked about.) ``only`` limits
    it to these function names.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace
    from tvm_ffi import structural_equal
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    failed = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or (only is not None and
                                                    gv.name_hint not in only):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            continue
        query = _normalize_mod(func)
        try:
            record = db.query_tuning_record(query, target, gv.name_hint)
            if record is None:
                continue
            if structural_equal(query, record.workload.mod):
                sch = s_tir.Schedule(record.workload.mod, debug_mask=0)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            else:
                sch = s_tir.Schedule(query, debug_mask=0)
                schedule_using_anchor_trace(sch, record.trace, target)
        except (AttributeError, TypeError, NameError, ImportError):
            raise                  # a bug here, not a record that does not fit
        except Exception as exc:   # ScheduleError, TVMError: the trace does not fit
            failed.append((gv.name_hint, first_line(exc)[:160]))
            continue
        new = sch.mod["main"]
        # the kernel's own attributes (symbol, layout-free buffers), not the query's
        for key in list(new.attrs.keys()) if new.attrs is not None else []:
            if func.attrs is None or key not in func.attrs:
                new = new.without_attr(key)
        if func.attrs is not None:
            new = new.with_attrs(dict(func.attrs.items()))
        mod.update_func(gv, new.with_attr("tirx.is_scheduled", True))
    return mod, failed


def _fallback(mod, failed, target, base_dir, session, db_only, log):
    """Kernels whose shared record did not replay: their own records (tuned now within
    the budget left, structural equality, ``<tune-db>/fallback``) or no schedule."""
    import tvm.s_tir.meta_schedule as ms
    from tvm import tirx
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    fb_dir = os.path.join(base_dir, FALLBACK_DIR)
    os.makedirs(fb_dir, exist_ok=True)
    fb_db = ms.database.JSONDatabase(work_dir=fb_dir, module_equality="structural")
    names = {name for name, _ in failed}
    funcs = {gv.name_hint: func for gv, func in mod.functions.items()
             if gv.name_hint in names and isinstance(func, tirx.PrimFunc)}
    todo = []
    for name, func in funcs.items():
        norm = _normalize_mod(func)
        if fb_db.has_workload(norm) and fb_db.query_tuning_record(norm, target, name):
            continue
        todo.append(ms.ExtractedTask(name, norm, target, [norm], 1))
    tuned = 0
    if todo and not db_only and session.has_budget():
        log(f"  tune: tuning {len(todo)} kernel(s) on their own into {fb_dir}")
        before = session.measured
        session.tune(todo, fb_db, fb_dir)
        tuned = len(todo) if session.measured > before else 0
    mod, still = apply_database(mod, fb_db, target, only=names)
    scheduled = {gv.name_hint for gv, f in mod.functions.items()
                 if gv.name_hint in names and f.attrs is not None
                 and "tirx.is_scheduled" in f.attrs}
    untuned = sorted(names - scheduled)
    if untuned:
        log(f"  tune: {len(untuned)} kernel(s) built with TVM's default schedule (untuned): "
            + ", ".join(n[:40] for n in untuned[:4]) + (" …" if len(untuned) > 4 else ""))
    return mod, untuned, tuned


class _Runners:
    """The measuring runner, created on first use (none when nothing is tuned)."""

    def __init__(self, spec, options):
        self.spec, self.options = spec, options
        self.runner, self.runner_name = None, None

    def get(self):
        if self.runner is None:
            self.runner, self.runner_name = _runner(self.spec, self.options)
        return self.runner

    def label(self) -> str:
        """Where candidates will be measured (before the runner exists)."""
        tracker = self.options.get("rpc_tracker")
        return f"rpc {tracker} key {self.options.get('rpc_key')}" if tracker else "local"

    def name(self) -> str:
        if self.runner_name:
            return self.runner_name
        if self.options.get("tune_db_only"):
            return "none (database only)"
        return "none needed"

    def shutdown(self):
        if self.runner is not None:
            _shutdown_pool(self.runner)


class _Session:
    """One build's tuning: trial and time budget shared by every ``tune`` call in it."""

    def __init__(self, log, trials, per_task, minutes, options, runners, target=None,
                 integer=False):
        self.log, self.trials, self.per_task = log, trials, per_task
        # integer-lowered modules: f-intlower's tensorized design space and intrinsics
        self.target, self.integer = target, integer
        self.minutes, self.options = minutes, options
        # The --tune-minutes clock starts with the first tuning round, after the set-up
        # (TVM's intrinsics import, design spaces: seconds idle, a minute under load).
        self.deadline = None
        self.per_trial_s = 2.0      # until a round of this build has been timed
        self.runners = runners
        self.measured = 0
        self.stopped_by = ""
        self.rows = []
        self.fallbacks = []     # why the tensorized design space was given up, per call

    def has_budget(self) -> bool:
        return self.measured < self.trials and (
            self.deadline is None or time.perf_counter() < self.deadline)

    def _builder(self):
        import tvm.s_tir.meta_schedule as ms

        # Generous timeouts: each build worker re-imports TVM's tensor intrinsics (tens
        # of seconds on a loaded 2-core machine), and a timeout counts as a failed
        # candidate, not a slow one.
        return ms.builder.LocalBuilder(
            max_workers=int(self.options.get("tune_build_workers") or 1),
            timeout_sec=600, initializer=int_kernels.register_intrinsics
            if self.integer else import_tensor_intrinsics)

    def tune(self, tasks, db, work_dir):
        import_tensor_intrinsics()
        runner = self.runners.get()
        space = int_kernels.design_space(self.target) if self.integer else "post-order-apply"
        try:
            self._tune_space(tasks, space, db, work_dir, runner)
        except BackendError as exc:
            if space == "post-order-apply":
                raise
            # The tensorized space's rules can fail inside MetaSchedule on a kernel they
            # do not fit (seen: "Check failed: (ind.as<PrimVar>())" on a small QDQ conv
            # chain). A build must not fail for that: the default space still tunes the
            # integer kernels, only without the hand-picked intrinsic rules.
            self.log(f"  tune: the tensorized design space failed ({exc}); "
                     f"tuning with MetaSchedule's default space instead")
            self.fallbacks.append(str(exc))
            try:
                self._tune_space(tasks, "post-order-apply", db, work_dir, runner)
            except BackendError as again:
                # The default space picks the same VNNI intrinsic on this target and can
                # fail the same way: the kernels are then built untuned (the report
                # says so) rather than failing the build.
                self.log(f"  tune: the default space failed too ({again}); the kernels "
                         f"without records are built untuned")
                self.fallbacks.append(str(again))
                self.stopped_by = "failed"

    def _tune_space(self, tasks, space, db, work_dir, runner):
        import logging

        try:
            contexts, weights = _tune_contexts(
                tasks, work_dir, int(self.options.get("seed") or 0), space)
        except Exception as exc:
            raise BackendError(f"MetaSchedule could not set up tuning: "
                               f"{first_line(exc)}") from None
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        starts = _round_starts(len(contexts), self.log)
        ms_logger.addHandler(starts)
        if self.minutes and self.deadline is None:
            self.deadline = time.perf_counter() + 60 * self.minutes
            self.log(f"  tune: the {self.minutes:g}-minute budget starts now")
        try:
            if not self.minutes:
                self._tune_together(contexts, weights, db, work_dir, runner)
            else:
                self._tune_in_time(tasks, contexts, weights, db, work_dir, runner)
        except (UsageError, BackendError):
            raise
        except Exception as exc:
            raise BackendError(f"MetaSchedule tuning failed: {first_line(exc)}") from None
        finally:
            ms_logger.removeHandler(starts)

    def _tune_together(self, contexts, weights, db, work_dir, runner):
        """All tasks in one MetaSchedule run (its gradient scheduler shares the trials)."""
        import tvm.s_tir.meta_schedule as ms

        left = self.trials - self.measured
        per_task = min(self.per_task, left)
        budget = min(left, per_task * len(contexts))
        progress = _progress_callback(len(contexts), budget, self.log)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=work_dir,
            max_trials_global=left, max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task), builder=self._builder(), runner=runner,
            database=db, measure_callbacks=self._callbacks(progress))
        self.measured += progress.done
        self.rows += progress.rows(contexts, weights)
        self.stopped_by = "trials" if self.measured >= self.trials else "search"

    def _tune_in_time(self, tasks, contexts, weights, db, work_dir, runner):
        """One task after the other, heaviest first, each given the time left in
        proportion to its weight; a task whose round ends past its share stops there."""
        import tvm.s_tir.meta_schedule as ms

        shares = [float(w) * _flops(t) for t, w in zip(tasks, weights)]
        order = sorted(range(len(contexts)), key=lambda i: -shares[i])
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=2)
        builder = self._builder()
        for k, i in enumerate(order):
            now = time.perf_counter()
            left_s = self.deadline - now
            left_trials = self.trials - self.measured
            if left_s <= 0 or left_trials <= 0:
                self.stopped_by = "minutes" if left_s <= 0 else "trials"
                self.log(f"  tune: budget spent: {len(order) - k} task(s) not tuned")
                return
            share_s = left_s * shares[i] / max(sum(shares[j] for j in order[k:]), 1e-9)
            name = contexts[i].task_name
            if share_s < MIN_SHARE_SECONDS:
                # Less than one round's time: its share goes to the tasks after it.
                self.log(f"  tune: task {k + 1}/{len(order)} {name[:40]} not tuned: its "
                         f"share ({share_s:.1f} s) is below {MIN_SHARE_SECONDS} s")
                self.rows.append({"task": name, "weight": float(weights[i]), "trials": 0,
                                  "best_ms": None, "seconds": 0.0,
                                  "share_seconds": round(share_s, 1)})
                continue
            per_task = min(self.per_task, left_trials)
            # Rounds small enough for at least two in a task's share, at the seconds
            # per trial (build + measure) seen so far in this build: about 1 s on the
            # idle 2-core machine, ten times that under load. A round in flight always
            # finishes, so a share can be overrun by one round.
            per_iter = int(min(64, per_task, max(MIN_ROUND, share_s / 2 / self.per_trial_s)))
            self.log(f"  tune: task {k + 1}/{len(order)} {name[:40]}: {share_s:.0f} s of "
                     f"the {left_s / 60:.1f} min left (weight {shares[i] / 1e6:.1f} MFLOP)")
            progress = _progress_callback(len(contexts), min(per_task, left_trials),
                                          self.log, stop_at=now + share_s,
                                          deadline=self.deadline, index=i)
            try:
                ms.tune.tune_tasks(
                    tasks=[contexts[i]], task_weights=[weights[i]], work_dir=work_dir,
                    max_trials_global=left_trials, max_trials_per_task=per_task,
                    num_trials_per_iter=per_iter, builder=builder, runner=runner,
                    database=db, cost_model=cost_model, task_scheduler="round-robin",
                    measure_callbacks=self._callbacks(progress))
            except Exception:
                if not progress.time_up:   # (arrives re-wrapped by the FFI)
                    raise
            self.measured += progress.done
            if progress.done:
                self.per_trial_s = (time.perf_counter() - now) / progress.done
            row = progress.rows([contexts[i]], [weights[i]])[0]
            row["seconds"] = round(time.perf_counter() - now, 1)
            row["share_seconds"] = round(share_s, 1)
            self.rows.append(row)
        skipped = any(row["trials"] == 0 for row in self.rows)
        self.stopped_by = "minutes" if skipped or time.perf_counter() >= self.deadline \
            else "search"

    @staticmethod
    def _callbacks(progress):
        import tvm.s_tir.meta_schedule as ms

        return list(ms.measure_callback.MeasureCallback.create("default")) + [progress]


def _measured_on(runners) -> str:
    if runners.runner is None:
        return ""
    if runners.name().startswith("rpc"):
        return f"devices behind the RPC tracker ({runners.name()[4:]})"
    from onnxc.speed import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores), this machine"


def _flops(task) -> float:
    """FLOPs of one call of a task's kernel (1 when TVM cannot estimate them)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return max(float(estimate_tir_flops(task.dispatched[0])), 1.0)
    except Exception:
        return 1.0


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
