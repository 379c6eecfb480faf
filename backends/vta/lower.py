"""Lower one quantized conv/dense layer to a VTA program: tiles, uops, instruction stream.

Data layout in DRAM (VTA's blocked layout; B = BATCH, BI/BO = BLOCK_IN/BLOCK_OUT):
activations ``[N/B, C/BI, H, W, B, BI]`` int8, weights ``[O/BO, C/BI, kh, kw, BO, BI]``
int8, per-channel requantisation constants ``[O/BO, P, B, BO]`` int32 (loaded into
the accumulator buffer), output ``[N/B, O/BO, OH, OW, B, BO]`` int8. Channel counts are
padded with zeros to the block size; the padded MACs are reported as waste.

Conv as GEMM: an output tile ``[ob, oy, ox]`` (accumulator elements) is computed as
``acc[ob, y, x] += Σ_{ib, ky, kx} inp[ib, y·sh+ky, x·sw+kx] · wgt[ob, ib, ky, kx]ᵀ``.
The uops enumerate (x, ib, ky, kx); GEMM's inner loop walks y (dst += OW_t,
src += sh·cols), its outer loop ob (dst += OH_t·OW_t, wgt += one ob row). Padding is
done by the input LOAD (zero-filled borders), so no host-side padding is needed.

Requantisation on the ALU (lanes carry per-channel constants from the param rows):

    round "up"  : a += bias + h;  a >>= n;  a = max(a, lo);  a = min(a, 127)
    round "even": a += bias + h;  t = a + h;  t <<= 31-n;  t >>= 31   (t = parity(a) - 1)
                  [t = max(t, mask) where n <= 0];  a += t;  a >>= n;  clip

with h = 2^(n-1): "even" reproduces QuantizeLinear's round-half-to-even exactly (ties
move down by one exactly when the truncated result would be odd), "up" is VTA's
classic add-half-and-shift. lo is 0 after a ReLU, else -128. A layer with a second
requantisation stage (Q → DQ → Relu → Q(s_r)) repeats the sequence without the bias.

Pipelining: input (and weight) tiles are double-buffered when both copies fit; the load
module runs ahead by up to two tiles, synchronised by load→compute tokens (tile ready)
and compute→load tokens (buffer slot free). Accumulator tiles are double-buffered the
same way against the store module (compute→store: tile requantised; store→compute:
output buffer slot stored). Leftover tokens are drained by size-0 LOADs and GEMMs at the
end so every queue is empty when the program finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxc.errors import UnsupportedError

from . import isa
from .isa import AluInsn, Deps, GemmInsn, MemInsn
from .qlayer import QLayer

ALIGN = 4096
GROUP = 64          # samples simulated together (memory: ~0.3 MB of buffers per sample)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Tiling:
    ob: int                  # output channel blocks per tile
    ib: int                  # input channel blocks per sub-tile
    oh: int                  # output rows per tile
    ow: int                  # output columns per tile
    inp_slots: int           # 2 = double-buffered input/weight tiles
    acc_slots: int           # 2 = double-buffered accumulator tiles
    resident_weights: bool   # all weights loaded once

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Program:
    """Everything the device needs for one layer, plus how to (un)pack host tensors."""

    layer: QLayer
    cfg: object
    insns: list
    dram: np.ndarray                         # uint8 initial DRAM image
    regions: dict                            # name -> (byte offset, bytes)
    tiling: Tiling
    uops: np.ndarray = None                  # uint32 uop stream (in DRAM "uop")
    info: dict = field(default_factory=dict)

    # ---- host side: blocked layout ----------------------------------------------------
    def pack_input(self, x: np.ndarray) -> np.ndarray:
        """int8 [N, C, H, W] -> bytes of [N/B, C/BI, H, W, B, BI]."""
        cfg = self.cfg
        n, c, h, w = self.layer.in_shape
        b, bi = cfg.batch, cfg.block_in
        nb, cb = _ceil(n, b), _ceil(c, bi)
        xp = np.zeros((nb * b, cb * bi, h, w), np.int8)
        xp[:n, :c] = x
        blocked = xp.reshape(nb, b, cb, bi, h, w).transpose(0, 2, 4, 5, 1, 3)
        return np.ascontiguousarray(blocked).view(np.uint8).reshape(-1)

    def unpack_output(self, data: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        n, o, oh, ow = self.layer.out_shape
        b, bo = cfg.batch, cfg.block_out
        nb, ob = _ceil(n, b), _ceil(o, bo)
        blocked = data.view(np.int8).reshape(nb, ob, oh, ow, b, bo)
        full = blocked.transpose(0, 4, 1, 5, 2, 3).reshape(nb * b, ob * bo, oh, ow)
        return np.ascontiguousarray(full[:n, :o])

    def run(self, x: np.ndarray, schedule="load-first", poison: bool = False):
        """Simulate on int8 input ``x`` (any batch: the program, compiled for batch
        ``in_shape[0]``, runs once per chunk); returns (int8 output, SimStats of the last
        run — timing does not depend on the data)."""
        x = np.asarray(x, np.int8)
        per = self.layer.in_shape[0]
        n = len(x)
        x = x.reshape((n,) + tuple(self.layer.in_shape[1:]))
        if n % per:                 # a partial last batch block: zero samples fill it
            x = np.concatenate([x, np.zeros((per - n % per,) + x.shape[1:], np.int8)])
        ys, stats = [], None
        # Up to GROUP program runs (each BATCH samples) are simulated in lock-step.
        step = per * max(1, GROUP // per)
        for k in range(0, len(x), step):
            y, stats = self._run_group(x[k:k + step], schedule, poison)
            ys.append(y)
        y = np.concatenate(ys)[:n]
        if self.layer.kind == "dense":           # [N, O, 1, 1] -> [N, O] like the Gemm
            y = y.reshape(y.shape[:2])
        return y, stats

    def _run_group(self, x, schedule, poison):
        """One lock-step simulation of len(x)/BATCH copies of the program."""
        from .sim import Simulator

        per = self.layer.in_shape[0]
        runs = len(x) // per
        dram = np.repeat(self.dram[None], runs, axis=0)                 # [runs, bytes]
        off, size = self.regions["input"]
        for r in range(runs):
            dram[r, off:off + size] = self.pack_input(x[r * per:(r + 1) * per])
        stats = Simulator(self.cfg, dram, poison=poison).run(self.insns, schedule=schedule)
        off, size = self.regions["output"]
        y = np.concatenate([self.unpack_output(dram[r, off:off + size]) for r in range(runs)])
        return y, stats


# ---- tiling ---------------------------------------------------------------------------------


def _param_rows(layer: QLayer, rounding: str) -> list:
    """Per-channel int32 constant rows [name, values[O]] the ALU program reads; one
    group per requantisation stage k (stage 0 also adds the bias)."""
    rows = []
    for k, (n, _) in enumerate(layer.stages):
        n = np.asarray(n, np.int64)
        half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
        rows.append((f"add{k}", (layer.bias.astype(np.int64) if k == 0 else 0) + half))
        if rounding == "even":
            rows += [(f"half{k}", half), (f"shl{k}", np.where(n > 0, n - 31, 0))]
            if np.any(n <= 0):
                rows.append((f"mask{k}", np.where(n > 0, -1, 0)))
        rows.append((f"shr{k}", n))
    return rows


def choose_tiling(layer: QLayer, cfg, n_params: int, temp: bool) -> Tiling:
    """Largest tiles that fit the buffers, preferring double buffering, all input
    channels per tile (no partial sums across loads), all output channels, full rows."""
    n, c, h, w = layer.in_shape
    _, o, oh_full, ow_full = layer.out_shape
    kh, kw = layer.kernel
    sh, sw = layer.stride
    cb, ob_full = _ceil(c, cfg.block_in), _ceil(o, cfg.block_out)
    # ALU uops address accumulator operands with input-width index fields.
    acc_cap = min(cfg.acc_depth, 1 << cfg.log_inp_depth)
    resident = ob_full * cb * kh * kw <= cfg.wgt_depth
    iter_max = (1 << 14) - 1

    def fits(ob, ib, oh, ow, si, sa, uop_budget):
        rows, cols = (oh - 1) * sh + kh, (ow - 1) * sw + kw
        if ib * rows * cols * si > cfg.inp_depth:
            return False
        if not resident and ob * ib * kh * kw * si > cfg.wgt_depth:
            return False
        tile = ob * oh * ow
        if ob_full * n_params + tile * (sa + (1 if temp else 0)) > acc_cap or tile > iter_max:
            return False
        return ow * ib * kh * kw <= uop_budget

    # First try tiles whose GEMM kernel variants (2 input slots × 2 acc slots × edge
    # shapes) all stay resident in the uop buffer; else accept reloading kernels.
    for uop_budget in (cfg.uop_depth // 8 - 8, cfg.uop_depth - 16):
        for si, sa in ((2, 2), (1, 2), (2, 1), (1, 1)):
            for ib in range(cb, 0, -1):
                for ob in range(ob_full, 0, -1):
                    for ow in range(ow_full, 0, -1):
                        if not fits(ob, ib, 1, ow, si, sa, uop_budget):
                            continue
                        oh = 1
                        while oh < oh_full and fits(ob, ib, oh + 1, ow, si, sa, uop_budget):
                            oh += 1
                        return Tiling(ob, ib, oh, ow, si, sa, resident)
    raise UnsupportedError(
        f"layer {layer.name}: the VTA buffers cannot hold one tile "
        f"(needs {kh * kw} input elements, {ob_full * n_params + 2} accumulator elements "
        f"and {kh * kw + 64} uops; the configuration has inp {cfg.inp_depth}, "
        f"acc {acc_cap}, uop {cfg.uop_depth})")


# ---- the program builder ----------------------------------------------------------------------


class _Kernels:
    """Uop kernels by key; each is laid out once in the uop stream."""

    def __init__(self):
        self.keys: dict = {}
        self.chunks: list = []
        self.size = 0

    def get(self, key, make) -> tuple:
        if key not in self.keys:
            uops = np.asarray(make(), np.int64).reshape(-1, 3)
            self.keys[key] = (self.size, len(uops))
            self.chunks.append(uops)
            self.size += len(uops)
        return self.keys[key]


def lower(layer: QLayer, cfg) -> Program:
    n, c, h, w = layer.in_shape
    _, o, oh_full, ow_full = layer.out_shape
    kh, kw = layer.kernel
    khw = kh * kw
    sh, sw = layer.stride
    pt, pl, pb, pr = layer.pads
    if max(layer.pads) > 15:
        raise UnsupportedError(f"layer {layer.name}: padding {max(layer.pads)} exceeds the "
                               f"4-bit pad fields of VTA loads")
    if any(np.any(np.abs(n) > 31) for n, _ in layer.stages):
        raise UnsupportedError(f"layer {layer.name}: requantisation shift outside "
                               f"[-31, 31] (scales too far apart)")
    b, bi, bo = cfg.batch, cfg.block_in, cfg.block_out
    nb, cb, ob_full = _ceil(n, b), _ceil(c, bi), _ceil(o, bo)
    rounding = cfg.ROUNDING
    rows_def = _param_rows(layer, rounding)
    prow = {name: i for i, (name, _) in enumerate(rows_def)}
    P = len(rows_def)
    temp = rounding == "even"
    t = choose_tiling(layer, cfg, P, temp)

    # ---- DRAM image ------------------------------------------------------------------
    wpad = np.zeros((ob_full * bo, cb * bi, kh, kw), np.int8)
    wpad[:o, :c] = layer.weight
    # [OB, BO, CB, BI, kh, kw] -> [OB, CB, kh, kw, BO, BI]
    wblk = np.ascontiguousarray(
        wpad.reshape(ob_full, bo, cb, bi, kh, kw).transpose(0, 2, 4, 5, 1, 3))
    params = np.zeros((ob_full, P, b, bo), np.int32)
    for i, (_, vals) in enumerate(rows_def):
        lanes = np.zeros(ob_full * bo, np.int64)
        lanes[:o] = vals
        params[:, i] = lanes.reshape(ob_full, 1, bo).astype(np.int32)   # same for each batch row
    in_bytes = nb * cb * h * w * cfg.inp_elem_bytes
    out_bytes = nb * ob_full * oh_full * ow_full * cfg.out_elem_bytes

    kernels = _Kernels()
    insns: list = []
    uop_refs: list = []                # (insn, key) patched once kernels are laid out

    def kernel(insn, key, make):
        kernels.get(key, make)
        uop_refs.append((insn, key))
        return insn

    # Region offsets are fixed after the uop stream size is known; instructions refer to
    # them through these element bases, filled in below.
    regions = {}
    layout = [("weights", wblk.nbytes), ("params", params.nbytes), ("input", in_bytes),
              ("output", out_bytes)]
    off = 0
    for name, size in layout:
        regions[name] = (off, size)
        off = _ceil(off + size, ALIGN) * ALIGN
    uop_off = off
    w_base = regions["weights"][0] // cfg.wgt_elem_bytes
    p_base = regions["params"][0] // cfg.acc_elem_bytes
    i_base = regions["input"][0] // cfg.inp_elem_bytes
    o_base = regions["output"][0] // cfg.out_elem_bytes

    # ---- on-chip allocation -------------------------------------------------------------
    tile_cap = t.ob * t.oh * t.ow
    acc_params = 0
    acc_temp = ob_full * P
    acc_slot = [acc_temp + (tile_cap if temp else 0) + s * tile_cap for s in range(t.acc_slots)]
    rows_nom, cols_nom = (t.oh - 1) * sh + kh, (t.ow - 1) * sw + kw
    inp_cap = t.ib * rows_nom * cols_nom
    inp_slot = [s * inp_cap for s in range(t.inp_slots)]
    wgt_cap = t.ob * t.ib * khw
    wgt_slot = [0] if t.resident_weights else [s * wgt_cap for s in range(t.inp_slots)]

    # compute-module preamble: the per-channel constants into the accumulator buffer
    insns.append(MemInsn(isa.LOAD, isa.MEM_ACC, acc_params, p_base, 1, ob_full * P,
                         ob_full * P))

    k = 0                              # sub-tile counter (load <-> compute handshake)
    tile_no = 0                        # output tile counter (compute <-> store handshake)
    gemm_uops = 0
    for nbi in range(nb):
        for og in range(0, ob_full, t.ob):
            ob_te = min(t.ob, ob_full - og)
            for oy in range(0, oh_full, t.oh):
                oh_te = min(t.oh, oh_full - oy)
                for ox in range(0, ow_full, t.ow):
                    ow_te = min(t.ow, ow_full - ox)
                    a = acc_slot[tile_no % t.acc_slots]
                    ohw = oh_te * ow_te
                    n_ent = ob_te * ohw
                    # zero the accumulator tile; wait for the store of the tile that last
                    # used this slot
                    reset = kernel(GemmInsn(True, 0, 0, 1, n_ent, 0, 1, 0, 0),
                                   ("reset", a), lambda a=a: [[a, 0, 0]])
                    reset.deps.pop_next = tile_no >= t.acc_slots
                    insns.append(reset)
                    for ig in range(0, cb, t.ib):
                        ib_te = min(t.ib, cb - ig)
                        si = k % t.inp_slots
                        ibase = inp_slot[si]
                        # ---- load module: input (and weights) of this sub-tile
                        loads = []
                        if t.resident_weights and k == 0:
                            nw = ob_full * cb * khw
                            loads.append(MemInsn(isa.LOAD, isa.MEM_WGT, 0, w_base, 1, nw, nw))
                        elif not t.resident_weights:
                            loads.append(MemInsn(
                                isa.LOAD, isa.MEM_WGT, wgt_slot[si],
                                w_base + (og * cb + ig) * khw, ob_te, ib_te * khw, cb * khw))
                        ry0 = oy * sh - pt
                        ry1 = (oy + oh_te - 1) * sh - pt + kh
                        rx0 = ox * sw - pl
                        rx1 = (ox + ow_te - 1) * sw - pl + kw
                        iy0, iy1 = max(ry0, 0), min(ry1, h)
                        ix0, ix1 = max(rx0, 0), min(rx1, w)
                        if iy1 <= iy0 or ix1 <= ix0:
                            raise UnsupportedError(f"layer {layer.name}: a tile lies "
                                                   f"entirely in the padding")
                        rows_e, cols_e = ry1 - ry0, rx1 - rx0
                        for ib in range(ib_te):
                            loads.append(MemInsn(
                                isa.LOAD, isa.MEM_INP, ibase + ib * rows_e * cols_e,
                                i_base + ((nbi * cb + ig + ib) * h + iy0) * w + ix0,
                                iy1 - iy0, ix1 - ix0, w,
                                iy0 - ry0, ry1 - iy1, ix0 - rx0, rx1 - ix1))
                        loads[0].deps.pop_next = k >= t.inp_slots
                        loads[-1].deps.push_next = True
                        insns.extend(loads)
                        # ---- compute: the GEMM over this sub-tile
                        if t.resident_weights:
                            wkey = ("res", og, ig)
                            w0, w_out = (og * cb + ig) * khw, cb * khw
                        else:
                            wkey = ("slot", wgt_slot[si])
                            w0, w_out = wgt_slot[si], ib_te * khw

                        def make_gemm(a=a, ibase=ibase, w0=w0, ow_te=ow_te, ib_te=ib_te,
                                      rows_e=rows_e, cols_e=cols_e):
                            x, ib, ky, kx = np.meshgrid(np.arange(ow_te), np.arange(ib_te),
                                                        np.arange(kh), np.arange(kw),
                                                        indexing="ij")
                            dst = a + x
                            src = ibase + ib * rows_e * cols_e + ky * cols_e + x * sw + kx
                            wgt = w0 + (ib * kh + ky) * kw + kx
                            return np.stack([dst.ravel(), src.ravel(), wgt.ravel()], 1)

                        g = kernel(GemmInsn(False, 0, 0, ob_te, oh_te,
                                            ohw if ob_te > 1 else 0,
                                            ow_te if oh_te > 1 else 0,
                                            0, sh * cols_e if oh_te > 1 else 0,
                                            w_out if ob_te > 1 else 0, 0),
                                   ("gemm", a, ibase, wkey, ow_te, ib_te, rows_e, cols_e),
                                   make_gemm)
                        g.deps.pop_prev = True
                        g.deps.push_prev = True        # input/weight slot free again
                        gemm_uops += ob_te * oh_te * ow_te * ib_te * khw
                        insns.append(g)
                        k += 1
                    # ---- compute: requantise the tile on the ALU
                    alus = _requant_program(kernel, a, acc_temp, acc_params, og,
                                            ob_te, ohw, n_ent, P, prow, layer.stages, temp)
                    alus[-1].deps.push_next = True
                    insns.extend(alus)
                    # ---- store module: one 2-D store per output channel block
                    stores = []
                    for obi in range(ob_te):
                        stores.append(MemInsn(
                            isa.STORE, isa.MEM_OUT, a + obi * ohw,
                            o_base + ((nbi * ob_full + og + obi) * oh_full + oy) * ow_full + ox,
                            oh_te, ow_te, ow_full))
                    stores[0].deps.pop_prev = True
                    stores[-1].deps.push_prev = True
                    insns.extend(stores)
                    tile_no += 1
    # ---- drain the tokens nobody waited for, then finish
    for _ in range(min(k, t.inp_slots)):
        insns.append(MemInsn(isa.LOAD, isa.MEM_INP, 0, 0, 0, 0, 0, deps=Deps(pop_next=True)))
    for _ in range(min(tile_no, t.acc_slots)):
        insns.append(GemmInsn(False, 0, 0, 0, 0, 0, 0, 0, 0, deps=Deps(pop_next=True)))
    insns.append(isa.FinishInsn())

    # ---- lay out the uops: all kernels resident if they fit, else reload on use ----------
    uops = np.concatenate(kernels.chunks) if kernels.chunks else np.zeros((0, 3), np.int64)
    words = isa.encode_uops(uops, cfg)
    regions["uop"] = (uop_off, words.nbytes)
    u_base = uop_off // 4
    if kernels.size <= cfg.uop_depth:
        for ins, key in uop_refs:
            start, length = kernels.keys[key]
            ins.uop_bgn, ins.uop_end = start, start + length
        # the uop load is a compute-module instruction: it runs before the first GEMM
        insns.insert(0, MemInsn(isa.LOAD, isa.MEM_UOP, 0, u_base, 1, kernels.size,
                                kernels.size))
        uop_mode = "resident"
    else:
        with_loads = []
        refs = {id(ins): key for ins, key in uop_refs}
        current = None
        for ins in insns:
            key = refs.get(id(ins))
            if key is not None:
                start, length = kernels.keys[key]
                if key != current:
                    with_loads.append(MemInsn(isa.LOAD, isa.MEM_UOP, 0, u_base + start, 1,
                                              length, length))
                    current = key
                ins.uop_bgn, ins.uop_end = 0, length
            with_loads.append(ins)
        insns = with_loads
        uop_mode = "reloaded per kernel"

    dram = np.zeros(uop_off + words.nbytes, np.uint8)
    for name, data in (("weights", wblk), ("params", params)):
        o0, size = regions[name]
        dram[o0:o0 + size] = data.view(np.uint8).reshape(-1)
    dram[uop_off:uop_off + words.nbytes] = words.view(np.uint8)

    padded_macs = nb * b * ob_full * bo * oh_full * ow_full * cb * bi * khw
    info = {"tiling": t.as_dict(), "uops": int(kernels.size), "uop_mode": uop_mode,
            "insns": len(insns), "macs": layer.macs, "padded_macs": int(padded_macs),
            "gemm_uops": int(gemm_uops), "param_rows": [r[0] for r in rows_def],
            "channel_padding": {"in": cb * bi - c, "out": ob_full * bo - o},
            "rounding": rounding}
    prog = Program(layer, cfg, insns, dram, regions, t, words, info)
    return prog


def _requant_program(kernel, a, acc_temp, acc_params, og, ob_te, ohw, n_ent, P,
                     prow, stages, temp) -> list:
    """ALU instructions that turn the int32 tile at ``a`` into clipped int8 outputs."""

    def vec(dst, name, op):
        p = acc_params + og * P + prow[name]
        return kernel(AluInsn(op, False, 0, 0, 0, ob_te, ohw, ohw if ob_te > 1 else 0, 1,
                              P if ob_te > 1 else 0, 0),
                      ("alu-par", dst, og, name), lambda: [[dst, p, 0]])

    def imm(dst, op, value):
        return kernel(AluInsn(op, True, value, 0, 0, 1, n_ent, 0, 1, 0, 0),
                      ("alu-imm", dst), lambda: [[dst, 0, 0]])

    def reg(dst, src, op):
        return kernel(AluInsn(op, False, 0, 0, 0, 1, n_ent, 0, 1, 0, 1),
                      ("alu-reg", dst, src), lambda: [[dst, src, 0]])

    out = []
    for k, (_, relu) in enumerate(stages):
        out.append(vec(a, f"add{k}", isa.ALU_ADD))          # (+ bias) + h
        if temp:
            tmp = acc_temp
            out.append(kernel(GemmInsn(True, 0, 0, 1, n_ent, 0, 1, 0, 0), ("reset", tmp),
                              lambda: [[tmp, 0, 0]]))
            out.append(reg(tmp, a, isa.ALU_ADD))             # t = a + h
            out.append(vec(tmp, f"half{k}", isa.ALU_ADD))    # bit n of t = !parity
            out.append(vec(tmp, f"shl{k}", isa.ALU_SHR))     # negative amount: << 31-n
            out.append(imm(tmp, isa.ALU_SHR, 31))            # t = parity - 1 (0 or -1)
            if f"mask{k}" in prow:
                out.append(vec(tmp, f"mask{k}", isa.ALU_MAX))  # no rounding where n <= 0
            out.append(reg(a, tmp, isa.ALU_ADD))
        out.append(vec(a, f"shr{k}", isa.ALU_SHR))
        out.append(imm(a, isa.ALU_MAX, 0 if relu else -128))
        out.append(imm(a, isa.ALU_MIN, 127))
    return out
