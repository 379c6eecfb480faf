"""Small transformers and detectors built in torch and exported with torch.onnx for
the prune tests; ``dead_*`` helpers zero whole heads / units / channels so that
pruning exactly those must leave the outputs unchanged."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from torch import nn


def export(module, args, input_names, output_names, opset=17, dynamic_batch=True):
    module.eval()
    axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    buf = io.BytesIO()
    # nn.TransformerEncoderLayer's fused fast path (one aten op) cannot be exported.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(module, args, buf, input_names=input_names,
                          output_names=output_names, opset_version=opset, dynamo=False,
                          dynamic_axes=axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return onnx.load_from_string(buf.getvalue())


# ---- transformers ----------------------------------------------------------------------


class Bert(nn.Module):
    """BERT-like: token + position embedding, nn.TransformerEncoder (batch_first,
    GELU: torch exports the Erf form), classifier on the first token."""

    def __init__(self, vocab=200, d=64, heads=4, ff=128, layers=2, seq=16, classes=3,
                 padding_mask=False):
        super().__init__()
        self.padding_mask = padding_mask
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
        self.seq, self.vocab = seq, vocab

    def forward(self, ids, pad=None):
        # pad: True where a token is padding (torch expands it over the heads).
        return self.head(self.enc(self.emb(ids) + self.pos, src_key_padding_mask=pad)[:, 0])

    def onnx(self, opset=17, dynamic_batch=True):
        ids = torch.randint(0, self.vocab, (2, self.seq))
        if self.padding_mask:
            pad = torch.zeros(2, self.seq, dtype=torch.bool)
            return export(self, (ids, pad), ["ids", "pad"], ["logits"], opset, dynamic_batch)
        return export(self, (ids,), ["ids"], ["logits"], opset, dynamic_batch)

    def kill(self, heads: dict, units: dict):
        """Zero q/k/v of ``heads[layer]`` and the ``units[layer]`` MLP hidden units."""
        with torch.no_grad():
            for li, layer in enumerate(self.enc.layers):
                attn = layer.self_attn
                e, dh = attn.embed_dim, attn.head_dim
                for h in heads.get(li, []):
                    for part in range(3):
                        rows = slice(part * e + h * dh, part * e + (h + 1) * dh)
                        attn.in_proj_weight[rows] = 0
                        attn.in_proj_bias[rows] = 0
                for u in units.get(li, []):
                    layer.linear1.weight[u] = 0
                    layer.linear1.bias[u] = 0
        return self


class Attention(nn.Module):
    """Multi-head self-attention with q/k/v from one fused Linear, timm style
    (reshape to (B, N, 3, H, Dh), permute, index: Gather), from a fused Linear split
    with ``chunk`` (Split), or from three Linears. ``qk_norm`` adds a LayerNorm over
    each head's features (which channel pruning cannot follow)."""

    def __init__(self, d, heads, qkv="gather", qk_norm=False):
        super().__init__()
        self.h, self.dh, self.mode = heads, d // heads, qkv
        if qkv in ("separate", "heads_outer"):
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.norm = nn.LayerNorm(self.dh) if qk_norm else None
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        if self.mode == "gather":
            qkv = self.qkv(x).reshape(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            if self.mode == "split":
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            else:
                q, k, v = self.q(x), self.k(x), self.v(x)
            q, k, v = (t.reshape(b, n, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
        if self.mode == "heads_outer":
            # Heads merged outside the batch, [H*B, N, Dh]: per-sample slots cannot
            # describe that axis, so the heads must be left whole.
            q, k, v = (t.permute(1, 0, 2, 3).reshape(self.h * b, n, self.dh)
                       for t in (q, k, v))
            y = torch.bmm((q @ k.transpose(-2, -1)).softmax(-1), v)
            y = y.reshape(self.h, b, n, self.dh).permute(1, 2, 0, 3)
            return self.proj(y.reshape(b, n, d))
        if self.norm is not None:
            q, k = self.norm(q), self.norm(k)
        a = (q @ k.transpose(-2, -1)) * self.dh ** -0.5
        y = a.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, d))

    def kill(self, heads):
        with torch.no_grad():
            d = self.h * self.dh
            for h in heads:
                for part in range(3):
                    rows = slice(h * self.dh, (h + 1) * self.dh)
                    if self.mode in ("separate", "heads_outer"):
                        lin = (self.q, self.k, self.v)[part]
                    else:
                        lin, rows = self.qkv, slice(part * d + rows.start, part * d + rows.stop)
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0


class Block(nn.Module):
    def __init__(self, d, heads, mlp, qkv="gather", qk_norm=False):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, qkv, qk_norm)
        self.fc1, self.act, self.fc2 = nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.fc2(self.act(self.fc1(self.n2(x))))


