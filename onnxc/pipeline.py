"""Pass contract, registry, context and pass manager.

Modelled on TVM's ``tvm.transform`` (a pass is a named first-class object with
declared requirements, run under a context), Olive's per-pass config (declared,
typed options; see ``options.py``) and onnxslim's pattern registry (one file per
pass, registered by a decorator). Adding a pass means writing one file in
``passes/`` with a ``@register_pass`` class and importing it in
``passes/__init__.py``. docs/ARCHITECTURE.md has the whole flow.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import BackendError, ModelError, UsageError, VerificationError
from .ir import Graph
from .options import Config, Configurable, Option, configure, declare  # noqa: F401  (Option: for pass files)

# ----------------------------------------------------------------------------------------
# Reports


@dataclass
class PassReport:
    """What one pass did: counts before/after, error vs its input, notes, skips."""

    name: str
    exact: bool
    seconds: float = 0.0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    error: dict | None = None
    changed: int = 0                       # rewrites applied (layers folded, pruned, ...)
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # [{"node": name, "reason": why}]
    extra: dict = field(default_factory=dict)     # pass-specific figures for report.json
    # Extra files the backend writes into the artifact (e.g. packed 2-bit weights).
    files: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)    # every option the pass used, defaults too

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append({"node": node, "reason": reason})

    def as_dict(self) -> dict:
        return {"name": self.name, "exact": self.exact, "seconds": round(self.seconds, 4),
                "before": self.before, "after": self.after, "error": self.error,
                "changed": self.changed, "notes": self.notes, "skipped": self.skipped,
                "extra": self.extra, "files": sorted(self.files), "config": self.config}


# ----------------------------------------------------------------------------------------
# Context


class Context:
    """Data, settings and the reference model shared by all passes of one run.

    Pass options are not here: each pass reads its own typed ``self.config``."""

    def __init__(self, seed: int = 0, calibration=None, evaluation=None,
                 original: Graph | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = True, calib_samples: int | None = None,
                 preprocess=None):
        self.seed = seed
        self.calibration = calibration      # calibrate.readers.Dataset or None
        self.evaluation = evaluation        # labelled Dataset or None
        self.original = original            # input of the pipeline (teacher, reference)
        self.progress = progress
        self.calib_samples = calib_samples  # --calib-samples: cap for calibration passes
        # --scale/--mean/--std/--layout (calibrate.readers.Preprocess), for passes that
        # read their own data files (recover's --recover-data).
        self.preprocess = preprocess
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._warned: set = set()
        self._memo: dict = {}

    def log(self, msg: str) -> None:
        self._log(msg)

    def warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._log(f"warning: {msg}")

    def memo(self, key, make: Callable):
        """``make()`` once per run: a file a pass loads in validate and again in run."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + salt)

    def calibration_data(self, graph: Graph, samples: int | None = None):
        """Calibration dataset; falls back to seeded random inputs with a loud warning."""
        from onnxc.calibrate.readers import random_dataset

        if self.calibration is not None:
            if samples is None or samples >= len(self.calibration):
                return self.calibration      # a pass asking for more gets what there is
            return self.calibration.take(samples)
        n = samples or self.calib_samples or 64
        self.synthetic_calibration = True     # the artifact's README and report say so
        self.warn(RANDOM_DATA_WARNING)
        return random_dataset(graph, n, seed=self.seed)


RANDOM_DATA_WARNING = ("no --calib-data given: calibrating on seeded RANDOM inputs; "
                       "accuracy of data-driven passes will suffer")


# ----------------------------------------------------------------------------------------
# Requirements: what a pass or backend needs from the rest of the run


@dataclass(frozen=True)
class Plan:
    """What a run is about to do; requirements are checked against it before any pass."""

    passes: list             # configured Pass instances, in run order
    backend: object | None   # configured Backend instance, or None outside compress
    ctx: Context
    graph: Graph | None = None   # the input graph

    def find(self, name: str):
        return next((p for p in self.passes if p.name == name), None)


