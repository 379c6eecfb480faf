"""Run an aarch64 artifact on this x86 machine under ``qemu-aarch64`` user-mode emulation.

The guest is an aarch64 sysroot (Debian's arm64 python3.11 + libraries, and the
aarch64 wheels of the TVM runtime and numpy) built by ``tools/build_arm_sysroot.sh``
into ``~/.cache/onnxc/arm-sysroot`` (or ``$ONNXC_ARM_SYSROOT``). Inside it a small
script that needs only tvm + numpy loads ``model.so`` on the Relax VM, runs the
inputs and writes the outputs, which come back to the caller as numpy arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from onnxc.errors import BackendError, UsageError

DEFAULT_SYSROOT = os.path.join(os.path.expanduser("~"), ".cache", "onnxc", "arm-sysroot")

# Runs inside the emulated aarch64 Python: no onnxc there, only tvm and numpy.
GUEST_SCRIPT = r"""
import json, sys, time
import numpy as np
import tvm
from tvm import relax

artifact, feeds_path, out_path, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
info = json.load(open(artifact + "/target.json"))
vm = relax.VirtualMachine(tvm.runtime.load_module(artifact + "/" + info["library"]), tvm.cpu())
feeds = np.load(feeds_path)
args = [tvm.runtime.tensor(feeds[i["name"]]) for i in info["inputs"]]
times = []
for _ in range(max(1, repeat)):
    t0 = time.perf_counter()
    out = vm["main"](*args)
    times.append(time.perf_counter() - t0)
outs = list(out) if not hasattr(out, "numpy") else [out]
np.savez(out_path, *[o.numpy() for o in outs])
print(json.dumps({"seconds": times}))
"""


def sysroot_dir(path: str | None = None) -> str:
    return path or os.environ.get("ONNXC_ARM_SYSROOT") or DEFAULT_SYSROOT


def check_sysroot(path: str | None = None) -> str:
    root = sysroot_dir(path)
    if shutil.which("qemu-aarch64") is None:
        raise BackendError("qemu-aarch64 not found: install Debian's qemu-user")
    if not os.path.isfile(os.path.join(root, ".complete")):
        raise BackendError(f"no aarch64 sysroot at {root}: build it with "
                           f"tools/build_arm_sysroot.sh {root}")
    return root


def run_under_qemu(artifact: str, feeds: dict, sysroot: str | None = None,
                   repeat: int = 1, timeout: float = 900) -> tuple[list, list]:
    """Run an aarch64 artifact under qemu; returns (outputs, seconds per run)."""
    root = check_sysroot(sysroot)
    target_file = os.path.join(artifact, "target.json")
    if not os.path.isfile(target_file):
        raise UsageError(f"{artifact} is not a TVM artifact directory (no target.json)")
    with open(target_file) as f:
        info = json.load(f)
    if info["target"].get("arch") != "aarch64":
        raise UsageError(f"{artifact} was built for {info['target'].get('arch')}, "
                         f"not aarch64")
    if not info["library"].endswith(".so"):
        raise BackendError(f"{artifact} holds an unlinked {info['library']} (see LINK.txt)")
    with tempfile.TemporaryDirectory(prefix="onnxc-qemu-") as tmp:
        script = os.path.join(tmp, "guest.py")
        with open(script, "w") as f:
            f.write(GUEST_SCRIPT)
        feeds_path = os.path.join(tmp, "feeds.npz")
        np.savez(feeds_path, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        out_path = os.path.join(tmp, "outputs.npz")
        env = {"PATH": "/usr/bin:/bin", "PYTHONHOME": os.path.join(root, "usr"),
               "PYTHONPATH": os.path.join(root, "site"), "PYTHONNOUSERSITE": "1",
               "HOME": tmp, "QEMU_LD_PREFIX": root}
        cmd = ["qemu-aarch64", "-L", root, os.path.join(root, "usr", "bin", "python3.11"),
               script, os.path.abspath(artifact), feeds_path, out_path, str(repeat)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackendError(f"qemu run of {artifact} timed out after {timeout:.0f} s") \
                from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise BackendError(f"the aarch64 run under qemu failed: "
                               f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
        with np.load(out_path) as data:
            outputs = [data[f"arr_{i}"] for i in range(len(data.files))]
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return outputs, seconds
