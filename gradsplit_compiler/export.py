"""``gradsplit_compiler.export``: kept for the import path users know; the module is
``gradsplit_compiler.core.export``."""

from gradsplit_compiler.core.export import *  # noqa: F403
from gradsplit_compiler.core.export import __all__  # noqa: F401
