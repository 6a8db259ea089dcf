"""Pictures: the program with its cuts (``render``), pipeline timelines (``timeline``), and
TensorBoard graphs. Reads what the other layers record; runs nothing.
"""

__all__: list[str] = []
