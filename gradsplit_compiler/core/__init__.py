"""The compiler core: the pass pipeline, stage rebuild (forward, backward, residuals), the
``Split`` and ``Stage`` objects, the one compose loop, ``verify`` and ``export``.

Reads the IR and frontend layers and ``passes``; nothing in ``plan``, ``run``, ``show`` or
``cli``.
"""

__all__: list[str] = []  # the modules are the API: import them by name
