"""``gradsplit_compiler.schedules``: kept for the import path users know; the module is
``gradsplit_compiler.run.schedules``."""

from gradsplit_compiler.run.schedules import *  # noqa: F403
from gradsplit_compiler.run.schedules import __all__  # noqa: F401
