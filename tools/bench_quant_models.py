"""Quantization on models users bring: prints the figures quoted in docs/quantization.md.

    python tools/bench_quant_models.py

1. An opset-12 model with a broken type annotation (graph output and one value_info
   without a shape, a com.microsoft Gelu tail) through ``onnxc compress --passes int8``
   (per-channel): the artifact's opset, ``onnx.checker`` (full check) and whether ONNX
   Runtime loads it; then the same when the opset upgrade is impossible (per-tensor
   fallback). For comparison ``onnxruntime.quantization.quantize_static`` per-channel on
   the plain opset-12 model.
2. Transformers (built with onnx.helper: a 2-block BERT-like encoder on [B, T, C]
   embeddings, and a ViT-like classifier on 32x32 images; and torch.nn.TransformerEncoder,
   2 layers, exported with torch.onnx): int8 output cosine vs fp32 on
   random inputs (seed unlike the calibration's), random calibration, for static QDQ,
   ``--int8-act-matmul dynamic`` and ``--int8-mode dynamic``; also on inputs 3x the
   calibrated scale.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _validity(model) -> str:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        checker = "ok"
    except Exception as exc:  # noqa: BLE001  reported, not raised
        checker = f"FAILS ({str(exc).splitlines()[0][:80]})"
    try:
        _session(model)
        runtime = "loads"
    except Exception as exc:  # noqa: BLE001
        runtime = f"REFUSES ({str(exc).splitlines()[0][:90]})"
    return f"checker {checker}; ONNX Runtime {runtime}"


def _dq_axes(model) -> str:
    inits = {i.name for i in model.graph.initializer}
    axes = [next((a.i for a in n.attribute if a.name == "axis"), None)
            for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    per_channel = sum(a is not None for a in axes)
    return f"{per_channel}/{len(axes)} weight DequantizeLinear per-channel"


def opset_section() -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from onnxc import frontend
    from onnxc.compress import compress
    from quant_helpers import dataset, residual_cnn
    from test_models_opset_domains import _opset12_with_broken_annotations

    print("== opset-12 model, per-channel int8 ==")
    data = dataset(residual_cnn(opset=12), 32)
    res = compress(_opset12_with_broken_annotations(), ["int8"], calibration=data,
                   log=lambda m: None)
    out = res.graph.to_onnx()
    print(f"onnxc int8 (broken value_info, upgrade works): opset {res.graph.opset}, "
          f"{_dq_axes(out)}; {_validity(out)}")
    print("  frontend notes: " + " | ".join(res.report["frontend_notes"]))

    real = frontend._convert
    frontend._convert = lambda *a: (_ for _ in ()).throw(RuntimeError("no adapter"))
    try:
        res = compress(residual_cnn(opset=12), ["int8"], calibration=data, log=lambda m: None)
    finally:
        frontend._convert = real
    out = res.graph.to_onnx()
    print(f"onnxc int8 (upgrade impossible): opset {res.graph.opset}, {_dq_axes(out)}; "
          f"{_validity(out)}; top-1 agreement {res.report['passes'][-1]['error']['top1_agreement']}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": data.inputs["x"][i:i + 1]} for i in range(32)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = f"{tmp}/f.onnx", f"{tmp}/q.onnx"
        onnx.save(residual_cnn(opset=12), src)
        try:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
            ort_model = onnx.load(dst)
            print(f"ORT quantize_static per_channel=True: opset "
                  f"{ort_model.opset_import[0].version}, {_dq_axes(ort_model)}; "
                  f"{_validity(ort_model)}")
        except Exception as exc:  # noqa: BLE001
            print(f"ORT quantize_static per_channel=True: raises "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")


def transformer_section() -> None:
    from onnxc.compress import compress
    from transformer_nets import cosine, encoder, vit

    import torch

    from onnxc import frontend

    print("== transformer int8: output cosine vs fp32 (random inputs, random calibration) ==")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    torch_encoder = frontend.from_torch(
        torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        torch.randn(2, 16, 64), input_names=["x"])
    cases = [("encoder 2 blocks [B,16,64]", encoder(blocks=2), (8, 16, 64)),
             ("torch TransformerEncoder x2", torch_encoder, (8, 16, 64)),
             ("ViT-like 32x32, 16 patches", vit(), (8, 3, 32, 32))]
    modes = [("static QDQ", {}), ("--int8-act-matmul dynamic", {"int8_act_matmul": "dynamic"}),
             ("--int8-mode dynamic", {"int8_mode": "dynamic"})]
    for label, model, shape in cases:
        fp32 = _session(model)
        for mode, options in modes:
            res = compress(model, ["int8"], options=options, log=lambda m: None)
            q = _session(res.graph.to_onnx())
            cos = []
            for scale in (1.0, 3.0):
                x = (np.random.default_rng(2024).standard_normal(shape) * scale).astype(np.float32)
                cos.append(cosine(fp32.run(None, {"x": x})[0], q.run(None, {"x": x})[0]))
            print(f"{label:28s} {mode:27s} cosine {cos[0]:.4f} (inputs x3: {cos[1]:.4f}), "
                  f"{res.report['passes'][-1]['changed']} nodes quantized")


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")
    opset_section()
    transformer_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
