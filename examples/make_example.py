"""Build onnxc's built-in example: a small CNN trained on scikit-learn's bundled
handwritten digits (8×8 grey images, 10 classes), exported to ONNX.

Writes examples/digits_cnn.onnx, examples/digits_train.npz and examples/digits_test.npz
(`images` uint8 N×1×8×8 with values 0..16, `labels`). Seeded and CPU-only: ~20 s.
Preprocessing for onnxc's data flags: --scale 0.0625 (values /16).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def digits(seed: int = 0) -> tuple:
    """scikit-learn's digits, split 1400 train / 397 test: ((images, labels), (images,
    labels)) with images uint8 N×1×8×8 (values 0..16) and labels uint8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[:, None]
    labels = d.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[:1400], order[1400:]
    return (images[train], labels[train]), (images[test], labels[test])


def train(net, images: np.ndarray, labels: np.ndarray, epochs: int):
    """Adam, batches of 64, on images / 16; returns ``net`` in eval mode."""
    import torch

    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    return net


def build(out_dir: str, epochs: int = 15, seed: int = 0) -> str:
    import torch

    from onnxc.frontend import from_torch

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    (train_images, train_labels), (test_images, test_labels) = digits(seed)
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, "digits_train.npz"),
                        images=train_images, labels=train_labels)
    np.savez_compressed(os.path.join(out_dir, "digits_test.npz"),
                        images=test_images, labels=test_labels)

    # BN and Dropout on purpose: fold_bn and cleanup have real work to do.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 10))
    train(net, train_images, train_labels, epochs)
    with torch.no_grad():
        xt = torch.tensor(test_images, dtype=torch.float32) / 16.0
        acc = (net(xt).argmax(1).numpy() == test_labels).mean() * 100
    x1 = torch.tensor(train_images[:1], dtype=torch.float32) / 16.0
    model = from_torch(net, x1, output_names=["logits"], keep_batchnorm=True)
    path = os.path.join(out_dir, "digits_cnn.onnx")
    import onnx

    onnx.save(model, path)
    print(f"wrote {path} (test top-1 {acc:.2f}% on {len(test_labels)} images) and digits_*.npz")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    build(args.out_dir, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