class Requirement:
    """``check(plan, owner)`` returns None when met, else one line saying what is missing
    (a UsageError; or it raises a more specific OnnxcError itself), or warns through
    ``plan.ctx`` when the need is soft."""

    def check(self, plan: Plan, owner) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class CalibrationData(Requirement):
    """Calibration data (``--calib-data``). ``when(config)`` says whether this config needs
    it; without it, ``fallback="random"`` warns and runs on seeded random inputs,
    ``fallback=None`` is an error carrying ``message``."""

    when: Callable | None = None
    fallback: str | None = "random"
    message: str = ""

    def check(self, plan, owner):
        if plan.ctx.calibration is not None or (self.when and not self.when(owner.config)):
            return None
        if self.fallback == "random":
            plan.ctx.warn(RANDOM_DATA_WARNING)
            return None
        return self.message or f"{owner.name} needs calibration data: give --calib-data FILE"


@dataclass(frozen=True)
class PassWith(Requirement):
    """The run includes pass ``name`` with these option values (when it runs at all, or
    always with ``present=True``); ``hint`` tells the user what to add."""

    name: str
    settings: tuple = ()       # ((dest, allowed values), ...)
    hint: str = ""
    present: bool = False

    def check(self, plan, owner):
        p = plan.find(self.name)
        if p is None:
            if self.present:
                return f"{_kind(owner)} '{owner.name}' needs the {self.name} pass: {self.hint}"
            return None
        bad = [(dest, allowed) for dest, allowed in self.settings
               if p.config[dest] not in allowed]
        if not bad:
            return None
        flags = {opt.dest: opt.flag for opt in p.options}

        def shown(dest, values):
            if all(isinstance(v, bool) for v in values):
                return flags[dest] if values[0] else f"no {flags[dest]}"
            return f"{flags[dest]} {'/'.join(map(str, values))}"
        want = ", ".join(shown(d, allowed) for d, allowed in bad)
        # A missing switch says it all; a wrong choice names what was given.
        got = ", ".join(shown(d, (p.config[d],)) for d, allowed in bad
                        if not all(isinstance(v, bool) for v in allowed))
        return (f"{_kind(owner)} '{owner.name}' needs {self.name} with {want}"
                + (f" (given: {got})" if got else "")
                + (f": {self.hint}" if self.hint else ""))


def _kind(owner) -> str:
    return "pass" if isinstance(owner, Pass) else "target"


def check_requirements(plan: Plan) -> None:
    """Every pass's and the backend's requirements, before any pass runs."""
    # The backend first: its errors come before the passes' warnings.
    owners = ([plan.backend] if plan.backend is not None else []) + list(plan.passes)
    for owner in owners:
        for req in owner.requires:
            problem = req.check(plan, owner)
            if problem:
                raise UsageError(problem)


# ----------------------------------------------------------------------------------------
# Pass contract and registry


class Pass(Configurable):
    """Base class of every onnxc pass.

    Subclasses set ``name`` (the CLI name), ``summary`` (one line for
    ``onnxc passes``), ``order`` (canonical position), ``exact`` (the verifier
    then requires output error ≤ tolerance), ``options`` (declared ``Option``s),
    ``requires`` (``Requirement``s checked before any pass runs), ``conflicts`` and
    implement :meth:`run`, reading options from ``self.config``.

    An instance is one configured application of the pass: it holds its frozen
    config and nothing else, so two runs never share state.
    """

    kind = "pass"

    name: str = ""
    summary: str = ""
    order: int = 100
    exact: bool = False
    options: tuple = ()
    requires: tuple = ()
    conflicts: tuple = ()

    def validate(self, ctx: Context) -> None:
        """Check option combinations before any pass runs; raise UsageError with one line."""

    def run(self, graph: Graph, ctx: Context, report: PassReport) -> Graph:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in PASSES:
        raise RuntimeError(f"pass name missing or registered twice: {cls.name!r}")
    declare(f"pass '{cls.name}'", cls.options)
    PASSES[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    import onnxc.passes  # noqa: F401  (registers every pass)

    return dict(sorted(PASSES.items(), key=lambda kv: (kv[1].order, kv[0])))


def resolve_passes(names: list[str], options: Mapping | None = None) -> list[Pass]:
    """Configured passes by CLI name in canonical order; rejects unknown/conflicting sets.

    ``options`` holds raw values by key for any pass (each takes its own)."""
    registry = all_passes()
    wanted = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name not in registry:
            close = [n for n in registry if fnmatch.fnmatch(n, f"*{name[:3]}*")]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"unknown pass '{name}'{hint}; see 'onnxc passes'")
        if name not in wanted:
            wanted.append(name)
    for name in wanted:
        for other in registry[name].conflicts:
            if other in wanted:
                raise UsageError(f"passes '{name}' and '{other}' cannot be combined")
    if "cleanup" not in wanted:
        wanted.insert(0, "cleanup")
    return [registry[n](registry[n].configure(options))
            for n in sorted(wanted, key=lambda n: (registry[n].order, n))]


