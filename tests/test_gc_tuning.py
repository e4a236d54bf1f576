"""The serving GC settings (llmgw.gc_tuning): start-up's objects frozen, the serving thresholds in force."""

import gc

from llmgw import gc_tuning


def test_settle_after_start_freezes_the_start_up_heap_and_sets_the_serving_thresholds():
    before = gc.get_threshold()
    built_at_start = [object() for _ in range(10)] + [{"k": [1, 2]} for _ in range(10)]
    try:
        gc_tuning.settle_after_start()
        assert gc.get_threshold() == gc_tuning.SERVING_THRESHOLDS
        assert gc.get_freeze_count() >= len(built_at_start) // 2  # the tracked containers among them, and more
        collected = {id(o) for o in gc.get_objects()}  # the generations a collection walks; frozen ones are not in
        assert all(gc.is_tracked(o) and id(o) not in collected for o in built_at_start[10:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
