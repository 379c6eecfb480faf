"""QDQ -> integer lowering for the TVM targets (backends/tvm/int_lower.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from quant_helpers import CONV3X3, random_init, residual_block  # noqa: E402
from test_tvm_slow import arm_sysroot  # noqa: E402,F401  (fixture: the aarch64 sysroot)


def conv_chain(channels: int = 16, size: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-Conv-Add(residual)-Relu, output the 4-D activation itself, so
    every output element is one requantized value (nothing averages differences away)."""
    c = channels
    nodes, inits = residual_block(random_init(np.random.default_rng(seed)), c, "y")
    graph = helper.make_graph(
        nodes, "conv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def qdq_model():
    """The conv chain through onnxc's own int8 pass (uint8 activations, int8 weights)."""
    return _int8(conv_chain())


@pytest.fixture(scope="module")
def x86_artifact(qdq_model, tmp_path_factory):
    from onnxc.backends.tvm import compile_model

    return compile_model(qdq_model, "x86", str(tmp_path_factory.mktemp("x86")), verify=False)


def _import(model):
    from onnxc.backends.tvm.build import import_relax, io_signature

    inputs, _ = io_signature(model)
    return import_relax(model, inputs)


def _calls(mod, name: str) -> list:
    from tvm import ir, relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op) \
                and expr.op.name == "relax." + name:
            found.append(expr)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _output_scale(model) -> float:
    last = model.graph.node[-1]
    assert last.op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return float(inits[last.input[1]])


def test_convs_and_residual_add_become_integer_ops(qdq_model):
    from onnxc.backends.tvm.int_lower import lower_qdq

    mod, report = lower_qdq(_import(qdq_model))
    assert (report.conv, report.add, report.skipped) == (3, 1, {})
    convs = _calls(mod, "nn.conv2d")
    assert len(convs) == 3
    for conv in convs:
        assert str(conv.attrs.out_dtype) == "int32"
        assert str(conv.args[0].ty.dtype) == "uint8"
        assert str(conv.args[1].ty.dtype) == "int8"
    assert not _calls(mod, "dequantize") or all(          # only the graph output's
        str(c.ty.dtype) == "float32" for c in _calls(mod, "dequantize"))
    assert len(_calls(mod, "dequantize")) == 1


def test_same_shape_convs_share_one_kernel_whatever_their_scales(qdq_model):
    import tvm
    from tvm import relax, tirx

    from onnxc.backends.tvm.int_lower import lower_qdq

    mod, _ = lower_qdq(_import(qdq_model))
    with tvm.target.Target("llvm"):
        mod = relax.pipeline.zero_pipeline()(mod)
    kernels = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    # conv1 and conv2 (16->16) have different scales; conv2's kernel also holds the
    # residual add. With scales passed as tensors, conv1 is one kernel, conv0 another.
    assert len([k for k in kernels if "subtract" not in k]) == 2


