"""The matrix's tests run with the objects that exist before each test frozen out of the garbage collector.

`Trainer.train()` ends with accelerate's `release_memory`, a full `gc.collect()`; with every session's models and
modules alive that took about a second per training run (34 of them here). Frozen objects are still freed when
unfrozen after the test; only the collection skips them.
"""

import gc

import pytest


@pytest.fixture(autouse=True)
def objects_before_the_test_skip_garbage_collection():
    gc.freeze()
    yield
    gc.unfreeze()
