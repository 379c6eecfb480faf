"""``onnxc search MODEL``: the fastest (or smallest) compressed model within an accuracy
budget, found by an optimiser over pass options and per-layer choices, with latency
measured on the target.

The space (``--space``, default ``prune,lowrank,int8``):

- **prune**: a MAC budget and a parameter budget (shares to remove, 0 = none) and the
  criterion (``--criteria``). The budgets become *per-group ratios* through the
  sensitivity-guided greedy allocation of the prune pass (``Allocator.for_budgets``)
  fed by a per-group sensitivity profile (``onnxc sensitivity``'s ``measure``), so the
  ratios differ per group and the recipe records them (``--prune-group-ratios``).
- **lowrank**: the MAC budget of ``--lowrank-flops`` (one energy threshold across
  layers, so per-layer ranks follow each layer's spectrum).
- **int8**: per-layer precision fp32 / int8 / int4 weights, the calibrator, AdaRound:
  how many layers stay in float (the most sensitive ones first, ranked once by int8's
  own mixed-precision sensitivity, ``calibrate.mixed``, recorded by name as
  ``--keep-float``) and, with 4-bit weights, how many of the next most sensitive keep
  8-bit weights (the rest are named in ``--int4-weights``). Float layers are not
  chosen with lowrank in the same trial (its split layers get new names; 4-bit weights
  then go to every quantized layer).

Ternary / binary are not in the space: they are separate passes that cannot mix with
int8 per layer, and without recovery training they keep ~10 % top-1 on the CIFAR
ResNets (BENCHMARKS.md). 4-bit weights are what sub-8-bit precision means here: a real
INT4 tensor in the file, run at int8 speed by ONNX Runtime (docs/quantization.md).

**Seeds** (enqueued before the optimiser's own trials, as a person would start), the
likeliest winner first: int4 + AdaRound alone; for ``--objective size`` then int4 +
AdaRound + ThiNet parameter pruning at the shares the int8 profile's size says make the
model ~8.1x and ~8.4x smaller (``SIZE_SEED_CR``), allocated by the prune pass's own
criterion; plain int8; for latency int4 / int8 + light pruning (10 % of the MACs,
channels in multiples of 16); int8 with the mixed-precision fallback.

**Optimiser: Optuna's TPE** (multivariate, grouped for the conditional parameters,
constrained by the accuracy bound, two objectives: accuracy and cost). Why TPE rather
than NSGA-II: one trial here is a full compress + evaluation + latency run (10 s to
2 min), so a search sees tens of trials, not thousands. NSGA-II needs a population
(50 by default) per generation to make progress and would still be sampling at random
when the time budget ends; TPE models which parameters the good trials share after a
handful of them, handles conditional dimensions (criterion only when pruning,
calibrator only with int8) and takes the accuracy bound as a constraint (c-TPE).

**Accuracy**: top-1 on ``--eval-data`` labels; without labels, top-1 *agreement* with
the original on held-out ``--calib-data`` samples (labels = the original's argmax).
**Latency**: ONNX Runtime (the ``onnx`` target), original and candidate timed
interleaved in the same process at ``--batch`` (default 64), after warm-up, median of
repetitions, intra-op spinning off; never estimated from MACs. A candidate slower than
the original is dropped (infeasible), whatever the objective.

**State**: an Optuna RDB storage (SQLite ``DIR/search.db`` by default, or
``--storage postgresql://...``): trials, the sensitivity profiles and the settings
live there, so ``--resume`` continues a stopped search and several workers (processes
or machines) can share one study. Each worker stops at its ``--minutes`` and then
writes the outputs from everything the study holds: ``pareto.json``, ``pareto.png``,
``recipe.yaml`` and the chosen model as a normal artifact in ``DIR/model``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import time
import warnings

import numpy as np

from onnxc.commands import register_command
from onnxc.errors import OutputError, UsageError


class _StopSignals:
    """SIGTERM/SIGINT stop a search like Ctrl-C (KeyboardInterrupt), but never inside a
    storage call: raised there, it left SQLAlchemy's session half-done and the save of
    the best candidate that follows could hang (seen in CI under load). Inside
    ``storage()`` the stop waits until the call returns."""

    def __init__(self):
        self.depth, self.pending = 0, False

    def __call__(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def storage(self):
        import contextlib

        @contextlib.contextmanager
        def section():
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if not self.depth and self.pending:
                    self.pending = False
                    raise KeyboardInterrupt
        return section()


STOP = _StopSignals()

OBJECTIVES = ("latency", "size", "macs")
SPACE = ("prune", "lowrank", "int8")
# Ratios the per-group pruning sensitivity is measured at (the allocation moves in these
# steps; finer ones cost profile time, and rounding kept counts to 8 or 16 channels
# makes most of them vanish on small groups).
PROFILE_RATIOS = (0.25, 0.5, 0.75)
PROFILE_SAMPLES = 64
MAX_FLOAT_LAYERS = 12       # int8: at most this many most-sensitive layers kept in float
MAX_INT8_LAYERS = 8         # int4: at most this many next most sensitive keep 8-bit weights
ADAROUND_ITERS = 100        # AdaRound steps per layer in a trial (the int8 default: 300)
SIZE_SEED_CR = (8.1, 8.4)
LATENCY_TIE = 0.05          # latency objective: within 5 % of the fastest counts as a tie   # --objective size seeds: pruning budgets aimed at these Cr
AGREEMENT_SAMPLES = 1024
STUDY_VERSION = 2          # 2: precision int4, int8_layers, adaround


def configure(sub) -> None:
    from onnxc.commands import add_data_args

    p = sub.add_parser(
        "search", help="search pass options and per-layer choices for the fastest or "
        "smallest model within --max-drop (Optuna; latency measured on the target)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("--target", default="onnx", help="where latency is measured: onnx "
                   "(ONNX Runtime CPU)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy bound: top-1 (or agreement) drop in points (default 1.0)")
    p.add_argument("--objective", default="latency", choices=OBJECTIVES,
                   help="what to minimise within the bound (default latency)")
    p.add_argument("--minutes", type=float, default=30.0,
                   help="this worker's wall-clock budget, profiles and outputs included")
    p.add_argument("--trials", type=int, default=None,
                   help="stop when the study holds this many finished trials")
    p.add_argument("-o", "--output", required=True, help="search directory")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default "
                   "sqlite:///DIR/search.db; postgresql://user@host/db to share a search "
                   "between machines)")
    p.add_argument("--study", default="onnxc-search", help="study name in the storage")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in the storage (also: join it as a worker)")
    p.add_argument("--space", default=",".join(SPACE),
                   help=f"comma-separated parts of the space: {', '.join(SPACE)}")
    p.add_argument("--criteria", default="l1,thinet",
                   help="pruning criteria to choose from (thinet: data-driven, slow)")
    p.add_argument("--batch", type=int, default=64, help="latency batch size (default 64)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_data_args(p)


# ----------------------------------------------------------------------------------------
# Measurement


def _latency_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    from onnxc.errors import BackendError

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Two sessions timed in turn: a spinning pool of the idle one would steal the cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError("ONNX Runtime cannot load the model: "
                           f"{str(exc).strip().splitlines()[0][:200]}") from exc


def latency_pair(original: bytes, candidate: bytes, feeds: dict, threads: int = 2,
                 rounds: int = 7, warmup: int = 2) -> tuple[float, float]:
    """Median ms per run of ``original`` and ``candidate`` on ``feeds``, timed
    interleaved (ABBA order per round, so drift in machine load hits both alike)."""
    sessions = [_latency_session(m, threads) for m in (original, candidate)]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    batch = len(next(iter(feeds.values())))
    reps = 1 if batch >= 16 else 10
    times: list = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            for _ in range(reps):
                sessions[i].run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times[0]), statistics.median(times[1])


def latency_feeds(graph, batch: int, seed: int = 0) -> dict:
    feeds = {}
    rng = np.random.default_rng(seed)
    for t in graph.gs.inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (t.shape or [])]
        if shape and not (isinstance(t.shape[0], int) and t.shape[0] > 0):
            shape[0] = batch
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        feeds[t.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


# ----------------------------------------------------------------------------------------
# Set-up shared by the workers of one study


class Problem:
    """The model, data, profiles and settings one worker searches with."""

    def __init__(self, args, log):
        from onnxc import frontend
        from onnxc.calibrate.readers import Dataset, Preprocess, load_npz

        self.args = args
        self.log = log
        if args.target != "onnx":
            raise UsageError(f"--target {args.target}: search measures latency on ONNX "
                             "Runtime only (target onnx) so far")
        if args.max_drop < 0:
            raise UsageError(f"--max-drop {args.max_drop} must be >= 0")
        if args.minutes <= 0:
            raise UsageError(f"--minutes {args.minutes} must be positive")
        if args.batch < 1 or args.threads < 1:
            raise UsageError("--batch and --threads must be at least 1")
        self.space = [s.strip() for s in args.space.split(",") if s.strip()]
        bad = [s for s in self.space if s not in SPACE]
        if bad or not self.space:
            raise UsageError(f"--space '{args.space}': parts are {', '.join(SPACE)}")
        from onnxc.passes.prune import CRITERIA

        self.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
        bad = [c for c in self.criteria if c not in CRITERIA or c == "bn_gamma"]
        # (CRITERIA: the registry, plug-in criteria included)
        if bad or not self.criteria:
            raise UsageError(f"--criteria '{args.criteria}': choose from "
                             f"{', '.join(c for c in CRITERIA if c != 'bn_gamma')} "
                             "(bn_gamma needs BN, which fold_bn removes)")
        if not args.eval_data and not args.calib_data:
            raise UsageError("search needs data: --eval-data (labelled: top-1) or "
                             "--calib-data (unlabelled: agreement with the original)")
        self.shapes = frontend.parse_input_shapes(args.input_shape)
        self.graph = frontend.load(args.model, input_shapes=self.shapes)
        self.original_bytes = self.graph.to_onnx().SerializeToString()
        pre = Preprocess.from_strings(args.scale, args.mean, args.std, args.layout)
        self.preprocess = {"scale": args.scale, "mean": args.mean, "std": args.std,
                           "layout": args.layout}
        self.calib = load_npz(args.calib_data, self.graph, pre, samples=args.calib_samples) \
            if args.calib_data else None
        if args.eval_data:
            ev = load_npz(args.eval_data, self.graph, pre, samples=args.eval_samples)
            if ev.labels is None:
                raise UsageError(f"--eval-data {args.eval_data} has no 'labels' array")
            self.eval = ev
            self.accuracy_kind = f"top-1 on {len(ev)} labelled samples of {args.eval_data}"
            if self.calib is None:
                log("warning: no --calib-data: int8/thinet calibrate on the --eval-data "
                    "samples the accuracy is measured on")
        else:
            from onnxc.verify import Runner

            c = self.calib
            # Agreement is measured on samples the calibration does not see when there
            # are enough (int8 reads the first 512, thinet the first 256).
            start = 512 if len(c) >= 512 + 256 else 0
            n = min(AGREEMENT_SAMPLES, len(c) - start)
            inputs = {k: v[start:start + n] for k, v in c.inputs.items()}
            out = Runner(self.graph).run(inputs)[0]
            self.eval = Dataset(inputs, out.reshape(len(out), -1).argmax(1),
                                f"{c.source} (labels: the original's top-1)")
            self.accuracy_kind = (f"top-1 agreement with the original on {n} samples of "
                                  f"{args.calib_data}"
                                  + ("" if start else " (the calibration samples: the "
                                     "file is too small to hold some out)"))
        self.feeds = latency_feeds(self.graph, args.batch, args.seed)
        self._prune_setup = None
        self._alloc_cache: dict = {}

    # ---- options every trial shares (and the recipe records) -------------------------
    def base_options(self) -> dict:
        opts = {"calib_samples": self.args.calib_samples}
        opts.update(self.preprocess)
        return opts

    def compress(self, passes: list, options: dict, out_dir: str | None = None,
                 log=None):
        from onnxc.compress import compress

        opts = self.base_options()
        opts.update(options)
        return compress(self.args.model, passes, target=self.args.target, out_dir=out_dir,
                        options=opts, input_shapes=self.shapes, calibration=self.calib,
                        evaluation=self.eval, seed=self.args.seed,
                        log=log or (lambda m: None))

    # ---- profiles (once per study, stored in it) -------------------------------------
    def profiles(self, study) -> dict:
        attrs = study.user_attrs
        if "profiles" in attrs:
            return attrs["profiles"]
        prof = {}
        t0 = time.perf_counter()
        if "prune" in self.space:
            self.log("profile: per-group pruning sensitivity (l1, zeroed channels) at "
                     f"ratios {', '.join(map(str, PROFILE_RATIOS))} ...")
            prof["prune"] = self._prune_profile()
            self.log(f"  {len(prof['prune'])} groups ({time.perf_counter() - t0:.0f} s)")
        if "int8" in self.space:
            t1 = time.perf_counter()
            self.log(f"profile: int8 per-layer sensitivity and the mixed-precision "
                     f"fallback for --max-drop {self.args.max_drop} ...")
            res = self.compress(["fold_bn", "int8"], {"max_drop": self.args.max_drop})
            rep = next(p for p in res.report["passes"] if p["name"] == "int8")
            order = list(rep["extra"]["sensitivity"])
            mixed = rep["extra"]["mixed_precision"]
            weighted = set(self.weighted_names())
            prof["int8"] = {"order": order,
                            "scores": [rep["extra"]["sensitivity"][n] for n in order],
                            "fallback": mixed["fallback"],
                            # (int4 applies to layers with weights; order has Adds too)
                            "weighted": [n for n in order if n in weighted]
                            + sorted(weighted - set(order)),
                            "bytes": int(res.report["final"]["bytes"]),
                            "original_bytes": int(res.report["original"]["bytes"]),
                            "params": int(res.report["final"]["params"])}
            self.log(f"  {len(order)} layers; most sensitive: {', '.join(order[:3])}; "
                     f"mixed precision keeps {len(mixed['fallback'])} in float "
                     f"({time.perf_counter() - t1:.0f} s)")
        study.set_user_attr("profiles", prof)
        return prof

    def weighted_names(self) -> list:
        """Names of the layers with weights (Conv/Gemm/MatMul) in the fold_bn graph."""
        from onnxc.calibrate import qdq
        from onnxc.pipeline import Context, PassManager, resolve_passes

        ctx = Context(seed=self.args.seed, log=lambda m: None, progress=False)
        graph = PassManager(resolve_passes(["fold_bn"]), verify=False).run(
            self.graph.copy(), ctx).graph
        graph.name_nodes()
        return [n.name for n in qdq.weighted_layers(graph)]

    def _prune_graph(self):
        """fold_bn graph, dependency groups and l1 scores (what the allocation needs)."""
        if self._prune_setup is None:
            from onnxc.passes.prune import prunable_groups
            from onnxc.passes.prune.criteria import scores as criterion_scores
            from onnxc.passes.prune.groups import DependencyGraph
            from onnxc.pipeline import Context, PassManager, resolve_passes

            ctx = Context(seed=self.args.seed, calibration=self.calib,
                          log=lambda m: None, progress=False)
            graph = PassManager(resolve_passes(["fold_bn"]), verify=False).run(
                self.graph.copy(), ctx).graph
            graph.name_nodes()
            dg = DependencyGraph(graph)
            groups = prunable_groups(dg, [], None, residual=False)
            scores = criterion_scores("l1", dg, graph, ctx, PROFILE_SAMPLES)
            self._prune_setup = (graph, dg, groups, scores)
        return self._prune_setup

    def _prune_profile(self) -> list:
        from onnxc.passes.prune.sensitivity import measure

        graph, dg, groups, scores = self._prune_graph()
        if not groups:
            return []
        data = self.eval.take(min(len(self.eval), PROFILE_SAMPLES))
        rows = measure(graph, groups, dg, scores, list(PROFILE_RATIOS), data)
        return [{"sources": r["sources"], "error": {str(k): v for k, v in r["error"].items()}}
                for r in rows]

    def group_ratios(self, profile: list, flops: float, params: float,
                     multiple: int | None = None) -> str:
        """--prune-group-ratios for MAC/parameter budgets (0 = none), allocated greedily
        where the measured sensitivity grows least per MAC and parameter saved."""
        key = (round(flops, 4), round(params, 4), multiple)
        if key not in self._alloc_cache:
            from onnxc.passes.prune import group_ratios_spec
            from onnxc.passes.prune.allocate import Allocator

            graph, dg, groups, scores = self._prune_graph()
            curves = {}
            by_sources = {tuple(r["sources"]): r["error"] for r in profile}
            for gi, g in enumerate(groups):
                c = by_sources.get(tuple(g.sources))
                if c is not None:
                    curves[gi] = {float(k): float(v) for k, v in c.items()}
            alloc = Allocator(dg, groups, scores, multiple=multiple)
            base = dg.estimate_macs(np.zeros(dg.num_classes, bool))
            base_params = graph.stats(with_bytes=False).params
            removed, _ = alloc.for_budgets(base, base_params, flops or None, params or None,
                                           False, curves)
            self._alloc_cache[key] = group_ratios_spec(groups, removed)
        return self._alloc_cache[key]


# ----------------------------------------------------------------------------------------
# The space and one trial


def suggest(trial, problem: Problem, prof: dict) -> tuple[list, dict, dict]:
    """(passes, options, per-layer choices) for one trial."""
    passes, opts, per_layer = ["fold_bn"], {}, {}
    if "prune" in problem.space and prof.get("prune"):
        flops = round(trial.suggest_float("prune_flops", 0.0, 0.6, step=0.05), 4)
        params = round(trial.suggest_float("prune_params", 0.0, 0.7, step=0.05), 4)
        if flops > 0 or params > 0:
            crit = trial.suggest_categorical("prune_criterion", problem.criteria)
            # Kept channels rounded to 8 (AVX2's NCHWc block) or 16 (AVX-512's): which
            # one is faster depends on the CPU, so it is measured, not assumed.
            mult = trial.suggest_categorical("prune_multiple", [8, 16])
            # Who turns the budgets into per-group ratios: the profile's greedy
            # allocation (coarse: the profile has 0.25 steps, so it cuts few groups
            # deeply), or the prune pass's own criterion-guided allocation (many groups,
            # 8 channels at a time): ResNet-56 with 4-bit weights, ThiNet, 10 % of the
            # parameters: drop 0.59 pt vs 8.3 pt for the profile's 25 %.
            alloc = trial.suggest_categorical("prune_allocation", ["profile", "criterion"])
            spec = problem.group_ratios(prof["prune"], flops, params, mult) \
                if alloc == "profile" else ""
            if alloc == "criterion":
                passes.append("prune")
                opts.update(prune_criterion=crit, prune_multiple=mult)
                opts.update({k: v for k, v in (("prune_flops", flops),
                                               ("prune_params", params)) if v > 0})
                if trial.suggest_categorical("prune_ort_layout", [False, True]):
                    opts["prune_ort_layout"] = True
            if spec:
                passes.append("prune")
                opts.update(prune_group_ratios=spec, prune_criterion=crit,
                            prune_multiple=mult)
                # Shortcut Pads as 1x1 convs keep ORT's trunk in NCHWc (docs/pruning.md).
                if trial.suggest_categorical("prune_ort_layout", [False, True]):
                    opts["prune_ort_layout"] = True
                per_layer["prune_group_ratios"] = {
                    k: float(v) for k, v in (i.rsplit("=", 1) for i in spec.split(","))}
    lowrank = False
    if "lowrank" in problem.space:
        lr = round(trial.suggest_float("lowrank_flops", 0.0, 0.4, step=0.1), 4)
        if lr > 0:
            lowrank = True
            passes.append("lowrank")
            # Multiples of 8: ORT's blocked conv kernels (same reason as prune's rounding).
            opts.update(lowrank_flops=lr, lowrank_multiple=8)
    if "int8" in problem.space:
        precision = trial.suggest_categorical("precision", ["fp32", "int8", "int4"])
        if precision in ("int8", "int4"):
            passes.append("int8")
            opts["int8_calibrator"] = trial.suggest_categorical(
                "calibrator", ["minmax", "percentile", "entropy", "mse"])
            order = prof.get("int8", {}).get("order", [])
            floats: list = []
            if order and not lowrank:
                k = trial.suggest_int("float_layers", 0, min(MAX_FLOAT_LAYERS, len(order)))
                if k:
                    floats = order[:k]
                    opts["keep_float"] = ",".join(floats)
                    per_layer["float_layers"] = floats
            if precision == "int4":
                weighted = [n for n in prof.get("int8", {}).get("weighted", [])
                            if n not in floats]
                if lowrank or not weighted:
                    opts["int4_weights"] = "all"
                else:
                    # weighted is most sensitive first: the head keeps 8-bit weights.
                    k8 = trial.suggest_int("int8_layers", 0,
                                           min(MAX_INT8_LAYERS, len(weighted) - 1))
                    four = weighted[k8:]
                    opts["int4_weights"] = ",".join(four)
                    per_layer["int4_layers"] = four
                    if k8:
                        per_layer["int8_weight_layers"] = weighted[:k8]
                # Learned rounding matters at 4 bits (ResNet-56: drop 1.18 -> -0.2 pt).
                if trial.suggest_categorical("adaround", [False, True]):
                    opts.update(int8_adaround=True, int8_adaround_iters=ADAROUND_ITERS)
    return passes, opts, per_layer


def evaluate(problem: Problem, passes: list, opts: dict) -> dict:
    """Compress, score and time one candidate."""
    t0 = time.perf_counter()
    res = problem.compress(passes, opts)
    acc = res.report["accuracy"]
    model = res.graph.to_onnx().SerializeToString()
    orig_ms, cand_ms = latency_pair(problem.original_bytes, model, problem.feeds,
                                    problem.args.threads)
    size = int(res.report.get("storage_bytes") or res.report["final"]["bytes"])
    return {"top1": acc["final_top1"], "original_top1": acc["original_top1"],
            "drop": acc["drop"], "latency_ms": round(cand_ms, 3),
            "original_ms": round(orig_ms, 3), "speedup": round(orig_ms / cand_ms, 4),
            "bytes": size, "original_bytes": int(res.report["original"]["bytes"]),
            "cr": round(res.report["original"]["bytes"] / max(size, 1), 4),
            "macs": int(res.report["final"]["macs"]),
            "original_macs": int(res.report["original"]["macs"]),
            "params": int(res.report["final"]["params"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def cost(metrics: dict, objective: str) -> float:
    if objective == "latency":
        return metrics["latency_ms"] / metrics["original_ms"]   # relative: load cancels
    if objective == "size":
        return float(metrics["bytes"])
    return float(metrics["macs"])


# ----------------------------------------------------------------------------------------
# Study


def storage_url(args) -> str:
    if args.storage:
        return args.storage
    return "sqlite:///" + os.path.join(os.path.abspath(args.output), "search.db")


def open_study(args, problem: Problem, log):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage_url(args)
    if url.startswith("sqlite:"):
        # Workers share the file: wait for a writer's lock instead of failing at once.
        kwargs = {"connect_args": {"timeout": 120}}
    else:
        kwargs = {"pool_pre_ping": True}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:
        raise UsageError(f"--storage {url}: cannot open it "
                         f"({str(exc).strip().splitlines()[0][:200]})") from None
    from onnxc.recipe import sha256_file

    settings = {"version": STUDY_VERSION, "model_sha256": sha256_file(args.model),
                "objective": args.objective, "max_drop": args.max_drop,
                "space": problem.space, "criteria": problem.criteria,
                "accuracy": problem.accuracy_kind, "batch": args.batch}
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study in existing and not args.resume:
        raise UsageError(f"a search '{args.study}' already exists in {url}: --resume "
                         "continues it, or choose another -o / --study")
    if args.study not in existing and args.resume:
        raise UsageError(f"--resume: no search '{args.study}' in {url} to continue")
    n_before = 0
    if args.resume:
        study = optuna.load_study(study_name=args.study, storage=storage)
        old = study.user_attrs.get("settings", {})
        # (criteria: Optuna's categorical choices cannot change within a study)
        for key in ("model_sha256", "objective", "max_drop", "space", "criteria", "batch"):
            if key in old and old[key] != settings[key]:
                raise UsageError(f"--resume: this search was started with {key} "
                                 f"{old[key]!r}, not {settings[key]!r}")
        n_before = len(study.trials)
    # A worker joining a study gets its own seed, so it does not propose what the
    # others are proposing at the same moment (constant_liar covers running trials).
    seed = args.seed if not args.resume else args.seed + n_before + os.getpid() % 9973
    sampler = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=4, constant_liar=True)
    study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler,
                                directions=["maximize", "minimize"], load_if_exists=True)
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    return study, n_before


def seed_trials(study, prof: dict, problem: Problem) -> None:
    """Starting points a person would try first, the likeliest winner for the objective
    first (a 30-minute search on 2 cores runs only a handful of trials): see the
    module docstring."""
    seeds = []
    int8 = "int8" in problem.space
    prune = "prune" in problem.space and prof.get("prune")
    base = {"lowrank_flops": 0.0} if "lowrank" in problem.space else {}
    if prune:
        base.update(prune_flops=0.0, prune_params=0.0)
    crit = "thinet" if "thinet" in problem.criteria else problem.criteria[0]
    int4 = dict(precision="int4", calibrator="minmax", float_layers=0, int8_layers=0,
                adaround=True)
    plain = dict(precision="int8", calibrator="minmax", float_layers=0)
    light = dict(prune_flops=0.1, prune_params=0.2, prune_criterion=crit,
                 prune_multiple=16, prune_ort_layout=False,
                 prune_allocation="criterion") if prune else {}
    if int8:
        # 4-bit weights + AdaRound first: the same speed as int8 at half its size, and
        # within 0.2 pt on ResNet-56 (docs/quantization.md) - a feasible start for both
        # objectives; then what else each objective needs.
        seeds.append(dict(base, **int4))
    if problem.args.objective == "size" and int8:
        for share in size_seed_shares(prof.get("int8", {})) if prune else []:
            seeds.append(dict(base, prune_params=share, prune_criterion=crit,
                              prune_multiple=8, prune_ort_layout=False,
                              prune_allocation="criterion", **int4))
    if int8:
        seeds.append(dict(base, **plain))
        if light and problem.args.objective != "size":
            seeds += [dict(base, **light, **int4), dict(base, **light, **plain)]
        fb = len(prof.get("int8", {}).get("fallback", []))
        if 0 < fb <= MAX_FLOAT_LAYERS:
            seeds.append(dict(base, precision="int8", calibrator="minmax", float_layers=fb))
    elif light:
        seeds.append(dict(base, **light))
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)


def size_seed_shares(int8_profile: dict) -> list:
    """Parameter shares to prune so that the model with 4-bit weights reaches each Cr of
    SIZE_SEED_CR: from the int8 profile's size B8 and parameter count P, 4-bit weights
    save P/2 bytes and pruning a share p of the parameters saves p·P/2 more (the fixed
    part — graph, scales, biases — is left out, so the estimate is slightly low; shares
    are rounded up to the search's 0.05 steps)."""
    b8, params = int8_profile.get("bytes"), int8_profile.get("params")
    orig = int8_profile.get("original_bytes")
    if not (b8 and params and orig):
        return []
    shares = []
    for cr in SIZE_SEED_CR:
        p = (b8 - params / 2 - orig / cr) / (params / 2)
        p = min(0.7, max(0.0, math.ceil(p / 0.05 - 1e-9) * 0.05))
        if p > 0 and round(p, 4) not in shares:
            shares.append(round(p, 4))
    return shares


def run_trial(study, problem: Problem, prof: dict, log) -> dict | None:
    import optuna

    trial = None
    try:
        with STOP.storage():        # (suggest_* write to the storage too)
            trial = study.ask()
            passes, opts, per_layer = suggest(trial, problem, prof)
        m = evaluate(problem, passes, opts)
    except KeyboardInterrupt:
        if trial is not None:
            with STOP.storage():
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as exc:       # a candidate that fails is reported, never fatal
        if trial is None:          # the storage itself failed
            raise
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        try:
            with STOP.storage():
                trial.set_user_attr("error", f"{type(exc).__name__}: {msg}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass                   # another worker ran it too (see below)
        log(f"trial {trial.number}: failed ({type(exc).__name__}: {msg})")
        return None
    try:
        with STOP.storage():
            dropped = _record(study, trial, problem, m, passes, opts, per_layer)
    except optuna.exceptions.UpdateFinishedTrialError:
        # SQLite has no row locks: two workers asking at the same moment can both pop
        # the same enqueued trial. The first to finish records it; the other's
        # identical result is dropped rather than ending its worker.
        log(f"trial {trial.number}: another worker ran it too and recorded it first; "
            "this result is dropped")
        return None
    log(f"trial {trial.number}: {'+'.join(passes[1:]) or 'fold_bn'} {describe(opts)}: "
        f"top-1 {m['top1']:.2f}% (drop {m['drop']:+.2f}), {m['speedup']:.2f}x faster, "
        f"Cr {m['cr']:.2f}x, {m['seconds']:.0f} s"
        + (" - dropped: slower than the original" if dropped else "")
        + (" - over the bound" if m["drop"] > problem.args.max_drop else ""))
    return m


def _record(study, trial, problem, m, passes, opts, per_layer) -> bool:
    """A finished candidate's metrics and choices into the study; whether it is dropped
    (slower than the original)."""
    args = problem.args
    dropped = m["latency_ms"] > m["original_ms"]
    trial.set_user_attr("metrics", m)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("passes", passes)
    trial.set_user_attr("options", opts)
    trial.set_user_attr("per_layer", per_layer)
    trial.set_user_attr("dropped", "slower than the original" if dropped else "")
    # <= 0 is feasible (c-TPE reads them): the accuracy bound, not slower than the original.
    trial.set_constraint("accuracy_drop", m["drop"] - args.max_drop)
    trial.set_constraint("slower", m["latency_ms"] / m["original_ms"] - 1.0)
    study.tell(trial, [m["top1"], cost(m, args.objective)])
    return dropped


def describe(opts: dict) -> str:
    parts = []
    if "prune_group_ratios" in opts:
        n = len(opts["prune_group_ratios"].split(","))
        parts.append(f"prune {opts['prune_criterion']} {n} groups")
    elif "prune_criterion" in opts:
        budgets = " ".join(f"{k.split('_')[1]} {opts[k]}" for k in ("prune_flops",
                                                                  "prune_params") if k in opts)
        parts.append(f"prune {opts['prune_criterion']} {budgets}")
    if "lowrank_flops" in opts:
        parts.append(f"lowrank {opts['lowrank_flops']}")
    if "int8_calibrator" in opts:
        kf = len(opts.get("keep_float", "").split(",")) if opts.get("keep_float") else 0
        parts.append(f"int8 {opts['int8_calibrator']}" + (f" {kf} float" if kf else ""))
        if opts.get("int4_weights"):
            n4 = "all" if opts["int4_weights"] == "all" \
                else len(opts["int4_weights"].split(","))
            parts.append(f"int4 weights {n4} layers"
                         + (" adaround" if opts.get("int8_adaround") else ""))
    return ", ".join(parts) or "fp32"


# ----------------------------------------------------------------------------------------
# Results


def finished(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.COMPLETE,))
            if "metrics" in t.user_attrs]


