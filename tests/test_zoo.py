"""All 9 light zoo models (opset 9, old-style graphs) load, canonicalise, fold_bn and
verify — with their constant weights replaced by seeded random values so that the
comparison means something. inspect reproduces the survey tables' figures."""

import onnx
import pytest

from conftest import LIGHT_MODELS, light_model_path, randomize_weights, run_cli
from onnxc.compress import compress

# The FC-heavy models are large (0.2-0.5 GB of weights): run them in the slow suite.
BIG = {"vgg19", "zfnet512", "bvlc_alexnet"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in LIGHT_MODELS])
def test_light_zoo_model_folds_and_verifies(name):
    model = randomize_weights(onnx.load(light_model_path(name)))
    result = compress(model, ["fold_bn"], log=lambda m: None)
    ops = {n.op for n in result.graph.nodes}
    assert "BatchNormalization" not in ops
    report = result.report
    assert report["error"]["max_rel"] <= 1e-5
    assert report["error"]["max_abs"] > 0 or report["passes"][1]["changed"] == 0
    assert report["final"]["macs"] == report["original"]["macs"] > 0


def test_light_zoo_has_all_nine_models():
    assert len(LIGHT_MODELS) == 9


def test_inspect_resnet50_matches_survey_figures():
    code, out, err = run_cli("inspect", light_model_path("resnet50"))
    assert code == 0, err
    total = out.strip().splitlines()[-1]
    params = int(total.split(" params")[0].split(",  ")[-1].split()[-1].replace(",", ""))
    macs = int(total.split(" MACs")[0].split()[-1].replace(",", ""))
    assert params == pytest.approx(25.5e6, rel=0.01)
    assert macs == pytest.approx(4.1e9, rel=0.01)


def test_inspect_resnet56(resnet56_path):
    code, out, err = run_cli("inspect", resnet56_path)
    assert code == 0, err
    total = out.strip().splitlines()[-1]
    assert "0.85 M" in total and "0.125 G" in total
