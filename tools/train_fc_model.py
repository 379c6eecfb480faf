"""Train the small FC-head CIFAR-10 model used by the ``gap``/``lowrank`` tests and benchmarks.

A VGG-style CNN (3 conv layers with BN, each followed by a 2×2 max-pool: 32×32 -> 64×4×4) followed by a
2-layer FC head (1024 -> 128 -> 10) — the classic "flatten a C×H×W map into FC layers"
head the ``gap`` pass replaces. Trained on CPU with torch, seeded, on
``../shared/data/cifar10/train.npz`` (preprocessing /255, ImageNet mean/std, the same as
the shared ResNets), exported with ``onnxc.frontend.from_torch`` and evaluated on
``test_dev.npz`` with ONNX Runtime. The committed model was made with::

    nice python tools/train_fc_model.py --out tests/models/vgg_fc_cifar10.onnx

The data stays in ../shared; only the exported .onnx (≈0.6 MB) is committed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ONNXC_SHARED", REPO.parent / "shared"))
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def build_model(widths=(32, 64, 128), hidden=128):
    import torch.nn as nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    # VGG-style: three stages of two 3×3 conv+BN+ReLU, each closed by a 2×2 max-pool
    # (32×32 -> C×4×4), then the flatten-into-FC head the ``gap`` pass replaces. Two convs
    # per stage give the last map a receptive field that covers most of the image, as in
    # VGG; ≈38 M MACs, about 13 minutes for 15 epochs on a quiet 2-core CPU.
    a, b, c = widths
    features = nn.Sequential(*block(3, a), *block(a, a), nn.MaxPool2d(2),     # N×a×16×16
                             *block(a, b), *block(b, b), nn.MaxPool2d(2),     # N×b×8×8
                             *block(b, c), *block(c, c), nn.MaxPool2d(2))     # N×c×4×4
    head = nn.Sequential(nn.Flatten(), nn.Linear(c * 4 * 4, hidden), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(hidden, 10))
    return nn.Sequential(features, head)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 N×3×32×32 -> float32 (x/255 - mean)/std, as for the shared ResNets."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(MEAN, np.float32)[:, None, None]) / \
        np.asarray(STD, np.float32)[:, None, None]


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random ``pad``-pixel-padded crops and horizontal flips (the standard CIFAR recipe
    has pad 4; larger shifts move objects across cells of the final 4×4 map, so the head
    cannot lean on where in the image a feature sits)."""
    n = len(x)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, :, ::-1]
    return np.ascontiguousarray(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "models" / "vgg_fc_cifar10.onnx"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    # One thread: on the shared 2-core machine two torch threads spin waiting for a core
    # and used ~4x the CPU time per step of one thread.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pad", type=int, default=4,
                    help="random-crop shift range in pixels (crops of the image padded by this)")
    ap.add_argument("--widths", default="32,64,128",
                    help="channels of the three conv stages")
    ap.add_argument("--hidden", type=int, default=128, help="width of the hidden FC layer")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from onnxc.frontend import from_torch
    from onnxc.execution import Runner

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train = np.load(SHARED / "data" / "cifar10" / "train.npz")
    test = np.load(SHARED / "data" / "cifar10" / "test_dev.npz")
    x_train, y_train = preprocess(train["images"]), train["labels"].astype(np.int64)
    x_test, y_test = preprocess(test["images"]), test["labels"].astype(np.int64)

    widths = tuple(int(v) for v in args.widths.split(","))
    if len(widths) != 3 or min(widths) < 1 or args.hidden < 1:
        ap.error("--widths needs three positive channel counts, --hidden a positive width")
    model = build_model(widths, args.hidden)
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(x_train))
        xb_all = augment(x_train[order], rng, args.pad)
        total = correct = 0
        loss_sum = 0.0
        for i in range(0, len(order), args.batch_size):
            xb = torch.from_numpy(xb_all[i:i + args.batch_size])
            yb = torch.from_numpy(y_train[order[i:i + args.batch_size]])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(yb)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {loss_sum / total:.3f}  "
              f"train acc {100 * correct / total:.1f}%  {time.time() - start:.0f}s", flush=True)

    model.eval()
    proto = from_torch(model, torch.from_numpy(x_test[:1]), input_names=["input"],
                       output_names=["logits"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    import onnx

    onnx.save(proto, args.out)
    logits = Runner(proto).run({"input": x_test})[0]
    acc = 100.0 * float(np.mean(logits.argmax(1) == y_test))
    print(f"saved {args.out} ({os.path.getsize(args.out):,} bytes); "
          f"test_dev top-1 {acc:.2f}% on {len(y_test)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
