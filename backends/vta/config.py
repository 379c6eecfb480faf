"""VTA hardware configuration: the published parameters and everything derived from them.

The parameter names are those of VTA's ``vta_config.json`` (log2 of widths, block sizes
and on-chip buffer sizes in bytes). Derived figures (buffer depths in elements, field
widths of the 128-bit instructions and 32-bit micro-ops) follow the VTA hardware spec:
a buffer "element" is what one GEMM/ALU step touches — an input element is
BATCH×BLOCK_IN int8, a weight element BLOCK_OUT×BLOCK_IN int8, an accumulator element
BATCH×BLOCK_OUT int32 (the output buffer mirrors the accumulator at 8 bits).

The timing parameters (bus width, clock, memory latency, pipeline overheads) are not
part of VTA's config; they parameterise onnxc's cycle model and are stated in every
report so a figure is never quoted without its assumptions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace

from onnxc.errors import UsageError

# Fixed by the ISA (hw_spec.h): instruction and uop widths, field widths of memory ops.
INSN_BITS = 128
UOP_BITS = 32
OPCODE_BITS = 3
ALU_OPCODE_BITS = 2
MEMOP_ID_BITS = 2
MEMOP_SRAM_BITS = 16
MEMOP_DRAM_BITS = 32
MEMOP_SIZE_BITS = 16
MEMOP_STRIDE_BITS = 16
MEMOP_PAD_BITS = 4
ALU_IMM_BITS = 16
LOOP_ITER_BITS = 14


@dataclass(frozen=True)
class VtaConfig:
    LOG_INP_WIDTH: int = 3
    LOG_WGT_WIDTH: int = 3
    LOG_ACC_WIDTH: int = 5
    LOG_BATCH: int = 0
    LOG_BLOCK: int = 4
    LOG_UOP_BUFF_SIZE: int = 15
    LOG_INP_BUFF_SIZE: int = 15
    LOG_WGT_BUFF_SIZE: int = 18
    LOG_ACC_BUFF_SIZE: int = 17
    # --- cycle model (onnxc's assumptions, not VTA parameters) -----------------------
    LOG_BUS_WIDTH: int = 6          # AXI data bus to DRAM, bits (64 on Pynq-class boards)
    CLOCK_MHZ: float = 100.0        # VTA's Pynq reference design clock
    MEM_LATENCY: int = 32           # cycles from a LOAD/STORE issue to the first beat
    GEMM_PIPELINE: int = 4          # fill/drain cycles of the GEMM pipeline per instruction
    ALU_PIPELINE: int = 4
    ALU_II: int = 1                 # cycles per ALU uop (1: fully pipelined vector ALU)
    ROUNDING: str = "even"          # requantisation rounding: "even" (= ONNX) or "up"

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return 1 << self.LOG_BATCH

    @property
    def block(self) -> int:
        return 1 << self.LOG_BLOCK

    @property
    def block_in(self) -> int:
        return self.block

    @property
    def block_out(self) -> int:
        return self.block

    @property
    def inp_bits(self) -> int:
        return 1 << self.LOG_INP_WIDTH

    @property
    def wgt_bits(self) -> int:
        return 1 << self.LOG_WGT_WIDTH

    @property
    def acc_bits(self) -> int:
        return 1 << self.LOG_ACC_WIDTH

    @property
    def inp_elem_bytes(self) -> int:
        return self.batch * self.block_in * self.inp_bits // 8

    @property
    def wgt_elem_bytes(self) -> int:
        return self.block_out * self.block_in * self.wgt_bits // 8

    @property
    def acc_elem_bytes(self) -> int:
        return self.batch * self.block_out * self.acc_bits // 8

    @property
    def out_elem_bytes(self) -> int:
        return self.batch * self.block_out      # int8 outputs

    @property
    def uop_elem_bytes(self) -> int:
        return UOP_BITS // 8

    @property
    def log_uop_depth(self) -> int:
        return self.LOG_UOP_BUFF_SIZE - 2          # 4-byte uops

    @property
    def log_inp_depth(self) -> int:
        return self.LOG_INP_BUFF_SIZE - self.LOG_BATCH - self.LOG_BLOCK - self.LOG_INP_WIDTH + 3

    @property
    def log_wgt_depth(self) -> int:
        return self.LOG_WGT_BUFF_SIZE - 2 * self.LOG_BLOCK - self.LOG_WGT_WIDTH + 3

    @property
    def log_acc_depth(self) -> int:
        return self.LOG_ACC_BUFF_SIZE - self.LOG_BATCH - self.LOG_BLOCK - self.LOG_ACC_WIDTH + 3

    @property
    def uop_depth(self) -> int:
        return 1 << self.log_uop_depth

    @property
    def inp_depth(self) -> int:
        return 1 << self.log_inp_depth

    @property
    def wgt_depth(self) -> int:
        return 1 << self.log_wgt_depth

    @property
    def acc_depth(self) -> int:
        return 1 << self.log_acc_depth

    @property
    def bus_bytes(self) -> int:
        return (1 << self.LOG_BUS_WIDTH) // 8

    @property
    def macs_per_cycle(self) -> int:
        return self.batch * self.block_in * self.block_out

    # ---- (de)serialisation --------------------------------------------------------------
    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "VTA config") -> "VtaConfig":
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        # vta_config.json files carry TARGET/HW_VER etc.; those do not change the ISA.
        ignored = {"TARGET", "HW_VER", "LOG_BLOCK_IN", "LOG_BLOCK_OUT", "LOG_OUT_WIDTH",
                   "LOG_OUT_BUFF_SIZE"}
        unknown = [k for k in unknown if k not in ignored]
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if "LOG_BLOCK_IN" in data and "LOG_BLOCK_OUT" in data \
                and data["LOG_BLOCK_IN"] != data["LOG_BLOCK_OUT"]:
            raise UsageError(f"{where}: LOG_BLOCK_IN != LOG_BLOCK_OUT is not supported")
        kwargs = {}
        for k, v in data.items():
            if k not in known:
                continue
            if k == "ROUNDING":
                kwargs[k] = str(v)
            elif k == "CLOCK_MHZ":
                kwargs[k] = _number(v, k, where, float)
            else:
                kwargs[k] = _number(v, k, where, int)
        cfg = cls(**kwargs)
        cfg.validate(where)
        return cfg

    @classmethod
    def load(cls, path: str) -> "VtaConfig":
        if not os.path.isfile(path):
            raise UsageError(f"--vta-config: file not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--vta-config {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--vta-config {path}: expected a JSON object")
        return cls.from_dict(data, where=f"--vta-config {path}")

    def with_overrides(self, **kw) -> "VtaConfig":
        cfg = replace(self, **{k: v for k, v in kw.items() if v is not None})
        cfg.validate()
        return cfg

    def validate(self, where: str = "VTA config") -> None:
        if (self.LOG_INP_WIDTH, self.LOG_WGT_WIDTH, self.LOG_ACC_WIDTH) != (3, 3, 5):
            raise UsageError(f"{where}: onnxc lowers int8 inputs/weights with int32 "
                             f"accumulators only (LOG_INP_WIDTH 3, LOG_WGT_WIDTH 3, "
                             f"LOG_ACC_WIDTH 5)")
        if not 0 <= self.LOG_BATCH <= 4 or not 1 <= self.LOG_BLOCK <= 6:
            raise UsageError(f"{where}: LOG_BATCH must be 0..4 and LOG_BLOCK 1..6")
        for name in ("LOG_UOP_BUFF_SIZE", "LOG_INP_BUFF_SIZE", "LOG_WGT_BUFF_SIZE",
                     "LOG_ACC_BUFF_SIZE"):
            if not 4 <= getattr(self, name) <= 24:
                raise UsageError(f"{where}: {name} must be between 4 and 24 (log2 bytes)")
        for name, depth in (("uop", self.log_uop_depth), ("input", self.log_inp_depth),
                            ("weight", self.log_wgt_depth),
                            ("accumulator", self.log_acc_depth)):
            if depth < 0:
                raise UsageError(f"{where}: the {name} buffer is smaller than one element")
        if self.log_acc_depth + self.log_inp_depth + self.log_wgt_depth > UOP_BITS:
            raise UsageError(f"{where}: buffer depths need "
                             f"{self.log_acc_depth + self.log_inp_depth + self.log_wgt_depth}"
                             f" uop index bits; a VTA uop has {UOP_BITS}")
        gemm_w0 = OPCODE_BITS + 5 + self.log_uop_depth + (self.log_uop_depth + 1) \
            + 2 * LOOP_ITER_BITS
        gemm_w1 = 2 * self.log_acc_depth + 2 * self.log_inp_depth + 2 * self.log_wgt_depth
        alu_w1 = 2 * self.log_acc_depth + 2 * self.log_inp_depth + ALU_OPCODE_BITS + 1 \
            + ALU_IMM_BITS
        if gemm_w0 > 64 or gemm_w1 > 64 or alu_w1 > 64:
            raise UsageError(f"{where}: buffer depths do not fit VTA's 128-bit GEMM/ALU "
                             f"instruction fields")
        if self.log_inp_depth > MEMOP_SRAM_BITS or self.log_acc_depth > MEMOP_SRAM_BITS:
            raise UsageError(f"{where}: buffers deeper than the 16-bit sram_base field")
        if not 3 <= self.LOG_BUS_WIDTH <= 10:
            raise UsageError(f"{where}: LOG_BUS_WIDTH must be 3..10 (8..1024-bit bus)")
        if not self.CLOCK_MHZ > 0:
            raise UsageError(f"{where}: CLOCK_MHZ must be positive")
        if self.ROUNDING not in ("even", "up"):
            raise UsageError(f"{where}: ROUNDING must be 'even' or 'up'")
        if self.MEM_LATENCY < 0 or self.GEMM_PIPELINE < 0 or self.ALU_PIPELINE < 0 \
                or self.ALU_II < 1:
            raise UsageError(f"{where}: negative timing parameter")

    def describe(self) -> str:
        return (f"BATCH {self.batch}, BLOCK {self.block} ({self.macs_per_cycle} MAC/cycle), "
                f"buffers uop {self.uop_depth} / inp {self.inp_depth} / wgt {self.wgt_depth}"
                f" / acc {self.acc_depth} elements, bus {1 << self.LOG_BUS_WIDTH} bit, "
                f"{self.CLOCK_MHZ:g} MHz")


def _number(v, key, where, kind):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{where}: {key} must be a number, got {v!r}")
    if kind is int and int(v) != v:
        raise UsageError(f"{where}: {key} must be an integer, got {v!r}")
    return kind(v)


DEFAULT = VtaConfig()
