"""onnxc search, recipes (compress --recipe) and --prune-group-ratios on a tiny CNN."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import pytest

from onnxc.cli import main
from prune_nets import Net


def tiny_cnn(batch=None) -> onnx.ModelProto:
    """conv-bn-relu x2 (16 channels each) -> GAP -> Gemm(4); input N x 3 x 8 x 8."""
    net = Net(shape=(1, 3, 8, 8), seed=3)
    x = net.op("Relu", [net.bn(net.conv("x", 3, 16, name="c1"), 16)])
    x = net.op("Relu", [net.bn(net.conv(x, 16, 16, name="c2"), 16)])
    x = net.op("Flatten", [net.op("GlobalAveragePool", [x])])
    y = net.gemm(x, 16, 4, name="fc")
    model = net.model([y])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """model.onnx and labelled.npz (labels = the model's own top-1 on them) + unlabelled."""
    import onnxruntime as ort

    d = tmp_path_factory.mktemp("search")
    model = tiny_cnn()
    onnx.save(model, d / "model.onnx")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (96, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"x": images})[0].argmax(1)
    np.savez(d / "labelled.npz", images=images, labels=labels)
    np.savez(d / "unlabelled.npz", images=images)
    return d


def search_args(files, out, *extra):
    return [str(files / "model.onnx"), "--eval-data", str(files / "labelled.npz"),
            "--calib-data", str(files / "unlabelled.npz"), "--max-drop", "50",
            "--batch", "8", "--criteria", "l1", "--space", "prune,int8", "--quiet",
            "-o", str(out), *extra]


@pytest.fixture(scope="module")
def searched(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "run"
    assert main(["search", *search_args(files, out, "--trials", "3", "--minutes", "3")]) == 0
    return out


def test_search_writes_front_png_recipe_and_artifact(searched):
    summary = json.loads((searched / "pareto.json").read_text())
    assert summary["trials_finished"] == 3
    # (on a tiny model, "slower than the original" is timing noise: whether the bound
    # was met must only agree with the trials)
    assert summary["met_bound"] == any(r["within_bound"] and not r["dropped"]
                                       for r in summary["trials"])
    assert summary["accuracy"].startswith("top-1 on 96 labelled samples")
    assert summary["chosen"] is not None
    kept = [r for r in summary["trials"] if not r["dropped"]]
    assert bool(summary["pareto_front"]) == bool(kept)
    assert {r["trial"] for r in summary["pareto_front"]} <= {r["trial"] for r in kept}
    for row in summary["trials"]:
        assert row["speedup"] > 0 and row["cr"] > 0 and row["original_ms"] > 0
    assert (searched / "pareto.png").stat().st_size > 10_000
    report = json.loads((searched / "model" / "report.json").read_text())
    assert report["target"] == "onnx" and (searched / "model" / "model.onnx").exists()


def test_recipe_records_passes_options_versions_and_data_hashes(searched):
    import yaml

    from onnxc.recipe import sha256_file

    rec = yaml.safe_load((searched / "recipe.yaml").read_text())
    summary = json.loads((searched / "pareto.json").read_text())
    chosen = next(r for r in summary["trials"] if r["trial"] == summary["chosen"])
    assert rec["passes"] == chosen["passes"]
    assert rec["options"] == chosen["options"]
    assert set(rec["versions"]) >= {"onnxc", "onnx", "onnxruntime"}
    calib = rec["data"]["calib"]
    assert calib["sha256"] == sha256_file(calib["path"])
    assert rec["data"]["eval"]["sha256"] == sha256_file(rec["data"]["eval"]["path"])


def test_recipe_replay_gives_the_same_bytes(searched, tmp_path):
    assert main(["compress", "--recipe", str(searched / "recipe.yaml"),
                 "-o", str(tmp_path / "replay"), "--quiet"]) == 0
    assert (tmp_path / "replay" / "model.onnx").read_bytes() == \
        (searched / "model" / "model.onnx").read_bytes()


def test_recipe_with_per_group_ratios_and_float_layers_replays_exactly(files, tmp_path):
    from onnxc.recipe import make, write

    opts = {"prune_group_ratios": "c1=0.5", "prune_criterion": "l1",
            "int8_calibrator": "percentile", "keep_float": "fc"}
    rec = make(str(files / "model.onnx"), ["fold_bn", "prune", "int8"], opts,
               calib_data=str(files / "unlabelled.npz"),
               preprocess={"layout": "NCHW"}, seed=0)
    write(str(tmp_path / "r.yaml"), rec)
    for out in ("a", "b"):
        assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "-o",
                     str(tmp_path / out), "--quiet"]) == 0
    assert (tmp_path / "a" / "model.onnx").read_bytes() == \
        (tmp_path / "b" / "model.onnx").read_bytes()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    prune, int8 = report["passes"][-2], report["passes"][-1]
    assert [(g["channels"], g["removed"]) for g in prune["extra"]["per_group"]] == [(16, 8)]
    assert "fc" in int8["extra"]["float_layers"]


