"""``gradsplit_compiler.render``: kept for the import path users know; the module is
``gradsplit_compiler.show.render``."""

from gradsplit_compiler.show.render import *  # noqa: F403
from gradsplit_compiler.show.render import __all__  # noqa: F401
