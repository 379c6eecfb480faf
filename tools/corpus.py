#!/usr/bin/env python3
"""Run onnxc on a corpus of real architectures and tabulate what happens.

    python tools/corpus.py --build               # once: export/extract the models into the cache
    python tools/corpus.py [--models a,b] [--sets fold_bn,x86] [--doc docs/corpus.md]

The corpus (>= 25 models) lives in a cache directory, never in the repository
($ONNXC_CORPUS_DIR, default ~/.cache/onnxc-corpus/models) and nothing is downloaded
when the corpus runs:
- torchvision and timm models with random seeded weights (BatchNorm statistics drawn at
  random too, so folding them changes numbers), exported with torch.onnx. PyPI's
  torchvision does not import beside the project's torch, so ``--build`` makes a separate
  venv (``exportenv`` in the cache) with torch 2.14.1 + torchvision 0.29.1 + timm and
  exports there; the project venv is left alone.
- small torch.nn models (a BERT-like TransformerEncoder, an LSTM, a GRU with a state
  input), which need only the project's own torch: the default test suite builds these;
- ONNX models that PyPI packages ship inside their wheels (``pip download --no-deps``,
  the .onnx taken out of the wheel; each row cites the package and version).

Every model runs through the installed ``onnxc compress`` CLI (one subprocess at a time,
each bounded by a timeout) with the pass sets of ``PASS_SETS``. Each artifact is then
checked independently of onnxc's own verifier: ``onnx.checker`` accepts its model.onnx,
ONNX Runtime runs it on seeded inputs that follow the model's declared inputs, and its
outputs are compared with the original model's: max relative error for exact passes
(must be <= 1e-4), output cosine for lossy ones. A non-zero exit is a refusal when
stderr holds exactly one ``onnxc: error:`` line and no traceback, otherwise it is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.environ.get("ONNXC_CORPUS_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "onnxc-corpus")
MODELS_DIR = os.path.join(CACHE, "models")
EXPORT_VENV = os.path.join(CACHE, "exportenv")
WHEELS_DIR = os.path.join(CACHE, "wheels")
# torch 2.14.1 + torchvision 0.29.1 install from this machine's disk (a CUDA build that
# runs on the CPU); PyPI's torchvision does not import beside the project's torch 2.13.
EXPORT_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.31", "onnx"]

EXACT_TOL = 1e-4


@dataclass(frozen=True)
class PassSet:
    label: str
    passes: str
    target: str
    exact: bool


PASS_SETS = [
    PassSet("fold_bn", "fold_bn", "onnx", True),
    PassSet("int8", "fold_bn,int8", "onnx", False),
    PassSet("prune", "fold_bn,prune", "onnx", False),
    PassSet("lowrank", "fold_bn,lowrank", "onnx", False),
    PassSet("x86", "fold_bn", "x86", True),
]


@dataclass
class Model:
    """One corpus entry. ``inputs``: name -> (shape, dtype, kind) for the seeded inputs the
    harness feeds; kind is 'normal', 'uniform', 'zeros', 'ids:LOW:HIGH' or 'value:X'."""
    name: str
    source: str            # torchvision | timm | torch.nn | wheel
    origin: str            # where it comes from (package, version, path or constructor)
    inputs: dict
    build: dict = field(default_factory=dict)
    file: str = ""         # where the .onnx is (default: MODELS_DIR/NAME.onnx)

    @property
    def path(self) -> str:
        return self.file or os.path.join(MODELS_DIR, self.name + ".onnx")


def _img(n=224, c=3, name="input"):
    return {name: ([1, c, n, n], "float32", "normal")}


# --- torchvision / timm (exported in the export venv) ------------------------------------

TORCHVISION = [
    # name, constructor, kwargs, input size
    ("mobilenet_v2", "mobilenet_v2", {}, 224),
    ("mobilenet_v3_small", "mobilenet_v3_small", {}, 224),
    ("mobilenet_v3_large", "mobilenet_v3_large", {}, 224),
    ("efficientnet_b0", "efficientnet_b0", {}, 224),
    ("regnet_y_400mf", "regnet_y_400mf", {}, 224),
    ("regnet_x_400mf", "regnet_x_400mf", {}, 224),
    ("convnext_tiny", "convnext_tiny", {}, 224),
    ("resnext50_32x4d", "resnext50_32x4d", {}, 224),
    ("shufflenet_v2_x1_0", "shufflenet_v2_x1_0", {}, 224),
    ("squeezenet1_1", "squeezenet1_1", {}, 224),
    ("densenet121", "densenet121", {}, 224),
    ("mnasnet1_0", "mnasnet1_0", {}, 224),
    ("googlenet", "googlenet", {"aux_logits": False, "init_weights": True}, 224),
    ("swin_t", "swin_t", {}, 224),
    ("ssdlite320_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large",
     {"weights_backbone": None}, 320),
    ("deeplabv3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large",
     {"weights_backbone": None, "aux_loss": False}, 256),
    ("lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large", {"weights_backbone": None}, 256),
]

TIMM = [
    ("vit_tiny_patch16_224", 224),
    ("deit_tiny_distilled_patch16_224", 224),
    ("mobilevit_xxs", 256),
    ("ghostnet_100", 224),
    ("convnext_atto", 224),
]

# --- small torch.nn models (the project's own torch is enough) ----------------------------

TORCH_NN = {
    "bert_like": {"input_ids": ([1, 32], "int64", "ids:0:1000")},
    "lstm": {"features": ([1, 50, 40], "float32", "normal")},
    "gru_state": {"features": ([1, 20, 40], "float32", "normal"),
                  "state": ([1, 1, 64], "float32", "zeros")},
}

# --- ONNX models shipped inside PyPI wheels ------------------------------------------------

WHEEL_MODELS = [
    # name, package==version, member path in the wheel, inputs
    ("rapidocr_det", "rapidocr-onnxruntime==1.4.4",
     "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     {"x": ([1, 3, 320, 320], "float32", "normal")}),
    ("rapidocr_rec", "rapidocr-onnxruntime==1.4.4",
     "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     {"x": ([1, 3, 48, 320], "float32", "normal")}),
    ("rapidocr_cls", "rapidocr-onnxruntime==1.4.4",
     "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     {"x": ([1, 3, 48, 192], "float32", "normal")}),
    ("silero_vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
     {"input": ([1, 512], "float32", "normal"), "state": ([2, 1, 128], "float32", "zeros"),
      "sr": ([], "int64", "value:16000")}),
    ("silero_vad_lstm", "silero-vad==6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx",
     {"input": ([1, 576], "float32", "normal"), "state": ([2, 1, 128], "float32", "zeros")}),
    ("nudenet_320n", "nudenet==3.4.2", "nudenet/320n.onnx",
     {"images": ([1, 3, 320, 320], "float32", "uniform")}),
    ("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
     {"bytes": ([1, 2048], "int32", "ids:0:257")}),
    ("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
     {"images": ([1, 3, 416, 416], "float32", "uniform")}),
    ("ddddocr_ocr", "ddddocr==1.6.1", "ddddocr/common.onnx",
     {"input1": ([1, 1, 64, 128], "float32", "normal")}),
    ("ddddocr_ocr_int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
     {"input1": ([1, 1, 64, 128], "float32", "normal")}),
]


def corpus() -> list:
    out = []
    for name, ctor, kwargs, size in TORCHVISION:
        out.append(Model(name, "torchvision",
                         f"torchvision 0.29.1 models.{ctor}(weights=None), seed 0", _img(size),
                         {"ctor": ctor, "kwargs": kwargs, "size": size}))
    for name, size in TIMM:
        out.append(Model(name, "timm", f"timm 1.0.31 create_model('{name}'), seed 0",
                         _img(size), {"size": size}))
    for name, inputs in TORCH_NN.items():
        out.append(Model(name, "torch.nn", f"torch.nn ({_TORCH_NN_DOC[name]}), seed 0", inputs))
    for name, pkg, member, inputs in WHEEL_MODELS:
        out.append(Model(name, "wheel", f"{pkg}: {member}", inputs,
                         {"package": pkg, "member": member}))
    return out


_TORCH_NN_DOC = {
    "bert_like": "Embedding + 2-layer TransformerEncoder d=128 h=4 + classifier",
    "lstm": "2-layer LSTM 40->64 + Linear on the last step",
    "gru_state": "GRU 40->64 with an initial-state input, returns outputs and state",
}


# =========================================================================================
# building (export venv for torchvision/timm; any torch for the torch.nn models)
# =========================================================================================

def _randomize_bn(module, example, seed: int = 0) -> None:
    """Random BN affine terms, then BN statistics measured on random inputs shaped like
    ``example`` (train-mode passes, cumulative average), as training would leave them.
    With the constructors' defaults (mean 0, var 1) or made-up statistics, the activations
    of a deep random network drift off scale and its output hardly depends on its input,
    so no lossy pass could be told from another by its output error."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    with torch.no_grad():
        for m in bns:
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.reset_running_stats()
            m.momentum = None
        module.train()
        for _ in range(2):
            module(torch.randn((8,) + tuple(example.shape[1:]), generator=gen))
    module.eval()


