"""Data readers: labelled or unlabelled input samples for calibration, eval, recovery.

A :class:`Dataset` holds one array per graph input and optional labels. Samples run
along each input's batch axis (see :func:`onnxc.execution.batch_layout`: axis 0 of an
image, axis 1 of a recurrent state ``[layers, N, hidden]``); an input without one (a
PReLU slope, a shape) is one value shared by every sample. Readers validate everything
up front so a bad file fails with one line before any work is done.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from onnxc.errors import DataError


@dataclass
class Preprocess:
    """x = (raw * scale - mean) / std, with mean/std per channel (axis 1)."""

    scale: float = 1.0
    mean: tuple | None = None
    std: tuple | None = None
    layout: str = "NCHW"             # layout of the stored images; converted to NCHW

    @classmethod
    def from_strings(cls, scale=None, mean=None, std=None, layout="NCHW") -> "Preprocess":
        def floats(s, what):
            if s is None:
                return None
            try:
                return tuple(float(v) for v in str(s).split(","))
            except ValueError:
                raise DataError(f"--{what} '{s}' must be comma-separated numbers") from None

        sc = floats(scale, "scale")
        return cls(sc[0] if sc else 1.0, floats(mean, "mean"), floats(std, "std"), layout)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32)
        if self.layout == "NHWC" and x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        x = x * np.float32(self.scale)
        shape = (1, -1) + (1,) * max(x.ndim - 2, 0)
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32).reshape(shape)
        if self.std is not None:
            std = np.asarray(self.std, np.float32)
            if np.any(std == 0):
                raise DataError("--std contains zero")
            x = x / std.reshape(shape)
        return np.ascontiguousarray(x, dtype=np.float32)


class Dataset:
    """Samples for one model: ``inputs[name]`` holds them along ``axes[name]`` (default
    0; None: one value for every sample); ``labels`` optional."""

    def __init__(self, inputs: dict, labels: np.ndarray | None = None, source: str = "",
                 synthetic: bool = False, axes: dict | None = None):
        self.inputs = inputs
        self.labels = labels
        self.source = source
        self.synthetic = synthetic
        self.axes = {k: 0 if axes is None else axes.get(k) for k in inputs}
        sizes = {np.shape(v)[self.axes[k]] for k, v in inputs.items()
                 if self.axes[k] is not None}
        if len(sizes) > 1:
            raise DataError(f"{source}: inputs have different sample counts {sorted(sizes)}")
        self.size = sizes.pop() if sizes else 1

    def __len__(self) -> int:
        return self.size

    def _slice(self, start: int, stop: int) -> dict:
        from onnxc.execution import take

        return {k: v if self.axes[k] is None else take(v, self.axes[k], start, stop)
                for k, v in self.inputs.items()}

    def take(self, n: int) -> "Dataset":
        if n > self.size:
            raise DataError(f"{self.source}: asked for {n} samples but it holds {self.size}")
        return Dataset(self._slice(0, n), None if self.labels is None else self.labels[:n],
                       self.source, self.synthetic, self.axes)

    def batches(self, batch_size: int):
        """Yield (feeds, labels) with feeds a {name: array} dict."""
        for start in range(0, self.size, batch_size):
            stop = min(start + batch_size, self.size)
            yield (self._slice(start, stop),
                   None if self.labels is None else self.labels[start:stop])


def _check_samples(samples: int, available: int, path: str) -> None:
    if samples <= 0:
        raise DataError(f"sample count must be positive, got {samples}")
    if samples > available:
        raise DataError(f"{path}: asked for {samples} samples but it holds {available}")


def _expected_inputs(graph) -> list:
    """[(name, shape)] of real graph inputs; shape entries may be symbolic."""
    return [(t.name, list(t.shape or [])) for t in graph.gs.inputs]


def check_against_graph(ds: Dataset, graph) -> None:
    """Fail early with one line if the data does not fit the model's inputs."""
    for name, shape in _expected_inputs(graph):
        if name not in ds.inputs:
            raise DataError(f"{ds.source}: no data for model input '{name}'")
        arr = np.asarray(ds.inputs[name])
        batch = ds.axes.get(name)
        fits = not shape or (arr.ndim == len(shape) and all(
            axis == batch or not (isinstance(d, (int, np.integer)) and d > 0)
            or arr.shape[axis] == d for axis, d in enumerate(shape)))
        if fits:
            continue
        if batch == 0:        # as users see images: per-sample shapes
            raise DataError(f"{ds.source}: samples have shape {list(arr.shape[1:])} but "
                            f"input '{name}' expects {shape[1:]}")
        raise DataError(f"{ds.source}: input '{name}' has shape {list(arr.shape)} but the "
                        f"model expects {shape}")


