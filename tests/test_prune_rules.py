"""prune: dead channels (zero filter and bias) are removed through every op rule and
the outputs stay identical; ops without a rule leave their group whole."""

from __future__ import annotations

import numpy as np
import pytest

from onnxc import frontend
from onnxc.compress import compress
from onnxc.ir import Graph
from onnxc.errors import UnsupportedError, UsageError
from onnxc.passes.prune import prunable_groups
from onnxc.passes.prune.groups import DependencyGraph
from onnxc.execution import Runner
from onnxc.verify import compare_outputs

from prune_nets import Net, kill, kill_input


def prune_dead(model, dead: int, **options):
    """Prune exactly ``dead`` channels (globally lowest L1) and return (result, n_candidates)."""
    graph = frontend.load(model)
    dg = DependencyGraph(graph)
    n = sum(len(g.classes) for g in prunable_groups(dg, []))
    opts = {"prune_ratio": (dead + 0.5) / n, "prune_global": True, "prune_criterion": "l1",
            "prune_residual": True, "prune_multiple": 1}
    opts.update(options)
    return compress(model, ["prune"], options=opts, log=lambda m: None), n


def assert_exact(model, result, dead):
    x = np.random.default_rng(1).standard_normal((4,) + tuple(
        d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])) \
        .astype(np.float32)
    ref = Runner(model).run({"x": x})
    out = Runner(result.graph).run({"x": x})
    cmp = compare_outputs(ref, out)
    assert cmp.max_rel <= 1e-6, cmp
    prune = result.report["passes"][-1]
    assert prune["extra"]["channels_removed"] == dead
    assert result.report["final"]["macs"] < result.report["original"]["macs"]


def test_conv_bn_unary_pool_and_broadcast_constants_chain():
    n = Net()
    t = n.conv("x", 3, 8, name="c1")
    t = n.op("Relu", [n.bn(t, 8)])
    t = n.op("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = n.conv(t, 8, 8, name="c2")
    t = n.op("LeakyRelu", [t], alpha=0.1)
    t = n.op("Clip", [t, n.const(np.float32(0)), n.const(np.float32(6))])
    t = n.op("HardSwish", [t])
    t = n.op("Tanh", [t])
    t = n.op("PRelu", [t, n.const(np.full((8, 1, 1), 0.2, np.float32))])
    t = n.op("Mul", [t, n.const(np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1))])
    t = n.op("Div", [t, n.const(np.arange(1, 9, dtype=np.float32).reshape(1, 8, 1, 1))])
    t = n.op("AveragePool", [t], kernel_shape=[2, 2])
    out = n.conv(t, 8, 4, name="c3")
    model = kill(kill(n.model([out]), "c1", [1, 5]), "c2", [0, 3])
    result, _ = prune_dead(model, 4)
    assert_exact(model, result, 4)


def test_non_zero_preserving_ops_sigmoid_softmax_instancenorm():
    n = Net()
    t = n.conv("x", 3, 8, name="c1")
    t = n.op("InstanceNormalization", [t, n.const(np.ones(8, np.float32)),
                                       n.const(np.zeros(8, np.float32))])
    t = n.op("Sigmoid", [t])
    t = n.op("Softmax", [t], axis=3)              # over W: channels pass through
    t = n.op("Exp", [n.op("Elu", [t])])
    out = n.conv(t, 8, 4, name="c2")
    model = kill_input(kill(n.model([out]), "c1", [2, 6]), "c2", [2, 6])
    result, _ = prune_dead(model, 2)
    assert_exact(model, result, 2)


def test_residual_add_and_sum_couple_the_trunk():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c0")])
    a = n.conv(n.op("Relu", [n.conv(t, 8, 8, name="ca")]), 8, 8, name="cb")
    t2 = n.op("Relu", [n.op("Add", [a, t])])
    c = n.conv(n.op("Relu", [n.conv(t2, 8, 8, name="cc")]), 8, 8, name="cd")
    s = n.op("Relu", [n.op("Sum", [c, t2, t])])
    out = n.gemm(n.op("Flatten", [n.op("GlobalAveragePool", [s])]), 8, 10)
    model = n.model([out])
    for layer in ("c0", "cb", "cd"):
        model = kill(model, layer, [2, 6])
    model = kill(kill(model, "ca", [1]), "cc", [4, 5])
    result, n_cand = prune_dead(model, 5)
    assert n_cand == 24
    assert_exact(model, result, 5)


