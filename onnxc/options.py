"""Declared options and the typed, frozen config built from them.

A pass or backend declares its parameters as ``Option``s (flag, type, default, help,
choices), in the manner of Olive's per-pass config. :func:`configure` turns raw values
— strings from the command line or Python values from ``onnxc.compress(options=...)``
— into a :class:`Config`: defaults applied, types converted, choices checked, the same
way for both, with one-line :class:`UsageError`s naming the flag. The pass receives
the config as ``self.config`` and report.json records it (``passes[].config``).

Every flag is declared once: :func:`declare` (called when a pass or backend is
registered) refuses a flag or key that another declaration already uses. Owners may
share an option by sharing the very same declaration (the quantization passes share
``--keep-float``, the TVM targets their tuning flags).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UsageError

# ----------------------------------------------------------------------------------------
# Value types with a range: raise ValueError("must be ...") on a bad value.


def integer(raw) -> int:
    if isinstance(raw, bool):
        raise ValueError("must be an integer")
    if isinstance(raw, str):
        raw = raw.strip()
        try:
            return int(raw)
        except ValueError:
            pass
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None
    if not value.is_integer():
        raise ValueError("must be an integer")
    return int(value)


def number(raw) -> float:
    if isinstance(raw, bool):
        raise ValueError("must be a number")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


def positive_int(raw) -> int:
    try:
        value = integer(raw)
    except ValueError:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            raise                       # a number that is not whole: "must be an integer"
        raise ValueError("must be a positive integer") from None
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def non_negative_int(raw) -> int:
    value = integer(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def positive(raw) -> float:
    value = number(raw)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def non_negative(raw) -> float:
    value = number(raw)
    if not value >= 0:
        raise ValueError("must not be negative")
    return value


def fraction(raw) -> float:
    """A share in [0, 1)."""
    value = number(raw)
    if not 0.0 <= value < 1.0:
        raise ValueError("must be in [0, 1)")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def boolean(raw) -> bool:
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError("must be true or false")
    if isinstance(raw, (bool, int)) and raw in (0, 1):
        return bool(raw)
    import numpy as np

    if isinstance(raw, np.bool_):
        return bool(raw)
    raise ValueError("must be true or false")


# ----------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Option:
    """One declared parameter: a CLI flag, and the key ``dest`` in configs and the API.

    ``Option("--prune-ratio", fraction, None, "help")``; ``type`` is ``str``, ``int``,
    ``float``, ``bool`` or a converter raising ValueError("must be ...") (see above);
    ``action="store_true"`` makes a switch. ``aliases`` are older spellings of the
    flag, accepted on the command line and (as keys) in the API. ``choices`` may be a
    live registry (a dict): membership is checked when the config is built.
    """

    flag: str
    type: Callable | None = str
    default: Any = None
    help: str = ""
    choices: Any = None
    action: str | None = None      # "store_true" for switches
    aliases: tuple = ()

    @property
    def dest(self) -> str:
        return _dest(self.flag)

    @property
    def keys(self) -> tuple:
        """Every key the API accepts for this option: dest first, then alias dests."""
        return (self.dest,) + tuple(_dest(a) for a in self.aliases)

    @property
    def flags(self) -> tuple:
        return (self.flag,) + tuple(self.aliases)

    @property
    def is_switch(self) -> bool:
        return self.action == "store_true" or self.type is bool

    def convert(self, raw) -> Any:
        """The typed value of ``raw`` (None: the default); UsageError naming the flag."""
        if raw is None:
            return bool(self.default) if self.is_switch else self.default
        try:
            value = self._convert(raw)
        except ValueError as exc:
            raise UsageError(f"{self.flag} {exc}, got {_shown(raw)}") from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}"
                             f", got {_shown(raw)}")
        return value

    def _convert(self, raw):
        if self.is_switch:
            return boolean(raw)
        kind = self.type or str
        if kind is str:
            if isinstance(raw, os.PathLike):
                return os.fspath(raw)
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return str(raw)
            return raw          # a string, or a ready object from the API (a Dataset...)
        if kind is int:
            return integer(raw)
        if kind is float:
            return number(raw)
        return kind(raw)


def _shown(raw) -> str:
    return repr(raw) if isinstance(raw, str) and (not raw or raw != raw.strip()) \
        else str(raw) if isinstance(raw, (str, int, float)) else repr(raw)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# ----------------------------------------------------------------------------------------
# Config


class Config(Mapping):
    """The frozen, typed values of one owner's options, defaults included.

    Read as attributes (``config.prune_ratio``) or as a mapping; ``as_dict()`` is
    what report.json records."""

    __slots__ = ("_owner", "_values")

    def __init__(self, owner: str, values: dict):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._owner} has no option {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"the config of {self._owner} is frozen")

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self._owner}: {self._values!r})"

    def as_dict(self) -> dict:
        return dict(self._values)


def configure(owner: str, options: tuple, values: Mapping | None = None) -> Config:
    """Config of ``owner`` from ``values`` (keys: dests or alias dests; other keys are
    other owners' and ignored here — see :func:`check_keys`)."""
    values = values or {}
    out = {}
    for opt in options:
        given = [(k, values[k]) for k in opt.keys if values.get(k) is not None]
        if len({repr(v) for _, v in given}) > 1:
            raise UsageError(f"{opt.flag} given twice with different values "
                             f"({', '.join(f'{k}={v!r}' for k, v in given)})")
        out[opt.dest] = opt.convert(given[0][1] if given else None)
    return Config(owner, out)


# ----------------------------------------------------------------------------------------
# One namespace of flags


_FLAGS: dict = {}      # flag or key -> (Option, owner)


def declare(owner: str, options: tuple) -> None:
    """Record ``owner``'s options; a flag or key another declaration uses is an error
    (and then nothing of ``owner`` is recorded)."""
    seen = {}
    for opt in options:
        for name in opt.flags + opt.keys:
            if name in seen and seen[name] is not opt:
                raise RuntimeError(f"{owner}: option {name} declared twice")
            seen[name] = opt
            other = _FLAGS.get(name)
            if other is not None and (other[0] is None or (other[0] is not opt
                                                            and other[0] != opt)):
                raise RuntimeError(f"option {name} of {owner} is already declared by "
                                   f"{other[1]}")
    for name, opt in seen.items():
        _FLAGS.setdefault(name, (opt, owner))


def reserve(owner: str, flags) -> None:
    """Flags a command defines itself (``--seed``...): no pass or backend may declare them."""
    for flag in flags:
        other = _FLAGS.get(flag)
        if other is not None and other[1] != owner:
            raise RuntimeError(f"option {flag} of {owner} is already declared by {other[1]}")
        _FLAGS[flag] = (None, owner)


def known_keys() -> set:
    """Every option key the API accepts (dests and alias dests of all declarations)."""
    return {name for name in _FLAGS if not name.startswith("-")}


def check_keys(values: Mapping, extra: set = frozenset()) -> None:
    """UsageError for a key no pass, backend or run setting declares."""
    known = known_keys() | set(extra)
    for key in values:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown option '{key}'{hint}; 'onnxc compress --help' "
                             f"lists them (as flags)")


class Configurable:
    """What passes and backends share: declared ``options`` become ``self.config``.

    ``kind`` names the owner in error messages ("pass 'prune'", "target 'x86'")."""

    name: str = ""
    kind: str = ""
    options: tuple = ()

    def __init__(self, config: Config | Mapping | None = None):
        if not isinstance(config, Config):
            config = self.configure(config)
        self.config = config

    @classmethod
    def configure(cls, values: Mapping | None = None) -> Config:
        """This owner's typed config from raw values (CLI strings or API values)."""
        return configure(f"{cls.kind} '{cls.name}'", cls.options, values)
