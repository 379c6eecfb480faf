"""tools/bench_suite.py: the recovery time budget and the report, without running the suite."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_suite as bs  # noqa: E402


def test_recover_budget_splits_what_is_left_by_weight():
    pending = [("resnet56", "prune50+recover"), ("resnet56", "int8+recover"),
               ("resnet20", "ternary+recover")]
    left = 1200.0
    train = left - sum(bs.RECOVER_OVERHEAD_S[m] for m, _ in pending)
    w = [bs.RECOVER_WEIGHTS[m][c.replace("+recover", "")] for m, c in pending]
    got = bs.recover_minutes(pending, left)
    assert got == pytest.approx(train * w[0] / sum(w) / 60)
    # All rows' shares add up to the training time: nothing is planned beyond the budget.
    total, rest = 0.0, list(pending)
    while rest:
        m = bs.recover_minutes(rest, left)
        total += m
        left -= m * 60 + bs.RECOVER_OVERHEAD_S[rest[0][0]]
        rest.pop(0)
    assert total == pytest.approx(train / 60)


def test_recover_budget_never_below_a_floor():
    assert bs.recover_minutes([("resnet56", "binary+recover")], -50.0) == 0.25


def test_every_lossy_configuration_has_a_weight_and_a_recover_row():
    for model in bs.MODELS:
        assert set(bs.RECOVER_WEIGHTS[model]) == set(bs.LOSSY)
    for base in bs.LOSSY:
        assert base + "+recover" in bs.ALL_CONFIGS


def test_recover_options_carry_the_budget():
    class Args:
        recover_epochs, threads, recover_hints = 40.0, 2, "auto"

    opts = bs.options_for("resnet56", "prune50+recover", "thinet", Args, minutes=3.5)
    assert opts["recover_minutes"] == 3.5 and opts["prune_criterion"] == "thinet"
    assert bs.needed_passes("prune50+int8+recover")[-1] == "recover"


def test_render_writes_markdown_goals_and_plots(tmp_path):
    row = dict(model="resnet56", status="ok", top1=93.8, original_top1=94.1, drop=0.3,
               params=400_000, macs=60_000_000, bytes=1_600_000, storage_bytes=300_000,
               original_bytes=3_440_000, cr=11.47, ort_bs1_ms=10.0,
               ort_bs1_original_ms=20.0, sr_bs1=2.0, ort_bs64_ms=300.0,
               ort_bs64_original_ms=600.0, sr_bs64=2.0,
               recover={"epochs": 20.0, "seconds": 300.0, "hints": 3, "kept_epoch": 20})
    results = {"meta": {"machine": "x86_64, 2 cores", "ort_threads": 2,
                        "command": "python tools/bench_suite.py"},
               "models": {"resnet56": {"original_top1": 94.1}},
               "rows": [dict(row, config="prune50+int8+recover")]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out, plots = tmp_path / "B.md", tmp_path / "plots"
    assert bs.main(["--render", "--json", str(path), "--out", str(out),
                    "--plots", str(plots)]) == 0
    text = out.read_text()
    assert "| prune50+int8+recover | 93.80 | +0.30 |" in text
    assert "| prune50+int8+recover | size Cr ≥ 10× and drop ≤ 1.0 pt |" in text
    assert "| yes |" in text
    assert (plots / "top1_vs_cr.png").stat().st_size > 1000
    assert (plots / "top1_vs_sr.png").stat().st_size > 1000


def test_params_share_reaches_the_size_target_with_the_measured_overhead():
    # An int8 model of 850k params in 1.018 MB (as measured for ResNet-56): 168 kB of
    # it is not weights. Cr 10 of 3.44 MB leaves 344 kB, i.e. ~170k params.
    share = bs.params_share_for_cr(3_440_640, 850_986, 1_017_856, 10.0)
    keep = 850_986 * (1 - share)
    assert keep + (1_017_856 - 850_986) <= 3_440_640 / 10
    assert 0.75 < share < 0.85
    # Less overhead, less pruning; an impossible target is capped.
    assert bs.params_share_for_cr(3_440_640, 850_986, 880_000, 10.0) < 0.66
    assert bs.params_share_for_cr(3_440_640, 850_986, 1_017_856, 100.0) == 0.95
