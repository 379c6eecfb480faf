"""VTA instruction set: the 128-bit instructions and 32-bit micro-ops, encode and decode.

Bit layout (least-significant bit first), as published in VTA's hardware spec:

    every insn   opcode[3] pop_prev pop_next push_prev push_next
    LOAD/STORE   memory_type[2] sram_base[16] dram_base[32] | (bit 64) y_size[16]
                 x_size[16] x_stride[16] y_pad_0[4] y_pad_1[4] x_pad_0[4] x_pad_1[4]
    GEMM/ALU     reset[1] uop_bgn[U] uop_end[U+1] iter_out[14] iter_in[14] |
                 (bit 64) dst_factor_out[A] dst_factor_in[A] src_factor_out[I]
                 src_factor_in[I], then GEMM: wgt_factor_out[W] wgt_factor_in[W]
                                   or ALU:  alu_opcode[2] use_imm[1] imm[16]
    uop          GEMM: dst[A] src[I] wgt[W];  ALU: dst[A] src[I] (src indexes the ACC)

with U, I, W, A the log2 depths of the uop, input, weight and accumulator buffers.
Addresses and sizes count buffer *elements*, never bytes. "prev"/"next" name the
neighbouring module in the load → compute → store pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from onnxc.errors import BackendError

from . import config as C

# Opcodes
LOAD, STORE, GEMM, FINISH, ALU = 0, 1, 2, 3, 4
OPCODE_NAMES = {LOAD: "LOAD", STORE: "STORE", GEMM: "GEMM", FINISH: "FINISH", ALU: "ALU"}
# Memory types (STORE always reads the output buffer; its 2-bit field cannot hold 4).
MEM_UOP, MEM_WGT, MEM_INP, MEM_ACC, MEM_OUT = 0, 1, 2, 3, 4
MEM_NAMES = {MEM_UOP: "uop", MEM_WGT: "wgt", MEM_INP: "inp", MEM_ACC: "acc", MEM_OUT: "out"}
# ALU opcodes
ALU_MIN, ALU_MAX, ALU_ADD, ALU_SHR = 0, 1, 2, 3
ALU_NAMES = {ALU_MIN: "MIN", ALU_MAX: "MAX", ALU_ADD: "ADD", ALU_SHR: "SHR"}

# Which module executes an instruction: loads of inputs/weights go to the load module,
# loads of uops and accumulator data to the compute module (as in VTA's fetch stage).
MOD_LOAD, MOD_COMPUTE, MOD_STORE = 0, 1, 2
MODULE_NAMES = ("load", "compute", "store")


@dataclass
class Deps:
    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False


@dataclass
class MemInsn:
    opcode: int                 # LOAD or STORE
    mem: int                    # MEM_* (STORE: MEM_OUT)
    sram: int
    dram: int                   # element address in DRAM (bytes / element size)
    y_size: int
    x_size: int
    x_stride: int
    y_pad0: int = 0
    y_pad1: int = 0
    x_pad0: int = 0
    x_pad1: int = 0
    deps: Deps = None

    def __post_init__(self):
        if self.deps is None:
            self.deps = Deps()


@dataclass
class GemmInsn:
    reset: bool
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_out: int
    dst_in: int
    src_out: int
    src_in: int
    wgt_out: int = 0
    wgt_in: int = 0
    deps: Deps = None
    opcode: int = GEMM

    def __post_init__(self):
        if self.deps is None:
            self.deps = Deps()


@dataclass
class AluInsn:
    alu_op: int
    use_imm: bool
    imm: int
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_out: int
    dst_in: int
    src_out: int
    src_in: int
    reset: bool = False
    deps: Deps = None
    opcode: int = ALU

    def __post_init__(self):
        if self.deps is None:
            self.deps = Deps()


@dataclass
class FinishInsn:
    deps: Deps = None
    opcode: int = FINISH

    def __post_init__(self):
        if self.deps is None:
            self.deps = Deps()


def module_of(insn) -> int:
    if insn.opcode == LOAD:
        return MOD_LOAD if insn.mem in (MEM_INP, MEM_WGT) else MOD_COMPUTE
    if insn.opcode == STORE:
        return MOD_STORE
    return MOD_COMPUTE


# ---- bit packing ---------------------------------------------------------------------------


class _Packer:
    def __init__(self):
        self.value = 0
        self.pos = 0

    def put(self, v: int, bits: int, name: str, signed: bool = False) -> None:
        v = int(v)
        if signed:
            if not -(1 << (bits - 1)) <= v < (1 << (bits - 1)):
                raise BackendError(f"VTA encoding: {name}={v} does not fit {bits} signed bits")
            v &= (1 << bits) - 1
        elif not 0 <= v < (1 << bits):
            raise BackendError(f"VTA encoding: {name}={v} does not fit {bits} bits")
        self.value |= v << self.pos
        self.pos += bits

    def seek(self, pos: int) -> None:
        assert pos >= self.pos, "fields overlap"   # guarded by VtaConfig.validate
        self.pos = pos


class _Reader:
    def __init__(self, value: int):
        self.value = value
        self.pos = 0

    def get(self, bits: int, signed: bool = False) -> int:
        v = (self.value >> self.pos) & ((1 << bits) - 1)
        self.pos += bits
        if signed and v >> (bits - 1):
            v -= 1 << bits
        return v


def _put_head(p: _Packer, opcode: int, d: Deps) -> None:
    p.put(opcode, C.OPCODE_BITS, "opcode")
    for flag in (d.pop_prev, d.pop_next, d.push_prev, d.push_next):
        p.put(int(flag), 1, "dep")


def encode(insn, cfg: C.VtaConfig) -> int:
    """One instruction as a 128-bit integer."""
    p = _Packer()
    _put_head(p, insn.opcode, insn.deps)
    if insn.opcode in (LOAD, STORE):
        p.put(0 if insn.opcode == STORE else insn.mem, C.MEMOP_ID_BITS, "memory_type")
        p.put(insn.sram, C.MEMOP_SRAM_BITS, "sram_base")
        p.put(insn.dram, C.MEMOP_DRAM_BITS, "dram_base")
        p.seek(64)
        p.put(insn.y_size, C.MEMOP_SIZE_BITS, "y_size")
        p.put(insn.x_size, C.MEMOP_SIZE_BITS, "x_size")
        p.put(insn.x_stride, C.MEMOP_STRIDE_BITS, "x_stride")
        for name in ("y_pad0", "y_pad1", "x_pad0", "x_pad1"):
            p.put(getattr(insn, name), C.MEMOP_PAD_BITS, name)
    elif insn.opcode in (GEMM, ALU):
        u, a, i, w = cfg.log_uop_depth, cfg.log_acc_depth, cfg.log_inp_depth, cfg.log_wgt_depth
        p.put(int(insn.reset), 1, "reset")
        p.put(insn.uop_bgn, u, "uop_bgn")
        p.put(insn.uop_end, u + 1, "uop_end")
        p.put(insn.iter_out, C.LOOP_ITER_BITS, "iter_out")
        p.put(insn.iter_in, C.LOOP_ITER_BITS, "iter_in")
        p.seek(64)
        p.put(insn.dst_out, a, "dst_factor_out")
        p.put(insn.dst_in, a, "dst_factor_in")
        p.put(insn.src_out, i, "src_factor_out")
        p.put(insn.src_in, i, "src_factor_in")
        if insn.opcode == GEMM:
            p.put(insn.wgt_out, w, "wgt_factor_out")
            p.put(insn.wgt_in, w, "wgt_factor_in")
        else:
            p.put(insn.alu_op, C.ALU_OPCODE_BITS, "alu_opcode")
            p.put(int(insn.use_imm), 1, "use_imm")
            p.put(insn.imm, C.ALU_IMM_BITS, "imm", signed=True)
    elif insn.opcode != FINISH:
        raise BackendError(f"VTA encoding: unknown opcode {insn.opcode}")
    return p.value


def decode(value: int, cfg: C.VtaConfig):
    """Inverse of :func:`encode`."""
    r = _Reader(value)
    opcode = r.get(C.OPCODE_BITS)
    deps = Deps(*(bool(r.get(1)) for _ in range(4)))
    if opcode in (LOAD, STORE):
        mem = r.get(C.MEMOP_ID_BITS)
        sram = r.get(C.MEMOP_SRAM_BITS)
        dram = r.get(C.MEMOP_DRAM_BITS)
        r.pos = 64
        y, x, stride = (r.get(C.MEMOP_SIZE_BITS), r.get(C.MEMOP_SIZE_BITS),
                        r.get(C.MEMOP_STRIDE_BITS))
        pads = [r.get(C.MEMOP_PAD_BITS) for _ in range(4)]
        return MemInsn(opcode, MEM_OUT if opcode == STORE else mem, sram, dram, y, x, stride,
                       *pads, deps=deps)
    if opcode in (GEMM, ALU):
        u, a, i, w = cfg.log_uop_depth, cfg.log_acc_depth, cfg.log_inp_depth, cfg.log_wgt_depth
        reset = bool(r.get(1))
        bgn, end = r.get(u), r.get(u + 1)
        it_out, it_in = r.get(C.LOOP_ITER_BITS), r.get(C.LOOP_ITER_BITS)
        r.pos = 64
        d_o, d_i, s_o, s_i = r.get(a), r.get(a), r.get(i), r.get(i)
        if opcode == GEMM:
            return GemmInsn(reset, bgn, end, it_out, it_in, d_o, d_i, s_o, s_i,
                            r.get(w), r.get(w), deps=deps)
        op = r.get(C.ALU_OPCODE_BITS)
        use_imm = bool(r.get(1))
        imm = r.get(C.ALU_IMM_BITS, signed=True)
        return AluInsn(op, use_imm, imm, bgn, end, it_out, it_in, d_o, d_i, s_o, s_i,
                       reset=reset, deps=deps)
    if opcode == FINISH:
        return FinishInsn(deps=deps)
    raise BackendError(f"VTA decoding: unknown opcode {opcode}")


def encode_stream(insns, cfg) -> bytes:
    return b"".join(encode(i, cfg).to_bytes(16, "little") for i in insns)


def decode_stream(data: bytes, cfg) -> list:
    if len(data) % 16:
        raise BackendError("VTA instruction stream length is not a multiple of 16 bytes")
    return [decode(int.from_bytes(data[k:k + 16], "little"), cfg)
            for k in range(0, len(data), 16)]


# ---- micro-ops -----------------------------------------------------------------------------


def encode_uops(uops: np.ndarray, cfg) -> np.ndarray:
    """uops int64 [n, 3] (dst, src, wgt) -> uint32 [n]. ALU uops carry wgt = 0."""
    uops = np.asarray(uops, np.int64).reshape(-1, 3)
    a, i, w = cfg.log_acc_depth, cfg.log_inp_depth, cfg.log_wgt_depth
    for col, bits, name in ((0, a, "dst"), (1, i, "src"), (2, w, "wgt")):
        if len(uops) and (uops[:, col].min() < 0 or uops[:, col].max() >= (1 << bits)):
            raise BackendError(f"VTA uop field {name} out of range for {bits} bits")
    word = uops[:, 0] | (uops[:, 1] << a) | (uops[:, 2] << (a + i))
    return word.astype(np.uint32)


def decode_uops(words: np.ndarray, cfg) -> np.ndarray:
    words = np.asarray(words, np.int64)
    a, i, w = cfg.log_acc_depth, cfg.log_inp_depth, cfg.log_wgt_depth
    return np.stack([words & ((1 << a) - 1), (words >> a) & ((1 << i) - 1),
                     (words >> (a + i)) & ((1 << w) - 1)], axis=1)


def describe(insn) -> str:
    """One readable line per instruction (for ``vta-sim --dump`` and debugging)."""
    d = insn.deps
    dep = "".join(c for c, f in zip("<>^v", (d.pop_prev, d.pop_next, d.push_prev,
                                             d.push_next)) if f)
    name = OPCODE_NAMES[insn.opcode]
    if insn.opcode in (LOAD, STORE):
        return (f"{name:<6} {MEM_NAMES[insn.mem]} sram={insn.sram} dram={insn.dram} "
                f"y={insn.y_size} x={insn.x_size} stride={insn.x_stride} "
                f"pad=({insn.y_pad0},{insn.y_pad1},{insn.x_pad0},{insn.x_pad1}) {dep}")
    if insn.opcode == FINISH:
        return f"FINISH {dep}"
    body = " ".join(f"{f.name}={getattr(insn, f.name)}" for f in fields(insn)
                    if f.name not in ("deps", "opcode"))
    if insn.opcode == ALU:
        body = f"{ALU_NAMES[insn.alu_op]} " + body
    return f"{name:<6} {body} {dep}"
