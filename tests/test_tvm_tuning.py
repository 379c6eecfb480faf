"""Tuning that never breaks a build and tells the truth.

A database record that does not replay on a kernel is skipped (the kernel is tuned on its
own or built untuned), never an internal error; ``--tune-minutes`` bounds tuning by wall
clock; the artifact's README and report say whether it was tuned and how to tune it on
the device. Runs that actually tune are marked slow.
"""

from __future__ import annotations

import json
import time

import onnx
import pytest

from conftest import run_cli

pytest.importorskip("tvm")


def tiny(batch=1):
    from test_tvm import tiny_cnn

    return tiny_cnn(batch=batch)


def two_conv_model(batch=1) -> onnx.ModelProto:
    """Conv(8->8)+Relu, then the same conv shape with a residual Add+Relu: two kernels
    that share one anchor-block task (same conv, another fused epilogue)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3)
                                       .astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])],
        [init("w1", (8, 8, 3, 3)), init("b1", (8,)), init("w2", (8, 8, 3, 3)),
         init("b2", (8,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(tiny(batch="N"), str(path))
    return path


@pytest.fixture(scope="module")
def two_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("two") / "two.onnx"
    onnx.save(two_conv_model(), str(path))
    return path


def seed_record_that_does_not_transfer(db_dir) -> tuple:
    """An anchor-block database whose one record, made on the first conv kernel, replays
    there but not on its sibling (MetaSchedule's anchor-trace transfer leaves the
    sibling's epilogue blocks unscheduled and stops with a check failure, the same kind
    of failure as the 'cache-read' ScheduleError). Returns (recorded, sibling)."""
    import tvm.s_tir.meta_schedule as ms
    from tvm import s_tir, tirx

    from onnxc.backends.tvm import build, targets, tuning

    target = targets.resolve("x86", {}).tvm_target()
    model = build.static_model(two_conv_model())
    mod = build.import_relax(model, build.io_signature(model)[0])
    mod = tuning.prepare_module(mod, target, prepack=True)
    (task,) = ms.relax_integration.extract_tasks(mod, target, module_equality="anchor-block")
    recorded = task.dispatched[0]
    sch = s_tir.Schedule(recorded)
    sch.cache_read(sch.get_sblock("conv2d_nchw"), 1, "global")
    anchor_dir = db_dir / "anchor-block"
    anchor_dir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(anchor_dir), module_equality="anchor-block")
    workload = db.commit_workload(recorded)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [1e-3], target,
        ms.arg_info.ArgInfo.from_prim_func(recorded["main"])))
    kernels = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tirx.PrimFunc)]
    from tvm_ffi import structural_equal

    same = [n for n in kernels if structural_equal(
        tuning_normalize(mod[n]), recorded)]
    return same[0], next(n for n in kernels if n not in same)


def tuning_normalize(func):
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def test_record_that_does_not_transfer_is_skipped_and_its_kernel_built_untuned(tmp_path):
    from onnxc.backends.tvm import compile_model

    db = tmp_path / "db"
    recorded, sibling = seed_record_that_does_not_transfer(db)
    result = compile_model(two_conv_model(), "x86", str(tmp_path / "art"),
                           {"tune_db_only": True, "tune_db": str(db),
                            "tune_equality": "anchor-block"})
    stats = result.tuning
    assert stats.cached == stats.tasks == 1
    assert stats.not_replayed == [sibling]          # skipped, not an internal error
    assert stats.untuned_kernels == [sibling]       # the recorded kernel kept its schedule
    assert result.verification["max_rel"] < 1e-4    # and the library is still right


@pytest.mark.slow   # the fallback's set-up (TVM's intrinsics, design spaces) before the budget
def test_cli_build_against_a_database_with_a_record_that_does_not_transfer(two_path,
                                                                         tmp_path):
    db = tmp_path / "db"
    seed_record_that_does_not_transfer(db)
    # A tiny --tune-minutes: the budget is gone before the fallback could tune anything.
    code, _, err = run_cli("compress", two_path, "--target", "x86", "--tune-minutes",
                           "0.0001", "--tune-db", db, "--tune-equality", "anchor-block",
                           "--no-speed-check", "-o", tmp_path / "a")
    assert code == 0, err
    assert "does not replay" in err and "internal error" not in err
    runtime = json.loads((tmp_path / "a" / "report.json").read_text())["runtime"]
    assert runtime["tuning"]["not_replayed"] and runtime["tuning"]["untuned_kernels"]
    assert runtime["tuned"] == "partly tuned"
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "**partly tuned**" in readme and "default schedule" in readme


def test_partly_tuned_library_says_which_kernels_run_default_schedules(tmp_path):
    from onnxc.backends.tvm import compile_model, tuned_state
    from onnxc.compress import deployer_readme

    db = tmp_path / "db"
    _, sibling = seed_record_that_does_not_transfer(db)
    result = compile_model(two_conv_model(), "x86", str(tmp_path / "art"),
                           {"tune_db_only": True, "tune_db": str(db),
                            "tune_equality": "anchor-block"})
    assert tuned_state(result.tuning) == "partly tuned"
    stats = dict(result.tuning.as_dict(), measured_on="")
    report = {"target": "x86", "passes": [], "schema_version": 1,
              "original": {"params": 1, "macs": 1, "bytes": 1},
              "final": {"params": 1, "macs": 1, "bytes": 1}, "compression_ratio": 1.0,
              "error": {"max_rel": 0.0, "samples": 1}, "verification": {"data": "synthetic"},
              "runtime": {"name": "tvm", "tuned": "partly tuned", "tuning": stats}}
    readme = deployer_readme(report)
    assert "**partly tuned**" in readme and "1 kernel(s) run TVM's default schedule" in readme


def test_untuned_x86_artifact_says_so_in_readme_and_report(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "-o", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["runtime"]["tuned"] == "untuned"
    assert report["speed"]["measured"] and report["speed"]["artifact_ms"] > 0
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "**untuned**" in readme and "--tune-minutes" in readme


def test_arm_artifact_built_here_says_how_to_tune_on_the_device(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "-o", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["runtime"]["tuned"] == "untuned"
    assert "--rpc-tracker" in report["runtime"]["how_to_tune"]
    assert report["speed"] == {"measured": False, "reason": report["speed"]["reason"]}
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "**untuned**" in readme and "rpc_server" in readme and "--rpc-key" in readme


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_tune_minutes_is_a_usage_error(tiny_path, tmp_path, value):
    code, _, err = run_cli("compress", tiny_path, "--target", "x86", "--tune-minutes",
                           value, "-o", tmp_path / "a")
    assert code == 2 and "--tune-minutes" in err


@pytest.mark.slow
def test_kernel_whose_record_does_not_replay_is_tuned_on_its_own(tmp_path):
    from onnxc.backends.tvm import compile_model

    db = tmp_path / "db"
    _, sibling = seed_record_that_does_not_transfer(db)
    result = compile_model(two_conv_model(), "x86", str(tmp_path / "art"),
                           {"tune_trials": 4, "tune_trials_per_task": 2, "tune_db": str(db),
                            "tune_equality": "anchor-block"})
    stats = result.tuning
    assert stats.not_replayed == [sibling] and stats.fallback_tuned == 1
    assert stats.untuned_kernels == [] and stats.trials > 0
    assert (db / "fallback" / "database_tuning_record.json").stat().st_size > 0
    assert result.verification["max_rel"] < 1e-4


@pytest.mark.slow
def test_tune_minutes_bounds_tuning_and_reports_each_task(tmp_path):
    from onnxc.backends.tvm import compile_model

    started = time.perf_counter()
    result = compile_model(tiny(), "x86", str(tmp_path / "art"),
                           {"tune_minutes": 0.75, "tune_db": str(tmp_path / "db")})
    stats = result.tuning
    assert stats.minutes == 0.75 and stats.trials > 0
    assert stats.per_task and all("share_seconds" in row for row in stats.per_task)
    # heaviest task first; one round may run past its share, not the whole budget
    assert stats.per_task[0]["weight"] >= 1
    assert time.perf_counter() - started < 0.75 * 60 + 240


def test_database_with_a_record_tvm_cannot_load_is_repaired_not_fatal(tmp_path):
    """A record whose trace does not replay on its own workload (another TVM version,
    a damaged line) makes MetaSchedule's JSON database fail to load as a whole."""
    import tvm.s_tir.meta_schedule as ms
    from tvm import tirx

    from onnxc.backends.tvm import compile_model

    db = tmp_path / "db"
    seed_record_that_does_not_transfer(db)
    anchor = db / "anchor-block"
    workloads = (anchor / "database_workload.json").read_text().splitlines()
    records = (anchor / "database_tuning_record.json").read_text().splitlines()
    # The conv record's trace filed again under an empty kernel it cannot replay on.
    empty = ms.database.Workload(tuning_normalize(tirx.PrimFunc([], tirx.Evaluate(0))))
    (anchor / "database_workload.json").write_text(
        "\n".join(workloads + [json.dumps(empty.as_json())]) + "\n")
    (anchor / "database_tuning_record.json").write_text(
        "\n".join(records + [json.dumps([len(workloads), json.loads(records[0])[1]])]) + "\n")
    with pytest.raises(Exception):
        ms.database.JSONDatabase(work_dir=str(anchor), module_equality="anchor-block")

    result = compile_model(two_conv_model(), "x86", str(tmp_path / "art"),
                           {"tune_db_only": True, "tune_db": str(db),
                            "tune_equality": "anchor-block"})
    assert result.tuning.cached == 1                  # the good record survived
    assert list(anchor.glob("database_tuning_record.json.unreadable-*"))
    repaired = ms.database.JSONDatabase(work_dir=str(anchor), module_equality="anchor-block")
    assert len(repaired.get_all_tuning_records()) == 1
    assert result.verification["max_rel"] < 1e-4
