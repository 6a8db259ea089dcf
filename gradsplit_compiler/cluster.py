"""``gradsplit_compiler.cluster``: kept for the import path users know; the module is
``gradsplit_compiler.run.cluster``."""

from gradsplit_compiler.run.cluster import *  # noqa: F403
from gradsplit_compiler.run.cluster import __all__  # noqa: F401
