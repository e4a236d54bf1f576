"""Python's cyclic garbage collector, set for a long-running server once it has started.

A streamed request allocates a few hundred container objects (coroutines, futures, timer handles, parsed events)
that live as long as the answer. With CPython's default thresholds (700, 10, 10) the collector traverses the
in-flight ones again and again: measured on the gateway at 256 concurrent streams, ~0.21 ms of CPU per request
(a fifth of all it spent), and a full collection -- which walks every module, class and function loaded at
start-up -- paused the event loop for up to 69 ms.

Two changes, both standard for servers (CPython's gc.freeze exists for this):
- `gc.freeze()` once started: what start-up built lives for the whole process; frozen, no collection walks it again.
- thresholds (2000, 50, 20): a young collection after 2000 net allocations instead of 700, and the older
  generations 5x and 2x less often. Their cost is proportional to what is alive, not to what was allocated since
  the last one, so collecting them less often saves that much. Same run: ~0.075 ms per request, longest pause
  12 ms. Garbage in reference cycles still goes, only a little later; what refcounting frees is unaffected.
"""

from __future__ import annotations

import gc

SERVING_THRESHOLDS = (2000, 50, 20)


def settle_after_start() -> None:
    """Collect what start-up left, freeze the rest and set the serving thresholds. Call once the process has
    started serving (its ports bound), from the process's own composition root."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
