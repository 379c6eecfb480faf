#!/usr/bin/env python3
"""Run an ARM (aarch64) onnxc artifact under qemu-aarch64 and compare it with x86.

    python tools/run_arm_qemu.py ARM_ARTIFACT [--input x.npy] [--output y.npy]
                                 [--compare X86_ARTIFACT] [--sysroot DIR]

Needs Debian's qemu-user and the sysroot built by tools/build_arm_sysroot.sh.
Without --input, seeded random data of the compiled input shapes is used. With
--compare, the same inputs run on an x86 artifact and the max relative error is
printed (exit 5 if above --tolerance).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def main(argv=None) -> int:
    from onnxc.backends.tvm.qemu import run_under_qemu
    from onnxc.backends.artifact import Artifact, read_inputs
    from onnxc.errors import OnnxcError, VerificationError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--input", action="append", metavar="[NAME=]FILE.npy")
    p.add_argument("--output", help="save the first output here (.npy)")
    p.add_argument("--compare", metavar="X86_ARTIFACT", help="x86 artifact of the same model")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--sysroot", default=None)
    args = p.parse_args(argv)
    try:
        with open(os.path.join(args.artifact, "target.json")) as f:
            info = json.load(f)
        shell = Artifact(args.artifact, "tvm", info["inputs"], info["outputs"], None)
        feeds = read_inputs(args.input, shell) if args.input else shell.random_inputs()
        outputs, seconds = run_under_qemu(args.artifact, feeds, args.sysroot)
        for spec, out in zip(info["outputs"], outputs):
            print(f"{spec['name']}: {out.dtype} {list(out.shape)} "
                  f"[{', '.join(f'{v:.5g}' for v in out.reshape(-1)[:6])}, ...]")
        print(f"qemu-aarch64: {seconds[0] * 1e3:.1f} ms per run (emulated, not a device "
              f"latency)")
        if args.output:
            np.save(args.output, outputs[0])
        if args.compare:
            from onnxc.backends.artifact import load_artifact
            from onnxc.verify import compare_outputs

            ref = load_artifact(args.compare).run(feeds)
            cmp = compare_outputs(ref, outputs)
            print(f"aarch64 (qemu) vs x86: max abs {cmp.max_abs:.3e}  "
                  f"max rel {cmp.max_rel:.3e}")
            if cmp.max_rel > args.tolerance:
                raise VerificationError(f"max relative error {cmp.max_rel:.3e} > "
                                        f"{args.tolerance}")
    except FileNotFoundError as exc:
        print(f"run_arm_qemu: error: {exc.filename}: not found", file=sys.stderr)
        return 2
    except OnnxcError as exc:
        print(f"run_arm_qemu: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
