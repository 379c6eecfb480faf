"""Target presets (TVM JSON target dicts) and how each one's library is exported.

A target is resolved into a :class:`TargetSpec`: the TVM target dict (what
``tvm.target.Target`` takes), the device the library runs on, and the compiler
that links the exported library. Presets:

- ``x86``  — ``llvm`` for this host, with its CPU (``-mcpu``, hence its vector ISA)
  detected by LLVM and the core count for the runtime's thread pool.
- ``arm``  — ``llvm`` for ``aarch64-linux-gnu`` with NEON; ``--mcpu cortex-a72`` etc.
  Linked with ``aarch64-linux-gnu-g++`` (Debian's ``g++-aarch64-linux-gnu``).
- ``cuda`` — ``cuda`` with ``--cuda-arch`` (default ``sm_80``) and an ``llvm`` host.

``--target-json`` replaces the preset's dict (a JSON object, or a path to a file
holding one): full control for anything the presets do not cover.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from onnxc.errors import BackendError, UsageError, first_line

# Compiler per LLVM triple prefix when cross-compiling (Debian cross toolchains).
CROSS_COMPILERS = {
    "aarch64": "aarch64-linux-gnu-g++",
    "arm": "arm-linux-gnueabihf-g++",
    "riscv64": "riscv64-linux-gnu-g++",
    "x86_64": "g++",
}
DEFAULT_CUDA_ARCH = "sm_80"


@dataclass
class TargetSpec:
    """Everything the builder and the runner need to know about one target."""

    preset: str                 # x86 | arm | cuda | custom
    target: dict                # TVM JSON target dict
    host: dict | None = None    # host target dict for device targets (cuda)
    device: str = "cpu"         # "cpu" or "cuda": where the VM runs
    arch: str = "x86_64"        # CPU architecture the library's host code is for
    compiler: str | None = None  # linker for the exported .so; None -> write a .tar
    notes: list = field(default_factory=list)

    def tvm_target(self):
        import tvm

        try:
            if self.host is not None:
                return tvm.target.Target(self.target, host=self.host)
            return tvm.target.Target(self.target)
        except Exception as exc:   # TVM raises assorted errors for bad attrs/kinds
            raise UsageError(f"invalid TVM target {json.dumps(self.target)}: "
                             f"{first_line(exc)}") from None

    @property
    def runs_here(self) -> bool:
        """Can this machine execute the library natively (x86 CPU host, no GPU)?"""
        import platform

        return self.device == "cpu" and self.arch == _host_arch(platform.machine())

    def as_dict(self) -> dict:
        return {"preset": self.preset, "target": self.target, "host": self.host,
                "device": self.device, "arch": self.arch, "compiler": self.compiler}


def _host_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def host_cpu_target(num_cores: int | None = None) -> dict:
    """``llvm`` for this machine: LLVM's name for the host CPU implies its features."""
    from tvm.target import codegen

    target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
              "num-cores": int(num_cores or _physical_cores())}
    return target


def _physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def parse_target_json(text: str) -> dict:
    """``--target-json``: a JSON object or a path to a file with one."""
    raw = text
    if os.path.isfile(text):
        with open(text) as f:
            raw = f.read()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--target-json is not valid JSON ({exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}) and not an existing file") from None
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise UsageError('--target-json must be a JSON object with a "kind", e.g. '
                         '{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')
    return value


def find_compiler(name: str | None) -> str | None:
    if not name:
        return None
    return shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK)
                                  else None)


def resolve(preset: str, options: dict) -> TargetSpec:
    """Build the :class:`TargetSpec` for a preset name and the backend options."""
    opt = {k: v for k, v in options.items() if v is not None}
    custom = parse_target_json(opt["target_json"]) if opt.get("target_json") else None
    mcpu = opt.get("mcpu")
    cross_cc = opt.get("cross_cc")
    import platform

    here = _host_arch(platform.machine())

    if preset == "cuda":
        arch = opt.get("cuda_arch") or DEFAULT_CUDA_ARCH
        if not (arch.startswith("sm_") and arch[3:].rstrip("af").isdigit()):
            raise UsageError(f"--cuda-arch '{arch}' must look like sm_80 / sm_90a")
        target = custom or {"kind": "cuda", "arch": arch}
        host = {"kind": "llvm"} if custom is None or "host" not in custom else None
        spec = TargetSpec("cuda", target, host=host, device="cuda", arch=here,
                          compiler=find_compiler(cross_cc or "g++"))
        if custom is not None and custom.get("kind") != "cuda":
            raise UsageError(f"--target cuda with --target-json of kind "
                             f"'{custom['kind']}': use --target x86 or arm for CPU targets")
        return _check_compiler(spec, cross_cc or "g++", bool(cross_cc))

    if preset == "arm":
        target = custom or {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                            "mattr": ["+neon"]}
        if custom is None and mcpu:
            target["mcpu"] = mcpu
        triple = target.get("mtriple", "aarch64-linux-gnu")
        arch = triple.split("-")[0]
        spec = TargetSpec("arm", target, arch=arch,
                          compiler=find_compiler(cross_cc or CROSS_COMPILERS.get(arch)))
        return _check_compiler(spec, cross_cc or CROSS_COMPILERS.get(arch), bool(cross_cc))

    if preset == "x86":
        if custom is not None:
            target = custom
        else:
            target = host_cpu_target()
            if mcpu:
                target["mcpu"] = mcpu
        triple = target.get("mtriple")
        arch = triple.split("-")[0] if triple else here
        default_cc = "g++" if arch == here else CROSS_COMPILERS.get(arch)
        spec = TargetSpec("x86", target, arch=arch,
                          compiler=find_compiler(cross_cc or default_cc))
        return _check_compiler(spec, cross_cc or default_cc, bool(cross_cc))
    raise UsageError(f"unknown TVM target preset '{preset}'")


def _check_compiler(spec: TargetSpec, wanted: str | None, explicit: bool) -> TargetSpec:
    """An explicit --cross-cc must exist; a missing default cross compiler means .tar."""
    if spec.compiler is not None:
        return spec
    if explicit:
        raise BackendError(f"cross compiler '{wanted}' not found (not on PATH and not an "
                           f"executable file)")
    if spec.device == "cuda" or spec.arch == _host_arch(__import__("platform").machine()):
        raise BackendError("no C++ compiler (g++) found to link the library; install g++")
    spec.notes.append(
        f"no cross compiler for {spec.arch} found ({wanted or 'none known'}): wrote the "
        f"library as model.tar (object files); link it on the device")
    return spec