def test_concat_split_and_channel_slice_are_reindexed():
    n = Net()
    a = n.op("Relu", [n.conv("x", 3, 6, name="c1")])
    b = n.op("Relu", [n.conv("x", 3, 6, name="c2")])
    cat = n.op("Concat", [a, b], axis=1)
    p1, p2 = n.op("Split", [cat, n.const(np.array([4, 8], np.int64))], axis=1, n_out=2)
    s = n.op("Slice", [p2, n.const(np.array([2], np.int64)), n.const(np.array([7], np.int64)),
                       n.const(np.array([1], np.int64))])
    out = n.op("Add", [n.conv(p1, 4, 5, name="c3"), n.conv(s, 5, 5, name="c4")])
    model = kill(kill(n.model([out]), "c1", [0, 4]), "c2", [1, 5])
    result, n_cand = prune_dead(model, 4)
    assert n_cand == 12
    assert_exact(model, result, 4)


def test_int32_channel_slice_bounds_stay_int32():
    # Slice binds starts/ends/axes to one index type: int64 rewritten bounds beside int32
    # axes make a model ONNX Runtime refuses to load (magika).
    n = Net()
    a = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    s = n.op("Slice", [a, n.const(np.array([1], np.int32)), n.const(np.array([7], np.int32)),
                       n.const(np.array([1], np.int32)), n.const(np.array([1], np.int32))])
    out = n.conv(s, 6, 4, name="c2")
    model = kill(n.model([out]), "c1", [0, 3])
    result, _ = prune_dead(model, 2)
    assert_exact(model, result, 2)
    (node,) = [nd for nd in result.graph.nodes if nd.op == "Slice"]
    dtypes = {np.asarray(Graph.constant(t)).dtype for t in node.inputs[1:]}
    assert dtypes == {np.dtype(np.int32)}


@pytest.mark.parametrize("computed", [False, True])
def test_expand_passing_channels_through_gets_its_channel_entry_rewritten(computed):
    # magika's LayerNorm expands to a shape naming the channel count ([batch, 1, 256],
    # computed from the batch dim): after pruning it must no longer name 8 channels.
    n = Net(shape=("N", 3, 12, 12))
    a = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    if computed:
        batch = n.op("Gather", [n.op("Shape", [a]), n.const(np.array([0], np.int64))], axis=0)
        shape = n.op("Concat", [batch, n.const(np.array([8, 1, 1], np.int64))], axis=0)
    else:
        shape = n.const(np.array([1, 8, 1, 1], np.int64))
    out = n.conv(n.op("Expand", [a, shape]), 8, 4, name="c2")
    model = kill(n.model([out]), "c1", [2, 5])
    result, _ = prune_dead(model, 2)
    assert_exact(model, result, 2)


def test_channel_pad_shortcut_like_cifar_resnet():
    # ResNet "option A" shortcut: spatial Slice then zero Pad of the channel axis.
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 4, name="c0")])
    big = np.array([2 ** 62], np.int64)
    sc = n.op("Slice", [t, n.const(np.array([0, 0], np.int64)), n.const(np.r_[big, big]),
                        n.const(np.array([2, 3], np.int64)), n.const(np.array([2, 2], np.int64))])
    sc = n.op("Pad", [sc, n.const(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64))])
    m = n.conv(n.op("Relu", [n.conv(t, 4, 8, name="c1", strides=[2, 2])]), 8, 8, name="c2")
    t2 = n.op("Relu", [n.op("Add", [m, sc])])
    c3 = n.op("Relu", [n.conv(t2, 8, 6, name="c3")])
    out = n.gemm(n.op("Flatten", [n.op("GlobalAveragePool", [c3])]), 6, 10)
    model = n.model([out])
    # trunk class "c0 channel 1" = c2 channel 3 (pad offset 2); pad-only classes 0 and 7
    model = kill(kill(model, "c0", [1]), "c2", [3, 0, 7])
    model = kill(kill(model, "c1", [2, 5]), "c3", [4])
    result, n_cand = prune_dead(model, 6)
    assert n_cand == 22
    assert_exact(model, result, 6)
    pads = [n_ for n_ in result.graph.nodes if n_.op == "Pad"][0]
    assert list(pads.inputs[1].values[[1, 5]]) == [1, 1]   # one pad channel left each side


