"""``--target vta`` end to end on small QDQ models: partition, artifact, simulator run,
agreement with ONNX Runtime, and one-line errors for inputs VTA cannot take."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import run_cli
from vta_qdq import float_model, qdq_model

MIXED = [{"op": "conv", "out": 20, "relu": True},
         {"op": "dwconv"},                                   # depthwise: host
         {"op": "conv", "out": 16, "k": 1, "stride": 2, "pad": 0, "relu": True,
          "relu_shift": 1},                                  # ReLU with its own scale
         {"op": "maxpool"},                                  # host
         {"op": "gemm", "out": 10}]


def _ort_exact(model_path, x):
    """ONNX Runtime evaluating the QDQ graph as written (no integer-kernel fusion)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def mixed_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("vta")
    onnx.save(qdq_model(MIXED, (1, 3, 10, 10), seed=3), d / "q.onnx")
    code, out, err = run_cli("compress", d / "q.onnx", "--passes", "cleanup",
                             "--target", "vta", "-o", d / "out")
    assert code == 0, err
    return d


def test_artifact_holds_streams_partition_and_report(mixed_artifact):
    out = mixed_artifact / "out"
    for name in ("model.onnx", "report.json", "vta/host.onnx", "vta/program.json",
                 "vta/layer_00.insn.bin", "vta/layer_00.uop.bin", "vta/layer_00.wgt.bin",
                 "vta/layer_00.acc.bin", "vta/layer_02.insn.bin"):
        assert (out / name).is_file(), name
    assert os.path.getsize(out / "vta/layer_00.insn.bin") % 16 == 0
    rep = json.loads((out / "report.json").read_text())["vta"]
    where = {p["op"] + ("-host" if p["where"] == "host" else ""): p for p in rep["placement"]}
    assert [p["where"] for p in rep["placement"]] == ["vta", "host", "vta", "vta"]
    assert "depthwise" in rep["host_layers"][0]["reason"]
    assert "Gemm" in where
    layer = rep["layers"][0]
    for key in ("cycles", "latency_us", "gemm_utilization", "dram_bytes", "padding_waste"):
        assert key in layer
    assert 0 < layer["gemm_utilization"] <= 1
    assert layer["padding_waste"] > 0.8           # 3 input channels padded to 16
    assert "--prune-multiple 16" in rep["padding_advice"]
    ver = rep["verification"]
    assert ver["max_abs_diff_vs_onnxruntime_basic"] == 0.0
    assert ver["layer_runs_bit_exact"].split("/")[0] == ver["layer_runs_bit_exact"].split("/")[1]


def test_vta_sim_output_equals_onnxruntime_on_the_quantized_model(mixed_artifact, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("vta-sim", mixed_artifact / "out", "--input", tmp_path / "x.npy",
                             "--output", tmp_path / "y.npy", "--schedule", "compute-first")
    assert code == 0, err
    assert "GEMM util" in out and "total" in out
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(y, _ort_exact(mixed_artifact / "out" / "model.onnx", x))


def test_vta_sim_dumps_a_decoded_instruction_stream(mixed_artifact):
    code, out, err = run_cli("vta-sim", mixed_artifact / "out", "--dump", "0")
    assert code == 0, err
    assert "GEMM" in out and "ALU" in out and "STORE" in out and "FINISH" in out
    code, _, err = run_cli("vta-sim", mixed_artifact / "out", "--dump", "9")
    assert code == 2 and "layers 0..2" in err


def test_block32_configuration_from_a_config_file(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 40, "relu": True},
                         {"op": "conv", "out": 8}], (2, 20, 6, 6), seed=1), tmp_path / "q.onnx")
    (tmp_path / "vta.json").write_text(json.dumps({"LOG_BLOCK": 5, "LOG_BUS_WIDTH": 7}))
    code, out, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                             "--target", "vta", "--vta-config", tmp_path / "vta.json",
                             "--vta-clock-mhz", "200", "-o", tmp_path / "out")
    assert code == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())["vta"]
    assert rep["config"]["LOG_BLOCK"] == 5 and rep["config"]["CLOCK_MHZ"] == 200
    assert rep["verification"]["max_abs_diff_vs_onnxruntime_basic"] == 0.0


