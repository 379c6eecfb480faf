"""Slow TVM checks: ARM really run under qemu, MetaSchedule tuning with a
reused database, and tuning through a loopback RPC tracker + server started here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import REPO, run_cli
from test_tvm import ort_run, rel_err, tiny_cnn

pytest.importorskip("tvm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path


@pytest.fixture(scope="module")
def arm_sysroot():
    """The aarch64 sysroot, built by tools/build_arm_sysroot.sh when missing (CI)."""
    from onnxc.backends.tvm.qemu import sysroot_dir

    if shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs qemu-user and g++-aarch64-linux-gnu (.ci/setup-system.sh)")
    root = sysroot_dir()
    if not os.path.isfile(os.path.join(root, ".complete")):
        proc = subprocess.run(["bash", str(REPO / "tools" / "build_arm_sysroot.sh"), root],
                              env=dict(os.environ, PYTHON=sys.executable),
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"could not build the aarch64 sysroot: "
                        f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return root


def test_resnet20_arm_artifact_under_qemu_matches_x86(resnet20_path, arm_sysroot, tmp_path):
    from onnxc.backends.tvm import load_artifact
    from onnxc.backends.tvm.qemu import run_under_qemu

    for target in ("x86", "arm"):
        code, _, err = run_cli("compress", resnet20_path, "--passes", "fold_bn", "--target",
                               target, "-o", tmp_path / target)
        assert code == 0, err
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    x86 = load_artifact(tmp_path / "x86").run({"input": x})[0]
    arm, _ = run_under_qemu(str(tmp_path / "arm"), {"input": x}, arm_sysroot)
    assert arm[0].shape == (1, 10)
    assert rel_err(x86, arm[0]) < 1e-5
    assert rel_err(ort_run(tmp_path / "x86" / "model.onnx", x), arm[0]) < 1e-4


def test_tuning_database_is_reused_without_new_trials(tiny_path, tmp_path):
    from onnxc.backends.tvm import compile_model

    db = tmp_path / "db"
    opts = {"tune_trials": 12, "tune_db": str(db)}
    log = []
    first = compile_model(str(tiny_path), "x86", str(tmp_path / "a"), opts, log=log.append)
    assert first.tuning.trials > 0 and first.tuning.cached == 0
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert any("trials" in line and "best" in line for line in log)      # progress shown
    assert first.verification["max_rel"] < 1e-4
    second = compile_model(str(tiny_path), "x86", str(tmp_path / "b"), opts)
    # The warm database serves every task: no new trials, nothing re-tuned.
    assert second.tuning.trials == 0 and second.tuning.tuned == 0
    assert second.tuning.cached == second.tuning.tasks == first.tuning.tasks
    assert second.verification["max_rel"] < 1e-4
    # --tune-refine spends the budget again on the cached tasks; their records add up.
    third = compile_model(str(tiny_path), "x86", str(tmp_path / "c"),
                          dict(opts, tune_refine=True))
    assert third.tuning.cached == third.tuning.tuned == first.tuning.tasks
    assert third.tuning.trials > 0
    assert third.tuning.trials_in_db > first.tuning.trials_in_db
    assert third.verification["max_rel"] < 1e-4


@pytest.fixture
def rpc_device():
    """A TVM RPC tracker and one server (key 'onnxc-test') on loopback; stopped after."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = rpc.Server(host="127.0.0.1", port=9300, port_end=9400, key="onnxc-test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        import time

        for _ in range(50):          # wait until the server has registered
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            if summary.get("server_info"):
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{tracker.port}"
    finally:
        server.terminate()
        tracker.terminate()


RPC_TEST_TIMEOUT = 900   # seconds; a few minutes on the loaded 2-core development machine


def run_cli_isolated(*argv, timeout: float) -> tuple[int, str]:
    """The CLI in a child process killed after ``timeout`` seconds (test fails, CI goes on).

    RPC tuning involves a tracker, a server and MetaSchedule's worker pools; whatever
    goes wrong among them must not hang the test run, so the child runs in its own
    process group and the whole group is killed on timeout.
    """
    import signal

    code = "import sys; from onnxc.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"onnxc did not finish within {timeout} s; stderr tail:\n{err[-2000:]}")
    return proc.returncode, err


def test_tuning_measures_through_rpc_tracker(tiny_path, tmp_path, rpc_device):
    code, err = run_cli_isolated(
        "compress", tiny_path, "--target", "x86", "--tune-trials", "4",
        "--tune-db", tmp_path / "db", "--rpc-tracker", rpc_device,
        "--rpc-key", "onnxc-test", "-o", tmp_path / "a", timeout=RPC_TEST_TIMEOUT)
    assert code == 0, err
    assert f"rpc {rpc_device} key onnxc-test" in err
    import json

    tuning = json.loads((tmp_path / "a" / "report.json").read_text())["runtime"]["tuning"]
    assert tuning["trials"] > 0 and tuning["runner"].startswith("rpc")
    records = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert records, "RPC measurements were not committed to the database"
    # measured on the server: real run times, not the 1e10 MetaSchedule records on error
    runs = [json.loads(line)[1][1] for line in records]
    assert any(r and max(r) < 1.0 for r in runs), runs


