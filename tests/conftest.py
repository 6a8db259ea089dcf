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

# Four logical CPU devices, so that tests/run/test_pipeline.py can give each stage a device of its
# own. It must run before TensorFlow initialises its devices (the first op or variable in the
# process); conftest is imported before any test module, in every pytest-xdist worker too.
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 4,
    )
except RuntimeError:  # already initialised: the multi-device tests skip and say why
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


def _floatx() -> str:
    keras = sys.modules.get("keras")
    return keras.backend.floatx() if keras is not None else "float32"


# Keras floatx values that a fixture wider than a test (module or session scope) set while a
# test ran: it holds them for its scope and restores them at its teardown.
_HELD_FLOATX: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before = _floatx()
    yield
    if fixturedef.scope != "function" and _floatx() != before:
        _HELD_FLOATX.append(_floatx())


@pytest.fixture(autouse=True)
def _keras_floatx_unchanged():
    """No test leaves Keras' default float type changed: the zoo's builders set it only inside
    ``keras_floatx``, which restores it. A leak is undone and reported as an error here, not
    seen later as a wrong dtype in another test of the same worker. A module-scoped fixture
    may hold another floatx for its module (it restores it at its teardown)."""
    _HELD_FLOATX.clear()
    before = _floatx()
    yield
    after, held = _floatx(), list(_HELD_FLOATX)
    _HELD_FLOATX.clear()
    if after != before and after not in held:
        sys.modules["keras"].backend.set_floatx(before)
        pytest.fail(f"the test left Keras' floatx at {after} (was {before}): set it with "
                    "gradsplit_compiler.zoo.keras_floatx, which restores it")
