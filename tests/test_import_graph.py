"""onnxc's packages import each other without cycles (module-level imports only: an
import inside a function runs when called, after every module has loaded)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Package name -> source folder, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGES = {"onnxc": "onnxc", "onnxc.frontend": "frontend", "onnxc.passes": "passes",
            "onnxc.backends": "backends", "onnxc.calibrate": "calibrate"}


def _modules() -> dict:
    """{module name: path} of every onnxc module."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package] + parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict, anywhere: bool = False) -> set:
    """onnxc modules that ``name`` imports at module level (``anywhere``: in functions
    too)."""
    is_package = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if anywhere else tree.body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import f`, mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict) -> list | None:
    """One import cycle [a, b, ..., a] in {module: imported modules}, or None."""
    state: dict = {}
    stack: list = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_onnxc_module_imports_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "onnxc.backends.tvm.runtime" in graph and graph["onnxc.verify"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_artifact_loaders_do_not_import_each_other_even_lazily():
    modules = _modules()
    graph = {name: _imports(name, path, modules, anywhere=True)
             for name, path in modules.items()}
    sub = {m: graph[m] & {"onnxc.backends.tvm.build", "onnxc.backends.tvm.runtime",
                          "onnxc.backends.vta.runtime"}
           for m in ("onnxc.backends.tvm.build", "onnxc.backends.tvm.runtime",
                     "onnxc.backends.vta.runtime")}
    assert find_cycle(sub) is None


def test_running_an_onnx_artifact_imports_no_tuning_code(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from onnxc.compress import compress

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    compress(onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
             ["fold_bn"], out_dir=str(tmp_path / "out"), log=lambda m: None)
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    code = ("import sys; from onnxc.cli import main; "
            f"rc = main(['run', {str(tmp_path / 'out')!r}, '--input', "
            f"{str(tmp_path / 'x.npy')!r}]); "
            "print(sorted(m for m in sys.modules if m.startswith('onnxc.backends.tvm.') "
            "or m == 'tvm')); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "tuning" not in loaded and "build" not in loaded and "'tvm'" not in loaded, loaded