def test_unknown_rpc_key_is_a_backend_error(tiny_path, tmp_path, rpc_device):
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--tune-trials", "4",
                           "--tune-db", tmp_path / "db", "--rpc-tracker", rpc_device,
                           "--rpc-key", "rk3399", "-o", tmp_path / "a")
    assert code == 8 and "no RPC server registered under key 'rk3399'" in err


def test_run_arm_qemu_tool_compares_with_x86(tiny_path, arm_sysroot, tmp_path):
    for target in ("x86", "arm"):
        assert run_cli("compress", tiny_path, "--target", target, "-o", tmp_path / target)[0] \
            == 0
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "run_arm_qemu.py"),
                           str(tmp_path / "arm"), "--compare", str(tmp_path / "x86")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "aarch64 (qemu) vs x86" in proc.stdout



def conv_chain(depth: int = 3, seed: int = 1) -> onnx.ModelProto:
    """Conv(3→8) then ``depth`` Conv(8→8)+Relu of one shape: after int8 each has its own
    scales, so structural equality sees distinct kernels where the convs are the same."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i in range(depth + 1):
        cin = 3 if i == 0 else 8
        inits += [numpy_helper.from_array((rng.standard_normal((8, cin, 3, 3)) * 0.3)
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(8) * 0.1)
                                          .astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 16, 16])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_quantized_graph_tunes_by_anchor_block(tmp_path):
    """int8 kernels differ only in their baked-in scales: anchor-block equality tunes each
    conv shape once, the database serves a second compile, and the result stays right."""
    from onnxc.backends.tvm import compile_model
    from onnxc.compress import compress

    qdq = compress(conv_chain(depth=2), ["int8"], log=lambda m: None).graph.to_onnx()
    # Task count under structural equality, read without tuning (database only).
    structural = compile_model(qdq, "x86", str(tmp_path / "s"),
                               {"tune_db_only": True, "tune_equality": "structural",
                                "tune_db": str(tmp_path / "db"), "int_lowering": False})
    # The float QDQ path (int_lowering off): kernels with baked-in scales are what
    # anchor-block equality is for; the integer path passes scales as tensors instead.
    opts = {"tune_trials": 64, "tune_trials_per_task": 1, "tune_db": str(tmp_path / "db"),
            "int_lowering": False}
    first = compile_model(qdq, "x86", str(tmp_path / "a"), opts)
    assert first.tuning.equality == "anchor-block"          # auto, for a QDQ graph
    assert 0 < first.tuning.tasks < structural.tuning.tasks and first.tuning.trials > 0
    # anchor-block records are kept apart from structural (float) ones in one --tune-db
    assert (tmp_path / "db" / "anchor-block" / "database_tuning_record.json").stat().st_size
    again = compile_model(qdq, "x86", str(tmp_path / "b"), opts)
    assert again.tuning.trials == 0 and again.tuning.cached == again.tuning.tasks
    assert again.verification["max_rel"] < 5e-2


@pytest.mark.slow
def test_integer_kernels_tune_with_their_packed_weights(tmp_path):
    """The lowering packs conv weights at compile time; tuning must not mark them
    layout-free again (MetaSchedule then failed every run with "Check failed:
    (ind.as<PrimVar>())" and the int8 build fell back to untuned kernels). The tuned
    records use the target's dot-product intrinsic and the artifact matches ORT."""
    from onnxc.backends.tvm import compile_model, int_kernels
    from onnxc.compress import compress

    qdq = compress(conv_chain(depth=2), ["int8"], log=lambda m: None).graph.to_onnx()
    built = compile_model(qdq, "x86", str(tmp_path / "a"),
                          {"tune_trials": 8, "tune_trials_per_task": 2,
                           "tune_db": str(tmp_path / "db")})
    assert built.verification["max_rel"] < 5e-2
    assert built.tuning.space_fallbacks == [] and built.tuning.stopped_by != "failed"
    assert built.tuning.trials > 0
    intrin = int_kernels.intrinsic(built.spec.tvm_target())
    if intrin is not None:   # a CPU with a dot-product instruction: tuned conv uses it
        records = (Path(built.tuning.db) / "database_tuning_record.json").read_text()
        # (the 8-lane VNNI tile also covers a 16-lane one in two halves: the tuner may
        # pick either by measurement)
        names = [intrin] + ([int_kernels.NARROW[intrin][0]]
                            if intrin in int_kernels.NARROW else [])
        assert any(name in records for name in names), names
