"""Bit-exact VTA simulator with a cycle model.

Functional semantics follow VTA's hardware description:

- LOAD copies a 2-D strided DRAM window (``y_size`` rows of ``x_size`` elements, rows
  ``x_stride`` elements apart) into consecutive SRAM elements; input/weight loads write
  zeros for the ``y_pad``/``x_pad`` border. Uop and accumulator loads land in the compute
  module and take no padding. STORE copies the 8-bit output buffer back to DRAM.
- GEMM runs ``for o < iter_out: for i < iter_in: for u in uops[bgn:end]`` with indices
  ``uop.x + o·x_factor_out + i·x_factor_in``; each step does
  ``acc[dst] += inp[src] (BATCH×BLOCK_IN) · wgt[wgt]ᵀ (BLOCK_IN×BLOCK_OUT)`` in int32 with
  wrap-around, or zeroes ``acc[dst]`` when ``reset`` is set. The output buffer mirrors
  the low 8 bits of every accumulator written.
- ALU does ``acc[dst] = acc[dst] op (imm or acc[src])`` lane-wise: MIN, MAX, ADD (wrap),
  SHR (arithmetic; the low LOG_ACC_WIDTH+1 bits of the operand are a signed amount and a
  negative amount shifts left).
- Dependency tokens: load pops/pushes its *next* queue (compute), store its *prev*
  queue, compute both. An instruction whose pop finds an empty queue waits.

The three modules run concurrently: the functional run interleaves them in a chosen
order (``schedule``) that is only constrained by the tokens, so a stream with a missing
token gives wrong numbers under some schedule — tests run several. Timing is computed
alongside: each module executes its instructions in order; an instruction starts when
its module is free and every token it pops has been pushed (at the pushing instruction's
end). GEMM/ALU take one uop per cycle (``ALU_II`` for the ALU) plus a pipeline fill;
loads/stores take a latency plus one bus beat per ``bus_bytes`` plus one SRAM write per
padding element. Instruction fetch is not modelled (its DRAM bytes are counted).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from onnxc.errors import BackendError

from . import isa

QUEUES = ("l2g", "g2l", "g2s", "s2g")
# (module, pop flag / push flag) -> queue name
_POP = {(isa.MOD_LOAD, "pop_next"): "g2l", (isa.MOD_COMPUTE, "pop_prev"): "l2g",
        (isa.MOD_COMPUTE, "pop_next"): "s2g", (isa.MOD_STORE, "pop_prev"): "g2s"}
_PUSH = {(isa.MOD_LOAD, "push_next"): "l2g", (isa.MOD_COMPUTE, "push_prev"): "g2l",
         (isa.MOD_COMPUTE, "push_next"): "g2s", (isa.MOD_STORE, "push_prev"): "s2g"}


@dataclass
class SimStats:
    cycles: int = 0
    busy: dict = field(default_factory=lambda: {"load": 0, "compute": 0, "store": 0})
    gemm_cycles: int = 0          # cycles the GEMM core issued uops (incl. resets)
    gemm_macs: int = 0            # MAC lanes issued by non-reset GEMM uops
    alu_cycles: int = 0
    dram_read: dict = field(default_factory=lambda: collections.Counter())
    dram_write: int = 0
    insns: int = 0

    @property
    def dram_bytes(self) -> int:
        return int(sum(self.dram_read.values()) + self.dram_write)

    def as_dict(self) -> dict:
        return {"cycles": int(self.cycles), "busy": {k: int(v) for k, v in self.busy.items()},
                "gemm_cycles": int(self.gemm_cycles), "alu_cycles": int(self.alu_cycles),
                "gemm_macs": int(self.gemm_macs),
                "dram_read": {k: int(v) for k, v in sorted(self.dram_read.items())},
                "dram_write": int(self.dram_write), "dram_bytes": self.dram_bytes,
                "insns": int(self.insns)}


def _wrap32(x: np.ndarray) -> np.ndarray:
    """int64 -> int32 two's-complement wrap-around (kept in int64 storage)."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _low8(x: np.ndarray) -> np.ndarray:
    return (x & 0xFF).astype(np.uint8).view(np.int8)


