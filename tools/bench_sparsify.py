"""Benchmark of unstructured magnitude sparsity: sparsity vs top-1 and
storage compression on a shared CIFAR ResNet, layer-wise and global.

Storage Cr = original model bytes / (model without the sparsified dense tensors +
compressed ``sparse_weights.npz``), exactly as written into the artifact.

    python tools/bench_sparsify.py [--model resnet20] [--levels 0.5,0.7,0.9]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--levels", default="0.5,0.7,0.9")
    args = p.parse_args(argv)

    from onnxc.calibrate.readers import Preprocess, load_npz
    from onnxc.compress import compress

    model = SHARED / "models" / f"{args.model}_cifar10.onnx"
    test = SHARED / "data" / "cifar10" / "test_dev.npz"
    for f in (model, test):
        if not f.exists():
            print(f"needs {f}", file=sys.stderr)
            return 2
    pre = Preprocess(SCALE, MEAN, STD)
    rows = [("mode", "sparsity", "top-1", "model B", "storage B", "storage Cr",
             "npz in artifact B")]
    base_top1 = None
    for mode in ("layer-wise", "global"):
        for level in [float(x) for x in args.levels.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "art")
                res = compress(str(model), ["sparsify"],
                               options={"sparsity": level,
                                        "sparsify_global": mode == "global"},
                               evaluation_loader=lambda g: load_npz(str(test), g, pre),
                               out_dir=out, log=lambda m: None)
                npz = os.path.getsize(os.path.join(out, "sparse_weights.npz"))
            rep = res.report
            base_top1 = rep["accuracy"]["original_top1"]
            sp = next(x for x in rep["passes"] if x["name"] == "sparsify")["extra"]
            rows.append((mode, f"{100 * sp['sparsity']:.1f}%",
                         f"{rep['accuracy']['final_top1']:.2f}%",
                         f"{rep['original']['bytes']:,}", f"{rep['storage_bytes']:,}",
                         f"{rep['storage_compression_ratio']:.2f}x", f"{npz:,}"))
    print(f"# {args.model}: sparsify (magnitude, no training); top-1 on test_dev, "
          f"dense original {base_top1:.2f}%")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
