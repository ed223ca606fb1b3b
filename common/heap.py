"""Start-up objects kept out of the garbage collector, in both kinds of process.

A full collection scans every tracked object and stops every thread of the process while
it runs: ~30 ms in a webhook worker (~66k objects after the app is loaded) and 130-230 ms
in a Celery worker holding the model (250-400k objects), `python -m bench.gc_pauses`.
What start-up built lives as long as the process, so it is frozen once loaded; a full
pass then looks only at what requests and tasks created since.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect what start-up left as garbage, then freeze the rest (call once loaded)."""
    gc.collect()
    gc.freeze()
