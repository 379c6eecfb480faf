"""Knowledge distillation of a compressed graph (student) from the original one (teacher).

Loss per batch (Hinton et al. 2015, FitNets-style hints from Romero et al. 2015):

    T² · KL(softmax(t/T) ‖ softmax(s/T))                 soft targets of the teacher
  + hint_weight · Σ_h mean((s_h − t_h)²) / mean(t_h²)    feature hints (scale-free)
  + label_weight · CE(s, y)                              only when asked and labels exist

The teacher runs on ONNX Runtime (the reference runtime, and 2× faster than a torch
forward here); the student is a :class:`TorchGraph`. Everything random (shuffling,
flips, crops) comes from one seeded numpy generator, so a run with a fixed number of
epochs and threads is bit-reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from onnxc.errors import DataError, UsageError
from onnxc.execution import Runner, capture_model, in_slices

from .torch_graph import TorchGraph


@dataclass
class DistillConfig:
    epochs: float = 8.0
    minutes: float | None = None      # wall-clock cap; the LR schedule is fitted to it
    lr: float = 0.01
    optimizer: str = "sgd"
    clip: float = 2.0                 # global gradient-norm clip (BN-free nets spike early)
    batch_size: int = 32
    temperature: float = 4.0
    hint_weight: float = 1.0
    label_weight: float = 0.0
    augment: tuple = ("flip", "crop")
    threads: int = 2
    seed: int = 0
    keep_best: bool = True            # keep the epoch with the lowest held-out KD loss


@dataclass
class DistillResult:
    steps: int = 0
    epochs_done: float = 0.0
    seconds: float = 0.0
    stopped_by_time: bool = False
    loss_log: list = field(default_factory=list)   # per epoch: {"epoch", "kd", "hint", ...}
    held_out: list = field(default_factory=list)   # KD / agreement on held-out samples
    kept_epoch: int | None = None                  # weights kept (0: the input's)


# ----------------------------------------------------------------------------------------
# Augmentation


def augment_batch(x: np.ndarray, rng: np.random.Generator, kinds) -> np.ndarray:
    """Random horizontal flip and random crop (reflect-padded by H/8) of N×C×H×W images.

    Reflect padding rather than zeros: the data is already normalised, so "black" is
    not a known value here, and reflection keeps image statistics unchanged.
    """
    if x.ndim != 4:
        return x
    out = x.copy()
    n, _, h, w = x.shape
    if "flip" in kinds:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, :, ::-1]
    if "crop" in kinds:
        p = max(1, h // 8)
        padded = np.pad(out, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
        dy = rng.integers(0, 2 * p + 1, n)
        dx = rng.integers(0, 2 * p + 1, n)
        for i in range(n):
            out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return np.ascontiguousarray(out)


def mixup_batch(x: np.ndarray, rng: np.random.Generator, alpha: float = 0.4):
    """Blend each image with another of the batch: λ·x + (1−λ)·x[perm], λ ~ Beta(α, α)
    per sample. Returns (mixed, perm, λ).

    For distillation the teacher labels the blended image itself, so every mixed
    image is a new, correctly labelled training point between the data's images —
    more of the teacher's function seen from the same few thousand images (the
    student otherwise starts to fit them: held-out KD rises above the training KD).
    """
    n = len(x)
    perm = rng.permutation(n)
    lam = rng.beta(alpha, alpha, n).astype(np.float32)
    lam = np.maximum(lam, 1 - lam)            # x stays the dominant image (its label)
    shape = (n,) + (1,) * (x.ndim - 1)
    out = lam.reshape(shape) * x + (1 - lam.reshape(shape)) * x[perm]
    return np.ascontiguousarray(out.astype(x.dtype)), perm, lam


# ----------------------------------------------------------------------------------------
# Teacher on ONNX Runtime with hint taps


class Teacher:
    """Runs the original graph; returns its first output and the tapped tensors."""

    def __init__(self, graph, taps, threads: int):
        model = capture_model(graph.to_onnx(), taps, keep_outputs=True)
        self.taps = list(taps)
        self.runner = Runner(model, threads)
        self.input_names = self.runner.input_names
        self.out_names = [model.graph.output[0].name] + self.taps
        # A static batch (e.g. fixed by --input-shape for a TVM target): both graphs
        # then run in slices of exactly that many samples.
        self.fixed_batch = self.runner.fixed_batch

    def __call__(self, feeds: dict):
        outs = self.runner.run(feeds, batch_size=None, outputs=self.out_names)
        return outs[0], outs[1:]


# ----------------------------------------------------------------------------------------
# Hint selection


ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish", "PRelu")


def auto_hints(student_graph, teacher_graph, every: bool = False) -> list:
    """Activations both graphs share by name and shape: the last one per spatial
    resolution, or (``every``) all of them.

    Compression passes keep the tensors between blocks (pruning removes block-internal
    channels, factorisation splits a conv, quantization adds Q/DQ after them), so the
    block outputs are the natural points where student and teacher must agree.
    """
    t_shapes = {name: tuple(t.shape) for name, t in teacher_graph.tensors().items()
                if getattr(t, "shape", None) is not None and not _is_const(t)}
    last_by_res: dict = {}
    for node in student_graph.nodes:
        if node.op not in ACTIVATIONS and node.op not in ("Add", "Mul"):
            continue
        out = node.outputs[0]
        shape = tuple(out.shape) if out.shape is not None else None
        if shape is None or len(shape) != 4 or t_shapes.get(out.name) != shape:
            continue
        if student_graph.is_graph_output(out):
            continue
        if every:
            # Add → Relu: hint the activation only, not the same signal twice.
            cons = out.outputs
            if node.op in ("Add", "Mul") and len(cons) == 1 and cons[0].op in ACTIVATIONS:
                continue
            last_by_res[out.name] = out.name
        else:
            last_by_res[tuple(shape[2:])] = out.name
    return list(last_by_res.values())


def _is_const(t) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(t, gs.Constant)


# ----------------------------------------------------------------------------------------
# Training


class _HeldOut:
    """KD loss and teacher agreement of the student on fixed, un-augmented samples."""

    def __init__(self, student, teacher, name, x, temperature):
        self.student, self.x, self.t = student, x, temperature
        self.name = name
        self.fixed_batch = teacher.fixed_batch
        self.logits = np.concatenate([teacher({name: x[i:i + 128]})[0].reshape(
            len(x[i:i + 128]), -1) for i in range(0, len(x), 128)])

    def score(self) -> tuple[float, float]:
        was_training = self.student.training
        self.student.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, len(self.x), 128):
                xb = torch.from_numpy(np.ascontiguousarray(self.x[i:i + 128]))
                logits = in_slices(lambda part: _student_outputs(self.student, part, ()),
                                   [xb], self.fixed_batch, concat=torch.cat)[0]
                outs.append(logits.reshape(len(xb), -1))
        self.student.train(was_training)
        s = torch.cat(outs)
        t = torch.from_numpy(self.logits)
        kd = F.kl_div(F.log_softmax(s / self.t, 1), F.log_softmax(t / self.t, 1),
                      reduction="batchmean", log_target=True) * self.t ** 2
        return float(kd), float((s.argmax(1) == t.argmax(1)).float().mean())


def _student_outputs(student, x, taps) -> list:
    """[first output, *tapped tensors] of the student."""
    if not taps:
        return [student(x)[0]]
    outs, feats = student(x, taps=taps)
    return [outs[0], *feats]


def distill(student: TorchGraph, teacher: Teacher, inputs: dict, labels, cfg: DistillConfig,
            progress: bool = True, log=None) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on ``inputs`` (one input supported)."""
    if len(inputs) != 1:
        raise DataError("recover supports models with exactly one input")
    name, data = next(iter(inputs.items()))
    n = len(data)
    if n == 0:
        raise DataError("recover: the data holds no samples")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.threads)))
    rng = np.random.default_rng(cfg.seed)
    # Hold out a few samples (never trained on) to keep the best weights: a short run
    # on a nearly lossless student (int8) can otherwise end worse than it started.
    n_hold = min(256, n // 10) if n >= 100 and cfg.keep_best else 0
    split = rng.permutation(n)
    hold = np.sort(split[:n_hold])
    if n_hold:
        data = data[np.sort(split[n_hold:])]
        labels = None if labels is None else labels[np.sort(split[n_hold:])]
        n = len(data)
    held_out = _HeldOut(student, teacher, name, inputs[name][hold], cfg.temperature) \
        if n_hold else None
    bs = max(1, min(cfg.batch_size, n))
    steps_per_epoch = max(1, n // bs)            # drop the ragged last batch
    planned = max(1, int(round(cfg.epochs * steps_per_epoch)))
    total_steps = planned

    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True)
    temperature = float(cfg.temperature)
    taps = teacher.taps if cfg.hint_weight > 0 else []
    use_labels = cfg.label_weight > 0 and labels is not None
    result = DistillResult()
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, silence in log files.
        bar = tqdm(total=total_steps, desc="recover", unit="step", leave=False,
                   dynamic_ncols=True, disable=None)
    best = None
    if held_out is not None:
        kd0, agree0 = held_out.score()
        best = (kd0, 0, [p.detach().clone() for p in params])
        result.held_out = [{"epoch": 0, "kd": round(kd0, 5), "agree": round(agree0, 4)}]
    start = time.perf_counter()
    deadline = start + 60.0 * cfg.minutes if cfg.minutes else None
    step = 0
    epoch = 0
    student.train()
    while step < total_steps:
        order = rng.permutation(n)
        sums = {"kd": 0.0, "hint": 0.0, "ce": 0.0, "agree": 0.0}
        done = 0
        for b in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[b * bs:(b + 1) * bs]
            x = augment_batch(data[idx], rng, cfg.augment)
            mix = None
            if "mixup" in cfg.augment and len(x) > 1:
                x, perm, lam = mixup_batch(x, rng)
                mix = (perm, torch.from_numpy(lam))
            t_logits, t_feats = teacher({name: x})
            # A short linear warm-up: the first gradients of a freshly compressed student
            # are large (its outputs are far from the teacher's) and the folded-BN net
            # has no normalisation to absorb them.
            warm = max(1, min(100, total_steps // 20))
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total_steps))
            lr *= min(1.0, (step + 1) / warm)
            for g in opt.param_groups:
                g["lr"] = lr
            xt = torch.from_numpy(x)
            if xt.dim() == 4:
                # NHWC activations: oneDNN convolutions ran ~13% faster per step here.
                xt = xt.contiguous(memory_format=torch.channels_last)
            s_out = in_slices(lambda part: _student_outputs(student, part, taps), [xt],
                              teacher.fixed_batch, concat=torch.cat)
            s_logits, s_feats = s_out[0].reshape(len(x), -1), s_out[1:]
            t = torch.from_numpy(t_logits).reshape(len(x), -1)
            kd = F.kl_div(F.log_softmax(s_logits / temperature, 1),
                          F.log_softmax(t / temperature, 1), reduction="batchmean",
                          log_target=True) * temperature ** 2
            loss = kd
            hint = torch.zeros(())
            for sf, tf in zip(s_feats, t_feats):
                tf = torch.from_numpy(tf)
                hint = hint + (sf - tf).pow(2).mean() / tf.pow(2).mean().clamp_min(1e-8)
            if taps:
                loss = loss + cfg.hint_weight * hint
            ce = torch.zeros(())
            if use_labels:
                y = torch.from_numpy(labels[idx]).long()
                if mix is None:
                    ce = F.cross_entropy(s_logits, y)
                else:
                    perm, lam = mix
                    ce = (lam * F.cross_entropy(s_logits, y, reduction="none")
                          + (1 - lam) * F.cross_entropy(s_logits, y[perm],
                                                        reduction="none")).mean()
                loss = loss + cfg.label_weight * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            step += 1
            done += 1
            sums["kd"] += float(kd.detach())
            sums["hint"] += float(hint.detach())
            sums["ce"] += float(ce.detach())
            sums["agree"] += float((s_logits.argmax(1) == t.argmax(1)).float().mean())
            if not math.isfinite(sums["kd"]):
                raise UsageError("recover diverged (loss is not finite); lower --recover-lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kd=f"{float(kd.detach()):.3f}",
                                hint=f"{float(hint.detach()):.3f}")
            if deadline is not None:
                now = time.perf_counter()
                if step == 1:
                    first_done = now
                if now > deadline:
                    result.stopped_by_time = True
                    break
                if step >= 5 and (step == 5 or step % 25 == 0):
                    # Fit the cosine schedule to the time budget from the speed of the
                    # steps after the first (which pays oneDNN's one-time kernel set-up:
                    # in the suite's first run a fit over the first five steps stopped
                    # 15-30 s ResNet-20 budgets after 6 steps), and refit as it goes.
                    per_step = (now - first_done) / (step - 1)
                    fit = step + int((deadline - now) / max(per_step, 1e-6))
                    total_steps = max(step + 1, min(planned, fit))
                    if bar is not None:
                        bar.total = total_steps
                        bar.refresh()
        epoch += 1
        entry = {"epoch": epoch, "steps": done,
                 **{k: round(v / max(done, 1), 5) for k, v in sums.items()}}
        if not taps:
            entry.pop("hint")
        if not use_labels:
            entry.pop("ce")
        if held_out is not None:
            kd_e, agree_e = held_out.score()
            entry["held_out_kd"], entry["held_out_agree"] = round(kd_e, 5), round(agree_e, 4)
            result.held_out.append({"epoch": epoch, "kd": round(kd_e, 5),
                                    "agree": round(agree_e, 4)})
            if kd_e < best[0]:
                best = (kd_e, epoch, [p.detach().clone() for p in params])
        result.loss_log.append(entry)
        if deadline is not None and not result.stopped_by_time:
            # Refit the schedule to the time left, now counting everything an epoch
            # costs (the held-out scoring too), so the run ends near the deadline.
            now = time.perf_counter()
            per_step = (now - start) / max(step, 1)
            fit = step + int(max(0.0, deadline - now) / max(per_step, 1e-6))
            total_steps = max(step, min(planned, fit))
            if bar is not None:
                bar.total = total_steps
                bar.refresh()
        if log is not None:
            log(f"  recover epoch {epoch}: kd {entry['kd']:.4f}"
                + (f" hint {entry['hint']:.4f}" if taps else "")
                + (f" ce {entry['ce']:.4f}" if use_labels else "")
                + f" teacher-agreement {100 * entry['agree']:.1f}%")
        if result.stopped_by_time:
            break
    if bar is not None:
        bar.close()
    if best is not None:
        result.kept_epoch = best[1]
        with torch.no_grad():
            for p, v in zip(params, best[2]):
                p.copy_(v)
    student.eval()
    result.steps = step
    result.epochs_done = round(step / steps_per_epoch, 3)
    result.seconds = round(time.perf_counter() - start, 2)
    return result
