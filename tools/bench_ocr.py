"""int8 on a real CTC text recogniser: does the decoded text survive quantization?

The model is PP-OCRv4's recogniser as shipped in the PyPI wheel ``rapidocr-onnxruntime``
1.4.4 (``models/ch_PP-OCRv4_rec_infer.onnx``, 6623-character dictionary in the model's
metadata). Text lines are rendered with PIL in DejaVu Sans (shipped by matplotlib),
preprocessed like rapidocr (height 48, ``(x/255 − 0.5)/0.5``, zero padding to width
320), split into disjoint calibration and test lines, and decoded greedily (CTC: argmax,
collapse repeats, drop the blank). For each variant the share of test lines whose text
equals fp32's is printed, with the compression ratio, the file size, the share of the
fp32 model's MACs (one 48 × 320 line) that run on int8 inputs and weights (nodes whose
activation and weight inputs come through DequantizeLinear), and the nodes kept float:

    python -m tools.bench_ocr [--wheel PATH] [--lines 200] [--calib 64]

Variants: ONNX Runtime's ``quantize_static`` (QDQ, per-channel, defaults otherwise),
``onnxc compress --passes int8`` plain, with the mse calibrator, and with float fallback
(``--int8-calibrator mse --max-drop 0.5`` on the per-position argmax agreement with fp32
on the calibration lines, no labels needed; candidates are weighted layers grouped with
the activation-only ops they feed, ranked by sensitivity per MAC). The wheel is taken from
``--wheel``, ``~/.cache/onnxc-corpus/wheels`` or downloaded once with
``pip download --no-deps`` into ``~/.cache/onnxc-ocr``; the model is never committed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

WHEEL_SPEC = "rapidocr-onnxruntime==1.4.4"
WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
MODEL_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
CACHE_DIRS = (Path.home() / ".cache/onnxc-corpus/wheels", Path.home() / ".cache/onnxc-ocr")
HEIGHT, WIDTH = 48, 320


# ---- model ------------------------------------------------------------------------------

def find_wheel(path: str | None = None, download: bool = True) -> Path | None:
    """The rapidocr wheel: ``path``, else a cached copy, else ``pip download`` (if allowed)."""
    if path:
        return Path(path)
    for d in CACHE_DIRS:
        hits = sorted(glob.glob(str(d / WHEEL_GLOB)))
        if hits:
            return Path(hits[-1])
    if not download:
        return None
    dest = CACHE_DIRS[-1]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(dest), WHEEL_SPEC], check=True)
    hits = sorted(glob.glob(str(dest / WHEEL_GLOB)))
    return Path(hits[-1]) if hits else None


def load_model(wheel: Path):
    """(model bytes, characters) — characters[0] is the CTC blank, like rapidocr's decoder:
    blank + the metadata's dictionary + a trailing space."""
    import onnx

    with zipfile.ZipFile(wheel) as z:
        data = z.read(MODEL_MEMBER)
    model = onnx.load_from_string(data)
    meta = {p.key: p.value for p in model.metadata_props}
    return data, ["<blank>"] + meta["character"].splitlines() + [" "]


# ---- text lines -------------------------------------------------------------------------

def font_path() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__),
                        "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")


WORDS = ("invoice total amount date number account order price street city road name "
         "phone email page report table figure section model value result speed delivery "
         "customer payment balance receipt station north south center market office").split()


def random_text(rng, ascii_chars: list) -> str:
    """Words, numbers, dates, prices and random dictionary characters, 3–14 characters."""
    kind = rng.integers(6)
    if kind == 0:                                       # words
        text = " ".join(rng.choice(WORDS, rng.integers(1, 3)))
    elif kind == 1:                                     # capitalised word + number
        text = f"{rng.choice(WORDS).capitalize()} {rng.integers(1, 99999)}"
    elif kind == 2:                                     # date / time
        text = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    elif kind == 3:                                     # price
        text = f"${rng.integers(0, 9999)}.{rng.integers(0, 100):02d}"
    elif kind == 4:                                     # digits
        text = "".join(str(d) for d in rng.integers(0, 10, rng.integers(4, 12)))
    else:                                               # random dictionary characters
        text = "".join(rng.choice(ascii_chars, rng.integers(3, 11)))
    return text[:14]


