"""TVM targets x86 / arm / cuda: build, run, bench and the errors users see.

Fast tests use a tiny CNN built here; ResNet-20 checks the real model once. Tuning,
RPC and qemu runs are in test_tvm_slow.py (marked slow).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli

pytest.importorskip("tvm")


def tiny_cnn(batch="N", seed=0, input_name="x") -> onnx.ModelProto:
    """Conv(3→8, 3×3) → Relu → Conv(8→8) → Add(residual) → GAP → Flatten → Gemm(8→5),
    with a symbolic batch dim (like exported models) unless ``batch`` is an int."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale)
                                       .astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [input_name, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,), 0.1), init("w2", (8, 8, 3, 3)),
         init("b2", (8,), 0.1), init("wf", (5, 8)), init("bf", (5,), 0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_x86(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny_x86"
    code, stdout, stderr = run_cli("compress", tiny_path, "--passes", "fold_bn",
                                   "--target", "x86", "-o", out)
    assert code == 0, stderr
    return out


def ort_run(model_path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


# ---- x86 --------------------------------------------------------------------------------


def test_x86_artifact_has_library_target_description_and_load_instructions(tiny_x86):
    files = set(os.listdir(tiny_x86))
    assert {"model.so", "target.json", "model.onnx", "report.json", "README.md"} <= files
    info = json.loads((tiny_x86 / "target.json").read_text())
    assert info["target"]["target"]["kind"] == "llvm"
    assert info["target"]["target"]["mcpu"]            # host CPU detected by LLVM
    assert info["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    report = json.loads((tiny_x86 / "report.json").read_text())
    assert report["runtime"]["name"] == "tvm"
    assert "load_module('model.so')" in report["runtime"]["load"]
    assert report["runtime"]["verification"]["max_rel"] < 1e-4
    assert "load_module" in (tiny_x86 / "README.md").read_text()


def test_run_command_output_matches_onnxruntime(tiny_x86, tiny_path, tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("run", tiny_x86, "--input", tmp_path / "x.npy",
                             "--output", tmp_path / "y.npy")
    assert code == 0, err
    assert "y: float32 [1, 5]" in out
    assert rel_err(ort_run(tiny_path, x), np.load(tmp_path / "y.npy")) < 1e-4


def test_bench_command_reports_latency(tiny_x86):
    code, out, err = run_cli("bench", tiny_x86, "--warmup", "1", "--repeat", "3", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert figures["runs"] == 3 and figures["runtime"] == "tvm"
    assert 0 < figures["min_ms"] <= figures["median_ms"]


def test_run_command_also_runs_onnx_artifacts(tiny_path, tmp_path):
    out_dir = tmp_path / "onnx_art"
    assert run_cli("compress", tiny_path, "--target", "onnx", "-o", out_dir)[0] == 0
    x = np.ones((2, 3, 16, 16), np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("run", out_dir, "--input", tmp_path / "x.npy")
    assert code == 0, err
    assert "y: float32 [2, 5]" in out


def test_dynamic_batch_fixed_by_input_shape(tiny_path, tmp_path):
    out_dir = tmp_path / "b4"
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--input-shape",
                           "x:4,3,16,16", "-o", out_dir)
    assert code == 0, err
    info = json.loads((out_dir / "target.json").read_text())
    assert info["inputs"][0]["shape"] == [4, 3, 16, 16]
    from onnxc.backends.tvm import load_artifact

    x = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    got = load_artifact(out_dir).run({"x": x})[0]
    assert got.shape == (4, 5)
    assert rel_err(ort_run(tiny_path, x), got) < 1e-4


def test_resnet20_x86_matches_onnxruntime(resnet20_path, tmp_path):
    out_dir = tmp_path / "r20"
    code, _, err = run_cli("compress", resnet20_path, "--passes", "fold_bn",
                           "--target", "x86", "-o", out_dir)
    assert code == 0, err
    from onnxc.backends.tvm import load_artifact

    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = load_artifact(out_dir).run({"input": x})[0]
    assert rel_err(ort_run(out_dir / "model.onnx", x), got) < 1e-4


def test_int8_qdq_graph_compiles_and_stays_within_one_quantization_step(tmp_path):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from onnxc.backends.tvm import compile_model

    fp32 = tmp_path / "fp32.onnx"
    onnx.save(tiny_cnn(batch=1), str(fp32))
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
                              for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    qdq = tmp_path / "qdq.onnx"
    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    result = compile_model(str(qdq), "x86", str(tmp_path / "art"))
    # ORT runs QDQ as integer kernels; TVM computes the same QDQ math in float.
    assert result.verification["max_rel"] < 5e-2


# ---- arm / cuda (built here; ARM is run under qemu in the slow tests) ------------------


def test_arm_artifact_is_an_aarch64_shared_library(tiny_path, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu)")
    out_dir = tmp_path / "arm"
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "--mcpu", "cortex-a72",
                           "-o", out_dir)
    assert code == 0, err
    head = (out_dir / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # AArch64
    info = json.loads((out_dir / "target.json").read_text())
    assert info["target"]["target"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                        "mattr": ["+neon"], "mcpu": "cortex-a72"}
    code, _, err = run_cli("run", out_dir, "--input", "unused.npy")
    assert code == 8 and "qemu" in err


def test_cuda_artifact_carries_device_code_for_requested_arch(tiny_path, tmp_path):
    out_dir = tmp_path / "cuda"
    code, _, err = run_cli("compress", tiny_path, "--target", "cuda", "--cuda-arch", "sm_75",
                           "-o", out_dir)
    assert code == 0, err
    assert (out_dir / "model.so").is_file()
    assert "__global__" in (out_dir / "kernels.cu").read_text()
    info = json.loads((out_dir / "target.json").read_text())
    assert info["target"]["target"]["arch"] == "sm_75" and info["target"]["device"] == "cuda"
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the PTX ahead-of-time check needs it")
    ptx = (out_dir / "kernels.sm_75.ptx").read_text()
    assert ".target sm_75" in ptx and ".entry" in ptx


def test_input_names_that_are_not_identifiers_compile_for_cuda_and_x86(tmp_path):
    from onnxc.backends.tvm import compile_model, load_artifact

    model = tiny_cnn(batch=1, input_name="gpu_0/data_0")     # as in the onnx model zoo
    cuda = compile_model(model, "cuda", str(tmp_path / "cuda"))
    assert cuda.inputs[0]["name"] == "gpu_0/data_0"
    if shutil.which("nvcc"):
        assert (tmp_path / "cuda" / "kernels.sm_80.ptx").is_file()
    compile_model(model, "x86", str(tmp_path / "x86"))
    x = np.ones((1, 3, 16, 16), np.float32)
    assert load_artifact(tmp_path / "x86").run({"gpu_0/data_0": x})[0].shape == (1, 5)


def test_cuda_artifact_runs_on_a_gpu(tiny_path, tmp_path):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine (CUDA artifacts are built and checked, "
                    "not run)")
    out_dir = tmp_path / "cuda_run"
    assert run_cli("compress", tiny_path, "--target", "cuda", "-o", out_dir)[0] == 0
    from onnxc.backends.tvm import load_artifact

    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert rel_err(ort_run(tiny_path, x), load_artifact(out_dir).run({"x": x})[0]) < 1e-4


def test_no_cross_compiler_writes_tar_with_link_instructions(tiny_path, tmp_path):
    out_dir = tmp_path / "riscv"
    target = json.dumps({"kind": "llvm", "mtriple": "riscv64-linux-gnu",
                         "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c"]})
    if shutil.which("riscv64-linux-gnu-g++"):
        pytest.skip("a riscv64 cross compiler is installed here")
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "--target-json", target,
                           "-o", out_dir)
    assert code == 0, err
    assert (out_dir / "model.tar").is_file() and not (out_dir / "model.so").exists()
    assert "g++ -shared" in (out_dir / "LINK.txt").read_text()
    code, _, err = run_cli("run", out_dir, "--input", "x.npy")
    assert code != 0 and "LINK.txt" in err


# ---- errors -----------------------------------------------------------------------------


def test_unknown_target_is_a_usage_error(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "x87", "-o", tmp_path / "o")
    assert code == 2 and "unknown target 'x87'" in err and "x86" in err


def test_malformed_target_json_is_a_usage_error(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--target-json",
                           '{"kind": "llvm",', "-o", tmp_path / "o")
    assert code == 2 and "--target-json is not valid JSON" in err
    assert len(err.strip().splitlines()) == 2          # the progress line + one error line
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--target-json",
                           '{"kind": "no-such-kind"}', "-o", tmp_path / "o")
    assert code == 2 and "invalid TVM target" in err


def test_missing_cross_compiler_is_a_backend_error(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "--cross-cc",
                           "aarch64-nonexistent-g++", "-o", tmp_path / "o")
    assert code == 8 and "cross compiler 'aarch64-nonexistent-g++' not found" in err
    assert not (tmp_path / "o").exists()


def test_run_on_a_directory_that_is_not_an_artifact(tmp_path):
    code, _, err = run_cli("run", tmp_path, "--input", "x.npy")
    assert code == 2 and "is not an onnxc artifact" in err
    code, _, err = run_cli("bench", tmp_path / "missing")
    assert code == 2 and "is not an artifact directory" in err


def test_run_rejects_input_of_wrong_shape(tiny_x86, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 16, 16), np.float32))
    code, _, err = run_cli("run", tiny_x86, "--input", tmp_path / "bad.npy")
    assert code == 7 and "compiled for [1, 3, 16, 16]" in err


def test_tuning_for_arm_without_rpc_device_is_refused(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "--tune-trials", "8",
                           "-o", tmp_path / "o")
    assert code == 2 and "--rpc-tracker" in err


def test_unreachable_rpc_tracker_is_a_backend_error(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--tune-trials", "8",
                           "--tune-db", tmp_path / "db", "--rpc-tracker", "127.0.0.1:9",
                           "--rpc-key", "none", "-o", tmp_path / "o")
    assert code == 8 and "cannot reach the RPC tracker at 127.0.0.1:9" in err


def test_tuning_setup_survives_unnamed_handlers_on_metaschedule_logger(tmp_path):
    """Regression: MetaSchedule's logging setup lists the logger's handlers by name, so
    an unnamed one (pytest attaches its capture handler) made a second tuning run in
    the same process fail with "'NoneType' object has no attribute 'format'"."""
    import logging

    import tvm
    import tvm.s_tir.meta_schedule as ms

    from onnxc.backends.tvm.build import import_relax, io_signature, static_model
    from onnxc.backends.tvm.tuning import _tune_contexts, import_tensor_intrinsics

    import_tensor_intrinsics()                 # as tune() does: seconds instead of minutes
    model = static_model(tiny_cnn())
    mod = import_relax(model, io_signature(model)[0])
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    with target:
        mod = tvm.relax.pipeline.zero_pipeline()(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = logging.NullHandler()            # no name, like pytest's LogCaptureHandler
    _tune_contexts(tasks, str(tmp_path / "a"), 0)
    logger.addHandler(foreign)
    try:
        contexts, weights = _tune_contexts(tasks, str(tmp_path / "b"), 0)
        assert len(contexts) == len(weights) == len(tasks) > 0
        assert foreign in logger.handlers      # put back after the setup
    finally:
        logger.removeHandler(foreign)


def test_tvm_runtime_gets_every_physical_core(tmp_path):
    """TVM's x86 default is half the logical CPUs (it assumes hyper-threading): on a CPU
    without it that ran every kernel on one core of two. An onnxc process starts TVM's
    thread pool with the physical cores, and a user's TVM_NUM_THREADS wins."""
    import os
    import subprocess
    import sys

    import psutil

    from onnxc.backends.tvm import runtime_threads

    probe = ("import onnxc.backends.tvm, tvm; "
             "print(tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    for extra, want in (({}, runtime_threads(env)), ({"TVM_NUM_THREADS": "1"}, 1)):
        out = subprocess.run([sys.executable, "-c", probe], env=dict(env, **extra),
                             capture_output=True, text=True, check=True).stdout.split()
        assert int(out[-1]) == want, (extra, out)
    assert runtime_threads(env) == min(len(os.sched_getaffinity(0)),
                                       psutil.cpu_count(logical=False))
