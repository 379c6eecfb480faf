"""Typed pass configs, declared requirements and the CLI around them."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli
from onnxc import compress
from onnxc.errors import OnnxcError, UsageError
from onnxc.options import Option, fraction
from onnxc.pipeline import Pass, register_pass, resolve_passes

RNG = np.random.default_rng(1)


def _cnn(path=None):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(RNG.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if path is not None:
        onnx.save(model, path)
        return path
    return model


def test_config_has_defaults_and_converted_types():
    prune = resolve_passes(["prune"], {"prune_ratio": "0.25", "prune_min_channels": "2"})[-1]
    assert prune.config.prune_ratio == 0.25 and prune.config.prune_min_channels == 2
    assert prune.config.prune_criterion == "l1" and prune.config.prune_global is False


def test_config_is_frozen():
    prune = resolve_passes(["prune"])[-1]
    with pytest.raises(AttributeError):
        prune.config.prune_ratio = 0.9


def test_api_and_cli_give_the_same_error_for_a_bad_value(tmp_path):
    with pytest.raises(UsageError) as api:
        compress(_cnn(), ["prune"], options={"prune_ratio": "half"}, log=lambda m: None)
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes", "prune",
                           "--prune-ratio", "half", "-o", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines()[-1] == f"onnxc: error: {api.value}"
    assert str(api.value) == "--prune-ratio must be a number, got half"


def test_unknown_api_option_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown option 'prune_ration'.*prune_ratio"):
        compress(_cnn(), ["prune"], options={"prune_ration": 0.5}, log=lambda m: None)


def test_choices_are_checked_for_the_api():
    with pytest.raises(UsageError, match="--int8-calibrator must be one of minmax"):
        compress(_cnn(), ["int8"], options={"int8_calibrator": "kl"}, log=lambda m: None)


@pytest.mark.parametrize("key", ["calibrator", "int8_calibrator"])
def test_int8_flags_keep_their_old_names_as_aliases_in_the_api(key):
    int8 = resolve_passes(["int8"], {key: "percentile"})[-1]
    assert int8.config.int8_calibrator == "percentile"


def test_int8_old_flag_spelling_still_works_on_the_cli(tmp_path):
    x = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", images=x)
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes", "int8",
                           "--calib-data", tmp_path / "c.npz", "--pow2-scales",
                           "--calibrator", "percentile", "-o", tmp_path / "o")
    assert code == 0, err
    config = json.loads((tmp_path / "o" / "report.json").read_text())["passes"][-1]["config"]
    assert config["int8_pow2_scales"] is True and config["int8_calibrator"] == "percentile"


def test_alias_and_new_name_with_different_values_are_refused():
    with pytest.raises(UsageError, match="--int8-percentile given twice"):
        resolve_passes(["int8"], {"percentile": 99.0, "int8_percentile": 99.9})


def test_a_flag_declared_twice_is_an_error_at_registration():
    class Clash(Pass):
        name = "clash_test"
        options = (Option("--prune-ratio", fraction, 0.1, "another meaning"),)

    with pytest.raises(RuntimeError, match="--prune-ratio .* already declared by pass 'prune'"):
        register_pass(Clash)
    from onnxc.pipeline import PASSES

    assert "clash_test" not in PASSES


def test_report_lists_every_option_each_pass_used_with_defaults(tmp_path):
    x = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", images=x)
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes",
                           "fold_bn,prune,int8", "--calib-data", tmp_path / "c.npz",
                           "--prune-flops", "0.3", "-o", tmp_path / "o")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    from onnxc.pipeline import all_passes

    registry = all_passes()
    for entry in report["passes"]:
        declared = {opt.dest: opt.default for opt in registry[entry["name"]].options}
        assert set(entry["config"]) == set(declared), entry["name"]
    prune = next(p for p in report["passes"] if p["name"] == "prune")["config"]
    assert prune["prune_flops"] == 0.3 and prune["prune_samples"] == 256
    int8 = next(p for p in report["passes"] if p["name"] == "int8")["config"]
    assert int8["int8_percentile"] == 99.99 and int8["int8_pow2_scales"] is False


def test_vta_without_pow2_int8_fails_before_any_pass(tmp_path):
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes", "int8",
                           "--target", "vta", "-o", tmp_path / "o")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("onnxc: compressing")
    assert lines[1] == ("onnxc: error: target 'vta' needs int8 with --int8-pow2-scales: "
                        "VTA takes int8 activations with power-of-two scales")


def test_vta_on_a_float_model_without_int8_fails_before_any_pass(tmp_path):
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes", "fold_bn",
                           "--target", "vta", "-o", tmp_path / "o")
    assert code == 4
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("onnxc: error: no layer can run on VTA")
    assert "--int8-pow2-scales" in lines[1]


def test_recover_without_data_fails_before_any_pass(tmp_path):
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--passes",
                           "fold_bn,recover", "-o", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("onnxc: error: recover needs training "
                                                   "images")
    assert "fold_bn " not in err.split("\n", 1)[1]


def test_passes_keep_no_state_between_runs():
    model = _cnn()
    ternary = resolve_passes(["ternary"], {"ternary_threshold": 0.5, "keep_float": "none"})
    from onnxc import frontend
    from onnxc.pipeline import Context, PassManager

    PassManager(ternary, verify=False).run(frontend.load(model), Context(log=lambda m: None))
    for p in ternary:
        assert set(vars(p)) == {"config"}, p.name


def test_debug_is_accepted_after_the_command(tmp_path):
    assert run_cli("passes", "--debug")[0] == 0
    with pytest.raises(OnnxcError):          # --debug: the error propagates, traceback
        run_cli("compress", tmp_path / "missing.onnx", "-o", tmp_path / "o", "--debug")


def test_scale_that_divides_instead_of_multiplying_is_flagged_once(tmp_path):
    images = RNG.integers(0, 256, (8, 3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.zeros(8, np.int64))
    model = _cnn(tmp_path / "m.onnx")
    code, _, err = run_cli("compress", model, "--calib-data", tmp_path / "d.npz",
                           "--eval-data", tmp_path / "d.npz", "--scale", "255",
                           "-o", tmp_path / "o")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "far outside normalised inputs" in line]
    assert len(warnings) == 1
    assert "[0, 6.502e+04]" in warnings[0] and "--scale 0.003921568627" in warnings[0]


def test_usual_preprocessing_is_not_flagged(tmp_path):
    images = RNG.integers(0, 256, (8, 3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--calib-data",
                           tmp_path / "d.npz", "--scale", "0.00392156862745098",
                           "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                           "-o", tmp_path / "o")
    assert code == 0, err
    assert "warning" not in err


def test_configs_in_the_report_replay_to_the_same_configs(tmp_path):
    x = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    from onnxc.calibrate.readers import Dataset

    data, model = Dataset({"x": x}), _cnn()
    first = compress(model, ["prune", "int8"], calibration=data, log=lambda m: None,
                     options={"prune_ratio": "0.25", "calibrator": "percentile"})
    replay = {k: v for p in first.report["passes"] for k, v in p["config"].items()}
    second = compress(model, ["prune", "int8"], calibration=data, log=lambda m: None,
                      options=replay)
    assert [p["config"] for p in second.report["passes"]] == \
        [p["config"] for p in first.report["passes"]]
    assert second.graph.to_onnx() == first.graph.to_onnx()


def test_scale_applied_twice_is_flagged(tmp_path):
    images = RNG.integers(0, 256, (8, 3, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    code, _, err = run_cli("compress", _cnn(tmp_path / "m.onnx"), "--calib-data",
                           tmp_path / "d.npz", "--scale", str(1 / 255 / 255),
                           "-o", tmp_path / "o")
    assert code == 0, err
    assert "nearly all zero; is --scale applied twice" in err