def render_line(text: str, rng, font_file: str) -> np.ndarray:
    """H × W × 3 uint8 image of one text line: random size, contrast, margin and noise."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_file, int(rng.integers(20, 41)))
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    bg, fg = int(rng.integers(180, 256)), int(rng.integers(0, 90))
    img = Image.new("L", (x1 - x0 + 2 * mx, y1 - y0 + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=fg)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 12), arr.shape)      # sensor noise
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2)


def preprocess(img: np.ndarray) -> np.ndarray:
    """rapidocr's resize_norm_img at the fixed 48 × 320 shape: 3 × 48 × 320 float32."""
    from PIL import Image

    h, w = img.shape[:2]
    resized_w = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((resized_w, HEIGHT), Image.BILINEAR),
                         dtype=np.float32)
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def make_lines(n: int, characters: list, seed: int = 0):
    """(texts, N × 3 × 48 × 320 float32) of ``n`` rendered, preprocessed lines."""
    rng = np.random.default_rng(seed)
    ascii_chars = [c for c in characters[1:] if len(c) == 1 and c.isascii() and c.isprintable()
                   and c != " "]
    font_file = font_path()
    texts = [random_text(rng, ascii_chars) for _ in range(n)]
    images = np.stack([preprocess(render_line(t, rng, font_file)) for t in texts])
    return texts, images


# ---- decoding ---------------------------------------------------------------------------

def ctc_greedy(probs: np.ndarray, characters: list, blank: int = 0) -> list:
    """Greedy CTC decoding of N × T × C scores: argmax, collapse repeats, drop blanks."""
    best = probs.argmax(axis=2)
    texts = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        texts.append("".join(characters[i] for i in row[keep]))
    return texts


def agreement(a: list, b: list) -> float:
    """Share (%) of positions where the two lists of decoded texts are equal."""
    return 100.0 * sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


# ---- variants ---------------------------------------------------------------------------

def session(model, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model),
                                so, providers=["CPUExecutionProvider"])


