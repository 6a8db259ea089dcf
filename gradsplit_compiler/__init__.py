"""gradsplit_compiler: cut a TensorFlow program into stages whose VJPs compose exactly.

>>> import gradsplit_compiler as gsc

The public API (``split``, ``mark``, ``Split``, ``Stage``, ``verify``, ``Report``,
``to_networkx``, ``from_networkx``, ``capture``, ``Program``, ``to_function``,
``pipeline``, ``Pipeline``, ``auto_split`` and ``GradSplitError``) and what each promises
are in ``docs/api.md``.

Names are loaded on first use, so ``import gradsplit_compiler`` (and ``gradsplit --help``)
does not pay for importing TensorFlow until something needs it. TensorFlow is not a
dependency of the package, so that installing it never replaces the TensorFlow build a
user chose (CPU, CUDA, a nightly); importing checks, from package metadata alone, that one
is installed and recent enough.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from typing import Any

from gradsplit_compiler.errors import GradSplitError

_MINIMUM_TENSORFLOW = (2, 16)
# The distributions that install the `tensorflow` module, most common first.
_TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-macos",
                             "tensorflow-intel", "tensorflow-aarch64", "intel-tensorflow",
                             "tf-nightly", "tf-nightly-cpu")
_INSTALL_HINT = (
    'Install it with the package: pip install "gradsplit-compiler[cpu]" (CPU build) or '
    'pip install "gradsplit-compiler[gpu]" (CUDA build, Linux), or install TensorFlow '
    "yourself: https://www.tensorflow.org/install."
)


def _installed_tensorflow() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed TensorFlow, without importing it.

    ``None`` when no ``tensorflow`` module can be found; ``("unknown", "")`` when the module
    is there but no known distribution claims it (a build from source).
    """
    if importlib.util.find_spec("tensorflow") is None:
        return None
    for dist in _TENSORFLOW_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown", ""


def _check_tensorflow(found: tuple[str, str] | None) -> None:
    """Raise ``ImportError`` saying what to install when ``found`` (as returned by
    ``_installed_tensorflow``) is no TensorFlow or one older than ``_MINIMUM_TENSORFLOW``."""
    need = ".".join(map(str, _MINIMUM_TENSORFLOW))
    if found is None:
        raise ImportError(
            f"gradsplit_compiler needs TensorFlow >= {need}, and none is installed. TensorFlow "
            "is not a dependency of gradsplit-compiler, so that installing it never replaces "
            f"the TensorFlow build you chose. {_INSTALL_HINT}"
        )
    dist, version = found
    release = re.match(r"(\d+)\.(\d+)", version)
    if release and tuple(map(int, release.groups())) < _MINIMUM_TENSORFLOW:
        raise ImportError(
            f"gradsplit_compiler needs TensorFlow >= {need}; {dist} {version} is installed. "
            f'Upgrade it (pip install --upgrade "{dist}>={need}"), or, in an environment '
            f"without TensorFlow: {_INSTALL_HINT}"
        )


def _importing_the_command_line() -> bool:
    """Whether this import of the package is on the way to ``gradsplit_compiler.cli`` (the
    ``gradsplit`` command's entry point, or ``python -m`` of one of its modules).

    Read from the import machinery's frames: ``importlib._bootstrap._find_and_load(name,
    ...)`` is on the stack for the submodule being imported while its parent package runs
    (CPython 3.9-3.13; ``tests/test_install.py`` runs the command without TensorFlow).
    """
    import inspect

    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_find_and_load":
            name = frame.f_locals.get("name")
            if isinstance(name, str) and (name == f"{__name__}.cli"
                                          or name.startswith(f"{__name__}.cli.")):
                return True
        frame = frame.f_back
    return False


# Why the library cannot run here (no TensorFlow, or one too old), or ``None``. Importing the
# package raises it as an ``ImportError``, except on the way to the command line: the
# ``gradsplit`` command still shows its help, and each command prints this and fails.
TENSORFLOW_PROBLEM: str | None = None
try:
    _check_tensorflow(_installed_tensorflow())
except ImportError as error:
    if not _importing_the_command_line():
        raise
    TENSORFLOW_PROBLEM = str(error)

_LAZY = {
    "auto_split": ".plan.autosplit",
    "capture": ".frontend.capture",
    "Program": ".ir.program",
    "to_function": ".core.function",
    "from_networkx": ".ir",
    "to_networkx": ".ir",
    "load_variables": ".run.training",
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
        if TENSORFLOW_PROBLEM is not None:
            raise ImportError(TENSORFLOW_PROBLEM)
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsplit_compiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
