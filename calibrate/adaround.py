"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"), for ``int8 --int8-adaround``.

Round-to-nearest minimises each weight's own error, not the layer's output error. AdaRound
learns, per weight, whether to round down or up: W̃ = s·clip(⌊W/s⌋ + h(V), -q, q) with the
rectified sigmoid h(V) = clip(σ(V)·(ζ−γ)+γ, 0, 1), ζ = 1.1, γ = −0.1, V initialised so that
W̃ = W. Per layer, on the calibration samples, Adam minimises
‖W·x − W̃·x̂‖² + λ·Σ(1 − |2h(V)−1|^β), x the float input of the layer and x̂ that input
fake-quantized with its calibrated (scale, zero point) — the asymmetric reconstruction
of the paper's §5, so the rounding also absorbs the input's quantization error. β
anneals from 20 to 2 after a 20 % warm-up, pushing h to 0 or 1; the codes are
⌊W/s⌋ + [V ≥ 0]. Scales are quantize_weight's own, so the rest of the int8 format
(bias scales, bias correction) is unchanged.

Handled: Conv 1-D/2-D/3-D (explicit pads), Gemm, MatMul with a constant 2-D weight. Other
layers keep round-to-nearest (reported).
"""

from __future__ import annotations

import time

import numpy as np

from onnxc.calibrate import qdq

ZETA, GAMMA = 1.1, -0.1
LAMBDA = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2
BATCH = 32
LR = 3e-2                # a few hundred steps, not the paper's 10k: larger steps
MAX_SAMPLES = 256        # a few hundred images: the paper's 1024 buys little more here
CAPTURE_CHUNK = 8        # layer inputs captured per ORT run (bounds memory)


def _layer_fn(graph, node, torch):
    """(w torch tensor) -> function x -> W·x without bias, or None when unsupported."""
    F = torch.nn.functional
    if node.op == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
        w = graph.constant(node.inputs[1])
        dims = w.ndim - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
        if conv is None:
            return None
        pads = list(node.attrs.get("pads", [0] * 2 * dims))
        stride = list(node.attrs.get("strides", [1] * dims))
        dil = list(node.attrs.get("dilations", [1] * dims))
        group = int(node.attrs.get("group", 1))
        # ONNX pads are [begin..., end...]; F.pad takes (last-dim begin, end, ...).
        torch_pad = []
        for d in reversed(range(dims)):
            torch_pad += [pads[d], pads[d + dims]]

        def fn(x, w):
            return conv(F.pad(x, torch_pad) if any(torch_pad) else x, w, None, stride, 0,
                        dil, group)
        return fn
    if node.op == "Gemm":
        if node.attrs.get("transB", 0):
            return lambda x, w: x.reshape(x.shape[0], -1) @ w.T
        return lambda x, w: x.reshape(x.shape[0], -1) @ w
    if node.op == "MatMul" and graph.constant(node.inputs[1]).ndim == 2:
        return lambda x, w: x @ w
    return None


def _fake_quant(x: np.ndarray, scale: float, zero_point: int, scheme) -> np.ndarray:
    q = np.clip(np.round(x / scale) + zero_point, scheme.qmin, scheme.qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def round_layer(fn, w: np.ndarray, scale: np.ndarray, qmax: int, x: np.ndarray,
                x_hat: np.ndarray, iters: int, seed: int = 0) -> tuple:
    """(codes int8, mse nearest, mse adaround) for one layer: x float inputs, x_hat their
    quantized version; scale broadcast against w."""
    import torch

    # Small problems: one thread avoids the start-up and contention costs that dominated
    # (7x slower with 2 threads on a shared 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _round_layer(torch, fn, w, scale, qmax, x, x_hat, iters, seed)
    finally:
        torch.set_num_threads(threads)


def _round_layer(torch, fn, w, scale, qmax, x, x_hat, iters, seed):

    gen = torch.Generator().manual_seed(seed)
    wt = torch.tensor(w, dtype=torch.float32)
    st = torch.tensor(np.broadcast_to(scale, w.shape).copy(), dtype=torch.float32)
    xt, xht = torch.tensor(x), torch.tensor(x_hat)
    base = torch.floor(wt / st)
    rest = (wt / st - base).clamp(0.01, 0.99)          # h(V0) = rest: W̃ starts at W
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=LR)

    def h(v):
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def w_soft(hv):
        return st * torch.clamp(base + hv, -qmax, qmax)

    with torch.no_grad():
        target = fn(xt, wt)
        nearest = st * torch.clamp(torch.round(wt / st), -qmax, qmax)
        mse_nearest = float(((fn(xht, nearest) - target) ** 2).mean())
    n = xt.shape[0]
    warm = int(WARMUP * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(BATCH, n),), generator=gen)
        hv = h(v)
        # Squared error summed over output channels, averaged over positions (as AIMET).
        rec = ((fn(xht[idx], w_soft(hv)) - target[idx]) ** 2).sum(1).mean()
        if it < warm:
            loss = rec
        else:
            frac = (it - warm) / max(iters - warm, 1)
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 + np.cos(frac * np.pi)) / 2
            reg = (1 - (2 * hv - 1).abs().pow(beta)).sum()
            loss = rec + LAMBDA * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = torch.clamp(base + (v >= 0).float(), -qmax, qmax)
        mse_ada = float(((fn(xht, st * codes) - target) ** 2).mean())
    return codes.numpy().astype(np.int8), mse_nearest, mse_ada


def adaround_codes(graph, layers: list, params: dict, scheme, reduce: bool,
                   per_channel: bool, data, iters: int, ctx, report,
                   int4: set = frozenset(), int4_clip: str = "mse") -> dict:
    """{node name: codes} for each of ``layers`` AdaRound handles, learned on up to
    MAX_SAMPLES of ``data``; a layer whose learned rounding reconstructs its output worse
    than round-to-nearest keeps round-to-nearest. Layers in ``int4`` round to 4-bit
    codes on quantize_weight_int4's scales."""
    import torch

    torch.manual_seed(ctx.seed)
    return _adaround(graph, layers, params, scheme, reduce, per_channel, data, iters, ctx,
                     report, torch, int4, int4_clip)


