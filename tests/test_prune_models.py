"""prune on real models: the shared CIFAR ResNets (channel-padding shortcuts) and the
ONNX light zoo (BN, Concat, grouped convs, channel shuffle, Flatten→Gemm, LRN)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import LIGHT_MODELS, light_model_path, randomize_weights
from onnxc import frontend
from onnxc.compress import compress
from onnxc.pipeline import Context, PassReport
from onnxc.passes.prune import Prune
from onnxc.execution import Runner
from onnxc.verify import compare_outputs

from prune_nets import kill


def test_resnet20_dead_channels_are_pruned_exactly(resnet20_path):
    model = onnx.load(str(resnet20_path))
    dead = 0
    for stage in (1, 2, 3):
        for block in range(3):
            model = kill(model, f"/layer{stage}/layer{stage}.{block}/conv1/Conv", [0, 3])
            dead += 2
    # Trunk channels 0 and 63 of stage 3 are zero padding from the layer3.0 shortcut;
    # making the three stage-3 conv2 filters there dead makes those trunk classes dead.
    for block in range(3):
        model = kill(model, f"/layer3/layer3.{block}/conv2/Conv", [0, 63])
    dead += 2
    candidates = 9 * 2 * (16 + 32 + 64) // 2 + 64
    result = compress(model, ["prune"], options={
        "prune_ratio": (dead + 0.5) / candidates, "prune_global": True,
        "prune_residual": True, "prune_multiple": 1}, log=lambda m: None)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    cmp = compare_outputs(Runner(model).run({"input": x}),
                          Runner(result.graph).run({"input": x}))
    assert cmp.max_rel <= 1e-6
    assert result.report["passes"][-1]["extra"]["channels_removed"] == dead
    pads = [n for n in result.graph.nodes if n.op == "Pad"]
    assert list(pads[-1].inputs[1].values[[1, 5]]) == [15, 15]


def test_resnet20_trunk_pruning_through_channel_pads_runs(resnet20_path):
    result = compress(str(resnet20_path), ["prune"], options={
        "prune_ratio": 0.5, "prune_residual": True}, log=lambda m: None)
    assert result.report["mac_ratio"] > 3.0
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert Runner(result.graph).run({"input": x})[0].shape == (2, 10)


def prune_light(name: str, ratio: float = 0.3):
    graph = frontend.load(randomize_weights(onnx.load(light_model_path(name))))
    before = graph.stats(with_bytes=False).macs
    reference = graph.copy()
    report = PassReport("prune", False)
    pruned = Prune({"prune_ratio": ratio, "prune_residual": True}).run(
        graph, Context(), report).refresh()
    return reference, pruned, before, report


def check_light(name):
    reference, pruned, before, report = prune_light(name)
    if name == "shufflenet":
        # Everything but the residual trunk passes a channel shuffle, and the trunk is
        # read by grouped convs at different group boundaries: nothing can go.
        assert pruned.stats(with_bytes=False).macs == before
    else:
        assert pruned.stats(with_bytes=False).macs < before
    feed_name = pruned.gs.inputs[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    a = Runner(reference).run({feed_name: x})
    b = Runner(pruned).run({feed_name: x})
    assert [o.shape for o in a] == [o.shape for o in b]
    assert all(np.isfinite(o).all() for o in b)
    for s in report.skipped:           # every group left whole says why
        assert s["node"] and s["reason"]
    return report


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_light_zoo_small_models_prune_and_run(name):
    report = check_light(name)
    if name == "shufflenet":
        assert any("channel shuffle" in s["reason"] for s in report.skipped)


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in LIGHT_MODELS
                                  if m not in ("squeezenet", "shufflenet")])
def test_light_zoo_prunes_at_30_percent_and_runs(name):
    check_light(name)


@pytest.mark.slow
def test_resnet56_thinet_halves_macs_and_keeps_85_percent(resnet56_path, cifar_train_path,
                                                          cifar_test_path):
    from conftest import cifar_preprocess
    from onnxc.calibrate.readers import load_npz

    pre = cifar_preprocess()
    res = compress(str(resnet56_path), ["fold_bn", "prune"],
                   options={"prune_flops": 0.5, "prune_criterion": "thinet"},
                   calibration_loader=lambda g: load_npz(str(cifar_train_path), g, pre,
                                                         samples=256),
                   evaluation_loader=lambda g: load_npz(str(cifar_test_path), g, pre),
                   log=lambda m: None)
    rep = res.report
    assert rep["final"]["macs"] <= 0.52 * rep["original"]["macs"]
    assert rep["accuracy"]["final_top1"] >= 85.0
