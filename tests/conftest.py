"""Shared setup for the test suite: quiet TensorFlow logs, seeded randomness."""

import os
import sys

# Before TensorFlow is imported anywhere: its C++ INFO and WARNING lines drown pytest's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

# models.py holds checks the tests share (assert_round_trip, assert_matches_tape): pytest
# explains their failing asserts as it does a test's own (before any test imports it).
pytest.register_assert_rewrite("models")

# Four logical CPU devices, so that the pipeline and cluster tests can give each stage a device
# of its own: the one place they are set up. It must run before TensorFlow initialises its
# devices (the first op or variable in the process); conftest is imported before any test
# module, in every pytest-xdist worker too. A test that needs them asks models.cpu_devices(n),
# which fails (never skips) when they are missing.
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 4,
    )
except RuntimeError:  # already initialised: the multi-device tests fail and say why
    pass


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", default=False,
        help="run the property-based tests with many more examples (minutes, not seconds)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: a large model (ResNet50, MobileNetV2); runs by default, "
        "deselect with -m 'not heavy'",
    )


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same TensorFlow and NumPy seeds."""
    tf.random.set_seed(0)
    np.random.seed(0)


def _keras_defaults() -> tuple:
    """Keras' floatx and global dtype policy (``None`` until a layer without a dtype fixes
    it); ``("float32", None)`` before Keras is imported."""
    keras = sys.modules.get("keras")
    if keras is None:
        return ("float32", None)
    from keras.src.backend.common import global_state

    return (keras.backend.floatx(), global_state.get_global_attribute("dtype_policy", None))


def _restore_keras_defaults(state: tuple) -> None:
    from keras.src.backend.common import global_state

    sys.modules["keras"].backend.set_floatx(state[0])
    global_state.set_global_attribute("dtype_policy", state[1])


# Keras defaults that a fixture wider than a test (module or session scope) set while a test
# ran: it holds them for its scope and restores them at its teardown.
_HELD: list[tuple] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before = _keras_defaults()
    yield
    if fixturedef.scope != "function" and _keras_defaults() != before:
        _HELD.append(_keras_defaults())


def _changed(before: tuple, after: tuple) -> bool:
    """A different floatx, or a policy of another name (a layer made without a dtype fixes the
    policy from ``None`` to the floatx of the moment: Keras' own default, not a leak)."""
    def effective(state):
        return state[1].name if state[1] is not None else state[0]

    return after[0] != before[0] or effective(after) != effective(before)


@pytest.fixture(autouse=True)
def _keras_defaults_unchanged():
    """No test leaves Keras' floatx or dtype policy changed: the zoo's builders set them only
    inside ``keras_floatx``, which restores them. A leak is undone and reported as an error
    here, not seen later as a wrong dtype in another test of the same worker. A module-scoped
    fixture may hold other defaults for its module (it restores them at its teardown)."""
    _HELD.clear()
    before = _keras_defaults()
    yield
    after, held = _keras_defaults(), list(_HELD)
    _HELD.clear()
    if _changed(before, after) and after not in held:
        _restore_keras_defaults(before)
        pytest.fail(f"the test left Keras' floatx / dtype policy at {after} (was {before}): "
                    "set them with gradsplit_compiler.zoo.keras_floatx, which restores them")