def choose(trials: list, objective: str, max_drop: float):
    """(chosen trial, met): cheapest within the bound and not slower than the original;
    else the most accurate candidate that is not slower (met False). For latency,
    candidates within LATENCY_TIE of the fastest count as equally fast (the timing of
    one trial is not finer than that on a shared machine) and the smallest of them is
    chosen: int8 and int4 weights run the same kernels, and which one timed 1 % faster
    is noise, not a reason to ship the bigger file."""
    ok = [t for t in trials if not t.user_attrs.get("dropped")]
    feasible = [t for t in ok if t.user_attrs["metrics"]["drop"] <= max_drop]
    if feasible:
        if objective == "latency":
            fastest = min(cost(t.user_attrs["metrics"], objective) for t in feasible)
            feasible = [t for t in feasible if cost(t.user_attrs["metrics"], objective)
                        <= fastest * (1 + LATENCY_TIE)]
            return min(feasible, key=lambda t: (t.user_attrs["metrics"]["bytes"],
                                                cost(t.user_attrs["metrics"], objective),
                                                t.number)), True
        return min(feasible, key=lambda t: (cost(t.user_attrs["metrics"], objective),
                                            -t.user_attrs["metrics"]["top1"], t.number)), True
    pool = ok or trials
    if not pool:
        return None, False
    return max(pool, key=lambda t: (t.user_attrs["metrics"]["top1"], -t.number)), False