def test_model_without_int8_layers_is_refused(tmp_path):
    onnx.save(float_model(), tmp_path / "f.onnx")
    code, _, err = run_cli("compress", tmp_path / "f.onnx", "--passes", "cleanup",
                           "--target", "vta", "-o", tmp_path / "out")
    assert code == 4
    assert "no layer can run on VTA" in err and "DequantizeLinear" in err
    assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_scales_that_are_not_powers_of_two_are_named(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 16}], pow2=False), tmp_path / "q.onnx")
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                           "--target", "vta", "-o", tmp_path / "out")
    assert code == 4
    assert "not a power of two" in err and "--int8-pow2-scales" in err


def test_config_whose_buffers_cannot_hold_one_tile(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 64}], (1, 16, 8, 8)), tmp_path / "q.onnx")
    (tmp_path / "tiny.json").write_text(json.dumps({"LOG_INP_BUFF_SIZE": 6,
                                                    "LOG_ACC_BUFF_SIZE": 8}))
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                           "--target", "vta", "--vta-config", tmp_path / "tiny.json",
                           "-o", tmp_path / "out")
    assert code == 4 and "cannot hold one tile" in err


def test_bad_config_files_fail_before_any_pass(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 16}]), tmp_path / "q.onnx")
    (tmp_path / "bad.json").write_text("{LOG_BLOCK: 4")
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--target", "vta",
                           "--vta-config", tmp_path / "bad.json", "-o", tmp_path / "out")
    assert code == 2 and "not valid JSON" in err
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--target", "vta",
                           "--vta-config", tmp_path / "missing.json", "-o", tmp_path / "out")
    assert code == 2 and "not found" in err


def test_vta_sim_refuses_a_non_vta_artifact(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 16}]), tmp_path / "q.onnx")
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--target", "onnx",
                           "-o", tmp_path / "out")
    assert code == 0, err
    code, _, err = run_cli("vta-sim", tmp_path / "out", "--dump", "0")
    assert code == 2 and "not a VTA artifact" in err


def test_batch2_configuration_computes_two_samples_per_program(tmp_path):
    onnx.save(qdq_model([{"op": "conv", "out": 16, "relu": True}, {"op": "gemm", "out": 5}],
                        (3, 4, 6, 6), seed=2), tmp_path / "q.onnx")
    (tmp_path / "b2.json").write_text(json.dumps({"LOG_BATCH": 1}))
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                           "--target", "vta", "--vta-config", tmp_path / "b2.json",
                           "-o", tmp_path / "out")
    assert code == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())["vta"]
    assert rep["layers"][0]["in_shape"][0] == 2
    assert rep["verification"]["max_abs_diff_vs_onnxruntime_basic"] == 0.0


def test_a_layer_that_cannot_be_tiled_stays_on_the_host(tmp_path):
    # a 9x9 kernel needs 81 input elements, the buffer holds 64; the 1x1 conv after it fits
    onnx.save(qdq_model([{"op": "conv", "out": 16, "k": 9, "pad": 4},
                         {"op": "conv", "out": 16, "k": 1, "pad": 0}], (1, 16, 12, 12)),
              tmp_path / "q.onnx")
    (tmp_path / "small.json").write_text(json.dumps({"LOG_INP_BUFF_SIZE": 10}))
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                           "--target", "vta", "--vta-config", tmp_path / "small.json",
                           "-o", tmp_path / "out")
    assert code == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())["vta"]
    assert [p["where"] for p in rep["placement"]] == ["host", "vta"]
    assert "cannot hold one tile" in rep["host_layers"][0]["reason"]
    assert rep["verification"]["max_abs_diff_vs_onnxruntime_basic"] == 0.0


