"""Backends: turn the final graph into a deployable artifact directory.

A backend is one file (or package) here with a ``Backend`` subclass decorated by
``@register_backend``, like a pass; it is imported in :func:`_import_all`. It declares
``options`` (read from ``self.config``) and ``requires`` (checked before any pass
runs). ``build`` writes into a temporary directory that the artifact writer renames
into place only on success; ``artifact_marker`` and ``load_artifact`` say how
``onnxc run`` finds and opens what it wrote (:mod:`onnxc.backends.artifact`).
"""

from __future__ import annotations

from collections.abc import Mapping

from onnxc.options import Config, Configurable, Option, configure, declare  # noqa: F401  (re-exports)

BACKENDS: dict = {}


class Backend(Configurable):
    kind = "target"
    name: str = ""
    summary: str = ""
    options: tuple = ()
    # Compilers (TVM, VTA) need every dim but the batch fixed (--input-shape); a
    # runtime target keeps the input model's symbolic dims in its artifact.
    static_shapes: bool = True
    requires: tuple = ()
    # A file (relative to the artifact directory) only this backend's artifacts hold;
    # None: its artifacts are plain ``model.onnx`` ones (see backends/artifact.py).
    artifact_marker: str | None = None

    @classmethod
    def load_artifact(cls, path: str):
        """Open an artifact directory this backend wrote (``onnxc run`` / ``bench``)."""
        raise NotImplementedError

    def validate(self, ctx) -> None:
        """Check option combinations / toolchain before any pass runs."""

    def build(self, graph, ctx, out_dir: str, report: dict) -> None:
        """Write target files into ``out_dir`` and add figures to ``report``."""
        raise NotImplementedError


def register_backend(cls):
    if not cls.name or cls.name in BACKENDS:
        raise RuntimeError(f"backend name missing or registered twice: {cls.name!r}")
    declare(f"target '{cls.name}'", cls.options)
    BACKENDS[cls.name] = cls
    return cls


def all_backends() -> dict:
    _import_all()
    return dict(BACKENDS)


def get_backend(name: str, options: Mapping | None = None):
    """The configured backend ``name``; ``options`` holds raw values by key."""
    from onnxc.errors import UsageError

    backends = all_backends()
    if name not in backends:
        raise UsageError(f"unknown target '{name}' (targets: {', '.join(sorted(backends))})")
    cls = backends[name]
    return cls(cls.configure(options))


def _import_all():
    from . import onnx_runtime, tvm, vta  # noqa: F401  (registers every backend)
