"""Planning: per-op cost models and ``auto_split``, which chooses where to cut.

Reads the IR and core layers.
"""

__all__: list[str] = []  # the modules are the API: import them by name
