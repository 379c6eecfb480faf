"""Shared fixtures. Data and models from ../shared are read in place, never copied;
tests that need them skip with a clear reason when ../shared is absent."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
LIGHT_ZOO = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(p.name[len("light_"):-len(".onnx")] for p in LIGHT_ZOO.glob("light_*.onnx"))

# CIFAR-10 preprocessing of the shared ResNets.
CIFAR_SCALE = 1 / 255.0
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR_FLAGS = ["--scale", str(CIFAR_SCALE), "--mean", ",".join(map(str, CIFAR_MEAN)),
               "--std", ",".join(map(str, CIFAR_STD))]


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared models/data are not beside this checkout)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def resnet20_path() -> pathlib.Path:
    return _need(SHARED / "models" / "resnet20_cifar10.onnx")


@pytest.fixture(scope="session")
def resnet56_path() -> pathlib.Path:
    return _need(SHARED / "models" / "resnet56_cifar10.onnx")


@pytest.fixture(scope="session")
def cifar_train_path() -> pathlib.Path:
    return _need(SHARED / "data" / "cifar10" / "train.npz")


@pytest.fixture(scope="session")
def cifar_test_path() -> pathlib.Path:
    return _need(SHARED / "data" / "cifar10" / "test_dev.npz")


def cifar_preprocess():
    from onnxc.calibrate.readers import Preprocess

    return Preprocess(CIFAR_SCALE, CIFAR_MEAN, CIFAR_STD)


def light_model_path(name: str) -> pathlib.Path:
    return LIGHT_ZOO / f"light_{name}.onnx"


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The light zoo models carry constant weights; give float initializers seeded
    random values (He-style scale; BN variances kept positive) so verification means
    something."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    # The zoo's weights are ConstantOfShape(shape initializer) nodes: make them initializers.
    inits = {t.name: t for t in out.graph.initializer}
    keep = []
    for node in out.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            fill = numpy_helper.to_array(node.attribute[0].t) if node.attribute \
                else np.zeros(1, np.float32)
            value = np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
            out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            if out.ir_version < 4:   # old IR: every initializer is also a graph input
                out.graph.input.append(onnx.helper.make_tensor_value_info(
                    node.output[0], onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                    list(value.shape)))
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    bn_var = {n.input[4] for n in out.graph.node
              if n.op_type == "BatchNormalization" and len(n.input) > 4}
    bn_scale = {n.input[1] for n in out.graph.node if n.op_type == "BatchNormalization"}
    for i, init in enumerate(out.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size == 0:
            continue
        if init.name in bn_var:
            new = rng.uniform(0.5, 1.5, arr.shape)
        elif init.name in bn_scale:
            # Small γ keeps residual sums from exploding into a saturated softmax,
            # which would make every output comparison trivially exact.
            new = rng.uniform(0.2, 0.4, arr.shape)
        elif arr.ndim >= 2:
            fan_in = int(np.prod(arr.shape[1:]))
            new = rng.standard_normal(arr.shape) * np.sqrt(2.0 / max(fan_in, 1))
        else:
            new = rng.standard_normal(arr.shape) * 0.1
        out.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(new.astype(np.float32), init.name))
    return out


def run_cli(*argv) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from onnxc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()
