"""sparsify: magnitude sparsity per layer or global, with storage that really shrinks."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from conftest import run_cli
from onnxc.compress import compress
from onnxc.passes.sparsify import SPARSE_FILE, load_sparse_weights, pack

from prune_nets import Net


def net():
    n = Net(seed=1)
    t = n.op("Relu", [n.conv("x", 3, 16, name="c1")])
    t = n.op("Relu", [n.conv(t, 16, 32, name="c2")])
    t = n.op("Flatten", [n.op("GlobalAveragePool", [t])])
    return n.model([n.gemm(t, 32, 10, name="fc")])


def weights(graph):
    return {n.name: np.asarray(n.inputs[1].values) for n in graph.nodes
            if n.op in ("Conv", "Gemm")}


def test_layerwise_sparsity_zeroes_that_share_of_each_layer(tmp_path):
    res = compress(net(), ["sparsify"], options={"sparsity": 0.7}, log=lambda m: None)
    for name, w in weights(res.graph).items():
        assert abs(np.mean(w == 0) - 0.7) < 1.0 / w.size + 1e-9, name


def test_global_sparsity_uses_one_threshold():
    res = compress(net(), ["sparsify"], options={"sparsity": 0.7, "sparsify_global": True},
                   log=lambda m: None)
    ws = weights(res.graph)
    allw = np.concatenate([w.ravel() for w in ws.values()])
    assert abs(np.mean(allw == 0) - 0.7) < 1e-3
    largest_zeroed = max(np.abs(orig).max() for orig in [
        w0[w == 0] for w0, w in zip(weights_of(net()).values(), ws.values())] if orig.size)
    smallest_kept = min(np.abs(w[w != 0]).min() for w in ws.values())
    assert largest_zeroed <= smallest_kept


def weights_of(model):
    from onnxc import frontend

    return weights(frontend.load(model))


def test_artifact_ships_bitmask_storage_that_round_trips(tmp_path):
    out = tmp_path / "art"
    res = compress(net(), ["sparsify"], options={"sparsity": 0.9}, out_dir=str(out),
                   log=lambda m: None)
    blob = (out / SPARSE_FILE).read_bytes()
    dense = load_sparse_weights(blob)
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert dense and all(np.array_equal(inits[k], v) for k, v in dense.items())
    rep = res.report
    assert rep["storage_bytes"] < rep["final"]["bytes"]
    assert rep["storage_compression_ratio"] > 3.0
    assert os.path.getsize(out / SPARSE_FILE) == rep["passes"][-1]["extra"]["sparse_file_bytes"]


def test_pack_is_smaller_than_dense_at_half_sparsity():
    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    w[np.abs(w) < np.median(np.abs(w))] = 0
    assert len(pack({"w": w})) < 0.6 * w.nbytes


@pytest.mark.parametrize("value", ["1", "-0.2"])
def test_sparsity_outside_0_1_is_a_usage_error(tmp_path, value):
    path = tmp_path / "m.onnx"
    onnx.save(net(), str(path))
    code, _, err = run_cli("compress", path, "--passes", "sparsify", "--sparsity", value,
                           "-o", tmp_path / "out")
    assert code == 2 and "--sparsity must be in [0, 1)" in err
