"""gradsplit_compiler: cut a TensorFlow program into stages whose VJPs compose exactly.

>>> import gradsplit_compiler as gsc

See ``CONTRACT.md`` (shared with this project) for the public API: ``split``, ``mark``,
``Split``, ``Stage``, ``verify``, ``Report``, ``to_networkx``, ``from_networkx``,
``pipeline``, ``Pipeline`` and ``GradSplitError``.

Names are loaded on first use, so ``import gradsplit_compiler`` (and ``gradsplit --help``)
does not pay for importing TensorFlow until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .errors import GradSplitError

_LAZY = {
    "auto_split": ".autosplit",
    "from_networkx": ".ir",
    "to_networkx": ".ir",
    "mark": ".mark",
    "Pipeline": ".pipeline",
    "pipeline": ".pipeline",
    "Split": ".split",
    "split": ".split",
    "Stage": ".stage",
    "Report": ".verify",
    "verify": ".verify",
}

__all__ = ["GradSplitError", *sorted(_LAZY)]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsplit_compiler' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``gsc.split``, ``gsc.mark``, ... the functions: importing the submodule of the
    same name (``gradsplit_compiler.split``) must not rebind the package attribute to the
    module, which Python's import system otherwise does."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and imports
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
