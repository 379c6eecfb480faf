"""The recover pass: distillation keeps the compressed structure, improves the student,
stays on quantization grids, is deterministic, and rejects bad input with one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import CIFAR_FLAGS, cifar_preprocess, run_cli
from onnxc import frontend
from onnxc.calibrate.readers import load_npz
from onnxc.passes.recover import Recover, structure
from onnxc.pipeline import Context, PassReport

FAST = {"recover_epochs": 1.0, "recover_batch": 32, "recover_threads": 1}


def prune_block_internal(graph, ratio=0.5):
    """L1-prune the first conv of each residual block (conv1 → Relu → conv2): the
    simplest structured compression, built here so the test needs no other pass."""
    for c1 in list(graph.nodes):
        outs = c1.outputs[0].outputs if c1.op == "Conv" else []
        if len(outs) != 1 or outs[0].op != "Relu":
            continue
        cons = outs[0].outputs[0].outputs
        if len(cons) != 1 or cons[0].op != "Conv":
            continue
        c2 = cons[0]
        w1, b1 = graph.constant(c1.inputs[1]), graph.constant(c1.inputs[2])
        w2 = graph.constant(c2.inputs[1])
        keep = np.sort(np.argsort(-np.abs(w1).sum((1, 2, 3)))[:max(1, int(len(w1) * ratio))])
        c1.inputs[1] = graph.make_constant(c1.name + "_w_p", w1[keep])
        c1.inputs[2] = graph.make_constant(c1.name + "_b_p", b1[keep])
        c2.inputs[1] = graph.make_constant(c2.name + "_w_p", w2[:, keep])
    return graph.refresh()


@pytest.fixture(scope="module")
def teacher(resnet20_path):
    return frontend.load(resnet20_path)


@pytest.fixture(scope="module")
def train128(teacher, cifar_train_path):
    return load_npz(str(cifar_train_path), teacher, cifar_preprocess(), samples=128)


def _recover(student, teacher, data, **opts):
    ctx = Context(seed=0, calibration=data, original=teacher, progress=False,
                  log=lambda m: None)
    report = PassReport("recover", False)
    out = Recover({**FAST, **opts}).run(student, ctx, report)
    return out, report


def _onnx_signature(graph):
    """Op types and inferred shapes of every tensor, read back from the exported model."""
    model = onnx.shape_inference.infer_shapes(graph.to_onnx())
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    inits = {i.name: (list(i.dims), i.data_type) for i in model.graph.initializer}
    return [n.op_type for n in model.graph.node], shapes, inits


def test_structure_is_identical_after_recover(teacher, train128):
    student = prune_block_internal(teacher.copy())
    before_sig, before_onnx = structure(student), _onnx_signature(student)
    before_w = {n: np.array(t.values) for n, t in student.tensors().items()
                if isinstance(t, gs.Constant)}
    out, report = _recover(student, teacher, train128)
    assert structure(out) == before_sig
    assert _onnx_signature(out.refresh()) == before_onnx
    changed = [n for n, t in out.tensors().items() if isinstance(t, gs.Constant)
               and n in before_w and not np.array_equal(before_w[n], t.values)]
    assert len(changed) == report.changed > 0
    assert report.extra["loss_log"] and report.extra["steps"] > 0


def test_recover_brings_student_closer_to_teacher(teacher, train128):
    from onnxc.execution import Runner

    student = prune_block_internal(teacher.copy())
    x = train128.inputs["input"]
    ref = Runner(teacher).run({"input": x})[0]
    before = Runner(student).run({"input": x})[0]
    out, _ = _recover(student.copy(), teacher, train128, recover_epochs=3.0)
    after = Runner(out).run({"input": x})[0]
    agree = [np.mean(o.argmax(1) == ref.argmax(1)) for o in (before, after)]
    assert agree[1] > agree[0]


def test_a_student_that_already_matches_is_left_unchanged(teacher, train128):
    """Weights are kept from the epoch with the lowest held-out KD loss — here the
    input's own, since any step away from the teacher's weights can only add loss."""
    student = teacher.copy()
    before = {n: np.array(t.values) for n, t in student.tensors().items()
              if isinstance(t, gs.Constant)}
    out, report = _recover(student, teacher, train128, recover_lr=0.05)
    assert report.extra["kept_epoch"] == 0
    assert all(np.array_equal(before[n], t.values) for n, t in out.tensors().items()
               if isinstance(t, gs.Constant))


def test_recover_is_deterministic(teacher, train128):
    a, _ = _recover(prune_block_internal(teacher.copy()), teacher, train128)
    b, _ = _recover(prune_block_internal(teacher.copy()), teacher, train128)
    wa = {n: t.values for n, t in a.tensors().items() if isinstance(t, gs.Constant)}
    wb = {n: t.values for n, t in b.tensors().items() if isinstance(t, gs.Constant)}
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)


def _quantize_weights(graph, levels: str):
    """Put every 3×3 conv weight behind a per-channel DequantizeLinear with int8 codes:
    'int8' (symmetric, 127 levels), 'ternary' (TWN threshold) or 'binary' (sign)."""
    for node in [n for n in graph.nodes if n.op == "Conv"]:
        w = graph.constant(node.inputs[1])
        if w.shape[2] != 3:
            continue
        flat = np.abs(w).reshape(len(w), -1)
        if levels == "int8":
            scale = flat.max(1) / 127
            q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127)
        elif levels == "ternary":
            delta = 0.7 * flat.mean(1)[:, None, None, None]
            q = np.sign(w) * (np.abs(w) > delta)
            scale = np.array([np.abs(wc[qc != 0]).mean() for wc, qc in zip(w, q)])
        else:
            q = np.where(w >= 0, 1, -1)
            scale = flat.mean(1)
        out = graph.make_variable(node.name + "_wdq", np.float32, w.shape)
        dq = gs.Node("DequantizeLinear", graph.unique_name(node.name + "_dq"),
                     attrs={"axis": 0},
                     inputs=[graph.make_constant(node.name + "_wq", q.astype(np.int8)),
                             graph.make_constant(node.name + "_ws", scale.astype(np.float32)),
                             graph.make_constant(node.name + "_wz",
                                                 np.zeros(len(w), np.int8))],
                     outputs=[out])
        node.inputs[1] = out
        graph.gs.nodes.append(dq)
    return graph.refresh()


@pytest.mark.parametrize("levels,allowed", [("int8", None), ("ternary", {-1, 0, 1}),
                                             ("binary", {-1, 1})])
def test_quantized_student_stays_on_its_grid(teacher, train128, levels, allowed):
    student = _quantize_weights(teacher.copy(), levels)
    scales = {n: np.array(t.values) for n, t in student.tensors().items()
              if n.endswith("_ws")}
    before = structure(student)
    n_quant = sum(n.op == "DequantizeLinear" for n in student.nodes)
    out, report = _recover(student, teacher, train128)
    assert structure(out) == before
    assert report.extra["quantized_weights"] == {
        {"int8": "int", "ternary": "ternary", "binary": "binary"}[levels]: n_quant}
    for name, t in out.tensors().items():
        if name.endswith("_wq"):
            assert t.values.dtype == np.int8
            if allowed:
                assert set(np.unique(t.values).tolist()) <= allowed
        if name.endswith("_ws"):
            if levels == "int8":
                assert np.array_equal(t.values, scales[name])      # grid unchanged
            else:
                # Ternary/binary α is learned, stored float16-exact (the packed file's
                # precision) in the same float32 constant.
                assert t.values.dtype == np.float32 and t.values.shape == scales[name].shape
                assert np.array_equal(t.values.astype(np.float16).astype(np.float32),
                                      t.values)
    if levels != "int8":
        assert report.extra["learned_lowbit_scales"] == n_quant
        # The codes were made from the teacher's weights: training starts from those.
        assert report.extra["float_latents"] == n_quant
        assert any(not np.array_equal(t.values, scales[n])
                   for n, t in out.tensors().items() if n.endswith("_ws"))


def test_reduced_range_int8_codes_stay_in_their_range():
    """int8 weights quantized to ±63 (reduced range, no VNNI) must not drift to ±127:
    a latent pushed far beyond the grid is stored at the grid's end."""
    import torch

    from onnxc.passes.recover.torch_graph import QuantWeight

    q = np.array([[-63, 5, 63], [12, -63, 0]], np.int8)
    qw = QuantWeight(q, np.array([0.1, 0.2], np.float32), np.zeros(2, np.int8), 0)
    assert (qw.kind, qw.qmin, qw.qmax) == ("int", -63, 63)
    far = qw.latent(q) * 3
    assert np.array_equal(qw.to_storage(far), np.clip(q.astype(int) * 3, -63, 63))
    full = QuantWeight(np.array([[-127, 3], [127, 0]], np.int8), np.ones(2, np.float32),
                       np.zeros(2, np.int8), 0)
    assert (full.qmin, full.qmax) == (-127, 127)
    assert torch.equal(full.quantize(torch.tensor([[500.0, 0.0], [0.0, -500.0]])),
                       torch.tensor([[127.0, 0.0], [0.0, -127.0]]))


