"""CLI happy paths: passes listing, verify, inspect, help, artifact contents."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli


def _model(path, scale=1.0):
    w = numpy_helper.from_array(np.full((2, 4), scale, np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_passes_lists_every_pass_with_one_line_and_targets():
    code, out, _ = run_cli("passes")
    assert code == 0
    for name in ("cleanup", "fold_bn"):
        assert any(line.split()[0] == name for line in out.splitlines() if line.strip())
    assert "targets:" in out and "onnx" in out


def test_help_shows_examples():
    code, out, _ = run_cli("compress", "--help")
    assert code == 0 and "examples:" in out and "--passes" in out


def test_no_command_is_a_usage_error():
    code, _, _ = run_cli()
    assert code == 2


def test_verify_identical_models_passes_tolerance(tmp_path):
    a = _model(tmp_path / "a.onnx")
    code, out, err = run_cli("verify", a, a, "--tolerance", "0")
    assert code == 0, err
    assert "max rel error 0.000e+00" in out


def test_verify_different_models_fails_tolerance(tmp_path):
    a = _model(tmp_path / "a.onnx")
    b = _model(tmp_path / "b.onnx", scale=1.5)
    code, out, err = run_cli("verify", a, b, "--tolerance", "1e-3")
    assert code == 5 and "exceeds" in err


def test_verify_outputs_of_different_shape_fail_even_with_equal_values(tmp_path):
    a = _model(tmp_path / "a.onnx")
    m = onnx.load(a)
    m.graph.node.append(helper.make_node("Reshape", ["y", "flat"], ["y_flat"], name="flat"))
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y_flat", TensorProto.FLOAT,
                                                             ["M"]))
    onnx.save(m, tmp_path / "b.onnx")
    code, _, err = run_cli("verify", a, tmp_path / "b.onnx")
    assert code == 5 and "output 0 has shape" in err, err


def test_compress_writes_model_report_and_readme(tmp_path):
    a = _model(tmp_path / "a.onnx")
    out = tmp_path / "art"
    code, stdout, err = run_cli("compress", a, "--passes", "fold_bn", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.onnx", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold_bn"]
    assert report["schema_version"] == 1 and report["compression_ratio"] > 0
    assert report["input"]["sha256"]
    assert "Cr" in stdout
    # the symbolic batch dim survives: the artifact runs at any batch size
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"))
    assert sess.run(None, {"x": np.ones((7, 2), np.float32)})[0].shape == (7, 4)


def test_inspect_json(tmp_path):
    a = _model(tmp_path / "a.onnx")
    code, out, _ = run_cli("inspect", a, "--json")
    data = json.loads(out)
    assert code == 0 and data["totals"]["macs"] == 8 and data["totals"]["params"] == 8
