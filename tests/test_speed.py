"""Speed check of every build that runs here and ``--require-speedup``."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from test_tvm import tiny_cnn

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path


def test_report_and_summary_give_artifact_and_onnxruntime_latencies(tiny_path, tmp_path):
    code, out, err = run_cli("compress", tiny_path, "--passes", "fold_bn", "-o", tmp_path / "a")
    assert code == 0, err
    speed = json.loads((tmp_path / "a" / "report.json").read_text())["speed"]
    assert speed["measured"] and speed["batch"] == 1
    for key in ("artifact_ms", "ort_compressed_ms", "ort_original_ms"):
        assert speed[key] > 0
    assert speed["speedup_vs_original"] == pytest.approx(
        speed["ort_original_ms"] / speed["artifact_ms"], rel=0.01)
    line = next(ln for ln in out.splitlines() if ln.startswith("speed:"))
    assert "artifact" in line and "on the original" in line and "x the original" in line
    assert "## Speed" in (tmp_path / "a" / "README.md").read_text()


def test_require_speedup_not_met_exits_5_and_writes_nothing(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--passes", "fold_bn",
                           "--require-speedup", "1000", "-o", tmp_path / "a")
    assert code == 5, err
    assert "--require-speedup 1000" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_require_speedup_met_writes_the_artifact(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--passes", "fold_bn",
                           "--require-speedup", "0.01", "-o", tmp_path / "a")
    assert code == 0, err
    assert (tmp_path / "a" / "report.json").exists()


def test_require_speedup_for_a_target_that_cannot_run_here_is_a_usage_error(tiny_path,
                                                                           tmp_path):
    pytest.importorskip("tvm")
    code, _, err = run_cli("compress", tiny_path, "--target", "arm", "--require-speedup",
                           "2", "-o", tmp_path / "a")
    assert code == 2, err
    assert "does not run on this machine" in err


def test_non_positive_require_speedup_is_a_usage_error(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--require-speedup", "0",
                           "-o", tmp_path / "a")
    assert code == 2 and "--require-speedup" in err


def test_synthetic_calibration_is_stated_in_report_and_readme(tiny_path, tmp_path):
    code, _, err = run_cli("compress", tiny_path, "--passes", "int8", "--no-speed-check",
                           "-o", tmp_path / "a")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["calibration"]["data"] == "synthetic" and "speed" not in report
    assert "Calibration: **synthetic**" in (tmp_path / "a" / "README.md").read_text()