@pytest.mark.parametrize("levels", ["ternary", "binary"])
def test_float_latent_reproduces_the_codes_or_is_refused(levels):
    """A float latent is used only if quantizing it gives back the stored codes."""
    from onnxc.passes.recover.torch_graph import QuantWeight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    flat = np.abs(w).reshape(4, -1)
    if levels == "ternary":
        q = (np.sign(w) * (np.abs(w) > 0.7 * flat.mean(1)[:, None, None, None])).astype(np.int8)
    else:
        q = np.where(w >= 0, 1, -1).astype(np.int8)
    qw = QuantWeight(q, flat.mean(1).astype(np.float32), np.zeros(4, np.int8), 0)
    latent = qw.float_latent(q, w, 0)
    assert latent is not None and qw.kind == levels
    assert np.array_equal(qw.quantize(latent).round().numpy().astype(np.int8), q)
    other = -w                       # codes not made from this weight: refused
    assert qw.float_latent(q, other, 0) is None
    assert qw.float_latent(q, w[:2], 0) is None          # wrong shape


def test_lowbit_scales_stay_fixed_when_asked(teacher, train128):
    student = _quantize_weights(teacher.copy(), "ternary")
    scales = {n: np.array(t.values) for n, t in student.tensors().items()
              if n.endswith("_ws")}
    out, report = _recover(student, teacher, train128, recover_scales="fixed")
    assert report.extra["learned_lowbit_scales"] == 0
    assert all(np.array_equal(t.values, scales[n]) for n, t in out.tensors().items()
               if n.endswith("_ws"))


