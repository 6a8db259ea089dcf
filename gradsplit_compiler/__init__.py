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
from typing import Any

from gradsplit_compiler.errors import GradSplitError

_LAZY = {
    "auto_split": ".plan.autosplit",
    "from_networkx": ".ir",
    "to_networkx": ".ir",
    "mark": ".frontend.mark",
    "Pipeline": ".run.pipeline",
    "pipeline": ".run.pipeline",
    "Split": ".core.split",
    "split": ".core.split",
    "Stage": ".core.stage",
    "Report": ".core.verify",
    "verify": ".core.verify",
}

__all__ = ["GradSplitError", *sorted(_LAZY)]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsplit_compiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
