"""One exception family; each carries a one-line message and the CLI exit code.

The CLI prints ``error: <message>`` and exits with ``exit_code``; tracebacks are
only shown with ``--debug``. Exit codes are documented in README.md.
"""


class OnnxcError(Exception):
    """Base class: a clean, expected failure with a one-line message."""

    exit_code = 1


class UsageError(OnnxcError):
    """Bad command line or option value (unknown pass, ratio out of range, ...)."""

    exit_code = 2


class ModelError(OnnxcError):
    """The model cannot be read or is not a valid ONNX model."""

    exit_code = 3


class UnsupportedError(OnnxcError):
    """The model is valid but uses something onnxc cannot handle."""

    exit_code = 4


class VerificationError(OnnxcError):
    """An exact pass changed the outputs, or an accuracy budget was exceeded."""

    exit_code = 5


class OutputError(OnnxcError):
    """The artifact cannot be written (permissions, not a directory, ...)."""

    exit_code = 6


class DataError(OnnxcError):
    """Calibration / evaluation data is missing, malformed or inconsistent."""

    exit_code = 7


class BackendError(OnnxcError):
    """A backend (compiler, runtime, toolchain) failed or is not available."""

    exit_code = 8


def first_line(exc, limit: int = 300) -> str:
    """The one line of an exception worth showing: its first non-empty line, or, when
    the message is a traceback (TVM's errors carry one), the last line naming an error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(lines) > 1 and any(ln.startswith("Traceback") for ln in lines):
        line = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                    lines[-1])
    return line[:limit]
