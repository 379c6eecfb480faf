"""ResNet-20/56 through ``int8 --pow2-scales --target vta`` (minutes; ``-m slow``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CIFAR_FLAGS, cifar_preprocess, run_cli

pytestmark = pytest.mark.slow


def _compile(model, train, out, *extra):
    code, _, err = run_cli("compress", model, "--passes", extra[0] if extra else "fold_bn,int8",
                           "--pow2-scales", "--calib-data", train, "--calib-samples", "128",
                           *CIFAR_FLAGS, "--target", "vta", "--vta-verify-samples", "2",
                           "-o", out, *extra[1:])
    assert code == 0, err
    return json.loads((out / "report.json").read_text())


def test_resnet20_top1_through_the_simulator(resnet20_path, cifar_train_path, cifar_test_path,
                                            tmp_path):
    from onnxc import frontend
    from onnxc.backends.vta.runtime import load_artifact
    from onnxc.calibrate.readers import load_npz
    from onnxc.execution import Runner

    rep = _compile(resnet20_path, cifar_train_path, tmp_path / "out")["vta"]
    assert not rep["host_layers"], rep["host_layers"]
    assert len(rep["layers"]) == 20                          # 19 convs + the classifier
    assert all(0 < r["gemm_utilization"] <= 1 and r["cycles"] > 0 for r in rep["layers"])

    art = load_artifact(tmp_path / "out")
    n = 160
    ds = load_npz(str(cifar_test_path), frontend.load(str(resnet20_path)),
                  cifar_preprocess(), samples=n)
    sim = art.run(ds.inputs)[0]
    qdq = Runner(art.qdq_model()).run(ds.inputs)[0]
    fp32 = Runner(frontend.load(str(resnet20_path))).run(ds.inputs)[0]
    top = {k: 100 * float(np.mean(v.argmax(1) == ds.labels))
           for k, v in (("sim", sim), ("qdq", qdq), ("fp32", fp32))}
    assert float(np.mean(sim.argmax(1) == qdq.argmax(1))) >= 0.99
    assert top["fp32"] - top["sim"] <= 1.0 + 1e-9, top


def test_resnet20_block32_configuration(resnet20_path, cifar_train_path, tmp_path):
    (tmp_path / "b32.json").write_text(json.dumps({"LOG_BLOCK": 5}))
    rep = _compile(resnet20_path, cifar_train_path, tmp_path / "out", "fold_bn,int8",
                   "--vta-config", tmp_path / "b32.json")["vta"]
    assert rep["config"]["LOG_BLOCK"] == 5 and not rep["host_layers"]
    assert rep["verification"]["max_abs_diff_vs_onnxruntime_basic"] == 0.0
    # 16-channel layers fill half of a 32-wide block
    assert rep["layers"][1]["padding_waste"] == pytest.approx(0.75)


def test_resnet56_prune_multiple_16_removes_channel_padding(resnet56_path, cifar_train_path,
                                                            tmp_path):
    reps = {}
    for mult in ("1", "16"):
        reps[mult] = _compile(resnet56_path, cifar_train_path, tmp_path / f"m{mult}",
                              "fold_bn,prune,int8", "--prune-ratio", "0.4",
                              "--prune-multiple", mult)["vta"]["totals"]
    # the first conv reads 3 image channels: the only padding left with multiples of 16
    first_only = reps["16"]["padded_macs"] - reps["16"]["macs"]
    assert reps["1"]["padded_macs"] - reps["1"]["macs"] > first_only
    assert reps["16"]["padding_waste"] < reps["1"]["padding_waste"]


def test_host_segments_compiled_by_the_tvm_x86_backend(tmp_path):
    import onnx

    from vta_qdq import qdq_model

    onnx.save(qdq_model([{"op": "conv", "out": 16, "relu": True}, {"op": "dwconv"},
                         {"op": "conv", "out": 8}], (1, 3, 8, 8), seed=4), tmp_path / "q.onnx")
    code, _, err = run_cli("compress", tmp_path / "q.onnx", "--passes", "cleanup",
                           "--target", "vta", "--vta-host", "x86", "-o", tmp_path / "out")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "vta" / "program.json").read_text())
    assert meta["host"] == "x86" and meta["host_libraries"]
    ver = json.loads((tmp_path / "out" / "report.json").read_text())["vta"]["verification"]
    assert ver["host"] == "tvm x86"
    # TVM evaluates host QDQ in float: at most an LSB or two of the output scale
    assert ver["max_abs_diff_vs_onnxruntime_basic"] <= 4.0