def test_depthwise_and_grouped_convs_keep_groups_equal():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    t = n.op("Relu", [n.conv(t, 8, 16, group=8, name="dw")])     # channel multiplier 2
    t = n.op("Relu", [n.conv(t, 16, 8, group=2, name="gc")])
    out = n.conv(t, 8, 4, name="c3")
    model = n.model([out])
    # One dead channel in each of gc's two input groups (c1 3 -> dw 6,7; c1 7 -> dw 14,15)
    # and in each of its output groups (1 and 5): every group stays the same size.
    model = kill(kill(model, "c1", [3, 7]), "dw", [6, 7, 14, 15])
    model = kill(model, "gc", [1, 5])
    result, n_cand = prune_dead(model, 4)
    assert n_cand == 16
    assert_exact(model, result, 4)
    dw = next(n_ for n_ in result.graph.nodes if n_.name == "dw")
    assert dw.attrs["group"] == 6


def test_flatten_reshape_into_gemm_and_matmul():
    n = Net()
    t = n.op("MaxPool", [n.op("Relu", [n.conv("x", 3, 4, name="c1")])],
             kernel_shape=[2, 2], strides=[2, 2])
    h = n.op("Relu", [n.gemm(n.op("Flatten", [t]), 144, 16, name="g1")])
    out1 = n.gemm(h, 16, 10, name="g2")
    u = n.op("GlobalAveragePool", [n.op("Relu", [n.conv("x", 3, 6, name="c2")])])
    u = n.op("Reshape", [u, n.const(np.array([-1, 6], np.int64))])
    u = n.op("Relu", [n.op("MatMul", [u, n.const(n.w(6, 7), "M")], name="mm")])
    out2 = n.gemm(u, 7, 10, name="g3", trans_b=0)
    model = n.model([out1, out2])
    model = kill(kill(kill(kill(model, "c1", [2]), "g1", [3, 9]), "c2", [0]), "mm", [4])
    result, n_cand = prune_dead(model, 5)
    assert n_cand == 33
    assert_exact(model, result, 5)


def test_conv_transpose_input_and_output_channels():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 6, name="c1")])
    w = n.const(n.w(6, 4, 2, 2), "W")
    t = n.op("Relu", [n.op("ConvTranspose", [t, w, n.const(np.full(4, .1, np.float32))],
                           name="ct", strides=[2, 2])])
    out = n.conv(t, 4, 3, name="c3")
    model = kill(kill(n.model([out]), "c1", [2]), "ct", [1])
    result, _ = prune_dead(model, 2)
    assert_exact(model, result, 2)