def _adaround(graph, layers, params, scheme, reduce, per_channel, data, iters, ctx,
              report, torch, int4=frozenset(), int4_clip="mse"):
    from onnxc.execution import Runner, capture_model

    sample = data.take(min(len(data), MAX_SAMPLES))
    qmax = qdq.weight_qmax(reduce)
    start = time.perf_counter()
    chosen, rows = {}, {}
    todo = []
    for node in layers:
        fn = _layer_fn(graph, node, torch)
        if fn is None:
            report.skip(node.name, "AdaRound: layer form not handled, round-to-nearest")
        else:
            todo.append((node, fn))
    for k in range(0, len(todo), CAPTURE_CHUNK):
        chunk = todo[k:k + CAPTURE_CHUNK]
        names = list(dict.fromkeys(n.inputs[0].name for n, _ in chunk))
        captured = dict(zip(names, Runner(capture_model(graph, names)).run(sample.inputs)))
        for node, fn in chunk:
            x = np.asarray(captured[node.inputs[0].name], np.float32)
            p = params.get(node.inputs[0].name)
            x_hat = _fake_quant(x, p[0], p[1], scheme) if p is not None else x
            w = graph.constant(node.inputs[1])
            axis = qdq.weight_axis(graph, node) if per_channel else None
            if node.name in int4:
                q = qdq.INT4_QMAX
                _, scale = qdq.quantize_weight_int4(w, axis, int4_clip)
            else:
                q = qmax
                _, scale = qdq.quantize_weight(w, axis, qmax, scheme.pow2)
            scale = qdq._expand(scale, w.ndim, axis)
            codes, before, after = round_layer(fn, w, scale, q, x, x_hat, iters,
                                               seed=ctx.seed)
            better = after < before
            if better:
                chosen[node.name] = codes
            rows[node.name] = {"mse_nearest": before, "mse_adaround": after,
                               "used": bool(better)}
        del captured
    seconds = time.perf_counter() - start
    gains = [r["mse_nearest"] / max(r["mse_adaround"], 1e-30) for r in rows.values()
             if r["used"]]
    report.extra["adaround"] = {"iterations": iters, "samples": len(sample),
                                "seconds": round(seconds, 2), "layers": rows}
    report.note(f"AdaRound: {len(chosen)} of {len(layers)} layers use learned rounding "
                f"({iters} steps each, {len(sample)} samples, {seconds:.1f} s); layer "
                f"output MSE vs round-to-nearest "
                + (f"÷{np.median(gains):.2f} (median)" if gains else "not improved"))
    return chosen
