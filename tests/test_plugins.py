"""Extensions declared here only — a pass, a pruning criterion, an int8 calibrator and a
backend — registered by their decorators and run through ``onnxc compress``: nothing
else in the tree names them."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from onnxc.backends import Backend, register_backend
from onnxc.calibrate.calibrators import register_calibrator
from onnxc.options import Option, positive_int
from onnxc.passes.prune.criteria import register_criterion
from onnxc.pipeline import Pass, PassWith, register_pass

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
W2 = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32)


@register_pass
class RoundWeights(Pass):
    """Rounds every float weight to ``--round-decimals`` decimals (lossy)."""

    name = "plugin_round"
    summary = "round weights to N decimals (test plug-in)"
    order = 50
    options = (Option("--round-decimals", positive_int, 2, "decimals kept"),)

    def run(self, graph, ctx, report):
        for t in graph.tensors().values():
            if hasattr(t, "values") and t.values.dtype == np.float32 and t.values.ndim > 1:
                t.values = np.round(t.values, self.config.round_decimals)
                report.changed += 1
        return graph


@register_criterion("plugin_first")
def keep_first_channels(dg, graph, ctx, samples):
    """Higher score = kept: the lowest channel indices survive."""
    return -np.arange(dg.num_classes, dtype=np.float64)


@register_calibrator("plugin_half", histograms=False)
def half_range(stats, scheme, percentile):
    return stats.min / 2, stats.max / 2


@register_backend
class NpzWeights(Backend):
    """Writes every weight into weights.npz next to model.onnx."""

    name = "plugin_npz"
    summary = "model.onnx plus its weights as npz (test plug-in)"
    options = (Option("--npz-dtype", str, "float32", "dtype of the saved weights",
                      choices=("float32", "float16")),)
    requires = (PassWith("plugin_round", present=True, hint="add plugin_round to --passes"),)

    def build(self, graph, ctx, out_dir, report):
        weights = {t.name: t.values.astype(self.config.npz_dtype)
                   for t in graph.tensors().values()
                   if hasattr(t, "values") and t.values.dtype == np.float32}
        np.savez(f"{out_dir}/weights.npz", **weights)
        report["runtime"] = {"name": "npz", "load": "numpy.load('weights.npz')"}


def _model(path):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.fixture
def model(tmp_path):
    return _model(tmp_path / "m.onnx")


def _report(out):
    return json.loads((out / "report.json").read_text())


def _weights(out):
    m = onnx.load(out / "model.onnx")
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_plugin_pass_runs_with_its_typed_option(model, tmp_path):
    code, _, err = run_cli("compress", model, "--passes", "plugin_round",
                           "--round-decimals", "1", "-o", tmp_path / "o")
    assert code == 0, err
    rep = _report(tmp_path / "o")
    assert rep["passes"][-1]["name"] == "plugin_round"
    assert rep["passes"][-1]["config"] == {"round_decimals": 1}
    w = _weights(tmp_path / "o")
    assert np.array_equal(w["w1"], np.round(W1, 1))


def test_plugin_criterion_chooses_the_pruned_channels(model, tmp_path):
    code, _, err = run_cli("compress", model, "--passes", "prune", "--prune-ratio", "0.5",
                           "--prune-criterion", "plugin_first", "-o", tmp_path / "o")
    assert code == 0, err
    w = _weights(tmp_path / "o")
    kept = next(v for v in w.values() if v.shape == (4, 3, 3, 3))
    assert np.array_equal(kept, W1[:4])
    assert _report(tmp_path / "o")["passes"][-1]["config"]["prune_criterion"] == "plugin_first"


def test_plugin_calibrator_sets_the_activation_ranges(model, tmp_path):
    x = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", images=x)
    ranges = {}
    for calibrator in ("minmax", "plugin_half"):
        out = tmp_path / calibrator
        code, _, err = run_cli("compress", model, "--passes", "int8", "--calib-data",
                               tmp_path / "calib.npz", "--int8-calibrator", calibrator,
                               "-o", out)
        assert code == 0, err
        ranges[calibrator] = _report(out)["passes"][-1]["extra"]["activation_ranges"]
    inner = [name for name in ranges["minmax"] if name != "y"]
    assert inner
    for name in inner:
        assert ranges["plugin_half"][name] == pytest.approx(
            [v / 2 for v in ranges["minmax"][name]], rel=1e-6)


def test_plugin_backend_writes_its_files_with_its_config(model, tmp_path):
    code, _, err = run_cli("compress", model, "--passes", "plugin_round", "--target",
                           "plugin_npz", "--npz-dtype", "float16", "-o", tmp_path / "o")
    assert code == 0, err
    saved = np.load(tmp_path / "o" / "weights.npz")
    assert saved["w2"].dtype == np.float16
    assert _report(tmp_path / "o")["target_config"] == {"npz_dtype": "float16"}


def test_plugin_backend_requirement_fails_before_any_pass(model, tmp_path):
    code, _, err = run_cli("compress", model, "--passes", "fold_bn", "--target",
                           "plugin_npz", "-o", tmp_path / "o")
    assert code == 2
    start, error = err.strip().splitlines()         # no pass ran: each logs a line
    assert start.startswith("onnxc: compressing")
    assert error == ("onnxc: error: target 'plugin_npz' needs the plugin_round pass: "
                     "add plugin_round to --passes")
    assert not (tmp_path / "o").exists()


def test_plugins_through_the_python_api(model, tmp_path):
    from onnxc import compress

    res = compress(str(model), ["plugin_round"], target="plugin_npz",
                   options={"round_decimals": 3, "npz_dtype": "float32"},
                   out_dir=str(tmp_path / "o"), log=lambda m: None)
    assert res.report["passes"][-1]["config"] == {"round_decimals": 3}
    assert np.load(tmp_path / "o" / "weights.npz")["w1"].dtype == np.float32
