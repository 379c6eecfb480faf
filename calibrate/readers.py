"""Data readers: labelled or unlabelled input samples for calibration, eval, recovery.

A :class:`Dataset` holds one float array per graph input (N × …) and optional
labels. Readers validate everything up front so a bad file fails with one line
before any work is done.
"""

from __future__ import annotations

import os
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
    """Samples for one model: ``inputs[name]`` is N × … float32; ``labels`` optional."""

    def __init__(self, inputs: dict, labels: np.ndarray | None = None, source: str = "",
                 synthetic: bool = False):
        self.inputs = inputs
        self.labels = labels
        self.source = source
        self.synthetic = synthetic
        sizes = {len(v) for v in inputs.values()}
        if len(sizes) != 1:
            raise DataError(f"{source}: inputs have different sample counts {sorted(sizes)}")
        self.size = sizes.pop()

    def __len__(self) -> int:
        return self.size

    def take(self, n: int) -> "Dataset":
        if n > self.size:
            raise DataError(f"{self.source}: asked for {n} samples but it holds {self.size}")
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.source,
                       self.synthetic)

    def batches(self, batch_size: int):
        """Yield (feeds, labels) with feeds a {name: array} dict."""
        for start in range(0, self.size, batch_size):
            stop = min(start + batch_size, self.size)
            yield ({k: v[start:stop] for k, v in self.inputs.items()},
                   None if self.labels is None else self.labels[start:stop])


def _expected_inputs(graph) -> list:
    """[(name, shape)] of real graph inputs; shape entries may be symbolic."""
    return [(t.name, list(t.shape or [])) for t in graph.gs.inputs]


def check_against_graph(ds: Dataset, graph) -> None:
    """Fail early with one line if the data does not fit the model's inputs."""
    for name, shape in _expected_inputs(graph):
        if name not in ds.inputs:
            raise DataError(f"{ds.source}: no data for model input '{name}'")
        arr = ds.inputs[name]
        if len(shape) and arr.ndim != len(shape):
            raise DataError(f"{ds.source}: samples have shape {list(arr.shape[1:])} but "
                            f"input '{name}' expects {shape[1:]}")
        for axis, d in enumerate(shape):
            if axis and isinstance(d, (int, np.integer)) and d > 0 and arr.shape[axis] != d:
                raise DataError(f"{ds.source}: samples have shape {list(arr.shape[1:])} but "
                                f"input '{name}' expects {shape[1:]}")


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
        if samples <= 0:
            raise DataError(f"sample count must be positive, got {samples}")
        if samples > len(raw):
            raise DataError(f"{path}: asked for {samples} samples but it holds {len(raw)}")
        raw = raw[:samples]
        labels = None if labels is None else labels[:samples]
    x = (preprocess or Preprocess()).apply(raw)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: data contains NaN or Inf")
    inputs = _expected_inputs(graph)
    if len(inputs) != 1:
        raise DataError(f"{path}: one array given but the model has {len(inputs)} inputs")
    ds = Dataset({inputs[0][0]: x}, labels, path)
    check_against_graph(ds, graph)
    return ds


def random_dataset(graph, n: int, seed: int = 0) -> Dataset:
    """Seeded standard-normal samples shaped like the graph inputs (symbolic batch -> n)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in graph.gs.inputs:
        shape = list(tensor.shape or [])
        dims = [n] + [d if isinstance(d, (int, np.integer)) and d > 0 else 1
                      for d in shape[1:]]
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            inputs[tensor.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            inputs[tensor.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            inputs[tensor.name] = rng.integers(0, 4, dims).astype(dtype)
    return Dataset(inputs, None, "random", synthetic=True)


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
        if samples <= 0:
            raise DataError(f"sample count must be positive, got {samples}")
        if samples > len(files):
            raise DataError(f"{path}: asked for {samples} samples but it holds {len(files)}")
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
