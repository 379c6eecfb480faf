"""recover: win back accuracy lost by compression, by distillation from the original model.

The compressed graph (student) is converted to a PyTorch module (``torch_graph``),
trained to match the pipeline's input graph (teacher, ``ctx.original``) on unlabelled
data (``distill``), and the trained values are written back into the very same
constants — op types, shapes, quantization scales and zero points do not change.
Quantized weights are trained as float latents through fake quantization with
straight-through estimators and stored back on their int8 / ternary / binary grid, so
the result stays quantized. It runs last (after quantization) for exactly that reason.

Data: ``--recover-data`` (same npz format and ``--scale/--mean/--std`` as the
calibration data), else the calibration data; never random inputs — distilling on
noise would teach the student nothing about the task.
"""

from __future__ import annotations

import os

import numpy as np

from onnxc.errors import DataError, UsageError
from onnxc.options import non_negative, positive, positive_int
from onnxc.pipeline import CalibrationData, Option, Pass, register_pass

# torch is imported only when the pass runs (in run/_distill_config/_hints), so listing passes
# or running other passes never pays torch's import time.


def structure(graph) -> list:
    """What recover must not change: every node's op type and every tensor's shape/dtype."""
    sig = []
    for node in graph.nodes:
        sig.append((node.op, tuple((t.name, tuple(t.shape) if t.shape is not None else None,
                                    str(t.dtype)) for t in node.inputs),
                    tuple((t.name, tuple(t.shape) if t.shape is not None else None)
                          for t in node.outputs)))
    return sig