def _export(module, args, path, input_names, output_names, dynamic_axes) -> None:
    import torch
    module.eval()
    tmp = path + ".tmp"
    # Grad mode stays on: under no_grad TransformerEncoderLayer takes its fused fast path
    # (aten::_transformer_encoder_layer_fwd), which has no ONNX export.
    torch.onnx.export(module, args, tmp, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
    os.replace(tmp, path)


def torch_nn_module(name: str):
    """(module, example args, input names, output names, dynamic axes) of a torch.nn model."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    if name == "bert_like":
        class BertLike(nn.Module):
            def __init__(self, vocab=1000, d=128, heads=4, layers=2, max_len=128):
                super().__init__()
                self.tok = nn.Embedding(vocab, d)
                self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.02)
                layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0,
                                                   activation="gelu", batch_first=True)
                self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
                self.norm = nn.LayerNorm(d)
                self.cls = nn.Linear(d, 2)

            def forward(self, input_ids):
                x = self.tok(input_ids) + self.pos[:, :input_ids.shape[1]]
                h = self.norm(self.encoder(x))
                return self.cls(h[:, 0]), h

        return (BertLike(), (torch.randint(0, 1000, (1, 32)),), ["input_ids"],
                ["logits", "hidden"],
                {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"},
                 "hidden": {0: "batch", 1: "seq"}})
    if name == "lstm":
        class LstmNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(40, 64, num_layers=2, batch_first=True)
                self.fc = nn.Linear(64, 10)

            def forward(self, features):
                y, _ = self.rnn(features)
                return self.fc(y[:, -1])

        return (LstmNet(), (torch.randn(1, 50, 40),), ["features"], ["logits"],
                {"features": {0: "batch", 1: "time"}, "logits": {0: "batch"}})
    if name == "gru_state":
        class GruState(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.GRU(40, 64, batch_first=True)
                self.fc = nn.Linear(64, 8)

            def forward(self, features, state):
                y, state_out = self.rnn(features, state)
                return self.fc(y), state_out

        return (GruState(), (torch.randn(1, 20, 40), torch.zeros(1, 1, 64)),
                ["features", "state"], ["scores", "state_out"],
                {"features": {0: "batch", 1: "time"}, "state": {1: "batch"},
                 "scores": {0: "batch", 1: "time"}, "state_out": {1: "batch"}})
    raise KeyError(name)


def export_torch_nn(name: str, path: str) -> None:
    module, args, ins, outs, dyn = torch_nn_module(name)
    _export(module, args, path, ins, outs, dyn)


def _export_torchvision(model: Model) -> None:
    import torch
    import torchvision
    torch.manual_seed(0)
    b = model.build
    net = torchvision.models.get_model(b["ctor"], weights=None, **b["kwargs"])
    x = torch.randn(1, 3, b["size"], b["size"])
    if model.name.startswith("ssdlite"):
        # The raw head (box regression, class logits): NMS and box decoding are
        # post-processing that deployments run outside the network.
        class Head(torch.nn.Module):
            def __init__(self, det):
                super().__init__()
                self.det = det

            def forward(self, x):
                feats = list(self.det.backbone(x).values())
                out = self.det.head(feats)
                return out["bbox_regression"], out["cls_logits"]

        head = Head(net)
        _randomize_bn(head, x)
        _export(head, (x,), model.path, ["input"], ["boxes", "logits"],
                {"input": {0: "batch"}, "boxes": {0: "batch"}, "logits": {0: "batch"}})
        return
    if b["ctor"].startswith(("deeplab", "lraspp")):
        class Seg(torch.nn.Module):
            def __init__(self, seg):
                super().__init__()
                self.seg = seg

            def forward(self, x):
                return self.seg(x)["out"]

        net = Seg(net)
    _randomize_bn(net, x)
    _export(net, (x,), model.path, ["input"], ["output"],
            {"input": {0: "batch"}, "output": {0: "batch"}})


def _export_timm(model: Model) -> None:
    import timm
    import torch
    torch.manual_seed(0)
    net = timm.create_model(model.name, pretrained=False)
    x = torch.randn(1, 3, model.build["size"], model.build["size"])
    _randomize_bn(net, x)
    _export(net, (x,), model.path, ["input"], ["output"],
            {"input": {0: "batch"}, "output": {0: "batch"}})


def _extract_wheel(model: Model, log) -> None:
    pkg = model.build["package"]
    name, version = pkg.split("==")
    os.makedirs(WHEELS_DIR, exist_ok=True)
    stem = name.replace("-", "_").lower() + "-" + version + "-"
    wheels = [f for f in os.listdir(WHEELS_DIR) if f.lower().startswith(stem)]
    if not wheels:
        log(f"  pip download --no-deps {pkg}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "-d", WHEELS_DIR, pkg], check=True)
        wheels = [f for f in os.listdir(WHEELS_DIR) if f.lower().startswith(stem)]
    with zipfile.ZipFile(os.path.join(WHEELS_DIR, wheels[0])) as zf:
        data = zf.read(model.build["member"])
    tmp = model.path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, model.path)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _ensure_export_venv(log) -> str:
    py = os.path.join(EXPORT_VENV, "bin", "python")
    if not os.path.exists(py):
        log(f"creating the export venv {EXPORT_VENV} (torch 2.14.1 + torchvision 0.29.1, ~5.5 GB)")
        subprocess.run([sys.executable, "-m", "venv", EXPORT_VENV], check=True)
    probe = subprocess.run([py, "-c", "import torch, torchvision, timm, onnx"],
                           capture_output=True)
    if probe.returncode != 0:
        subprocess.run([py, "-m", "pip", "install", "-q", *EXPORT_PACKAGES], check=True)
    return py


def build(names=None, force=False, log=print) -> int:
    """Make every missing corpus model; torchvision/timm ones in the export venv."""
    os.makedirs(MODELS_DIR, exist_ok=True)
    todo = [m for m in corpus() if (names is None or m.name in names)
            and (force or not os.path.exists(m.path))]
    failed = 0
    for m in todo:
        if m.source == "wheel":
            _extract_wheel(m, log)
            log(f"  {m.name}: extracted from {m.origin}")
        elif m.source == "torch.nn" and _has_torch():
            export_torch_nn(m.name, m.path)
            log(f"  {m.name}: exported")
    vision = [m.name for m in todo if m.source != "wheel" and not os.path.exists(m.path)]
    if vision:
        py = _ensure_export_venv(log)
        for name in vision:
            start = time.time()
            proc = subprocess.run([py, os.path.abspath(__file__), "--export-one", name],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                failed += 1
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                log(f"  {name}: export FAILED: {last}")
            else:
                log(f"  {name}: exported in {time.time() - start:.0f} s")
    return failed


def _export_one(name: str) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    model = {m.name: m for m in corpus()}[name]
    os.makedirs(MODELS_DIR, exist_ok=True)
    if model.source == "torchvision":
        _export_torchvision(model)
    elif model.source == "timm":
        _export_timm(model)
    else:
        export_torch_nn(name, model.path)


# =========================================================================================
# running
# =========================================================================================

def make_inputs(spec: dict, seed: int = 0) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype, kind) in spec.items():
        if kind == "normal":
            a = rng.standard_normal(shape)
        elif kind == "uniform":
            a = rng.random(shape)
        elif kind == "zeros":
            a = np.zeros(shape)
        elif kind.startswith("ids:"):
            lo, hi = (int(v) for v in kind.split(":")[1:])
            a = rng.integers(lo, hi, size=shape)
        elif kind.startswith("value:"):
            a = np.full(shape, float(kind.split(":")[1]))
        else:
            raise ValueError(f"unknown input kind {kind!r}")
        feeds[name] = np.asarray(a).astype(dtype)
    return feeds


SAMPLES = 4


def sample_inputs(model: Model) -> list:
    """The seeded inputs every run is checked on (one feed dict per sample, batch 1)."""
    return [make_inputs(model.inputs, seed) for seed in range(SAMPLES)]


def _ort_run(path: str, samples: list) -> list:
    """Per sample, the list of outputs of the model at ``path`` in ONNX Runtime."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {n: feeds[n] for n in names}) for feeds in samples]


def _stack(per_sample: list) -> list:
    """Per output, the samples' values stacked on a new axis 0."""
    import numpy as np
    return [np.stack([np.asarray(s[i], np.float64) for s in per_sample])
            for i in range(len(per_sample[0]))]


def rel_error(ref: list, out: list) -> float:
    """Max |a-b| / max |a| over outputs, for lists (per sample) of output lists."""
    import numpy as np
    worst = 0.0
    if any(len(r) != len(o) for r, o in zip(ref, out)) or len(ref) != len(out):
        return float("inf")
    if any(np.shape(a) != np.shape(b) for r, o in zip(ref, out) for a, b in zip(r, o)):
        return float("inf")
    for a, b in zip(_stack(ref), _stack(out)):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.size == 0:
            continue
        scale = max(float(np.max(np.abs(a))), 1e-12)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def cosine(ref: list, out: list, centered: bool = False) -> float:
    """Smallest per-output cosine similarity over all samples (lists per sample of output
    lists). ``centered`` first subtracts the reference outputs' mean over the samples from
    both: what is left is the part of the outputs that depends on the input, and a
    network with random weights often has little else (its raw cosine is ~1 whatever a
    pass does)."""
    import numpy as np
    worst = 1.0
    if any(np.shape(a) != np.shape(b) for r, o in zip(ref, out) for a, b in zip(r, o)):
        return float("nan")
    for a, b in zip(_stack(ref), _stack(out)):
        if centered:
            mean = a.mean(axis=0, keepdims=True)
            a, b = a - mean, b - mean
        a, b = a.ravel(), b.ravel()
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 and nb == 0:
            continue
        worst = min(worst, float(a @ b / max(na * nb, 1e-30)))
    return worst


def onnxc_cli() -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "onnxc")
    if not os.path.exists(exe):
        exe = shutil.which("onnxc") or ""
    if not exe:
        raise SystemExit("corpus: the onnxc CLI is not installed next to this Python")
    return [exe]


