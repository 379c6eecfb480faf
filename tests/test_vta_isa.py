"""VTA instruction set: every field round-trips through the 128-bit / 32-bit encodings."""

from __future__ import annotations

import numpy as np
import pytest

from onnxc.backends.vta import isa
from onnxc.backends.vta.config import VtaConfig
from onnxc.errors import BackendError, UsageError

CONFIGS = [VtaConfig(), VtaConfig(LOG_BLOCK=5)]


def _random_insns(cfg, rng, n=200):
    out = []
    for _ in range(n):
        deps = isa.Deps(*(bool(b) for b in rng.integers(0, 2, 4)))
        kind = rng.integers(0, 5)
        if kind == 0:
            out.append(isa.MemInsn(isa.LOAD, int(rng.choice([0, 1, 2, 3])),
                                   int(rng.integers(0, 1 << 16)), int(rng.integers(0, 1 << 32)),
                                   *(int(v) for v in rng.integers(0, 1 << 16, 3)),
                                   *(int(v) for v in rng.integers(0, 16, 4)), deps=deps))
        elif kind == 1:
            out.append(isa.MemInsn(isa.STORE, isa.MEM_OUT, int(rng.integers(0, 1 << 16)),
                                   int(rng.integers(0, 1 << 32)),
                                   *(int(v) for v in rng.integers(0, 1 << 16, 3)), deps=deps))
        elif kind == 2:
            a, i, w = (1 << cfg.log_acc_depth, 1 << cfg.log_inp_depth, 1 << cfg.log_wgt_depth)
            out.append(isa.GemmInsn(bool(rng.integers(0, 2)), int(rng.integers(0, cfg.uop_depth)),
                                    int(rng.integers(0, cfg.uop_depth + 1)),
                                    int(rng.integers(0, 1 << 14)), int(rng.integers(0, 1 << 14)),
                                    int(rng.integers(0, a)), int(rng.integers(0, a)),
                                    int(rng.integers(0, i)), int(rng.integers(0, i)),
                                    int(rng.integers(0, w)), int(rng.integers(0, w)), deps=deps))
        elif kind == 3:
            a, i = 1 << cfg.log_acc_depth, 1 << cfg.log_inp_depth
            out.append(isa.AluInsn(int(rng.integers(0, 4)), bool(rng.integers(0, 2)),
                                   int(rng.integers(-(1 << 15), 1 << 15)),
                                   int(rng.integers(0, cfg.uop_depth)),
                                   int(rng.integers(0, cfg.uop_depth + 1)),
                                   int(rng.integers(0, 1 << 14)), int(rng.integers(0, 1 << 14)),
                                   int(rng.integers(0, a)), int(rng.integers(0, a)),
                                   int(rng.integers(0, i)), int(rng.integers(0, i)),
                                   reset=bool(rng.integers(0, 2)), deps=deps))
        else:
            out.append(isa.FinishInsn(deps=deps))
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=["block16", "block32"])
def test_every_instruction_field_round_trips_through_128_bits(cfg):
    insns = _random_insns(cfg, np.random.default_rng(0))
    data = isa.encode_stream(insns, cfg)
    assert len(data) == 16 * len(insns)
    assert isa.decode_stream(data, cfg) == insns


@pytest.mark.parametrize("cfg", CONFIGS, ids=["block16", "block32"])
def test_uops_round_trip_through_32_bits(cfg):
    rng = np.random.default_rng(1)
    uops = np.stack([rng.integers(0, 1 << cfg.log_acc_depth, 500),
                     rng.integers(0, 1 << cfg.log_inp_depth, 500),
                     rng.integers(0, 1 << cfg.log_wgt_depth, 500)], 1)
    words = isa.encode_uops(uops, cfg)
    assert words.dtype == np.uint32
    np.testing.assert_array_equal(isa.decode_uops(words, cfg), uops)


def test_field_layout_matches_the_published_bit_positions():
    cfg = VtaConfig()
    # GEMM: opcode 2 in bits 0-2, reset at bit 7, uop_bgn from bit 8 (13 bits for 8192 uops)
    g = isa.GemmInsn(True, 5, 9, 1, 1, 0, 0, 0, 0, 0, 0)
    v = isa.encode(g, cfg)
    assert v & 0b111 == isa.GEMM and (v >> 7) & 1 == 1 and (v >> 8) & 0x1FFF == 5
    assert (v >> 21) & 0x3FFF == 9
    # LOAD: memory type at bits 7-8, sram at 9-24, dram at 25-56, y_size from bit 64
    m = isa.MemInsn(isa.LOAD, isa.MEM_INP, 3, 7, 11, 13, 17, 1, 2, 3, 4)
    v = isa.encode(m, cfg)
    assert (v >> 7) & 3 == isa.MEM_INP and (v >> 9) & 0xFFFF == 3 and (v >> 25) & 0xFFFFFFFF == 7
    assert (v >> 64) & 0xFFFF == 11 and (v >> 80) & 0xFFFF == 13 and (v >> 96) & 0xFFFF == 17
    assert [(v >> (112 + 4 * k)) & 0xF for k in range(4)] == [1, 2, 3, 4]
    # ALU: opcode/use_imm/imm after the four 11-bit index factors (bit 64 + 44)
    a = isa.AluInsn(isa.ALU_SHR, True, -3, 0, 1, 1, 1, 0, 0, 0, 0)
    v = isa.encode(a, cfg)
    assert (v >> 108) & 3 == isa.ALU_SHR and (v >> 110) & 1 == 1
    assert (v >> 111) & 0xFFFF == (-3) & 0xFFFF


def test_a_field_that_does_not_fit_is_refused():
    cfg = VtaConfig()
    with pytest.raises(BackendError, match="pad0"):
        isa.encode(isa.MemInsn(isa.LOAD, isa.MEM_INP, 0, 0, 1, 1, 1, y_pad0=16), cfg)
    with pytest.raises(BackendError, match="imm"):
        isa.encode(isa.AluInsn(isa.ALU_ADD, True, 1 << 15, 0, 1, 1, 1, 0, 0, 0, 0), cfg)
    with pytest.raises(BackendError, match="uop field dst"):
        isa.encode_uops(np.array([[cfg.acc_depth, 0, 0]]), cfg)


def test_config_rejects_widths_the_isa_cannot_encode():
    with pytest.raises(UsageError, match="int8"):
        VtaConfig.from_dict({"LOG_INP_WIDTH": 4})
    with pytest.raises(UsageError, match="uop index bits"):
        VtaConfig.from_dict({"LOG_ACC_BUFF_SIZE": 24, "LOG_INP_BUFF_SIZE": 24})
    with pytest.raises(UsageError, match="unknown key"):
        VtaConfig.from_dict({"LOG_BLOK": 4})
