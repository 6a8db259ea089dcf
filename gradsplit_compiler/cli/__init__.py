"""The ``gradsplit`` command: one module per command, target loading, tables, progress.

Importing this package must stay cheap (``gradsplit --help`` does not import TensorFlow).
"""

from gradsplit_compiler.cli.parser import main

__all__ = ["main"]
