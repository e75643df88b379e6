"""featureviz.heap: a server process collects once at start and freezes what it holds, so later full garbage
collections walk only what came after (a full collection paused a worker's device thread 0.07-0.27 s in a burst
of 256 tiny jobs: bench/RESULTS.md, "Fifth pass"); and the ``gc`` cost counter of featureviz.phases.

Each check runs in a fresh interpreter: a frozen heap cannot be thawed into the state before, and pytest's own
heap would blur the counts. Counted in objects and collections, never in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def _run(code: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("FEATUREVIZ_GC_FREEZE", "FEATUREVIZ_PHASES")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=environ | env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_settle_freezes_what_the_process_holds_once():
    found = _run("""
        import gc, json, sys
        from featureviz import heap
        assert "onnx2torch" not in sys.modules and "onnx" not in sys.modules
        before = len(gc.get_objects())          # what a full collection walks
        frozen = heap.settle(heap.WORKER_PRELOAD + ("no_such_module_here",))
        preloaded = "onnx2torch" in sys.modules and "onnx" in sys.modules
        after = len(gc.get_objects())
        junk = [[i] for i in range(1000)]       # what comes after is tracked as usual
        later = len(gc.get_objects())
        print(json.dumps(dict(before=before, frozen=frozen, after=after, later=later, again=heap.settle(),
                              count=gc.get_freeze_count(), preloaded=preloaded)))
    """)
    assert found["preloaded"]  # what a first conversion imports is frozen with the rest (a missing one is skipped)
    assert found["frozen"] > found["before"]  # onnx2torch and its imports came in too
    assert 0.99 * found["frozen"] <= found["count"] <= found["frozen"]  # reference counting still frees some
    assert found["after"] < 0.05 * found["before"]  # a full collection walks almost nothing of it
    assert found["later"] >= found["after"] + 1000
    assert found["again"] == 0  # once per process: a model loaded later is never frozen (its cycles stay collectable)


def test_settle_can_be_turned_off_for_a_measurement():
    found = _run("""
        import gc, json
        from featureviz import heap
        print(json.dumps(dict(frozen=heap.settle(), count=gc.get_freeze_count())))
    """, FEATUREVIZ_GC_FREEZE="0")
    assert found == {"frozen": 0, "count": 0}


def test_the_gc_phase_counts_full_collections_only():
    code = """
        import gc, json
        from featureviz import phases
        first = phases.snapshot()["gc"]
        gc.collect(0)
        gc.collect(1)
        young = phases.snapshot()["gc"]
        gc.collect()
        gc.collect(2)
        full = phases.snapshot()["gc"]
        print(json.dumps(dict(first=first, young=young, full=full)))
    """
    on = _run(code, FEATUREVIZ_PHASES="1")
    assert on["young"][1] == on["first"][1]  # generations 0 and 1 are not counted
    assert on["full"][1] == on["first"][1] + 2 and on["full"][0] > on["first"][0]
    off = _run(code)
    assert off["full"] == [0.0, 0]  # the counters are off by default
