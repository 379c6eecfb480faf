"""ternary: TWN weights in {-α, 0, +α} per output channel (2-bit storage).

Δ_c = 0.7·mean|W_c|; a weight survives (±1) when |w| > Δ_c, else 0; α_c is the mean
magnitude of the survivors (Li & Liu, "Ternary Weight Networks", 2016). Conv/Gemm/MatMul
weights except the first and last layer (``--keep-float``). The ONNX model holds int8
codes behind a per-channel DequantizeLinear; ``packed_weights.npz`` holds them at 2 bit.
No recovery here: accuracy drops until the ``recover`` pass fine-tunes.
"""

from __future__ import annotations

from onnxc.calibrate.lowbit import LowBitPass, ternarize
from onnxc.errors import UsageError
from onnxc.pipeline import Option, register_pass


@register_pass
class Ternary(LowBitPass):
    name = "ternary"
    summary = "TWN ternary weights (2-bit packed, α per output channel)"
    conflicts = ("int8", "binary")
    bits = 2
    label = "ternarized"
    options = LowBitPass.options + (
        Option("--ternary-threshold", float, 0.7, "Δ = t·mean|W| per output channel"),
    )

    def validate(self, ctx):
        t = self.config.ternary_threshold
        if not 0 <= t < 10:
            raise UsageError(f"--ternary-threshold {t} must be in [0, 10)")

    def encode(self, w):
        return ternarize(w, self.config.ternary_threshold)
