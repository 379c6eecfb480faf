"""prune on YOLO-style detectors: C2f blocks (Split or Slice into channel ranges,
bottleneck residuals, Concat), SiLU (x·Sigmoid(x)) and HardSwish, Resize upsampling
and two output heads whose channels (boxes + classes) never change."""

from __future__ import annotations

import numpy as np
import pytest

from onnxc import frontend
from onnxc.compress import compress
from onnxc.passes.prune import prunable_groups
from onnxc.passes.prune.groups import DependencyGraph
from onnxc.verify import Runner, compare_outputs

from prune_torch_nets import Detector, YoloHead

QUIET = {"log": lambda m: None}
# s1's C2f: cv1 makes 2x16 channels, split in halves; the second half goes through a
# bottleneck whose residual Add couples it with the bottleneck's cv2.
DEAD = {"s1.1.cv1.conv": [2, 16 + 5], "s1.1.m.0.cv2.conv": [5],     # 1 first-half, 1 residual
        "s2.1.m.0.cv1.conv": [0, 7, 31],                          # bottleneck inner
        "neck.cv2.conv": [4], "heads.1.0.conv": [9, 10]}
N_DEAD = 2 + 3 + 1 + 2


def split_sizes(graph):
    out = []
    for n in graph.nodes:
        if n.op == "Split":
            s = n.inputs[1].values.tolist() if len(n.inputs) > 1 else list(n.attrs["split"])
            out.append((n.name, [int(v) for v in s]))
    return sorted(out)


def prune_dead(model, dead):
    graph = frontend.load(model)
    n = sum(len(g.classes) for g in prunable_groups(DependencyGraph(graph), []))
    return compress(model, ["prune"], options={
        "prune_ratio": (dead + 0.5) / n, "prune_global": True, "prune_criterion": "l1",
        "prune_residual": True, "prune_multiple": 1}, **QUIET)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_c2f_split_ranges_are_recomputed_and_dead_channels_go_exactly(opset):
    model = Detector(split=True).kill(DEAD).onnx(opset)
    before = split_sizes(frontend.load(model))
    assert [s for _, s in before] == [[16, 16], [16, 16], [32, 32]]   # neck, s1, s2
    result = prune_dead(model, N_DEAD)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref, out = Runner(model).run({"x": x}), Runner(result.graph).run({"x": x})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert [o.shape for o in out] == [o.shape for o in ref]         # boxes + classes kept
    after = dict(split_sizes(result.graph))
    assert after["/s1/s1.1/Split"] == [15, 15]                       # one dead per half
    assert result.report["passes"][-1]["extra"]["channels_removed"] == N_DEAD


def test_detector_at_30_percent_keeps_every_output_channel_and_runs():
    model = Detector(split=False).onnx(17)       # chunk: Slices on the channel axis
    result = compress(model, ["prune"], options={"prune_ratio": 0.3,
                                                 "prune_residual": True}, **QUIET)
    prune = result.report["passes"][-1]
    assert prune["extra"]["channels_removed"] > 0
    outputs = {s["node"]: s["reason"] for s in prune["skipped"]}
    assert any("reaches graph output 'p3'" in r for r in outputs.values())
    assert any("reaches graph output 'p4'" in r for r in outputs.values())
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    out = Runner(result.graph).run({"x": x})
    assert [o.shape for o in out] == [(1, 9, 8, 8), (1, 9, 4, 4)]
    # Resize follows the channels it upsamples: the neck reads fewer of them.
    neck = next(n for n in result.graph.nodes if n.name == "/neck/cv1/conv/Conv")
    assert neck.inputs[1].values.shape[1] < 96


def test_yolov8_detect_head_keeps_boxes_and_classes_and_prunes_the_branches():
    model = YoloHead().onnx()
    result = compress(model, ["prune"], options={"prune_ratio": 0.3}, **QUIET)
    prune = result.report["passes"][-1]
    pruned = {g["group"] for g in prune["extra"]["per_group"]}
    # The inner convs of both branches lose channels; the last convs (DFL bins, class
    # scores) reach the one output through Concat, Split and the DFL reshape: whole.
    assert any("/box." in g for g in pruned) and any("/cls." in g for g in pruned)
    assert not any(g.endswith(".2/Conv") for g in pruned)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = Runner(result.graph).run({"x": x})
    assert out[0].shape == (2, 4 + 5, 16 * 16 + 8 * 8)
