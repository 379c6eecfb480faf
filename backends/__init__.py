"""Backends: turn the final graph into a deployable artifact directory.

A backend is one file with a ``Backend`` subclass decorated by
``@register_backend``; import it below. ``build`` writes into a temporary
directory that the artifact writer renames into place only on success.
"""

from __future__ import annotations

from onnxc.pipeline import Option  # noqa: F401  (re-exported for backend files)

BACKENDS: dict = {}


class Backend:
    name: str = ""
    summary: str = ""
    options: tuple = ()
    # Compilers (TVM, VTA) need every dim but the batch fixed (--input-shape); a
    # runtime target keeps the input model's symbolic dims in its artifact.
    static_shapes: bool = True

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
