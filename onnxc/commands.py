"""CLI commands, registered by decorator like passes and backends.

A module defines a command by decorating its handler::

    @register_command("sensitivity", configure)
    def handler(args) -> int: ...

where ``configure(subparsers)`` adds the sub-parser. Built-in commands live in
``cli.py``; passes and backends contribute theirs from their own packages (imported
when the registries load), so a new command is one new function in the module it
belongs to.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from .errors import UsageError


@dataclass(frozen=True)
class Command:
    name: str
    configure: Callable      # configure(subparsers) adds the sub-parser
    run: Callable            # run(args) -> exit code


COMMANDS: dict = {}          # name -> Command, in registration order


def register_command(name: str, configure: Callable):
    """Decorator registering ``handler(args) -> int`` as ``onnxc NAME``."""
    def decorate(handler):
        if name in COMMANDS:
            raise RuntimeError(f"command registered twice: {name!r}")
        COMMANDS[name] = Command(name, configure, handler)
        return handler
    return decorate


def all_commands() -> dict:
    """Every command: importing the pass and backend registries registers theirs."""
    from onnxc.backends import all_backends
    from onnxc.pipeline import all_passes

    all_passes()
    all_backends()
    return dict(COMMANDS)


# ----------------------------------------------------------------------------------------
# Data flags shared by commands (compress, verify, sensitivity, vta-sim)


def add_data_args(p, calib: bool = True) -> None:
    """The data flags (--calib-data, --eval-data, --scale, ...) of a command."""
    g = p.add_argument_group("data (npz with 'images' [N×C×H×W] and optional 'labels')")
    if calib:
        g.add_argument("--calib-data", help="calibration / recovery samples (.npz/.npy)")
        g.add_argument("--calib-samples", type=int, default=None,
                       help="use the first N calibration samples (default: all, max 512)")
    g.add_argument("--eval-data", help="labelled samples: top-1 before/after is reported")
    g.add_argument("--eval-samples", type=int, default=None, help="use the first N")
    g.add_argument("--input-data", action="append", metavar="NAME=FILE.npy | FILE.npz",
                   help="values of a model input as they are (repeat for each input; an "
                        ".npz by input name): any model's data, for "
                        + ("calibration and " if calib else "") + "verification")
    g.add_argument("--scale", default=None, help="multiply raw values first (e.g. 1/255)")
    g.add_argument("--mean", default=None, help="per-channel mean, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", default=None, help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--layout", default="NCHW", choices=("NCHW", "NHWC"),
                   help="layout of stored images (converted to NCHW)")


def data_loaders(args, warn=None):
    """(calibration_loader, evaluation_loader) from the data flags. ``warn(msg)`` hears
    once when the preprocessing flags look wrong for the data (see preprocessing_warning).
    ``--input-data`` (every input's values as they are) is the calibration data where a
    command takes some, else the samples a command compares on."""
    from onnxc.calibrate.readers import Preprocess, load_input_data, load_npz

    pre = Preprocess.from_strings(args.scale, args.mean, args.std, args.layout)
    warned: set = set()
    warn = warn or (lambda m: print(f"onnxc: warning: {m}", file=sys.stderr))

    def checked(ds):
        msg = preprocessing_warning(ds, pre, args)
        if msg and not warned:
            warned.add(msg)
            warn(msg)
        return ds

    calib = eval_ = None
    given = getattr(args, "input_data", None)
    if getattr(args, "calib_data", None):
        if given:
            raise UsageError("--input-data and --calib-data both give calibration data: "
                             "use one")
        path, n = args.calib_data, args.calib_samples

        def calib(graph):
            return checked(load_npz(path, graph, pre, samples=n))
    elif getattr(args, "calib_samples", None) is not None and args.calib_samples <= 0:
        raise UsageError("--calib-samples must be positive")
    elif given:
        n = getattr(args, "calib_samples", None)

        def calib(graph):
            return load_input_data(given, graph, samples=n)
    if args.eval_data:
        epath, en = args.eval_data, args.eval_samples

        def eval_(graph):
            ds = checked(load_npz(epath, graph, pre, samples=en))
            if ds.labels is None:
                raise UsageError(f"--eval-data {epath} has no 'labels' array")
            return ds
    return calib, eval_


# Normalised inputs (x/255, ImageNet or CIFAR mean/std, caffe-style mean subtraction)
# stay within a few hundred; preprocessing that takes them beyond what the raw uint8
# values themselves span is a mistake in --scale/--mean/--std.
PREPROCESS_MAX_ABS = 255.0
PREPROCESS_MIN_PEAK = 1e-2


def preprocessing_warning(ds, pre, args) -> str | None:
    """A warning when --scale/--mean/--std turn the data into values far outside what
    normalised inputs look like (e.g. --scale 255 where 1/255 was meant), else None."""
    import numpy as np

    if ds.synthetic or all(v is None for v in (args.scale, args.mean, args.std)):
        return None
    arrays = [np.asarray(v) for v in ds.inputs.values() if np.asarray(v).dtype.kind == "f"]
    if not arrays or not any(a.size for a in arrays):
        return None
    lo = min(float(a.min()) for a in arrays if a.size)
    hi = max(float(a.max()) for a in arrays if a.size)
    peak = max(abs(lo), abs(hi))
    if peak > PREPROCESS_MAX_ABS:
        if pre.scale > 1:
            fix = (f"onnxc multiplies by --scale: did you mean --scale {1 / pre.scale:.10g} "
                   f"(1/{pre.scale:g})?")
        else:
            fix = ("for 8-bit images --scale is usually 0.00392156862745098 (1/255) before "
                   "--mean/--std")
        return (f"--scale/--mean/--std turn the data into values in [{lo:.4g}, {hi:.4g}], "
                f"far outside normalised inputs; {fix}")
    if 0 < peak < PREPROCESS_MIN_PEAK:
        return (f"--scale/--mean/--std turn the data into values in [{lo:.4g}, {hi:.4g}], "
                f"nearly all zero; is --scale applied twice (onnxc multiplies by it once)?")
    return None
