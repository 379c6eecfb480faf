"""Open a TVM artifact (``target.json`` + ``model.so``) and run it on the Relax VM.

It runs when the target runs here (x86 on x86; CUDA with a GPU). ARM artifacts run on
this machine under qemu: see ``tools/run_arm_qemu.py``. Loading any artifact directory
(``onnxc run`` / ``onnxc bench``) goes through :mod:`onnxc.backends.artifact`.
"""

from __future__ import annotations

import json
import os
import platform

from onnxc.backends.artifact import Artifact
from onnxc.errors import BackendError, UsageError, first_line

from .constants import LIBRARY, TARGET_FILE


def load(path: str) -> Artifact:
    """The TVM artifact in directory ``path``; one-line errors."""
    target_file = os.path.join(path, TARGET_FILE)
    try:
        with open(target_file) as f:
            info = json.load(f)
        spec = info["target"]
        inputs, outputs = info["inputs"], info["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{target_file} is not an onnxc TVM target description "
                         f"({type(exc).__name__}: {exc})") from None
    lib = os.path.join(path, info.get("library", LIBRARY))
    if not lib.endswith(".so"):
        raise BackendError(f"{path} holds an unlinked library ({os.path.basename(lib)}): "
                           f"link it first as LINK.txt explains")
    if not os.path.isfile(lib):
        raise UsageError(f"{path} is missing its library {os.path.basename(lib)}")
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                       platform.machine().lower())
    if spec.get("arch") != here:
        hint = (" (run it under qemu: python tools/run_arm_qemu.py ARTIFACT --input x.npy)"
                if spec.get("arch") == "aarch64" else "")
        raise BackendError(f"{path} was built for {spec.get('arch')}, this machine is "
                           f"{here}{hint}")
    import tvm
    from tvm import relax

    device = spec.get("device", "cpu")
    if device == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BackendError(f"{path} is a CUDA artifact and this machine has no CUDA GPU")
    else:
        dev = tvm.cpu(0)
    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)
    except Exception as exc:
        raise BackendError(f"cannot load {lib}: {first_line(exc)}") from None
    main = vm["main"]

    def run(feeds):
        args = [tvm.runtime.tensor(feeds[i["name"]], device=dev) for i in inputs]
        out = main(*args)
        items = list(out) if isinstance(out, (list, tuple)) or type(out).__name__ in (
            "Array", "Tuple") else [out]
        return [o.numpy() for o in items]

    return Artifact(path, "tvm", inputs, outputs, run, device, sync=dev.sync)