def pareto(points: list) -> list:
    """Indices of the non-dominated (accuracy up, cost down) points."""
    front = []
    for i, (a, c) in enumerate(points):
        if not any((a2 >= a and c2 <= c) and (a2 > a or c2 < c) for a2, c2 in points):
            front.append(i)
    return front


def write_outputs(study, problem: Problem, log) -> dict:
    from onnxc import recipe as recipes

    args = problem.args
    out = os.path.abspath(args.output)
    trials = finished(study)
    chosen, met = choose(trials, args.objective, args.max_drop)
    ok = [t for t in trials if not t.user_attrs.get("dropped")]
    front = [ok[i] for i in pareto([(t.user_attrs["metrics"]["top1"],
                                     cost(t.user_attrs["metrics"], args.objective))
                                    for t in ok])]

    def row(t):
        return {"trial": t.number, "passes": t.user_attrs["passes"],
                "options": t.user_attrs["options"], "search_params": t.params,
                "dropped": t.user_attrs.get("dropped") or None,
                "within_bound": t.user_attrs["metrics"]["drop"] <= args.max_drop,
                **t.user_attrs["metrics"]}

    summary = {
        "objective": args.objective, "max_drop": args.max_drop,
        "accuracy": problem.accuracy_kind,
        "latency": f"ONNX Runtime CPU, batch {args.batch}, {args.threads} threads, "
                   "median of 7 interleaved runs after 2 warm-up runs, spinning off",
        "trials_finished": len(trials), "trials_total": len(study.trials),
        "chosen": chosen.number if chosen else None, "met_bound": met,
        "pareto_front": sorted((row(t) for t in front), key=lambda r: -r["top1"]),
        "trials": [row(t) for t in trials],
    }
    _write_json(os.path.join(out, "pareto.json"), summary)
    plot(summary, os.path.join(out, "pareto.png"))
    if chosen is None:
        log("no trial finished: nothing to save (pareto.json lists none)")
        return summary
    passes, opts = chosen.user_attrs["passes"], chosen.user_attrs["options"]
    log(f"building the chosen model (trial {chosen.number}) into {out}/model ...")
    res = problem.compress(passes, opts, out_dir=os.path.join(out, "model"))
    m = chosen.user_attrs["metrics"]
    rec = recipes.make(
        args.model, passes, opts, target=args.target,
        calib_data=args.calib_data, calib_samples=args.calib_samples,
        eval_data=args.eval_data, eval_samples=args.eval_samples,
        preprocess=problem.preprocess, input_shapes=args.input_shape, seed=args.seed,
        per_layer=chosen.user_attrs.get("per_layer", {}),
        search={"objective": args.objective, "max_drop": args.max_drop,
                "met_bound": met, "trial": chosen.number, "accuracy": problem.accuracy_kind,
                "metrics": m, "artifact_top1": (res.report.get("accuracy") or {}).get(
                    "final_top1")})
    recipes.write(os.path.join(out, "recipe.yaml"), rec)
    summary["chosen_artifact"] = os.path.join(out, "model")
    return summary