@register_pass
class Recover(Pass):
    name = "recover"
    summary = "distil the compressed model from the original (KD + hints, QAT for QDQ)"
    order = 70
    exact = False
    requires = (CalibrationData(
        when=lambda config: config.recover_data is None, fallback=None,
        message="recover needs training images: give --recover-data FILE or "
                "--calib-data FILE (it never trains on random inputs)"),)
    # --recover-data / --recover-teacher also take a Dataset / Graph from the Python API.
    options = (
        Option("--recover-data", str, None,
               "npz/npy training images for recovery (default: --calib-data); labels "
               "optional"),
        Option("--recover-teacher", str, None,
               "teacher .onnx when the input is already compressed (default: the "
               "pipeline's input model)"),
        Option("--recover-epochs", positive, 8.0, "passes over the recovery data"),
        Option("--recover-minutes", positive, None,
               "wall-clock cap; the LR schedule is fitted to it (then not bit-reproducible)"),
        Option("--recover-lr", positive, None,
               "peak learning rate, cosine decay (default: 0.01 sgd, 0.001 adam)"),
        Option("--recover-optimizer", str, "sgd", "sgd (Nesterov momentum) or adam",
               choices=("sgd", "adam")),
        Option("--recover-batch", positive_int, 32,
               "batch size (32 beat 64 per epoch: more updates from little data)"),
        Option("--recover-temperature", positive, 4.0, "distillation temperature"),
        Option("--recover-hints", str, "auto",
               "feature hints: auto (last shared activation per resolution), all (every "
               "shared block output), none, or comma-separated tensor names"),
        Option("--recover-hint-weight", non_negative, 1.0, "weight of the feature-hint loss"),
        Option("--recover-label-weight", non_negative, 0.0,
               "weight of cross-entropy on the data's labels (0: pure distillation)"),
        Option("--recover-augment", str, "flip,crop",
               "image augmentation: comma-separated flip,crop,mixup, or none"),
        Option("--recover-scales", str, "learn",
               "per-channel α of ternary/binary weights: learn (TTQ-style) or fixed",
               choices=("learn", "fixed")),
        Option("--recover-threads", positive_int, 2, "torch threads for training"),
    )

    # -- options and data ----------------------------------------------------------------
    def validate(self, ctx) -> None:
        path = self.config.recover_data
        if isinstance(path, str) and not os.path.exists(path):
            raise DataError(f"--recover-data file not found: {path}")
        aug = self.config.recover_augment
        kinds = {a.strip() for a in str(aug).split(",") if a.strip()} - {"none"}
        if kinds - {"flip", "crop", "mixup"}:
            raise UsageError(f"--recover-augment '{aug}': use flip, crop, mixup or none")
        teacher = self._teacher(ctx)
        if teacher is not None:
            self._dataset(ctx, teacher)          # bad files fail before any pass runs

    def _teacher(self, ctx):
        """The teacher graph: --recover-teacher if given, else the pipeline's input."""
        spec = self.config.recover_teacher
        if spec is None:
            return ctx.original
        return ctx.memo(("recover_teacher", id(spec)), lambda: self._load_teacher(spec, ctx))

    @staticmethod
    def _load_teacher(spec, ctx):
        from onnxc import frontend
        from onnxc.ir import Graph

        if isinstance(spec, Graph):
            graph = spec
        else:
            if isinstance(spec, str) and not os.path.exists(spec):
                raise UsageError(f"--recover-teacher file not found: {spec}")
            graph = frontend.load(spec)
        if ctx.original is not None:
            want = [(t.name, tuple(t.shape or ())) for t in ctx.original.gs.inputs]
            have = [(t.name, tuple(t.shape or ())) for t in graph.gs.inputs]
            if want != have:
                raise UsageError(f"--recover-teacher inputs {have} do not match the "
                                 f"model's inputs {want}")
        return graph

    def _dataset(self, ctx, graph):
        from onnxc.calibrate.readers import Dataset, Preprocess, check_against_graph, load_npz

        data = self.config.recover_data
        if isinstance(data, Dataset):          # Python API: a ready Dataset
            check_against_graph(data, graph)
            return data
        if data is None:
            if ctx.calibration is None:
                raise UsageError("recover needs training images: give --recover-data FILE "
                                 "or --calib-data FILE")
            check_against_graph(ctx.calibration, graph)
            return ctx.calibration
        pre = ctx.preprocess or Preprocess()
        return ctx.memo(("recover_data", data), lambda: load_npz(data, graph, pre))

    def _distill_config(self, ctx):
        from .distill import DistillConfig

        cfg = self.config
        lr = cfg.recover_lr
        if lr is None:
            lr = 0.001 if cfg.recover_optimizer == "adam" else 0.01
        return DistillConfig(
            epochs=cfg.recover_epochs, minutes=cfg.recover_minutes,
            optimizer=cfg.recover_optimizer, lr=lr, batch_size=cfg.recover_batch,
            temperature=cfg.recover_temperature, hint_weight=cfg.recover_hint_weight,
            label_weight=cfg.recover_label_weight,
            augment=tuple(a.strip() for a in cfg.recover_augment.split(",")
                          if a.strip() not in ("", "none")),
            threads=cfg.recover_threads, seed=int(ctx.seed))

    def _hints(self, ctx, student_graph, teacher_graph) -> list:
        spec = self.config.recover_hints.strip()
        if spec == "none" or self.config.recover_hint_weight == 0:
            return []
        if spec in ("auto", "all"):
            from .distill import auto_hints

            return auto_hints(student_graph, teacher_graph, every=spec == "all")
        names = [s.strip() for s in spec.split(",") if s.strip()]
        s_t, t_t = student_graph.tensors(), teacher_graph.tensors()
        for name in names:
            if name not in s_t or name not in t_t:
                raise UsageError(f"--recover-hints: tensor '{name}' is not in both the "
                                 f"compressed and the original graph")
            if s_t[name].shape != t_t[name].shape:
                raise UsageError(f"--recover-hints: tensor '{name}' has shape "
                                 f"{s_t[name].shape} in the compressed graph but "
                                 f"{t_t[name].shape} in the original")
        return names

    # -- the pass ------------------------------------------------------------------------
    def run(self, graph, ctx, report):
        from .distill import Teacher, distill
        from .torch_graph import TorchGraph

        teacher_graph = self._teacher(ctx)
        if teacher_graph is None:
            # Used outside compress(): the input graph is its own teacher.
            teacher_graph = graph.copy()
            report.note("no original model in the context: the input graph is the teacher")
        data = self._dataset(ctx, graph)
        cfg = self._distill_config(ctx)
        before = structure(graph)

        # raises UnsupportedError naming any bad op
        student = TorchGraph(graph, learn_lowbit_scales=self.config.recover_scales == "learn",
                             float_weights=_float_weights(teacher_graph))
        if not len(student.params):
            report.note("nothing trainable in the graph; left unchanged")
            return graph
        hints = self._hints(ctx, graph, teacher_graph)
        teacher = Teacher(teacher_graph, hints, threads=cfg.threads)

        quant_kinds: dict = {}
        for qw in student.quant.values():
            quant_kinds[qw.kind] = quant_kinds.get(qw.kind, 0) + 1
        source = "calibration data" if self.config.recover_data is None else data.source
        ctx.log(f"  recover: {len(data)} samples from {source}, "
                f"{sum(p.numel() for p in student.params):,} trainable values"
                + (f" ({', '.join(f'{v} {k}' for k, v in quant_kinds.items())} quantized "
                   f"weight tensors, fake-quant/STE)" if quant_kinds else "")
                + f", hints: {', '.join(hints) or 'none'}")
        labels = data.labels if data.labels is not None else None
        if cfg.label_weight > 0 and labels is None:
            ctx.warn("--recover-label-weight given but the recovery data has no labels")
        result = distill(student, teacher, data.inputs, labels, cfg,
                         progress=ctx.progress, log=ctx.log)
        report.changed = student.write_back()
        if structure(graph) != before:      # never expected: write_back only sets values
            raise RuntimeError("recover changed the graph structure")
        packed = _repack_lowbit(graph, student)
        if packed is not None:
            # The low-bit pass wrote packed_weights.npz from the codes before training;
            # this later copy (same name) replaces it in the artifact.
            report.files["packed_weights.npz"] = packed

        report.note(f"distilled {result.steps} steps ({result.epochs_done} epochs) in "
                    f"{result.seconds:.0f} s on {len(data)} samples; "
                    f"{report.changed} constant tensors updated in place")
        if result.stopped_by_time:
            report.note(f"stopped by --recover-minutes {cfg.minutes}")
        if result.kept_epoch is not None and result.held_out:
            h0, hk = result.held_out[0], result.held_out[result.kept_epoch]
            report.note(f"kept epoch {result.kept_epoch} weights: held-out KD "
                        f"{h0['kd']:.4f} -> {hk['kd']:.4f}, teacher agreement "
                        f"{100 * h0['agree']:.1f}% -> {100 * hk['agree']:.1f}%")
        report.extra.update({
            "samples": len(data), "data": source, "steps": result.steps,
            "epochs": result.epochs_done, "train_seconds": result.seconds,
            "stopped_by_time": result.stopped_by_time, "hints": hints,
            "quantized_weights": quant_kinds, "trainable_tensors": report.changed,
            "learned_lowbit_scales": len(student.lowbit_scales),
            "float_latents": student.float_latents,
            "config": {"optimizer": cfg.optimizer, "lr": cfg.lr, "batch": cfg.batch_size,
                       "temperature": cfg.temperature,
                       "hint_weight": cfg.hint_weight, "label_weight": cfg.label_weight,
                       "augment": list(cfg.augment), "threads": cfg.threads,
                       "seed": cfg.seed, "epochs": cfg.epochs, "minutes": cfg.minutes},
            "loss_log": result.loss_log, "held_out": result.held_out,
            "kept_epoch": result.kept_epoch,
        })
        return graph