def load_npz(path: str, graph, preprocess: Preprocess | None = None,
             samples: int | None = None, key: str | None = None) -> Dataset:
    """Read ``images`` (or the only array / ``key``) and optional ``labels`` from npz/npy.

    Also accepts a folder of images (see :func:`load_image_folder`) and
    ``random[:LO,HI]`` (see :func:`random_range_dataset`), so every ``--calib-data`` /
    ``--eval-data`` flag takes all three."""
    if str(path).startswith("random") and not os.path.exists(path):
        return random_range_dataset(graph, path, samples)
    if os.path.isdir(path):
        return load_image_folder(path, graph, preprocess, samples)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file is empty: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz/.npy file ({exc})") from None
    labels = None
    model_inputs = [t.name for t in graph.gs.inputs]
    if not isinstance(loaded, np.ndarray) and len(model_inputs) > 1 \
            and all(n in loaded.files for n in model_inputs):
        return load_input_data([path], graph, samples, flag="data")  # arrays by input name
    if isinstance(loaded, np.ndarray):
        raw = loaded
    else:
        names = list(loaded.files)
        pick = key or next((k for k in ("images", "x", "inputs", "data") if k in names), None)
        if pick is None:
            non_label = [k for k in names if k not in ("labels", "y")]
            if len(non_label) != 1:
                raise DataError(f"{path}: cannot tell which array holds the inputs "
                                f"(arrays: {', '.join(names) or 'none'})")
            pick = non_label[0]
        if pick not in names:
            raise DataError(f"{path}: no array named '{pick}' (arrays: {', '.join(names)})")
        raw = loaded[pick]
        for lk in ("labels", "y"):
            if lk in names:
                labels = np.asarray(loaded[lk]).astype(np.int64).reshape(-1)
    if raw.size == 0 or raw.ndim == 0:
        raise DataError(f"{path}: input array is empty")
    if raw.dtype.kind not in "fiu":
        raise DataError(f"{path}: input array has dtype {raw.dtype}, expected numbers")
    if labels is not None and len(labels) != len(raw):
        raise DataError(f"{path}: {len(raw)} samples but {len(labels)} labels")
    if samples is not None:
        _check_samples(samples, len(raw), path)
        raw = raw[:samples]
        labels = None if labels is None else labels[:samples]
    x = (preprocess or Preprocess()).apply(raw)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: data contains NaN or Inf")
    inputs = _expected_inputs(graph)
    if len(inputs) != 1:
        raise DataError(f"{path}: one array given but the model has {len(inputs)} inputs "
                        f"({', '.join(n for n, _ in inputs)}): give an .npz whose keys are "
                        f"the input names, or --input-data NAME=FILE.npy for each")
    ds = Dataset({inputs[0][0]: x}, labels, path)
    check_against_graph(ds, graph)
    return ds


# Sizes tried, in order, for symbolic dims other than the batch (a sequence length, an
# audio chunk): the first one the model runs with is used.
FREE_DIM_SIZES = (1, 16, 64, 512)


def random_dataset(graph, n: int, seed: int = 0) -> Dataset:
    """Seeded samples shaped like the graph inputs: ``n`` along each input's batch axis,
    its declared size elsewhere. Other symbolic dims take the first of FREE_DIM_SIZES the
    model runs with (e.g. 512 for an audio chunk that is reflect-padded by 64). Values
    follow what each input is (see :func:`synthetic_values`)."""
    from onnxc.errors import OnnxcError
    from onnxc.execution import Runner, graph_layout

    layout = graph_layout(graph)
    free = any(i != layout.axes.get(t.name) and not (isinstance(d, (int, np.integer)) and d > 0)
               for t in graph.gs.inputs for i, d in enumerate(t.shape or []))
    if not free:
        return _random_dataset(graph, n, seed, layout, 1)
    for size in FREE_DIM_SIZES:
        ds = _random_dataset(graph, n, seed, layout, size)
        try:
            Runner(graph, optimize=False).run(ds.take(1).inputs)
            return ds
        except OnnxcError:
            continue
    return _random_dataset(graph, n, seed, layout, 1)   # the verifier says why it fails


