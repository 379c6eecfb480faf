"""Backends: turn the final graph into a deployable artifact directory.

A backend is one file with a ``Backend`` subclass decorated by
``@register_backend``; import it below. ``build`` writes into a temporary
directory that the artifact writer renames into place only on success;
``artifact_marker`` and ``load_artifact`` say how ``onnxc run`` finds and opens what
it wrote (:mod:`onnxc.backends.artifact`).
"""

from __future__ import annotations

from onnxc.pipeline import Option  # noqa: F401  (re-exported for backend files)

BACKENDS: dict = {}


class Backend:
    name: str = ""
    summary: str = ""
    options: tuple = ()
    # A file (relative to the artifact directory) only this backend's artifacts hold;
    # None: its artifacts are plain ``model.onnx`` ones (see backends/artifact.py).
    artifact_marker: str | None = None

    @classmethod
    def load_artifact(cls, path: str):
        """Open an artifact directory this backend wrote (``onnxc run`` / ``bench``)."""
        raise NotImplementedError

    def validate(self, ctx) -> None:
        """Check options/toolchain before any pass runs."""

    def build(self, graph, ctx, out_dir: str, report: dict) -> None:
        """Write target files into ``out_dir`` and add figures to ``report``."""
        raise NotImplementedError


def register_backend(cls):
    if not cls.name or cls.name in BACKENDS:
        raise RuntimeError(f"backend name missing or registered twice: {cls.name!r}")
    BACKENDS[cls.name] = cls
    return cls


def all_backends() -> dict:
    _import_all()
    return dict(BACKENDS)


def get_backend(name: str):
    from onnxc.errors import UsageError

    backends = all_backends()
    if name not in backends:
        raise UsageError(f"unknown target '{name}' (targets: {', '.join(sorted(backends))})")
    return backends[name]()


def _import_all():
    from . import onnx_runtime  # noqa: F401
    for optional in ("tvm", "vta"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                continue        # backend file not present in this checkout
            raise