def _float_weights(teacher_graph) -> dict:
    """{layer name: [float weight of the teacher, same after fold_bn]}: the candidates a
    quantized weight of the student may have been made from (same layer name; the
    converter uses one only if quantizing it reproduces the stored codes exactly)."""
    from onnxc.passes.fold_bn import FoldBatchNorm
    from onnxc.pipeline import Context, PassReport

    out: dict = {}
    raw = teacher_graph.copy()
    folded = raw.copy()
    for g in (raw, folded):
        g.name_nodes()
    FoldBatchNorm().run(folded, Context(progress=False, log=lambda m: None),
                        PassReport("fold_bn", True))
    for g in (raw, folded):
        for node in g.nodes:
            if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") \
                    and len(node.inputs) > 1:
                w = g.constant(node.inputs[1])
                if w is not None and w.dtype.kind == "f":
                    out.setdefault(node.name, []).append(np.asarray(w))
    return out


def _repack_lowbit(graph, student):
    """packed_weights.npz (2-/1-bit codes + float16 α) for the trained ternary/binary
    layers, in the layout of ``calibrate.lowbit.pack_layers``; None without any."""
    import numpy as np

    from onnxc.calibrate.lowbit import pack_layers

    layers = []
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or node.inputs[0].name not in student.quant:
            continue
        kind = student.quant[node.inputs[0].name].kind
        if kind not in ("ternary", "binary") or len(node.outputs[0].outputs) != 1:
            continue
        codes = np.asarray(node.inputs[0].values)
        axis = int(node.attrs.get("axis", 1)) % codes.ndim
        alpha = np.asarray(node.inputs[1].values, np.float32).reshape(-1)
        layers.append((node.outputs[0].outputs[0].name,
                       np.ascontiguousarray(np.moveaxis(codes, axis, 0)), alpha,
                       2 if kind == "ternary" else 1))
    return pack_layers(layers)[0] if layers else None


__all__ = ["Recover", "structure"]