def test_vta_sim_reports_top1_on_labelled_data(mixed_artifact, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (6, 3, 10, 10)).astype(np.uint8),
             labels=rng.integers(0, 10, 6).astype(np.uint8))
    code, out, err = run_cli("vta-sim", mixed_artifact / "out", "--eval-data",
                             tmp_path / "d.npz", "--scale", "0.0039")
    assert code == 0, err
    assert "top-1 through the simulator" in out and "prediction agreement 100.00%" in out


def _residual_model():
    from onnx import TensorProto, helper
    from vta_qdq import _Builder

    b = _Builder(0)
    rng = b.rng
    _, xdq, ex = b.q("input", -4)
    ew = rng.integers(-9, -7, 16)
    y = b.node("Conv", [xdq, b.weight(rng.integers(-127, 128, (16, 16, 3, 3)), ew),
                        b.bias(rng.integers(-3000, 3000, 16), ex + ew)],
               kernel_shape=[3, 3], pads=[1] * 4)
    _, ydq, _ = b.q(y, -3)
    _, rdq, _ = b.q(b.node("Relu", [ydq]), -3)
    _, adq, _ = b.q(b.node("Add", [rdq, xdq]), -2)                 # scales differ by 2
    _, r2dq, _ = b.q(b.node("Relu", [adq]), -1)                    # ReLU at its own scale
    b.nodes.append(helper.make_node("Identity", [r2dq], ["output"]))
    g = helper.make_graph(b.nodes, "res", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [2, 16, 6, 6])], [helper.make_tensor_value_info(
            "output", TensorProto.FLOAT, [2, 16, 6, 6])], b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_residual_add_on_vta_is_exact(tmp_path):
    onnx.save(_residual_model(), tmp_path / "r.onnx")
    for flag, where in (((), ["vta"]), (("--vta-residual",), ["vta", "vta"])):
        code, _, err = run_cli("compress", tmp_path / "r.onnx", "--passes", "cleanup",
                               "--target", "vta", *flag, "-o", tmp_path / "out")
        assert code == 0, err
        rep = json.loads((tmp_path / "out" / "report.json").read_text())["vta"]
        assert [p["where"] for p in rep["placement"]] == where
        assert rep["verification"]["max_abs_diff_vs_onnxruntime_basic"] == 0.0
    assert rep["layers"][1]["kind"] == "add"
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, _, err = run_cli("vta-sim", tmp_path / "out", "--input", tmp_path / "x.npy",
                           "--output", tmp_path / "y.npy")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"),
                                  _ort_exact(tmp_path / "out" / "model.onnx", x))


def test_loaded_artifact_offers_the_runner_interface(mixed_artifact):
    from onnxc.backends.vta.runtime import load_artifact

    art = load_artifact(mixed_artifact / "out")
    feeds = art.random_inputs(seed=1)
    assert list(feeds) == [i["name"] for i in art.inputs] == ["input"]
    outs = art.run(feeds)
    assert [o["name"] for o in art.outputs] == ["output"] and outs[0].shape == (1, 10)
    np.testing.assert_array_equal(outs[0], _ort_exact(mixed_artifact / "out" / "model.onnx",
                                                      feeds["input"]))


def test_onnxc_run_on_a_vta_artifact_uses_the_simulator(mixed_artifact, tmp_path):
    """`onnxc run` dispatches a VTA artifact to its simulator runtime, and the result
    agrees with ONNX Runtime on the artifact's own model.onnx."""
    import numpy as np
    import onnxruntime as ort

    from onnxc.backends.tvm import load_artifact
    from onnxc.backends.vta.runtime import VtaArtifact

    out = mixed_artifact / "out"
    assert isinstance(load_artifact(out), VtaArtifact)
    sess = ort.InferenceSession(str(out / "model.onnx"))
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, _, err = run_cli("run", out, "--input", tmp_path / "x.npy",
                           "--output", tmp_path / "y.npy")
    assert code == 0, err
    y = np.load(tmp_path / "y.npy")
    ref = sess.run(None, {name: x})[0]
    scale = float(np.abs(ref).max()) or 1.0
    assert y.shape == ref.shape and float(np.abs(y - ref).max()) / scale < 0.05