def run(model, images: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def ort_quantize_static(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """ONNX Runtime's quantize_static: QDQ, per-channel weights, default settings else."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    import onnx
    from onnx import version_converter

    # Per-channel DequantizeLinear needs opset 13 (the model is 12; ORT does not upgrade).
    opset13 = out.with_name("ort_opset13.onnx")
    onnx.save(version_converter.convert_version(onnx.load(str(fp32)), 13), str(opset13))
    fp32 = opset13
    pre = out.with_name("ort_pre.onnx")
    # What ORT's docs ask for first; its symbolic shape inference gives up on this
    # model's dynamic height/width, the ONNX shape inference and optimisation still run.
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    return out


def onnxc_int8(fp32: Path, calib_npy: Path, out: Path, extra: list) -> dict:
    """``onnxc compress --passes int8`` with the calibration lines; returns report.json."""
    cmd = [sys.executable, "-m", "onnxc.cli", "compress", str(fp32), "--passes", "int8",
           "--input-data", f"x={calib_npy}", "-o", str(out), "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"onnxc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads((out / "report.json").read_text())


def float_layers(report: dict) -> list:
    """Nodes the int8 pass left in float by choice (mixed-precision fallback: weighted
    layers and activation-only ops)."""
    for p in report.get("passes", []):
        if p.get("name") == "int8":
            mp = p.get("extra", {}).get("mixed_precision", {})
            return mp.get("fallback_nodes", mp.get("fallback", []))
    return []


def layer_macs(data: bytes) -> dict:
    """{node name: multiply-accumulates} of the fp32 model on one 48 × 320 line."""
    from onnxc import frontend
    from onnxc.ir import node_macs

    graph = frontend.load(data, {"x": [1, 3, HEIGHT, WIDTH]})
    return {n.name: node_macs(n) for n in graph.nodes if node_macs(n)}


def int8_macs_share(model_path: Path, macs: dict) -> float:
    """Share (%) of the fp32 model's MACs that run on int8 data in ``model_path``: nodes
    (by name) whose activation and weight (or both activation) inputs come through a
    DequantizeLinear — what ONNX Runtime fuses into QLinearConv / QLinearMatMul."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8 = sum(macs.get(n.name, 0) for n in model.graph.node
               if len(n.input) >= 2 and n.input[0] in dq and n.input[1] in dq)
    return 100.0 * int8 / max(sum(macs.values()), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", help="rapidocr_onnxruntime-1.4.4 wheel (default: cache or pip)")
    ap.add_argument("--lines", type=int, default=200, help="rendered text lines in all")
    ap.add_argument("--calib", type=int, default=64, help="of which calibration lines")
    ap.add_argument("--max-drop", type=float, default=0.5,
                    help="fallback variant: argmax-agreement budget in points")
    ap.add_argument("--fallback-calibrator", default="mse",
                    help="fallback variant: --int8-calibrator (default mse)")
    ap.add_argument("--skip-fallback", action="store_true",
                    help="leave out the --max-drop variant (its 47 per-group sensitivity "
                         "runs take ~12 min on a shared 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="directory to keep the built models in")
    args = ap.parse_args(argv)
    if not 0 < args.calib < args.lines:
        ap.error("--calib must be between 0 and --lines")

    wheel = find_wheel(args.wheel)
    data, characters = load_model(wheel)
    texts, images = make_lines(args.lines, characters, args.seed)
    calib, test = images[:args.calib], images[args.calib:]
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_ocr_"))
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "rec_fp32.onnx"
    fp32.write_bytes(data)
    calib_npy = work / "calib_x.npy"
    np.save(calib_npy, calib)

    ref = ctc_greedy(run(data, test), characters)
    print(f"model {MODEL_MEMBER} from {wheel.name}: {len(data) / 1e6:.2f} MB; "
          f"{args.calib} calibration + {len(test)} test lines (disjoint), "
          f"fp32 reads {agreement(ref, texts[args.calib:]):.1f}% of test lines exactly")

    rows = []
    macs = layer_macs(data)

    def add(name, path, kept, seconds):
        out = ctc_greedy(run(str(path), test), characters)
        size = path.stat().st_size
        rows.append((name, agreement(ref, out), len(data) / size, size / 1e6,
                     int8_macs_share(path, macs), kept, seconds))
        print(f"  {name}: {rows[-1][1]:.1f}% ({seconds:.0f} s)", flush=True)

    t = time.time()
    path = ort_quantize_static(fp32, calib, work / "ort_qdq.onnx")
    add("ORT quantize_static (QDQ, per-channel)", path, "-", time.time() - t)
    t = time.time()
    rep = onnxc_int8(fp32, calib_npy, work / "onnxc_int8", [])
    add("onnxc int8", work / "onnxc_int8" / "model.onnx", len(float_layers(rep)),
        time.time() - t)
    t = time.time()
    rep = onnxc_int8(fp32, calib_npy, work / "onnxc_int8_mse", ["--int8-calibrator", "mse"])
    add("onnxc int8 --int8-calibrator mse", work / "onnxc_int8_mse" / "model.onnx",
        len(float_layers(rep)), time.time() - t)
    if args.skip_fallback:
        return table(rows)
    t = time.time()
    rep = onnxc_int8(fp32, calib_npy, work / "onnxc_int8_fallback",
                     ["--max-drop", str(args.max_drop),
                      "--int8-calibrator", args.fallback_calibrator])
    add(f"onnxc int8 --int8-calibrator {args.fallback_calibrator} --max-drop "
        f"{args.max_drop} (fallback)",
        work / "onnxc_int8_fallback" / "model.onnx", len(float_layers(rep)),
        time.time() - t)

    return table(rows)


def table(rows) -> int:
    print("\n| variant | test lines decoded = fp32 | Cr | MB | MACs int8 | "
          "nodes kept float | time |")
    print("|---|---|---|---|---|---|---|")
    for name, agree, cr, mb, share, kept, sec in rows:
        print(f"| {name} | {agree:.1f}% | {cr:.2f}x | {mb:.2f} | {share:.1f}% | {kept} | "
              f"{sec:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