def _write_json(path: str, data) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"     # workers of one study may write at once
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["trials"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("speedup", "ORT speed-up vs the original (×)"),
              ("cr", "compression ratio Cr (×)"))
    for ax, (key, label) in zip(axes, panels):
        ok = [r for r in rows if not r["dropped"]]
        bad = [r for r in rows if r["dropped"]]
        ax.scatter([r[key] for r in ok], [r["top1"] for r in ok], s=18, c="0.6",
                   label="candidates")
        if bad:
            ax.scatter([r[key] for r in bad], [r["top1"] for r in bad], s=18, c="0.6",
                       marker="x", label="dropped (slower)")
        idx = pareto([(r["top1"], -r[key]) for r in ok])
        fr = sorted((ok[i] for i in idx), key=lambda r: r[key])
        if fr:
            ax.plot([r[key] for r in fr], [r["top1"] for r in fr], "-o", c="tab:blue",
                    ms=4, label="Pareto front")
        if rows:
            ref = rows[0]["original_top1"]
            ax.axhline(ref, c="k", lw=0.8, ls=":", label="original")
            ax.axhline(ref - summary["max_drop"], c="tab:red", lw=0.8, ls="--",
                       label=f"bound (−{summary['max_drop']} pt)")
        ch = [r for r in rows if r["trial"] == summary["chosen"]]
        if ch:
            ax.scatter([ch[0][key]], [ch[0]["top1"]], s=160, marker="*", c="tab:orange",
                       edgecolors="k", zorder=5, label=f"chosen (trial {ch[0]['trial']})")
        if rows:
            # Zoom on the bound: candidates far below it (a collapsed model at ~10 %)
            # would squash the interesting part into one line.
            low = ref - max(10.0, 5 * summary["max_drop"])
            hidden = sum(r["top1"] < low for r in rows)
            ax.set_ylim(max(low, min(r["top1"] for r in rows) - 0.5), max(ref, max(
                r["top1"] for r in rows)) + 0.5)
            if hidden:
                ax.text(0.01, 0.01, f"{hidden} candidate(s) below {low:.1f} % not shown",
                        transform=ax.transAxes, fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"onnxc search, objective {summary['objective']}: {summary['accuracy']}",
                 fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------


def handler(args) -> int:
    from onnxc.compress import check_output_dir

    started = time.perf_counter()
    deadline = started + 60.0 * args.minutes
    check_output_dir(args.output)
    try:
        os.makedirs(os.path.abspath(args.output), exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {args.output}: {exc.strerror}") from None

    def log(msg):
        print(msg, file=sys.stderr)

    import signal

    # a scheduler's TERM stops like Ctrl-C and still saves (see _StopSignals)
    previous = {sig: signal.signal(sig, STOP) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _search(args, started, deadline, log)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _search(args, started, deadline, log_line) -> int:
    bar = None

    def log(msg):
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            log_line(msg)

    problem = Problem(args, log)
    study, n_before = open_study(args, problem, log)
    log(f"onnxc search: {args.model}, objective {args.objective}, bound {args.max_drop} pt "
        f"of {problem.accuracy_kind}; storage {storage_url(args)}"
        + (f" (resuming: {n_before} trials so far)" if args.resume else ""))
    prof = problem.profiles(study)
    if not args.resume:
        seed_trials(study, prof, problem)

    from tqdm import tqdm

    if not args.quiet and sys.stderr.isatty():
        bar = tqdm(total=round(deadline - started), unit="s", file=sys.stderr,
                   desc="search", bar_format="{desc}: {bar:20} {n_fmt}/{total_fmt} s "
                   "{postfix}", mininterval=1.0)
    durations: list = []
    interrupted = False
    try:
        while True:
            now = time.perf_counter()
            if bar is not None:
                bar.n = min(round(now - started), bar.total)
                bar.refresh()
            if args.trials is not None and len(finished(study)) >= args.trials:
                break
            # Start a trial only if it and building the chosen model (about one more
            # trial) fit in what is left.
            typical = statistics.median(durations) if durations else 0.0
            if now + 2.2 * typical > deadline or now >= deadline:
                break
            t0 = time.perf_counter()
            run_trial(study, problem, prof, log)
            durations.append(time.perf_counter() - t0)
            best, met = choose(finished(study), args.objective, args.max_drop)
            if best is not None:
                m = best.user_attrs["metrics"]
                text = (f"best{'' if met else ' (bound not met)'}: trial {best.number} "
                        f"top-1 {m['top1']:.2f} ({m['drop']:+.2f}) {m['speedup']:.2f}x "
                        f"Cr {m['cr']:.2f}x")
                if bar is not None:
                    bar.set_postfix_str(text, refresh=True)
                elif not args.quiet:
                    log(f"  [{now - started + durations[-1]:.0f}/{deadline - started:.0f} s] "
                        + text)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: saving the best candidate found so far")
    finally:
        if bar is not None:
            bar.close()
            bar = None
    # Workers of one study on this machine share DIR: one writes the outputs at a time
    # (the artifact's swap into DIR/model is atomic, but not two swaps at once).
    import fcntl

    with open(os.path.join(os.path.abspath(args.output), ".outputs.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = write_outputs(study, problem, log)
    chosen = next((r for r in summary["trials"] if r["trial"] == summary["chosen"]), None)
    print(f"{summary['trials_finished']} trials finished ({summary['trials_total']} in the "
          f"study), {time.perf_counter() - started:.0f} s; accuracy: "
          f"{problem.accuracy_kind}")
    if chosen is None:
        print("no candidate finished: nothing saved")
        return 130 if interrupted else 1
    if not summary["met_bound"]:
        print(f"NO candidate met --max-drop {args.max_drop}: saved the most accurate one "
              f"(drop {chosen['drop']:.2f} pt)")
    print(f"chosen: trial {chosen['trial']}: {'+'.join(chosen['passes'])} "
          f"{describe(chosen['options'])}")
    print(f"top-1 {chosen['original_top1']:.2f}% -> {chosen['top1']:.2f}% (drop "
          f"{chosen['drop']:.2f} pt); ORT bs {args.batch} {chosen['original_ms']:.1f} -> "
          f"{chosen['latency_ms']:.1f} ms (speed-up {chosen['speedup']:.2f}x); size "
          f"{chosen['original_bytes']:,} -> {chosen['bytes']:,} B (Cr {chosen['cr']:.2f}x); "
          f"MACs {chosen['original_macs']:,} -> {chosen['macs']:,}")
    out = os.path.abspath(args.output)
    print(f"written: {out}/pareto.json, {out}/pareto.png, {out}/recipe.yaml, {out}/model/")
    return 130 if interrupted else 0


register_command("search", configure)(handler)
