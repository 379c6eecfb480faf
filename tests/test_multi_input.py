"""Models with several inputs: each input keeps its own shape and dtype,
only a symbolic dim shared by inputs is a batch, and ``--input-data`` gives values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import run_cli
from multi_input_models import (batch_first_gru_with_rate, expand_shape_input, gru_with_state,
                                matmul_two_inputs, prelu_slope_input, reflect_padded_sequence,
                                token_embedding)
from onnxc import frontend
from onnxc.calibrate.readers import load_input_data, random_dataset
from onnxc.execution import Runner


@pytest.fixture
def saved(tmp_path):
    def save(model, name="model.onnx"):
        path = tmp_path / name
        onnx.save(model, path)
        return path
    return save


def _compress(path, out, passes, *extra):
    code, stdout, stderr = run_cli("compress", path, "--passes", passes, "-o", out, *extra)
    assert code == 0, stderr
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("passes", ["fold_bn", "fold_bn,int8"])
def test_two_input_matmul_compresses_with_input_data(saved, tmp_path, passes):
    path = saved(matmul_two_inputs())
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.standard_normal((2, 3)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((3, 4)).astype(np.float32))
    report = _compress(path, tmp_path / "out", passes, "--input-data",
                       f"A={tmp_path / 'a.npy'}", "--input-data", f"B={tmp_path / 'b.npy'}")
    assert report["verification"]["data"].startswith("--input-data")
    assert report["error"]["max_rel"] < (1e-5 if passes == "fold_bn" else 0.05)


@pytest.mark.parametrize("passes", ["fold_bn", "fold_bn,int8"])
def test_recurrent_model_with_state_input_compresses_with_input_data(saved, tmp_path, passes):
    path = saved(gru_with_state())
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((5, 12, 8)).astype(np.float32),
             state=(0.5 * rng.standard_normal((2, 12, 16))).astype(np.float32))
    report = _compress(path, tmp_path / "out", passes, "--input-data", tmp_path / "data.npz")
    assert report["verification"]["samples"] == 12     # along the state's axis 1
    assert report["error"]["max_rel"] < (1e-5 if passes == "fold_bn" else 0.05)


@pytest.mark.parametrize("make", [prelu_slope_input, expand_shape_input, gru_with_state,
                                  matmul_two_inputs, batch_first_gru_with_rate])
def test_multi_input_model_runs_on_synthetic_inputs(saved, tmp_path, make):
    report = _compress(saved(make()), tmp_path / "out", "fold_bn")
    assert report["verification"]["data"] == "synthetic"
    assert report["error"]["max_rel"] == 0.0


def test_single_input_batched_on_axis_1_compresses_without_input_shape(saved, tmp_path):
    report = _compress(saved(gru_with_state(state=False)), tmp_path / "out", "fold_bn,int8")
    assert report["verification"]["samples"] == 16
    assert report["error"]["max_rel"] < 0.05


def test_input_without_the_batch_dim_is_one_value_for_every_sample(saved):
    graph = frontend.load(str(saved(prelu_slope_input())))
    ds = random_dataset(graph, 5)
    assert ds.inputs["x"].shape == (5, 3, 4, 4) and ds.inputs["slope"].shape == (3, 1, 1)
    assert len(ds.take(2)) == 2 and ds.take(2).inputs["slope"].shape == (3, 1, 1)


def test_recurrent_state_is_synthesised_as_zeros_along_its_batch_axis(saved):
    ds = random_dataset(frontend.load(str(saved(gru_with_state()))), 7)
    assert ds.inputs["x"].shape == (5, 7, 8)
    assert ds.inputs["state"].shape == (2, 7, 16) and not ds.inputs["state"].any()


def test_batch_first_input_and_state_share_the_batch_and_a_scalar_rate_is_16k(saved):
    ds = random_dataset(frontend.load(str(saved(batch_first_gru_with_rate()))), 3)
    assert ds.axes == {"x": 0, "state": 1, "sr": None}
    assert ds.inputs["x"].shape == (3, 4, 8) and ds.inputs["state"].shape == (2, 3, 16)
    assert ds.inputs["sr"].shape == () and int(ds.inputs["sr"]) == 16000


def test_synthetic_free_dims_grow_until_the_model_runs(saved):
    graph = frontend.load(str(saved(reflect_padded_sequence(pad=8))), static_shapes=False)
    assert random_dataset(graph, 3).inputs["x"].shape == (3, 16)      # 1 is too short
    graph = frontend.load(str(saved(reflect_padded_sequence(pad=0))), static_shapes=False)
    assert random_dataset(graph, 3).inputs["x"].shape == (3, 1)


def test_synthetic_token_ids_stay_below_the_vocabulary_size(saved):
    ids = random_dataset(frontend.load(str(saved(token_embedding(vocab=3)))), 64).inputs["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() == 2


def test_synthetic_expand_shape_broadcasts_to_the_data(saved):
    graph = frontend.load(str(saved(expand_shape_input())))
    ds = random_dataset(graph, 3)
    assert ds.inputs["shape"].tolist() == [1, 1]
    assert Runner(graph).run(ds.inputs)[0].shape == (3, 1)


def test_slices_of_a_state_input_join_to_the_whole_run(saved):
    graph = frontend.load(str(saved(gru_with_state())))
    feeds = random_dataset(graph, 10, seed=3).inputs
    feeds["state"] = np.random.default_rng(4).standard_normal((2, 10, 16)).astype(np.float32)
    runner = Runner(graph)
    whole = runner.run(feeds, batch_size=None)
    sliced = runner.run(feeds, batch_size=4)
    for a, b in zip(whole, sliced):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-6)


def _rate_model_feeds(n):
    rng = np.random.default_rng(5)
    return {"x": rng.standard_normal((n, 4, 8)).astype(np.float32),
            "state": (0.5 * rng.standard_normal((2, n, 16))).astype(np.float32),
            "sr": np.array(8000, np.int64)}


FIXED_RATE_SHAPES = {"x": [1, 4, 8], "state": [2, 1, 16]}


def test_fixed_batch_keeps_the_batch_axes_the_model_declared(saved):
    graph = frontend.load(str(saved(batch_first_gru_with_rate())), FIXED_RATE_SHAPES)
    ds = random_dataset(graph, 3)
    assert ds.axes == {"x": 0, "state": 1, "sr": None}
    assert ds.inputs["x"].shape == (3, 4, 8) and ds.inputs["state"].shape == (2, 3, 16)


def test_more_samples_than_the_fixed_batch_run_in_slices_joined_on_each_batch_axis(saved):
    path = str(saved(batch_first_gru_with_rate()))
    feeds = _rate_model_feeds(3)
    whole = Runner(frontend.load(path)).run(feeds)
    fixed = Runner(frontend.load(path, FIXED_RATE_SHAPES)).run(feeds)
    assert [a.shape for a in fixed] == [(2, 3, 1), (2, 3, 16)]
    for a, b in zip(whole, fixed):
        assert np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("passes", ["fold_bn", "fold_bn,int8"])
def test_input_data_beyond_a_fixed_batch_compresses(saved, tmp_path, passes):
    np.savez(tmp_path / "d.npz", **_rate_model_feeds(3))
    shapes = [f"{k}:{','.join(map(str, v))}" for k, v in FIXED_RATE_SHAPES.items()]
    report = _compress(saved(batch_first_gru_with_rate()), tmp_path / "out", passes,
                       "--input-data", tmp_path / "d.npz", "--input-shape", shapes[0],
                       "--input-shape", shapes[1])
    assert report["verification"]["samples"] == 3
    assert report["error"]["max_rel"] < (1e-5 if passes == "fold_bn" else 0.05)
    artifact = onnx.load(tmp_path / "out" / "model.onnx")
    got = Runner(artifact).run(_rate_model_feeds(3))      # the artifact slices data too
    assert [a.shape for a in got] == [(2, 3, 1), (2, 3, 16)]


def test_input_data_missing_an_input_is_a_one_line_data_error(saved, tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    code, _, err = run_cli("compress", saved(matmul_two_inputs()), "-o", tmp_path / "out",
                           "--input-data", f"A={tmp_path / 'a.npy'}")
    assert code == 7 and err.strip().splitlines()[-1] == \
        "onnxc: error: --input-data gives no values for input(s) B"


def test_input_data_naming_an_unknown_input_is_refused(saved, tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    graph = frontend.load(str(saved(matmul_two_inputs())))
    with pytest.raises(Exception, match="'C' is not a model input"):
        load_input_data([f"C={tmp_path / 'a.npy'}"], graph)


def test_input_data_of_the_wrong_shape_is_refused(saved, tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 5), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 4), np.float32))
    graph = frontend.load(str(saved(matmul_two_inputs())))
    with pytest.raises(Exception, match=r"input 'A' has shape \[2, 5\] but the model "
                                        r"expects \[2, 3\]"):
        load_input_data([f"A={tmp_path / 'a.npy'}", f"B={tmp_path / 'b.npy'}"], graph)


def test_input_data_and_calib_data_together_are_a_usage_error(saved, tmp_path):
    np.savez(tmp_path / "d.npz", A=np.zeros((2, 3), np.float32), B=np.zeros((3, 4), np.float32))
    code, _, err = run_cli("compress", saved(matmul_two_inputs()), "-o", tmp_path / "out",
                           "--input-data", tmp_path / "d.npz", "--calib-data", tmp_path / "d.npz")
    assert code == 2 and "use one" in err


def test_calib_data_npz_keyed_by_input_names_feeds_a_multi_input_model(saved, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", A=rng.standard_normal((2, 3)).astype(np.float32),
             B=rng.standard_normal((3, 4)).astype(np.float32))
    report = _compress(saved(matmul_two_inputs()), tmp_path / "out", "fold_bn,int8",
                       "--calib-data", tmp_path / "d.npz")
    assert report["verification"]["data"].endswith("d.npz")


def test_onnxc_verify_compares_on_input_data(saved, tmp_path):
    path = saved(matmul_two_inputs())
    np.savez(tmp_path / "d.npz", A=np.ones((2, 3), np.float32), B=np.ones((3, 4), np.float32))
    code, out, err = run_cli("verify", path, path, "--input-data", tmp_path / "d.npz")
    assert code == 0, err
    assert "--input-data" in out and "max rel error 0.000e+00" in out
