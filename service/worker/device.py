"""The worker's device: its description, the default max batch, out-of-memory errors and memory admission.

Memory admission (CUDA only): before a job joins a device step the worker estimates what it adds to the step's
peak memory. :class:`MemoryPlanner` measures it once per (model, input size, layer set) with two probe steps
(forward and backward at 1 and 2 images, ``max_memory_allocated`` after ``reset_peak_memory_stats``): peak memory
is close to affine in the number of images, so the two give a fixed cost and a cost per image. A job is admitted
when its estimate fits in the free device memory (``mem_get_info`` plus what torch's cache holds unused) less a
headroom; otherwise it waits for slots to leave, unless nothing is running (then it runs alone, and a job that
does not fit even alone fails with GPU_OOM).

Out-of-memory errors are ``torch.cuda.OutOfMemoryError``; ``FEATUREVIZ_FAULT_OOM_IMAGES=N`` (tests only) makes
every device step of more than N images raise :class:`SimulatedOutOfMemory` just before the model runs, so the
split-and-retry path is tested on a CPU.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["describe_device", "default_max_batch", "is_oom", "empty_cache", "MemoryPlanner", "fault_hook",
           "SimulatedOutOfMemory", "DEFAULT_MAX_BATCH_CPU", "DEFAULT_MAX_BATCH_CUDA"]

log = logging.getLogger("featureviz.worker")

# bench/RESULTS.md (2-core AMD EPYC): a shared step gave 1.6x the throughput of one job at a time at 96 px and
# 0.56-0.95x at 224 px (the figures: 9.4 ms per image at batch 1, 11.3 ms at batch 16, block 4); a small
# batch also lets short jobs start beside long ones.
DEFAULT_MAX_BATCH_CPU = 4
# On a GPU a 224-px image leaves the device mostly idle: on an H200 (bench/RESULTS.md) 64 single-image jobs per
# step gave 7.7x the throughput of one at a time through the server (18.7x for the device step alone), and memory
# admission keeps any batch within the device's memory.
DEFAULT_MAX_BATCH_CUDA = 64
HEADROOM_FRACTION = 0.08  # of the device's memory kept free when admitting a job


class SimulatedOutOfMemory(RuntimeError):
    """Raised by the test-only fault hook in place of torch.cuda.OutOfMemoryError."""


def fault_hook():
    """The test-only fault hook from ``FEATUREVIZ_FAULT_OOM_IMAGES`` (None when unset)."""
    raw = os.environ.get("FEATUREVIZ_FAULT_OOM_IMAGES", "").strip()
    if not raw:
        return None
    limit = int(raw)

    def before_model(images: int) -> None:
        if images > limit:
            raise SimulatedOutOfMemory(f"CUDA out of memory (simulated: {images} images > {limit})")

    return before_model


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, SimulatedOutOfMemory)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # freeing memory must never fail the worker
            log.exception("emptying the CUDA cache failed")


def resolve_device(requested: str | None) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_max_batch(device: torch.device) -> int:
    return DEFAULT_MAX_BATCH_CUDA if device.type == "cuda" else DEFAULT_MAX_BATCH_CPU


def describe_device(device: torch.device):
    """The device as a ``featureviz.v1.Device``."""
    from featureviz.v1 import featureviz_pb2 as pb

    kernels = os.environ.get("FEATUREVIZ_KERNELS", "auto")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return pb.Device(kind="cuda", name=props.name, memory_bytes=props.total_memory, kernels=kernels)
    threads = torch.get_num_threads()
    return pb.Device(kind="cpu", name=f"{os.cpu_count()} CPU cores, {threads} torch thread{'s' * (threads != 1)}",
                     kernels=kernels)


class MemoryPlanner:
    """CUDA memory admission (see the module docstring). ``probe(n)`` runs a forward and backward of n images
    and must leave nothing allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self.estimates: dict[tuple, tuple[float, float]] = {}  # key -> (fixed bytes, bytes per image)
        if self.enabled:
            self.total = torch.cuda.get_device_properties(device).total_memory
            self.headroom = HEADROOM_FRACTION * self.total

    def estimate(self, key: tuple, probe) -> tuple[float, float]:
        found = self.estimates.get(key)
        if found is None:
            peaks = []
            for n in (1, 2):
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                probe(n)
                torch.cuda.synchronize(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
            per_image = max(peaks[1] - peaks[0], 1.0)
            found = (max(peaks[0] - per_image, 0.0), per_image)
            self.estimates[key] = found
            log.info("memory estimate %s: %.1f MiB fixed + %.1f MiB per image", key[1:], found[0] / 2**20,
                     found[1] / 2**20)
        return found

    def fits(self, need: float) -> bool:
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return need <= free + cached - self.headroom
