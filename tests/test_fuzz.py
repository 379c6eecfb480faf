"""Fuzz: randomly built graphs and byte-mutated models fed to `compress` end either in
success or in a clean OnnxcError — never another exception, never a hang."""

import signal

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxc.compress import compress
from onnxc.errors import OnnxcError

UNARY = ["Relu", "Sigmoid", "Tanh", "Identity", "Dropout", "Abs", "Neg"]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class _Timeout(Exception):
    pass


def _run_with_timeout(fn, seconds=60):
    def handler(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outcome(model) -> str:
    try:
        _run_with_timeout(lambda: compress(model, ["fold_bn"], log=lambda m: None))
        return "ok"
    except OnnxcError:
        return "clean error"


@st.composite
def random_graphs(draw):
    """Chains of conv / BN / unary / residual nodes with random (valid) shapes."""
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    c = draw(st.integers(1, 6))
    hw = draw(st.integers(3, 9))
    nodes, inits = [], []
    cur, channels, rank = "x", c, 4
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "bn", "unary", "add", "gemm_head"]))
        out = f"t{i}"
        if kind == "conv":
            co = draw(st.integers(1, 6))
            k = draw(st.sampled_from([1, 3]))
            inits.append(numpy_helper.from_array(
                rng.normal(size=(co, channels, k, k)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [out], name=f"n{i}",
                                          pads=[k // 2] * 4))
            channels = co
        elif kind == "bn":
            for j, (lo, hi) in enumerate([(0.5, 1.5), (-1, 1), (-1, 1), (0.1, 2)]):
                inits.append(numpy_helper.from_array(
                    rng.uniform(lo, hi, channels).astype(np.float32), f"bn{i}_{j}"))
            nodes.append(helper.make_node("BatchNormalization",
                                          [cur] + [f"bn{i}_{j}" for j in range(4)], [out],
                                          name=f"n{i}"))
        elif kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [cur], [out],
                                          name=f"n{i}"))
        elif kind == "add":
            nodes.append(helper.make_node("Add", [cur, cur], [out], name=f"n{i}"))
        else:
            nodes.append(helper.make_node("GlobalAveragePool", [cur], [f"p{i}"], name=f"g{i}"))
            nodes.append(helper.make_node("Flatten", [f"p{i}"], [f"f{i}"], name=f"f{i}"))
            inits.append(numpy_helper.from_array(
                rng.normal(size=(3, channels)).astype(np.float32), f"fc{i}"))
            nodes.append(helper.make_node("Gemm", [f"f{i}", f"fc{i}"], [out], name=f"n{i}",
                                          transB=1))
            cur, rank = out, 2
            break
        cur = out
    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [f"d{k}" for k in range(rank)])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@SETTINGS
@given(random_graphs())
def test_random_graphs_compress_cleanly(model):
    assert _outcome(model) in ("ok", "clean error")


@SETTINGS
@given(random_graphs())
def test_valid_random_graphs_compress_exactly(model):
    """Every generated graph is valid, so compress must succeed and stay exact."""
    result = _run_with_timeout(lambda: compress(model, ["fold_bn"], log=lambda m: None))
    assert result.report["error"]["max_rel"] <= 1e-5
    assert "BatchNormalization" not in {n.op for n in result.graph.nodes}


@pytest.fixture(scope="module")
def seed_model_bytes():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]) \
        .SerializeToString()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                max_size=8),
       st.integers(0, 100))
def test_byte_mutated_models_fail_cleanly(seed_model_bytes, flips, cut):
    data = bytearray(seed_model_bytes)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut:
        data = data[: max(1, len(data) * cut // 100)]
    assert _outcome(bytes(data)) in ("ok", "clean error")


def test_cli_fuzz_campaign_finds_nothing():
    """A short run of tools/fuzz.py: random valid and broken models through the whole
    CLI with random pass lists (see that script for what it checks; long campaigns:
    `python tools/fuzz.py --minutes 10`)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import fuzz

    lines = []
    failures = fuzz.campaign(cases=30, minutes=None, seed=0, save=None, log=lines.append)
    assert not failures, "\n".join(lines)
    assert "30 cases, 0 failed" in lines[-1]