def _cli_supports(flag: str) -> bool:
    proc = subprocess.run(onnxc_cli() + ["compress", "--help"], capture_output=True, text=True)
    return flag in proc.stdout


def _dynamic_inputs(path: str) -> dict:
    """name -> True when any dim of a graph input is not a fixed positive number."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        out[i.name] = any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims)
    return out


def _declared_dims(path: str) -> dict:
    """name -> declared dims of each graph input (None where not a fixed number)."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def _names_in_model(path: str) -> set:
    import onnx
    m = onnx.load(path, load_external_data=False)
    names = {v.name for v in list(m.graph.input) + list(m.graph.output)}
    for n in m.graph.node:
        if n.name:
            names.add(n.name)
        names.add(n.op_type)
        names.update(o for o in n.output if o)
    return names


def run_one(model: Model, ps: PassSet, workdir: str, timeout: float,
            ref_outputs=None, input_data: bool = False, static_shapes: bool = False,
            cli: list | None = None) -> dict:
    """One ``onnxc compress`` run and the independent check of its artifact.

    Dynamic input dims are fixed with ``--input-shape`` (to the corpus input shapes) for
    targets other than onnx, or for every target with ``static_shapes``."""
    import numpy as np
    import onnx
    res = {"model": model.name, "set": ps.label, "status": "", "seconds": 0.0, "rel": None,
           "cosine": None, "reason": "", "skipped": 0, "notes": []}
    out_dir = os.path.join(workdir, f"{model.name}-{ps.label}")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = (cli or onnxc_cli()) + ["compress", model.path, "--passes", ps.passes, "--target", ps.target,
                         "-o", out_dir, "--quiet"]
    dynamic = _dynamic_inputs(model.path)
    if ps.target != "onnx" or static_shapes:
        for name, (shape, _, _) in model.inputs.items():
            if dynamic.get(name):
                cmd += ["--input-shape", f"{name}:{','.join(str(d) for d in shape)}"]
    samples = sample_inputs(model)
    feeds = samples[0]
    if input_data:
        # onnxc --input-data: values as they are, the samples along each input's batch
        # axis (its first unknown dim that is 1 here); an input without one (a scalar
        # sample rate, a fully static input) is one value for every sample.
        declared = _declared_dims(model.path)
        for name, value in feeds.items():
            dims = declared.get(name, [])
            axis = next((i for i, (d, n) in enumerate(zip(dims, value.shape))
                         if d is None and n == 1), None)
            if axis is not None:
                value = np.concatenate([s[name] for s in samples], axis=axis)
            f = os.path.join(workdir, f"{model.name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy")
            np.save(f, value)
            cmd += ["--input-data", f"{name}={f}"]
    res["command"] = " ".join(cmd[1:])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        res.update(status="timeout", seconds=time.perf_counter() - start,
                   reason=f"no result within {timeout:.0f} s")
        return res
    res["seconds"] = time.perf_counter() - start
    if proc.returncode < 0:
        # A signal from outside (on a shared machine, the kernel's OOM killer): no verdict
        # on onnxc, but not a pass either; the run is worth repeating on a quieter machine.
        res.update(status="killed", reason=f"killed by signal {-proc.returncode}"
                   + (" (SIGKILL: out of memory?)" if proc.returncode == -9 else ""))
        return res
    errors = [ln for ln in stderr.splitlines() if ln.startswith("onnxc: error")]
    if "Traceback (most recent call last)" in stderr:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
        res.update(status="wrong", reason="traceback: " + (tail[0] if tail else "?"))
        return res
    if proc.returncode != 0:
        reason = errors[-1][len("onnxc: error:"):].strip() if errors else \
            (stderr.strip().splitlines() or ["(no message)"])[-1]
        res["reason"] = f"exit {proc.returncode}: {reason}"
        if proc.returncode == 1 or len(errors) != 1:
            res["status"] = "wrong"
            if len(errors) != 1:
                res["reason"] += f" ({len(errors)} error lines)"
            return res
        res["status"] = "refused"
        names = _names_in_model(model.path)
        words = {w.rstrip(":;.") for w in re.findall(r"[\w./:;-]+", reason)}
        res["names_node"] = bool(words & names)
        return res
    artifact = os.path.join(out_dir, "model.onnx")
    try:
        onnx.checker.check_model(artifact)
    except Exception as exc:  # noqa: BLE001 - any checker complaint is a finding
        res.update(status="wrong", reason=f"checker: {str(exc).splitlines()[0][:200]}")
        return res
    try:
        out = _ort_run(artifact, samples)
    except Exception as exc:  # noqa: BLE001 - any ORT complaint is a finding
        res.update(status="wrong", reason=f"ORT: {str(exc).splitlines()[0][:200]}")
        return res
    ref = ref_outputs if ref_outputs is not None else _ort_run(model.path, samples)
    rel = rel_error(ref, out)
    res["rel"] = rel
    res["cosine"] = cosine(ref, out)
    res["ccos"] = cosine(ref, out, centered=True)
    try:
        with open(os.path.join(out_dir, "report.json")) as f:
            report = json.load(f)
        res["skipped"] = sum(len(p.get("skipped") or []) for p in report.get("passes", []))
        skipped = [f"{s.get('node')}: {s.get('reason')}" for p in report.get("passes", [])
                   for s in (p.get("skipped") or [])]
        res["skipped_examples"] = skipped[:3]
        before = (report.get("original") or {}).get("params")
        after = (report.get("final") or {}).get("params")
        if before and after is not None:
            res["params_ratio"] = after / before
        verif = (report.get("runtime") or {}).get("verification")
        if verif and "max_rel" in verif:
            res["tvm_rel"] = verif["max_rel"]
        dyn_in = {k for k, v in dynamic.items() if v}
        if dyn_in and ps.target == "onnx" and not static_shapes:
            kept = _dynamic_inputs(artifact)
            lost = sorted(k for k in dyn_in if not kept.get(k, True))
            if lost:
                res["notes"].append("dynamic dims fixed: " + ",".join(lost))
    except (OSError, ValueError):
        res["notes"].append("no report.json")
    if rel == float("inf"):
        res.update(status="wrong", reason="outputs differ in number or shape from the "
                   "original's: " + _shapes(ref[0]) + " -> " + _shapes(out[0]))
        return res
    if ps.exact and not rel <= EXACT_TOL:
        res.update(status="wrong", reason=f"exact pass changed outputs: max rel {rel:.2e}")
        return res
    res["status"] = "ok"
    return res


