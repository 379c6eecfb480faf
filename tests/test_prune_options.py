"""prune options, criteria and CLI: how much, which channels, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import run_cli
from onnxc.compress import compress
from onnxc.errors import UsageError
from onnxc.execution import Runner
from onnxc.verify import compare_outputs

from prune_nets import Net


def chain(seed=0, bn=False):
    n = Net(seed=seed)
    t = n.conv("x", 3, 16, name="c1")
    t = n.op("Relu", [n.bn(t, 16) if bn else t])
    t = n.op("Relu", [n.conv(t, 16, 16, name="c2")])
    t = n.op("Relu", [n.conv(t, 16, 16, name="c3")])
    return n.model([n.conv(t, 16, 4, name="c4")])


@pytest.fixture
def chain_path(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(chain(), str(path))
    return path


def widths(result):
    return {n.name: n.inputs[1].values.shape[0] for n in result.graph.nodes if n.op == "Conv"}


@pytest.mark.parametrize("flag,value", [("--prune-ratio", "1.0"), ("--prune-ratio", "-0.1"),
                                        ("--prune-flops", "1.5")])
def test_ratios_outside_0_1_are_usage_errors(chain_path, tmp_path, flag, value):
    code, _, err = run_cli("compress", chain_path, "--passes", "prune", flag, value,
                           "-o", tmp_path / "out")
    assert code == 2
    assert f"{flag} must be in [0, 1)" in err
    assert "Traceback" not in err


def test_ratio_and_flops_together_are_refused(chain_path, tmp_path):
    code, _, err = run_cli("compress", chain_path, "--passes", "prune", "--prune-ratio", "0.3",
                           "--prune-flops", "0.3", "-o", tmp_path / "out")
    assert code == 2 and "either --prune-ratio or --prune-flops" in err


def test_nothing_prunable_writes_the_model_with_one_warning(tmp_path):
    n = Net()
    path = tmp_path / "one.onnx"
    onnx.save(n.model([n.conv("x", 3, 4, name="only")]), str(path))
    code, _, err = run_cli("compress", path, "--passes", "prune", "-o", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "model.onnx").exists()
    warned = [line for line in err.splitlines() if "prune changed nothing" in line]
    assert len(warned) == 1 and "'only'" in warned[0]


def test_nothing_prunable_under_a_budget_exits_4_with_one_line(tmp_path):
    n = Net()
    path = tmp_path / "one.onnx"
    onnx.save(n.model([n.conv("x", 3, 4, name="only")]), str(path))
    code, _, err = run_cli("compress", path, "--passes", "prune", "--prune-params", "0.3",
                           "-o", tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith("onnxc: error:")]
    assert code == 4 and len(errors) == 1 and "--prune-params cannot be met" in errors[0]
    assert "only" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_skip_pattern_matching_nothing_exits_2(chain_path, tmp_path):
    code, _, err = run_cli("compress", chain_path, "--passes", "prune", "--prune-skip",
                           "/nothing/*", "-o", tmp_path / "out")
    assert code == 2 and "matches no prunable layer" in err


def test_uniform_ratio_halves_every_group(chain_path):
    result = compress(str(chain_path), ["prune"], options={"prune_ratio": 0.5},
                      log=lambda m: None)
    assert widths(result) == {"c1": 8, "c2": 8, "c3": 8, "c4": 4}


def test_default_rounding_keeps_blocks_of_8_from_16_channels(chain_path):
    # ORT's NCHWc convs take input channel counts that are multiples of 8 (or < 8 from a
    # reordered NCHW buffer): 16-channel groups keep 8 or 16 unless told otherwise.
    opts = {"prune_ratio": 0.3}
    assert widths(compress(str(chain_path), ["prune"], options=opts,
                           log=lambda m: None))["c2"] == 16
    opts["prune_ratio"] = 0.6
    assert widths(compress(str(chain_path), ["prune"], options=opts,
                           log=lambda m: None))["c2"] == 8
    opts["prune_multiple"] = 1
    assert widths(compress(str(chain_path), ["prune"], options=opts,
                           log=lambda m: None))["c2"] == 7


def test_flops_target_is_reached(chain_path):
    result = compress(str(chain_path), ["prune"], options={"prune_flops": 0.6},
                      log=lambda m: None)
    assert result.report["final"]["macs"] <= 0.4 * result.report["original"]["macs"]


def test_global_ranking_prunes_weak_layers_more():
    model = chain()
    # 12 tiny filters in c3: ranked across all 48 channels they are the weakest 25%.
    w = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == "c3")
    arr = onnx.numpy_helper.to_array(w[node.input[1]]).copy()
    arr[:12] *= 1e-3
    w[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(arr, node.input[1]))
    result = compress(model, ["prune"], options={"prune_ratio": 12 / 48, "prune_multiple": 1,
                                                 "prune_global": True}, log=lambda m: None)
    assert widths(result)["c3"] == 4 and widths(result)["c1"] == 16


def test_bn_gamma_prefers_small_gammas():
    model = chain(bn=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    inits = {i.name: i for i in model.graph.initializer}
    gamma = onnx.numpy_helper.to_array(inits[bn.input[1]]).copy()
    gamma[[1, 4, 9, 12]] = 1e-3
    inits[bn.input[1]].CopyFrom(onnx.numpy_helper.from_array(gamma, bn.input[1]))
    result = compress(model, ["prune"], options={"prune_ratio": 0.25, "prune_multiple": 1,
                                                 "prune_criterion": "bn_gamma"},
                      log=lambda m: None)
    bn_after = next(n for n in result.graph.nodes if n.op == "BatchNormalization")
    assert np.all(np.asarray(bn_after.inputs[1].values) > 1e-2)


def test_bn_gamma_after_fold_bn_is_a_usage_error():
    with pytest.raises(UsageError, match="needs BatchNormalization"):
        compress(chain(bn=True), ["fold_bn", "prune"],
                 options={"prune_criterion": "bn_gamma"}, log=lambda m: None)


def test_apoz_runs_on_calibration_data_and_warns_when_random():
    logs = []
    result = compress(chain(), ["prune"], options={"prune_ratio": 0.5,
                                                   "prune_criterion": "apoz",
                                                   "prune_samples": 16}, log=logs.append)
    assert widths(result)["c1"] == 8
    assert any("RANDOM" in m for m in logs)


def test_thinet_reconstructs_better_than_l1_at_the_same_ratio():
    model = chain(seed=3)
    x = np.random.default_rng(5).standard_normal((32, 3, 12, 12)).astype(np.float32)
    ref = Runner(model).run({"x": x})
    errs = {}
    for crit in ("l1", "thinet"):
        res = compress(model, ["prune"], options={"prune_ratio": 0.5, "prune_criterion": crit,
                                                  "prune_samples": 64},
                       log=lambda m: None)
        errs[crit] = compare_outputs(ref, Runner(res.graph).run({"x": x})).mean_abs
        assert widths(res)["c2"] == 8
    assert errs["thinet"] < errs["l1"]


def test_sensitivity_prints_table_plot_and_feeds_flops_allocation(chain_path, tmp_path):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    code, out, err = run_cli("sensitivity", chain_path, "--samples", "8", "--plot", png,
                             "--json", js, "--ratios", "0.25,0.5")
    assert code == 0, err
    assert "err@0.5" in out and "c1" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    curves = json.loads(js.read_text())
    assert len(curves["groups"]) == 3
    code, out, err = run_cli("compress", chain_path, "--passes", "prune", "--prune-flops",
                             "0.3", "--prune-sensitivity", js, "-o", tmp_path / "art")
    assert code == 0, err


def test_sensitivity_rejects_bad_ratios(chain_path):
    code, _, err = run_cli("sensitivity", chain_path, "--ratios", "0.5,1.2")
    assert code == 2 and "--ratios must be in (0, 1)" in err