def _random_dataset(graph, n: int, seed: int, layout, free_size: int) -> Dataset:
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in graph.gs.inputs:
        axis = layout.axes.get(tensor.name)
        dims = [n if i == axis else d if isinstance(d, (int, np.integer)) and d > 0
                else free_size for i, d in enumerate(tensor.shape or [])]
        inputs[tensor.name] = synthetic_values(graph, tensor, dims, rng)
    return Dataset(inputs, None, "random", synthetic=True, axes=layout.axes)


# Recurrent ops' initial states: ONNX input positions that hold them.
STATE_INPUTS = {"GRU": (5,), "RNN": (5,), "LSTM": (5, 6)}
# Input names that say "state" (a word start, so "batch0" is not "h0").
STATE_NAME = re.compile(r"(?<![a-z0-9])(state|hidden|h0|c0|cache|past)")
SAMPLE_RATE_NAMES = ("sr", "sample_rate", "sampling_rate")
# Integer inputs read as shapes: values that keep the op valid for any data shape.
SHAPE_INPUTS = {("Expand", 1): 1, ("Tile", 1): 1, ("ConstantOfShape", 0): 1,
                ("Reshape", 1): 0}


def synthetic_values(graph, tensor, dims: list, rng) -> np.ndarray:
    """Values for graph input ``tensor`` of shape ``dims`` that the model runs on:
    zeros for recurrent states, token ids below the vocabulary size of the ``Gather``
    reading them, shapes that broadcast (``Expand``/``Tile`` ones, ``Reshape`` zeros:
    keep each dim), a 16 kHz sample rate; else standard normal floats / small ints."""
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    uses = [(node, i) for node in tensor.outputs for i, t in enumerate(node.inputs)
            if t is tensor]
    for node, i in list(uses):          # ids are often cast before the Gather
        if node.op == "Cast":
            uses += [(n, j) for n in node.outputs[0].outputs
                     for j, t in enumerate(n.inputs) if t is node.outputs[0]]
    name = tensor.name.lower()
    if any(i in STATE_INPUTS.get(node.op, ()) for node, i in uses) \
            or STATE_NAME.search(name):
        return np.zeros(dims, dtype)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, dims).astype(bool)
    if not dims and name in SAMPLE_RATE_NAMES:
        return np.array(16000, dtype)
    for node, i in uses:
        if (node.op, i) in SHAPE_INPUTS:
            if node.op == "Reshape" and dims == [1]:
                return np.array([-1], dtype)         # flatten: valid for any data
            return np.full(dims, SHAPE_INPUTS[node.op, i], dtype)
        if node.op == "Gather" and i == 1:
            table = graph.constant(node.inputs[0])
            if table is not None and table.ndim:
                size = table.shape[int(node.attrs.get("axis", 0)) % table.ndim]
                return rng.integers(0, size, dims).astype(dtype)
    return rng.integers(0, 4, dims).astype(dtype)


