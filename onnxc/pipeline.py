"""Pass contract, registry, context and pass manager.

Modelled on TVM's ``tvm.transform`` (a pass is a named first-class object with
requirements and options read from a context) and onnxslim's pattern registry
(one file per pass, registered by a decorator). Adding a pass means writing one
file in ``passes/`` with a ``@register_pass`` class and importing it in
``passes/__init__.py``.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import BackendError, ModelError, UsageError, VerificationError
from .ir import Graph

# ----------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Option:
    """A pass option, exposed as a CLI flag and read with ``ctx.option(dest)``.

    ``flag`` is the CLI spelling (``--prune-ratio``); ``dest`` the key in the context.
    """

    flag: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    action: str | None = None      # e.g. "store_true"

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


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

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append({"node": node, "reason": reason})

    def as_dict(self) -> dict:
        return {"name": self.name, "exact": self.exact, "seconds": round(self.seconds, 4),
                "before": self.before, "after": self.after, "error": self.error,
                "changed": self.changed, "notes": self.notes, "skipped": self.skipped,
                "extra": self.extra, "files": sorted(self.files)}


# ----------------------------------------------------------------------------------------
# Context


class Context:
    """Options, data and the reference model shared by all passes of one run."""

    def __init__(self, options: dict | None = None, seed: int = 0,
                 calibration=None, evaluation=None, original: Graph | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True):
        self.options = dict(options or {})
        self.seed = seed
        self.calibration = calibration      # calibrate.readers.Dataset or None
        self.evaluation = evaluation        # labelled Dataset or None
        self.original = original            # input of the pipeline (teacher, reference)
        self.progress = progress
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._warned: set = set()

    def option(self, dest: str, default: Any = None) -> Any:
        value = self.options.get(dest)
        return default if value is None else value

    def log(self, msg: str) -> None:
        self._log(msg)

    def warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._log(f"warning: {msg}")

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + salt)

    def calibration_data(self, graph: Graph, samples: int | None = None):
        """Calibration dataset; falls back to seeded random inputs with a loud warning."""
        from onnxc.calibrate.readers import random_dataset

        if self.calibration is not None:
            if samples is None or samples >= len(self.calibration):
                return self.calibration      # a pass asking for more gets what there is
            return self.calibration.take(samples)
        n = samples or int(self.option("calib_samples", 64))
        self.synthetic_calibration = True     # the artifact's README and report say so
        self.warn("no --calib-data given: calibrating on seeded RANDOM inputs; "
                  "accuracy of data-driven passes will suffer")
        return random_dataset(graph, n, seed=self.seed)


# ----------------------------------------------------------------------------------------
# Pass contract and registry


class Pass:
    """Base class of every onnxc pass.

    Subclasses set ``name`` (the CLI name), ``summary`` (one line for
    ``onnxc passes``), ``order`` (canonical position), ``exact`` (the verifier
    then requires output error ≤ tolerance), ``options``, ``conflicts`` and
    implement :meth:`run`.
    """

    name: str = ""
    summary: str = ""
    order: int = 100
    exact: bool = False
    needs_data: bool = False            # uses calibration data (random fallback warns)
    options: tuple = ()
    conflicts: tuple = ()

    def validate(self, ctx: Context) -> None:
        """Check options before any pass runs; raise UsageError with one line."""

    def run(self, graph: Graph, ctx: Context, report: PassReport) -> Graph:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in PASSES:
        raise RuntimeError(f"pass name missing or registered twice: {cls.name!r}")
    PASSES[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    import onnxc.passes  # noqa: F401  (registers every pass)

    return dict(sorted(PASSES.items(), key=lambda kv: (kv[1].order, kv[0])))


def resolve_passes(names: list[str]) -> list[Pass]:
    """Instantiate passes by CLI name in canonical order; reject unknown/conflicting sets."""
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
    return [registry[n]() for n in sorted(wanted, key=lambda n: (registry[n].order, n))]


# ----------------------------------------------------------------------------------------
# Pass manager


class PassManager:
    """Runs passes in order, verifying each against its own input graph."""

    def __init__(self, passes: list[Pass], tolerance: float = 1e-5, verify: bool = True):
        self.passes = passes
        self.tolerance = tolerance
        self.verify = verify

    def run(self, graph: Graph, ctx: Context) -> tuple[Graph, list[PassReport]]:
        from .verify import Verifier, compare_outputs

        for p in self.passes:
            p.validate(ctx)
        self.verifier = Verifier.for_context(graph, ctx) if self.verify else None
        reports = []
        current = graph
        model = previous = current.to_onnx()   # one export per graph: size, verification
        self.original_stats = stats = current.stats(model_bytes=model.ByteSize())
        # Each graph runs once: a pass's output outputs are the next pass's reference.
        try:
            self.original_outputs = reference = \
                self.verifier.outputs(model) if self.verifier else None
        except BackendError as exc:
            # Nothing has been rewritten yet: a model ORT cannot run is the input's
            # fault (weights of the wrong size, bad attributes the checker lets through).
            raise ModelError(f"the input model does not run: {exc}") from exc
        for p in self.passes:
            report = PassReport(p.name, p.exact, before=stats.as_dict())
            start = time.perf_counter()
            result = p.run(current, ctx, report) or current
            result.refresh()
            report.seconds = time.perf_counter() - start
            model = result.to_onnx()
            stats = result.stats(model_bytes=model.ByteSize())
            report.after = stats.as_dict()
            if self.verifier is not None:
                # An unchanged graph (same protobuf) needs no second run.
                outputs = reference if model == previous else self.verifier.outputs(model)
                cmp = compare_outputs(reference, outputs)
                reference = outputs
                report.error = cmp.as_dict()
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
        self.final_stats = stats
        self.final_outputs = reference
        return current, reports
