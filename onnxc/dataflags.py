"""The data flags commands share (``compress``, ``verify``, ``sensitivity``,
``vta-sim``) and the dataset loaders they make.

``--calib-data``/``--eval-data`` read stored samples (preprocessed with ``--scale``,
``--mean``, ``--std``, ``--layout``); ``--input-data`` gives every model input's values
as they are (``NAME=FILE.npy``, repeatable, or an ``.npz`` keyed by input name) and
serves calibration and verification alike.
"""

from __future__ import annotations

from .errors import UsageError


def add_data_args(parser, calib: bool = True) -> None:
    g = parser.add_argument_group("data (npz with 'images' [N×C×H×W] and optional 'labels')")
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


def data_loaders(args):
    """(calibration_loader, evaluation_loader) from the data flags: callables
    ``graph -> Dataset`` (or None). ``--input-data`` is the calibration data where a
    command takes some, else the samples a command compares on."""
    from onnxc.calibrate.readers import Preprocess, load_input_data, load_npz

    pre = Preprocess.from_strings(args.scale, args.mean, args.std, args.layout)
    calib = eval_ = None
    given = getattr(args, "input_data", None)
    if getattr(args, "calib_data", None):
        if given:
            raise UsageError("--input-data and --calib-data both give calibration data: "
                             "use one")
        path, n = args.calib_data, args.calib_samples

        def calib(graph):
            return load_npz(path, graph, pre, samples=n)
    elif getattr(args, "calib_samples", None) is not None and args.calib_samples <= 0:
        raise UsageError("--calib-samples must be positive")
    elif given:
        n = getattr(args, "calib_samples", None)

        def calib(graph):
            return load_input_data(given, graph, samples=n)
    if args.eval_data:
        epath, en = args.eval_data, args.eval_samples

        def eval_(graph):
            ds = load_npz(epath, graph, pre, samples=en)
            if ds.labels is None:
                raise UsageError(f"--eval-data {epath} has no 'labels' array")
            return ds
    return calib, eval_
