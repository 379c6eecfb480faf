"""Target ``vta``: the Versatile Tensor Accelerator (TVM's FPGA deep-learning accelerator).

After ``int8 --int8-pow2-scales``, every conv/dense layer in the QDQ pattern (with its bias,
ReLU, requantisation and clip) is lowered to a VTA program — tiles that fit the on-chip
buffers, uop kernels, a load/compute/store instruction stream with dependency tokens and
double buffering — and everything else runs on the host. The simulator in ``sim.py``
runs those programs bit-exactly and reports cycles; see docs/vta.md.

Artifact (``out/``): ``model.onnx`` (the quantized model), ``vta/host.onnx`` (host part,
VTA layers as ``onnxc.vta::VtaLayer`` nodes), ``vta/program.json`` (configuration,
partition, per-layer layout and cycles), ``vta/layer_XX.{insn,uop,wgt,acc}.bin`` (the
128-bit instruction stream, 32-bit uops, blocked int8 weights, int32 ALU constants),
``vta/layer_XX.npz`` (the integer layer, for the reference) and ``report.json``.
``onnxc vta-sim out/ --input x.npy`` runs it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from onnxc.backends import Backend, Option, register_backend
from onnxc.backends.tvm import X86Backend
from onnxc.errors import UnsupportedError
from onnxc.options import non_negative_int
from onnxc.pipeline import PassWith, Requirement

from .config import DEFAULT, VtaConfig

HOSTS = ("onnx", "x86", "arm")
PROGRAM_FILE = os.path.join("vta", "program.json")


def config_from_options(options: dict) -> VtaConfig:
    path = options.get("vta_config")
    cfg = VtaConfig.load(path) if path else DEFAULT
    return cfg.with_overrides(CLOCK_MHZ=options.get("vta_clock_mhz"),
                              ROUNDING=options.get("vta_rounding"))


def layer_report(prog, stats, cfg) -> dict:
    """Per-layer figures from one simulated run (timing does not depend on the data)."""
    info = prog.info
    cycles = max(stats.cycles, 1)
    return {
        "name": prog.layer.name, "kind": prog.layer.kind,
        "in_shape": list(prog.layer.in_shape), "out_shape": list(prog.layer.out_shape),
        "macs": info["macs"], "padded_macs": info["padded_macs"],
        "padding_waste": round(1 - info["macs"] / max(info["padded_macs"], 1), 4),
        "channel_padding": info["channel_padding"],
        "cycles": int(stats.cycles),
        "latency_us": round(stats.cycles / cfg.CLOCK_MHZ, 2),
        "gemm_utilization": round(info["macs"] / (cycles * cfg.macs_per_cycle), 4),
        "gemm_busy": round(stats.gemm_cycles / cycles, 4),
        "alu_cycles": int(stats.alu_cycles), "gemm_cycles": int(stats.gemm_cycles),
        "busy": stats.busy, "dram_bytes": stats.dram_bytes,
        "dram_read": dict(stats.dram_read), "dram_write": int(stats.dram_write),
        "insns": info["insns"], "uops": info["uops"], "uop_mode": info["uop_mode"],
        "tiling": info["tiling"],
    }


def totals(layers: list, cfg) -> dict:
    cyc = sum(r["cycles"] for r in layers)
    macs = sum(r["macs"] for r in layers)
    # channel padding of conv/dense layers (a residual Add's identity blocks are not
    # padding: they are reported per layer)
    mm = [r for r in layers if r["kind"] != "add"]
    padded = sum(r["padded_macs"] for r in mm)
    return {"layers": len(layers), "cycles": cyc, "latency_ms": round(cyc / cfg.CLOCK_MHZ / 1e3, 4),
            "macs": macs, "padded_macs": padded,
            "padding_waste": round(1 - sum(r["macs"] for r in mm) / max(padded, 1), 4),
            "gemm_utilization": round(macs / max(cyc * cfg.macs_per_cycle, 1), 4),
            "dram_bytes": sum(r["dram_bytes"] for r in layers)}


def compile_graph(graph, cfg, residual: bool = False):
    """Partition and lower ``graph`` (a copy is edited). Returns
    (host graph, programs, placement, layer reports)."""
    from .lower import lower
    from .partition import partition
    from .sim import Simulator

    def accept(layer):
        # one program computes BATCH samples (VTA's GEMM rows); the runtime feeds blocks
        layer.in_shape = (cfg.batch,) + tuple(layer.in_shape[1:])
        return lower(layer, cfg)

    host = graph.copy()
    layers, programs, placement = partition(host, accept, residual=residual)
    if not layers:
        reasons = sorted({p["reason"] for p in placement})
        if not placement:
            raise UnsupportedError("no conv or dense layer to run on VTA (the model has no "
                                   "Conv/Gemm/MatMul)")
        raise UnsupportedError("no layer can run on VTA: " + "; ".join(reasons[:3])
                               + (" ..." if len(reasons) > 3 else ""))
    reports = []
    for prog in programs:
        # timing does not depend on the data: one run on zeros gives the cycles
        stats = Simulator(cfg, prog.dram.copy()).run(prog.insns)
        reports.append(layer_report(prog, stats, cfg))
    return host, programs, placement, reports


class QuantizedInput(Requirement):
    """Without an int8 pass the input model must already be quantized (QDQ)."""

    def check(self, plan, owner):
        if plan.find("int8") is not None or plan.graph is None:
            return None
        if not any(n.op == "QuantizeLinear" for n in plan.graph.nodes):
            raise UnsupportedError(
                "no layer can run on VTA: the model has no QuantizeLinear/DequantizeLinear "
                "and the passes include no int8 (add int8 with --int8-pow2-scales)")
        return None


@register_backend
class VtaBackend(Backend):
    name = "vta"
    summary = "VTA FPGA accelerator: int8 conv/dense on VTA (simulated), rest on the host"
    artifact_marker = PROGRAM_FILE
    options = (
        Option("--vta-config", str, None, "VTA configuration JSON (vta_config.json keys: "
               "LOG_BLOCK, LOG_*_BUFF_SIZE, ...; plus cycle-model keys)"),
        Option("--vta-clock-mhz", float, None, "clock for latency estimates (default 100)"),
        Option("--vta-rounding", str, None, "requantisation rounding: even = bit-exact with "
               "ONNX QuantizeLinear (default), up = add-half-and-shift (fewer ALU ops)",
               choices=("even", "up")),
        Option("--vta-host", str, "onnx", "host partition: onnx (ONNX Runtime, evaluates "
               "the QDQ graph exactly) or a library per host segment compiled by the TVM "
               "x86/arm backend", choices=HOSTS),
        Option("--vta-residual", None, None, "also run residual Adds (DQ + DQ -> Q) on "
               "VTA, as a 1x1 GEMM with identity weights over both inputs",
               action="store_true"),
        Option("--vta-verify-samples", non_negative_int, 8, "samples simulated at build "
               "time to check the artifact against ONNX Runtime and the integer reference"),
    ) + X86Backend.options       # --vta-host x86/arm compiles the host segments with TVM
    # VTA computes int8 x int8 with shift requantisation: an int8 pass in the run must
    # produce that, or no layer could go to VTA (a model quantized before is checked by
    # the partitioner, layer by layer).
    requires = (PassWith("int8", (("int8_pow2_scales", (True,)),
                                  ("int8_act_type", ("auto", "int8")),
                                  ("int8_mode", ("static",))),
                         hint="VTA takes int8 activations with power-of-two scales"),
                QuantizedInput())

    @classmethod
    def load_artifact(cls, path):
        from .runtime import load_artifact

        return load_artifact(path)

    def validate(self, ctx) -> None:
        config_from_options(self.config)

    def build(self, graph, ctx, out_dir, report) -> None:
        import gc

        from .runtime import VtaArtifact, save_layer

        cfg = config_from_options(self.config)
        host, programs, placement, layer_reports = compile_graph(
            graph, cfg, residual=self.config.vta_residual)
        vta_dir = os.path.join(out_dir, "vta")
        os.makedirs(vta_dir, exist_ok=True)
        _save_host(host, os.path.join(vta_dir, "host.onnx"))
        entries = []
        for i, (prog, rep) in enumerate(zip(programs, layer_reports)):
            entry = save_layer(prog, vta_dir, i)
            entry["stats"] = rep
            entries.append(entry)
        host_kind = self.config.vta_host
        meta = {"config": cfg.as_dict(), "host": host_kind, "placement": placement,
                "layers": entries}
        if host_kind != "onnx":
            meta["host_libraries"] = _compile_host(os.path.join(vta_dir, "host.onnx"),
                                                   host_kind, out_dir, ctx,
                                                   self.config)
        with open(os.path.join(out_dir, PROGRAM_FILE), "w") as f:
            json.dump(meta, f, indent=1, default=_jsonable)
        summary = {
            "config": cfg.as_dict(), "describe": cfg.describe(),
            "placement": placement,
            "host_layers": [p for p in placement if p["where"] == "host"],
            "layers": layer_reports, "totals": totals(layer_reports, cfg),
            "note": "cycles come from onnxc's cycle model (see docs/vta.md), not hardware",
        }
        waste = summary["totals"]["padding_waste"]
        if waste > 0:
            summary["padding_advice"] = (
                f"{100 * waste:.1f}% of VTA MACs multiply channel padding (channels are "
                f"padded to BLOCK={cfg.block}); prune with --prune-multiple {cfg.block} to "
                f"avoid it")
        # Build-time check: run the artifact just written on a few samples.
        n = self.config.vta_verify_samples
        if n:
            art = VtaArtifact(out_dir)
            summary["verification"] = verify_artifact(art, graph, ctx, n)
            del art
            gc.collect()
        report["vta"] = summary
        n_vta = sum(p["where"] == "vta" for p in placement)
        ctx.log(f"  vta: {n_vta} of {len(placement)} layers on VTA, "
                f"{summary['totals']['cycles']:,} cycles = "
                f"{summary['totals']['latency_ms']:.3f} ms at {cfg.CLOCK_MHZ:g} MHz, GEMM "
                f"utilisation {100 * summary['totals']['gemm_utilization']:.1f}%")
        for p in summary["host_layers"]:
            ctx.log(f"  vta: host runs {p['node']} ({p['op']}): {p['reason']}")
        report["runtime"] = {"name": "onnxc VTA simulator + onnxruntime host",
                             "load": "from onnxc.backends.vta.runtime import load_artifact\n"
                                     "art = load_artifact('out')\n"
                                     "outputs = art.run({'input': x})"}


def verify_artifact(art, graph, ctx, n: int) -> dict:
    """Run ``art`` on ``n`` verification samples: per-layer bit-exactness against the
    numpy integer reference and output agreement with ONNX Runtime on the QDQ graph."""
    from onnxc.execution import Runner
    from onnxc.verify import Verifier

    from .qlayer import reference

    ds = Verifier.for_context(graph, ctx).dataset.take(n)
    feeds = {k: v[:n] for k, v in ds.inputs.items()}
    ref = Runner(graph).run(feeds)
    checked = {"exact": 0, "total": 0}
    orig = [p.run for p in art.programs]

    def checking(prog, run):
        def wrapped(x, schedule="load-first", poison=False):
            y, st = run(x, schedule=schedule, poison=poison)
            checked["total"] += 1
            checked["exact"] += int(np.array_equal(y, reference(prog.layer, x,
                                                                 prog.cfg.ROUNDING)))
            return y, st
        return wrapped
    for p, run in zip(art.programs, orig):
        p.run = checking(p, run)
    outs = art.run(feeds)
    result = {"samples": int(len(next(iter(feeds.values())))), "host": art.host_runtime,
              "host_note": art.host_note,
              "layer_runs_bit_exact": f"{checked['exact']}/{checked['total']}"}
    result["max_abs_diff_vs_onnxruntime"] = _max_diff(ref, outs)
    # ONNX Runtime's extended optimisations fuse QDQ into integer kernels (QLinearConv,
    # QGemm) whose requantisation may differ by an LSB from the QDQ graph's definition;
    # with basic optimisations it evaluates DQ/op/Q exactly as written.
    exact = _ort_basic(graph.to_onnx(), feeds)
    result["max_abs_diff_vs_onnxruntime_basic"] = _max_diff(exact, outs)
    if ref and ref[0].ndim == 2 and ref[0].shape[1] > 1:
        result["argmax_agreement"] = float(np.mean(ref[0].argmax(1) == outs[0].argmax(1)))
    return result


def _compile_host(host_path: str, target: str, out_dir: str, ctx, options) -> dict:
    """Compile every host segment with the TVM backend; {segment index: directory}."""
    import onnx

    from .runtime import host_segments

    try:
        from onnxc.backends.tvm.build import compile_model
    except ImportError as exc:
        from onnxc.errors import BackendError

        raise BackendError(f"--vta-host {target} needs the TVM backend ({exc})") from None
    plan, _, _ = host_segments(onnx.load(host_path))
    libs = {}
    for k, (_, model, _, _) in enumerate(p for p in plan if p[0] == "host"):
        rel = os.path.join("vta", f"host_{k:02d}")
        ctx.log(f"  vta: compiling host segment {k} ({len(model.graph.node)} nodes) for "
                f"{target}")
        compile_model(model, target, os.path.join(out_dir, rel), options=dict(options),
                      log=ctx.log)
        libs[str(k)] = rel
    return libs


def _max_diff(ref, outs) -> float:
    diffs = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
             if a.size else 0.0 for a, b in zip(ref, outs)]
    return max(diffs) if diffs else 0.0


def _ort_basic(model, feeds) -> list:
    """Outputs of ``model`` on ONNX Runtime with basic graph optimisations only."""
    from onnxc.execution import Runner

    return Runner(model, optimize="basic").run(feeds, batch_size=None)


def _save_host(host, path: str) -> None:
    import onnx

    model = host.to_onnx()
    # The custom op's outputs keep the int8 type of the QuantizeLinear they replace.
    opsets = {o.domain for o in model.opset_import}
    if "onnxc.vta" not in opsets:
        model.opset_import.append(onnx.helper.make_opsetid("onnxc.vta", 1))
    onnx.save(model, path)


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


from . import commands  # noqa: E402,F401  (registers onnxc vta-sim)
