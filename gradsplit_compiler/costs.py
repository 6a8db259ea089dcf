"""``gradsplit_compiler.costs``: kept for the import path users know; the module is
``gradsplit_compiler.plan.costs``."""

from gradsplit_compiler.plan.costs import *  # noqa: F403
from gradsplit_compiler.plan.costs import __all__  # noqa: F401
