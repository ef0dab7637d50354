"""``loading``: the collector is off while a command loads, and on again afterwards."""

from __future__ import annotations

import gc

import pytest

from runner._internal.startup import loading

pytestmark = pytest.mark.unit


def test_the_collector_is_off_inside_and_back_on_after_with_what_was_loaded_frozen():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with loading():
            assert not gc.isenabled()
            kept = [{"n": i} for i in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(kept)
    finally:
        gc.unfreeze()


def test_it_leaves_a_collector_switched_off_by_the_caller_off_and_unfrozen():
    gc.disable()
    try:
        frozen = gc.get_freeze_count()
        with loading():
            pass
        assert not gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.enable()


def test_an_error_while_loading_still_switches_it_back_on():
    with pytest.raises(RuntimeError), loading():
        raise RuntimeError("failed to load")
    assert gc.isenabled()
    gc.unfreeze()