# ----------------------------------------------------------------------------------------
# Pass manager


@dataclass
class PipelineResult:
    """What :meth:`PassManager.run` produced."""

    graph: Graph
    reports: list
    original_stats: object = None         # ir.Stats of the input graph
    final_stats: object = None
    original_outputs: list | None = None  # verifier outputs (None without verification)
    final_outputs: list | None = None
    verifier: object = None


class PassManager:
    """Runs passes in order, verifying each against its own input graph."""

    def __init__(self, passes: list[Pass], tolerance: float = 1e-5, verify: bool = True,
                 backend=None):
        self.passes = passes
        self.tolerance = tolerance
        self.verify = verify
        self.backend = backend

    def check(self, ctx: Context, graph: Graph | None = None) -> None:
        """Requirements and options of the backend and every pass, before any pass runs."""
        check_requirements(Plan(self.passes, self.backend, ctx, graph))
        if self.backend is not None:
            self.backend.validate(ctx)
        for p in self.passes:
            p.validate(ctx)

    def run(self, graph: Graph, ctx: Context) -> PipelineResult:
        from .verify import Verifier, compare_outputs

        self.check(ctx, graph)
        verifier = Verifier.for_context(graph, ctx) if self.verify else None
        reports = []
        current = graph
        model = previous = current.to_onnx()   # one export per graph: size, verification
        original_stats = stats = current.stats(model_bytes=model.ByteSize())
        # Each graph runs once: a pass's output outputs are the next pass's reference.
        try:
            original_outputs = reference = verifier.outputs(model) if verifier else None
        except BackendError as exc:
            # Nothing has been rewritten yet: a model ORT cannot run is the input's
            # fault (weights of the wrong size, bad attributes the checker lets through).
            raise ModelError(f"the input model does not run: {exc}") from exc
        for p in self.passes:
            report = PassReport(p.name, p.exact, before=stats.as_dict(),
                                config=p.config.as_dict())
            start = time.perf_counter()
            result = p.run(current, ctx, report) or current
            result.refresh()
            report.seconds = time.perf_counter() - start
            model = result.to_onnx()
            stats = result.stats(model_bytes=model.ByteSize())
            report.after = stats.as_dict()
            if verifier is not None:
                # An unchanged graph (same protobuf) needs no second run.
                outputs = reference if model == previous else verifier.outputs(model)
                cmp = compare_outputs(reference, outputs, len(verifier.dataset))
                reference = outputs
                report.error = cmp.as_dict()
                if cmp.mismatch:
                    raise VerificationError(f"pass '{p.name}' changed the outputs' shape: "
                                            f"{cmp.mismatch}")
                if p.exact and cmp.max_rel > self.tolerance:
                    raise VerificationError(
                        f"pass '{p.name}' is exact but changed the outputs "
                        f"(max relative error {cmp.max_rel:.2e} > {self.tolerance:.0e})")
            ctx.log(f"  {p.name:<10} nodes {report.before['nodes']}->{report.after['nodes']}"
                    f"  params {report.before['params']}->{report.after['params']}"
                    f"  MACs {report.before['macs']}->{report.after['macs']}"
                    + (f"  err {report.error['max_rel']:.2e}" if report.error else ""))
            reports.append(report)
            current, previous = result, model
        return PipelineResult(current, reports, original_stats, stats, original_outputs,
                              reference, verifier)
