"""Recipes: one YAML file that says exactly how an artifact was made, so that
``onnxc compress --recipe recipe.yaml`` makes it again, byte for byte.

A recipe holds every pass, every option (per-layer choices included: per-group pruning
ratios, layers kept in float), the data files with their sha256 and preprocessing,
the seed, and the versions of onnxc / onnx / ONNX Runtime that made it. ``onnxc search``
writes one for the model it chooses. Replaying with other files or other versions is
allowed (the inputs a user has may have moved) but said in a warning, because then the
same bytes are not promised.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

from .errors import OutputError, UsageError

RECIPE_VERSION = 1


def sha256_file(path) -> str | None:
    """sha256 of a file; None for anything that is not a path to one (a ModelProto,
    bytes, a missing file)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    from . import __version__

    return {"onnxc": __version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def make(model: str, passes: list, options: dict, *, target: str = "onnx",
         calib_data: str | None = None, calib_samples: int | None = None,
         eval_data: str | None = None, eval_samples: int | None = None,
         preprocess: dict | None = None, input_shapes: list | None = None, seed: int = 0,
         per_layer: dict | None = None, search: dict | None = None) -> dict:
    """The recipe dict (plain YAML types only)."""
    def data(path, samples):
        if not path:
            return None
        return {"path": os.path.abspath(path), "sha256": sha256_file(path),
                "samples": samples}

    return {
        "onnxc_recipe": RECIPE_VERSION,
        "model": {"path": os.path.abspath(model), "sha256": sha256_file(model)},
        "target": target,
        "passes": list(passes),
        "options": {k: v for k, v in sorted(options.items()) if v is not None},
        "data": {"calib": data(calib_data, calib_samples),
                 "eval": data(eval_data, eval_samples),
                 "preprocess": {k: v for k, v in (preprocess or {}).items()
                                if v is not None}},
        "input_shapes": list(input_shapes or []),
        "seed": int(seed),
        "per_layer": per_layer or {},
        "versions": versions(),
        "search": search or {},
    }


def write(path: str, recipe: dict) -> None:
    import yaml

    tmp = f"{path}.{os.getpid()}.tmp"     # (several search workers may write at once)
    try:
        with open(tmp, "w") as f:
            f.write("# onnxc recipe: replay with `onnxc compress --recipe "
                    f"{os.path.basename(path)} -o DIR`\n")
            yaml.safe_dump(recipe, f, sort_keys=False, default_flow_style=False, width=100)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


def load(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"--recipe: file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--recipe {path}: not a readable YAML file ({first})") from None
    if not isinstance(recipe, dict) or recipe.get("onnxc_recipe") != RECIPE_VERSION \
            or not isinstance(recipe.get("passes"), list) \
            or not isinstance(recipe.get("options", {}), dict):
        raise UsageError(f"--recipe {path}: not an onnxc recipe (version {RECIPE_VERSION}) "
                         "with 'passes' and 'options'")
    return recipe


def apply_to_args(args, pass_options, warn=None) -> dict:
    """Fill ``args`` of ``onnxc compress`` from ``args.recipe``; what the command line
    gives explicitly wins. ``pass_options``: every declared pass/target ``Option``.
    Returns the recipe."""
    warn = warn or (lambda m: print(f"onnxc: warning: {m}", file=sys.stderr))
    recipe = load(args.recipe)
    if args.model is None:
        args.model = recipe["model"]["path"]
    want = recipe["model"].get("sha256")
    if want and sha256_file(args.model) not in (None, want):
        warn(f"model {args.model} differs from the recipe's (sha256): the result will "
             "not be the recipe's bytes")
    if args.passes is None:
        args.passes = ",".join(recipe["passes"])
    if args.target is None:
        args.target = recipe.get("target", "onnx")
    # An older spelling (alias, e.g. 'calibrator' for 'int8_calibrator') is its option.
    dest_of = {key: opt.dest for opt in pass_options for key in opt.keys}
    unknown = sorted(set(recipe.get("options", {})) - set(dest_of))
    if unknown:
        raise UsageError(f"--recipe: option '{unknown[0]}' is not an option of this onnxc "
                         "(made by another version?)")
    for key, value in recipe.get("options", {}).items():
        if getattr(args, dest_of[key], None) is None:
            setattr(args, dest_of[key], value)
    data = recipe.get("data") or {}
    for kind in ("calib", "eval"):
        entry = data.get(kind)
        if not entry or getattr(args, f"{kind}_data", None) is not None:
            continue
        setattr(args, f"{kind}_data", entry["path"])
        if getattr(args, f"{kind}_samples", None) is None:
            setattr(args, f"{kind}_samples", entry.get("samples"))
        if entry.get("sha256") and sha256_file(entry["path"]) != entry["sha256"]:
            warn(f"{kind} data {entry['path']} is missing or differs from the recipe's "
                 "(sha256): the result will not be the recipe's bytes")
    for key, value in (data.get("preprocess") or {}).items():
        # (--layout has a default, NCHW: a recipe's NHWC applies unless overridden)
        if getattr(args, key, None) is None or (key == "layout" and args.layout == "NCHW"):
            setattr(args, key, value)
    if args.input_shape is None and recipe.get("input_shapes"):
        args.input_shape = list(recipe["input_shapes"])
    if args.seed is None:
        args.seed = int(recipe.get("seed", 0))
    mine = versions()
    differ = [f"{k} {v} (recipe {recipe.get('versions', {}).get(k)})"
              for k, v in mine.items() if k != "python"
              and recipe.get("versions", {}).get(k) not in (None, v)]
    if differ:
        warn("recipe made with other versions: " + ", ".join(differ)
             + "; the bytes may differ")
    return recipe