def _shapes(outputs: list) -> str:
    import numpy as np
    return ",".join("x".join(map(str, np.shape(o))) or "scalar" for o in outputs)


def run_corpus(models: list, sets: list, timeout: float, x86_timeout: float,
               log=print, results_path: str | None = None, static_shapes: bool = False,
               done: set = frozenset()) -> list:
    """Run every model x pass set not in ``done``; the --target onnx sets of all models
    first, then the compiled targets (slow TVM builds), so a bounded session gets the
    cheap runs of every model."""
    input_data = _cli_supports("--input-data")
    commit = onnxc_head()
    rows = []
    refs, input_cos = {}, {}
    phases = [[s for s in sets if s.target == "onnx"], [s for s in sets if s.target != "onnx"]]
    with tempfile.TemporaryDirectory(prefix="onnxc-corpus-") as work:
        for phase in phases:
            for model in models:
                todo = [ps for ps in phase if (model.name, ps.label) not in done]
                if not todo:
                    continue
                if not os.path.exists(model.path):
                    log(f"{model.name}: not built (python tools/corpus.py --build)")
                    continue
                if model.name not in refs:
                    try:
                        ref = refs[model.name] = _ort_run(model.path, sample_inputs(model))
                        # How much the outputs move between two unrelated inputs: with
                        # random weights some networks barely react to their input, and a
                        # lossy pass's raw cosine means little when this one is ~1 too.
                        input_cos[model.name] = cosine(ref[:1], ref[1:2])
                    except Exception as exc:  # noqa: BLE001 - the corpus entry is broken
                        log(f"{model.name}: the original does not run in ORT on the corpus "
                            f"inputs: {str(exc).splitlines()[0]}")
                        refs[model.name] = None
                if refs[model.name] is None:
                    continue
                for ps in todo:
                    limit = x86_timeout if ps.target != "onnx" else timeout
                    r = run_one(model, ps, work, limit, ref_outputs=refs[model.name],
                                input_data=input_data and any(
                                    k != "normal" for _, _, k in model.inputs.values()),
                                static_shapes=static_shapes)
                    r["commit"] = commit
                    r["input_cos"] = input_cos.get(model.name)
                    rows.append(r)
                    log(_row_line(r))
                    if results_path:
                        with open(results_path, "a") as f:
                            f.write(json.dumps(r) + "\n")
                    shutil.rmtree(os.path.join(work, f"{model.name}-{ps.label}"),
                                  ignore_errors=True)
    return rows


