"""gradsplit_compiler: cut a TensorFlow program into stages whose VJPs compose exactly.

>>> import gradsplit_compiler as gsc

See ``CONTRACT.md`` (shared with this project) for the public API: ``split``, ``mark``,
``Split``, ``Stage``, ``verify``, ``Report``, ``to_networkx``, ``from_networkx`` and
``GradSplitError``.
"""

from .errors import GradSplitError
from .ir import from_networkx, to_networkx
from .mark import mark
from .split import Split, split
from .stage import Stage
from .verify import Report, verify

__all__ = [
    "GradSplitError",
    "Report",
    "Split",
    "Stage",
    "from_networkx",
    "mark",
    "split",
    "to_networkx",
    "verify",
]
__version__ = "0.1.0"
