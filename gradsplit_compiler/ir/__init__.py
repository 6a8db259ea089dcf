"""The IR layer: TensorFlow GraphDefs as networkx graphs, tensor names, the ``Program``.

Every other layer reads this one; it reads only ``gradsplit_compiler.errors`` and
``gradsplit_compiler._tf_internal``. ``gradsplit_compiler.ir.graph`` documents the graph's
node, edge and graph attributes; ``gradsplit_compiler.ir.program`` the ``Program`` that
passes receive and return.
"""

from gradsplit_compiler.ir.graph import *  # noqa: F403
from gradsplit_compiler.ir.graph import __all__  # noqa: F401
