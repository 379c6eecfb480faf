"""prune on transformers: MLP hidden width and whole attention heads, through torch's
exports (nn.TransformerEncoder's fused in_proj and computed Reshape targets, timm-style
reshape/permute/index, chunk, separate q/k/v). Dead heads/units (zeroed q/k/v, zeroed
fc1 rows) must be removed exactly; ratio runs must give an artifact ORT runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc import frontend
from onnxc.compress import compress
from onnxc.passes.prune import prunable_groups
from onnxc.passes.prune.groups import DependencyGraph
from onnxc.verify import Runner, compare_outputs

from prune_torch_nets import Bert, MaskedAttention, ViT, WindowAttention, rng_ids

QUIET = {"log": lambda m: None}


def prune_report(result):
    return next(p for p in result.report["passes"] if p["name"] == "prune")


def removed_by_source(result):
    """{source layer of the group: channels removed} from the report."""
    return {g["group"]: g["removed"] for g in prune_report(result)["extra"]["per_group"]}


def prune_dead(model, dead: int, **options):
    graph = frontend.load(model)
    n = sum(len(g.classes) for g in prunable_groups(DependencyGraph(graph), []))
    opts = {"prune_ratio": (dead + 0.5) / n, "prune_global": True, "prune_criterion": "l1",
            "prune_multiple": 1}
    opts.update(options)
    return compress(model, ["prune"], options=opts, **QUIET)


def run_both(model, pruned, feeds):
    ref = Runner(model).run(feeds)
    out = Runner(pruned).run(feeds)
    return ref, out


def test_bert_dead_heads_and_units_are_removed_exactly():
    net = Bert().kill(heads={0: [1], 1: [3]}, units={0: [5, 9, 77], 1: [0, 100]})
    model = net.onnx()
    result = prune_dead(model, 2 + 5)
    ids = rng_ids(net.vocab, 3, net.seq)          # batch 3: dynamic batch kept
    ref, out = run_both(model, result.graph, {"ids": ids})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    removed = removed_by_source(result)
    assert removed["/enc/layers.0/self_attn/MatMul"] == 1      # one head (q, k, v) each
    assert removed["/enc/layers.1/self_attn/MatMul"] == 1
    assert removed["/enc/layers.0/linear1/MatMul"] == 3
    assert removed["/enc/layers.1/linear1/MatMul"] == 2
    w = {i.name: numpy_helper.to_array(i) for i in result.graph.to_onnx().graph.initializer}
    in_proj = [w[n.inputs[1].name] for n in result.graph.nodes
               if n.name == "/enc/layers.0/self_attn/MatMul"][0]
    assert in_proj.shape == (64, 3 * 48)


def test_static_batch_merged_with_heads_prunes_heads_exactly():
    # Batch 2 fixed: torch's [T, B*H, Dh] axis holds the heads twice.
    net = Bert().kill(heads={0: [2], 1: [0]}, units={})
    model = net.onnx(dynamic_batch=False)
    result = prune_dead(model, 2)
    ids = rng_ids(net.vocab, 2, net.seq)
    ref, out = run_both(model, result.graph, {"ids": ids})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert removed_by_source(result)["/enc/layers.1/self_attn/MatMul"] == 1


def test_padding_mask_expanded_over_heads_is_pruned_with_them():
    net = Bert(padding_mask=True).kill(heads={0: [0], 1: [2]}, units={1: [4]})
    model = net.onnx()
    result = prune_dead(model, 3)
    pad = np.zeros((3, net.seq), bool)
    pad[0, 10:], pad[2, 3:] = True, True
    ref, out = run_both(model, result.graph, {"ids": rng_ids(net.vocab, 3, net.seq),
                                              "pad": pad})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert removed_by_source(result)["/enc/layers.0/self_attn/MatMul"] == 1


def test_window_attention_mask_view_keeps_heads_prunable():
    # Swin: scores [B*nW, H, N, N] viewed as [B, nW, H, N, N] for the per-window mask:
    # the batch-and-windows axis splits while the heads stay on their own axis.
    net = WindowAttention().kill(heads=[3])
    model = net.onnx()
    result = prune_dead(model, 1)
    x = np.random.default_rng(0).standard_normal((3, 64, 32)).astype(np.float32)
    ref, out = run_both(model, result.graph, {"x": x})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert list(removed_by_source(result).values()) == [1]


def test_additive_attention_mask_broadcast_over_heads_does_not_block_them():
    net = MaskedAttention().kill(heads=[1, 6])
    model = net.onnx()
    result = prune_dead(model, 2)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 16, 64)).astype(np.float32),
             "mask": (rng.random((3, 16)) > 0.3).astype(np.int64)}
    ref, out = run_both(model, result.graph, feeds)
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert list(removed_by_source(result).values()) == [2]        # the q, k, v heads


def test_bert_prunes_heads_and_mlp_at_30_percent_and_runs():
    net = Bert(d=64, heads=8, ff=256)
    model = net.onnx()
    result = compress(model, ["prune"], options={"prune_ratio": 0.3}, **QUIET)
    removed = removed_by_source(result)
    for layer in (0, 1):
        assert removed[f"/enc/layers.{layer}/self_attn/MatMul"] == 2      # 8 -> 6 heads
        assert removed[f"/enc/layers.{layer}/linear1/MatMul"] == 72       # 256 -> 184
    for batch in (1, 4):
        out = Runner(result.graph).run({"ids": rng_ids(net.vocab, batch, net.seq)})
        assert out[0].shape == (batch, 3)
    onnx.checker.check_model(result.graph.to_onnx())


@pytest.mark.parametrize("qkv", ["gather", "split", "separate"])
def test_vit_dead_heads_and_units_are_removed_exactly(qkv):
    net = ViT(qkv=qkv).kill(heads={0: [0, 2], 1: [1]}, units={0: [3], 1: [7, 8]})
    model = net.onnx()
    result = prune_dead(model, 3 + 3)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref, out = run_both(model, result.graph, {"x": x})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    assert prune_report(result)["extra"]["channels_removed"] == 6
    kinds = sorted(removed_by_source(result).values())
    assert kinds == [1, 1, 2, 2]                   # per block: heads and MLP units


def test_vit_prunes_heads_and_mlp_at_30_percent_and_runs():
    net = ViT(d=128, heads=8, mlp=256)
    model = net.onnx()
    result = compress(model, ["prune"], options={"prune_ratio": 0.3}, **QUIET)
    removed = removed_by_source(result)
    heads = [v for k, v in removed.items() if "qkv" in k]
    mlp = [v for k, v in removed.items() if "fc1" in k]
    assert heads == [2, 2] and mlp == [72, 72]
    out = Runner(result.graph).run(
        {"x": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)})
    assert out[0].shape == (2, 10)


def test_head_counts_are_not_rounded_like_channel_counts():
    # 16 heads of 8 channels: any head count keeps a multiple of 8 channels, so the
    # default rounding (kept channels to multiples of 8 in groups of >= 16) must not
    # round 16 - 4 heads back up to 16. --prune-multiple 32 needs kept heads x 8
    # channels to be a multiple of 32, i.e. 4 heads at a time: 12 stays, 13 becomes 16.
    model = ViT(d=128, heads=16, mlp=256, depth=1).onnx()
    for options, heads in (({}, 12), ({"prune_multiple": 32}, 12),
                           ({"prune_multiple": 32, "prune_ratio": 0.2}, 16)):
        result = compress(model, ["prune"], options={"prune_ratio": 0.3, **options},
                          **QUIET)
        removed = removed_by_source(result)
        assert 16 - removed.get("/blocks/blocks.0/attn/qkv/MatMul", 0) == heads, options


def test_per_head_layernorm_leaves_heads_whole_and_says_why():
    # QK-norm (LayerNorm over each head's features) has no channel rule: the heads
    # stay, reported with the node and reason; the MLP is still pruned.
    model = ViT(qk_norm=True, qkv="separate").onnx()
    result = compress(model, ["prune"], options={"prune_ratio": 0.3}, **QUIET)
    skipped = prune_report(result)["skipped"]
    assert any("LayerNormalization" in s["reason"] and "attn/q" in s["node"]
               for s in skipped), skipped
    removed = removed_by_source(result)
    assert all("fc1" in k for k in removed) and len(removed) == 2


def test_heads_merged_outside_the_batch_are_left_whole_and_say_why():
    model = ViT(qkv="heads_outer").onnx()
    result = compress(model, ["prune"], options={"prune_ratio": 0.3}, **QUIET)
    skipped = prune_report(result)["skipped"]
    assert any("batch" in s["reason"] and "attn/q" in s["node"] for s in skipped), skipped
    removed = removed_by_source(result)
    assert all("fc1" in k for k in removed) and len(removed) == 2
    out = Runner(result.graph).run(
        {"x": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)})
    assert out[0].shape == (3, 10)


def _gelu_mlp(gelu_op: bool):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[:, [4, 20]] = 0
    b1 = rng.standard_normal(32).astype(np.float32)
    b1[[4, 20]] = 0
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.float32(np.sqrt(2)), "sqrt2"),
              (np.float32(1), "one"), (np.float32(0.5), "half"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias")]
    if gelu_op:
        nodes.append(helper.make_node("Gelu", ["hb"], ["g"], name="gelu"))
    else:   # torch's export of nn.GELU below opset 20
        nodes += [helper.make_node("Div", ["hb", "sqrt2"], ["d"], name="div"),
                  helper.make_node("Erf", ["d"], ["e"], name="erf"),
                  helper.make_node("Add", ["e", "one"], ["e1"], name="add"),
                  helper.make_node("Mul", ["hb", "e1"], ["m"], name="mul"),
                  helper.make_node("Mul", ["m", "half"], ["g"], name="mul_half")]
    nodes.append(helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"))
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 16])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20 if gelu_op else 17)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("gelu_op", [False, True], ids=["erf_pattern", "gelu_op"])
def test_mlp_hidden_width_through_gelu(gelu_op):
    model = _gelu_mlp(gelu_op)
    result = prune_dead(model, 2)
    x = np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)
    ref, out = run_both(model, result.graph, {"x": x})
    assert compare_outputs(ref, out).max_rel <= 1e-5
    w2 = next(n for n in result.graph.nodes if n.name == "fc2").inputs[1].values
    assert w2.shape == (30, 16)


def test_lowrank_still_splits_matmul_weights_of_the_pruned_encoder():
    net = Bert(d=64, heads=8, ff=256)
    # ranks unrounded: at d=64 the target's default multiple of 8 leaves no saving
    result = compress(net.onnx(), ["prune", "lowrank"],
                      options={"prune_ratio": 0.3, "lowrank_multiple": 1}, **QUIET)
    lr = next(p for p in result.report["passes"] if p["name"] == "lowrank")
    assert lr["changed"] > 0
    out = Runner(result.graph).run({"ids": rng_ids(net.vocab, 2, net.seq)})
    assert out[0].shape == (2, 3)
