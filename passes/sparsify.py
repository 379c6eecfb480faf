"""sparsify: unstructured magnitude pruning (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks").

The smallest-magnitude weights of every Conv / ConvTranspose / Gemm / MatMul weight
tensor are set to zero: ``--sparsity`` of each tensor (layer-wise), or of all of
them together with ``--sparsify-global`` (one magnitude threshold).

``model.onnx`` stays dense (zeros included) so any runtime can run it. The storage
that actually shrinks ships beside it as ``sparse_weights.npz`` (compressed): for
each sparsified initializer a packed bitmask of the non-zeros and the non-zero
values. ``load_sparse_weights`` turns it back into dense arrays;
``storage_bytes`` (→ storage Cr in report.json) counts the model with those
tensors taken out plus the npz.
"""

from __future__ import annotations

import io

import numpy as np
import onnx_graphsurgeon as gs

from onnxc.errors import UsageError
from onnxc.options import fraction
from onnxc.pipeline import Option, Pass, register_pass

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
SPARSE_FILE = "sparse_weights.npz"


def sparse_weights(graph) -> list:
    """Distinct float weight constants of weight layers (at least 2-D)."""
    seen, out = set(), []
    for node in graph.nodes:
        idx = WEIGHT_INPUT.get(node.op)
        if idx is None or len(node.inputs) <= idx:
            continue
        t = node.inputs[idx]
        if isinstance(t, gs.Constant) and t.values.dtype.kind == "f" and t.values.ndim >= 2 \
                and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def pack(tensors: dict) -> bytes:
    """{name: dense array} -> compressed npz of bitmask + non-zero values per tensor."""
    arrays = {}
    for i, (name, w) in enumerate(tensors.items()):
        nz = w.ravel() != 0
        arrays[f"t{i}_mask"] = np.packbits(nz)                 # 1 bit per weight
        arrays[f"t{i}_values"] = w.ravel()[nz]                 # (nnz,)
        arrays[f"t{i}_shape"] = np.array(w.shape, np.int64)
        arrays[f"t{i}_name"] = np.array(name)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def load_sparse_weights(path_or_bytes) -> dict:
    """Inverse of :func:`pack`: {initializer name: dense float array}."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    data = np.load(src, allow_pickle=False)
    out = {}
    for key in data.files:
        if not key.endswith("_name"):
            continue
        p = key[:-len("_name")]
        shape = tuple(data[p + "_shape"])
        n = int(np.prod(shape))
        mask = np.unpackbits(data[p + "_mask"])[:n].astype(bool)
        dense = np.zeros(n, data[p + "_values"].dtype)
        dense[mask] = data[p + "_values"]
        out[str(data[key])] = dense.reshape(shape)
    return out


@register_pass
class Sparsify(Pass):
    name = "sparsify"
    summary = "zero the smallest weights (unstructured); ships bitmask+values storage"
    order = 35
    exact = False
    options = (
        Option("--sparsity", fraction, 0.5, "share of weights set to zero, in [0, 1)"),
        Option("--sparsify-global", None, None, "one magnitude threshold over all layers "
               "instead of the same sparsity in each", action="store_true"),
    )

    def run(self, graph, ctx, report):
        sparsity = self.config.sparsity
        weights = sparse_weights(graph)
        if not weights:
            raise UsageError("sparsify: the model has no Conv/Gemm/MatMul weight tensors")
        if self.config.sparsify_global:
            mags = np.concatenate([np.abs(t.values).ravel() for t in weights])
            k = int(np.floor(sparsity * mags.size))
            thr = np.partition(mags, k - 1)[k - 1] if k > 0 else -1.0
            masks = [np.abs(t.values) > thr for t in weights]
        else:
            masks = []
            for t in weights:
                mag = np.abs(t.values).ravel()
                k = int(np.floor(sparsity * mag.size))
                if k == 0:
                    masks.append(np.ones(t.values.shape, bool))
                    continue
                # Zero exactly k weights (ties broken by position), not everything ≤ thr.
                order = np.argpartition(mag, k - 1)[:k]
                keep = np.ones(mag.size, bool)
                keep[order] = False
                masks.append(keep.reshape(t.values.shape))
        total = zeros = dense_bytes = 0
        packed = {}
        for t, keep in zip(weights, masks):
            w = np.where(keep, t.values, 0).astype(t.values.dtype)
            t.values = w                      # new array: copies of the graph are untouched
            total += w.size
            zeros += int(w.size - np.count_nonzero(w))
            dense_bytes += w.nbytes
            packed[t.name] = w
        blob = pack(packed)
        report.files[SPARSE_FILE] = blob
        model_bytes = graph.to_onnx().ByteSize()
        report.extra["storage_bytes"] = int(model_bytes - dense_bytes + len(blob))
        report.extra.update({"sparsity": round(zeros / max(total, 1), 4),
                             "sparse_tensors": len(weights),
                             "sparse_file_bytes": len(blob),
                             "dense_weight_bytes": int(dense_bytes)})
        report.changed = len(weights)
        report.note(f"{zeros:,} of {total:,} weights zeroed ({100 * zeros / max(total, 1):.1f}%"
                    f") in {len(weights)} tensors; {SPARSE_FILE} holds them in "
                    f"{len(blob):,} B instead of {dense_bytes:,} B dense")
        return graph
