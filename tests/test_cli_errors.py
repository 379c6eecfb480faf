"""Bad input: one clear line, a documented non-zero exit code, the input file untouched,
no partial artifact left behind."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli


def _tiny_model(path, domain="", op="Relu"):
    node = helper.make_node(op, ["x"], ["y"], name="n0", domain=domain)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    opsets = [helper.make_opsetid("", 13)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, path)
    return path


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_clean_failure(tmp_path, model_path, code, err, expected_code, phrase):
    assert code == expected_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("onnxc: error")]
    assert len(lines) == 1 and phrase in lines[0], err
    assert "Traceback" not in err
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".onnxc") or p == "out"]
    assert leftovers == [], leftovers


def _compress(tmp_path, model, *extra):
    return run_cli("compress", model, "--passes", "fold_bn", "-o", tmp_path / "out", *extra)


def test_missing_file(tmp_path):
    code, _, err = _compress(tmp_path, tmp_path / "nope.onnx")
    _assert_clean_failure(tmp_path, None, code, err, 3, "not found")


def test_truncated_protobuf(tmp_path, resnet20_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(resnet20_path.read_bytes()[:5000])
    before = _digest(path)
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "cut.onnx")
    assert _digest(path) == before


def test_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "notes.onnx")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "empty")


def test_op_from_unknown_domain(tmp_path):
    path = _tiny_model(tmp_path / "custom.onnx", domain="com.example", op="Mystery")
    before = _digest(path)
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 4, "com.example")
    assert _digest(path) == before


def test_graph_failing_the_checker(tmp_path):
    # A node reading a tensor that nothing produces.
    node = helper.make_node("Add", ["x", "ghost"], ["y"], name="add")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "checker")


def test_model_onnx_runtime_cannot_run(tmp_path, capfd):
    # The checker accepts a BatchNormalization whose scale has the wrong length; ORT
    # refuses it at run time. That is the input's fault (exit 3, not a backend
    # failure), said once: ORT's own error log is silenced.
    rng = np.random.default_rng(0)
    params = [numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype(np.float32), f"p{i}")
              for i, n in enumerate([3, 4, 4, 4])]
    node = helper.make_node("BatchNormalization", ["x", "p0", "p1", "p2", "p3"], ["y"],
                            name="bn")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])],
                              params)
    path = tmp_path / "bad_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    before = _digest(path)
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "the input model does not run")
    assert _digest(path) == before
    assert "onnxruntime" not in capfd.readouterr().err


def test_name_that_is_not_utf8(tmp_path):
    # Protobuf parses any bytes in a string field; the checker then fails to decode it.
    data = _tiny_model(tmp_path / "t.onnx").read_bytes()
    path = tmp_path / "garbled.onnx"
    path.write_bytes(data.replace(b"n0", b"\x8b\xff"))
    code, _, err = _compress(tmp_path, path)
    _assert_clean_failure(tmp_path, path, code, err, 3, "not valid UTF-8")


def test_nan_weight(tmp_path):
    # Would reach SVD / criteria / calibration as NaN; refused when loading instead.
    w = np.ones((2, 4), np.float32)
    w[1, 2] = np.nan
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    code, _, err = run_cli("compress", path, "--passes", "lowrank", "-o", tmp_path / "out")
    _assert_clean_failure(tmp_path, path, code, err, 3, "weight 'w' of Gemm 'fc' holds NaN")


def test_unknown_pass_name(tmp_path):
    path = _tiny_model(tmp_path / "m.onnx")
    code, _, err = run_cli("compress", path, "--passes", "fold_bn,squash", "-o", tmp_path / "out")
    _assert_clean_failure(tmp_path, path, code, err, 2, "unknown pass 'squash'")


def test_unwritable_output_dir(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/onnxc-out"       # root ignores permission bits; /proc refuses
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    path = _tiny_model(tmp_path / "m.onnx")
    code, _, err = run_cli("compress", path, "--passes", "fold_bn", "-o", target)
    assert code == 6, err
    assert "Traceback" not in err and err.count("onnxc: error") == 1


def test_output_path_is_a_file(tmp_path):
    path = _tiny_model(tmp_path / "m.onnx")
    (tmp_path / "taken").write_text("x")
    code, _, err = run_cli("compress", path, "-o", tmp_path / "taken")
    assert code == 6 and "not a directory" in err


def test_backend_failure_leaves_no_partial_artifact_and_keeps_old_one(tmp_path, monkeypatch):
    """A failure while the artifact is being staged: the previous artifact at -o must
    survive untouched and no staging directory may remain."""
    from onnxc.backends.onnx_runtime import OnnxRuntimeBackend
    from onnxc.errors import BackendError

    path = _tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "art"
    code, _, err = run_cli("compress", path, "-o", out)
    assert code == 0, err
    before = {p: _digest(out / p) for p in os.listdir(out)}

    def explode(self, graph, ctx, out_dir, report):
        raise BackendError("toolchain exploded")

    monkeypatch.setattr(OnnxRuntimeBackend, "build", explode)
    code, _, err = run_cli("compress", path, "-o", out)
    assert code == 8 and "toolchain exploded" in err
    assert {p: _digest(out / p) for p in os.listdir(out)} == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnxc")]


def test_bad_input_shape_flag(tmp_path):
    path = _tiny_model(tmp_path / "m.onnx")
    code, _, err = run_cli("compress", path, "-o", tmp_path / "out", "--input-shape", "zz:1,4")
    _assert_clean_failure(tmp_path, path, code, err, 2, "not a graph input")


def test_bad_eval_data(tmp_path):
    path = _tiny_model(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((3, 7), np.float32), labels=np.zeros(3))
    code, _, err = run_cli("compress", path, "-o", tmp_path / "out", "--eval-data", data)
    _assert_clean_failure(tmp_path, path, code, err, 7, "expects")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed entry point behaves like the in-process CLI."""
    proc = subprocess.run([sys.executable, "-m", "onnxc.cli", "compress",
                           str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("onnxc: error")]
    assert len(errors) == 1 and "not found" in errors[0] and "Traceback" not in proc.stderr


def test_debug_flag_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxc.cli", "--debug", "compress",
                           str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
