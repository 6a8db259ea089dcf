"""gradsplit_compiler.util: the collector pause and the byte formatter."""

import gc

from gradsplit_compiler.util import collector_paused, format_bytes


def test_collector_paused_turns_the_collector_off_and_back_on_once_outermost():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_paused_restores_it_after_an_error_and_leaves_it_off_if_it_was():
    try:
        with collector_paused():
            raise KeyError
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_format_bytes_uses_the_largest_binary_unit_reached():
    assert format_bytes(0) == "0 bytes"
    assert format_bytes(1023) == "1023 bytes"
    assert format_bytes(1024) == "1.00 KB"
    assert format_bytes(5.5 * 2**20, digits=1) == "5.5 MB"
    assert format_bytes(2**31, exact=True) == "2.00 GB (2147483648 bytes)"
