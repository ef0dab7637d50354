"""Loading a command's modules without the cyclic garbage collector passing over them."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Imports and start-up work, with the cyclic garbage collector off.

    A run's start (its modules, pydantic's model schemas, the spec, the Docker client)
    allocates some 50,000 long-lived objects and no cyclic garbage, yet the collector passes
    over them again and again as they are made: 60-90 ms of the start of `evalrun run`.
    Afterwards what was loaded is frozen (``gc.freeze``: left out of every later
    collection, the one at exit too, as it lives as long as the program) and the collector
    is on again, as before.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()
