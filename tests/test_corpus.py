"""A small slice of tools/corpus.py: the torch.nn corpus models (built here with the
project's torch) and one light zoo model through the installed CLI, checked the way the
corpus checks every artifact; and the harness's own verdicts on a fake CLI that
misbehaves in each way the corpus must catch."""

from __future__ import annotations

import sys
import textwrap

import onnx
import pytest

from conftest import light_model_path
from tools import corpus

FOLD_BN = next(s for s in corpus.PASS_SETS if s.label == "fold_bn")
INT8 = next(s for s in corpus.PASS_SETS if s.label == "int8")


def torch_nn_model(name: str, tmp_path) -> corpus.Model:
    pytest.importorskip("torch")
    model = next(m for m in corpus.corpus() if m.name == name)
    model.file = str(tmp_path / f"{name}.onnx")
    corpus.export_torch_nn(name, model.file)
    return model


def test_corpus_has_at_least_25_models_with_origins():
    models = corpus.corpus()
    assert len(models) >= 25
    assert len({m.name for m in models}) == len(models)
    wheels = [m for m in models if m.source == "wheel"]
    assert wheels and all("==" in m.origin for m in wheels)


def test_bert_like_encoder_fold_bn_artifact_runs_exactly(tmp_path):
    model = torch_nn_model("bert_like", tmp_path)
    r = corpus.run_one(model, FOLD_BN, str(tmp_path), timeout=120, static_shapes=True)
    assert r["status"] == "ok", r
    assert r["rel"] <= corpus.EXACT_TOL


def test_lstm_int8_artifact_runs_in_ort(tmp_path):
    model = torch_nn_model("lstm", tmp_path)
    r = corpus.run_one(model, INT8, str(tmp_path), timeout=120, static_shapes=True)
    assert r["status"] == "ok", r
    assert r["cosine"] > 0.9


def test_dynamic_sequence_dim_is_kept_or_refused_in_one_line(tmp_path):
    model = torch_nn_model("gru_state", tmp_path)
    r = corpus.run_one(model, FOLD_BN, str(tmp_path), timeout=120)
    assert r["status"] in ("ok", "refused"), r
    if r["status"] == "refused":
        assert r["names_node"], r


@pytest.mark.slow
def test_gru_with_state_input_builds_for_x86_with_input_data(tmp_path):
    # --input-shape fixes the batch to 1 and the corpus's --input-data gives 4 samples
    # along it (was exit 7), and TVM's importer has no GRU (unrolled for it).
    pytest.importorskip("tvm")
    model = torch_nn_model("gru_state", tmp_path)
    x86 = next(s for s in corpus.PASS_SETS if s.label == "x86")
    r = corpus.run_one(model, x86, str(tmp_path), timeout=300, input_data=True)
    assert r["status"] == "ok", r
    assert r["rel"] <= corpus.EXACT_TOL


@pytest.mark.slow
def test_light_zoo_squeezenet_int8_artifact_runs(tmp_path):
    path = light_model_path("squeezenet")
    if not path.exists():
        pytest.skip(f"needs {path} (onnx's bundled light zoo)")
    model = corpus.Model("squeezenet", "onnx", "onnx light zoo",
                         {"data_0": ([1, 3, 224, 224], "float32", "normal")}, file=str(path))
    r = corpus.run_one(model, INT8, str(tmp_path), timeout=120)
    assert r["status"] == "ok", r


# --- the harness's verdicts, on a fake CLI -------------------------------------------------

def fake_cli(tmp_path, body: str) -> list:
    """A stand-in for `onnxc` whose compress run executes ``body`` (out = the -o dir,
    src = the input model path)."""
    script = tmp_path / "fake_onnxc.py"
    script.write_text(textwrap.dedent("""
        import os, sys, shutil, json
        args = sys.argv[1:]
        src, out = args[1], args[args.index("-o") + 1]
        os.makedirs(out, exist_ok=True)
    """) + textwrap.dedent(body))
    return [sys.executable, str(script)]


def tiny_model(tmp_path) -> corpus.Model:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu0")],
                                   "g", [x], [y])
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              path)
    return corpus.Model("tiny", "test", "test", {"x": ([1, 4], "float32", "normal")},
                        file=str(path))


def test_harness_passes_a_copied_model(tmp_path):
    cli = fake_cli(tmp_path, "shutil.copy(src, os.path.join(out, 'model.onnx'))")
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "ok" and r["rel"] == 0.0


def test_harness_calls_a_traceback_wrong(tmp_path):
    cli = fake_cli(tmp_path, "raise RuntimeError('boom')")
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "wrong" and r["reason"].startswith("traceback")


def test_harness_calls_an_artifact_ort_rejects_wrong(tmp_path):
    cli = fake_cli(tmp_path, """
        import onnx
        m = onnx.load(src)
        m.graph.node[0].input[0] = "missing"   # reads a tensor nothing produces
        with open(os.path.join(out, 'model.onnx'), 'wb') as f:
            f.write(m.SerializeToString())
    """)
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "wrong" and r["reason"].startswith(("checker", "ORT")), r


def test_harness_calls_changed_outputs_of_an_exact_pass_wrong(tmp_path):
    cli = fake_cli(tmp_path, """
        import onnx
        m = onnx.load(src)
        m.graph.node[0].op_type = "Sigmoid"
        onnx.save(m, os.path.join(out, 'model.onnx'))
    """)
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "wrong" and "exact pass changed outputs" in r["reason"]


def test_harness_one_line_refusal_naming_a_node(tmp_path):
    cli = fake_cli(tmp_path, """
        sys.stderr.write("onnxc: error: node relu0 (Relu): not supported\\n")
        sys.exit(4)
    """)
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "refused" and r["names_node"]


def test_harness_internal_error_exit_is_wrong(tmp_path):
    cli = fake_cli(tmp_path, """
        sys.stderr.write("onnxc: error: internal error: KeyError 'x'\\n")
        sys.exit(1)
    """)
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "wrong"


def test_harness_times_out_a_hanging_run(tmp_path):
    cli = fake_cli(tmp_path, "import time; time.sleep(60)")
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 1, cli=cli)
    assert r["status"] == "timeout" and r["seconds"] < 30


def test_harness_tells_a_run_killed_from_outside_apart(tmp_path):
    cli = fake_cli(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    r = corpus.run_one(tiny_model(tmp_path), FOLD_BN, str(tmp_path), 30, cli=cli)
    assert r["status"] == "killed" and "signal 9" in r["reason"]
    assert "killed from outside: 1" in corpus.summary([r])[-1]


def test_harness_calls_a_changed_output_shape_wrong(tmp_path):
    cli = fake_cli(tmp_path, """
        import onnx
        m = onnx.load(src)
        shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [1], [4])
        m.graph.initializer.append(shape)
        m.graph.node[0].output[0] = "r"
        m.graph.node.append(onnx.helper.make_node("Reshape", ["r", "shape"], ["y"]))
        del m.graph.output[0].type.tensor_type.shape.dim[:]
        onnx.save(m, os.path.join(out, 'model.onnx'))
    """)
    r = corpus.run_one(tiny_model(tmp_path), INT8, str(tmp_path), 30, cli=cli)
    assert r["status"] == "wrong" and "shape" in r["reason"], r
