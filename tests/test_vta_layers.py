"""Single conv/dense layers lowered to VTA and run in the simulator must equal the numpy
integer reference bit for bit — and the reference must equal ONNX Runtime on the QDQ
graph it stands for."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxc.backends.vta.config import VtaConfig
from onnxc.backends.vta.lower import lower
from onnxc.backends.vta.qlayer import QLayer, reference
from onnxc.errors import BackendError, UnsupportedError

# Buffers small enough that a 16..64-channel layer needs many tiles, partial sums over
# input-channel groups, reloaded weights and (at 2^9 bytes) reloaded uop kernels.
SMALL = dict(LOG_INP_BUFF_SIZE=10, LOG_WGT_BUFF_SIZE=13, LOG_ACC_BUFF_SIZE=11,
             LOG_UOP_BUFF_SIZE=11)
TINY_UOP = dict(SMALL, LOG_UOP_BUFF_SIZE=9)
SCHEDULES = ("load-first", "compute-first", "store-first", 7)


def make_layer(n, c, h, w, o, k, stride, pad, relu=False, seed=0, shifts=(4, 12),
               kind="conv") -> QLayer:
    rng = np.random.default_rng(seed)
    weight = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    bias = rng.integers(-20000, 20000, o)
    shift = rng.integers(shifts[0], shifts[1], o)
    return QLayer("layer", kind, (n, c, h, w), weight, bias, shift, (stride, stride),
                  (pad,) * 4, relu)


def check(layer, cfg, schedules=("load-first", "compute-first"), seed=0):
    x = np.random.default_rng(seed + 100).integers(-128, 128, layer.in_shape).astype(np.int8)
    prog = lower(layer, cfg)
    want = reference(layer, x, cfg.ROUNDING)
    for sched in schedules:
        got, stats = prog.run(x, schedule=sched, poison=True)
        np.testing.assert_array_equal(got, want, err_msg=f"schedule {sched}")
    return prog, stats


CONV_SHAPES = [
    # n, c, h, w, o, k, stride, pad
    (1, 16, 8, 8, 16, 3, 1, 1),       # one block in, one out
    (1, 3, 9, 7, 20, 3, 2, 1),        # first-layer style: 3 channels, odd sizes, stride 2
    (1, 40, 6, 6, 33, 1, 1, 0),       # 1x1, channels not multiples of 16
    (2, 24, 5, 5, 8, 3, 1, 2),        # batch 2, padding larger than needed for 'same'
    (1, 32, 12, 10, 48, 3, 2, 0),     # stride 2 without padding
    (1, 17, 7, 7, 16, 5, 1, 2),       # 5x5
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rounding", ["even", "up"])
def test_conv_matches_integer_reference(shape, rounding):
    check(make_layer(*shape, relu=shape[0] == 1), VtaConfig(ROUNDING=rounding))


@pytest.mark.parametrize("shape", [(1, 48, 12, 12, 40, 3, 1, 1), (1, 35, 10, 9, 20, 3, 2, 2),
                                   (1, 64, 9, 9, 64, 1, 1, 0)], ids=lambda s: "x".join(map(str, s)))
def test_conv_that_exceeds_the_buffers_is_tiled_exactly(shape):
    cfg = VtaConfig(**SMALL)
    prog, _ = check(make_layer(*shape), cfg, SCHEDULES)
    t = prog.tiling
    assert not t.resident_weights and t.ib < -(-shape[1] // 16) or t.oh < prog.layer.out_shape[2]


def test_uop_kernels_are_reloaded_when_they_do_not_fit():
    prog, _ = check(make_layer(1, 32, 10, 10, 32, 3, 1, 1), VtaConfig(**TINY_UOP), SCHEDULES)
    assert prog.info["uop_mode"] == "reloaded per kernel"


@pytest.mark.parametrize("n,k,o", [(1, 64, 10), (3, 100, 37), (1, 256, 128)])
def test_dense_matches_integer_reference(n, k, o):
    layer = make_layer(n, k, 1, 1, o, 1, 1, 0, kind="dense")
    x = np.random.default_rng(5).integers(-128, 128, (n, k)).astype(np.int8)
    prog = lower(layer, VtaConfig())
    got, _ = prog.run(x, poison=True)
    assert got.shape == (n, o)
    np.testing.assert_array_equal(got, reference(layer, x))


def test_block32_configuration_is_exact():
    check(make_layer(1, 40, 8, 8, 70, 3, 1, 1, relu=True), VtaConfig(LOG_BLOCK=5), SCHEDULES)


def test_shifts_of_zero_and_below_scale_up_without_rounding():
    check(make_layer(1, 16, 6, 6, 16, 3, 1, 1, shifts=(-2, 3)), VtaConfig())


def test_second_requantisation_stage_after_relu():
    layer = make_layer(1, 16, 6, 6, 24, 3, 1, 1)
    layer.extra_stages = [(np.full(24, 2), True)]
    check(layer, VtaConfig(), SCHEDULES)


def test_double_buffering_overlaps_the_three_modules():
    prog, stats = check(make_layer(1, 64, 16, 16, 64, 3, 1, 1), VtaConfig(**SMALL))
    assert prog.tiling.inp_slots == 2 and prog.tiling.acc_slots == 2
    assert stats.cycles < sum(stats.busy.values())          # modules ran concurrently
    assert stats.gemm_macs == prog.info["gemm_uops"] * 256
    assert prog.info["macs"] <= stats.gemm_macs <= stats.cycles * 256


def test_a_missing_dependency_token_corrupts_the_output_under_some_schedule():
    # Remove every "wait for a free input slot" handshake (load pops, compute pushes):
    # the stream stays balanced, but the load module may now overwrite a tile the GEMM
    # has not read yet — the load-first schedule must expose it.
    layer = make_layer(1, 32, 12, 12, 32, 3, 1, 1)
    prog = lower(layer, VtaConfig(**SMALL))
    x = np.random.default_rng(3).integers(-128, 128, layer.in_shape).astype(np.int8)
    broken = copy.deepcopy(prog)
    for ins in broken.insns:
        if ins.opcode == 0 and ins.mem in (1, 2):
            ins.deps.pop_next = False
        if ins.opcode == 2 and not ins.reset:
            ins.deps.push_prev = False
    got, _ = broken.run(x, schedule="load-first")
    assert not np.array_equal(got, reference(layer, x))
    got, _ = prog.run(x, schedule="load-first")
    np.testing.assert_array_equal(got, reference(layer, x))


def test_an_unbalanced_token_is_reported():
    prog = lower(make_layer(1, 16, 4, 4, 16, 3, 1, 1), VtaConfig())
    bad = copy.deepcopy(prog)
    next(i for i in bad.insns if i.deps.pop_prev).deps.pop_prev = False
    with pytest.raises(BackendError, match="tokens behind"):
        bad.run(np.zeros((1, 16, 4, 4), np.int8))


def test_a_config_whose_buffers_cannot_hold_one_tile_is_refused():
    cfg = VtaConfig(LOG_INP_BUFF_SIZE=6, LOG_ACC_BUFF_SIZE=8)
    with pytest.raises(UnsupportedError, match="cannot hold one tile"):
        lower(make_layer(1, 16, 8, 8, 64, 3, 1, 1), cfg)


# ---- the reference is what ONNX Runtime computes for the QDQ pattern -----------------------


def _qdq_conv_model(layer, ex, ey, ew):
    o = layer.out_channels
    inits = [
        numpy_helper.from_array(np.float32(2.0 ** ex), "sx"),
        numpy_helper.from_array(np.int8(0), "zx"),
        numpy_helper.from_array(layer.weight, "wq"),
        numpy_helper.from_array((2.0 ** ew).astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(o, np.int8), "zw"),
        numpy_helper.from_array(layer.bias.astype(np.int32), "bq"),
        numpy_helper.from_array((2.0 ** (ex + ew)).astype(np.float32), "sb"),
        numpy_helper.from_array(np.zeros(o, np.int32), "zb"),
        numpy_helper.from_array(np.float32(2.0 ** ey), "sy"),
        numpy_helper.from_array(np.int8(0), "zy"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=list(layer.pads),
                         strides=list(layer.stride)),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y"]),
    ]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(
        "x", TensorProto.INT8, list(layer.in_shape))], [helper.make_tensor_value_info(
            "y", TensorProto.INT8, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_reference_equals_onnxruntime_on_the_qdq_graph_including_ties():
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    ex, ey = -4, -11
    ew = rng.integers(-9, -7, 24)
    # small shifts (ey - ex - ew = 2..3) make exact .5 ties frequent
    layer = make_layer(1, 8, 6, 6, 24, 3, 1, 1, relu=True)
    layer.weight = rng.integers(-3, 4, layer.weight.shape).astype(np.int8)
    layer.bias = rng.integers(-300, 300, 24)
    layer.shift = ey - ex - ew
    x = rng.integers(-128, 128, layer.in_shape).astype(np.int8)
    sess = ort.InferenceSession(_qdq_conv_model(layer, ex, ey, ew).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    np.testing.assert_array_equal(reference(layer, x, "even"), want)
    # ties really occurred: round-half-up differs somewhere
    assert not np.array_equal(reference(layer, x, "up"), want)
    got, _ = lower(layer, VtaConfig()).run(x)
    np.testing.assert_array_equal(got, want)


# ---- simulator semantics of single instructions ---------------------------------------------


def _sim_with_acc(values):
    from onnxc.backends.vta.sim import Simulator

    cfg = VtaConfig()
    sim = Simulator(cfg, np.zeros(16, np.uint8))
    sim.acc[:len(values), 0] = np.asarray(values, np.int64)[:, None, None]
    return sim


def test_alu_chain_inside_one_instruction_runs_in_hardware_order():
    from onnxc.backends.vta import isa

    # dst = i+1, src = i over iter_in: a running prefix sum only if executed in order
    sim = _sim_with_acc([1, 2, 3, 4, 5])
    sim.uop[0] = [1, 0, 0]
    sim._alu(isa.AluInsn(isa.ALU_ADD, False, 0, 0, 1, 1, 4, 0, 1, 0, 1))
    np.testing.assert_array_equal(sim.acc[:5, 0, 0, 0], [1, 3, 6, 10, 15])
    np.testing.assert_array_equal(sim.out[1:5, 0, 0, 0], [3, 6, 10, 15])


def test_alu_shift_semantics_wrap_and_negative_amounts():
    from onnxc.backends.vta import isa

    sim = _sim_with_acc([-7, 1 << 30, 5, 2147483647])
    sim.uop[0] = [0, 0, 0]
    sim._alu(isa.AluInsn(isa.ALU_SHR, True, 1, 0, 1, 1, 1, 0, 0, 0, 0))
    assert sim.acc[0, 0, 0, 0] == -4                  # arithmetic: floor(-7 / 2)
    sim.uop[0] = [1, 0, 0]
    sim._alu(isa.AluInsn(isa.ALU_SHR, True, -2, 0, 1, 1, 1, 0, 0, 0, 0))
    assert sim.acc[1, 0, 0, 0] == 0                   # 2^30 << 2 wraps to 0 in int32
    sim.uop[0] = [3, 0, 0]
    sim._alu(isa.AluInsn(isa.ALU_ADD, True, 1, 0, 1, 1, 1, 0, 0, 0, 0))
    assert sim.acc[3, 0, 0, 0] == -2147483648         # int32 wrap-around
    assert sim.out[3, 0, 0, 0] == 0                   # low byte of 0x80000000


def test_lock_step_simulation_of_many_samples_equals_one_by_one():
    layer = make_layer(1, 20, 7, 7, 24, 3, 2, 1, relu=True)
    prog = lower(layer, VtaConfig(**SMALL))
    x = np.random.default_rng(9).integers(-128, 128, (70,) + layer.in_shape[1:]).astype(np.int8)
    together, stats = prog.run(x, poison=True)          # 64 + 6 samples in two groups
    one, stats1 = prog.run(x[5:6])
    np.testing.assert_array_equal(together, reference(layer, x))
    np.testing.assert_array_equal(together[5:6], one)
    assert stats.cycles == stats1.cycles                # timing is per program run