class ViT(nn.Module):
    """Tiny ViT: patch-embedding conv, class token, position embedding, pre-norm
    encoder blocks (fused qkv, GELU MLP), head on the class token."""

    def __init__(self, img=32, patch=8, d=64, heads=4, mlp=128, depth=2, classes=10,
                 qkv="gather", qk_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp, qkv, qk_norm)
                                      for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.img = img

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])

    def onnx(self, opset=17):
        return export(self, (torch.randn(2, 3, self.img, self.img),), ["x"], ["logits"],
                      opset)

    def kill(self, heads: dict, units: dict):
        with torch.no_grad():
            for bi, blk in enumerate(self.blocks):
                blk.attn.kill(heads.get(bi, []))
                for u in units.get(bi, []):
                    blk.fc1.weight[u] = 0
                    blk.fc1.bias[u] = 0
        return self


class MaskedAttention(nn.Module):
    """Hugging Face style: separate q/k/v, an additive mask (1 - mask)[:, None, None, :]
    * -1e4 broadcast over the heads, GELU MLP after a post-norm."""

    def __init__(self, d=64, heads=8, mlp=128):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.h, self.dh).permute(0, 2, 1, 3)
                   for z in (self.q(x), self.k(x), self.v(x)))
        ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
        a = (q @ k.transpose(-1, -2)) / self.dh ** 0.5 + ext
        y = (a.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        h = self.ln(x + self.o(y))
        return h + self.fc2(nn.functional.gelu(self.fc1(h)))

    def onnx(self):
        mask = torch.ones(2, 16, dtype=torch.int64)
        return export(self, (torch.randn(2, 16, 64), mask), ["x", "mask"], ["y"])

    def kill(self, heads):
        with torch.no_grad():
            for h in heads:
                for lin in (self.q, self.k, self.v):
                    lin.weight[h * self.dh:(h + 1) * self.dh] = 0
                    lin.bias[h * self.dh:(h + 1) * self.dh] = 0
        return self


# ---- detectors -------------------------------------------------------------------------


class ConvAct(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, act="silu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2)
        self.act = nn.SiLU() if act == "silu" else nn.Hardswish()

    def forward(self, x):
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvAct(c, c, 3), ConvAct(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 conv, Split into two channel ranges, bottlenecks on the
    second, Concat of every range, 1x1 conv."""

    def __init__(self, cin, cout, n=1, split=False):
        super().__init__()
        self.c, self.split = cout // 2, split
        self.cv1 = ConvAct(cin, 2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvAct((2 + n) * self.c, cout)

    def forward(self, x):
        # chunk exports as two Slices, split((c, c)) as one Split (YOLOv8 has both).
        y = list(self.cv1(x).split((self.c, self.c), 1) if self.split
                 else self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detector(nn.Module):
    """Backbone with C2f blocks, an upsampling neck (Resize + Concat) and two detect
    heads (boxes + classes per scale, HardSwish in the heads): two graph outputs."""

    def __init__(self, classes=5, split=True):
        super().__init__()
        torch.manual_seed(0)
        self.stem = ConvAct(3, 16, 3, 2)
        self.s1 = nn.Sequential(ConvAct(16, 32, 3, 2), C2f(32, 32, split=split))
        self.s2 = nn.Sequential(ConvAct(32, 64, 3, 2), C2f(64, 64, split=split))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(64 + 32, 32, split=split)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvAct(c, 32, 3, act="hswish"), nn.Conv2d(32, 4 + classes, 1))
            for c in (32, 64))

    def forward(self, x):
        p3 = self.s1(self.stem(x))
        p4 = self.s2(p3)
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        return self.heads[0](n3), self.heads[1](p4)

    def onnx(self, opset=17):
        return export(self, (torch.randn(1, 3, 32, 32),), ["x"], ["p3", "p4"], opset)

    def kill(self, convs: dict):
        """Zero output ``channels`` (weights and bias) of named convs."""
        mods = dict(self.named_modules())
        with torch.no_grad():
            for name, channels in convs.items():
                conv = mods[name]
                conv.weight[list(channels)] = 0
                conv.bias[list(channels)] = 0
        return self


class WindowAttention(nn.Module):
    """Swin's shifted-window attention core: tokens in nW windows of N, fused qkv, a
    per-window mask added through view(B_ // nW, nW, H, N, N)."""

    def __init__(self, d=32, heads=4, windows=4, n=16):
        super().__init__()
        torch.manual_seed(0)
        self.h, self.dh, self.nw, self.n = heads, d // heads, windows, n
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.randn(windows, n, n))

    def forward(self, x):                          # x: [B, nW * N, d]
        b, _, d = x.shape
        x = x.reshape(b * self.nw, self.n, d)
        bw = x.shape[0]
        qkv = self.qkv(x).reshape(bw, self.n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = q @ k.transpose(-2, -1)
        a = a.view(bw // self.nw, self.nw, self.h, self.n, self.n) \
            + self.mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, self.h, self.n, self.n).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(bw, self.n, d)
        return self.proj(y).reshape(b, self.nw * self.n, d)

    def onnx(self):
        return export(self, (torch.randn(2, self.nw * self.n, 32),), ["x"], ["y"])

    def kill(self, heads):
        with torch.no_grad():
            d = self.h * self.dh
            for h in heads:
                for part in range(3):
                    rows = slice(part * d + h * self.dh, part * d + (h + 1) * self.dh)
                    self.qkv.weight[rows] = 0
                    self.qkv.bias[rows] = 0
        return self


class YoloHead(nn.Module):
    """YOLOv8's Detect head on two scales: per scale a box branch (4 x 16 DFL bins) and
    a class branch, concatenated on channels, flattened and joined over the scales,
    split into boxes and classes; the DFL (softmax over bins, fixed 1x1 conv) decodes
    the boxes; one output [B, 4 + classes, anchors]."""

    def __init__(self, classes=5, reg=16):
        super().__init__()
        torch.manual_seed(0)
        self.nc, self.reg = classes, reg
        self.stem = ConvAct(3, 32, 3, 2)
        self.p4 = nn.Sequential(ConvAct(32, 64, 3, 2), C2f(64, 64, split=True))
        self.box = nn.ModuleList(nn.Sequential(ConvAct(c, 32, 3), ConvAct(32, 32, 3),
                                               nn.Conv2d(32, 4 * reg, 1)) for c in (32, 64))
        self.cls = nn.ModuleList(nn.Sequential(ConvAct(c, 32, 3), ConvAct(32, 32, 3),
                                               nn.Conv2d(32, classes, 1)) for c in (32, 64))
        self.dfl = nn.Conv2d(reg, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg, dtype=torch.float).view(1, reg, 1, 1)

    def forward(self, x):
        p3 = self.stem(x)
        feats = (p3, self.p4(p3))
        b = x.shape[0]
        y = torch.cat([torch.cat((self.box[i](f), self.cls[i](f)), 1)
                       .view(b, 4 * self.reg + self.nc, -1) for i, f in enumerate(feats)], 2)
        box, cls = y.split((4 * self.reg, self.nc), 1)
        a = box.shape[-1]
        box = self.dfl(box.view(b, 4, self.reg, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        return torch.cat((box, cls.sigmoid()), 1)

    def onnx(self, opset=17):
        return export(self, (torch.randn(1, 3, 32, 32),), ["x"], ["y"], opset)


def rng_ids(vocab, batch, seq, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)