def test_recipe_not_a_recipe_is_usage_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("hello: [1, 2]\n")
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "-o",
                 str(tmp_path / "o")]) == 2
    assert "not an onnxc recipe" in capsys.readouterr().err


def test_search_without_data_is_usage_error(files, tmp_path, capsys):
    assert main(["search", str(files / "model.onnx"), "-o", str(tmp_path / "o")]) == 2
    assert "search needs data" in capsys.readouterr().err


def test_search_existing_study_needs_resume(files, searched, capsys):
    assert main(["search", *search_args(files, searched, "--trials", "1")]) == 2
    assert "--resume continues it" in capsys.readouterr().err


def test_search_resume_continues_the_study(files, tmp_path):
    import optuna

    out = tmp_path / "run"
    assert main(["search", *search_args(files, out, "--trials", "2")]) == 0
    assert main(["search", *search_args(files, out, "--trials", "4", "--resume")]) == 0
    study = optuna.load_study(study_name="onnxc-search",
                              storage=f"sqlite:///{out / 'search.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4
    assert len(json.loads((out / "pareto.json").read_text())["trials"]) == 4


def test_agreement_is_used_without_labels(files, tmp_path):
    out = tmp_path / "run"
    args = search_args(files, out, "--trials", "1")
    i = args.index("--eval-data")
    del args[i:i + 2]
    assert main(["search", *args]) == 0
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["accuracy"].startswith("top-1 agreement with the original")
    assert summary["trials"][0]["original_top1"] == 100.0


def _worker(files, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "onnxc.cli", "search", *search_args(files, out, *extra)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers_share_study(files, out, storage_args):
    """One run creates the study (and its profiles); two workers then join it at the
    same time with --resume and share the trials until the study holds 12."""
    import optuna

    assert main(["search", *search_args(files, out, "--trials", "1", *storage_args)]) == 0
    workers = [_worker(files, out, "--trials", "12", "--resume", *storage_args)
               for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in workers]
    for p, log in zip(workers, logs):
        assert p.returncode == 0, log[-2000:]
    url = storage_args[1] if storage_args else f"sqlite:///{out / 'search.db'}"
    study = optuna.load_study(study_name="onnxc-search", storage=url)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    by = {t.user_attrs.get("worker") for t in done}
    assert len(done) >= 12 and len(by) == 3       # the first run + two workers
    assert len({t.number for t in done}) == len(done)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(files, tmp_path):
    _workers_share_study(files, tmp_path / "run", [])


def _postgres_bin(name):
    found = shutil.which(name)
    if found:
        return found
    import glob

    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture
def postgres_url(tmp_path):
    """A throw-away PostgreSQL server (Debian's postgresql package) on a free port."""
    pytest.importorskip("psycopg", reason="psycopg (pip psycopg[binary]) not installed")
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    run_as = []
    if os.geteuid() == 0:           # postgres refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start postgres as a user")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user")
        run_as = ["runuser", "-u", "postgres", "--"]
    # (not under tmp_path: pytest's base directory is private to root, postgres could
    # not enter it)
    data = pathlib.Path(tempfile.mkdtemp(prefix="onnxc-pg-"))
    if run_as:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    made = subprocess.run(run_as + [initdb, "-D", str(data), "-A", "trust", "-U",
                                    "postgres"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-1000:]
    subprocess.run(run_as + [pg_ctl, "-D", str(data), "-w", "-l", str(data / "log"),
                             "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
                             "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(files, tmp_path, postgres_url):
    _workers_share_study(files, tmp_path / "run", ["--storage", postgres_url])


# ---- --prune-group-ratios ---------------------------------------------------------------


def _compress(model, options, passes=("fold_bn", "prune")):
    import onnxc

    return onnxc.compress(model, list(passes), options=options)


def test_prune_group_ratios_cut_only_the_named_groups():
    res = _compress(tiny_cnn(), {"prune_group_ratios": "c1=0.5"})
    shapes = {n.name: res.graph.constant(n.inputs[1]).shape
              for n in res.graph.nodes if n.op == "Conv"}
    assert shapes["c1"][0] == 8 and shapes["c2"] == (16, 8, 3, 3)


def test_prune_group_ratios_unknown_layer_is_usage_error():
    from onnxc.errors import UsageError

    with pytest.raises(UsageError, match="not a layer of any prunable group"):
        _compress(tiny_cnn(), {"prune_group_ratios": "nope=0.5"})


def test_prune_group_ratios_with_a_budget_is_usage_error():
    from onnxc.errors import UsageError

    with pytest.raises(UsageError, match="give no --prune-flops"):
        _compress(tiny_cnn(), {"prune_group_ratios": "c1=0.5", "prune_flops": 0.3})


def test_group_ratios_spec_reproduces_the_counts_it_was_made_from():
    from onnxc import frontend
    from onnxc.passes.prune import (group_ratios_spec, parse_group_ratios,
                                    per_group_counts, prunable_groups)
    from onnxc.passes.prune.allocate import Allocator
    from onnxc.passes.prune.criteria import scores
    from onnxc.passes.prune.groups import DependencyGraph
    from onnxc.pipeline import Context

    graph = frontend.load(tiny_cnn())
    graph.name_nodes()
    dg = DependencyGraph(graph)
    groups = prunable_groups(dg, [])
    alloc = Allocator(dg, groups, scores("l1", dg, graph, Context(), 8), multiple=1)
    for n in range(1, 15):     # every count of a 16-channel group, odd ratios included
        counts = [n] + [0] * (len(alloc.subgroups) - 1)
        removed = alloc.remove_counts(counts)
        spec = parse_group_ratios(group_ratios_spec(groups, removed))
        assert per_group_counts(alloc, groups, spec, 0.0) == counts


@pytest.mark.slow
def test_terminated_search_still_saves_the_best_candidate(files, tmp_path):
    import optuna

    out = tmp_path / "run"
    worker = _worker(files, out, "--minutes", "10")
    url = f"sqlite:///{out / 'search.db'}"
    deadline = time.time() + 240
    while time.time() < deadline and worker.poll() is None:
        try:
            study = optuna.load_study(study_name="onnxc-search", storage=url)
            if any(t.state.name == "COMPLETE" for t in study.trials):
                break
        except Exception:
            pass
        time.sleep(0.5)
    worker.terminate()
    log = worker.communicate(timeout=300)[0]
    assert worker.returncode == 130, log[-2000:]
    assert "saving the best candidate" in log
    assert (out / "recipe.yaml").exists() and (out / "model" / "model.onnx").exists()


def test_recipe_with_an_older_option_spelling_replays(files, tmp_path):
    """Recipes written before int8's flags got their --int8- prefix still replay."""
    from onnxc.recipe import make, write

    rec = make(str(files / "model.onnx"), ["fold_bn", "int8"], {"calibrator": "percentile"},
               calib_data=str(files / "unlabelled.npz"))
    write(str(tmp_path / "r.yaml"), rec)
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "-o",
                 str(tmp_path / "a"), "--quiet"]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["passes"][-1]["extra"]["calibrator"] == "percentile"


def test_size_seeds_prune_enough_for_the_cr_targets_with_int4_weights():
    from onnxc.search import SIZE_SEED_CR, size_seed_shares

    # ResNet-56's int8 profile: 929,827 B, 853,222 params, original 3,440,711 B
    prof = {"bytes": 929_827, "params": 853_222, "original_bytes": 3_440_711}
    shares = size_seed_shares(prof)
    assert len(shares) == len(SIZE_SEED_CR)
    for share, cr in zip(shares, SIZE_SEED_CR):
        size = prof["bytes"] - prof["params"] / 2 * (1 + share)
        assert prof["original_bytes"] / size >= cr
        assert prof["original_bytes"] / (size + 0.05 * prof["params"] / 2) < cr
    # already small enough with 4-bit weights alone: no pruning seed
    assert size_seed_shares({"bytes": 30, "params": 40, "original_bytes": 1000}) == []


def test_latency_ties_go_to_the_smallest_model_within_the_bound():
    from types import SimpleNamespace

    from onnxc.search import choose

    def trial(number, ms, size, drop):
        return SimpleNamespace(number=number, user_attrs={"metrics": {
            "latency_ms": ms, "original_ms": 100.0, "bytes": size, "drop": drop,
            "top1": 90.0 - drop}})

    int8, int4 = trial(0, 60.0, 900, 0.0), trial(1, 61.0, 500, 0.2)
    slow_small, too_lossy = trial(2, 80.0, 300, 0.5), trial(3, 40.0, 200, 3.0)
    trials = [int8, int4, slow_small, too_lossy]
    assert choose(trials, "latency", 1.0) == (int4, True)
    assert choose(trials, "size", 1.0) == (slow_small, True)
    assert choose([int8, trial(4, 50.0, 950, 0.0)], "latency", 1.0)[0].number == 4


def test_stop_signal_inside_a_storage_call_waits_until_it_returns():
    """A TERM that arrives while the study's storage is being written must not interrupt
    that write (it left SQLAlchemy's session half-done and the save hung): it stops the
    search right after the call instead."""
    from onnxc.search import _StopSignals

    stop = _StopSignals()
    done = []
    with pytest.raises(KeyboardInterrupt):
        with stop.storage():
            with stop.storage():
                stop(15, None)          # deferred, not raised here
                done.append("inner")
            done.append("outer")        # still inside the outer call
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):
        stop(15, None)                  # outside any storage call: at once


def test_a_trial_another_worker_recorded_first_is_dropped_not_fatal(tmp_path, monkeypatch):
    """SQLite has no row locks, so two workers asking at once can pop the same enqueued
    trial (CI saw UpdateFinishedTrialError end a worker). The second to finish must log
    and go on."""
    from types import SimpleNamespace

    import optuna

    from onnxc import search

    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="s", storage=url,
                                directions=["maximize", "minimize"])
    other = optuna.load_study(study_name="s", storage=url)     # the other worker
    metrics = {"top1": 90.0, "drop": 0.0, "latency_ms": 1.0, "original_ms": 2.0,
               "bytes": 10, "macs": 5}

    def evaluate_while_the_other_worker_finishes(problem, passes, opts):
        other.tell(study.trials[-1].number, [90.0, 0.5])
        return metrics

    monkeypatch.setattr(search, "suggest", lambda trial, problem, prof: (["fold_bn"], {}, {}))
    monkeypatch.setattr(search, "evaluate", evaluate_while_the_other_worker_finishes)
    problem = SimpleNamespace(args=SimpleNamespace(max_drop=1.0, objective="latency"))
    lines = []
    assert search.run_trial(study, problem, {}, lines.append) is None
    assert "another worker ran it too" in lines[-1]
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