class Simulator:
    """One VTA device: DRAM image, on-chip buffers, three modules and four token queues.

    ``dram`` is one uint8 image [bytes] or S images [S, bytes] that differ only in
    their activation data: the S devices then run the same instruction stream in
    lock-step (control never depends on data on VTA), sharing the uop and weight
    buffers, which only ever hold data from the sample-invariant regions."""

    def __init__(self, cfg, dram: np.ndarray, poison: bool = False, seed: int = 0):
        self.cfg = cfg
        self.single = dram.ndim == 1
        self.dram = dram[None] if self.single else dram    # uint8 [S, bytes]
        s = self.dram.shape[0]
        b, bi, bo = cfg.batch, cfg.block_in, cfg.block_out
        rng = np.random.default_rng(seed)
        # ``poison`` fills the buffers with garbage so reads of never-written data show.
        def buf(shape, dtype, lo, hi):
            if poison:
                return rng.integers(lo, hi, shape).astype(dtype)
            return np.zeros(shape, dtype)
        self.uop = buf((cfg.uop_depth, 3), np.int64, 0, 1)          # decoded uops
        self.wgt = buf((cfg.wgt_depth, bo, bi), np.int8, -128, 128)
        # per-sample buffers keep the sample axis second: [element, S, ...], so a uop's
        # element index gathers one contiguous block covering every sample
        self.inp = buf((cfg.inp_depth, s, b, bi), np.int8, -128, 128)
        self.acc = buf((cfg.acc_depth, s, b, bo), np.int64, -(1 << 31), 1 << 31)
        self.out = buf((cfg.acc_depth, s, b, bo), np.int8, -128, 128)
        self.stats = SimStats()

    # ---- run -------------------------------------------------------------------------
    def run(self, insns: list, schedule="load-first") -> SimStats:
        """Execute ``insns`` to completion. ``schedule``: "load-first", "compute-first",
        "store-first" (which runnable module goes first) or an int seed (random)."""
        cfg = self.cfg
        queues = [[], [], []]
        for ins in insns:
            queues[isa.module_of(ins)].append(ins)
        ptr = [0, 0, 0]
        free_at = [0, 0, 0]                  # cycle each module becomes free
        tokens = {q: collections.deque() for q in QUEUES}    # push times, FIFO
        rng = np.random.default_rng(schedule) if isinstance(schedule, int) else None
        order = {"load-first": (0, 1, 2), "compute-first": (1, 2, 0),
                 "store-first": (2, 1, 0)}.get(schedule) if rng is None else None
        if rng is None and order is None:
            raise BackendError(f"unknown simulator schedule {schedule!r}")
        self.stats.insns += len(insns)
        self.stats.dram_read["insn"] += 16 * len(insns)
        finished = False

        def runnable(m):
            if ptr[m] >= len(queues[m]):
                return False
            d = queues[m][ptr[m]].deps
            for flag in ("pop_prev", "pop_next"):
                if getattr(d, flag):
                    q = _POP.get((m, flag))
                    if q is None:
                        raise BackendError(f"{isa.MODULE_NAMES[m]} instruction sets {flag}, "
                                           f"which that module does not have")
                    if not tokens[q]:
                        return False
            return True

        while any(ptr[m] < len(queues[m]) for m in range(3)):
            ready = [m for m in range(3) if runnable(m)]
            if not ready:
                where = ", ".join(f"{isa.MODULE_NAMES[m]} at #{ptr[m]} "
                                  f"({isa.describe(queues[m][ptr[m]])})"
                                  for m in range(3) if ptr[m] < len(queues[m]))
                raise BackendError(f"VTA deadlock: every module waits for a token: {where}")
            if rng is not None:
                mods = [int(rng.choice(ready))]
            else:
                mods = [m for m in order if m in ready][:1]
            m = mods[0]
            # Run the chosen module as far as its tokens allow (the hardware's modules
            # are decoupled; this is the most adversarial interleaving for that order).
            while runnable(m):
                ins = queues[m][ptr[m]]
                start = free_at[m]
                for flag in ("pop_prev", "pop_next"):
                    if getattr(ins.deps, flag):
                        start = max(start, tokens[_POP[(m, flag)]].popleft())
                dur = self._execute(ins)
                end = start + dur
                free_at[m] = end
                self.stats.busy[isa.MODULE_NAMES[m]] += dur
                for flag in ("push_prev", "push_next"):
                    if getattr(ins.deps, flag):
                        q = _PUSH.get((m, flag))
                        if q is None:
                            raise BackendError(f"{isa.MODULE_NAMES[m]} instruction sets "
                                               f"{flag}, which that module does not have")
                        tokens[q].append(end)
                ptr[m] += 1
                if ins.opcode == isa.FINISH:
                    finished = True
                if rng is not None:
                    break
        if not finished:
            raise BackendError("VTA program has no FINISH instruction")
        left = {q: len(t) for q, t in tokens.items() if t}
        if left:
            raise BackendError(f"VTA program leaves dependency tokens behind: {left}")
        self.stats.cycles = max(self.stats.cycles, max(free_at))
        return self.stats

    # ---- instructions ------------------------------------------------------------------
    def _execute(self, ins) -> int:
        if ins.opcode == isa.LOAD:
            return self._load(ins)
        if ins.opcode == isa.STORE:
            return self._store(ins)
        if ins.opcode == isa.GEMM:
            return self._gemm(ins)
        if ins.opcode == isa.ALU:
            return self._alu(ins)
        return 1                                            # FINISH

    def _mem_cycles(self, rows: int, row_bytes: int, pad_elems: int) -> int:
        cfg = self.cfg
        if rows == 0 or row_bytes == 0:
            return 1 + pad_elems
        beats = rows * -(-row_bytes // cfg.bus_bytes)
        return cfg.MEM_LATENCY + beats + pad_elems

    def _dram_view(self, elem_bytes: int, dram: int, y: int, x: int, stride: int, what: str):
        """DRAM elements [y, x, elem_bytes] of a 2-D window (uint8)."""
        base = dram * elem_bytes
        last = base + ((y - 1) * stride + x) * elem_bytes if y and x else base
        if dram < 0 or last > self.dram.shape[1]:
            raise BackendError(f"{what} reads/writes DRAM bytes [{base}, {last}) outside "
                               f"the {self.dram.shape[1]}-byte image")
        rows = np.arange(y)[:, None] * stride + np.arange(x)[None, :]      # [y, x]
        idx = base + rows[..., None] * elem_bytes + np.arange(elem_bytes)  # [y, x, bytes]
        return idx

    def _load(self, ins) -> int:
        cfg = self.cfg
        y, x = ins.y_size, ins.x_size
        if ins.mem == isa.MEM_UOP:
            if y > 1 or ins.y_pad0 or ins.y_pad1 or ins.x_pad0 or ins.x_pad1:
                raise BackendError("LOAD uop: uops load as one padding-free row")
            n = x if y else 0
            if ins.sram + n > cfg.uop_depth:
                raise BackendError("LOAD uop writes beyond the uop buffer")
            idx = self._dram_view(4, ins.dram, 1, n, n, "LOAD uop")
            words = np.ascontiguousarray(self.dram[0][idx]).reshape(n, 4).view("<u4") \
                .reshape(n)
            self.uop[ins.sram:ins.sram + n] = isa.decode_uops(words, cfg)
            self.stats.dram_read["uop"] += 4 * n
            return self._mem_cycles(1 if n else 0, 4 * n, 0)
        if ins.mem == isa.MEM_ACC:
            if ins.y_pad0 or ins.y_pad1 or ins.x_pad0 or ins.x_pad1:
                raise BackendError("LOAD acc: accumulator loads take no padding")
            eb = cfg.acc_elem_bytes
            if ins.sram + y * x > cfg.acc_depth:
                raise BackendError("LOAD acc writes beyond the accumulator buffer")
            idx = self._dram_view(eb, ins.dram, y, x, ins.x_stride, "LOAD acc")
            data = np.ascontiguousarray(self.dram[:, idx]).reshape(-1, y * x, eb)
            vals = data.view("<i4").astype(np.int64).reshape(-1, y * x, cfg.batch,
                                                              cfg.block_out)
            vals = vals.transpose(1, 0, 2, 3)                       # [y·x, S, batch, block]
            self.acc[ins.sram:ins.sram + y * x] = vals
            self.out[ins.sram:ins.sram + y * x] = _low8(vals)
            self.stats.dram_read["acc"] += y * x * eb
            return self._mem_cycles(y, x * eb, 0)
        if ins.mem not in (isa.MEM_INP, isa.MEM_WGT):
            raise BackendError(f"LOAD of unknown memory type {ins.mem}")
        inp = ins.mem == isa.MEM_INP
        buf = self.inp if inp else self.wgt
        eb = cfg.inp_elem_bytes if inp else cfg.wgt_elem_bytes
        rows = ins.y_pad0 + y + ins.y_pad1
        cols = ins.x_pad0 + x + ins.x_pad1
        n = rows * cols if (y and x) else 0
        depth = cfg.inp_depth if inp else cfg.wgt_depth
        if ins.sram + n > depth:
            raise BackendError(f"LOAD {isa.MEM_NAMES[ins.mem]} writes elements "
                               f"[{ins.sram}, {ins.sram + n}) beyond the {depth}-element "
                               f"buffer")
        if n:
            idx = self._dram_view(eb, ins.dram, y, x, ins.x_stride,
                                  f"LOAD {isa.MEM_NAMES[ins.mem]}")
            elem = buf.shape[-2:]
            # weights come from the sample-invariant part of DRAM: read sample 0
            src = self.dram[:, idx] if inp else self.dram[:1, idx]
            data = src.view(np.int8).reshape((len(src), y, x) + elem)
            tile = np.zeros((len(src), rows, cols) + elem, np.int8)
            tile[:, ins.y_pad0:ins.y_pad0 + y, ins.x_pad0:ins.x_pad0 + x] = data
            tile = tile.reshape((len(src), n) + elem)
            if inp:
                buf[ins.sram:ins.sram + n] = tile.transpose(1, 0, 2, 3)
            else:
                buf[ins.sram:ins.sram + n] = tile[0]
        self.stats.dram_read[isa.MEM_NAMES[ins.mem]] += y * x * eb
        return self._mem_cycles(y if x else 0, x * eb, n - y * x if n else 0)

    def _store(self, ins) -> int:
        cfg = self.cfg
        if ins.y_pad0 or ins.y_pad1 or ins.x_pad0 or ins.x_pad1:
            raise BackendError("STORE takes no padding")
        y, x = ins.y_size, ins.x_size
        eb = cfg.out_elem_bytes
        n = y * x
        if ins.sram + n > cfg.acc_depth:
            raise BackendError("STORE reads beyond the output buffer")
        if n:
            idx = self._dram_view(eb, ins.dram, y, x, ins.x_stride, "STORE")
            data = self.out[ins.sram:ins.sram + n].transpose(1, 0, 2, 3)  # [S, n, b, block]
            self.dram[:, idx] = data.view(np.uint8).reshape((-1,) + idx.shape)
        self.stats.dram_write += n * eb
        return self._mem_cycles(y if x else 0, x * eb, 0)

    def _indices(self, ins, with_wgt: bool):
        """Flattened (dst, src[, wgt]) indices in execution order [iter_out·iter_in·uops]."""
        uops = self.uop[ins.uop_bgn:ins.uop_end]                        # [u, 3]
        o = np.arange(ins.iter_out)[:, None, None]
        i = np.arange(ins.iter_in)[None, :, None]
        dst = (uops[None, None, :, 0] + o * ins.dst_out + i * ins.dst_in).reshape(-1)
        src = (uops[None, None, :, 1] + o * ins.src_out + i * ins.src_in).reshape(-1)
        wgt = (uops[None, None, :, 2] + o * ins.wgt_out + i * ins.wgt_in).reshape(-1) \
            if with_wgt else None
        return dst, src, wgt

    def _gemm(self, ins) -> int:
        cfg = self.cfg
        if ins.uop_end < ins.uop_bgn or ins.uop_end > cfg.uop_depth:
            raise BackendError("GEMM uop range outside the uop buffer")
        dst, src, wgt = self._indices(ins, True)
        n = len(dst)
        self.stats.gemm_cycles += n
        if n == 0:
            return 1
        if dst.max() >= cfg.acc_depth or (not ins.reset and (
                src.max() >= cfg.inp_depth or wgt.max() >= cfg.wgt_depth)):
            raise BackendError("GEMM index beyond a buffer (compiler bug)")
        if ins.reset:
            self.acc[dst] = 0
            self.out[dst] = 0
            return cfg.GEMM_PIPELINE + n
        self.stats.gemm_macs += n * cfg.macs_per_cycle
        s_, b, bi = self.inp.shape[1], cfg.batch, cfg.block_in
        # Integer addition is associative mod 2^32, so the uops can be summed in any
        # order: group them by weight element and do one matrix product per group
        # ([S·m·batch, block_in] × [block_in, block_out]); int8·int8 products summed
        # over block_in ≤ 64 stay below 2^24, exact in float32.
        order = np.argsort(wgt, kind="stable")
        sw = wgt[order]
        starts = np.flatnonzero(np.r_[True, sw[1:] != sw[:-1]])
        ends = np.r_[starts[1:], n]
        uniq, inv = np.unique(dst, return_inverse=True)
        # float64 holds every partial sum exactly (|sum| < 2^53); wrap once at the end
        part = np.zeros((len(uniq), s_, b, cfg.block_out), np.float64)
        for lo, hi in zip(starts, ends):
            pos = order[lo:hi]
            di = inv[pos]
            x = self.inp[src[pos]].astype(np.float32).reshape(-1, bi)
            prod = (x @ self.wgt[sw[lo]].T.astype(np.float32)).reshape(len(pos), s_, b, -1)
            if np.bincount(di).max() == 1:
                part[di] += prod
            else:                          # one dst several times in the group
                np.add.at(part, di, prod)
        acc = self.acc
        acc[uniq] = _wrap32(acc[uniq] + part.astype(np.int64))
        self.out[uniq] = _low8(acc[uniq])
        return cfg.GEMM_PIPELINE + n

    def _alu(self, ins) -> int:
        cfg = self.cfg
        if ins.uop_end < ins.uop_bgn or ins.uop_end > cfg.uop_depth:
            raise BackendError("ALU uop range outside the uop buffer")
        dst, src, _ = self._indices(ins, False)
        n = len(dst)
        self.stats.alu_cycles += n * cfg.ALU_II
        if n == 0:
            return 1
        if dst.max() >= cfg.acc_depth or (not ins.use_imm and src.max() >= cfg.acc_depth):
            raise BackendError("ALU index beyond the accumulator buffer (compiler bug)")
        # Lane-parallel evaluation is exact only when no element is written twice and
        # no element written is also read as the second operand.
        mark = np.zeros(cfg.acc_depth, bool)
        mark[dst] = True
        independent = int(mark.sum()) == n and (ins.use_imm or not mark[src].any())
        if independent:
            a = self.acc[dst]
            b = np.int64(ins.imm) if ins.use_imm else self.acc[src]
            res = self._alu_op(ins.alu_op, a, b)
            self.acc[dst] = res
            self.out[dst] = _low8(res)
        else:          # chained updates inside one instruction: step in hardware order
            for d, s in zip(dst, src):
                b = np.int64(ins.imm) if ins.use_imm else self.acc[s]
                res = self._alu_op(ins.alu_op, self.acc[d], b)
                self.acc[d] = res
                self.out[d] = _low8(res)
        return cfg.ALU_PIPELINE + n * cfg.ALU_II

    def _alu_op(self, op, a, b):
        if op == isa.ALU_MIN:
            return np.minimum(a, b)
        if op == isa.ALU_MAX:
            return np.maximum(a, b)
        if op == isa.ALU_ADD:
            return _wrap32(a + b)
        if op == isa.ALU_SHR:
            bits = self.cfg.LOG_ACC_WIDTH + 1
            amt = np.asarray(b, np.int64) & ((1 << bits) - 1)
            amt = np.where(amt >= 1 << (bits - 1), amt - (1 << bits), amt)
            amt = np.broadcast_to(amt, np.shape(a))
            right = a >> np.clip(amt, 0, 63)
            left = _wrap32(a << np.clip(-amt, 0, 63))
            return np.where(amt >= 0, right, left)
        raise BackendError(f"unknown ALU opcode {op}")