def load_input_data(specs: list, graph, samples: int | None = None,
                    flag: str = "--input-data") -> Dataset:
    """``--input-data NAME=FILE.npy`` (repeatable) or ``FILE.npz`` whose keys are input
    names: every model input's values, used as given (no preprocessing), samples along
    each input's batch axis."""
    from onnxc.execution import graph_layout

    names = [t.name for t in graph.gs.inputs]
    arrays: dict = {}
    labels = None
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep:
            name, path = None, str(spec)
        if not os.path.isfile(path):
            raise DataError(f"{flag}: file not found: {path}")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{flag} {path}: not a readable .npy/.npz file "
                            f"({exc})") from None
        if isinstance(loaded, np.ndarray):
            if name is None:
                if len(names) != 1:
                    raise DataError(f"{flag} {path}: the model has {len(names)} "
                                    f"inputs ({', '.join(names)}): use NAME={path}")
                name = names[0]
            found = {name: loaded}
        else:
            if name is not None:
                raise DataError(f"{flag} {spec}: an .npz gives every input by "
                                f"its keys; drop '{name}='")
            found = {k: loaded[k] for k in loaded.files if k not in ("labels", "y")}
            for key in ("labels", "y"):
                if key in loaded.files:
                    labels = np.asarray(loaded[key]).astype(np.int64).reshape(-1)
        for key, arr in found.items():
            if key not in names:
                raise DataError(f"{flag} {path}: '{key}' is not a model input "
                                f"(inputs: {', '.join(names)})")
            arrays[key] = arr
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{flag} gives no values for input(s) {', '.join(missing)}")
    source = f"{flag} " + " ".join(map(str, specs))
    for tensor in graph.gs.inputs:
        arr, want = arrays[tensor.name], np.dtype(tensor.dtype or np.float32)
        if arr.dtype.kind not in "fiub" or (arr.dtype.kind == "f") != (want.kind == "f"):
            raise DataError(f"{source}: input '{tensor.name}' has dtype {arr.dtype}, the "
                            f"model expects {want}")
        arrays[tensor.name] = np.ascontiguousarray(arr.astype(want, copy=False))
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise DataError(f"{source}: input '{tensor.name}' contains NaN or Inf")
    ds = Dataset(arrays, None, source, axes=graph_layout(graph).axes)
    check_against_graph(ds, graph)
    if labels is not None:
        if len(labels) != len(ds):
            raise DataError(f"{source}: {len(ds)} samples but {len(labels)} labels")
        ds.labels = labels
    if samples is not None:
        _check_samples(samples, len(ds), source)
        ds = ds.take(samples)
    return ds


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def load_image_folder(path: str, graph, preprocess: Preprocess | None = None,
                      samples: int | None = None) -> Dataset:
    """Images under ``path`` (sorted; sub-folders name classes → labels), resized so the
    short side fits the model input, centre-cropped to H×W, RGB, then ``preprocess``
    (raw pixel values 0..255, as for npz images)."""
    from PIL import Image, UnidentifiedImageError

    inputs = _expected_inputs(graph)
    if len(inputs) != 1 or len(inputs[0][1]) != 4:
        raise DataError(f"{path}: an image folder needs a model with one N×C×H×W input")
    _, c, h, w = inputs[0][1]
    if not all(isinstance(d, (int, np.integer)) for d in (c, h, w)) or c not in (1, 3):
        raise DataError(f"{path}: model input {inputs[0][1]} is not N×(1|3)×H×W with static "
                        "H, W (fix it with --input-shape)")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if samples is not None:
        _check_samples(samples, len(files), path)
        files = files[:samples]
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    labelled = len(classes) > 1 or classes != ["."]
    raw = np.empty((len(files), c, h, w), np.float32)        # N × C × H × W, 0..255
    for i, f in enumerate(files):
        try:
            img = Image.open(f).convert("RGB" if c == 3 else "L")
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: not a readable image ({exc})") from None
        scale = max(h / img.height, w / img.width)           # short side fits, then crop
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                         Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        arr = np.asarray(img.crop((left, top, left + w, top + h)), np.float32)
        raw[i] = arr.reshape(h, w, c).transpose(2, 0, 1)
    pre = preprocess or Preprocess()
    x = Preprocess(pre.scale, pre.mean, pre.std, "NCHW").apply(raw)
    labels = np.array([classes.index(os.path.relpath(os.path.dirname(f), path))
                       for f in files], np.int64) if labelled else None
    ds = Dataset({inputs[0][0]: x}, labels, path)
    check_against_graph(ds, graph)
    return ds


def random_range_dataset(graph, spec: str, samples: int | None = None,
                         seed: int = 0) -> Dataset:
    """``random`` (standard normal) or ``random:LO,HI`` (uniform in the declared range):
    seeded synthetic samples shaped like the inputs. Calibrating on these loses accuracy;
    callers warn (``Dataset.synthetic``)."""
    n = samples or 64
    rest = spec[len("random"):]
    if not rest:
        return random_dataset(graph, n, seed)
    try:
        lo, hi = (float(v) for v in rest.lstrip(":").split(","))
    except ValueError:
        raise DataError(f"'{spec}': expected random or random:LO,HI") from None
    if not lo < hi:
        raise DataError(f"'{spec}': LO must be below HI")
    ds = random_dataset(graph, n, seed)
    rng = np.random.default_rng(seed)
    for name, arr in ds.inputs.items():
        if arr.dtype.kind == "f":
            ds.inputs[name] = rng.uniform(lo, hi, arr.shape).astype(arr.dtype)
    ds.source = spec
    return ds