def load_results(path: str) -> list:
    """Rows of a --results file; a later row of the same model and pass set wins."""
    by = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r["status"] == "ok" and r.get("rel") == float("inf"):
                    # rows from before run_one called a changed output shape wrong
                    r.update(status="wrong", reason="outputs differ in number or shape "
                             "from the original's")
                by[(r["model"], r["set"])] = r
    return list(by.values())


def _row_line(r: dict) -> str:
    fig = ""
    if r["status"] == "ok":
        fig = f"rel {r['rel']:.1e}" if _is_exact(r["set"]) else \
            f"cos {r['cosine']:.4f} ccos {r.get('ccos', float('nan')):.3f}"
    extra = f" [{r['reason']}]" if r["reason"] else ""
    notes = f" ({'; '.join(r['notes'])})" if r.get("notes") else ""
    return (f"{r['model']:<32} {r['set']:<8} {r['status']:<8} {fig:<24} "
            f"{r['seconds']:6.1f}s{extra}{notes}")


def _is_exact(label: str) -> bool:
    return next(p.exact for p in PASS_SETS if p.label == label)


def cell(r: dict) -> str:
    if r["status"] == "ok":
        fig = f"{r['rel']:.0e}" if _is_exact(r["set"]) else f"ccos {r.get('ccos', float('nan')):.3f}"
        if r["set"] in ("prune", "lowrank") and r.get("params_ratio") is not None:
            fig += f", params x{r['params_ratio']:.2f}"
        return f"ok {fig}, {r['seconds']:.0f}s"
    return f"**{r['status']}**, {r['seconds']:.0f}s"


