"""Planning: per-op cost models and ``auto_split``, which chooses where to cut.

Reads the IR and core layers.
"""
