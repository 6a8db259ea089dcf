"""The runtime: schedules as data, the step engine that runs them on devices, pipelines,
and TensorFlow clusters. Reads the core layer; draws nothing (pictures live in ``show``).
"""

__all__: list[str] = []