def test_resize_reduce_squeeze_unsqueeze_transpose_follow_the_channel_axis():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    t = n.op("Resize", [t, "", n.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    t = n.op("ReduceMean", [t], axes=[3], keepdims=0)                       # N×8×24
    t = n.op("Unsqueeze", [t, n.const(np.array([3], np.int64))])            # N×8×24×1
    t = n.op("Squeeze", [t, n.const(np.array([3], np.int64))])
    t = n.op("Transpose", [t], perm=[0, 2, 1])                              # N×24×8
    out = n.op("MatMul", [t, n.const(n.w(8, 5), "M")])
    model = kill(n.model([out]), "c1", [0, 7])
    result, _ = prune_dead(model, 2)
    assert_exact(model, result, 2)


# ---- ops without a rule ----------------------------------------------------------------


def shuffle_net():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    t = n.op("Reshape", [t, n.const(np.array([1, 2, 4, 12, 12], np.int64))])
    t = n.op("Transpose", [t], perm=[0, 2, 1, 3, 4])
    t = n.op("Reshape", [t, n.const(np.array([1, 8, 12, 12], np.int64))])
    t = n.op("Relu", [n.conv(t, 8, 8, name="c2")])
    return n.model([n.conv(t, 8, 4, name="c3")])


def test_channel_shuffle_group_is_left_whole_and_named():
    result = compress(shuffle_net(), ["prune"], options={"prune_ratio": 0.5},
                      log=lambda m: None)
    report = result.report["passes"][-1]
    skipped = {s["node"]: s["reason"] for s in report["skipped"]}
    assert "c1" in skipped and "Reshape" in skipped["c1"]
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert w["c1"][0] == 8 and w["c2"][0] == 4       # c1 whole, c2 pruned


def test_lrn_mixes_channels_so_its_group_stays():
    n = Net()
    t = n.op("LRN", [n.conv("x", 3, 8, name="c1")], size=3)
    t = n.op("Relu", [n.conv(t, 8, 8, name="c2")])
    model = n.model([n.conv(t, 8, 4, name="c3")])
    result = compress(model, ["prune"], options={"prune_ratio": 0.5}, log=lambda m: None)
    reasons = [s["reason"] for s in result.report["passes"][-1]["skipped"]]
    assert any("LRN mixes neighbouring channels" in r for r in reasons)


@pytest.mark.parametrize("index, blocked", [(1, True), (2, False)])
def test_shape_blocks_only_when_the_channel_count_is_read(index, blocked):
    # A second output reports one dim of c1's output: the channel count (index 1)
    # would change with pruning, the height (index 2) would not. (The frontend folds
    # static dims to constants; dynamic ones reach the rule, so it runs unfolded here.)
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    dim = n.op("Gather", [n.op("Shape", [t]), n.const(np.array([index], np.int64))])
    model = n.model([n.conv(t, 8, 4, name="c2"), dim])
    groups = DependencyGraph(Graph.from_onnx(model)).groups
    c1 = next(g for g in groups if g.sources == ["c1"])
    assert (c1.blocked is not None and "Shape reads the channel count" in c1.blocked) \
        == blocked, c1.blocked


def test_gather_off_the_channel_axis_moves_it_and_on_it_blocks():
    n = Net()
    t = n.conv("x", 3, 8, name="c1")                       # [1, 8, 12, 12]
    row = n.op("Gather", [t, n.const(np.array(0, np.int64))], axis=2)   # [1, 8, 12]
    flat = n.op("Flatten", [row], axis=1)
    out1 = n.gemm(flat, 8 * 12, 4, name="fc")
    t2 = n.conv("x", 3, 8, name="c2")
    pick = n.op("Gather", [t2, n.const(np.array([0, 2], np.int64))], axis=1)
    out2 = n.conv(pick, 2, 4, name="c3")
    model = kill(n.model([out1, out2]), "c1", [3])
    result, _ = prune_dead(model, 1)
    skipped = {s["node"]: s["reason"] for s in result.report["passes"][-1]["skipped"]}
    assert "Gather selects channels" in skipped["c2"]
    fc = next(x for x in result.graph.nodes if x.name == "fc")
    assert fc.inputs[1].values.shape == (4, 7 * 12)
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    ref, out = Runner(model).run({"x": x}), Runner(result.graph).run({"x": x})
    assert compare_outputs(ref, out).max_rel <= 1e-6


def test_nothing_prunable_leaves_the_model_and_warns_naming_the_layer():
    n = Net()
    model = n.model([n.conv("x", 3, 4, name="only")])
    lines = []
    result = compress(model, ["prune"], options={"prune_ratio": 0.5}, log=lines.append)
    warned = [line for line in lines if "prune changed nothing" in line]
    assert len(warned) == 1 and "only" in warned[0] and "reaches graph output" in warned[0]
    rep = result.report["passes"][-1]
    assert rep["changed"] == 0 and rep["skipped"][0]["node"] == "only"
    assert result.graph.nodes[0].inputs[1].values.shape == (4, 3, 3, 3)


def test_nothing_prunable_under_a_flops_budget_is_a_clear_error():
    n = Net()
    model = n.model([n.conv("x", 3, 4, name="only")])
    with pytest.raises(UnsupportedError, match="--prune-flops cannot be met: nothing to "
                                               "prune.*only"):
        compress(model, ["prune"], options={"prune_flops": 0.5}, log=lambda m: None)


def test_skip_pattern_matching_nothing_is_a_usage_error():
    with pytest.raises(UsageError, match="matches no prunable layer"):
        compress(shuffle_net(), ["prune"], options={"prune_ratio": 0.5,
                                                    "prune_skip": "nope*"},
                 log=lambda m: None)


def test_skip_pattern_leaves_matching_group_whole():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    t = n.op("Relu", [n.conv(t, 8, 8, name="c2")])
    model = n.model([n.conv(t, 8, 4, name="c3")])
    result = compress(model, ["prune"], options={"prune_ratio": 0.5, "prune_skip": "c2"},
                      log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert (w["c1"][0], w["c2"][0]) == (4, 8)


def test_grouped_conv_groups_lose_equal_counts():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    t = n.op("Relu", [n.conv(t, 8, 8, group=2, name="gc")])
    model = kill(n.model([n.conv(t, 8, 4, name="c3")]), "c1", [0, 1])   # both in group 0
    result = compress(model, ["prune"], options={"prune_ratio": 0.25}, log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert w["gc"][1] * 2 == w["c1"][0]      # each of the 2 groups keeps the same count


def test_residual_groups_are_left_whole_unless_asked():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c0")])
    a = n.conv(n.op("Relu", [n.conv(t, 8, 8, name="ca")]), 8, 8, name="cb")
    out = n.conv(n.op("Relu", [n.op("Add", [a, t])]), 8, 4, name="c3")
    model = n.model([out])
    result = compress(model, ["prune"], options={"prune_ratio": 0.5}, log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert (w["c0"][0], w["ca"][0], w["cb"][0]) == (8, 4, 8)
    skipped = result.report["passes"][-1]["skipped"]
    assert any("residual group" in s["reason"] and "c0" in s["node"] for s in skipped)
    result = compress(model, ["prune"], options={"prune_ratio": 0.5, "prune_residual": True},
                      log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert (w["c0"][0], w["ca"][0], w["cb"][0]) == (4, 4, 4)


def test_multiple_rounds_kept_channels_up():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 40, name="c1")])
    model = n.model([n.conv(t, 40, 4, name="c2")])
    result = compress(model, ["prune"], options={"prune_ratio": 0.7, "prune_multiple": 16},
                      log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert w["c1"][0] == 16          # 40·0.3 = 12 kept -> rounded up to 16


def test_min_channels_is_respected():
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c1")])
    model = n.model([n.conv(t, 8, 4, name="c2")])
    result = compress(model, ["prune"], options={"prune_ratio": 0.9,
                                                 "prune_min_channels": 3},
                      log=lambda m: None)
    w = {n.name: n.inputs[1].values.shape for n in result.graph.nodes if n.op == "Conv"}
    assert w["c1"][0] == 3


def test_ort_layout_turns_channel_pad_shortcuts_into_selection_convs():
    # The option-A shortcut (Slice step 2 on H and W, zero Pad on channels) becomes a
    # 1x1 stride-2 Conv with a 0/1 weight: same outputs, no Pad/Slice left.
    n = Net()
    t = n.op("Relu", [n.conv("x", 3, 8, name="c0")])
    big = np.array([2 ** 62], np.int64)
    sc = n.op("Slice", [t, n.const(np.array([0, 0], np.int64)), n.const(np.r_[big, big]),
                        n.const(np.array([2, 3], np.int64)), n.const(np.array([2, 2], np.int64))])
    sc = n.op("Pad", [sc, n.const(np.array([0, 4, 0, 0, 0, 4, 0, 0], np.int64))])
    m = n.conv(n.op("Relu", [n.conv(t, 8, 16, name="c1", strides=[2, 2])]), 16, 16, name="c2")
    model = n.model([n.op("Relu", [n.op("Add", [m, sc])])])
    plain = compress(model, ["prune"], options={"prune_ratio": 0.5}, log=lambda m: None)
    res = compress(model, ["prune"], options={"prune_ratio": 0.5, "prune_ort_layout": True},
                   log=lambda m: None)
    ops = [x.op for x in res.graph.nodes]
    assert "Pad" not in ops and "Slice" not in ops
    sel = next(x for x in res.graph.nodes if x.name.endswith("_as_conv"))
    assert sel.attrs["strides"] == [2, 2]
    w = np.asarray(sel.inputs[1].values)[:, :, 0, 0]
    assert set(np.unique(w)) <= {0.0, 1.0} and (w.sum(0) == 1).all()
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    cmp = compare_outputs(Runner(plain.graph).run({"x": x}), Runner(res.graph).run({"x": x}))
    assert cmp.max_abs <= 1e-6


def test_nothing_prunable_with_named_group_ratios_is_a_clear_error():
    n = Net()
    model = n.model([n.conv("x", 3, 4, name="only")])
    with pytest.raises(UnsupportedError, match="--prune-group-ratios cannot be met"):
        compress(model, ["prune"], options={"prune_group_ratios": "only=0.5"},
                 log=lambda m: None)
