"""Extra CLI commands contributed by other modules (``sensitivity``, ``run``, ``bench``...).

A module registers a command with :func:`register_command` at import time and is
listed in ``COMMAND_MODULES``; the CLI imports them when it builds its parser.
"""

from __future__ import annotations

import importlib

# Modules that define commands; a missing module is simply not offered.
COMMAND_MODULES: list = ["onnxc.backends.tvm.commands", "onnxc.backends.vta.commands",
                         "onnxc.passes.prune.sensitivity", "onnxc.search"]

EXTRA_COMMANDS: list = []   # callables(subparsers) adding a sub-parser
HANDLERS: dict = {}         # command name -> handler(args) -> exit code


def register_command(name: str, configure, handler) -> None:
    """``configure(subparsers)`` adds the parser; ``handler(args)`` runs it."""
    if name in HANDLERS:
        return
    EXTRA_COMMANDS.append(configure)
    HANDLERS[name] = handler


def load_all() -> None:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)


load_all()