def test_recovered_ternary_artifact_repacks_its_codes(resnet20_path, cifar_train_path,
                                                      tmp_path):
    """ternary writes packed_weights.npz before recover changes codes and α; the
    artifact's packed file must hold the trained ones, equal to the model's."""
    from onnx import numpy_helper

    from onnxc.calibrate.lowbit import unpack_layers

    code, _, err = run_cli("compress", resnet20_path, "--passes", "fold_bn,ternary,recover",
                           "--calib-data", cifar_train_path, "--calib-samples", "128",
                           *CIFAR_FLAGS, "--recover-epochs", "1", "--recover-threads", "1",
                           "--quiet", "-o", tmp_path / "t")
    assert code == 0, err
    model = onnx.load(str(tmp_path / "t" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumer = {n.input[1]: n.name for n in model.graph.node
                if n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    packed = unpack_layers((tmp_path / "t" / "packed_weights.npz").read_bytes())
    checked = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.output[0] not in consumer:
            continue
        layer = consumer[n.output[0]]
        codes, alpha = packed[layer]
        assert np.array_equal(codes, inits[n.input[0]])
        assert np.array_equal(alpha, inits[n.input[1]])
        checked += 1
    assert checked == len(packed) > 0


# ---- bad input: one line, documented exit code -----------------------------------------

def _error_line(err: str) -> str:
    """The CLI's single error line (no traceback around it)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxc: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_recover_without_data_is_refused(resnet20_path, tmp_path):
    code, _, err = run_cli("compress", resnet20_path, "--passes", "recover",
                           "-o", tmp_path / "out")
    assert code == 2
    assert "recover needs training images" in _error_line(err)


def test_recover_data_of_the_wrong_shape_is_refused(resnet20_path, tmp_path):
    bad = tmp_path / "small.npz"
    np.savez(bad, images=np.zeros((4, 3, 16, 16), np.uint8))
    code, _, err = run_cli("compress", resnet20_path, "--passes", "recover",
                           "--recover-data", bad, *CIFAR_FLAGS, "-o", tmp_path / "out")
    assert code == 7
    assert "expects [3, 32, 32]" in _error_line(err)


def test_recover_missing_data_file_is_refused(resnet20_path, tmp_path):
    code, _, err = run_cli("compress", resnet20_path, "--passes", "recover",
                           "--recover-data", tmp_path / "nope.npz", "-o", tmp_path / "out")
    assert code == 7 and "not found" in _error_line(err)


def test_graph_with_untrainable_op_is_refused(tmp_path, cifar_train_path):
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("TopK", ["f", "k"], ["y", "i"], axis=1)]
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        nodes, "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([4], np.int64), "k")])
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, _, err = run_cli("compress", path, "--passes", "recover", "--calib-data",
                           cifar_train_path, "--calib-samples", "16", *CIFAR_FLAGS,
                           "-o", tmp_path / "out")
    assert code == 4
    assert "cannot train graphs with op(s) TopK" in _error_line(err)


def test_static_batch_graph_trains_in_slices_of_its_batch(tmp_path):
    """A graph whose batch is fixed (here 2, baked into a Reshape as exported models
    with a static --input-shape have it) trains with a larger --recover-batch: both
    graphs run in slices of 2. Found by tools/fuzz.py (it was an internal error)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda *shape: numpy_helper.from_array(   # noqa: E731
        (rng.standard_normal(shape) * 0.3).astype(np.float32), f"w{len(shape)}")
    nodes = [helper.make_node("Conv", ["x", "w4"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)]
    g = helper.make_graph(
        nodes, "static", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [w(8, 3, 3, 3), w(5, 8 * 36), numpy_helper.from_array(np.array([2, -1], np.int64),
                                                             "shape")])
    path = tmp_path / "static.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    data = tmp_path / "d.npz"
    np.savez(data, images=rng.integers(0, 256, (120, 3, 6, 6)).astype(np.uint8))
    code, _, err = run_cli("compress", path, "--passes", "ternary,recover", "--keep-float",
                           "none", "--calib-data", data, "--scale", "0.0039",
                           "--recover-epochs", "2", "--recover-batch", "8",
                           "--recover-threads", "1", "-o", tmp_path / "out")
    assert code == 0, err
    import json

    rec = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][-1]
    assert rec["name"] == "recover" and rec["extra"]["steps"] == 2 * (108 // 8)   # 12 held out
    kd = [e["kd"] for e in rec["extra"]["held_out"]]
    assert min(kd[1:]) < kd[0]               # training moved the student toward the teacher


# ---- end to end through the CLI --------------------------------------------------------

def test_cli_prune_then_recover_keeps_the_pruned_structure(resnet20_path, cifar_train_path,
                                                           cifar_test_path, tmp_path):
    """`--recover-data` with the CLI's preprocessing flags; the artifact of
    prune+recover has exactly the op types and initializer shapes of prune alone."""
    from onnxc.pipeline import all_passes

    if "prune" not in all_passes():
        pytest.skip("prune pass not registered in this checkout")
    common = ["--prune-flops", "0.5", "--calib-data", cifar_train_path, "--calib-samples",
              "64", "--eval-data", cifar_test_path, "--eval-samples", "64", *CIFAR_FLAGS,
              "--quiet"]
    code, _, err = run_cli("compress", resnet20_path, "--passes", "fold_bn,prune",
                           *common, "-o", tmp_path / "p")
    assert code == 0, err
    code, out, err = run_cli("compress", resnet20_path, "--passes", "fold_bn,prune,recover",
                             *common, "--recover-data", cifar_train_path,
                             "--recover-epochs", "0.02", "--recover-threads", "1",
                             "-o", tmp_path / "pr")
    assert code == 0, err
    a = onnx.load(str(tmp_path / "p" / "model.onnx"))
    b = onnx.load(str(tmp_path / "pr" / "model.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert sorted((i.name, tuple(i.dims)) for i in a.graph.initializer) == \
        sorted((i.name, tuple(i.dims)) for i in b.graph.initializer)
    import json

    report = json.loads((tmp_path / "pr" / "report.json").read_text())
    rec = report["passes"][-1]
    assert rec["name"] == "recover" and rec["extra"]["samples"] == 5085
    assert rec["extra"]["loss_log"] and rec["extra"]["data"].endswith("train.npz")