def summary(rows: list) -> list:
    n = len(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    tracebacks = sum(r["reason"].startswith("traceback") for r in rows)
    rejected = sum(r["reason"].startswith(("checker", "ORT")) for r in rows)
    exact = [r for r in rows if _is_exact(r["set"]) and r["rel"] is not None]
    exact_bad = [r for r in exact if not r["rel"] <= EXACT_TOL]
    refused = [r for r in rows if r["status"] == "refused"]
    vague = [r for r in refused if not r.get("names_node")]
    wrong = [r for r in rows if r["status"] == "wrong"]
    timeouts = [r for r in rows if r["status"] == "timeout"]
    killed = [r for r in rows if r["status"] == "killed"]
    models = len({r["model"] for r in rows})
    pct = 100.0 * ok / n if n else 0.0
    return [
        f"models {models}, runs {n}: artifact runs in ORT {ok}/{n} ({pct:.1f}%)",
        f"exact passes (fold_bn onnx, fold_bn x86) within {EXACT_TOL:g} relative: "
        f"{len(exact) - len(exact_bad)}/{len(exact)} artifacts",
        f"tracebacks: {tracebacks}",
        f"artifacts the checker or ORT rejects: {rejected}",
        f"refused: {len(refused)} ({len(refused) - len(vague)} one line naming a node, "
        f"{len(vague)} not naming one); wrong: {len(wrong)}; timeouts: {len(timeouts)}"
        + (f"; killed from outside: {len(killed)}" if killed else ""),
    ]


def markdown(rows: list, models: list, sets: list, header: str = "") -> str:
    by = {(r["model"], r["set"]): r for r in rows}
    origin = {m.name: m.origin for m in models}
    lines = [header] if header else []
    lines += ["| model | " + " | ".join(s.label for s in sets) + " | cos(2 inputs) | source |",
              "|---|" + "---|" * len(sets) + "---|---|"]
    for m in models:
        if not any((m.name, s.label) in by for s in sets):
            continue
        cells = [cell(by[(m.name, s.label)]) if (m.name, s.label) in by else "-" for s in sets]
        base = next((by[(m.name, s.label)].get("input_cos") for s in sets
                     if (m.name, s.label) in by and by[(m.name, s.label)].get("input_cos")
                     is not None), None)
        base = f"{base:.3f}" if base is not None else "-"
        lines.append(f"| {m.name} | " + " | ".join(cells) + f" | {base} | {origin[m.name]} |")
    lines += ["", "```"] + summary(rows) + ["```", ""]
    problems = [r for r in rows if r["status"] != "ok"]
    if problems:
        lines += ["Not ok (model, pass set: what onnxc said or what the check found):", ""]
        for r in problems:
            tag = "" if r["status"] != "refused" or r.get("names_node") else " (names no node)"
            lines.append(f"- {r['model']}, {r['set']}: {r['status']}{tag}: "
                         f"{r['reason'].replace('|', '/')}")
        lines.append("")
    notes = [r for r in rows if r.get("notes")]
    if notes:
        lines += ["Notes:", ""]
        lines += [f"- {r['model']}, {r['set']}: {'; '.join(r['notes'])}" for r in notes]
        lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- corpus table: begin -->", "<!-- corpus table: end -->"


def write_doc(path: str, text: str) -> None:
    doc = ""
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN) + len(BEGIN)] + "\n" + text + "\n" + doc[doc.index(END):]
    else:
        doc = doc.rstrip() + f"\n\n{BEGIN}\n{text}\n{END}\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="export/extract missing models")
    p.add_argument("--rebuild", action="store_true", help="export/extract all models again")
    p.add_argument("--list", action="store_true", help="list the corpus and what is built")
    p.add_argument("--models", default="all", help="comma-separated names (default: all)")
    p.add_argument("--sets", default=",".join(s.label for s in PASS_SETS),
                   help="pass sets: " + ", ".join(f"{s.label} ({s.passes} -> {s.target})"
                                                  for s in PASS_SETS))
    p.add_argument("--timeout", type=float, default=300, help="seconds per --target onnx run")
    p.add_argument("--x86-timeout", type=float, default=600, help="seconds per x86 run")
    p.add_argument("--doc", help="write the table into this markdown file (between markers)")
    p.add_argument("--results", help="append one JSON line per run to this file")
    p.add_argument("--resume", action="store_true",
                   help="skip the runs already in --results; the table covers both")
    p.add_argument("--table-only", action="store_true",
                   help="no runs: print/write the table of the runs in --results")
    p.add_argument("--static-shapes", action="store_true",
                   help="pass --input-shape for dynamic inputs on every target, not only "
                        "where the target needs static shapes")
    p.add_argument("--export-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_one:
        _export_one(args.export_one)
        return 0
    every = corpus()
    known = {m.name: m for m in every}
    names = None if args.models == "all" else args.models.split(",")
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}")
    if args.build or args.rebuild:
        return 1 if build(names, force=args.rebuild) else 0
    chosen = every if names is None else [known[n] for n in names]  # in the order given
    if args.list:
        for m in chosen:
            print(f"{m.name:<32} {'built' if os.path.exists(m.path) else 'missing':<8} {m.origin}")
        return 0
    labels = args.sets.split(",")
    sets = [s for s in PASS_SETS if s.label in labels]
    if len(sets) != len(labels):
        p.error(f"unknown pass set in {args.sets!r}")
    if (args.resume or args.table_only) and not args.results:
        p.error("--resume and --table-only need --results FILE")
    old = load_results(args.results) if (args.resume or args.table_only) and \
        os.path.exists(args.results) else []
    chosen_names = {m.name for m in chosen}
    old = [r for r in old if r["model"] in chosen_names and r["set"] in labels]
    rows = [] if args.table_only else run_corpus(
        chosen, sets, args.timeout, args.x86_timeout, results_path=args.results,
        static_shapes=args.static_shapes, done={(r["model"], r["set"]) for r in old})
    rows = old + rows
    print()
    for line in summary(rows):
        print(line)
    if args.doc:
        commits = sorted({r.get("commit", "?") for r in rows})
        header = (f"`python tools/corpus.py` on onnxc commit {', '.join(commits)}, table written "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                  f"{sum(r['seconds'] for r in rows) / 60:.0f} min of runs on a shared "
                  f"2-core machine.")
        write_doc(args.doc, markdown(rows, chosen, sets, header))
    return 0


def onnxc_head() -> str:
    proc = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
