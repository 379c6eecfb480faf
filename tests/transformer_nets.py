"""Small transformer models built with onnx.helper for the quantization tests: a pre-norm
encoder block on token embeddings [B, T, C] (what torch.nn.TransformerEncoderLayer exports:
Q/K/V projections, heads by Reshape/Transpose, QK^T, Softmax, AV, output projection, MLP)
and a ViT-like classifier (Conv patch embedding, the same block, mean pool, Gemm head)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def weight(self, name, *shape, scale=None):
        fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * s).astype(np.float32), name))
        return name

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name, **attrs))
        return name


def _encoder_block(b: _Builder, x: str, tokens, dim: int, heads: int, hidden: int,
                   p: str = "blk") -> str:
    """x [B, T, C] -> [B, T, C]; pre-norm attention + MLP with residuals. ``tokens`` None:
    the Reshapes copy T from their input (0), so T may stay symbolic."""
    tokens = 0 if tokens is None else tokens
    d = dim // heads
    ones, zeros = np.ones(dim, np.float32), np.zeros(dim, np.float32)
    ln1 = b.node("LayerNormalization", [x, b.const(f"{p}.ln1.g", ones),
                                        b.const(f"{p}.ln1.b", zeros)], f"{p}.ln1", axis=-1)
    heads_shape = b.const(f"{p}.heads_shape", np.array([0, tokens, heads, d], np.int64))
    proj = {}
    for k in ("q", "k", "v"):
        mm = b.node("MatMul", [ln1, b.weight(f"{p}.W{k}", dim, dim)], f"{p}.{k}_proj")
        add = b.node("Add", [mm, b.weight(f"{p}.b{k}", dim, scale=0.02)], f"{p}.{k}_bias")
        r = b.node("Reshape", [add, heads_shape], f"{p}.{k}_heads")
        perm = [0, 2, 3, 1] if k == "k" else [0, 2, 1, 3]        # K transposed for QK^T
        proj[k] = b.node("Transpose", [r], f"{p}.{k}_t", perm=perm)
    qk = b.node("MatMul", [proj["q"], proj["k"]], f"{p}.qk")            # [B, H, T, T]
    scaled = b.node("Mul", [qk, b.const(f"{p}.scale", np.array(1 / np.sqrt(d), np.float32))],
                    f"{p}.qk_scaled")
    attn = b.node("Softmax", [scaled], f"{p}.softmax", axis=-1)
    av = b.node("MatMul", [attn, proj["v"]], f"{p}.av")                # [B, H, T, d]
    merged = b.node("Transpose", [av], f"{p}.av_t", perm=[0, 2, 1, 3])
    flat = b.node("Reshape", [merged, b.const(f"{p}.merge_shape",
                                              np.array([0, tokens, dim], np.int64))],
                  f"{p}.merge")
    o = b.node("MatMul", [flat, b.weight(f"{p}.Wo", dim, dim)], f"{p}.o_proj")
    o = b.node("Add", [o, b.weight(f"{p}.bo", dim, scale=0.02)], f"{p}.o_bias")
    x = b.node("Add", [x, o], f"{p}.res1")
    ln2 = b.node("LayerNormalization", [x, b.const(f"{p}.ln2.g", ones),
                                        b.const(f"{p}.ln2.b", zeros)], f"{p}.ln2", axis=-1)
    h = b.node("MatMul", [ln2, b.weight(f"{p}.W1", dim, hidden)], f"{p}.fc1")
    h = b.node("Add", [h, b.weight(f"{p}.b1", hidden, scale=0.02)], f"{p}.fc1_bias")
    h = b.node("Gelu", [h], f"{p}.gelu")
    h = b.node("MatMul", [h, b.weight(f"{p}.W2", hidden, dim)], f"{p}.fc2")
    h = b.node("Add", [h, b.weight(f"{p}.b2", dim, scale=0.02)], f"{p}.fc2_bias")
    return b.node("Add", [x, h], f"{p}.res2")


def encoder(seed: int = 0, tokens: int | str = 16, dim: int = 64, heads: int = 4,
            hidden: int = 128, blocks: int = 1) -> onnx.ModelProto:
    """BERT-like encoder on embeddings: input ``x`` [B, T, C] -> ``y`` [B, T, C]; a string
    ``tokens`` (e.g. "T") makes the sequence length symbolic."""
    b = _Builder(seed)
    h = "x"
    for i in range(blocks):
        h = _encoder_block(b, h, tokens if isinstance(tokens, int) else None, dim, heads,
                           hidden, p=f"blk{i}")
    b.nodes.append(helper.make_node("Identity", [h], ["y"], "out"))
    graph = helper.make_graph(
        b.nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", tokens, dim])], b.inits)
    return _model(graph)


def vit(seed: int = 0, size: int = 32, patch: int = 8, dim: int = 64, heads: int = 4,
        hidden: int = 128, classes: int = 10) -> onnx.ModelProto:
    """ViT-like classifier: ``x`` [B, 3, size, size] -> ``logits`` [B, classes]."""
    b = _Builder(seed)
    tokens = (size // patch) ** 2
    e = b.node("Conv", ["x", b.weight("patch.W", dim, 3, patch, patch),
                        b.weight("patch.b", dim, scale=0.02)], "patch_embed",
               kernel_shape=[patch, patch], strides=[patch, patch])
    e = b.node("Reshape", [e, b.const("tok_shape", np.array([0, dim, tokens], np.int64))],
               "tokens")
    e = b.node("Transpose", [e], "tokens_t", perm=[0, 2, 1])            # [B, T, C]
    e = b.node("Add", [e, b.weight("pos", 1, tokens, dim, scale=0.02)], "pos_embed")
    h = _encoder_block(b, e, tokens, dim, heads, hidden)
    pooled = b.node("ReduceMean", [h, b.const("pool_axes", np.array([1], np.int64))], "pool",
                    keepdims=0)
    b.nodes.append(helper.make_node("Gemm", [pooled, b.weight("head.W", classes, dim),
                                             b.weight("head.b", classes, scale=0.02)],
                                    ["logits"], "head", transB=1))
    graph = helper.make_graph(
        b.nodes, "vit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", classes])],
        b.inits)
    return _model(graph)


def _model(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