def test_integer_artifact_within_one_quantization_step_of_onnxruntime(qdq_model,
                                                                    x86_artifact):
    import onnxruntime as ort

    from onnxc.backends.tvm import load_artifact

    result = x86_artifact
    assert result.lowering["conv"] == 3
    art = load_artifact(result.out_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(qdq_model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    step = _output_scale(qdq_model)
    rng = np.random.default_rng(2)
    steps = []
    for _ in range(8):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        out = art.run({"x": x})[0]
        steps.append(np.abs(out - ref).max() / step)
    assert max(steps) <= 1.0 + 1e-3, steps


def test_float_qdq_is_kept_when_lowering_is_off(qdq_model, tmp_path):
    from onnxc.backends.tvm import compile_model

    result = compile_model(qdq_model, "x86", str(tmp_path / "art"),
                           {"int_lowering": False}, verify=False)
    assert result.lowering is None


def test_unsupported_pattern_is_left_in_float_and_reported():
    """A weight with a non-zero zero point cannot be lowered: it stays float QDQ."""
    from onnxc.backends.tvm.int_lower import lower_qdq

    w = np.ones((4, 3, 1, 1), np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"),
             numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.float32(0.05), "ws"),
             numpy_helper.from_array(np.int8(3), "wz")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    mod, report = lower_qdq(_import(model))
    assert report.lowered == 0
    assert report.skipped == {"non-zero weight zero point": 1}
    assert str(_calls(mod, "nn.conv2d")[0].ty.dtype) == "float32"


def downsampling_chain(seed: int = 0) -> onnx.ModelProto:
    """A CIFAR ResNet's stage change: conv (3->16), then a block whose shortcut is the
    option-A slice [::2, ::2] + zero channel padding (16->32, NCHW float between QDQ),
    then a plain residual block on the downsampled map."""
    init = random_init(np.random.default_rng(seed))
    conv = CONV3X3
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "conv0", **conv),
        helper.make_node("Relu", ["c0"], ["r0"], "relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], "conv1", strides=[2, 2], **conv),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", **conv),
        helper.make_node("Slice", ["r0", "starts", "ends", "axes", "steps"], ["sl"], "slice"),
        helper.make_node("Pad", ["sl", "pads"], ["sc"], "pad"),
        helper.make_node("Add", ["c2", "sc"], ["s1"], "add1"),
        helper.make_node("Relu", ["s1"], ["r2"], "relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], "conv3", **conv),
        helper.make_node("Relu", ["c3"], ["r3"], "relu3"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], "conv4", **conv),
        helper.make_node("Add", ["c4", "r2"], ["s2"], "add2"),
        helper.make_node("Relu", ["s2"], ["y"], "relu4"),
    ]
    inits = [init("w0", 16, 3, 3, 3), init("b0", 16, scale=0.1),
             init("w1", 32, 16, 3, 3), init("b1", 32, scale=0.1),
             init("w2", 32, 32, 3, 3), init("b2", 32, scale=0.1),
             init("w3", 32, 32, 3, 3), init("b3", 32, scale=0.1),
             init("w4", 32, 32, 3, 3), init("b4", 32, scale=0.1),
             i64("starts", [0, 0]), i64("ends", [8, 8]), i64("axes", [2, 3]),
             i64("steps", [2, 2]), i64("pads", [0, 8, 0, 0, 0, 8, 0, 0])]
    graph = helper.make_graph(
        nodes, "downsampling_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _int8(model):
    from onnxc.calibrate.readers import Dataset
    from onnxc.compress import compress

    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    data = Dataset({"x": x}, None, "synthetic")
    return compress(model, ["int8"], calibration=data, evaluation=data,
                    log=lambda m: None).graph.to_onnx()


def test_adds_after_a_downsampling_shortcut_stay_nhwc():
    """The shortcut (NCHW float slice + pad) is permuted once at its add; that add's
    output and the next block's add stay in the packed convs' NHWC layout instead of
    two transposes of a full activation per later block."""
    from onnxc.backends.tvm.int_lower import lower_qdq

    mod, report = lower_qdq(_import(_int8(downsampling_chain())), "uint8", [(16, 4)])
    assert (report.conv, report.add) == (5, 2), report.as_dict()
    perms = [tuple(int(a) for a in c.attrs.axes) for c in _calls(mod, "permute_dims")]
    # x to NHWC; conv0's output back to NCHW for the shortcut's slice and the shortcut
    # to NHWC; the graph output to NCHW. Nothing between the blocks.
    assert sorted(perms) == sorted([(0, 2, 3, 1), (0, 3, 1, 2), (0, 2, 3, 1),
                                    (0, 3, 1, 2)]), perms


def test_downsampling_chain_within_one_quantization_step_of_onnxruntime(tmp_path):
    import onnxruntime as ort

    from onnxc.backends.tvm import compile_model, load_artifact

    qdq = _int8(downsampling_chain())
    result = compile_model(qdq, "x86", str(tmp_path / "art"), verify=False)
    assert (result.lowering["conv"], result.lowering["add"]) == (5, 2)
    art = load_artifact(result.out_dir)
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    step = _output_scale(qdq)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        diff = np.abs(art.run({"x": x})[0] - sess.run(None, {"x": x})[0]).max()
        assert diff / step <= 1.0 + 1e-3


def test_pruned_width_convs_take_the_8_wide_vnni_tile_and_stay_exact(tmp_path):
    """16 output channels take the 16-wide VNNI tile (zmm); 8 (a layer pruned to a
    multiple of 8) the 8-wide one (ymm) instead of 16 lanes half on zero padding."""
    import shutil
    import subprocess

    import onnxruntime as ort

    from onnxc.backends.tvm import compile_model, load_artifact
    from onnxc.backends.tvm.int_kernels import VNNI, intrinsic

    init = random_init(np.random.default_rng(0))
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "wide", **CONV3X3),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], "narrow", **CONV3X3),
             helper.make_node("Relu", ["c1"], ["y"])]
    inits = [init("w0", 16, 3, 3, 3), init("b0", 16, scale=0.1),
             init("w1", 8, 16, 3, 3), init("b1", 8, scale=0.1)]
    graph = helper.make_graph(
        nodes, "widths", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    qdq = _int8(model)
    result = compile_model(qdq, "x86", str(tmp_path / "art"), verify=False)
    if intrinsic(result.spec.tvm_target()) != VNNI or shutil.which("objdump") is None:
        pytest.skip("needs AVX-512 VNNI and objdump")
    assert result.lowering["untuned_tensorized"] == 2
    dis = [line for line in subprocess.run(["objdump", "-d", result.library],
                                           capture_output=True, text=True).stdout.splitlines()
           if "vpdpbusd" in line]
    assert any("zmm" in line for line in dis) and any("ymm" in line for line in dis)
    art = load_artifact(result.out_dir)
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    diff = np.abs(art.run({"x": x})[0] - sess.run(None, {"x": x})[0]).max()
    assert diff / _output_scale(qdq) <= 1.0 + 1e-3


def _objdump(tool: str, library) -> str:
    import subprocess

    return subprocess.run([tool, "-d", str(library)], capture_output=True, text=True,
                          check=True).stdout


def test_x86_integer_artifact_runs_vnni_dot_products(x86_artifact):
    import shutil

    from onnxc.backends.tvm.int_kernels import VNNI, intrinsic

    result = x86_artifact
    if intrinsic(result.spec.tvm_target()) != VNNI:
        pytest.skip("this host has no AVX-512 VNNI")
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    assert result.lowering["untuned_tensorized"] >= 1
    assert "vpdpbusd" in _objdump("objdump", result.library)


def test_arm_dotprod_artifact_contains_sdot(qdq_model, tmp_path):
    import shutil

    from onnxc.backends.tvm import compile_model

    if shutil.which("aarch64-linux-gnu-g++") is None or \
            shutil.which("aarch64-linux-gnu-objdump") is None:
        pytest.skip("needs g++-aarch64-linux-gnu and its binutils")
    result = compile_model(qdq_model, "arm", str(tmp_path / "arm"), {"mcpu": "cortex-a76"})
    assert result.lowering["kernels"].endswith("dot_4x4_i8i8s32_sdot")
    assert result.lowering["untuned_tensorized"] >= 1
    assert "sdot" in _objdump("aarch64-linux-gnu-objdump", result.library)


def test_cuda_int8_artifact_ptx_contains_dp4a(qdq_model, tmp_path):
    import shutil

    from onnxc.backends.tvm import compile_model

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the PTX check needs it")
    result = compile_model(qdq_model, "cuda", str(tmp_path / "cuda"), {"cuda_arch": "sm_75"})
    assert result.lowering["conv"] == 3
    assert "dp4a" in (tmp_path / "cuda" / "kernels.sm_75.ptx").read_text()


@pytest.mark.slow
def test_arm_integer_artifact_under_qemu_is_bit_exact_with_x86(qdq_model, arm_sysroot,
                                                               tmp_path):
    """ARM (int8 activations, sdot) and x86 (uint8, vpdpbusd) compute the same integers."""
    from onnxc.backends.tvm import compile_model, load_artifact
    from onnxc.backends.tvm.qemu import run_under_qemu

    compile_model(qdq_model, "x86", str(tmp_path / "x86"), verify=False)
    arm = compile_model(qdq_model, "arm", str(tmp_path / "arm"), {"mcpu": "cortex-a76"})
    assert arm.lowering["untuned_tensorized"] >= 1
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    on_x86 = load_artifact(str(tmp_path / "x86")).run({"x": x})[0]
    on_arm, _ = run_under_qemu(str(tmp_path / "arm"), {"x": x}, arm_sysroot)
    np.testing.assert_array_equal(on_arm[0], on_x86)


def test_tuning_holds_back_tvms_tensorize_failed_warnings_and_nothing_else():
    """RewriteTensorize logs one C++ warning per sampled candidate that did not
    tensorize (thousands in a tuning run): filtered at file descriptor 2, also for
    worker processes started inside the block; every other line passes."""
    import subprocess
    import sys

    code = (
        "import os, subprocess, sys\n"
        "from onnxc.backends.tvm.int_kernels import stderr_without\n"
        "with stderr_without('Tensorize failed') as q:\n"
        "    os.write(2, b'keep 1\\nWarning: Tensorize failed with error\\nkeep 2\\n')\n"
        "    child = subprocess.Popen([sys.executable, '-c', \"import os; os.write(2, "
        "b'Tensorize failed in a worker\\\\nworker line\\\\n')\"])\n"
        "    child.wait()\n"
        "os.write(2, b'after\\n')\n"
        "print(q.dropped)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["2"]
    assert sorted(out.stderr.split("\n")) == ["", "after", "keep 1", "keep 2", "worker line"]
