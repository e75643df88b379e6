"""A server process's heap and Python's cyclic garbage collector: one collection at start, then ``gc.freeze``.

A full (generation 2) collection walks every object the collector tracks, and it runs on whichever thread happens
to allocate, holding the GIL. A worker that has imported torch, onnx and onnx2torch tracks about 190,000 objects
before its first job (some 2,400 modules), so each full collection paused the device thread for 0.07-0.27 s on
the 2-core benchmark machine: a burst of 256 tiny jobs started 0.35-0.5 s late whenever one fell between the last
admission and the first step (bench/bench_server_cost.py; bench/RESULTS.md, "Fifth pass").

:func:`settle` imports what a job would import on first use, collects once, and moves every object alive then
to the collector's permanent generation (``gc.freeze``): modules, classes and functions that live as long as the
process. Later collections walk only what came after. Reference counting still frees frozen objects that are
no longer used; only a reference cycle among them is never collected, which is why this runs once, at start,
before any model or job exists (a converted model is full of cycles, and it is evicted later).

Torch-free and grpc-free (a root module): the ``featureviz serve`` process, the worker process and each Ray
worker call it once. ``FEATUREVIZ_GC_FREEZE=0`` turns it off (to measure what it changes: the ``gc`` phase of
:mod:`featureviz.phases` counts the full collections' pauses).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import threading

__all__ = ["settle", "WORKER_PRELOAD"]

# what a worker imports on its first model conversion (the importer's lazy modules; onnx2torch brings sympy and
# torch.fx's passes): imported at start, so they are frozen with the rest
WORKER_PRELOAD = ("onnx", "onnx.inliner", "onnx.external_data_helper", "onnx2torch")

_lock = threading.Lock()
_settled = False


def settle(preload: tuple[str, ...] = ()) -> int:
    """Import ``preload`` (a module that is not installed is skipped), collect the garbage, and freeze every object
    alive now. Once per process: a later call does nothing. -> the objects in the permanent generation (0 when it
    had run already)."""
    global _settled
    with _lock:
        if _settled or os.environ.get("FEATUREVIZ_GC_FREEZE", "1") == "0":
            return 0
        _settled = True
        for name in preload:
            with contextlib.suppress(ImportError):  # not installed: nothing of it to freeze
                importlib.import_module(name)
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()
